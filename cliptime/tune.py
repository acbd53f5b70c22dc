"""Sweeps: a `tune_spaces/*.yaml` file -> Ray Tune (OptunaSearch + ASHA) over the task's TorchTrainer.

The data are prepared once on the driver (once per combination of the data settings the space chooses among,
such as caption templates) and handed to every trial. Each trial is a function trainable that calls the same
`cliptime.train.fit` as the training jobs, with Ray's `TuneReportCallback` forwarding every epoch's report to
Tune (so ASHA can stop it early) and the epoch logger writing it to the trial's MLflow child run. After the
sweep, the best trial's checkpoint is evaluated on the test split already prepared and registered; the alias
`champion` moves to it only if it beats the current champion on the same test data.

A sweep searches one metric or several (`objectives`): Optuna's TPE sampler handles both. With several, the
trials that no other trial beats on every objective form the Pareto front, logged to the sweep's parent run as
a table and a plot, and the `champion` rule of the file picks the sweep's best trial (on validation metrics) and
then the champion (on test metrics): e.g. the best T-Classify among trials whose zero-shot accuracy is within one
point of the best. Every trial of a multi-objective sweep runs to its end: ASHA stops trials on one metric, which
would cut those that lead on another.

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

Several objectives, instead of `metric` and `mode` (the scheduler is then FIFO)::

    objectives:
      - {metric: val/tclassify_a2t, mode: max}
      - {metric: val/zeroshot_accuracy, mode: max}
    champion:                       # default: the best of the first objective
      best: val/tclassify_a2t
      within: {val/zeroshot_accuracy: 0.01}     # in turn, in the order written

A warm start: one model trained first on the sweep's data (the fixed settings, then these), whose weights every
trial starts from (`--init-from`), so that short trials fine-tune what one long run would have learnt first::

    warm_start: {epochs: 8, fixed: {temporal_weight: 0.0}}
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pandas as pd
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
from cliptime.runtime import Storage, handlers_kept, init_ray, joined
from cliptime.tasks import task_class, task_ref
from cliptime.tasks.base import Task

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
SPEC_KEYS = {
    "task",
    "metric",
    "mode",
    "objectives",
    "champion",
    "num_samples",
    "max_concurrent",
    "seed",
    "scheduler",
    "fixed",
    "space",
    "warm_start",
}
SWEEP_RECORD = "cliptime_sweep.json"


@dataclass
class SweepSpec:
    task: str  # what names the task's class anywhere (`task_ref`)
    objectives: list[tuple[str, str]]  # (validation metric, max or min); one for a single-objective sweep
    champion: dict[str, Any]  # {"best": a metric of `objectives`, "within": {another: margin, ...}}
    num_samples: int
    max_concurrent: int
    seed: int
    scheduler: dict[str, Any]
    fixed: dict[str, Any] = field(default_factory=dict)
    space: dict[str, dict[str, list]] = field(default_factory=dict)
    warm_start: dict[str, Any] = field(default_factory=dict)  # {"epochs": N, "fixed": {...}}; {}: none

    @property
    def task_cls(self) -> type[Task]:
        return task_class(self.task)

    @property
    def modes(self) -> dict[str, str]:
        return dict(self.objectives)

    @property
    def metric(self) -> str:
        """The metric the champion rule ranks on (with its `val/` prefix)."""
        return self.champion["best"]

    @property
    def mode(self) -> str:
        return self.modes[self.metric]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def rule(self) -> registry.ChampionRule:
        """The champion rule on metric names without their `val/` prefix, as trials and test splits share them."""
        within = tuple((m.removeprefix("val/"), self.modes[m], float(w)) for m, w in self.champion["within"].items())
        return registry.ChampionRule(self.metric.removeprefix("val/"), self.mode, within)

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
    objectives = _objectives(path, raw, cls)
    champion = _champion_rule(path, raw.get("champion"), objectives)
    types = setting_types(cls.Config) | setting_types(TrainConfig)
    _check_settings(path, "fixed", raw.get("fixed", {}), types, cls)
    _check_settings(path, "space", raw.get("space", {}), types, cls, typed=False)  # distributions, checked below
    warm_start = raw.get("warm_start") or {}
    if warm_start:
        _check_warm_start(path, warm_start, raw, types, cls)
    for name, dist in raw.get("space", {}).items():
        _check_distribution(path, name, dist, types[name])
        if name in cls.data_fields and "choice" not in dist:
            raise CliptimeError(
                f"{path}: space.{name} decides the data, which a sweep prepares once per value: use choice"
            )
    scheduler = raw.get("scheduler", {"type": "fifo" if len(objectives) > 1 else "asha"})
    if scheduler.get("type") not in ("asha", "fifo"):
        raise CliptimeError(f"{path}: scheduler.type {scheduler.get('type')!r} must be asha or fifo")
    if len(objectives) > 1 and scheduler["type"] == "asha":
        raise CliptimeError(
            f"{path}: scheduler.type asha stops trials on one metric, which cuts trials that lead on another "
            "objective: a multi-objective sweep needs {type: fifo}"
        )
    spec = SweepSpec(
        task=task_ref(cls),
        objectives=objectives,
        champion=champion,
        num_samples=int(raw.get("num_samples", 8)),
        max_concurrent=int(raw.get("max_concurrent", 1)),
        seed=int(raw.get("seed", 0)),
        scheduler=scheduler,
        fixed=raw.get("fixed", {}),
        space=raw.get("space", {}),
        warm_start={"epochs": warm_start["epochs"], "fixed": warm_start.get("fixed", {})} if warm_start else {},
    )
    if spec.num_samples < 1 or spec.max_concurrent < 1:
        raise CliptimeError(f"{path}: num_samples and max_concurrent must be at least 1")
    return spec


def _check_settings(path: Path, section: str, settings: Any, types: dict, cls: type[Task], typed: bool = True) -> None:
    """A section of settings (`fixed`, `space`, `warm_start.fixed`): a mapping whose keys are the task's or
    training's settings (`types`: each setting's type) and, when `typed`, whose values are of their types."""
    if not isinstance(settings, dict):
        raise CliptimeError(f"{path}: {section} must be a mapping of setting names")
    unknown = sorted(set(settings) - set(types))
    if unknown:
        raise CliptimeError(f"{path}: {section}.{unknown[0]} is not a {cls.name} task or training setting")
    for name, value in settings.items() if typed else ():
        if not fits(types[name], value):
            raise CliptimeError(f"{path}: {section}.{name} is {value!r}, not a {type_name(types[name])}")


def _check_warm_start(path: Path, warm: Any, raw: dict, types: dict, cls: type[Task]) -> None:
    """`warm_start: {epochs: N, fixed: {...}}`: a whole number of epochs, settings of the task or training; the
    trials then all load its weights, so none may choose the data (or set where to start from itself)."""
    if not isinstance(warm, dict) or set(warm) - {"epochs", "fixed"} or "epochs" not in warm:
        raise CliptimeError(f"{path}: warm_start must be {{epochs: N, fixed: {{SETTING: VALUE, ...}}}}")
    if isinstance(warm["epochs"], bool) or not isinstance(warm["epochs"], int) or warm["epochs"] < 1:
        raise CliptimeError(f"{path}: warm_start.epochs is {warm['epochs']!r}, not a whole number >= 1")
    fixed = warm.get("fixed", {})
    _check_settings(path, "warm_start.fixed", fixed, types, cls)
    for name in fixed:
        if name in cls.data_fields or name == "epochs":
            raise CliptimeError(f"{path}: warm_start.fixed.{name}: the warm start trains on the trials' data")
    chooses_data = [k for k in raw.get("space", {}) if k in cls.data_fields]
    if chooses_data:
        raise CliptimeError(f"{path}: space.{chooses_data[0]} decides the data, which one warm start cannot serve")
    if "init_from" in raw.get("fixed", {}) or "init_from" in raw.get("space", {}):
        raise CliptimeError(f"{path}: init_from is what warm_start sets; give one or the other")


def _objectives(path: Path, raw: dict, cls: type[Task]) -> list[tuple[str, str]]:
    """The file's (metric, mode) pairs: its `objectives`, or its one `metric` and `mode`."""
    if "objectives" in raw and ({"metric", "mode"} & set(raw)):
        raise CliptimeError(f"{path}: give either metric and mode, or objectives, not both")
    listed = raw.get("objectives", [{"metric": raw.get("metric", cls.monitor), "mode": raw.get("mode", "max")}])
    if not isinstance(listed, list) or not listed:
        raise CliptimeError(f"{path}: objectives must be a non-empty list of {{metric: val/..., mode: max|min}}")
    objectives = []
    for i, objective in enumerate(listed):
        where = f"{path}: objectives[{i}]" if "objectives" in raw else f"{path}:"
        if not isinstance(objective, dict) or set(objective) - {"metric", "mode"} or "metric" not in objective:
            raise CliptimeError(f"{where} must be {{metric: val/..., mode: max|min}}")
        metric, mode = objective["metric"], objective.get("mode", "max")
        if not str(metric).startswith("val/"):
            raise CliptimeError(
                f"{where} metric {metric!r} must be a validation metric (val/...): the champion is judged on the "
                "same metric of the test split"
            )
        if mode not in ("max", "min"):
            raise CliptimeError(f"{where} mode {mode!r} must be max or min")
        if metric in dict(objectives):
            raise CliptimeError(f"{where} metric {metric} is already an objective")
        objectives.append((metric, mode))
    return objectives


def _champion_rule(path: Path, raw: Any, objectives: list[tuple[str, str]]) -> dict[str, Any]:
    """The file's `champion` rule, checked against its objectives (default: the best of the first)."""
    names = [m for m, _ in objectives]
    if raw is None:
        return {"best": names[0], "within": {}}
    if not isinstance(raw, dict) or set(raw) - {"best", "within"} or "best" not in raw:
        raise CliptimeError(f"{path}: champion must be {{best: METRIC, within: {{METRIC: MARGIN, ...}}}}")
    if raw["best"] not in names:
        raise CliptimeError(f"{path}: champion.best {raw['best']!r} is not one of the objectives ({', '.join(names)})")
    within = raw.get("within", {})
    if not isinstance(within, dict):
        raise CliptimeError(f"{path}: champion.within must be a mapping of objective -> margin")
    for metric, margin in within.items():
        if metric not in names or metric == raw["best"]:
            raise CliptimeError(
                f"{path}: champion.within.{metric} must be another of the objectives ({', '.join(names)})"
            )
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
            raise CliptimeError(f"{path}: champion.within.{metric} is {margin!r}, not a margin >= 0")
    return {"best": raw["best"], "within": dict(within)}


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
    _fit_child(data, task, tc, f"{sweep}-{trial}", trial, uri, parent, experiment, [TuneReportCallback()])


def _fit_child(
    data: PreparedData,
    task: Task,
    tc: TrainConfig,
    run: str,
    child_name: str,
    uri: str,
    parent: str,
    experiment: str,
    callbacks: list,
) -> ray.train.Result:
    """Train `task` on the sweep's prepared `data` as Ray Train run `run` (under `tc.storage_path`), each epoch
    logged to the sweep's child run `child_name` (found again on a resume), which is closed when it is done."""
    client = MlflowClient(uri)
    child = _child_run(client, tracking.experiment_id(client, experiment), parent, child_name, task, tc)
    result = train.fit(
        task,
        tc,
        training_datasets(data, tc.seed),
        steps_per_epoch(data, tc.batch_size),
        run,
        tc.storage_path,
        [tracking.EpochLogger(uri, child), *callbacks],
    )
    client.set_terminated(child)
    return result


def _changed_keys(now: dict, then: dict) -> list[str]:
    """The top-level keys of a sweep's spec that differ between the file now and the sweep's record (JSON has
    turned its tuples into lists)."""
    now = json.loads(json.dumps(now))
    return sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))


def _warm_start(
    spec: SweepSpec,
    prepared: dict[tuple, PreparedData],
    storage: Storage,
    sweep: str,
    uri: str,
    parent: str,
    experiment: str,
) -> str:
    """Train the sweep's warm-start model (its own child run, `warm-start`) and return its last checkpoint's
    location, which every trial starts from. A resumed sweep continues an unfinished warm start."""
    settings = {**spec.warm_start["fixed"], "epochs": spec.warm_start["epochs"]}
    data, task, tc = trial_setup(spec, settings, prepared, storage.uri, experiment)
    run = f"{sweep}-warm-start"
    result = _fit_child(data, task, tc, run, "warm-start", uri, parent, experiment, [])
    if result.checkpoint is None:
        raise CliptimeError(f"the warm start of sweep {sweep} left no checkpoint under {joined(storage.uri, run)}")
    return joined(storage.uri, f"{run}/{Path(result.checkpoint.path).name}")


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


def _study(spec: SweepSpec, results: tune.ResultGrid) -> tuple[optuna.Study, list[tune.Result]]:
    """An Optuna study rebuilt from the trials that reported every objective (what the figures are drawn from
    and the Pareto front read from), and those trials in the study's order (trial number = index). A trial with
    a NaN or infinite objective (one that diverged) enters as failed: Optuna takes no such value, and it belongs
    on no front."""
    space = distributions(spec)
    study = optuna.create_study(directions=["maximize" if mode == "max" else "minimize" for _, mode in spec.objectives])
    scored = [r for r in results if r.metrics and all(m in r.metrics for m, _ in spec.objectives)]
    for r in scored:
        values = [float(r.metrics[m]) for m, _ in spec.objectives]
        params = {k: r.config[k] for k in space}
        finite = all(math.isfinite(v) for v in values)
        state = optuna.trial.TrialState.COMPLETE if finite else optuna.trial.TrialState.FAIL
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=space, values=values if finite else None, state=state
            )
        )
    return study, scored


def _optuna_figures(spec: SweepSpec, study: optuna.Study) -> dict[str, Any]:
    """The Pareto front (several objectives) or the optimization history (one), and the parameters'
    importances for the metric the champion rule ranks on."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as optuna_plots

    names = [m for m, _ in spec.objectives]
    figures = {}
    if not study.trials:
        return figures
    if not spec.multi_objective:
        figures["optuna_history.png"] = optuna_plots.plot_optimization_history(study).figure
    elif len(names) <= 3:  # Optuna draws fronts of two or three objectives
        figures["pareto_front.png"] = optuna_plots.plot_pareto_front(study, target_names=names).figure
    ranked = names.index(spec.metric)
    if len({t.values[ranked] for t in study.trials}) >= 2 and spec.space:  # importances need varied outcomes
        figures["optuna_param_importances.png"] = optuna_plots.plot_param_importances(
            study, target=lambda t: t.values[ranked], target_name=spec.metric
        ).figure
    return figures


def _trials_table(spec: SweepSpec, study: optuna.Study, scored: list[tune.Result], chosen: int) -> pd.DataFrame:
    """One row per trial: its objectives, its sampled settings, whether it is on the Pareto front (no other
    trial is as good on every objective and better on one) and whether the champion rule chose it."""
    front = {t.number for t in study.best_trials}
    return pd.DataFrame(
        [
            {
                "trial": r.metrics.get("trial_id", str(i)),
                **{m: float(r.metrics[m]) for m, _ in spec.objectives},
                **{k: r.config[k] for k in spec.space},
                "pareto_front": i in front,
                "chosen": i == chosen,
            }
            for i, r in enumerate(scored)
        ]
    )


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
            "objectives": ", ".join(f"{m} ({mode})" for m, mode in spec.objectives),
            "champion_rule": spec.rule.describe("val/"),
            "num_samples": spec.num_samples,
            **{f"fixed.{k}": v for k, v in spec.fixed.items()},
        },
        run_id=parent,
    )
    storage.write(name, SWEEP_RECORD, {"task": spec.task, "spec": asdict(spec), "mlflow_run_id": parent})
    return name, parent


def _new_tuner(spec: SweepSpec, tc: TrainConfig, trainable, storage: Storage, name: str) -> tune.Tuner:
    """OptunaSearch over the space (at most `max_concurrent` trials at once), ASHA or FIFO. Several
    objectives go to Optuna as a list (its TPE sampler is multi-objective); Tune itself then ranks on none."""
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
    metrics, modes = [m for m, _ in spec.objectives], [mode for _, mode in spec.objectives]
    if spec.multi_objective:
        searcher = OptunaSearch(space=distributions(spec), metric=metrics, mode=modes, seed=spec.seed)
        metric, mode = None, None
    else:
        (metric,), (mode,) = metrics, modes
        searcher = OptunaSearch(space=distributions(spec), metric=metric, mode=mode, seed=spec.seed)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
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
        changed = _changed_keys(asdict(spec), saved["spec"])
        if changed:
            raise CliptimeError(
                f"--resume {name}: {spec_path} is not the file the sweep started with ({', '.join(changed)} changed); "
                "resume with that file, or start a new sweep"
            )
    else:
        name, parent = _open_sweep(spec, spec_path, task, storage, client, experiment, name)
    # Each running trial holds its workers' CPUs plus a sliver for itself, which leaves a fractional CPU: Ray
    # Data's 1-CPU tasks need two whole ones beside them (with one, a trial was seen waiting on them forever).
    init_ray(spec.max_concurrent * (tc.num_workers * tc.cpus_per_worker + 2))
    prepared = {spec.data_variant(v): prepare(task.replace(**v)) for v in spec.data_variants()}
    with storage.hold(name), tracking.run_status(client, parent, active=True):
        if spec.warm_start:
            record = storage.read(name, SWEEP_RECORD)
            if "warm_start" not in record:
                record["warm_start"] = _warm_start(spec, prepared, storage, name, uri, parent, experiment)
                storage.write(name, SWEEP_RECORD, record)
            # the trials, and the best one's test, rebuild their settings from the spec: it carries the weights
            spec = dataclasses.replace(spec, fixed={**spec.fixed, "init_from": record["warm_start"]})
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
        with handlers_kept(signal.SIGINT):
            results = tuner.fit()
        _check_complete(spec, results, f"python jobs/tune.py {spec_path} --resume {name}")
        study, scored = _study(spec, results)
        if not scored:
            raise CliptimeError(f"no trial of sweep {name} reported {', '.join(m for m, _ in spec.objectives)}")
        # the champion rule on each trial's last validation metrics (an early-stopped trial's at its stop)
        chosen = spec.rule.choose([{m.removeprefix("val/"): v for m, v in r.metrics.items()} for r in scored])
        best = scored[chosen]
        value = float(best.metrics[spec.metric])
        if not math.isfinite(value):
            raise CliptimeError(f"no trial of sweep {name} reached a finite {spec.metric}; nothing registered")
        data, task, tc = trial_setup(spec, best.config, prepared, storage.uri, experiment)
        checkpoint = ray.train.Checkpoint(best.metrics[CHECKPOINT_PATH_KEY])
        metrics, _ = evaluate.test(task, tc, checkpoint, data.splits["test"])
        test_metrics = {f"best/test/{k}": v for k, v in metrics.items()}
        mlflow.log_metrics({**{f"best/{m}": float(best.metrics[m]) for m, _ in spec.objectives}, **test_metrics})
        mlflow.log_params({f"best.{k}": v for k, v in best.config.items()})
        tracking.log_figures(parent, _optuna_figures(spec, study), client)
        trials = _trials_table(spec, study, scored, chosen)
        if spec.multi_objective:
            # written whole (log_table would add to a table a failed attempt of this sweep left)
            mlflow.log_dict(trials.to_dict(orient="split", index=False), "pareto_front.json", run_id=parent)
        model = train.load_checkpoint_model(task, checkpoint)
        # The champion is judged on held-out test data, the same for both models: the champion rule's metrics
        # as the test split reports them, under the test data's fingerprint.
        scores = {registry.score_tag(data.test_fingerprint, m): repr(metrics[m]) for m in spec.rule.metrics}
        tags = {"sweep": name, "test_data": data.test_fingerprint, "champion_rule": json.dumps(spec.champion), **scores}
        facts = registry.SweepFacts(name, spec.rule, len(results))
        card = registry.Card(data, tc, {f"test/{k}": v for k, v in metrics.items()}, name, sweep=facts)
        version = registry.log_and_register(
            task, model, True, tags={**tags, **{k: f"{v:.4f}" for k, v in test_metrics.items()}}, card=card
        )

        def score(other: str) -> dict[str, float]:
            """A registered version's test metrics on this sweep's test split."""
            other_task, other_model = registry.load_model(f"models:/{task.name}/{other}")
            try:
                return evaluate.test(other_task, tc, other_model, data.splits["test"])[0]
            except Exception as e:
                raise CliptimeError(
                    f"{task.name} version {other} (the champion) cannot be scored on this sweep's test data "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); version {version} is "
                    "registered, the alias not moved"
                ) from None

        holder = registry.champion(client, task.name)
        moved, before = registry.promote_champion(client, task.name, version, data.test_fingerprint, spec.rule, score)
        client.set_model_version_tag(
            task.name, version, "champion_before", "none" if before is None else json.dumps(before)
        )
        standing = dataclasses.replace(facts, champion_before=holder, score_before=before, became_champion=moved)
        registry.write_card(client, task, version, dataclasses.replace(card, sweep=standing))
    storage.mark_finished(name, SWEEP_RECORD, model_version=version)
    return {
        "sweep": name,
        "run_id": parent,
        "trials": len(results),
        "prepared_data_sets": len(prepared),
        "best_config": best.config,
        "objectives": [{"metric": m, "mode": mode} for m, mode in spec.objectives],
        "champion_rule": spec.rule.describe("val/"),
        **({"pareto_front": trials.loc[trials["pareto_front"], "trial"].tolist()} if spec.multi_objective else {}),
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
