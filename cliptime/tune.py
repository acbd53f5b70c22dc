"""Sweeps: a `tune_spaces/*.yaml` file -> Ray Tune (OptunaSearch + ASHA) over the task's TorchTrainer.

The data are prepared once on the driver (once per combination of the data settings the space chooses among,
such as caption templates) and handed to every trial. Each trial is a function trainable that calls the same
`cliptime.train.fit` as the training jobs, with Ray's `TuneReportCallback` forwarding every epoch's report to
Tune (so ASHA can stop it early) and the epoch logger writing it to the trial's MLflow child run. After the
sweep, the best trial's checkpoint is evaluated on the test split already prepared and registered; the alias
`champion` moves to it only if it beats the current champion on the sweep's metric.

The space is read straight into Optuna distributions: the one representation that OptunaSearch samples from
and that the sweep's Optuna figures are drawn with.

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
                                                                    # (data settings: choice only)
      lr: {loguniform: [0.0005, 0.005]}
      head_depth: {int: [1, 4]}
      head: {choice: [transformer, mlp]}
      cls_weight: {uniform: [0.5, 2.0]}
"""

from __future__ import annotations

import dataclasses
import itertools
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import optuna
import ray.train
import yaml
from mlflow.tracking import MlflowClient
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

from cliptime import evaluate, registry, tracking, train
from cliptime.config import TrainConfig, fits, flat_params, setting_types, type_name
from cliptime.errors import CliptimeError, Interrupted
from cliptime.pipeline import PreparedData, prepare, steps_per_epoch, training_datasets
from cliptime.runtime import Storage, handlers_kept, init_ray
from cliptime.tasks import task_class, task_ref
from cliptime.tasks.base import Task

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
SPEC_KEYS = {"task", "metric", "mode", "num_samples", "max_concurrent", "seed", "scheduler", "fixed", "space"}
SWEEP_RECORD = "cliptime_sweep.json"


@dataclass
class SweepSpec:
    task: str  # what names the task's class anywhere (`task_ref`)
    metric: str
    mode: str
    num_samples: int
    max_concurrent: int
    seed: int
    scheduler: dict[str, Any]
    fixed: dict[str, Any] = field(default_factory=dict)
    space: dict[str, dict[str, list]] = field(default_factory=dict)

    @property
    def task_cls(self) -> type[Task]:
        return task_class(self.task)

    def settings(self, sampled: dict[str, Any], storage_path: str, experiment: str) -> tuple[dict, TrainConfig]:
        """(task settings, training config) of a trial: the fixed settings, then the sampled ones."""
        values = {**self.fixed, **sampled}
        task_fields = {f.name for f in dataclasses.fields(self.task_cls.Config)}
        task_settings = {k: v for k, v in values.items() if k in task_fields}
        train_settings = {k: v for k, v in values.items() if k not in task_fields}
        tc = self.task_cls.train_config(**train_settings, storage_path=storage_path, experiment=experiment)
        return task_settings, tc

    @property
    def data_choices(self) -> list[str]:
        """The data settings that the space chooses among, sorted."""
        return [k for k in sorted(self.space) if k in self.task_cls.data_fields]

    def data_variant(self, values: dict[str, Any]) -> tuple:
        """The data settings among `values` that the space chooses (a key of the sweep's prepared data sets)."""
        return tuple((k, values[k]) for k in self.data_choices)

    def data_variants(self) -> list[dict[str, Any]]:
        """Every combination of the data settings that the space chooses among ([{}] when it chooses none)."""
        names = self.data_choices
        return [dict(zip(names, combo)) for combo in itertools.product(*(self.space[k]["choice"] for k in names))]


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
    try:
        cls = task_class(str(raw.get("task")))
    except CliptimeError:
        raise CliptimeError(f"{path}: task {raw.get('task')!r} is not a known task") from None
    metric = raw.get("metric", cls.monitor)
    if not str(metric).startswith("val/"):
        raise CliptimeError(
            f"{path}: metric {metric!r} must be a validation metric (val/...): the champion is judged on the same "
            "metric of the test split"
        )
    if raw.get("mode", "max") not in ("max", "min"):
        raise CliptimeError(f"{path}: mode {raw['mode']!r} must be max or min")
    names = {f.name for f in dataclasses.fields(cls.Config)} | {f.name for f in dataclasses.fields(TrainConfig)}
    for section in ("fixed", "space"):
        if not isinstance(raw.get(section, {}), dict):
            raise CliptimeError(f"{path}: {section} must be a mapping of setting names")
        bad = sorted(set(raw.get(section, {})) - names)
        if bad:
            raise CliptimeError(f"{path}: {section}.{bad[0]} is not a {cls.name} task or training setting")
    types = setting_types(cls.Config) | setting_types(TrainConfig)
    for name, value in raw.get("fixed", {}).items():
        if not fits(types[name], value):
            raise CliptimeError(f"{path}: fixed.{name} is {value!r}, not a {type_name(types[name])}")
    for name, dist in raw.get("space", {}).items():
        _check_distribution(path, name, dist, types[name])
        if name in cls.data_fields and "choice" not in dist:
            raise CliptimeError(
                f"{path}: space.{name} decides the data, which a sweep prepares once per value: use choice"
            )
    scheduler = raw.get("scheduler", {"type": "asha"})
    if scheduler.get("type") not in ("asha", "fifo"):
        raise CliptimeError(f"{path}: scheduler.type {scheduler.get('type')!r} must be asha or fifo")
    spec = SweepSpec(
        task=task_ref(cls),
        metric=metric,
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


def _check_distribution(path: Path, name: str, dist: Any, setting_type: Any) -> None:
    where = f"{path}: space.{name}"
    if not isinstance(dist, dict) or len(dist) != 1:
        raise CliptimeError(f"{where} must be one of {{{' | '.join(DISTRIBUTIONS)}: [...]}}")
    ((kind, args),) = dist.items()
    if kind not in DISTRIBUTIONS:
        raise CliptimeError(f"{where}: unknown distribution {kind!r} (known: {', '.join(DISTRIBUTIONS)})")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise CliptimeError(f"{where}: choice needs a non-empty list of values")
        wrong = [v for v in args if not fits(setting_type, v)]
        if wrong:
            raise CliptimeError(f"{where}: choice {wrong[0]!r} is not a {type_name(setting_type)}")
        return
    sampled = int if kind == "int" else float
    if not fits(setting_type, sampled(1)):
        raise CliptimeError(f"{where}: {kind} samples numbers, and {name} is a {type_name(setting_type)}")
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)):
        raise CliptimeError(f"{where}: {kind} needs [low, high] numbers")
    low, high = args
    if not low < high:
        raise CliptimeError(f"{where}: bounds [{low}, {high}] need low < high")
    if kind == "loguniform" and low <= 0:
        raise CliptimeError(f"{where}: loguniform bounds must be positive")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise CliptimeError(f"{where}: int bounds must be whole numbers")


def distributions(spec: SweepSpec) -> dict[str, BaseDistribution]:
    """The space as Optuna distributions (`int`: both bounds included)."""
    out: dict[str, BaseDistribution] = {}
    for name, dist in spec.space.items():
        ((kind, args),) = dist.items()
        if kind == "choice":
            out[name] = CategoricalDistribution(args)
        elif kind == "int":
            out[name] = IntDistribution(int(args[0]), int(args[1]))
        else:
            out[name] = FloatDistribution(args[0], args[1], log=kind == "loguniform")
    return out


def _child_run(client: MlflowClient, experiment_id: str, parent: str, trial: str, task: Task, tc: TrainConfig) -> str:
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
    mlflow.log_params({**flat_params("task", task.cfg), **flat_params("train", tc)}, run_id=run.info.run_id)
    return run.info.run_id


def trial_setup(
    spec: SweepSpec, sampled: dict, prepared: dict[tuple, PreparedData], storage_path: str, experiment: str
):
    """(prepared data, task, training config) of the trial that sampled `sampled`: the task is the prepared
    data's (resolved against the data) with the trial's other settings."""
    task_settings, tc = spec.settings(sampled, storage_path, experiment)
    data = prepared[spec.data_variant({**spec.fixed, **sampled})]
    task = data.task.replace(**{k: v for k, v in task_settings.items() if k not in spec.task_cls.data_fields})
    return data, task, tc


def _trial(
    config: dict, *, spec: dict, prepared: dict, sweep: str, storage_path: str, uri: str, parent: str, experiment: str
):
    """One trial: the task's own training path on the sweep's prepared data, reporting each epoch to Tune and
    to the trial's child run."""
    spec = SweepSpec(**spec)
    data, task, tc = trial_setup(spec, config, prepared, storage_path, experiment)
    tc.check()
    task.check()
    mlflow.set_tracking_uri(uri)
    trial = tune.get_context().get_trial_name()
    client = MlflowClient(uri)
    child = _child_run(client, tracking.experiment_id(client, experiment), parent, trial, task, tc)
    train.fit(
        task,
        tc,
        training_datasets(data, task, tc.seed),
        steps_per_epoch(data, tc.batch_size),
        f"{sweep}-{trial}",
        storage_path,
        [tracking.EpochLogger(uri, child), TuneReportCallback()],
    )
    client.set_terminated(child)


def _check_complete(spec: SweepSpec, results: tune.ResultGrid, resume_command: str) -> None:
    """Only a sweep whose every trial ran to its end (or was stopped early by its scheduler) may register: one
    stopped by Ctrl-C or SIGTERM (Tune returns what it has) or with failed trials names the command that
    finishes it.

    The trials that ended are counted in the state Tune saved as the sweep stopped, which --resume starts from,
    not in `results`: on Ctrl-C, Tune marks the trials it stops TERMINATED there too, so a sweep stopped during
    its last trial counted as complete and registered a model (tests/test_recovery.py). A trial's `done` flag
    cannot tell either: Tune saves it with some finished trials and not with others."""
    failed = [r for r in results if r.error]
    if failed:
        first = str(failed[0].error).strip().splitlines()[-1]
        raise CliptimeError(
            f"{len(failed)} of {spec.num_samples} trials failed (last line of the first: {first}); nothing "
            f"registered; retry them with {resume_command}"
        )
    saved = tune.ExperimentAnalysis(results.experiment_path, storage_filesystem=results.filesystem).trials
    ended = sum(1 for trial in saved if trial.status == "TERMINATED")
    if ended < spec.num_samples:
        raise Interrupted(
            f"sweep stopped after {ended} of {spec.num_samples} trials; nothing registered; "
            f"continue it with {resume_command}"
        )


def _optuna_figures(spec: SweepSpec, results: tune.ResultGrid) -> dict[str, Any]:
    """Optimization history and parameter importances, from an Optuna study rebuilt from the finished trials."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as optuna_plots

    space = distributions(spec)
    study = optuna.create_study(direction="maximize" if spec.mode == "max" else "minimize")
    for r in results:
        if r.metrics and spec.metric in r.metrics:
            params = {k: r.config[k] for k in space}
            study.add_trial(
                optuna.trial.create_trial(params=params, distributions=space, value=float(r.metrics[spec.metric]))
            )
    figures = {}
    if study.trials:
        figures["optuna_history.png"] = optuna_plots.plot_optimization_history(study).figure
    if len({t.value for t in study.trials}) >= 2 and space:  # importances need varied outcomes
        figures["optuna_param_importances.png"] = optuna_plots.plot_param_importances(study).figure
    return figures


def _open_sweep(
    spec: SweepSpec, spec_path: str, task: Task, storage: Storage, client: MlflowClient, experiment: str, name: str
) -> tuple[str, str]:
    """(name, parent MLflow run id) of a new sweep, whose record is written before any trial starts."""
    name = name or f"sweep-{task.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    parent = client.create_run(
        tracking.experiment_id(client, experiment),
        run_name=name,
        tags={"cliptime.task": task.name, "cliptime.sweep": name},
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
    storage.write(name, SWEEP_RECORD, {"task": spec.task, "spec": asdict(spec), "mlflow_run_id": parent})
    return name, parent


def _new_tuner(spec: SweepSpec, tc: TrainConfig, trainable, storage: Storage, name: str) -> tune.Tuner:
    """OptunaSearch over the space (at most `max_concurrent` trials at once), ASHA or FIFO."""
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
    searcher = OptunaSearch(space=distributions(spec), metric=spec.metric, mode=spec.mode, seed=spec.seed)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            num_samples=spec.num_samples,
            scheduler=scheduler,
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent),
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage.uri),
    )


def sweep(
    spec_path: str,
    storage_path: str = "~/ray_results",
    experiment: str = "cliptime-sweeps",
    resume: str = "",
    name: str = "",
) -> dict[str, Any]:
    """Run (or `resume`, by name or 'latest') a sweep; register its best model; maybe move `champion`."""
    spec = load_spec(spec_path)
    task_settings, tc = spec.settings({}, storage_path, experiment)
    task = spec.task_cls(spec.task_cls.Config(**task_settings))
    tc.check()
    task.check()
    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    storage = Storage(storage_path)
    client = MlflowClient(uri)
    if resume:
        name, saved = storage.find(resume, SWEEP_RECORD, what=f"{task.name} sweep", prefix=f"sweep-{task.name}-")
        if saved.get("finished"):
            raise CliptimeError(
                f"--resume {name}: that sweep finished and registered {task.name} version {saved['model_version']}"
            )
        parent = saved["mlflow_run_id"]
    else:
        name, parent = _open_sweep(spec, spec_path, task, storage, client, experiment, name)
    # Each running trial holds its workers' CPUs plus a sliver for itself, which leaves a fractional CPU: Ray
    # Data's 1-CPU tasks need two whole ones beside them (with one, a trial was seen waiting on them forever).
    init_ray(spec.max_concurrent * (tc.num_workers * tc.cpus_per_worker + 2))
    prepared = {spec.data_variant(v): prepare(task.replace(**v)) for v in spec.data_variants()}
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial,
            spec=asdict(spec),
            prepared=prepared,
            sweep=name,
            storage_path=storage.uri,
            uri=uri,
            parent=parent,
            experiment=experiment,
        ),
        # The trial only drives its TorchTrainer, whose workers reserve the CPUs; Tune needs a non-empty bundle.
        {"cpu": 0.01},
    )
    if resume:
        tuner = tune.Tuner.restore(f"{storage.uri}/{name}", trainable, resume_errored=True)
    else:
        tuner = _new_tuner(spec, tc, trainable, storage, name)
    with storage.hold(name), tracking.run_status(client, parent, active=True):
        with handlers_kept(signal.SIGINT):
            results = tuner.fit()
        _check_complete(spec, results, f"python jobs/tune.py {spec_path} --resume {name}")
        best = results.get_best_result(spec.metric, spec.mode, scope="last")
        value = float(best.metrics[spec.metric])
        data, task, tc = trial_setup(spec, best.config, prepared, storage.uri, experiment)
        checkpoint = ray.train.Checkpoint(best.metrics[CHECKPOINT_PATH_KEY])
        metrics, _ = evaluate.test(task, tc, checkpoint, data.splits["test"])
        test_metrics = {f"best/test/{k}": v for k, v in metrics.items()}
        mlflow.log_metrics({f"best/{spec.metric}": value, **test_metrics})
        mlflow.log_params({f"best.{k}": v for k, v in best.config.items()})
        tracking.log_figures(parent, _optuna_figures(spec, results), client)
        model = train.load_checkpoint_model(task, checkpoint)
        # The champion is judged on held-out test data, the same for both models: the sweep's metric as the
        # test split reports it, under the test data's fingerprint.
        ranked = spec.metric.removeprefix("val/")
        key = registry.score_tag(data.test_fingerprint, ranked)
        tags = {"sweep": name, "test_data": data.test_fingerprint, key: repr(metrics[ranked])}
        facts = registry.SweepFacts(name, spec.metric, len(results))
        card = registry.Card(data, tc, {f"test/{k}": v for k, v in metrics.items()}, name, sweep=facts)
        version = registry.log_and_register(
            task, model, True, tags={**tags, **{k: f"{v:.4f}" for k, v in test_metrics.items()}}, card=card
        )

        def score(other: str) -> float:
            """A registered version's `ranked` metric on this sweep's test split."""
            other_task, other_model = registry.load_model(f"models:/{task.name}/{other}")
            try:
                return evaluate.test(other_task, tc, other_model, data.splits["test"])[0][ranked]
            except Exception as e:
                raise CliptimeError(
                    f"{task.name} version {other} (the champion) cannot be scored on this sweep's test data "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); version {version} is "
                    "registered, the alias not moved"
                ) from None

        holder = registry.champion(client, task.name)
        moved, before = registry.promote_champion(client, task.name, version, key, spec.mode, score)
        client.set_model_version_tag(task.name, version, "champion_before", "none" if before is None else repr(before))
        standing = dataclasses.replace(facts, champion_before=holder, score_before=before, became_champion=moved)
        registry.write_card(client, task, version, dataclasses.replace(card, sweep=standing))
    storage.mark_finished(name, SWEEP_RECORD, model_version=version)
    return {
        "sweep": name,
        "run_id": parent,
        "trials": len(results),
        "prepared_data_sets": len(prepared),
        "best_config": best.config,
        "metric": spec.metric,
        "best_value": value,
        "test_metrics": metrics,
        "test_data": data.test_fingerprint,
        "model_name": task.name,
        "model_version": version,
        "champion_moved": moved,
        "champion_test_before": before,
        "champion_version": registry.champion(client, task.name),
    }
