"""MLflow tracking: where runs go, per-epoch logging from Ray Train, metrics and figures.

Default store: a SQLite file `mlflow.db` in the working directory, artifacts in `mlartifacts/` beside it;
`MLFLOW_TRACKING_URI` overrides both (e.g. an `mlflow server` on a cluster). The registry is cliptime.registry.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import requests
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.train import UserCallback

from cliptime.console import Messages
from cliptime.errors import CliptimeError, Interrupted

DEFAULT_DB = "mlflow.db"
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # MLflow's own, sent as basic auth
MOVED_CREDENTIALS: dict[str, str] = {}  # what tracking_uri() moved out of the URI into them


def tracking_uri() -> str:
    """The tracking store's URI, never with a user:password in it.

    A server URI's (http, https) credentials move to MLflow's own MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD (each unless set already), which its client sends with every request, and
    MLFLOW_TRACKING_URI loses them too. Nothing downstream then holds them in a URI, so no message, param or tag,
    nor MLflow's own "View run NAME at: URL" line, can show them. Call it before Ray starts: a local Ray's
    processes inherit this environment; a cluster gets MOVED_CREDENTIALS from `init_ray`. A database URI keeps
    its password (the database needs it there); `redacted` is for messages that name one."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_DB).resolve()}"
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    userinfo, host = parts.netloc.rsplit("@", 1)
    for var, value in zip(CREDENTIAL_VARS, userinfo.split(":", 1)):
        if value and not os.environ.get(var):
            os.environ[var] = MOVED_CREDENTIALS[var] = urllib.parse.unquote(value)
    os.environ["MLFLOW_TRACKING_URI"] = uri = urllib.parse.urlunsplit(parts._replace(netloc=host))
    return uri


def redacted(uri: str) -> str:
    """`uri` without the user:password part a server URI may carry: fit for messages."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def ui_command(uri: str) -> str:
    """How to browse the runs and the registry of tracking store `uri`."""
    if uri.startswith(("http://", "https://")):
        return f"open {redacted(uri)}"
    return f"mlflow ui --backend-store-uri {uri}"


def check_reachable(uri: str) -> None:
    """Fail in one line, before any training, when a remote tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    auth = tuple(os.environ.get(var) for var in CREDENTIAL_VARS)  # as MLflow's client sends them
    try:
        requests.get(uri.rstrip("/") + "/health", auth=auth if all(auth) else None, timeout=5).raise_for_status()
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


@contextmanager
def run_status(client: MlflowClient, run_id: str, *, active: bool = False):
    """End MLflow run `run_id` with the block: FINISHED, KILLED when Ctrl-C or SIGTERM stopped it, FAILED on any
    other error. With `active`, the run is also MLflow's active run inside the block (for `mlflow.log_*` and
    `log_model`). A tracking store that cannot take the status (an outage) gets a warning, never hides the
    block's own error."""
    if active:
        mlflow.start_run(run_id=run_id)
    try:
        yield
    except BaseException as e:
        status = "KILLED" if isinstance(e, (KeyboardInterrupt, Interrupted)) else "FAILED"
        try:
            mlflow.end_run(status) if active else client.set_terminated(run_id, status)
        except Exception as marking:  # the block's own error is the one to report
            print(f"warning: could not mark MLflow run {run_id} {status}: {str(marking).splitlines()[0]}", flush=True)
        raise
    mlflow.end_run() if active else client.set_terminated(run_id)


class EpochLogger(UserCallback):
    """Logs each epoch's reported metrics (rank 0's) to the MLflow run, with the epoch as step.

    Runs in the Ray Train controller, on the driver's node: workers never need to reach the tracking store.
    Only reports that carry a checkpoint are logged, and a resumed run reports from the epoch after its last
    checkpoint, so a run interrupted and resumed has one continuous history. An epoch the tracking store could
    not take (a server restarting) is logged at the end of the run by `log_missing_epochs`.
    """

    def __init__(self, uri: str, run_id: str, messages: Messages | None = None):
        self.uri, self.run_id = uri, run_id
        self.messages = messages or Messages()

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if checkpoint is None or not metrics:
            return
        m = metrics[0]
        step, now = int(m["epoch"]), int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in m.items() if k != "epoch"]
        try:  # MLflow's client retries for minutes first; training must not stop when the store stays away
            MlflowClient(self.uri).log_batch(self.run_id, metrics=batch)
        except (MlflowException, requests.RequestException) as e:
            self.messages.say(
                f"warning: epoch {step} not logged to MLflow ({str(e).splitlines()[0][:200]}); training goes on, "
                "and the epoch is logged from the checkpoint's history when the run ends"
            )


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> None:
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])


def log_missing_epochs(client: MlflowClient, run_id: str, history: list[dict[str, Any]], not_metrics=()) -> None:
    """Log the epochs of a checkpoint's history that the run lacks: each entry's values but its `epoch` and the
    bookkeeping keys in `not_metrics`.

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
        if k != "epoch" and k not in not_metrics
    ]
    if missing:
        client.log_batch(run_id, metrics=missing)


def log_figures(run_id: str, figures: dict[str, Any], client: MlflowClient) -> None:
    import matplotlib.pyplot as plt

    for name, fig in figures.items():
        client.log_figure(run_id, fig, f"plots/{name}")
        plt.close(fig)
