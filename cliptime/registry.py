"""The MLflow model registry: each run's model registered once, as plain files that load without running code.

A registered version's artifacts (under the run's `model/`):

    artifacts/cliptime.json           {"format": 1, "task": <task name or import path>, "task_config": {...}}
    artifacts/weights.safetensors     the model's state dict: tensors only
    MLmodel, python_model.py, ...     MLflow's pyfunc flavour, for `mlflow.pyfunc.load_model` and `mlflow models
                                      serve`: a model from code (cliptime/pyfunc_model.py), no pickle, so it
                                      loads with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false

The project's own loader (`load_model`, used by `jobs/predict.py`) reads the JSON and the tensors and builds the
model from the installed cliptime: nothing from the registry is executed. Versions registered before this
format (a pickled pyfunc around `weights.pt` and `task_config.json`) load the same way, from their tensors.

Model cards: the registered model's description says what the task's model does and how to predict with it; each
version's says what made it (the data, the settings that differ from the defaults, the command) and how it scored
(`Card`). Both are Markdown, which MLflow's pages render; figures stay in the version's source run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import shlex
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

from cliptime import console
from cliptime.config import TrainConfig
from cliptime.data.shards import display, file_system, read_manifest
from cliptime.errors import CliptimeError
from cliptime.pipeline import PreparedData
from cliptime.tasks import make_task, task_ref
from cliptime.tasks.base import Task

FORMAT = 1
CHAMPION = "champion"  # the alias sweeps move to their best model when it beats the one holding it
PROMOTION_ROUNDS = 20  # alias reads and writes before a promotion gives up on a registry that keeps changing
CONFIG_FILE = "cliptime.json"
WEIGHTS_FILE = "weights.safetensors"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
DESCRIPTION_LIMIT = 5000  # characters of a description that MLflow's SQL stores hold (a VARCHAR(5000) column)
VALUE_LIMIT = 100  # characters of a value shown in a card (a shard folder's class list can be long)


# -- model files ----------------------------------------------------------------------------------------------
def save_files(task: Task, model: torch.nn.Module, folder: Path) -> dict[str, str]:
    """Write the model's config and weights into `folder`; returns them as pyfunc artifacts."""
    config, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    config.write_text(json.dumps({"format": FORMAT, "task": task_ref(task), "task_config": asdict(task.cfg)}, indent=2))
    # contiguous copies: safetensors refuses tensors that share memory or are views
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, str(weights))
    return {"config": str(config), "weights": str(weights)}


def load_files(folder: Path) -> tuple[Task, torch.nn.Module]:
    """(task, model in eval mode) from a version's artifact folder, built by the installed package."""
    if (folder / CONFIG_FILE).exists():
        meta = json.loads((folder / CONFIG_FILE).read_text())
        state = load_file(str(folder / WEIGHTS_FILE))
    elif (folder / "task_config.json").exists():  # registered before the safetensors format
        meta = json.loads((folder / "task_config.json").read_text())
        state = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
    else:
        raise CliptimeError(f"{folder} holds no cliptime model files ({CONFIG_FILE})")
    task = make_task(meta["task"], meta["task_config"])
    model = task.build_model(load_pretrained=False)
    model.load_state_dict(state)
    return task, model.eval()


def load_model(uri: str) -> tuple[Task, torch.nn.Module]:
    """(task, model) of a model URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/model`)."""
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri)) / "artifacts"
    except (MlflowException, OSError) as e:
        raise CliptimeError(f"cannot load model {uri}: {str(e).splitlines()[0]}") from None
    try:
        return load_files(local)
    except CliptimeError:
        raise CliptimeError(f"{uri} is not a cliptime model") from None


# -- registration ---------------------------------------------------------------------------------------------
def registered_version(client: MlflowClient, model_name: str, run_id: str) -> str | None:
    """The version of `model_name` that run `run_id` registered, if any."""
    try:
        found = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    except MlflowException:  # no such registered model yet
        return None
    return str(min(int(v.version) for v in found)) if found else None


def _requirements() -> list[str]:
    """Pinned requirements of a served model (given explicitly: MLflow's inference would load the model)."""
    names = ["torch", "numpy", "pandas", "pillow", "open_clip_torch", "laion-clap", "transformers", "mlflow"]
    names += ["soundfile", "scipy"]
    return [f"{n}=={importlib.metadata.version(n)}" for n in names]


def log_and_register(
    task: Task, model: torch.nn.Module, register: bool, tags: dict[str, str], card: Card | None = None
) -> str | None:
    """Log the model in the active run and register it as a version of the model named after its task, tagged
    with `tags` and described by `card` (see `write_card`), unless `register` is off; returns the version.

    One version per run: a run that already registered one (a finished run resumed) gets that version back."""
    from mlflow.models import infer_signature

    run_id = mlflow.active_run().info.run_id
    client = MlflowClient()
    if register and (version := registered_version(client, task.name, run_id)):
        print(f"run {run_id} is already registered as {task.name} version {version}", flush=True)
        if card is not None:
            write_card(client, task, version, card)
        return version
    example = task.input_example()
    signature = infer_signature(example, task.predict(model, example))
    with tempfile.TemporaryDirectory() as tmp:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts=save_files(task, model, Path(tmp)),
            signature=signature,
            pip_requirements=_requirements(),
            registered_model_name=task.name if register else None,
        )
    if not register:
        return None
    version = str(info.registered_model_version)
    for k, v in {"run_id": run_id, **tags}.items():
        client.set_model_version_tag(task.name, version, k, v)
    client.update_registered_model(
        task.name, description=model_description(task, signature.inputs.input_names(), signature.outputs.input_names())
    )
    if card is not None:
        write_card(client, task, version, card)
    return version


def champion(client: MlflowClient, model: str) -> str | None:
    """The version that holds alias `champion` of `model`, None if none does (or no such model yet). Any other
    registry error is raised: "could not ask" must never read as "no champion"."""
    try:
        version = client.get_registered_model(model).aliases.get(CHAMPION)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return None if version is None else str(version)


def score_tag(fingerprint: str, metric: str) -> str:
    """The version tag that holds a model's test `metric` on the test data of `fingerprint`."""
    return f"test.{fingerprint}.{metric}"


@dataclass(frozen=True)
class ChampionRule:
    """Which of several scored models is best: the best `metric` (by `mode`) among those left after each `within`
    condition in turn keeps the ones whose metric is no further than its margin from the best of those before it.
    With no conditions, simply the best `metric`. Names carry no split prefix (`accuracy`, not `val/accuracy`): a
    sweep applies the rule to its trials' validation metrics, the registry to versions' test scores on the same
    test data. A missing or NaN value ranks last; ties go to the earlier candidate (the older version). The
    conditions make the choice depend on the whole set: a newcomer that raises the best of a `within` metric can
    rule out the one that led, in favour of a third."""

    metric: str
    mode: str = "max"
    within: tuple[tuple[str, str, float], ...] = ()  # (metric, its mode, margin in the metric's own units)

    @property
    def metrics(self) -> list[str]:
        return [self.metric, *(name for name, _, _ in self.within)]

    def choose(self, scores: list[dict[str, float]]) -> int:
        """The index of the best of `scores` (one dict of metrics per candidate, at least one)."""

        def value(i: int, name: str, mode: str) -> float:
            v = float(scores[i].get(name, math.nan))
            return -math.inf if math.isnan(v) else (v if mode == "max" else -v)

        left = range(len(scores))
        for name, mode, margin in self.within:
            best = max(value(i, name, mode) for i in left)
            left = [i for i in left if value(i, name, mode) >= best - margin - 1e-9]  # 0.07 - 0.01 is 0.06
        return max(left, key=lambda i: (value(i, self.metric, self.mode), -i))

    def describe(self, prefix: str = "") -> str:
        """The rule in words, its metrics named with `prefix` (`val/`, `test/`)."""
        text = f"the best `{prefix}{self.metric}` ({self.mode})"
        conditions = [f"`{prefix}{name}` within {margin:g} of the best" for name, _, margin in self.within]
        return text + (f" among those with {' and then '.join(conditions)}" if conditions else "")


def promote_champion(
    client: MlflowClient,
    model: str,
    version: str,
    fingerprint: str,
    rule: ChampionRule,
    score: Callable[[str], dict[str, float]],
) -> tuple[bool, dict[str, float] | None]:
    """Give alias `champion` of `model` to the version `rule` prefers among all versions scored on the same test
    data (the tags `score_tag(fingerprint, m)` of the rule's metrics, which `version` carries already): `version`
    if it beats the champion. A champion without those scores is first scored on the data by `score(its
    version)` (the test metrics), and the scores recorded on it.

    Concurrent promotions are safe without a compare-and-set in the registry: each one sets the alias to the
    best version scored on its data, then reads the alias again and repeats until the alias holds the best. A
    promotion that set the alias from a stale view finds the better version on its next look and puts it back.
    Ties go to the older version, so every promoter agrees on the best. Any registry error stops the
    promotion (raised as one line). Returns (the alias holds `version`, the champion's scores before)."""
    keys = {m: score_tag(fingerprint, m) for m in rule.metrics}
    try:
        holder = champion(client, model)
        before = None
        if holder is not None:
            tags = client.get_model_version(model, holder).tags
            if all(key in tags for key in keys.values()):
                before = {m: float(tags[key]) for m, key in keys.items()}
            else:
                scored = score(holder)
                before = {m: float(scored[m]) for m in keys}
                for m, key in keys.items():
                    client.set_model_version_tag(model, holder, key, repr(before[m]))
        for _ in range(PROMOTION_ROUNDS):
            best = _best_scored(client, model, keys, rule)
            if champion(client, model) == best:
                return best == version, before
            client.set_registered_model_alias(model, CHAMPION, best)
    except MlflowException as e:
        raise CliptimeError(
            f"registry error while promoting {model} version {version}: {str(e).splitlines()[0]}; the alias "
            f"{CHAMPION} was left to the registry as it stands"
        ) from None
    raise CliptimeError(f"the alias {CHAMPION} of {model} kept changing under this promotion; check it by hand")


def _best_scored(client: MlflowClient, model: str, keys: dict[str, str], rule: ChampionRule) -> str:
    """The version of `model` that `rule` prefers among those carrying every score tag in `keys` (metric -> tag)."""
    scored = sorted(
        (int(v.version), {m: float(v.tags[key]) for m, key in keys.items()})
        for v in client.search_model_versions(f"name = '{model}'")
        if all(key in v.tags for key in keys.values())
    )
    return str(scored[rule.choose([scores for _, scores in scored])][0])


# -- model cards ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepFacts:
    """Where a sweep's registered best model stands against the champion."""

    name: str
    rule: ChampionRule  # how the best trial was chosen (on validation metrics) and the champion (on test ones)
    trials: int
    champion_before: str | None = None  # the version that held the alias before (None: none did)
    score_before: dict[str, float] | None = None  # its scores on this sweep's test data (the rule's metrics)
    became_champion: bool | None = None  # None: not promoted yet


@dataclass(frozen=True)
class Card:
    """What a version's description tells besides its task: what made it and how it scored."""

    data: PreparedData
    train_config: TrainConfig
    metrics: dict[str, float]  # `test/NAME` (and a baseline's `baseline/test/NAME`), in the task's order
    run_name: str
    sweep: SweepFacts | None = None
    command: str = field(default_factory=lambda: shlex.join(["python", *sys.argv]))  # what this process ran


def write_card(client: MlflowClient, task: Task, version: str, card: Card) -> None:
    """Describe version `version` of the task's registered model by `card` (Markdown)."""
    run_id = client.get_model_version(task.name, version).run_id
    client.update_model_version(task.name, version, description=version_description(task, version, run_id, card))


def model_description(task: Task, inputs: list[str], outputs: list[str]) -> str:
    """The registered model's description: the task's own words, its pyfunc columns, and how to predict."""
    uri = f"models:/{task.name}@{CHAMPION}"
    flags = argparse.ArgumentParser(prog="", usage=argparse.SUPPRESS, add_help=False)
    task.add_predict_args(flags.add_argument_group(f"{task.title}'s own flags of jobs/predict.py"))
    task_flags = ["```", flags.format_help().strip(), "```", ""] if vars(flags.parse_args([])) else []
    files = ", ".join(f".{s}" for s in task.file_suffixes) or "any"
    lines = [
        f"**{task.title}** (`{task_ref(task)}`). {task.summary}",
        "",
        f"pyfunc input columns: {_codes(inputs)}; output columns: {_codes(outputs)}.",
        "",
        "### Predict",
        "",
        f"`{uri}` is the version that won the sweeps so far (alias `{CHAMPION}`); `models:/{task.name}/N` is "
        "version N. From a checkout of cliptime:",
        "",
        "```",
        f"# a file ({files}): its answer as a JSON line",
        f"python jobs/predict.py {uri} FILE",
        "# a folder of such files: a table of answers (.parquet or .csv), through Ray Data",
        f"python jobs/predict.py {uri} FOLDER --out predictions.parquet",
        "# over HTTP on 127.0.0.1:8000: POST /predict, and a page to drop a file on at /",
        f"python jobs/serve.py {uri}",
        "```",
        "",
        *task_flags,
        "From Python (no pickle is loaded: MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false works):",
        "",
        "```python",
        "import mlflow",
        f'model = mlflow.pyfunc.load_model("{uri}")',
        f"predictions = model.predict(frame)  # a pandas DataFrame with columns {', '.join(inputs)}",
        "```",
        "",
        "Each version's description tells its data, its settings, its test results and the command that made it.",
    ]
    return "\n".join(lines)


def version_description(task: Task, version: str, run_id: str, card: Card) -> str:
    """A version's Markdown card: its run, headline and other test metrics, data, changed settings, sweep
    standing and command; cut at MLflow's `DESCRIPTION_LIMIT` (the run keeps everything)."""
    headline = f"test/{task.monitor.removeprefix('val/')}"
    lines = [
        # plain words first: MLflow's list of versions shows the start of each description as it is written
        f"{task.title} version {version}: {headline} {card.metrics[headline]:.4f} on test data "
        f"{card.data.test_fingerprint}, trained by run {card.run_name}.",
        "",
        f"Its MLflow run (`{run_id}`, the *Source Run* link on this page) holds the per-epoch metrics, the figures "
        "and the logged model.",
        "",
        "### Test results",
        "",
        *_metric_lines(card.metrics, headline),
        "",
        "### Data",
        "",
        *_data_lines(task, card.data),
        "",
        "### Settings that differ from the defaults",
        "",
        *_settings_lines(task, card.train_config),
        "",
        *(_sweep_lines(card.sweep) if card.sweep else []),
        "### Command",
        "",
        "```",
        _shell_lines(card.command),
        "```",
    ]
    text = "\n".join(lines)
    if len(text) <= DESCRIPTION_LIMIT:
        return text
    cut = f"\n\n(cut at MLflow's {DESCRIPTION_LIMIT} characters: the source run holds every setting and metric)"
    return text[: DESCRIPTION_LIMIT - len(cut)] + cut


def _metric_lines(metrics: dict[str, float], headline: str) -> list[str]:
    """The headline metric in bold (beside the baseline's), then a table of the others."""
    baseline = {k.removeprefix("baseline/"): v for k, v in metrics.items() if k.startswith("baseline/")}
    own = {k: v for k, v in metrics.items() if not k.startswith("baseline/")}
    beside = f" (baseline: {baseline[headline]:.4f})" if headline in baseline else ""
    lines = [f"**`{headline}` = {own[headline]:.4f}**{beside}, the task's measure of a model, on the test split.", ""]
    header = ["other test metrics", "value", *(["baseline"] if baseline else [])]
    rows = [
        [k.removeprefix("test/"), f"{v:.4f}", *([f"{baseline[k]:.4f}" if k in baseline else "-"] if baseline else [])]
        for k, v in own.items()
        if k != headline
    ]
    return [*lines, *_text_table(header, rows)] if rows else lines[:1]


def _data_lines(task: Task, data: PreparedData) -> list[str]:
    """Where the data came from (the shard folder and what its manifest says made it, or the generator's
    settings), rows per split, and the test split's fingerprint."""
    if task.cfg.data:
        folder = display(*file_system(task.cfg.data))  # a URI without its query: no credentials in the card
        source = read_manifest(task.cfg.data, task.name).get("source", {})
        origin = f"Shards in `{folder}`, made by"
    else:
        source = task.source()
        origin = "Generated by the task's generator, with"
    rows = " · ".join(f"{split} {count}" for split, count in data.rows.items())
    lines = [
        f"- Rows: {rows}",
        f"- Test data fingerprint: `{data.test_fingerprint}` (models scored on equal fingerprints are comparable)",
    ]
    if not source:
        return [*lines, f"- {origin}: (nothing recorded)"]
    return [*lines, f"- {origin}: " + " · ".join(f"{k} {_code(v)}" for k, v in source.items())]


def _settings_lines(task: Task, tc: TrainConfig) -> list[str]:
    """Task and training settings that differ from the defaults (the task's config, `Task.train_config()`),
    named as the run's params; settings the data decide (no flag) are the data's, told above."""
    task_defaults, train_defaults = asdict(type(task).Config()), asdict(type(task).train_config())
    compared = [
        (f"task.{f.name}", getattr(task.cfg, f.name), task_defaults[f.name])
        for f in dataclasses.fields(task.cfg)
        if f.metadata.get("flag") is not False
    ]
    compared += [(f"train.{k}", v, train_defaults[k]) for k, v in asdict(tc).items()]
    changed = [f"- `{name}`: {_code(v)} (default {_code(d)})" for name, v, d in compared if _plain(v) != _plain(d)]
    return changed or ["None: every setting is the default."]


def _sweep_lines(sweep: SweepFacts) -> list[str]:
    """The sweep that chose this model, and whether it took the alias from the champion before it."""
    if sweep.champion_before is None:
        before = "none: this sweep's model is the first to hold the alias" if sweep.became_champion else "none"
    elif sweep.score_before is None:
        before = f"version {sweep.champion_before}"
    else:
        scores = ", ".join(f"`test/{m}` = {v:.4f}" for m, v in sweep.score_before.items())
        before = f"version {sweep.champion_before}, {scores} on this test data"
    outcome = {True: "yes", False: "no", None: "not decided yet (the sweep promotes after registering)"}
    trials = f"{sweep.trials} trial{'s' if sweep.trials != 1 else ''}"
    return [
        "### Sweep",
        "",
        f"Of {trials} of sweep `{sweep.name}`, {sweep.rule.describe('val/')}; the alias `{CHAMPION}` goes to the "
        f"better model by the same rule on the same test data: {sweep.rule.describe('test/')}.",
        "",
        f"- Champion before: {before}",
        f"- Became champion: {outcome[sweep.became_champion]}",
        "",
    ]


def _plain(value: Any) -> Any:
    """A setting as JSON holds it (a tuple and a list of the same values compare equal)."""
    return json.loads(json.dumps(value, default=str))


def _shell_lines(command: str, width: int = 88) -> str:
    """A shell command broken into lines of about `width` characters (with `\\`), each flag beside its values."""
    words: list[str] = []
    for token in shlex.split(command):
        if words and not token.startswith("-") and words[-1].startswith("-"):
            words[-1] += " " + shlex.quote(token)
        else:
            words.append(shlex.quote(token))
    lines = [words[0]]
    for word in words[1:]:
        if len(lines[-1]) + 1 + len(word) > width:
            lines.append("    " + word)
        else:
            lines[-1] += " " + word
    return " \\\n".join(lines)


def _code(value: Any) -> str:
    """A value as inline code, at most `VALUE_LIMIT` characters."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > VALUE_LIMIT:
        text = text[: VALUE_LIMIT - 1] + "…"
    return f"`{text}`" if text else '""'


def _codes(names: list[str]) -> str:
    return ", ".join(_code(n) for n in names)


def _text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A table as aligned columns in a code block: read alike on MLflow's pages (whose Markdown tables have no
    spacing between their columns), in a terminal and through the API."""
    return ["```", *console.table([header, *rows], rule=False), "```"]
