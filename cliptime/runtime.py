"""Where jobs run: Ray start-up, the storage path, and the run records that `--resume` reads."""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path

import pyarrow.fs
import ray
import ray.data

from cliptime.errors import CliptimeError


# -- Ray ------------------------------------------------------------------------------------------------------
def init_ray(reserved_cpus: int = 0) -> None:
    """Connect to the cluster `ray job submit` runs us on (RAY_ADDRESS), or start a local Ray; nothing if Ray is
    already up in this process.

    Locally Ray gets at least one logical CPU more than training workers reserve, so Ray Data always has one
    to run on (with none left it stalls, and training waits on it forever).
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        configure_ray_data()
    else:
        start_local_ray(max(os.cpu_count() or 1, reserved_cpus + 1))


def configure_ray_data() -> None:
    """Ray Data settings of this driver (its DataContext travels with every dataset it builds).

    Ray 2.60's second-generation file datasource spends seconds of wall time listing even two local files (its
    list task used 0.04 s of CPU), on every read: a shard read, each pass of a converter. The first-generation
    datasource reads the same small data set in a tenth of a second (medians 1.8 vs 0.11 s in
    benchmarks/results/ray-data-read-2026-11-25.md)."""
    ray.data.DataContext.get_current().use_datasource_v2 = False


def start_local_ray(num_cpus: int, env_vars: dict[str, str] | None = None) -> None:
    """A new Ray instance on this machine with its dashboard on 127.0.0.1, even where a `ray start` cluster on
    this machine would be auto-joined (address="local").

    The dashboard is not only for watching: Ray Train's placement-group cleaner (a detached actor) asks the
    state API, which the dashboard serves, whether a run's controller is still alive, and removes the run's
    placement group when it is not. Without it, a run whose controller is killed (a Tune trial that ASHA
    stops) keeps its workers' CPUs reserved until the driver exits, and the next trial's Ray Data tasks wait
    for CPUs forever. RAY_API_SERVER_ADDRESS tells the cleaner, and every worker, which dashboard is ours.
    """
    port = free_port()
    api_server = f"http://127.0.0.1:{port}"
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": api_server, **(env_vars or {})}},
    )
    configure_ray_data()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- storage and run records ----------------------------------------------------------------------------------
class Storage:
    """The `--storage-path` (a local folder or a URI such as s3://...): Ray's runs, and our records beside them."""

    def __init__(self, storage_path: str):
        if "://" not in storage_path:
            storage_path = str(Path(storage_path).expanduser().resolve())
        self.fs, self.root = pyarrow.fs.FileSystem.from_uri(storage_path)
        self.uri = storage_path  # what Ray Train and Tune get

    def read(self, name: str, record: str) -> dict | None:
        """The JSON record `record` of run (or sweep) `name`, or None if it has none."""
        path = f"{self.root}/{name}/{record}"
        try:
            with self.fs.open_input_stream(path) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as e:
            raise CliptimeError(f"{path} is not valid JSON ({e.msg}): the record of {name} is damaged") from None

    def write(self, name: str, record: str, content: dict) -> None:
        """Write a record atomically: a temporary file in the same folder, then a rename over the old one, so a
        crash leaves the old record or the new one, never half of one."""
        folder = f"{self.root}/{name}"
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.{record}.{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(content, indent=2).encode())
        self.fs.move(tmp, f"{folder}/{record}")

    def find(self, name: str, record: str, *, what: str, prefix: str) -> tuple[str, dict]:
        """(name, record) of the run or sweep to resume: `name` itself, or with `name` 'latest' the newest folder
        starting with `prefix` whose record is a top-level one (a baseline's record names its parent run).
        `what` ("cliptime run", "tclap sweep") words the errors."""
        if name == "latest":
            found = []
            for info in self.fs.get_file_info(pyarrow.fs.FileSelector(self.root, allow_not_found=True)):
                marker = self.fs.get_file_info(f"{info.path}/{record}")
                if marker.type == pyarrow.fs.FileType.File and info.base_name.startswith(prefix):
                    found.append((marker.mtime, info.base_name))
            for _, candidate in sorted(found, reverse=True):
                saved = self.read(candidate, record)
                if saved is not None and "parent_run_id" not in saved:
                    return candidate, saved
            raise CliptimeError(f"--resume: no {what} to resume under {self.root}")
        saved = self.read(name, record)
        if saved is None:
            raise CliptimeError(f"--resume {name}: no such {what} under {self.root}")
        return name, saved
