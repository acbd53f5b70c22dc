import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cliptime.data.shards import MANIFEST, open_shards, write_shards
from cliptime.errors import CliptimeError
from cliptime.pipeline import prepare
from cliptime.tasks import make_task

SMALL = {"sequences": 7, "frames": 4, "image_size": 32}


@pytest.fixture(scope="module")
def shard_dir(ray_session, tmp_path_factory):
    task = make_task("cliptime", SMALL)
    out = tmp_path_factory.mktemp("shards") / "fungal"
    write_shards(task.generate(), out, task="cliptime", label="stage", source=task.source())
    return out


def test_shards_and_manifest_round_trip(shard_dir):
    manifest = json.loads((shard_dir / MANIFEST).read_text())
    assert manifest["task"] == "cliptime"
    assert {s: manifest["splits"][s]["rows"] for s in ("train", "val", "test")} == {"train": 20, "val": 4, "test": 4}
    assert manifest["splits"]["train"]["stage"] == {"spore": 5, "hyphae": 5, "mycelium": 10}
    datasets, _ = open_shards(shard_dir, "cliptime", make_task("cliptime").schema)
    rows = datasets["test"].take_all()
    assert len(rows) == 4 and {r["sequence"] for r in rows} == {"gen-0-00006"}
    train_sequences = {r["sequence"] for r in datasets["train"].take_all()}
    assert not train_sequences & {r["sequence"] for r in rows}


def test_shards_are_read_in_blocks_of_about_the_rows_asked_for(shard_dir):
    """Blocks are the unit of the per-epoch block shuffle and of Ray Data's per-object costs: the 20 train rows in
    blocks of about 6 (not Ray's default of 200 blocks a read, nor one block per file)."""
    datasets, _ = open_shards(shard_dir, "cliptime", make_task("cliptime").schema, rows_per_block=6)
    blocks = [len(rows) for rows in datasets["train"].iter_batches(batch_size=None, batch_format="pyarrow")]
    assert sum(blocks) == 20 and len(blocks) == 4 and max(blocks) <= 6, blocks


def test_shards_hold_row_groups_of_a_few_rows(ray_session, tmp_path, monkeypatch):
    """A file of many rows in one row group is read whole by Ray Data's block sizing (its first row group, up to
    1,024 rows) before the read itself: about 1 GB for 10-s clips. Shards cut every file into row groups of
    ROWS_PER_ROW_GROUP rows (8 here, for the 20 train rows)."""
    import cliptime.data.shards

    monkeypatch.setattr(cliptime.data.shards, "ROWS_PER_ROW_GROUP", 8)
    task = make_task("cliptime", SMALL)
    write_shards(task.generate(), tmp_path / "fungal", task="cliptime", label="stage", source=task.source())
    (train,) = (tmp_path / "fungal" / "train").glob("*.parquet")
    metadata = pq.ParquetFile(train).metadata
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [8, 8, 4]


def copy_tree(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_is_named(shard_dir, tmp_path):
    broken = copy_tree(shard_dir, tmp_path / "broken")
    victim = sorted((broken / "val").glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(CliptimeError, match=f"corrupt or truncated Parquet shard {victim}"):
        open_shards(broken, "cliptime", make_task("cliptime").schema)


def damage_a_data_page(shard: Path) -> None:
    """Invert 8 bytes in the middle of the image column's pages of the first row group; the footer stays intact."""
    chunk = pq.ParquetFile(shard).metadata.row_group(0).column(0)
    assert chunk.path_in_schema == "image"
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    middle = start + chunk.total_compressed_size // 2
    data = bytearray(shard.read_bytes())
    data[middle : middle + 8] = bytes(255 - b for b in data[middle : middle + 8])
    shard.write_bytes(bytes(data))
    assert pq.read_schema(shard).names[0] == "image"  # the footer still reads


def test_a_damaged_data_page_is_named(shard_dir, tmp_path):
    """Encoded image bytes (JPEG) do not compress further, so a damaged byte in their pages decodes without error:
    only the page checksums find it (else a damaged image would reach training). Ray Data's read verifies them,
    and the file is named after it fails."""
    broken = copy_tree(shard_dir, tmp_path / "broken")
    victim = sorted((broken / "train").glob("*.parquet"))[0]
    damage_a_data_page(victim)
    with pytest.raises(CliptimeError, match=re.escape(f"corrupt or truncated Parquet shard {victim}: ")) as error:
        prepare(make_task("cliptime", {"data": str(broken)}))
    assert "\n" not in str(error.value)


def set_values(shard: Path, column: str, rows: list[int], value: float) -> None:
    table = pq.read_table(shard)
    values = table.column(column).to_numpy().copy()
    values[rows] = value
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, pa.array(values)), shard)


@pytest.mark.parametrize("column,value", [("t", np.nan), ("hours", np.inf), ("t", -np.inf)])
def test_nan_or_infinite_targets_are_counted_and_named(shard_dir, tmp_path, column, value):
    broken = copy_tree(shard_dir, tmp_path / "broken")
    victim = sorted((broken / "val").glob("*.parquet"))[0]
    set_values(victim, column, [0, 2], value)
    expected = f"Parquet shard {victim}: column {column!r} has 2 NaN, infinite or missing values"
    with pytest.raises(CliptimeError, match=re.escape(expected)):
        open_shards(broken, "cliptime", make_task("cliptime").schema)


def test_missing_column_is_named(shard_dir, tmp_path):
    broken = copy_tree(shard_dir, tmp_path / "broken")
    victim = sorted((broken / "train").glob("*.parquet"))[0]
    pq.write_table(pq.read_table(victim).drop_columns(["hours"]), victim)
    with pytest.raises(CliptimeError, match="has no column 'hours'"):
        open_shards(broken, "cliptime", make_task("cliptime").schema)


def test_shards_of_another_task_are_refused(shard_dir):
    with pytest.raises(CliptimeError, match="not 'tclap'"):
        open_shards(shard_dir, "tclap", pa.schema([]))


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(CliptimeError, match="does not exist"):
        open_shards(tmp_path / "nothing", "cliptime", pa.schema([]))
    with pytest.raises(CliptimeError, match="manifest.json is missing"):
        open_shards(tmp_path, "cliptime", pa.schema([]))


def test_failed_write_leaves_nothing(ray_session, tmp_path):
    task = make_task("cliptime", SMALL)
    datasets = task.generate()
    datasets["val"] = datasets["val"].map(lambda row: 1 / 0)
    with pytest.raises(Exception, match="division by zero"):
        write_shards(datasets, tmp_path / "out", task="cliptime", label="stage", source={})
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten_by_default(shard_dir):
    with pytest.raises(CliptimeError, match="already exists"):
        write_shards({}, shard_dir, task="cliptime", label="stage", source={})


def test_overwrite_replaces_only_a_shard_folder(ray_session, tmp_path, capsys):
    """`--overwrite` of a folder that holds no manifest (a home directory typed by mistake) deletes nothing."""
    from cliptime.cli import make_shards_main

    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert make_shards_main(["cliptime", str(precious), "--overwrite", "--sequences", "7", "--frames", "2"]) == 2
    assert "is not a shard folder" in capsys.readouterr().err
    assert (precious / "thesis.tex").read_text() == "years of work"
