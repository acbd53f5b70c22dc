"""Bad input through the jobs' own entry points (in-process, on the shared Ray): one line naming the input,
exit 2, nothing registered. `tests/test_e2e_jobs.py` runs the scripts themselves."""

import pyarrow.parquet as pq
import pytest

from cliptime.cli import make_shards_main, train_main
from tests.conftest import registered_versions
from tests.test_shards import damage_a_data_page, set_values


def assert_clean_failure(code: int, err: str, named: str, uri: str, model: str):
    assert code == 2, err[-2000:]
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and named in lines[0], err[-2000:]
    assert "Traceback" not in err
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
        (["--epochs", "0"], "--epochs 0"),
        (["--num-workers", "0"], "--num-workers 0"),
        (["--image-size", "-32"], "--image-size -32: expected 0 or more"),
        (["--caption-dropout", "-0.5"], "--caption-dropout -0.5: expected 0 or more"),
        (["--grayscale-fraction", "1.5"], "--grayscale-fraction 1.5: expected at most 1"),
        (["--hue-jitter", "0.75"], "--hue-jitter 0.75: expected at most 0.5"),
        (["--weight-decay", "-1"], "--weight-decay -1: expected 0 or more"),
    ],
)
def test_cliptime_rejects_bad_settings(args, named, ray_session, empty_store, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_store)
    code = train_main("cliptime", "", [*args, "--storage-path", str(tmp_path / "rr")])
    assert_clean_failure(code, capsys.readouterr().err, named, empty_store, "cliptime")


@pytest.fixture(scope="module")
def fungal_shards(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("fungal") / "shards"
    assert make_shards_main(["fungal", str(out), "--sequences", "7", "--frames", "4", "--image-size", "32"]) == 0
    return out


@pytest.mark.parametrize("damage", ["truncate", "drop_column", "damaged_page", "nan_target"])
def test_cliptime_rejects_damaged_shards(damage, fungal_shards, empty_store, monkeypatch, tmp_path, capsys):
    import shutil

    data = shutil.copytree(fungal_shards, tmp_path / "data")
    victim = sorted((data / "train").glob("*.parquet"))[0]
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-100])
    elif damage == "drop_column":
        pq.write_table(pq.read_table(victim).drop_columns(["caption"]), victim)
    elif damage == "damaged_page":
        damage_a_data_page(victim)
    else:
        set_values(victim, "t", [1], float("nan"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_store)
    capsys.readouterr()
    code = train_main("cliptime", "", ["--data", str(data), "--storage-path", str(tmp_path / "rr")])
    assert_clean_failure(code, capsys.readouterr().err, str(victim), empty_store, "cliptime")
