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


def test_ingest_writes_items_per_second_per_core_of_each_data_set(tmp_path):
    images = ["--sequences", "7", "--frames", "2", "--photos", "0"]  # photos (the time-lapse converter) cost seconds
    tiny = [*images, "--pairs", "2", "--audio-model", "cliptime-tiny-cnn6"]
    result = bench("ingest.py", "--cpus", "1", "--batch-size", "2", "--repeats", "1", *tiny, out=tmp_path)
    for kind in ("images", "clips"):
        timed = result["results"]["1"][kind]
        assert timed["train_rows"] > 0 and len(timed["epoch_seconds"]) == len(timed["decode_seconds"]) == 1
        assert result[f"{kind}_per_second_per_core"] == timed["decode_and_epoch_per_second_per_core"]["mean"] > 0
