"""Bad input through the real job scripts: one line naming the input, exit 2, nothing registered."""

import pyarrow.parquet as pq
import pytest

from tests.conftest import registered_versions, run_job


def assert_clean_failure(proc, named: str, uri: str, model: str):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and named in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert registered_versions(uri, model) == []


@pytest.mark.parametrize(
    "args,named",
    [
        (["--model", "ViT-Nope-99"], "ViT-Nope-99"),
        (["--pretrained", "/no/such/clip.safetensors"], "/no/such/clip.safetensors"),
        (["--hours", "72", "0"], "--hours 72 0"),
        (["--templates", "poetic"], "poetic"),
        (["--data", "/no/such/shards"], "/no/such/shards"),
        (["--placement-strategy", "EVERYWHERE"], "--placement-strategy 'EVERYWHERE'"),
        (["--batch-size", "64", "--grad-accum", "3"], "--grad-accum 3"),
    ],
)
def test_cliptime_rejects_bad_settings(args, named, empty_store, tmp_path):
    proc = run_job(
        "train_cliptime.py",
        *args,
        "--storage-path",
        str(tmp_path / "rr"),
        env={"MLFLOW_TRACKING_URI": empty_store},
        timeout=300,
    )
    assert_clean_failure(proc, named, empty_store, "cliptime-fungal")


@pytest.fixture(scope="module")
def fungal_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("fungal") / "shards"
    proc = run_job("make_shards.py", "fungal", str(out), "--sequences", "7", "--frames", "4", "--image-size", "32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"out_dir"' in proc.stdout.strip().splitlines()[-1]
    return out


@pytest.mark.parametrize("damage", ["truncate", "drop_column"])
def test_cliptime_rejects_damaged_shards(damage, fungal_shards, empty_store, tmp_path):
    import shutil

    data = shutil.copytree(fungal_shards, tmp_path / "data")
    victim = sorted((data / "train").glob("*.parquet"))[0]
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-100])
    else:
        pq.write_table(pq.read_table(victim).drop_columns(["caption"]), victim)
    proc = run_job(
        "train_cliptime.py",
        "--data",
        str(data),
        "--storage-path",
        str(tmp_path / "rr"),
        env={"MLFLOW_TRACKING_URI": empty_store},
        timeout=300,
    )
    assert_clean_failure(proc, str(victim), empty_store, "cliptime-fungal")
