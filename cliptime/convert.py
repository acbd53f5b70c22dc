"""Data sets -> a task's Parquet shards: its generated set, or the user's own files through one of its converters.

The converters themselves live with their tasks (`Task.converters`); this module gives them a scratch directory
beside the output and writes the result atomically.

`--data` may also name WebDataset tar shards directly: they are converted by the task's WebDataset converter,
with settings taken from the task's (`Converter.webdataset`), into a shard folder in the cache
($XDG_CACHE_HOME/cliptime/webdataset, else ~/.cache/cliptime/webdataset), once: the folder's name is a hash of the
tar files (paths, sizes, modification times) and the settings, so later runs, a sweep's data sets and a resumed
run find it, and changed tar files are converted anew. Bad samples stop the job there, naming the sample; to skip
them, convert with `make_shards.py KIND TARS OUT --skip-bad` and train on OUT.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs

from cliptime.data.shards import MANIFEST, check_output, display, file_system, write_shards
from cliptime.data.user_files import BadInputsError
from cliptime.data.webdataset import holds_tars, tar_listing
from cliptime.errors import CliptimeError
from cliptime.runtime import init_ray
from cliptime.tasks.base import Task


def write_generated_shards(task: Task, out_dir: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """The task's generated data set as shards at `out_dir`; returns the JSON line."""
    task.check()
    check_output(out_dir, overwrite)  # before any work (write_shards checks again)
    init_ray()
    manifest = write_shards(
        task.generate(), out_dir, task=task.name, label=task.label_column, source=task.source(), overwrite=overwrite
    )
    return {"out_dir": str(out_dir), "manifest": manifest}


def write_user_shards(
    task_cls: type[Task],
    kind: str,
    input_dir: str | Path,
    out_dir: str | Path,
    cfg: Any,
    *,
    skip_bad: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert `input_dir` with the task's converter `kind` into shards at `out_dir`; returns the manifest and
    what was skipped."""
    fs, out = check_output(out_dir, overwrite)  # before any work (write_shards checks again)
    # The scratch copy sits beside a local output: the same file system, with room for a large collection; for an
    # output in an object store, in the temporary folder.
    beside = Path(out).parent if isinstance(fs, pyarrow.fs.LocalFileSystem) else None
    if beside is not None:
        beside.mkdir(parents=True, exist_ok=True)
    init_ray()
    with tempfile.TemporaryDirectory(prefix=f".{Path(out).name}.scratch-", dir=beside) as scratch:
        datasets, source, skipped = task_cls.converters[kind].convert(input_dir, cfg, Path(scratch), skip_bad)
        manifest = write_shards(
            datasets, out_dir, task=task_cls.name, label=task_cls.label_column, source=source, overwrite=overwrite
        )
    return {"out_dir": display(fs, out), "manifest": manifest, "skipped": skipped}


def webdataset_cache() -> Path:
    """Where `--data TARS` conversions are kept."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "cliptime" / "webdataset"


def shard_folder(task: Task) -> str:
    """The shard folder of the task's `--data`: the folder it names, or, for WebDataset tar shards, their
    conversion in the cache (made now if it is not there yet)."""
    data = task.cfg.data
    if not holds_tars(data):
        return data
    shown = display(*file_system(data))  # a URI without its query: no credentials in messages
    kind = next((k for k, c in task.converters.items() if c.webdataset is not None), None)
    if kind is None:
        raise CliptimeError(f"--data {shown}: WebDataset tar shards, which {task.title} has no converter for")
    cfg = task.converters[kind].webdataset(task.cfg)
    key = json.dumps([task.name, kind, dataclasses.asdict(cfg), tar_listing(data)], sort_keys=True)
    out = webdataset_cache() / f"{task.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if not (out / MANIFEST).is_file():
        print(f"converting WebDataset shards {shown} into {out} (once)", flush=True)
        try:
            write_user_shards(type(task), kind, data, out, cfg)
        except BadInputsError as e:
            raise CliptimeError(
                f"--data {shown}: {e} (a flag of `make_shards.py {kind} TARS OUT`; then train with --data OUT)"
            ) from None
    return str(out)
