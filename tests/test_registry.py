"""Champion moves: judged on the same test data, stopped by any registry error, safe when two race; and the
MLflow run status a job leaves behind (KILLED when stopped, the job's own error kept when marking fails)."""

from __future__ import annotations

import threading

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cliptime import tracking
from cliptime.errors import CliptimeError
from cliptime.registry import ChampionRule, champion, promote_champion, score_tag

MODEL = "m"
ON_A, ON_B = score_tag("aaaa", "accuracy"), score_tag("bbbb", "accuracy")
ACCURACY = ChampionRule("accuracy", "max")


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


def never_scored(version: str) -> dict[str, float]:
    raise AssertionError(f"version {version} should not need scoring")


def test_a_better_model_takes_the_alias_and_a_worse_one_does_not(empty_store):
    client = MlflowClient(empty_store)
    first = add_version(client, {ON_A: 0.8})
    assert promote_champion(client, MODEL, first, "aaaa", ACCURACY, never_scored) == (True, None)
    worse = add_version(client, {ON_A: 0.7})
    assert promote_champion(client, MODEL, worse, "aaaa", ACCURACY, never_scored) == (False, {"accuracy": 0.8})
    assert champion(client, MODEL) == first
    better = add_version(client, {ON_A: 0.9})
    assert promote_champion(client, MODEL, better, "aaaa", ACCURACY, never_scored) == (True, {"accuracy": 0.8})
    assert champion(client, MODEL) == better
    lower_loss = add_version(client, {score_tag("aaaa", "loss"): 0.1})
    assert promote_champion(client, MODEL, lower_loss, "aaaa", ChampionRule("loss", "min"), lambda v: {"loss": 0.5})[0]


def test_a_champion_scored_on_other_data_is_scored_on_the_candidates(empty_store):
    """The champion's 0.99 on its own test data says nothing about the candidate's: it is scored on those."""
    client = MlflowClient(empty_store)
    crowned = add_version(client, {ON_A: 0.99})
    client.set_registered_model_alias(MODEL, "champion", crowned)
    candidate = add_version(client, {ON_B: 0.9})
    asked = []

    def score(version: str) -> dict[str, float]:
        asked.append(version)
        return {"accuracy": 0.6, "loss": 0.4}

    assert promote_champion(client, MODEL, candidate, "bbbb", ACCURACY, score) == (True, {"accuracy": 0.6})
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
        promote_champion(client, MODEL, candidate, "aaaa", ACCURACY, never_scored)
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
            worse=promote_champion(SlowClient(empty_store), MODEL, worse, "aaaa", ACCURACY, never_scored)
        )
    )
    racer.start()
    while SlowClient.first:  # the worse one has chosen itself and waits to write
        threading.Event().wait(0.05)
    better = add_version(client, {ON_A: 0.9})
    assert promote_champion(client, MODEL, better, "aaaa", ACCURACY, never_scored)[0]
    late_write.set()
    racer.join(60)
    assert outcome["worse"][0] is False
    assert champion(client, MODEL) == better


TCLASSIFY_NEAR_BEST_ZEROSHOT = ChampionRule("tclassify", "max", (("zeroshot", "max", 0.01),))


@pytest.mark.parametrize(
    ("rule", "scores", "chosen"),
    [
        # the best T-Classify (0.95) lost 3 points of zero-shot: the best among those within 1 point wins
        (
            TCLASSIFY_NEAR_BEST_ZEROSHOT,
            [
                {"tclassify": 0.95, "zeroshot": 0.70},
                {"tclassify": 0.90, "zeroshot": 0.725},
                {"tclassify": 0.85, "zeroshot": 0.73},
            ],
            1,
        ),
        (
            ChampionRule("tclassify", "max"),
            [{"tclassify": 0.9}, {"tclassify": 0.95}, {"tclassify": 0.95}],
            1,
        ),  # tie: earlier
        (ChampionRule("mae", "min"), [{"mae": 2.0}, {"mae": float("nan")}, {"mae": 1.5}], 2),  # NaN ranks last
        # conditions in turn: within 0.1 of the best a (0.9, 0.85), then within 0.05 of the best b among those
        (
            ChampionRule("c", "max", (("a", "max", 0.1), ("b", "min", 0.05))),
            [{"a": 0.9, "b": 0.5, "c": 0.1}, {"a": 0.85, "b": 0.3, "c": 0.2}, {"a": 0.5, "b": 0.0, "c": 0.9}],
            1,
        ),
    ],
)
def test_the_champion_rule_picks_the_best_among_the_candidates_near_the_best_on_the_others(rule, scores, chosen):
    assert rule.choose(scores) == chosen


def test_a_rule_with_a_condition_keeps_the_champion_that_a_better_ranked_but_worse_conditioned_model_challenges(
    empty_store,
):
    """The alias moves by the sweep's rule on test scores: higher T-Classify is not enough when zero-shot fell."""
    client = MlflowClient(empty_store)
    tclassify, zeroshot = score_tag("aaaa", "tclassify"), score_tag("aaaa", "zeroshot")
    first = add_version(client, {tclassify: 0.90, zeroshot: 0.75})
    rule = TCLASSIFY_NEAR_BEST_ZEROSHOT
    assert promote_champion(client, MODEL, first, "aaaa", rule, never_scored) == (True, None)
    lost_zeroshot = add_version(client, {tclassify: 0.97, zeroshot: 0.72})
    before = {"tclassify": 0.90, "zeroshot": 0.75}
    assert promote_champion(client, MODEL, lost_zeroshot, "aaaa", rule, never_scored) == (False, before)
    kept_zeroshot = add_version(client, {tclassify: 0.93, zeroshot: 0.745})
    assert promote_champion(client, MODEL, kept_zeroshot, "aaaa", rule, never_scored) == (True, before)
    assert champion(client, MODEL) == kept_zeroshot


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
