"""MLflow tracking: where runs go, per-epoch logging from Ray Train, metrics and figures.

Default store: a SQLite file `mlflow.db` in the working directory, artifacts in `mlartifacts/` beside it;
`MLFLOW_TRACKING_URI` overrides both (e.g. an `mlflow server` on a cluster). The registry is cliptime.registry.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from pathlib import Path
from typing import Any

import requests
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.train import UserCallback

from cliptime.errors import CliptimeError

DEFAULT_DB = "mlflow.db"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def redacted(uri: str) -> str:
    """`uri` without the user:password part a server URI may carry: fit for messages."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def check_reachable(uri: str) -> None:
    """Fail in one line, before any training, when a remote tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException as e:
        raise CliptimeError(f"MLflow tracking server {redacted(uri)} is unreachable ({type(e).__name__})") from None


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, creating it (with artifacts beside a local SQLite store) if needed."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    uri = client.tracking_uri
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts" / name).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently by another run
        return client.get_experiment_by_name(name).experiment_id


class EpochLogger(UserCallback):
    """Logs each epoch's reported metrics (rank 0's) to the MLflow run, with the epoch as step.

    Runs in the Ray Train controller, on the driver's node: workers never need to reach the tracking store.
    Only reports that carry a checkpoint are logged, and a resumed run reports from the epoch after its last
    checkpoint, so a run interrupted and resumed has one continuous history.
    """

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if checkpoint is None or not metrics:
            return
        m = metrics[0]
        step, now = int(m["epoch"]), int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in m.items() if k != "epoch"]
        MlflowClient(self.uri).log_batch(self.run_id, metrics=batch)


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> None:
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])


def log_missing_epochs(client: MlflowClient, run_id: str, history: list[dict[str, Any]]) -> None:
    """Log the epochs of a checkpoint's history that the run lacks.

    The epoch logger writes each epoch as it is reported, but a run killed between persisting a checkpoint and
    the controller's callback loses that epoch's line, and the resumed run starts after it. The checkpoint's own
    history closes the gap, so the run ends with every epoch exactly once."""
    logged = {m.step for m in client.get_metric_history(run_id, "train/loss")}
    now = int(time.time() * 1000)
    missing = [
        Metric(k, float(v), now, int(m["epoch"]))
        for m in history
        if int(m["epoch"]) not in logged
        for k, v in m.items()
        if k != "epoch"
    ]
    if missing:
        client.log_batch(run_id, metrics=missing)


def log_figures(run_id: str, figures: dict[str, Any], client: MlflowClient) -> None:
    import matplotlib.pyplot as plt

    for name, fig in figures.items():
        client.log_figure(run_id, fig, f"plots/{name}")
        plt.close(fig)
