"""Champion moves: judged on the same test data, stopped by any registry error, safe when two race; and the
MLflow run status a job leaves behind (KILLED when stopped, the job's own error kept when marking fails)."""

from __future__ import annotations

import threading

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cliptime import tracking
from cliptime.errors import CliptimeError
from cliptime.registry import champion, promote_champion, score_tag

MODEL = "m"
ON_A, ON_B = score_tag("aaaa", "accuracy"), score_tag("bbbb", "accuracy")


def add_version(client: MlflowClient, tags: dict[str, float]) -> str:
    """A version of MODEL with test scores as tags (the weights do not matter to a promotion)."""
    try:
        client.create_registered_model(MODEL)
    except MlflowException:
        pass
    version = client.create_model_version(MODEL, "file:///nowhere").version
    for key, value in tags.items():
        client.set_model_version_tag(MODEL, version, key, repr(value))
    return str(version)


def never_scored(version: str) -> float:
    raise AssertionError(f"version {version} should not need scoring")


def test_a_better_model_takes_the_alias_and_a_worse_one_does_not(empty_store):
    client = MlflowClient(empty_store)
    first = add_version(client, {ON_A: 0.8})
    assert promote_champion(client, MODEL, first, ON_A, "max", never_scored) == (True, None)
    worse = add_version(client, {ON_A: 0.7})
    assert promote_champion(client, MODEL, worse, ON_A, "max", never_scored) == (False, 0.8)
    assert champion(client, MODEL) == first
    better = add_version(client, {ON_A: 0.9})
    assert promote_champion(client, MODEL, better, ON_A, "max", never_scored) == (True, 0.8)
    assert champion(client, MODEL) == better
    lower_loss = add_version(client, {score_tag("aaaa", "loss"): 0.1})
    assert promote_champion(client, MODEL, lower_loss, score_tag("aaaa", "loss"), "min", lambda v: 0.5)[0]


def test_a_champion_scored_on_other_data_is_scored_on_the_candidates(empty_store):
    """The champion's 0.99 on its own test data says nothing about the candidate's: it is scored on those."""
    client = MlflowClient(empty_store)
    crowned = add_version(client, {ON_A: 0.99})
    client.set_registered_model_alias(MODEL, "champion", crowned)
    candidate = add_version(client, {ON_B: 0.9})
    asked = []

    def score(version: str) -> float:
        asked.append(version)
        return 0.6

    assert promote_champion(client, MODEL, candidate, ON_B, "max", score) == (True, 0.6)
    assert asked == [crowned] and champion(client, MODEL) == candidate
    assert float(client.get_model_version(MODEL, crowned).tags[ON_B]) == 0.6  # recorded beside its 0.99 on A


def test_a_registry_error_stops_the_promotion(empty_store, monkeypatch):
    client = MlflowClient(empty_store)
    crowned = add_version(client, {ON_A: 0.9})
    client.set_registered_model_alias(MODEL, "champion", crowned)
    candidate = add_version(client, {ON_A: 0.1})

    def unavailable(*args, **kwargs):
        raise MlflowException("the registry is restarting", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(client, "get_registered_model", unavailable)
    with pytest.raises(CliptimeError, match="registry error while promoting m version 2: the registry is restarting"):
        promote_champion(client, MODEL, candidate, ON_A, "max", never_scored)
    assert champion(MlflowClient(empty_store), MODEL) == crowned  # not "no champion", so not crowned


def test_racing_promotions_leave_the_better_model_champion(empty_store):
    """The worse candidate decides while the better one is not yet scored, and its alias write lands last:
    without the second look it would hold the alias."""
    client = MlflowClient(empty_store)
    worse = add_version(client, {ON_A: 0.7})
    late_write = threading.Event()

    class SlowClient(MlflowClient):
        first = True

        def set_registered_model_alias(self, *args):
            if SlowClient.first:
                SlowClient.first = False
                assert late_write.wait(60)
            super().set_registered_model_alias(*args)

    outcome = {}
    racer = threading.Thread(
        target=lambda: outcome.update(
            worse=promote_champion(SlowClient(empty_store), MODEL, worse, ON_A, "max", never_scored)
        )
    )
    racer.start()
    while SlowClient.first:  # the worse one has chosen itself and waits to write
        threading.Event().wait(0.05)
    better = add_version(client, {ON_A: 0.9})
    assert promote_champion(client, MODEL, better, ON_A, "max", never_scored)[0]
    late_write.set()
    racer.join(60)
    assert outcome["worse"][0] is False
    assert champion(client, MODEL) == better


# -- the MLflow run status of a job ----------------------------------------------------------------------------
@pytest.mark.parametrize(("error", "status"), [(KeyboardInterrupt, "KILLED"), (ValueError, "FAILED")])
def test_a_stopped_run_is_marked_killed_and_a_failed_one_failed(empty_store, error, status):
    client = MlflowClient(empty_store)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    with pytest.raises(error), tracking.run_status(client, run_id):
        raise error()
    assert client.get_run(run_id).info.status == status


def test_a_store_that_cannot_take_the_status_does_not_hide_the_error(empty_store, monkeypatch, capsys):
    client = MlflowClient(empty_store)
    run_id = client.create_run(client.create_experiment("e")).info.run_id

    def down(*args, **kwargs):
        raise MlflowException("connection refused")

    monkeypatch.setattr(client, "set_terminated", down)
    with pytest.raises(ValueError, match="the job's own error"), tracking.run_status(client, run_id):
        raise ValueError("the job's own error")
    assert f"could not mark MLflow run {run_id} FAILED: connection refused" in capsys.readouterr().out
