"""The one job shell: prepare the data -> fit -> test -> register.

A training job is one run of the task through `fit_and_test`, plus, for a task that has one, its baseline as an
ordinary second run of the same shell on the same prepared data (an MLflow child run); then the figures, and
the task's model registered under the task's name. Sweeps use the same pieces (see cliptime.tune).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import mlflow
import ray.train
from mlflow.tracking import MlflowClient

from cliptime import console, evaluate, registry, tracking, train
from cliptime.config import TrainConfig, flat_params, from_dict
from cliptime.errors import CliptimeError, Interrupted
from cliptime.pipeline import PreparedData, prepare, steps_per_epoch, training_datasets
from cliptime.runtime import Storage, init_ray
from cliptime.tasks import make_task, task_ref
from cliptime.tasks.base import Task

RUN_RECORD = "cliptime_run.json"  # beside Ray's own files in STORAGE/NAME: what --resume needs
SUMMARY_METRICS = 8  # test metrics in the table at the end of a job


@dataclass
class JobResult:
    """The job's JSON line."""

    task: str
    run_id: str
    run_name: str
    model_name: str | None
    model_version: str | None
    headline: dict[str, float]  # the task's own measure of a model (its monitor) on the test split
    metrics: dict[str, float]
    checkpoint: str
    # the job's wall time, the part of it spent in training steps and the part in per-epoch validation (every
    # run of the job, its baseline's too; of a resumed run, the epochs this job trained)
    seconds: dict[str, float]
    tracking_uri: str

    def summary(self) -> list[str]:
        """What a person reads at the end: the first SUMMARY_METRICS test metrics (the baseline's beside them) and
        where the model went. Every metric is in the JSON line and in MLflow."""
        tests = [k for k in self.metrics if k.startswith("test/")]
        baseline = {k: self.metrics[f"baseline/{k}"] for k in tests if f"baseline/{k}" in self.metrics}
        rows = [["test metric", self.task, *(["baseline"] if baseline else [])]]
        for k in tests[:SUMMARY_METRICS]:
            base = [f"{baseline[k]:.4f}" if k in baseline else "-"] if baseline else []
            rows.append([k.removeprefix("test/"), f"{self.metrics[k]:.4f}", *base])
        hidden = len(tests) - SUMMARY_METRICS
        more = [f"({hidden} more in the JSON line below and in MLflow)"] if hidden > 0 else []
        where = [f"run: {self.run_name} (MLflow run {self.run_id})"]
        if self.model_version:
            uri = f"models:/{self.model_name}/{self.model_version}"
            where.append(f"model: {self.model_name} version {self.model_version} ({uri})")
        where.append(f"browse: {tracking.ui_command(self.tracking_uri)}")
        share = self.seconds["training"] / self.seconds["total"] if self.seconds["total"] else 0.0
        where.append(f"time: {self.seconds['total']:.0f} s, {share:.0%} of it in training steps")
        return ["", *console.table(rows), *more, "", *where]


@dataclass
class RunOutcome:
    run_id: str
    result: ray.train.Result  # the last checkpoint and the last epoch's metrics
    history: list[dict[str, float]]  # every epoch's metrics, and when it ended (train.EPOCH_ENDED)
    test_metrics: dict[str, float]
    outputs: dict[str, Any]  # what the task's figures are drawn from


def open_run(storage: Storage, client: MlflowClient, task: Task, tc: TrainConfig, name: str, parent: str = "") -> str:
    """The MLflow run of Ray Train run `name`: the one its record names (a resumed run), else a new one, whose
    record (configs and run ids) is written before any training."""
    saved = storage.read(name, RUN_RECORD)
    if saved is not None:
        return saved["mlflow_run_id"]
    tags = {"cliptime.task": task.name, **({"mlflow.parentRunId": parent} if parent else {})}
    run_id = client.create_run(tracking.experiment_id(client, tc.experiment), run_name=name, tags=tags).info.run_id
    mlflow.log_params({**flat_params("task", task.cfg), **flat_params("train", tc)}, run_id=run_id)
    record = {"task": task_ref(task), "task_config": asdict(task.cfg), "train_config": asdict(tc)}
    storage.write(
        name, RUN_RECORD, {**record, "mlflow_run_id": run_id, **({"parent_run_id": parent} if parent else {})}
    )
    return run_id


def fit_and_test(
    task: Task,
    tc: TrainConfig,
    data: PreparedData,
    name: str,
    storage: Storage,
    uri: str,
    run_id: str,
    messages: console.Messages | None = None,
) -> RunOutcome:
    """Train `task` on the prepared data as Ray Train run `name` (resumed if its storage holds checkpoints), log
    every epoch to MLflow run `run_id`, and evaluate its last checkpoint on the test split. `messages`: where
    the epochs' progress and the workers' warnings go (see cliptime.train.fit)."""
    client = MlflowClient(uri)
    steps = steps_per_epoch(data, tc.batch_size)
    print(f"training {name}: {tc.epochs} epochs of {steps} steps", flush=True)
    result = train.fit(
        task,
        tc,
        training_datasets(data, tc.seed),
        steps,
        name,
        storage.uri,
        [tracking.EpochLogger(uri, run_id, messages)],
        messages,
    )
    history = train.read_history(result.checkpoint)
    tracking.log_missing_epochs(client, run_id, history, not_metrics=(train.EPOCH_ENDED,))
    metrics, outputs = evaluate.test(task, tc, result.checkpoint, data.splits["test"])
    tracking.log_metrics(client, run_id, {f"test/{k}": v for k, v in metrics.items()})
    return RunOutcome(run_id, result, history, metrics, outputs)


def run(task: Task, tc: TrainConfig, verbose: bool = False) -> JobResult:
    """Check the inputs, train (and the task's baseline, if any), test, log everything and register the model.

    The run's folder is held by this process throughout (a second driver on it is refused), and the run is
    marked finished in its record once its model is registered: `--resume` continues only unfinished runs.
    The libraries' logs go to the run's log file unless `verbose`."""
    started = time.time()
    storage = Storage(tc.storage_path)
    if tc.resume:
        name, saved = storage.find(tc.resume, RUN_RECORD, what=f"{task.name} run", prefix=f"{task.name}-")
        if saved.get("finished"):
            version = saved.get("model_version")
            registered = f" and registered {saved['task_name']} version {version}" if version else ""
            raise CliptimeError(f"--resume {name}: that run finished{registered}; there is nothing to resume")
        task = make_task(saved["task"], saved["task_config"])
        tc = from_dict(TrainConfig, {**saved["train_config"], "resume": tc.resume})
        print(f"resuming {name} (MLflow run {saved['mlflow_run_id']}) with its saved configuration", flush=True)
    else:
        name = tc.name or f"{task.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        if storage.read(name, RUN_RECORD) is not None:
            raise CliptimeError(f"--name {name}: a run of that name exists; continue it with --resume {name}")
    tc.check()
    task.check()
    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    log = None if verbose else storage.log_file(name)
    if log is not None:
        print(f"logs: {log}", flush=True)
    with storage.hold(name), console.logs_to(log):
        try:
            return _train_test_register(task, tc, name, storage, uri, started, verbose)
        except KeyboardInterrupt:
            raise Interrupted(f"{name}: interrupted, checkpoints kept; continue it with --resume {name}") from None


def _train_test_register(
    task: Task, tc: TrainConfig, name: str, storage: Storage, uri: str, started: float, verbose: bool
) -> JobResult:
    init_ray(tc.num_workers * tc.cpus_per_worker, log_to_driver=verbose)
    console.quiet_again()
    messages = console.new_messages()
    data = prepare(task)
    task = data.task

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    run_id = open_run(storage, client, task, tc, name)
    with tracking.run_status(client, run_id, active=True):
        main = fit_and_test(task, tc, data, name, storage, uri, run_id, messages)
        metrics = {f"test/{k}": v for k, v in main.test_metrics.items()}
        baseline_outputs = None
        histories = [main.history]
        if (baseline := task.baseline()) is not None:
            base_name = f"{name}-baseline"
            base_id = open_run(storage, client, baseline, tc, base_name, parent=run_id)
            with tracking.run_status(client, base_id):
                base = fit_and_test(baseline, tc, data, base_name, storage, uri, base_id, messages)
            baseline_outputs = base.outputs
            histories.append(base.history)
            metrics.update({f"baseline/test/{k}": v for k, v in base.test_metrics.items()})
        tracking.log_metrics(client, run_id, {k: v for k, v in metrics.items() if k.startswith("baseline/")})
        tracking.log_figures(run_id, task.figures(main.outputs, baseline_outputs), client)
        model = train.load_checkpoint_model(task, main.result.checkpoint)
        version = registry.log_and_register(
            task,
            model,
            tc.register,
            tags={"run_name": name, **{k: f"{v:.4f}" for k, v in metrics.items()}},
            card=registry.Card(data, tc, metrics, name),
        )
    storage.mark_finished(name, RUN_RECORD, task_name=task.name, model_version=version)
    trained_here = [epoch for h in histories for epoch in h if epoch.get(train.EPOCH_ENDED, 0.0) >= started]
    validation = {k: v for k, v in (main.result.metrics or {}).items() if k.startswith("val/")}
    headline = f"test/{task.monitor.removeprefix('val/')}"
    return JobResult(
        task=task.name,
        run_id=run_id,
        run_name=name,
        model_name=task.name if version else None,
        model_version=version,
        headline={headline: metrics[headline]},
        metrics={**validation, **metrics},
        checkpoint=main.result.checkpoint.path,
        seconds={
            "total": round(time.time() - started, 1),
            **{
                name: round(sum(epoch.get(key, 0.0) for epoch in trained_here), 1)
                for name, key in (("training", "step_seconds"), ("validation", "val_seconds"))
            },
        },
        tracking_uri=uri,
    )
