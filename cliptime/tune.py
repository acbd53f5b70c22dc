"""Sweeps: a `tune_spaces/*.yaml` file -> Ray Tune (OptunaSearch + ASHA) over the task's TorchTrainer.

Each trial is a function trainable that calls the same `cliptime.train.fit` as the training jobs, with Ray's
`TuneReportCallback` forwarding every epoch's report to Tune (so ASHA can stop it early) and the epoch logger
writing it to the trial's MLflow child run. After the sweep, the best trial's checkpoint is evaluated on the test
split and registered; the alias `champion` moves to it only if it beats the current champion on the sweep's
metric.

Search-space file::

    task: cliptime                  # a task name
    metric: val/accuracy            # a metric every epoch reports
    mode: max                       # max or min
    num_samples: 8                  # trials
    max_concurrent: 2               # trials at once
    seed: 0                         # OptunaSearch's sampler seed
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # or {type: fifo}
    fixed: {epochs: 4, sequences: 20}                               # task or training settings for all trials
    space:                                                          # task or training settings to search
      lr: {loguniform: [0.0005, 0.005]}
      head_depth: {int: [1, 4]}
      head: {choice: [transformer, mlp]}
      cls_weight: {uniform: [0.5, 2.0]}
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import ray.train
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

from cliptime import tracking, train
from cliptime.config import TrainConfig, flat_params, from_dict
from cliptime.errors import CliptimeError
from cliptime.tasks import TASKS, make_task

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
SPEC_KEYS = {"task", "metric", "mode", "num_samples", "max_concurrent", "seed", "scheduler", "fixed", "space"}
SWEEP_FILE = "cliptime_sweep.json"


@dataclass
class SweepSpec:
    task: str
    metric: str
    mode: str
    num_samples: int
    max_concurrent: int
    seed: int
    scheduler: dict[str, Any]
    fixed: dict[str, Any] = field(default_factory=dict)
    space: dict[str, dict[str, list]] = field(default_factory=dict)

    def split(self, values: dict[str, Any]) -> tuple[dict, dict]:
        """Settings by name -> (task config dict, train config dict)."""
        task_fields = {f.name for f in dataclasses.fields(TASKS[self.task].Config)}
        task_cfg = {k: v for k, v in values.items() if k in task_fields}
        return task_cfg, {k: v for k, v in values.items() if k not in task_fields}


def _setting_names(task: str) -> set[str]:
    return {f.name for f in dataclasses.fields(TASKS[task].Config)} | {f.name for f in dataclasses.fields(TrainConfig)}


def load_spec(path: str | Path) -> SweepSpec:
    """Parse and validate a search-space file; every error names the file and the offending key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CliptimeError(f"search-space file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise CliptimeError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise CliptimeError(f"{path}: expected a mapping of settings at the top level")
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise CliptimeError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(SPEC_KEYS))})")
    task = raw.get("task")
    if task not in TASKS:
        raise CliptimeError(f"{path}: task {task!r} is not one of {', '.join(TASKS)}")
    if raw.get("mode", "max") not in ("max", "min"):
        raise CliptimeError(f"{path}: mode {raw['mode']!r} must be max or min")
    names = _setting_names(task)
    for section in ("fixed", "space"):
        if not isinstance(raw.get(section, {}), dict):
            raise CliptimeError(f"{path}: {section} must be a mapping of setting names")
        bad = sorted(set(raw.get(section, {})) - names)
        if bad:
            raise CliptimeError(f"{path}: {section}.{bad[0]} is not a {task} task or training setting")
    for name, dist in raw.get("space", {}).items():
        _check_distribution(path, name, dist)
    scheduler = raw.get("scheduler", {"type": "asha"})
    if scheduler.get("type") not in ("asha", "fifo"):
        raise CliptimeError(f"{path}: scheduler.type {scheduler.get('type')!r} must be asha or fifo")
    spec = SweepSpec(
        task=task,
        metric=raw.get("metric", TASKS[task].monitor),
        mode=raw.get("mode", "max"),
        num_samples=int(raw.get("num_samples", 8)),
        max_concurrent=int(raw.get("max_concurrent", 1)),
        seed=int(raw.get("seed", 0)),
        scheduler=scheduler,
        fixed=raw.get("fixed", {}),
        space=raw.get("space", {}),
    )
    if spec.num_samples < 1 or spec.max_concurrent < 1:
        raise CliptimeError(f"{path}: num_samples and max_concurrent must be at least 1")
    return spec


def _check_distribution(path: Path, name: str, dist: Any) -> None:
    where = f"{path}: space.{name}"
    if not isinstance(dist, dict) or len(dist) != 1:
        raise CliptimeError(f"{where} must be one of {{{' | '.join(DISTRIBUTIONS)}: [...]}}")
    ((kind, args),) = dist.items()
    if kind not in DISTRIBUTIONS:
        raise CliptimeError(f"{where}: unknown distribution {kind!r} (known: {', '.join(DISTRIBUTIONS)})")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise CliptimeError(f"{where}: choice needs a non-empty list of values")
        return
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)):
        raise CliptimeError(f"{where}: {kind} needs [low, high] numbers")
    low, high = args
    if not low < high:
        raise CliptimeError(f"{where}: bounds [{low}, {high}] need low < high")
    if kind == "loguniform" and low <= 0:
        raise CliptimeError(f"{where}: loguniform bounds must be positive")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise CliptimeError(f"{where}: int bounds must be whole numbers")


def search_space(spec: SweepSpec) -> dict[str, Any]:
    space = {}
    for name, dist in spec.space.items():
        ((kind, args),) = dist.items()
        if kind == "choice":
            space[name] = tune.choice(args)
        elif kind == "uniform":
            space[name] = tune.uniform(*args)
        elif kind == "loguniform":
            space[name] = tune.loguniform(*args)
        else:  # int, both bounds included
            space[name] = tune.randint(int(args[0]), int(args[1]) + 1)
    return space


def _trial_settings(spec: SweepSpec, sampled: dict, storage_path: str, experiment: str):
    task_cfg, train_cfg = spec.split({**spec.fixed, **sampled})
    tc = from_dict(TrainConfig, {**train_cfg, "storage_path": storage_path, "experiment": experiment})
    return make_task(spec.task, task_cfg), tc


def _child_run(client: MlflowClient, experiment_id: str, parent: str, trial: str, task) -> str:
    """The trial's MLflow child run: found again when a resumed sweep restarts the trial, else created."""
    found = client.search_runs(
        [experiment_id], f"tags.`mlflow.parentRunId` = '{parent}' and tags.`cliptime.trial` = '{trial}'"
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=trial,
        tags={"mlflow.parentRunId": parent, "cliptime.trial": trial, "cliptime.task": task.name},
    )
    mlflow.log_params({**flat_params("task", task.cfg)}, run_id=run.info.run_id)
    return run.info.run_id


def _trial(config: dict, *, spec: dict, sweep: str, storage_path: str, uri: str, parent: str, experiment: str):
    """One trial: the task's own training path, reporting each epoch to Tune and to the trial's child run."""
    spec = SweepSpec(**spec)
    task, tc = _trial_settings(spec, config, storage_path, experiment)
    tc.check()
    task.check()
    mlflow.set_tracking_uri(uri)
    trial = tune.get_context().get_trial_name()
    client = MlflowClient(uri)
    child = _child_run(client, tracking.experiment_id(client, experiment), parent, trial, task)
    datasets, steps_per_epoch = train.prepare_data(task, tc)
    train.fit(
        task,
        tc,
        datasets,
        steps_per_epoch,
        f"{sweep}-{trial}",
        storage_path,
        [tracking.EpochLogger(uri, child), TuneReportCallback()],
    )
    client.set_terminated(child)


def _optuna_figures(spec: SweepSpec, results: tune.ResultGrid) -> dict[str, Any]:
    """Optimization history and parameter importances, from an Optuna study rebuilt from the finished trials."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.visualization import matplotlib as optuna_plots

    distributions = {}
    for name, dist in spec.space.items():
        ((kind, args),) = dist.items()
        distributions[name] = (
            CategoricalDistribution(args)
            if kind == "choice"
            else IntDistribution(int(args[0]), int(args[1]))
            if kind == "int"
            else FloatDistribution(args[0], args[1], log=kind == "loguniform")
        )
    study = optuna.create_study(direction="maximize" if spec.mode == "max" else "minimize")
    for r in results:
        if r.metrics and spec.metric in r.metrics:
            params = {k: r.config[k] for k in distributions}
            study.add_trial(
                optuna.trial.create_trial(
                    params=params, distributions=distributions, value=float(r.metrics[spec.metric])
                )
            )
    figures = {}
    if study.trials:
        figures["optuna_history.png"] = optuna_plots.plot_optimization_history(study).figure
    if len({t.value for t in study.trials}) >= 2 and distributions:  # importances need varied outcomes
        figures["optuna_param_importances.png"] = optuna_plots.plot_param_importances(study).figure
    return figures


def promote_champion(client: MlflowClient, model: str, version: str, metric: str, value: float, mode: str):
    """Move alias `champion` to `version` only if it beats the current champion on `metric`.

    Both numbers are recorded as tags of the new version. Returns (moved, the champion's value before)."""
    try:
        current = client.get_model_version_by_alias(model, "champion")
    except MlflowException:
        current = None
    tag = f"sweep.{metric}"
    before = float(current.tags[tag]) if current is not None and tag in current.tags else None
    moved = before is None or (value > before if mode == "max" else value < before)
    client.set_model_version_tag(model, version, tag, str(value))
    client.set_model_version_tag(model, version, "sweep.champion_before", "none" if before is None else str(before))
    if moved:
        client.set_registered_model_alias(model, "champion", version)
    return moved, before


def sweep(
    spec_path: str,
    storage_path: str = "~/ray_results",
    experiment: str = "cliptime-sweeps",
    resume: str = "",
    name: str = "",
) -> dict[str, Any]:
    """Run (or `resume`, by name or 'latest') a sweep; register its best model; maybe move `champion`."""
    spec = load_spec(spec_path)
    task, tc = _trial_settings(spec, spec.fixed, storage_path, experiment)
    tc.check()
    task.check()
    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    fs, root, storage_path = train._storage(storage_path)
    client = MlflowClient(uri)
    if resume:
        name, saved = train.find_saved(
            fs, root, resume, task=spec.task, kind="sweep", prefix=f"sweep-{spec.task}-", marker=SWEEP_FILE
        )
        parent = saved["mlflow_run_id"]
    else:
        name = name or f"sweep-{spec.task}-{time.strftime('%Y%m%d-%H%M%S')}"
        parent = client.create_run(
            tracking.experiment_id(client, experiment),
            run_name=name,
            tags={"cliptime.task": spec.task, "cliptime.sweep": name},
        ).info.run_id
        mlflow.log_params(
            {
                "spec": Path(spec_path).name,
                "metric": spec.metric,
                "mode": spec.mode,
                "num_samples": spec.num_samples,
                **{f"fixed.{k}": v for k, v in spec.fixed.items()},
            },
            run_id=parent,
        )
        fs.create_dir(f"{root}/{name}", recursive=True)
        with fs.open_output_stream(f"{root}/{name}/{SWEEP_FILE}") as f:
            f.write(json.dumps({"task": spec.task, "spec": asdict(spec), "mlflow_run_id": parent}).encode())
    # Each running trial holds its workers' CPUs plus a sliver for itself, which leaves a fractional CPU: Ray
    # Data's 1-CPU tasks need two whole ones beside them (with one, a trial was seen waiting on them forever).
    train.init_ray(spec.max_concurrent * (tc.num_workers * tc.cpus_per_worker + 2))
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial,
            spec=asdict(spec),
            sweep=name,
            storage_path=storage_path,
            uri=uri,
            parent=parent,
            experiment=experiment,
        ),
        # The trial only drives its TorchTrainer, whose workers reserve the CPUs; Tune needs a non-empty bundle.
        {"cpu": 0.01},
    )
    if resume:
        tuner = tune.Tuner.restore(f"{storage_path}/{name}", trainable, resume_errored=True)
    else:
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        sched = spec.scheduler
        scheduler = (
            ASHAScheduler(
                time_attr="training_iteration",
                max_t=tc.epochs,
                grace_period=int(sched.get("grace_period", 1)),
                reduction_factor=float(sched.get("reduction_factor", 2)),
            )
            if sched.get("type", "asha") == "asha"
            else FIFOScheduler()
        )
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(spec),
            tune_config=tune.TuneConfig(
                metric=spec.metric,
                mode=spec.mode,
                num_samples=spec.num_samples,
                scheduler=scheduler,
                search_alg=ConcurrencyLimiter(OptunaSearch(seed=spec.seed), max_concurrent=spec.max_concurrent),
            ),
            run_config=tune.RunConfig(name=name, storage_path=storage_path),
        )
    with mlflow.start_run(run_id=parent):
        results = tuner.fit()
        finished = [r for r in results if r.metrics and spec.metric in r.metrics]
        if not finished:
            errors = "; ".join(str(r.error).splitlines()[0] for r in results if r.error)
            raise CliptimeError(f"sweep {name}: no trial reported {spec.metric} ({errors or 'no trial ran'})")
        best = results.get_best_result(spec.metric, spec.mode, scope="last")
        value = float(best.metrics[spec.metric])
        task, tc = _trial_settings(spec, best.config, storage_path, experiment)
        checkpoint = ray.train.Checkpoint(best.metrics[CHECKPOINT_PATH_KEY])
        datasets, _ = train.prepare_data(task, tc)
        metrics, _ = train.test(task, tc, checkpoint, datasets["test"])
        test_metrics = {f"best/test/{k}": v for k, v in metrics.items()}
        mlflow.log_metrics({f"best/{spec.metric}": value, **test_metrics})
        mlflow.log_params({f"best.{k}": v for k, v in best.config.items()})
        tracking.log_figures(parent, _optuna_figures(spec, results), client)
        model = train.load_checkpoint_model(task, checkpoint)
        _, version = tracking.log_and_register(
            task,
            model,
            asdict(task.cfg),
            True,
            tags={"sweep": name, **{k: f"{v:.4f}" for k, v in test_metrics.items()}},
        )
        moved, before = promote_champion(client, task.registered_model, version, spec.metric, value, spec.mode)
    champion = client.get_model_version_by_alias(task.registered_model, "champion").version
    return {
        "sweep": name,
        "run_id": parent,
        "trials": len(results),
        "finished_trials": len(finished),
        "best_config": best.config,
        "metric": spec.metric,
        "best_value": value,
        "test_metrics": metrics,
        "model_name": task.registered_model,
        "model_version": version,
        "champion_moved": moved,
        "champion_value_before": before,
        "champion_version": str(champion),
    }
