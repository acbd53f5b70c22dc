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
"""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

from cliptime.errors import CliptimeError
from cliptime.tasks import make_task, task_ref
from cliptime.tasks.base import Task

FORMAT = 1
CHAMPION = "champion"  # the alias sweeps move to their best model when it beats the one holding it
PROMOTION_ROUNDS = 20  # alias reads and writes before a promotion gives up on a registry that keeps changing
CONFIG_FILE = "cliptime.json"
WEIGHTS_FILE = "weights.safetensors"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


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
    names = ["torch", "numpy", "pandas", "pillow", "open_clip_torch", "laion-clap", "mlflow", "soundfile", "scipy"]
    return [f"{n}=={importlib.metadata.version(n)}" for n in names]


def log_and_register(task: Task, model: torch.nn.Module, register: bool, tags: dict[str, str]) -> str | None:
    """Log the model in the active run and register it as a version of the model named after its task, tagged
    with `tags`, unless `register` is off; returns the version.

    One version per run: a run that already registered one (a finished run resumed) gets that version back."""
    from mlflow.models import infer_signature

    run_id = mlflow.active_run().info.run_id
    client = MlflowClient()
    if register and (version := registered_version(client, task.name, run_id)):
        print(f"run {run_id} is already registered as {task.name} version {version}", flush=True)
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


def promote_champion(
    client: MlflowClient,
    model: str,
    version: str,
    key: str,
    mode: str,
    score: Callable[[str], float],
) -> tuple[bool, float | None]:
    """Move alias `champion` of `model` to `version` if it beats the current champion on the same test data:
    tag `key` (see `score_tag`), which `version` carries already. A champion without that score is first scored
    on the data by `score(its version)`, and the score recorded on it.

    Concurrent promotions are safe without a compare-and-set in the registry: each one sets the alias to the
    best version scored on its data, then reads the alias again and repeats until the alias holds the best. A
    promotion that set the alias from a stale view finds the better version on its next look and puts it back.
    Ties go to the older version, so every promoter agrees on the best. Any registry error stops the
    promotion (raised as one line). Returns (the alias holds `version`, the champion's score before)."""
    try:
        holder = champion(client, model)
        before = None
        if holder is not None:
            tags = client.get_model_version(model, holder).tags
            if key in tags:
                before = float(tags[key])
            else:
                before = score(holder)
                client.set_model_version_tag(model, holder, key, repr(before))
        for _ in range(PROMOTION_ROUNDS):
            best = _best_scored(client, model, key, mode)
            if champion(client, model) == best:
                return best == version, before
            client.set_registered_model_alias(model, CHAMPION, best)
    except MlflowException as e:
        raise CliptimeError(
            f"registry error while promoting {model} version {version}: {str(e).splitlines()[0]}; the alias "
            f"{CHAMPION} was left to the registry as it stands"
        ) from None
    raise CliptimeError(f"the alias {CHAMPION} of {model} kept changing under this promotion; check it by hand")


def _best_scored(client: MlflowClient, model: str, key: str, mode: str) -> str:
    """The version of `model` with the best score `key` (ties: the older version)."""
    scored = [
        (float(v.tags[key]), int(v.version)) for v in client.search_model_versions(f"name = '{model}'") if key in v.tags
    ]
    sign = 1 if mode == "max" else -1
    return str(max(scored, key=lambda sv: (sign * sv[0], -sv[1]))[1])
