"""Shared fixtures: one Ray instance and one migrated MLflow SQLite store for the whole session."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from cliptime.runtime import TRAIN_POLL_ENV, free_port, start_local_ray

ROOT = Path(__file__).resolve().parents[1]

# Ray Train's controller polls its workers every 2 s by default (a job: every 0.5 s, cliptime.runtime), and a run's
# end waits for a poll or two; the suite runs dozens of short runs. Set before any Ray starts, so the tests' Ray,
# the jobs they spawn and the clusters they start all inherit it (tests/test_job_shell.py: 68-73 s against
# 83-90 s at 2 s, two runs each).
os.environ.setdefault(TRAIN_POLL_ENV, "0.1")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with more logical CPUs than any test's workers take, so Ray Data always has some; started
    the way the jobs start one (never joining a `ray start` cluster that an e2e test left on this machine)."""
    import ray

    start_local_ray(4, {"PYTHONPATH": str(ROOT)})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def migrated_store_file(tmp_path_factory) -> Path:
    """An empty SQLite tracking store whose migrations already ran (a fresh store costs ~7 s): copied, never used."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session")
def mlflow_store(migrated_store_file, tmp_path_factory) -> str:
    """One tracking URI shared by the tests that only look at their own runs and model versions."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    shutil.copy(migrated_store_file, path)
    return f"sqlite:///{path}"


@pytest.fixture
def empty_store(migrated_store_file, tmp_path) -> str:
    """A tracking URI of this test's own, for checks that depend on everything registered there (the champion
    alias of a first sweep, "nothing registered" after bad input): other tests register the same model names."""
    path = tmp_path / "mlflow.db"
    shutil.copy(migrated_store_file, path)
    return f"sqlite:///{path}"


class MlflowServer:
    """An `mlflow server` on 127.0.0.1 over a SQLite store and a proxied local artifact store under `root`, which a
    test can kill and start again on the same port and stores."""

    def __init__(self, root: Path, workers: int = 1):
        self.root, self.workers, self.port = root, workers, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "mlflow", "server"),
                *("--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"),
                *("--artifacts-destination", str(self.root / "artifacts")),
                *("--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 120
        while not self.healthy():
            assert self.proc.poll() is None and time.time() < deadline, "mlflow server did not come up"
            time.sleep(0.3)

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.uri}/health", timeout=2).ok
        except requests.RequestException:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout=60)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """An `mlflow server` on 127.0.0.1 for the whole session; its URI."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), workers=2)
    server.start()
    yield server.uri
    server.kill(signal.SIGTERM)


@pytest.fixture
def tracking(mlflow_store, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    return mlflow_store


@pytest.fixture
def moved_credentials(monkeypatch) -> dict[str, str]:
    """What tracking_uri() moves out of a tracking URI in this test. The MLflow credential variables it fills are
    emptied (unset, to MLflow and tracking_uri) for the test and restored after it; set MLFLOW_TRACKING_URI with
    monkeypatch too, so that the clean URI tracking_uri() writes there is undone as well."""
    from cliptime import tracking

    for var in tracking.CREDENTIAL_VARS:
        monkeypatch.setenv(var, "")
    moved = {}
    monkeypatch.setattr(tracking, "MOVED_CREDENTIALS", moved)
    return moved


def run_job(script: str, *args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 900):
    """Run a job script as a user would; returns the CompletedProcess (text mode)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / script), *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        timeout=timeout,
    )


def registered_versions(uri: str, name: str) -> list:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(uri).search_model_versions(f"name='{name}'")
    except MlflowException:
        return []


@dataclass
class RayNode:
    """A `ray start --block` process and the file its output goes to."""

    proc: subprocess.Popen
    output: Path

    def said(self) -> str:
        return self.output.read_text()


def ray_start(*args: str, env: dict | None = None) -> RayNode:
    """A `ray start --block` node in its own process group, as a user starts one from the activated venv; its output
    goes to a file in its temp folder (`wait_started` shows it when the node does not come up).

    A head (`--head`) enables token authentication itself; a node joining it gets RAY_AUTH_MODE=token. The
    venv's bin directory goes first on PATH because a job's `python` is looked up there (CI runs
    `.venv/bin/python -m pytest` without activating)."""
    node_env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    if "--head" not in args:
        node_env["RAY_AUTH_MODE"] = "token"
    node_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    # Stopped (SIGTERM), a node first asks its cluster's GCS to drain it, for up to 30 s. `ray_stop` signals the
    # head's whole process group, its GCS too, and the head then waited out the 30 s for its gone GCS (34.7 s to
    # stop the test_cluster pair). The tests stop nodes with nothing running on them: no draining.
    node_env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    node_env.update(env or {})
    # Every node its own (short) temp folder: a node joining on the same machine would otherwise share the head's,
    # and unpack a job's --working-dir into the same folder again, replacing it under the running job (a sweep's
    # driver lost its working directory).
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    extra = [f"--temp-dir={temp_dir}"]
    # Every node's dashboard agent serves HTTP (on a head, the job API) on 52365 unless told otherwise, and the
    # tests' own Ray already holds that port: an agent that cannot bind leaves `ray job submit` "no available agent".
    extra.append(f"--dashboard-agent-listen-port={free_port()}")
    output = temp_dir / "ray-start.out"
    with output.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *args, *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=node_env,
            start_new_session=True,
        )
    return RayNode(proc, output)


def wait_started(*nodes: RayNode, timeout: float = 180) -> None:
    """Wait until every node's `ray start` says its runtime started. A node that exits first, or takes longer than
    `timeout`, fails the test with its output: a head that died at its start left a job waiting for it until the
    job's own timeout (10 minutes), and said nothing."""
    deadline = time.time() + timeout
    for node in nodes:
        while "Ray runtime started." not in node.said():
            assert node.proc.poll() is None, f"ray start exited ({node.proc.returncode}):\n{node.said()[-3000:]}"
            assert time.time() < deadline, f"ray start did not finish in {timeout} s:\n{node.said()[-3000:]}"
            time.sleep(0.2)


def ray_stop(*nodes: RayNode) -> None:
    """Stop nodes from `ray_start` (never `ray stop`: it would also stop the tests' own Ray)."""
    for node in reversed(nodes):
        with contextlib.suppress(ProcessLookupError):  # a node that died with its process group (wait_started)
            os.killpg(node.proc.pid, signal.SIGTERM)
        node.proc.wait(timeout=60)


def last_json_line(out: str) -> dict:
    """A job's result, its last JSON line (in-process, Ray's forwarded worker lines may come after it)."""
    # a progress bar's last redraw (spaces, cursor moves, no newline) can stand in front of it on its line
    for line in reversed(out.splitlines()):
        if '{"' in line:
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(line[line.index('{"') :])
    raise AssertionError(f"no JSON line in the output: {out[-2000:]}")
