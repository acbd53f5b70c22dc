"""Parquet shards: one directory per data set, written atomically, checked before Ray reads them.

Layout::

    DATA_DIR/
      manifest.json          # task, schema version, row counts per split and label, how it was made
      train/*.parquet        # columns and types: the task's `schema` (documented in the task module)
      val/*.parquet
      test/*.parquet

DATA_DIR is a local folder or a URI pyarrow opens (s3://bucket/prefix). Shards are written into a hidden temporary
directory beside DATA_DIR and renamed into place only when every split and the manifest are complete, so a failed or
interrupted run leaves no half-written data set; in an object store, which cannot rename, the manifest is written
last and no folder without one is read. Every data page
carries a CRC checksum, so a damaged byte is found when the shards are checked, not read silently as data.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.fs
import pyarrow.parquet as pq
import ray.data

from cliptime.errors import CliptimeError, find_cause

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space left, over quota, a file over the size limit
# Rows per Parquet row group, the unit a reader takes at once. Ray Data's read_parquet sizes its blocks by reading a
# file's whole first row group (up to 1,024 rows): with one row group per file, that was most of a 10-s clip shard,
# about 1 GB read before the read itself (benchmarks/results/ingest-2026-12-07-row-groups.md).
ROWS_PER_ROW_GROUP = 64
# How Ray Data reads shards: every data page's checksum verified, so the read that decodes the data is the check of
# its bytes. A read-through in the driver first cost 1.5 s for 1,536 10-s clips against 2.5 s for Ray Data's read
# and decode (docs/measurements.md, "New memory, and the check that read every shard twice";
# benchmarks/results/ingest-2026-12-07-checked-in-the-read-ab.md). An explicit option replaces Ray's own, whose
# buffered 8-MiB reads are kept.
VERIFIED_READ = pds.ParquetFragmentScanOptions(
    page_checksum_verification=True, use_buffered_stream=True, buffer_size=8 * 2**20
)


def file_system(location: str | Path) -> tuple[pyarrow.fs.FileSystem, str]:
    """(file system, path in it) of a local path (`~` expanded, made absolute) or of a URI pyarrow opens:
    s3://bucket/prefix (an S3-compatible store's endpoint from `?endpoint_override=HOST:PORT&scheme=http` or
    AWS_ENDPOINT_URL), gs://, hdfs://..."""
    location = str(location)
    if "://" not in location:
        return pyarrow.fs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    try:
        return pyarrow.fs.FileSystem.from_uri(location)
    except (pa.ArrowException, ValueError) as e:
        raise CliptimeError(f"{location}: {str(e).splitlines()[0]}") from None


def display(fs: pyarrow.fs.FileSystem, path: str) -> str:
    """How messages and manifests name `path` of `fs`: a local path as it is, else a URI (its query left out)."""
    return path if isinstance(fs, pyarrow.fs.LocalFileSystem) else f"{fs.type_name}://{path}"


def parquet_files(fs: pyarrow.fs.FileSystem, folder: str) -> list[str]:
    """The Parquet files directly in `folder` of `fs`, sorted (none if it does not exist)."""
    found = fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    return sorted(info.path for info in found if info.is_file and info.path.endswith(".parquet"))


def split_counts(fs: pyarrow.fs.FileSystem, split_dir: str, label: str) -> dict[str, Any]:
    """Rows, and rows per value of column `label`, of the shards just written to `split_dir`: read back with
    pyarrow, one column only (counting through Ray Data would run the whole pipeline again)."""
    files = parquet_files(fs, split_dir)
    if not files:
        return {"rows": 0, label: {}}
    labels = pq.read_table(files, filesystem=fs, columns=[label]).column(label)
    counts = {item["values"]: item["counts"] for item in pc.value_counts(labels).to_pylist()}
    return {"rows": len(labels), label: dict(sorted(counts.items()))}


def check_output(out_dir: str | Path, overwrite: bool) -> tuple[pyarrow.fs.FileSystem, str]:
    """(file system, path) of the output directory, if it may be written: new, or (with `overwrite`) a shard folder.
    A folder without a manifest is never replaced: `--overwrite` of a wrong path must not delete a home directory."""
    fs, out = file_system(out_dir)
    if fs.get_file_info(out).type != pyarrow.fs.FileType.NotFound:
        if not overwrite:
            raise CliptimeError(f"output directory {display(fs, out)} already exists (pass --overwrite to replace it)")
        if not fs.get_file_info(f"{out}/{MANIFEST}").is_file:
            raise CliptimeError(
                f"--overwrite: {display(fs, out)} is not a shard folder (it has no {MANIFEST}); not replacing it"
            )
    return fs, out


def _write_splits(
    datasets: dict[str, ray.data.Dataset], fs: pyarrow.fs.FileSystem, folder: str, label: str, rows_per_file: int
) -> dict[str, Any]:
    counts = {}
    for split, ds in datasets.items():
        ds.write_parquet(
            f"{folder}/{split}",
            filesystem=fs,
            min_rows_per_file=rows_per_file,
            row_group_size=ROWS_PER_ROW_GROUP,
            write_page_checksum=True,
        )
        counts[split] = split_counts(fs, f"{folder}/{split}", label)
    return counts


def write_shards(
    datasets: dict[str, ray.data.Dataset],
    out_dir: str | Path,
    *,
    task: str,
    label: str,
    source: dict[str, Any],
    rows_per_file: int = 2000,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write each split's rows as Parquet shards plus a manifest; return the manifest."""
    fs, out = check_output(out_dir, overwrite)
    if not isinstance(fs, pyarrow.fs.LocalFileSystem):
        return _write_in_place(datasets, fs, out, task=task, label=label, source=source, rows_per_file=rows_per_file)
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        counts = _write_splits(datasets, fs, str(tmp), label, rows_per_file)
        manifest = {"task": task, "schema_version": SCHEMA_VERSION, "splits": counts, "source": source}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except Exception as e:  # a Ray Data write task's error reaches here as Ray's, the OSError its `cause`
        full = find_cause(e, lambda cause: isinstance(cause, OSError) and cause.errno in DISK_FULL)
        if full is None:
            raise
        kept = "the shards there are unchanged" if out.exists() else "nothing was written"
        raise CliptimeError(f"cannot write shards to {out}: {os.strerror(full.errno)}; {kept}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


def _write_in_place(
    datasets: dict[str, ray.data.Dataset],
    fs: pyarrow.fs.FileSystem,
    out: str,
    *,
    task: str,
    label: str,
    source: dict[str, Any],
    rows_per_file: int,
) -> dict[str, Any]:
    """`write_shards` to an object store, which cannot rename a folder: the shards are written where they belong
    and the manifest last, so a folder is a shard folder only once it is complete (`read_manifest` refuses one
    without). A shard folder being replaced loses its manifest first; a failed write removes what it wrote."""
    if fs.get_file_info(out).type != pyarrow.fs.FileType.NotFound:
        fs.delete_file(f"{out}/{MANIFEST}")
        fs.delete_dir_contents(out)
    try:
        counts = _write_splits(datasets, fs, out, label, rows_per_file)
        manifest = {"task": task, "schema_version": SCHEMA_VERSION, "splits": counts, "source": source}
        with fs.open_output_stream(f"{out}/{MANIFEST}") as f:
            f.write((json.dumps(manifest, indent=2) + "\n").encode())
    except BaseException:
        fs.delete_dir_contents(out, missing_dir_ok=True)
        raise
    return manifest


def read_manifest(data_dir: str | Path, task: str) -> dict[str, Any]:
    fs, root = file_system(data_dir)
    where, path = display(fs, root), display(fs, f"{root}/{MANIFEST}")
    if fs.get_file_info(root).type != pyarrow.fs.FileType.Directory:
        raise CliptimeError(f"data directory {where} does not exist")
    try:
        with fs.open_input_stream(f"{root}/{MANIFEST}") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise CliptimeError(f"{path} is missing: {where} was not written by `jobs/make_shards.py`") from None
    except json.JSONDecodeError as e:
        raise CliptimeError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if manifest.get("task") != task:
        raise CliptimeError(f"{where} holds data for task {manifest.get('task')!r}, not {task!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise CliptimeError(
            f"{path}: schema version {manifest.get('schema_version')!r}, this cliptime reads {SCHEMA_VERSION}"
        )
    return manifest


def check_columns(path: str, found: pa.Schema, schema: pa.Schema) -> None:
    """Shard `path`, whose columns are `found`, has every column of `schema` with its type (or large_binary for
    binary, which Ray writes for very large row groups)."""
    for want in schema:
        if want.name not in found.names:
            raise CliptimeError(f"Parquet shard {path} has no column {want.name!r}")
        got = found.field(want.name).type
        if not (got == want.type or (pa.types.is_large_binary(got) and pa.types.is_binary(want.type))):
            raise CliptimeError(f"Parquet shard {path}: column {want.name!r} is {got}, expected {want.type}")


def check_shard(
    path: str | Path, schema: pa.Schema, fs: pyarrow.fs.FileSystem | None = None, read_through: bool = True
) -> int:
    """Check one shard and return its number of rows. A truncated file or damaged footer, a missing or mistyped
    column, and NaN, infinite or missing values in a float column (a target such as CLIPTime's `t`) fail here,
    naming the file; with `read_through`, every column is read as training will, so a data page that fails its
    checksum or does not decode fails here too. Without it only the float columns are read: the read that decodes
    the shards verifies the other pages (`open_shards`, `name_damaged_shard`).

    Read batch by batch, so a shard costs the memory of one row group. Shards written before page checksums (or
    by other tools) have none to verify; their pages are still decoded. `fs`: the shard's file system (local)."""
    not_finite = {f.name: 0 for f in schema if pa.types.is_floating(f.type)}
    fs = fs or pyarrow.fs.LocalFileSystem()
    shown = display(fs, str(path))
    columns = schema.names if read_through else list(not_finite)
    try:
        with fs.open_input_file(str(path)) as f, pq.ParquetFile(f, page_checksum_verification=True) as shard:
            check_columns(shown, shard.schema_arrow, schema)
            rows = shard.metadata.num_rows
            for batch in shard.iter_batches(columns=columns):
                for name in not_finite:
                    # is_finite is null for a missing value, so only finite values count as True
                    not_finite[name] += batch.num_rows - pc.sum(pc.is_finite(batch[name]), min_count=0).as_py()
    except (pa.ArrowException, OSError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CliptimeError(f"corrupt or truncated Parquet shard {shown}: {first_line}") from None
    for name, count in not_finite.items():
        if count:
            raise CliptimeError(f"Parquet shard {shown}: column {name!r} has {count} NaN, infinite or missing values")
    return rows


def open_shards(
    data_dir: str | Path, task: str, schema: pa.Schema, rows_per_block: int = 64
) -> tuple[dict[str, ray.data.Dataset], dict]:
    """Check every shard of every split (`check_shard` without reading it through), then return lazy Ray datasets
    over them, read in blocks of about `rows_per_block` rows with every page's checksum verified, and the manifest.
    A read that fails on a damaged page is named by `name_damaged_shard`.

    Ray Data's default cuts a read into at least 200 blocks: blocks of one or two rows for a few hundred 10-s clips,
    and 2.3x slower decoding of clips (1.4x of images) than blocks of many rows (docs/measurements.md, "Feeding a
    GPU")."""
    manifest = read_manifest(data_dir, task)
    fs, root = file_system(data_dir)
    datasets = {}
    for split in SPLITS:
        files = parquet_files(fs, f"{root}/{split}")
        if not files:
            raise CliptimeError(f"data directory {display(fs, root)} has no Parquet shards for split {split!r}")
        rows = sum(check_shard(f, schema, fs, read_through=False) for f in files)
        blocks = max(len(files), -(-rows // rows_per_block))
        datasets[split] = ray.data.read_parquet(
            files, filesystem=fs, override_num_blocks=blocks, fragment_scan_options=VERIFIED_READ
        )
        datasets[split] = datasets[split].select_columns(schema.names)
    return datasets, manifest


def name_damaged_shard(data_dir: str | Path, split: str, schema: pa.Schema) -> None:
    """After a read of `split` failed inside Ray (where the error names no file), read each of its shards through
    in this process and raise the one-line error naming the first that fails; return if every one reads (the
    failure was not the shards')."""
    fs, root = file_system(data_dir)
    for shard in parquet_files(fs, f"{root}/{split}"):
        check_shard(shard, schema, fs)
