"""Shared fixtures: one Ray instance and one migrated MLflow SQLite store for the whole session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with more logical CPUs than any test's workers take, so Ray Data always has some."""
    import ray

    # address="local": never join a `ray start` cluster left on this machine (the e2e tests start one).
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        ignore_reinit_error=True,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> str:
    """A SQLite tracking URI whose migrations already ran (a fresh store costs ~7 s)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture
def tracking(mlflow_store, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    return mlflow_store


def run_job(script: str, *args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 900):
    """Run a job script as a user would; returns the CompletedProcess (text mode)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / script), *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        timeout=timeout,
    )


def registered_versions(uri: str, name: str) -> list:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(uri).search_model_versions(f"name='{name}'")
    except MlflowException:
        return []
