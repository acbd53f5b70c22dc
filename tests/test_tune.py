"""Sweeps: search-space files, a 2-trial sweep with MLflow parent/child runs and the champion alias."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from mlflow.tracking import MlflowClient

from cliptime.cli import tune_main
from cliptime.errors import CliptimeError
from cliptime.registry import ChampionRule
from cliptime.tune import _check_complete, load_spec, sweep
from tests.conftest import ROOT

TINY_FIXED = {
    "epochs": 1,
    "sequences": 7,
    "frames": 10,
    "image_size": 32,
    "head_depth": 1,
    "ffn_dim": 64,
    "batch_size": 16,
    "cpus_per_worker": 1,
}


def write_spec(tmp_path: Path, **overrides) -> Path:
    spec = {
        "task": "cliptime",
        "metric": "val/accuracy",
        "mode": "max",
        "num_samples": 2,
        "max_concurrent": 1,
        "seed": 0,
        "scheduler": {"type": "fifo"},
        "fixed": TINY_FIXED,
        "space": {"lr": {"loguniform": [0.001, 0.003]}, "head": {"choice": ["transformer", "mlp"]}},
    }
    spec.update(overrides)
    spec = {k: v for k, v in spec.items() if v is not None}  # None: leave the key out
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "tune_spaces").glob("*.yaml")))
def test_shipped_spaces_are_valid(name):
    spec = load_spec(ROOT / "tune_spaces" / name)
    assert spec.space and spec.num_samples >= 4


TWO_OBJECTIVES = {
    "metric": None,
    "mode": None,
    "objectives": [{"metric": "val/accuracy", "mode": "max"}, {"metric": "val/time_mae_hours", "mode": "min"}],
    "champion": {"best": "val/accuracy", "within": {"val/time_mae_hours": 0.5}},
}


@pytest.mark.parametrize(
    "overrides,named",
    [
        ({"trials": 3}, "unknown key(s) trials"),
        ({"space": {"lr": {"uniform": [0.01, 0.001]}}}, "space.lr: bounds [0.01, 0.001] need low < high"),
        ({"space": {"lr": {"gaussian": [0, 1]}}}, "space.lr: unknown distribution 'gaussian'"),
        ({"space": {"lr": {"loguniform": [0, 1]}}}, "space.lr: loguniform bounds must be positive"),
        ({"space": {"depth": {"int": [1, 4]}}}, "space.depth is not a cliptime task or training setting"),
        ({"fixed": {"epochz": 2}}, "fixed.epochz is not"),
        ({"task": "video"}, "task 'video'"),
        ({"scheduler": {"type": "hyperband"}}, "scheduler.type 'hyperband'"),
        ({"space": {"frames": {"int": [10, 20]}}}, "space.frames decides the data"),
        ({"metric": "train/loss"}, "metric 'train/loss' must be a validation metric (val/...)"),
        ({"fixed": {"epochs": "4"}}, "fixed.epochs is '4', not a whole number"),
        ({"fixed": {"lr": True}}, "fixed.lr is True, not a number"),
        ({"fixed": {"hours": [0, "72h"]}}, "fixed.hours is [0, '72h'], not a list of number"),
        ({"space": {"head": {"choice": ["mlp", 2]}}}, "space.head: choice 2 is not a string"),
        ({"space": {"head": {"uniform": [0, 1]}}}, "space.head: uniform samples numbers, and head is a string"),
        ({"space": {"epochs": {"uniform": [1, 4]}}}, "space.epochs: uniform samples numbers, and epochs is a whole"),
        ({"objectives": [{"metric": "val/accuracy"}]}, "either metric and mode, or objectives, not both"),
        ({"warm_start": 3}, "warm_start must be {epochs: N, fixed: {SETTING: VALUE, ...}}"),
        ({"warm_start": {"epochs": 0}}, "warm_start.epochs is 0, not a whole number >= 1"),
        ({"warm_start": {"epochs": 1, "fixed": {"lrr": 1}}}, "warm_start.fixed.lrr is not a cliptime task or"),
        ({"warm_start": {"epochs": 1, "fixed": {"frames": 5}}}, "warm_start.fixed.frames: the warm start trains on"),
        ({"warm_start": {"epochs": 1, "fixed": {"lr": "high"}}}, "warm_start.fixed.lr is 'high', not a number"),
        (
            {"warm_start": {"epochs": 1}, "space": {"templates": {"choice": ["generic", "detailed"]}}},
            "space.templates decides the data, which one warm start cannot serve",
        ),
        ({"warm_start": {"epochs": 1}, "fixed": {"init_from": "/ckpt"}}, "init_from is what warm_start sets"),
        ({**TWO_OBJECTIVES, "objectives": []}, "objectives must be a non-empty list"),
        ({**TWO_OBJECTIVES, "objectives": [{"metric": "train/loss"}]}, "objectives[0] metric 'train/loss' must be"),
        ({**TWO_OBJECTIVES, "objectives": [{"metric": "val/a", "mode": "up"}]}, "objectives[0] mode 'up' must be"),
        ({**TWO_OBJECTIVES, "objectives": [{"metric": "val/a"}, {"metric": "val/a"}]}, "objectives[1] metric val/a is"),
        ({**TWO_OBJECTIVES, "objectives": ["val/a"]}, "objectives[0] must be {metric: val/..., mode: max|min}"),
        ({**TWO_OBJECTIVES, "scheduler": {"type": "asha"}}, "a multi-objective sweep needs {type: fifo}"),
        ({**TWO_OBJECTIVES, "champion": {"best": "val/loss"}}, "champion.best 'val/loss' is not one of the objectives"),
        ({**TWO_OBJECTIVES, "champion": {"top": "val/accuracy"}}, "champion must be {best: METRIC"),
        (
            {**TWO_OBJECTIVES, "champion": {"best": "val/accuracy", "within": {"val/accuracy": 0.1}}},
            "champion.within.val/accuracy must be another of the objectives",
        ),
        (
            {**TWO_OBJECTIVES, "champion": {"best": "val/accuracy", "within": {"val/time_mae_hours": -1}}},
            "champion.within.val/time_mae_hours is -1, not a margin >= 0",
        ),
    ],
)
def test_malformed_space_names_the_key(tmp_path, overrides, named):
    with pytest.raises(CliptimeError, match=re.escape(named)):
        load_spec(write_spec(tmp_path, **overrides))


def test_a_multi_objective_space_parses_into_objectives_and_a_champion_rule(tmp_path):
    spec = load_spec(write_spec(tmp_path, **TWO_OBJECTIVES, scheduler=None))
    assert spec.multi_objective and spec.scheduler == {"type": "fifo"}  # every trial runs to its end
    assert spec.objectives == [("val/accuracy", "max"), ("val/time_mae_hours", "min")]
    assert spec.rule == ChampionRule("accuracy", "max", (("time_mae_hours", "min", 0.5),))
    assert (spec.metric, spec.mode) == ("val/accuracy", "max")
    single = load_spec(write_spec(tmp_path))
    assert not single.multi_objective and single.rule == ChampionRule("accuracy", "max")


def test_a_failed_trial_stops_the_sweep_in_one_line_naming_its_resume():
    """The check `sweep` runs on its trials before it tests or registers anything (cliptime/tune.py): one failed
    trial stops it in one line that names the failure and the command that retries it (a Ctrl-C'd sweep, end to
    end: tests/test_recovery.py)."""
    spec = SimpleNamespace(num_samples=3)
    diverged = RuntimeError("Traceback (most recent call last):\n  ...\nValueError: the loss is nan")
    results = [SimpleNamespace(error=None), SimpleNamespace(error=diverged), SimpleNamespace(error=None)]
    resume = "python jobs/tune.py tune_spaces/toy.yaml --resume sweep-1"
    with pytest.raises(CliptimeError) as stopped:
        _check_complete(spec, results, resume)
    assert str(stopped.value) == (
        "1 of 3 trials failed (last line of the first: ValueError: the loss is nan); nothing registered; "
        f"retry them with {resume}"
    )


def test_malformed_space_fails_before_ray_starts(tmp_path, capsys, monkeypatch):
    import cliptime.tune

    started = []
    monkeypatch.setattr(cliptime.tune, "init_ray", lambda *a, **k: started.append(a))  # a Ray already up counts too
    path = write_spec(tmp_path, space={"lr": {"uniform": [1, 0]}})
    assert tune_main([str(path), "--storage-path", str(tmp_path / "rr")]) == 2
    err = capsys.readouterr().err
    assert "space.lr" in err and "Traceback" not in err
    assert started == []


def test_a_sweep_prepares_one_data_set_per_data_choice(tmp_path):
    spec = load_spec(
        write_spec(
            tmp_path, space={"templates": {"choice": ["generic", "detailed"]}, "lr": {"loguniform": [0.001, 0.003]}}
        )
    )
    assert spec.data_variants() == [{"templates": "generic"}, {"templates": "detailed"}]
    assert spec.data_variant({"templates": "detailed", "lr": 0.002, "frames": 10}) == (("templates", "detailed"),)
    assert load_spec(write_spec(tmp_path)).data_variants() == [{}]


def test_bad_yaml_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task: cliptime\nspace: [unclosed\n")
    with pytest.raises(CliptimeError, match="bad.yaml is not valid YAML"):
        load_spec(path)


@pytest.mark.slow
def test_a_sweep_makes_its_data_once_registers_the_best_and_sets_champion(
    ray_session, empty_store, monkeypatch, tmp_path
):
    """Two trials of the toy task (its answer is known) searched on two objectives, then the trial the champion
    rule picks is tested: all on data made once on the driver (each block generated once); a parent run with a
    child per trial, the Pareto front as a table and a plot; the champion alias. Then a one-objective sweep."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_store)
    log = tmp_path / "generated.log"
    path = tmp_path / "toy.yaml"
    spec = {
        "task": "tests.toy_task:ToyTask",
        "objectives": [{"metric": "val/accuracy", "mode": "max"}, {"metric": "val/ce", "mode": "min"}],
        "champion": {"best": "val/accuracy", "within": {"val/ce": 0.05}},
        "num_samples": 2,
        "fixed": {"epochs": 3, "generate_log": str(log)},
        "space": {"hidden": {"choice": [8, 16]}, "lr": {"loguniform": [0.005, 0.02]}},
    }
    path.write_text(yaml.safe_dump(spec))
    result = sweep(str(path), str(tmp_path / "rr"), "test-sweeps")
    assert result["trials"] == 2 and result["prepared_data_sets"] == 1
    assert len(log.read_text().splitlines()) == 6  # 4 train blocks, 1 val, 1 test: once
    assert result["test_metrics"]["accuracy"] >= 0.8  # chance is 0.5
    assert result["champion_version"] == result["model_version"]  # first sweep: no champion to beat
    client = MlflowClient(empty_store)
    parent = client.get_run(result["run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result['run_id']}'")
    assert len(children) == 2
    last = {  # each trial's final validation figures, as its child run holds them
        c.info.run_name: {m: c.data.metrics[f"val/{m}"] for m in ("accuracy", "ce")} for c in children
    }
    # The table holds every trial's objectives; the front is the trials no other beats on both; the chosen one
    # has the best accuracy among those whose cross-entropy is within 0.05 of the best.
    table = json.loads((Path(client.download_artifacts(result["run_id"], "pareto_front.json"))).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    by_run = {name: next(r for r in rows if r["trial"] in name) for name in last}
    for name, row in by_run.items():
        assert (row["val/accuracy"], row["val/ce"]) == pytest.approx((last[name]["accuracy"], last[name]["ce"]))
        beaten = any(
            o["accuracy"] >= last[name]["accuracy"] and o["ce"] <= last[name]["ce"] and o != last[name]
            for o in last.values()
        )
        assert row["pareto_front"] == (not beaten)
    (chosen,) = [name for name, row in by_run.items() if row["chosen"]]
    near = [n for n in last if last[n]["ce"] <= min(o["ce"] for o in last.values()) + 0.05]
    assert chosen in near and last[chosen]["accuracy"] == max(last[n]["accuracy"] for n in near)
    assert by_run[chosen]["hidden"] == result["best_config"]["hidden"]
    assert sorted(result["pareto_front"]) == sorted(r["trial"] for r in rows if r["pareto_front"])
    plots = {a.path for a in client.list_artifacts(result["run_id"], "plots")}
    assert "plots/pareto_front.png" in plots
    version = client.get_model_version("toy", result["model_version"])
    # the test scores the champion is judged on, under the test data's fingerprint; no champion was there before
    for m in ("accuracy", "ce"):
        assert float(version.tags[f"test.{result['test_data']}.{m}"]) == result["test_metrics"][m]
    assert json.loads(version.tags["champion_rule"]) == spec["champion"]
    assert version.tags["champion_before"] == "none" and result["champion_test_before"] is None

    # One objective, trials started from a warm start: registered as a new version, judged against the champion
    # on the same test data.
    one = {**spec, "objectives": [spec["objectives"][0]], "champion": None, "num_samples": 1}
    path.write_text(yaml.safe_dump({**one, "warm_start": {"epochs": 1, "fixed": {"lr": 0.01}}}))
    again = sweep(str(path), str(tmp_path / "rr"), "test-sweeps")
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{again['run_id']}'")
    (warm,) = [r for r in runs if r.info.run_name == "warm-start"]
    (trial,) = [r for r in runs if r.info.run_name != "warm-start"]
    assert warm.data.params["train.lr"] == "0.01" and warm.data.params["train.epochs"] == "1"
    started_from = trial.data.params["train.init_from"]
    assert started_from.startswith(str(tmp_path / "rr" / f"{again['sweep']}-warm-start" / "checkpoint_"))
    assert again["test_data"] == result["test_data"] and again["model_version"] == "2"
    assert again["champion_test_before"] == {"accuracy": result["test_metrics"]["accuracy"]}
    assert again["champion_moved"] == (again["test_metrics"]["accuracy"] > result["test_metrics"]["accuracy"])
    assert "plots/optuna_history.png" in {a.path for a in client.list_artifacts(again["run_id"], "plots")}


@pytest.mark.slow
def test_a_killed_trial_gives_its_workers_cpus_back(ray_session, tmp_path):
    """ASHA stops a trial by killing its actor, and with it the Train controller it owns. Ray Train's detached
    placement-group cleaner must then free the workers' CPUs (it asks the dashboard's state API, which our
    local Ray serves); otherwise they stay reserved and the next trial's Ray Data tasks wait forever."""
    import time

    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    training = tmp_path / "training"

    def train_loop_per_worker():
        training.touch()
        time.sleep(300)

    @ray.remote(num_cpus=0)
    class Trial:
        def fit(self):
            TorchTrainer(train_loop_per_worker, scaling_config=ScalingConfig(num_workers=1)).fit()

    def wait_for(condition, seconds: float) -> bool:
        deadline = time.time() + seconds
        while time.time() < deadline:
            if condition():
                return True
            time.sleep(0.5)
        return False

    # The trial's own placement groups, not the cluster's free CPUs: earlier tests in the shared Ray session may
    # still be releasing theirs, which would make any count of free CPUs move for reasons of their own.
    earlier = set(ray.util.placement_group_table())

    def trial_groups() -> dict[str, dict]:
        return {pg: row for pg, row in ray.util.placement_group_table().items() if pg not in earlier}

    trial = Trial.remote()
    trial.fit.remote()
    assert wait_for(training.exists, 60), "the trial's worker never started training"
    reserved = [row for row in trial_groups().values() if row["state"] == "CREATED"]
    assert any(bundle.get("CPU", 0) >= 1 for row in reserved for bundle in row["bundles"].values()), trial_groups()
    ray.kill(trial)
    assert wait_for(lambda: all(row["state"] == "REMOVED" for row in trial_groups().values()), 60), trial_groups()


def test_resuming_with_a_changed_file_is_refused_naming_the_keys(tmp_path, empty_store, monkeypatch):
    """A sweep resumed with another file would judge its trials by other rules than those that ran them."""
    from dataclasses import asdict

    from cliptime.runtime import Storage
    from cliptime.tune import SWEEP_RECORD

    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_store)
    path = write_spec(tmp_path)
    started = {**asdict(load_spec(path)), "num_samples": 9, "champion": {"best": "val/loss", "within": {}}}
    record = {"task": "cliptime", "spec": started, "mlflow_run_id": "0" * 32}
    Storage(str(tmp_path / "rr")).write("sweep-cliptime-1", SWEEP_RECORD, record)
    refused = r"--resume sweep-cliptime-1: .*space.yaml is not the file the sweep started with \(champion, num_samples"
    with pytest.raises(CliptimeError, match=refused):
        sweep(str(path), str(tmp_path / "rr"), resume="sweep-cliptime-1")
