"""The benchmark scripts run on a tiny setting and write well-formed results (their targets are checked by
running them at full size, not here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

TINY_CLIPTIME = ["--sequences", "7", "--frames", "10", "--image-size", "32", "--head-depth", "1", "--ffn-dim", "64"]


def bench(script: str, *args: str, out) -> dict:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads(proc.stdout.strip().splitlines()[-1])["written"]
    result = json.loads(open(written).read())
    assert result["date"] and "cores" in result["machine"]
    assert open(written.replace(".json", ".md")).read().startswith("# ")
    return result


def test_datagen_writes_throughputs(tmp_path):
    result = bench("datagen.py", "--sequences", "1", "--blocks", "1", out=tmp_path)
    assert result["fungal_images_per_second_per_core"] > 0 and result["mixed_clips_per_second_per_core"] > 0
    for io in (result["parquet_fungal"], result["parquet_clips"]):
        assert io["rows"] > 0 and io["write_mb_per_s"] > 0 and io["read_rows_per_s"] > 0


def test_pipeline_writes_the_three_speeds_and_ratios(tmp_path):
    result = bench(
        "pipeline.py",
        "--task",
        "cliptime",
        "--scale",
        "0.1",
        "--batch-size",
        "8",
        "--steps",
        "2",
        "--repeats",
        "1",
        out=tmp_path,
    )
    (row,) = result["results"]
    speeds = row["samples_per_second"]
    assert set(speeds) == {"a_step_only", "b_dataloader", "c_ray"} and all(v > 0 for v in speeds.values())


def test_quality_table_rows_carry_the_metrics_and_the_command(tmp_path):
    budget = ["--epochs", "1", "--batch-size", "16", "--cpus-per-worker", "1", *TINY_CLIPTIME]
    result = bench(
        "quality.py", "--task", "cliptime", "--only", "MLP head", "--seeds", "3", "--budget", *budget, out=tmp_path
    )
    (row,) = result["results"]  # --only: the one row asked for
    assert row["config"] == "MLP head, generic prompts"
    assert {"accuracy_image_only", "accuracy_grayscale", "time_mae_hours_image_only"} <= set(row["metrics"])
    accuracy = row["metrics"]["accuracy_image_only"]
    assert len(accuracy["values"]) == 1 and accuracy["std"] == 0.0 and result["seeds"] == [3]
    assert row["command"] == " ".join(["python jobs/train_cliptime.py --head mlp", *budget])
    assert row["runs_from"] is None

    # The default row's runs taken from a jobs.py results file of the same command and seeds: no job is trained
    # (a job would give other figures than these made-up ones), and the row names the file.
    command = " ".join(["python jobs/train_cliptime.py", *budget])
    made_up = {"test/accuracy_image_only": 0.123, "test/time_mae_hours_image_only": 9.5}
    jobs_file = tmp_path / "jobs-cliptime-2026-01-01.json"
    runs = [{"seed": seed, "seconds": 600 + seed, "metrics": made_up} for seed in (3, 4)]
    jobs_file.write_text(json.dumps({"results": [{"task": "cliptime", "command": command, "runs": runs}]}))
    args = ["--task", "cliptime", "--only", "Time-Transformer head, generic", "--seeds", "3", "4"]
    reused = bench("quality.py", *args, "--runs-from", str(jobs_file), "--budget", *budget, out=tmp_path / "reused")
    (row,) = reused["results"]
    assert row["runs_from"] == jobs_file.name and row["seconds"]["values"] == [603, 604]
    assert row["metrics"]["accuracy_image_only"]["values"] == [0.123, 0.123]


def test_ingest_writes_items_per_second_per_core_of_each_data_set(tmp_path):
    images = ["--sequences", "7", "--frames", "2", "--photos", "0"]  # photos (the time-lapse converter) cost seconds
    tiny = [*images, "--pairs", "2", "--audio-model", "cliptime-tiny-cnn6"]
    result = bench(
        "ingest.py", "--cpus", "1", "--batch-size", "2", "--repeats", "1", "--warmups", "2", *tiny, out=tmp_path
    )
    assert 0 < result["memory_write_seconds_per_gib"]["again"] < 60
    for kind in ("images", "clips"):
        timed = result["results"]["1"][kind]
        assert timed["train_rows"] > 0 and len(timed["epoch_seconds"]) == len(timed["decode_seconds"]) == 1
        assert len(timed["warmup_seconds"]["decode"]) == len(timed["warmup_seconds"]["epoch"]) == 2
        assert timed["first_decode_per_second_per_core"] == timed["rows"] / timed["warmup_seconds"]["decode"][0]
        assert result[f"{kind}_per_second_per_core"] == timed["decode_and_epoch_per_second_per_core"]["mean"] > 0


QUICK_SPACES = ["tune_spaces/cliptime-quick.yaml", "tune_spaces/tclap-quick.yaml"]
CLAP_TARGET = "best T-Classify a2t >= 0.85 within 25 min"


def sweeps_module():
    from tests.test_readme import benchmark_module

    return benchmark_module("sweeps")


@pytest.mark.parametrize("space", QUICK_SPACES)
def test_sweeps_default_job_gets_exactly_the_spaces_fixed_settings(space):
    """benchmarks/sweeps.py holds a quick sweep against its task's default job on the same data and budget: read
    back by the job's own parser, its flags give the space's `fixed` settings (T-CLAP's also without its baseline:
    one model, as a trial; with as many epochs as the warm start and a trial together), and every other setting,
    each one the space searches included, its default."""
    from cliptime.cli import train_parser
    from cliptime.tune import load_spec

    spec = load_spec(ROOT / space)
    parser = train_parser(spec.task)
    defaults = vars(parser.parse_args([]))
    parsed = vars(parser.parse_args(sweeps_module().default_flags(spec)))
    one_model = {"baseline": False} if spec.task_cls.name == "tclap" else {}
    # after a warm start the chosen model has trained its epochs and a trial's: the default job trains as many
    epochs = {"epochs": spec.warm_start["epochs"] + spec.fixed["epochs"]} if spec.warm_start else {}
    assert parsed == {**defaults, **spec.fixed, **one_model, **epochs}
    assert {k: parsed[k] for k in spec.space} == {k: defaults[k] for k in spec.space}


def test_sweeps_job_flags_spell_tuples_aliases_and_booleans_as_the_parser_reads_them():
    from cliptime.cli import train_parser

    settings = {"gap": [0.5, 1.25], "temporal_weight": 0.0003, "order_pooling": False, "compile": True, "lr": 1e-4}
    parsed = vars(train_parser("tclap").parse_args(sweeps_module().job_flags("tclap", settings)))
    assert {k: parsed[k] for k in settings} == settings


MAE_SPACE = "task: cliptime\nmetric: val/time_mae_hours_image_only\nmode: min\nfixed: {epochs: 3}\n"


@pytest.mark.parametrize(
    "space, text, best, seconds, defaults, expected",
    [
        ("tclap-quick.yaml", None, 0.90, 1400, [0.80, 0.82, 0.84], {"tclassify_a2t": True, CLAP_TARGET: True}),
        # between the defaults' worst and best runs: judged on their mean
        ("tclap-quick.yaml", None, 0.81, 1400, [0.80, 0.82, 0.84], {"tclassify_a2t": False, CLAP_TARGET: False}),
        ("tclap-quick.yaml", None, 0.90, 1600, [0.80, 0.82, 0.84], {"tclassify_a2t": True, CLAP_TARGET: False}),
        ("cliptime-quick.yaml", None, 0.95, 300, [0.97, 0.99], {"accuracy_image_only": False}),
        ("mae.yaml", MAE_SPACE, 1.0, 300, [1.5, 2.5], {"time_mae_hours_image_only": True}),  # lower is better
        ("mae.yaml", MAE_SPACE, 2.1, 300, [1.5, 2.5], {"time_mae_hours_image_only": False}),
    ],
    ids=["better", "between-default-runs", "over-25-min", "worse", "min-better", "min-worse"],
)
def test_sweeps_verdicts_and_table_of_hand_made_figures(tmp_path, space, text, best, seconds, defaults, expected):
    """From a sweep's JSON line and its default job's runs, hand-made: the sweep beats the defaults when its
    ranked test figure is better (higher, or lower for mode min) than the defaults' mean; the T-CLAP quick
    sweep's target also needs T-Classify a2t >= 0.85 within 25 minutes; the Markdown shows both figures."""
    import statistics

    from cliptime.tune import load_spec

    sweeps = sweeps_module()
    path = tmp_path / space
    path.write_text(text or (ROOT / "tune_spaces" / space).read_text())
    spec = load_spec(path)
    ranked = spec.metric.removeprefix("val/")
    tune_line = {"trials": 4, "best_config": {"lr": 0.002}, "best_value": 0.5, "model_version": "3"}
    r = sweeps.sweep_result(str(path), spec, seconds, {**tune_line, "test_metrics": {ranked: best}})
    for seed, value in enumerate(defaults):
        sweeps.add_run(r, seed, 100.0 + seed, {f"test/{ranked}": value})
    named = {k if k == CLAP_TARGET else f"sweep beats defaults on test/{k}": met for k, met in expected.items()}
    assert r["verdicts"] == named
    md = sweeps.markdown([r], "2026-12-02", "a machine", "python benchmarks/sweeps.py")
    assert f"| best of the sweep | {best:.3f} |" in md
    assert f"| defaults | {statistics.fmean(defaults):.3f} ± {statistics.stdev(defaults):.3f} |" in md
    assert all(f"| {k} | {'yes' if met else 'NO'} |" in md for k, met in named.items())
    assert json.loads(json.dumps(r)) == r


def test_phrasings_scores_each_pattern_by_whether_the_clip_s_own_order_wins():
    """A stand-in model that reads order as the order of mention: right in every pattern that names the first
    event first, wrong in every one that names the second event first, whatever the leads and capitals."""
    import torch

    from cliptime.data.order_phrases import HELDOUT_PATTERNS, TRAIN_PATTERNS
    from tests.test_readme import benchmark_module

    labels = ["a dog barking", "knocking", "a wailing siren"]
    events = [(a, b) for a in labels for b in labels if a != b]
    axis = {label: torch.eye(len(labels))[i] for i, label in enumerate(labels)}
    audio = torch.stack([axis[a] - axis[b] for a, b in events])

    def embed(texts):
        mentioned = [sorted(labels, key=lambda label: t.lower().find(label)) for t in texts]
        return torch.stack([axis[m[-2]] - axis[m[-1]] for m in mentioned])  # the two labels the text names

    scores = benchmark_module("phrasings").pattern_scores(audio, events, embed)
    assert set(scores) == set(TRAIN_PATTERNS) | set(HELDOUT_PATTERNS)
    for pattern, s in scores.items():
        expected = 0.0 if pattern.index("{second}") < pattern.index("{first}") else 1.0
        assert s["bare"] == s["variants"] == expected, pattern
        assert s["kind"] == ("train" if pattern in TRAIN_PATTERNS else "heldout")
    assert scores["{first} followed by {second}"]["phrasings"] == 18  # 5 leads x capital x full stop, less twins
