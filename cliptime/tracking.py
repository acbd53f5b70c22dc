"""MLflow: where runs go, per-epoch logging from Ray Train, figures, and the registered pyfunc models.

Default store: a SQLite file `mlflow.db` in the working directory, artifacts in `mlartifacts/` beside it;
`MLFLOW_TRACKING_URI` overrides both (e.g. an `mlflow server` on a cluster).

A registered model is an MLflow pyfunc whose artifacts are the task config (JSON) and the model's state dict;
loading rebuilds the task's model and reads the weights with `torch.load(weights_only=True)`, so no pickled code
object from the registry is ever executed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import tempfile
import time
import urllib.parse
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import requests
import torch
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.train import UserCallback

import cliptime
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


class TaskModel(mlflow.pyfunc.PythonModel):
    """A registered cliptime model: the task's config and weights, predicted through the task's `predict`."""

    def load_context(self, context) -> None:
        from cliptime.tasks import make_task

        meta = json.loads(Path(context.artifacts["config"]).read_text())
        self.task = make_task(meta["task"], meta["task_config"])
        self.model = self.task.build_model(load_pretrained=False)
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()

    def predict(self, context, model_input, params=None):
        return self.task.predict(self.model, model_input)


def _requirements() -> list[str]:
    """Pinned requirements of a served model (given explicitly: MLflow's inference would load the model)."""
    names = ["torch", "numpy", "pandas", "pillow", "open_clip_torch", "laion-clap", "mlflow", "soundfile", "scipy"]
    return [f"{n}=={importlib.metadata.version(n)}" for n in names]


def registered_version(client: MlflowClient, model_name: str, run_id: str) -> str | None:
    """The version of `model_name` that run `run_id` registered, if any."""
    try:
        found = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    except MlflowException:  # no such registered model yet
        return None
    return str(min(int(v.version) for v in found)) if found else None


def log_and_register(task, model: torch.nn.Module, register: bool, tags: dict[str, str]) -> str | None:
    """Log the model as a pyfunc in the active run and register it as a version of the model named after its
    task, tagged with `tags`, unless `register` is off; returns the version.

    One version per run: a run that already registered one (a finished run resumed) gets that version back."""
    from mlflow.models import infer_signature

    from cliptime.tasks import task_ref

    run_id = mlflow.active_run().info.run_id
    client = MlflowClient()
    if register and (version := registered_version(client, task.name, run_id)):
        print(f"run {run_id} is already registered as {task.name} version {version}", flush=True)
        return version

    example = task.input_example()
    signature = infer_signature(example, task.predict(model, example))
    with tempfile.TemporaryDirectory() as tmp:
        weights, config = Path(tmp) / "weights.pt", Path(tmp) / "task_config.json"
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, weights)
        config.write_text(json.dumps({"task": task_ref(task), "task_config": asdict(task.cfg)}, indent=2))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=TaskModel(),
            artifacts={"weights": str(weights), "config": str(config)},
            code_paths=[str(Path(cliptime.__file__).parent)],
            signature=signature,
            pip_requirements=_requirements(),
            registered_model_name=task.name if register else None,
        )
    if not register:
        return None
    version = str(info.registered_model_version)
    for k, v in tags.items():
        client.set_model_version_tag(task.name, version, k, v)
    return version
