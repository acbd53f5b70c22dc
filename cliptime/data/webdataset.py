"""WebDataset tar shards -> checked rows: the first pass of the `webdataset-*` converters.

WebDataset (what img2dataset writes for image-text data, and how LAION's audio sets come) keeps samples in plain
tar files: the members of one sample share a key, the member name up to its first dot (`000123.jpg`,
`000123.txt`, `000123.json`), and lie next to each other. `ray.data.read_webdataset` groups them into samples,
one read task per tar file; there a task's sample reader turns each sample's members (suffix -> bytes) into the
compact, model-sized row plus an `error` ("" for a good sample), as the folder converters' file readers do, and
the rows stream once to Parquet in the scratch directory (cliptime.data.user_files.checked). Bad samples are then
settled like bad files: named as `TAR sample KEY`, they stop the command, or are skipped with --skip-bad.

The shards: a .tar file, or every .tar file under a folder (hidden ones left out, as in photo folders), on any
file system pyarrow opens: a local path, or a URI such as s3://bucket/prefix. A tar file that cannot be read
through (truncated, not a tar) or whose samples' members are not next to each other stops the command, naming
the file, with or without --skip-bad: it is no sample to skip.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.data

from cliptime.data.shards import MANIFEST, display, file_system
from cliptime.data.user_files import BadInput, checked
from cliptime.errors import CliptimeError, find_cause

TAR = ".tar"
# what Ray's grouping of members into samples raises, naming the tar, for members of one key that are not next
# to each other or a member that appears twice in one sample
GROUPING_ERRORS = ("are not contiguous in the archive", "duplicate file name in tar file")

Members = dict[str, bytes]  # a sample's members: suffix ("jpg", "json", "seg.png") -> content


def _tars_under(fs: pyarrow.fs.FileSystem, folder: str) -> list[str]:
    found = fs.get_file_info(pyarrow.fs.FileSelector(folder, recursive=True))
    return sorted(
        info.path
        for info in found
        if info.is_file
        and info.path.endswith(TAR)
        and not any(part.startswith(".") for part in info.path[len(folder) :].split("/"))
    )


def list_tars(location: str | Path) -> tuple[pyarrow.fs.FileSystem, list[str]]:
    """(file system, tar files) of `location`: the .tar file itself, or the .tar files under the folder, sorted."""
    fs, path = file_system(location)
    shown = display(fs, path)  # a URI without its query: no credentials in messages
    info = fs.get_file_info(path)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise CliptimeError(f"WebDataset shards {shown} do not exist")
    if info.type == pyarrow.fs.FileType.File:
        if not path.endswith(TAR):
            raise CliptimeError(f"{shown} is not a WebDataset shard: expected a {TAR} file or a folder of them")
        return fs, [path]
    tars = _tars_under(fs, path)
    if not tars:
        raise CliptimeError(f"WebDataset folder {shown} holds no {TAR} files")
    return fs, tars


def holds_tars(location: str | Path) -> bool:
    """Whether `location` is WebDataset shards: a .tar file, or a folder of .tar files that is no shard folder
    (no manifest.json)."""
    fs, path = file_system(location)
    info = fs.get_file_info(path)
    if info.type == pyarrow.fs.FileType.File:
        return path.endswith(TAR)
    if info.type != pyarrow.fs.FileType.Directory or fs.get_file_info(f"{path}/{MANIFEST}").is_file:
        return False
    return bool(_tars_under(fs, path))


def tar_listing(location: str | Path) -> list[tuple[str, int, float]]:
    """(path, size, modification time) of each tar file at `location`: what says whether the shards changed."""
    fs, tars = list_tars(location)
    return [(display(fs, i.path), i.size, i.mtime.timestamp() if i.mtime else 0.0) for i in fs.get_file_info(tars)]


def member_json(members: Members) -> dict[str, Any]:
    """A sample's `json` member as a dict; raises ValueError, saying what is wrong, when there is none or it is no
    JSON object."""
    if "json" not in members:
        raise ValueError("no json member")
    try:
        meta = json.loads(members["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"json member is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError("json member is not a JSON object")
    return meta


class SampleReader:
    """`read_webdataset`'s decoder: one sample -> the row `read` makes of its members (with an `error`), named by
    its tar file and key."""

    def __init__(self, read: Callable[[Members], dict[str, Any]], prefix: str):
        self.read, self.prefix = read, prefix

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        members = {k.lower(): v for k, v in sample.items() if not k.startswith("__")}
        return {"input": f"{self.prefix}{sample['__url__']} sample {sample['__key__']}", **self.read(members)}


def _unreadable_tar(error: Exception, fs: pyarrow.fs.FileSystem, tars: list[str]) -> CliptimeError | None:
    """The one-line error for a read that failed on a tar file itself, naming the file; None for other errors."""
    grouping = find_cause(error, lambda e: type(e) is ValueError and any(m in str(e) for m in GROUPING_ERRORS))
    if grouping is not None:
        return CliptimeError(str(grouping).splitlines()[0])
    if find_cause(error, lambda e: isinstance(e, (tarfile.TarError, EOFError))) is None:
        return None
    # Ray's error does not say which file failed: read them through here, on the driver (only on this path)
    for tar in tars:
        try:
            with fs.open_input_stream(tar) as f, tarfile.open(fileobj=f, mode="r|*") as members:
                for _ in members:
                    pass
        except (tarfile.TarError, EOFError) as e:
            return CliptimeError(f"{display(fs, tar)} is not a readable tar file ({str(e) or type(e).__name__})")
    return None


def read_samples(
    location: str | Path, read: Callable[[Members], dict[str, Any]], scratch: Path
) -> tuple[ray.data.Dataset, list[BadInput]]:
    """Read every sample of the tar shards at `location` with `read` (members -> row with an `error`), in parallel
    Ray tasks, once. Returns the good rows (a lazy dataset over the scratch Parquet) and the bad samples."""
    fs, tars = list_tars(location)
    samples = ray.data.read_webdataset(tars, filesystem=fs, decoder=SampleReader(read, display(fs, "")))
    try:
        good, bad = checked(samples, scratch)
    except Exception as e:
        unreadable = _unreadable_tar(e, fs, tars)
        if unreadable is None:
            raise
        raise unreadable from None
    if not any(Path(scratch).glob("*.parquet")):
        raise CliptimeError(f"WebDataset shards {display(*file_system(location))}: their tar files hold no samples")
    return good, bad
