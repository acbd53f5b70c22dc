"""Sweeps: search-space files, a 2-trial sweep with MLflow parent/child runs and the champion alias."""

import re
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from cliptime.cli import tune_main
from cliptime.errors import CliptimeError
from cliptime.tune import load_spec, sweep
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
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "tune_spaces").glob("*.yaml")))
def test_shipped_spaces_are_valid(name):
    spec = load_spec(ROOT / "tune_spaces" / name)
    assert spec.space and spec.num_samples >= 4


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
    ],
)
def test_malformed_space_names_the_key(tmp_path, overrides, named):
    with pytest.raises(CliptimeError, match=re.escape(named)):
        load_spec(write_spec(tmp_path, **overrides))


def test_malformed_space_fails_before_ray_starts(tmp_path, capsys):
    import ray

    path = write_spec(tmp_path, space={"lr": {"uniform": [1, 0]}})
    was_up = ray.is_initialized()
    assert tune_main([str(path), "--storage-path", str(tmp_path / "rr")]) == 2
    err = capsys.readouterr().err
    assert "space.lr" in err and "Traceback" not in err
    assert ray.is_initialized() == was_up


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
    """Two trials of the toy task (its answer is known), then the best one's test: all on data made once on the
    driver (each block generated once); a parent run with a child per trial; the champion alias."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_store)
    log = tmp_path / "generated.log"
    path = tmp_path / "toy.yaml"
    spec = {
        "task": "tests.toy_task:ToyTask",
        "metric": "val/accuracy",
        "num_samples": 2,
        "scheduler": {"type": "fifo"},
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
    assert all(client.get_metric_history(c.info.run_id, "val/accuracy") for c in children)
    plots = {a.path for a in client.list_artifacts(result["run_id"], "plots")}
    assert "plots/optuna_history.png" in plots
    version = client.get_model_version("toy", result["model_version"])
    # the test score the champion is judged on, under the test data's fingerprint; no champion was there before
    assert float(version.tags[f"test.{result['test_data']}.accuracy"]) == result["test_metrics"]["accuracy"]
    assert version.tags["champion_before"] == "none" and result["champion_test_before"] is None

    # The same sweep again: registered as a new version, judged against the champion on the same test data.
    path.write_text(yaml.safe_dump({**spec, "num_samples": 1}))
    again = sweep(str(path), str(tmp_path / "rr"), "test-sweeps")
    assert again["test_data"] == result["test_data"] and again["model_version"] == "2"
    assert again["champion_test_before"] == result["test_metrics"]["accuracy"]
    assert again["champion_moved"] == (again["test_metrics"]["accuracy"] > result["test_metrics"]["accuracy"])


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

    def free_cpus() -> float:
        return ray.available_resources().get("CPU", 0.0)

    def wait_for(condition, seconds: float) -> bool:
        deadline = time.time() + seconds
        while time.time() < deadline:
            if condition():
                return True
            time.sleep(0.5)
        return False

    before = free_cpus()
    trial = Trial.remote()
    trial.fit.remote()
    assert wait_for(training.exists, 60), "the trial's worker never started training"
    assert free_cpus() <= before - 1
    ray.kill(trial)
    assert wait_for(lambda: free_cpus() >= before, 60), f"{before - free_cpus()} CPU(s) still reserved"
