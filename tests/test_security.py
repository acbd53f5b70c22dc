"""Security: a local Ray listens on 127.0.0.1 only and its token file is its owner's; MLflow credentials given in
the tracking URI appear in no output, yet still reach the server (params and tags: test_mlflow_server.py)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import ray
from mlflow.tracking import MlflowClient

from cliptime import runtime, tracking
from cliptime.runtime import TRAIN_POLL_SECONDS, free_port
from tests.conftest import ROOT

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}  # the last: 127.0.0.1 on an IPv6 socket (Ray's gRPC servers)
BASIC = "Basic " + base64.b64encode(b"alice:s3cret").decode()

# Run in a fresh process with its own HOME: start a local Ray as the jobs do (tracking_uri() first), then report
# every listening TCP socket of Ray's processes (all children of the driver), the ports Ray says it serves, the
# token file, whether the dashboard wants that token, and what a Ray worker's environment holds.
PROBE = r"""
import json, os, stat, time
from pathlib import Path

import psutil
import ray
import requests

from cliptime.runtime import init_ray
from cliptime.tracking import tracking_uri

tracking_uri()
init_ray()
worker_env = ray.get(ray.remote(lambda: dict(os.environ)).remote())
node = ray.nodes()[0]
served = [node[k] for k in ("NodeManagerPort", "ObjectManagerPort", "MetricsExportPort", "MetricsAgentPort")]
served += [node["RuntimeEnvAgentPort"], int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])]
served += [int(os.environ["DASHBOARD_METRIC_PORT"]), int(os.environ["AUTOSCALER_METRIC_PORT"])]
me = psutil.Process()
deadline = time.time() + 60
while True:
    pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
    sockets = [
        [c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()]
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]
    if set(served) <= {port for _, port, _ in sockets} or time.time() > deadline:
        break
    time.sleep(1)
token_file = Path.home() / ".ray" / "auth_token"
api = worker_env["RAY_API_SERVER_ADDRESS"] + "/api/jobs/"
print(json.dumps({
    "sockets": sockets,
    "served": served,
    "token_mode": stat.S_IMODE(token_file.stat().st_mode),
    "without_token": requests.get(api).status_code,
    "with_token": requests.get(api, headers={"Authorization": f"Bearer {token_file.read_text()}"}).status_code,
    "worker_env": {
        k: worker_env.get(k)
        for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_PASSWORD", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    },
}))
ray.shutdown()
"""


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(
        HOME=str(home),
        PYTHONPATH=str(ROOT),
        MLFLOW_TRACKING_URI=f"http://alice:s3cret@127.0.0.1:{free_port()}",
        # Ray's fixed ports of the dashboard's and the autoscaler's metrics servers, moved to free ones so that
        # another Ray on this machine cannot hold them and hide them from the check
        DASHBOARD_METRIC_PORT=str(free_port()),
        AUTOSCALER_METRIC_PORT=str(free_port()),
    )
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=home, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only(local_ray):
    listening = {port for _, port, _ in local_ray["sockets"]}
    assert set(local_ray["served"]) <= listening, "some of Ray's servers were not seen"
    assert [s for s in local_ray["sockets"] if s[0] not in LOOPBACK] == []


@pytest.mark.slow
def test_ray_token_file_is_the_owners_only_and_guards_the_dashboard(local_ray):
    assert local_ray["token_mode"] == 0o600
    assert (local_ray["without_token"], local_ray["with_token"]) == (401, 200)


@pytest.mark.slow
def test_local_ray_workers_get_mlflow_credentials_outside_the_uri(local_ray):
    assert local_ray["worker_env"]["MLFLOW_TRACKING_PASSWORD"] == "s3cret"
    assert "s3cret" not in local_ray["worker_env"]["MLFLOW_TRACKING_URI"]


@pytest.mark.slow
def test_local_ray_workers_poll_training_runs_every_half_second(local_ray):
    """The probe's environment has no RAY_ variable: Ray Train's default poll (2 s) becomes the jobs' 0.5 s."""
    assert local_ray["worker_env"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == TRAIN_POLL_SECONDS == "0.5"


def test_tracking_uri_moves_credentials_into_mlflows_variables(moved_credentials, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://al%40ice:s3%3Acret@mlflow.example:5000/root")
    assert tracking.tracking_uri() == "https://mlflow.example:5000/root"
    assert os.environ["MLFLOW_TRACKING_URI"] == "https://mlflow.example:5000/root"
    expected = {"MLFLOW_TRACKING_USERNAME": "al@ice", "MLFLOW_TRACKING_PASSWORD": "s3:cret"}
    assert {k: os.environ[k] for k in expected} == expected == moved_credentials


def test_tracking_uri_keeps_credentials_set_already_and_database_passwords(moved_credentials, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret@127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "bob"
    assert moved_credentials == {"MLFLOW_TRACKING_PASSWORD": "s3cret"}
    database = "postgresql://alice:s3cret@db.example/mlflow"  # the database needs its password in the URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", database)
    assert tracking.tracking_uri() == database


@pytest.fixture
def recording_server():
    """(URI, Authorization headers seen) of an HTTP server on 127.0.0.1 that answers every request with `{}`."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()
    server.server_close()


def test_moved_credentials_still_reach_the_server(recording_server, moved_credentials, monkeypatch):
    uri, seen = recording_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.replace("http://", "http://alice:s3cret@"))
    clean = tracking.tracking_uri()
    tracking.check_reachable(clean)
    MlflowClient(clean).search_experiments()
    assert len(seen) == 2 and set(seen) == {BASIC}


def test_a_cluster_gets_only_the_moved_credentials(moved_credentials, monkeypatch):
    """A cluster's processes do not inherit the driver's environment; credentials (and a Ray Train poll interval)
    the user set themselves are theirs to pass (in the job's runtime_env, where a second copy would conflict)."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret@127.0.0.1:5000")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    tracking.tracking_uri()
    runtime.init_ray()
    assert [call["runtime_env"] for call in calls] == [{"env_vars": {"MLFLOW_TRACKING_PASSWORD": "s3cret"}}]
    # the poll interval where the user set none (the tests set theirs, tests/conftest.py)
    monkeypatch.delenv(runtime.TRAIN_POLL_ENV)
    runtime.init_ray()
    assert calls[-1]["runtime_env"]["env_vars"][runtime.TRAIN_POLL_ENV] == runtime.TRAIN_POLL_SECONDS


@pytest.mark.slow
def test_mlflows_view_run_line_shows_no_password(mlflow_server, moved_credentials, monkeypatch, capfd):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.replace("http://", "http://alice:s3cret@"))
    uri = tracking.tracking_uri()
    client = MlflowClient(uri)
    run = client.create_run(tracking.experiment_id(client, "security"), run_name="view-run")
    capfd.readouterr()
    client.set_terminated(run.info.run_id)
    out = capfd.readouterr().out
    assert f"View run view-run at: {mlflow_server}/#/experiments/" in out
    assert "s3cret" not in out and "alice" not in out


UNPICKLED = []  # what a checkpoint's pickled object ran, if it ever ran


def _ran_on_load(note: str) -> str:
    UNPICKLED.append(note)
    return note


class _RunsCodeWhenLoaded:
    def __reduce__(self):
        return _ran_on_load, ("code from a checkpoint ran",)


def test_a_checkpoint_holding_an_object_is_refused_and_its_code_never_runs(tmp_path):
    """A checkpoint is tensors and plain containers only: one that holds a pickled object (what a tampered
    checkpoint would carry) fails to load, and the object's code never runs."""
    import pickle

    import torch

    from cliptime import train

    checkpoint = train.save_checkpoint(tmp_path, {"model": {"w": torch.zeros(2)}, "epoch": 0}, [])
    assert train.load_checkpoint(checkpoint, "cpu")[0]["epoch"] == 0  # tensors, numbers and dicts load
    torch.save(
        {"model": {"w": torch.zeros(2)}, "epoch": 0, "extra": _RunsCodeWhenLoaded()}, tmp_path / train.STATE_FILE
    )
    with pytest.raises(pickle.UnpicklingError):
        train.load_checkpoint(checkpoint, "cpu")
    assert UNPICKLED == []
