"""Where jobs run: Ray start-up, the storage path, and the run records that `--resume` reads."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import tempfile
import threading
import urllib.parse
import uuid
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import psutil
import pyarrow.fs
import ray
import ray.data
from ray._private import ray_constants

from cliptime.errors import CliptimeError

LOCK = "cliptime.lock"  # the run folder's lock: which process holds the run
# How often Ray Train's controller polls a run's workers (Ray's default: every 2 s). A run's end waits for a
# poll or two, and a job runs few workers, so its runs poll every 0.5 s unless the environment says otherwise
# (benchmarks/results/job-start-2026-12-07.md).
TRAIN_POLL_ENV, TRAIN_POLL_SECONDS = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"


# -- Ray ------------------------------------------------------------------------------------------------------
def init_ray(reserved_cpus: int = 0, log_to_driver: bool = True) -> None:
    """Connect to the cluster `ray job submit` runs us on (RAY_ADDRESS), or start a local Ray; nothing if Ray is
    already up in this process.

    Locally Ray gets at least one logical CPU more than training workers reserve, so Ray Data always has one
    to run on (with none left it stalls, and training waits on it forever). Without `log_to_driver`, what Ray's
    workers print stays in Ray's log files (the session's `logs/` folder) instead of this process's output.

    Ray Train passes the poll interval (TRAIN_POLL_ENV) from the environment of the process that starts a run
    to the run's controller and workers. This driver starts a job's runs; a sweep's trials start theirs, and get
    it from a local Ray's processes, which inherit this one's environment, or on a cluster from the job's.
    """
    polls_set_here = TRAIN_POLL_ENV not in os.environ
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_SECONDS)
    if ray.is_initialized():
        return
    with handlers_kept(signal.SIGTERM):  # cliptime.cli.run_job's: SIGTERM stops a job as Ctrl-C does
        _init_ray(reserved_cpus, log_to_driver, polls_set_here)


@contextmanager
def handlers_kept(*signums: int):
    """Put back the handlers of `signums` this process had before the block: a Python function, or "ignore" or
    "default" (a process started in the background by a script ignores SIGINT). Ray replaces them and leaves its
    own in place: `ray.init` for a new local Ray sets a SIGTERM handler that kills Ray's processes at once and
    exits (a job stopped so died of SIGABRT, tests/test_recovery.py); Ray Train's and Ray Tune's runs set SIGINT
    handlers bound to the run, which swallow the next Ctrl-C or two after the run (tests/test_serve.py's Ctrl-C
    after a sweep in the same process). A handler set outside Python (None) cannot be put back. Only the main
    thread may set handlers."""
    handlers = {signum: signal.getsignal(signum) for signum in signums}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in handlers.items():
                if handler is not None:
                    signal.signal(signum, handler)


def _init_ray(reserved_cpus: int, log_to_driver: bool, polls_set_here: bool) -> None:
    if os.environ.get("RAY_ADDRESS"):
        # The cluster's processes do not inherit this driver's environment: the MLflow credentials that
        # tracking_uri() took out of the URI, and the poll interval where the user set none, reach them as the
        # job's environment variables (the cluster's dashboard shows them with the job's runtime_env; a variable
        # the user set is theirs to pass, as a second copy would conflict). Imported here: make_shards needs no
        # MLflow.
        from cliptime.tracking import MOVED_CREDENTIALS

        env_vars = {**MOVED_CREDENTIALS, **({TRAIN_POLL_ENV: TRAIN_POLL_SECONDS} if polls_set_here else {})}
        env = {"env_vars": env_vars} if env_vars else None
        ray.init(runtime_env=env, log_to_driver=log_to_driver)
        configure_ray_data()
    else:
        start_local_ray(max(os.cpu_count() or 1, reserved_cpus + 1), log_to_driver=log_to_driver)


def configure_ray_data() -> None:
    """Ray Data settings of this driver (its DataContext travels with every dataset it builds).

    Ray 2.60's second-generation file datasource spends seconds of wall time listing even two local files, on
    every read: a shard read, each pass of a converter. The first-generation datasource reads the same small
    data set more than ten times faster (benchmarks/results/ray-data-read-2026-11-25.md)."""
    ray.data.DataContext.get_current().use_datasource_v2 = False


def start_local_ray(num_cpus: int, env_vars: dict[str, str] | None = None, log_to_driver: bool = True) -> None:
    """A new Ray instance on this machine that listens on 127.0.0.1 only, even where a `ray start` cluster on
    this machine would be auto-joined (address="local").

    Ray binds its servers (GCS, raylet, workers, the dashboard, its agents and their metrics exports) to the
    node's IP, or to all interfaces when that IP is not a loopback one. On Linux Ray replaces a loopback node IP
    with the machine's address unless multi-node clusters are off: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray's
    single-machine mode on macOS and Windows, read once when Ray is imported, so its constant is switched off
    for this start only. A token file Ray would generate is written first, readable by its owner only
    (`write_auth_token`).

    The dashboard is not only for watching: Ray Train's placement-group cleaner (a detached actor) asks the
    state API, which the dashboard serves, whether a run's controller is still alive, and removes the run's
    placement group when it is not. Without it, a run whose controller is killed (a Tune trial that ASHA
    stops) keeps its workers' CPUs reserved until the driver exits, and the next trial's Ray Data tasks wait
    for CPUs forever. RAY_API_SERVER_ADDRESS tells the cleaner, and every worker, which dashboard is ours.
    """
    port = free_port()
    api_server = f"http://127.0.0.1:{port}"
    write_auth_token()
    with mock.patch.object(ray_constants, "ENABLE_RAY_CLUSTER", False):
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": api_server, **(env_vars or {})}},
            log_to_driver=log_to_driver,
        )
    configure_ray_data()


def write_auth_token() -> None:
    """Write Ray's token file, ~/.ray/auth_token, with mode 0600 where a new local Ray would generate one.

    Ray 2.60 turns on token authentication for a new local Ray unless RAY_AUTH_MODE says otherwise and, with no
    token given (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or that file), writes one with open(): readable by every
    user of the machine under the usual umask 022. Ray reads the file written here instead. A file that exists
    is left as it is."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = Path.home() / ".ray" / "auth_token"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # as Ray's own generator: 256 random bits


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- storage and run records ----------------------------------------------------------------------------------
def joined(location: str, name: str) -> str:
    """`name` inside `location`: a local path, or a URI whose query stays last (s3://bucket/runs/NAME?endpoint_...)."""
    if "://" not in location:
        return f"{location.rstrip('/')}/{name}"
    parts = urllib.parse.urlsplit(location)
    return urllib.parse.urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name}"))


class Storage:
    """The `--storage-path` (a local folder or a URI such as s3://...): Ray's runs, and our records beside them."""

    def __init__(self, storage_path: str):
        if "://" not in storage_path:
            storage_path = str(Path(storage_path).expanduser().resolve())
        self.fs, self.root = pyarrow.fs.FileSystem.from_uri(storage_path)
        self.uri = storage_path  # what Ray Train and Tune get

    def log_file(self, name: str) -> Path:
        """The local file that run (or sweep) `name` writes the libraries' logs to: in its folder where the storage
        is local, else in the temporary folder (a log is written line by line, which object stores cannot do)."""
        if isinstance(self.fs, pyarrow.fs.LocalFileSystem):
            return Path(self.root) / name / "cliptime.log"
        return Path(tempfile.gettempdir()) / "cliptime-logs" / f"{name}.log"

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

    def mark_finished(self, name: str, record: str, **outcome) -> None:
        """Record that run (or sweep) `name` finished, with what it produced: `find` passes it over from now on."""
        self.write(name, record, {**self.read(name, record), "finished": True, **outcome})

    def find(self, name: str, record: str, *, what: str, prefix: str) -> tuple[str, dict]:
        """(name, record) of the run or sweep to resume: `name` itself, or with `name` 'latest' the newest folder
        starting with `prefix` whose record is a top-level one (a baseline's record names its parent run) and not
        marked finished.
        `what` ("cliptime run", "tclap sweep") words the errors."""
        if name == "latest":
            found = []
            for info in self.fs.get_file_info(pyarrow.fs.FileSelector(self.root, allow_not_found=True)):
                marker = self.fs.get_file_info(f"{info.path}/{record}")
                if marker.type == pyarrow.fs.FileType.File and info.base_name.startswith(prefix):
                    found.append((marker.mtime, info.base_name))
            for _, candidate in sorted(found, reverse=True):
                saved = self.read(candidate, record)
                if saved is not None and "parent_run_id" not in saved and not saved.get("finished"):
                    return candidate, saved
            raise CliptimeError(f"--resume: no unfinished {what} to resume under {self.root}")
        saved = self.read(name, record)
        if saved is None:
            raise CliptimeError(f"--resume {name}: no such {what} under {self.root}")
        return name, saved

    @contextmanager
    def hold(self, name: str):
        """Hold run (or sweep) `name` for this process while the block runs: a lock file in its folder naming
        the host and process. A run held by a live process is refused, so two drivers never train into the same
        checkpoints; a lock left by a process that is gone (killed, crashed) is taken over."""
        path = f"{self.root}/{name}/{LOCK}"
        try:
            with self.fs.open_input_stream(path) as f:
                holder = json.loads(f.read())
        except (FileNotFoundError, json.JSONDecodeError):
            holder = None
        if holder is not None and _alive(holder):
            raise CliptimeError(
                f"{name} is in use by process {holder['pid']} on {holder['host']} (if that process is gone, "
                f"remove {path})"
            )
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}
        self.write(name, LOCK, me)
        try:
            yield
        finally:
            self.fs.delete_file(path)


def _alive(holder: dict) -> bool:
    """Whether the process a lock names still runs. One on another host cannot be checked, so it counts as alive;
    on this host, the process start time tells a live holder from a new process that reuses its pid."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        return psutil.Process(holder["pid"]).create_time() == holder.get("started")
    except (psutil.NoSuchProcess, KeyError):
        return False
