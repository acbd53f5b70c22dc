"""The jobs against an `mlflow server` on 127.0.0.1 (conftest's `mlflow_server`)."""

from __future__ import annotations

import json
import threading

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from cliptime import job, registry
from cliptime.cli import train_main
from cliptime.config import TrainConfig
from cliptime.runtime import free_port
from cliptime.tasks import make_task
from cliptime.tracking import experiment_id
from tests.conftest import registered_versions

TINY = {"sequences": 7, "frames": 10, "image_size": 32, "head_depth": 1, "ffn_dim": 64}


def test_unreachable_server_is_named_in_one_line_before_training(monkeypatch, tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert train_main("cliptime", "", ["--storage-path", str(tmp_path / "rr")]) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1] == f"error: MLflow tracking server {uri} is unreachable (ConnectionError)"
    assert "epoch" not in out and not list(tmp_path.iterdir())  # nothing trained, nothing written


@pytest.mark.slow
def test_job_logs_and_registers_through_the_server(
    ray_session, mlflow_server, moved_credentials, monkeypatch, tmp_path, capfd
):
    # a user:password in the URI and a token: sent to the server, never logged or printed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.replace("http://", "http://cliptime:pw-s3cret@"))
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-s3cret")
    tc = TrainConfig(epochs=1, batch_size=16, cpus_per_worker=1, storage_path=str(tmp_path), experiment="server")
    result = job.run(make_task("cliptime", TINY), tc)
    client = MlflowClient(mlflow_server)
    assert [m.step for m in client.get_metric_history(result.run_id, "train/loss")] == [0]
    run = client.get_run(result.run_id)
    logged = json.dumps(
        [run.data.params, run.data.tags, [dict(v.tags) for v in registered_versions(mlflow_server, "cliptime")]]
    )
    assert "s3cret" not in logged and "s3cret" not in "".join(capfd.readouterr())
    assert result.model_version in {str(v.version) for v in registered_versions(mlflow_server, "cliptime")}
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/cliptime/{result.model_version}")  # artifacts via the server
    task = make_task("cliptime", TINY)
    assert set(model.predict(task.input_example()).columns) >= {"stage", "hours"}


@pytest.mark.slow
def test_concurrent_registrations_lose_no_version(mlflow_server, monkeypatch):
    """Sweep trials finish together: several runs register the same model name at once."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    task = make_task("tclap", {"baseline": False})
    model = task.build_model()
    experiment = experiment_id(MlflowClient(mlflow_server), "server-concurrent")
    before = len(registered_versions(mlflow_server, "tclap"))
    versions, errors = [], []

    def register(i: int) -> None:
        try:
            with mlflow.start_run(experiment_id=experiment, run_name=f"trial-{i}"):
                versions.append(registry.log_and_register(task, model, True, {"trial": str(i)}))
        except Exception as e:  # reported below: a lost registration fails the test
            errors.append(repr(e))

    threads = [threading.Thread(target=register, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert errors == []
    assert len(set(versions)) == 4
    registered = registered_versions(mlflow_server, "tclap")
    assert len(registered) == before + 4
    assert {v.tags["trial"] for v in registered if "trial" in v.tags} == {"0", "1", "2", "3"}
