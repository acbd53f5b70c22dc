"""Model cards: the registered model's description (what it does, how to predict) and each version's (its data,
changed settings, test results, sweep standing, command), read back from the registry after a job registers."""

from __future__ import annotations

import re
import shlex
import sys

import pytest
from mlflow.tracking import MlflowClient

from cliptime import job, pipeline
from cliptime.convert import write_generated_shards
from cliptime.pipeline import PreparedData
from cliptime.registry import (
    DESCRIPTION_LIMIT,
    Card,
    ChampionRule,
    SweepFacts,
    model_description,
    version_description,
)
from tests.toy_task import ToyConfig, ToyTask


def card_of(task: ToyTask, **changes) -> Card:
    """A card of a toy model, as a registration would make it, without training one."""
    data = PreparedData(task, {}, {"train": 512, "val": 128, "test": 128}, "f1f2f3f4f5f6f7f8")
    tc = ToyTask.train_config(epochs=5)
    made = {"metrics": {"test/accuracy": 0.93751, "test/loss": 0.2}, "run_name": "toy-1", "command": "python a.py"}
    return Card(data, tc, **{**made, **changes})


def command_block(text: str) -> str:
    """The card's command, as its code block shows it."""
    return re.search(r"### Command\n\n```\n(.*?)\n```", text, re.DOTALL).group(1)


def shell_words(text: str) -> list[str]:
    """The words a shell reads from the card's command (a backslash before a line's end continues the line)."""
    return shlex.split(command_block(text).replace("\\\n", ""))


def test_a_card_names_the_generated_data_the_changed_settings_and_the_scores():
    text = version_description(ToyTask(ToyConfig(hidden=8)), "3", "abc123", card_of(ToyTask(ToyConfig(hidden=8))))
    assert "**`test/accuracy` = 0.9375**" in text  # the task's monitor, the headline
    assert "\nloss                0.2000\n" in text  # the other test metrics, in an aligned table
    assert "Rows: train 512 · val 128 · test 128" in text and "`f1f2f3f4f5f6f7f8`" in text
    assert "- `task.hidden`: `8` (default `16`)" in text and "- `train.epochs`: `5` (default `3`)" in text
    assert "task.rows" not in text and "train.lr" not in text  # unchanged settings are not listed
    assert text.startswith("Toy version 3: test/accuracy 0.9375 on test data f1f2f3f4f5f6f7f8, trained by run toy-1.")
    assert "Its MLflow run (`abc123`, the *Source Run* link on this page) holds" in text
    assert "### Sweep" not in text


def test_a_baselines_scores_stand_beside_the_models():
    task = ToyTask(ToyConfig())
    card = card_of(task, metrics={"test/accuracy": 0.9, "test/loss": 0.2, "baseline/test/accuracy": 0.6})
    text = version_description(task, "1", "abc", card)
    assert "**`test/accuracy` = 0.9000** (baseline: 0.6000)" in text
    assert "other test metrics  value   baseline\nloss                0.2000  -\n" in text


ACCURACY = ChampionRule("accuracy", "max")


@pytest.mark.parametrize(
    ("facts", "told"),
    [
        (SweepFacts("sweep-toy-1", ACCURACY, 4, "2", {"accuracy": 0.95}, False), "version 2, `test/accuracy` = 0.9500"),
        (SweepFacts("sweep-toy-1", ACCURACY, 4, None, None, True), "none: this sweep's model is the first"),
        (SweepFacts("sweep-toy-1", ACCURACY, 4), "not decided yet"),
    ],
)
def test_a_sweeps_card_tells_the_champion_before_and_whether_it_took_the_alias(facts, told):
    text = version_description(ToyTask(ToyConfig()), "3", "abc123", card_of(ToyTask(ToyConfig()), sweep=facts))
    assert "Of 4 trials of sweep `sweep-toy-1`, the best `val/accuracy` (max); the alias" in text
    assert told in text
    became = {True: "Became champion: yes", False: "Became champion: no", None: "Became champion: not decided"}
    assert became[facts.became_champion] in text


def test_a_long_command_is_shown_in_lines_a_shell_runs_alike():
    command = "python jobs/tune.py " + " ".join(f"--flag-{i} 'a value {i}'" for i in range(12))
    text = version_description(ToyTask(ToyConfig()), "1", "abc", card_of(ToyTask(ToyConfig()), command=command))
    lines = command_block(text).splitlines()
    assert len(lines) > 1 and max(len(line) for line in lines) <= 90
    assert shell_words(text) == shlex.split(command)


def test_a_card_too_long_for_mlflow_is_cut_and_says_so():
    """MLflow's SQL stores hold 5000 characters of a description: a card never goes over them."""
    long = card_of(ToyTask(ToyConfig()), command=" ".join(["x" * 80] * 80))
    text = version_description(ToyTask(ToyConfig()), "1", "abc", long)
    assert len(text) == DESCRIPTION_LIMIT and text.endswith("the source run holds every setting and metric)")


def test_the_model_description_says_what_the_model_does_and_how_to_predict():
    text = model_description(ToyTask(ToyConfig()), ["x"], ["label"])
    assert ToyTask.summary in text
    assert "pyfunc input columns: `x`; output columns: `label`." in text
    assert "python jobs/predict.py models:/toy@champion FILE" in text and "(.npy)" in text
    assert "python jobs/serve.py models:/toy@champion" in text
    assert 'mlflow.pyfunc.load_model("models:/toy@champion")' in text


def test_a_tasks_own_predict_flags_are_in_its_model_description():
    from cliptime.tasks import TASKS

    text = model_description(TASKS["tclap"](TASKS["tclap"].Config()), ["audio", "caption"], ["caption", "score"])
    assert "--order A B" in text and "which plays first?" in text and TASKS["tclap"].summary in text


@pytest.mark.slow
def test_a_registered_version_carries_its_card(ray_session, migrated_store_file, tmp_path, monkeypatch):
    """A toy job on shards, its card read back from the registry: the shards' fingerprint and counts, the
    changed settings only, the headline test metric, the command; and the registered model's description."""
    import shutil

    shutil.copy(migrated_store_file, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    manifest = write_generated_shards(ToyTask(ToyConfig(rows=32)), tmp_path / "shards")["manifest"]
    command = ["jobs/train_toy.py", "--data", str(tmp_path / "shards"), "--hidden", "8", "--epochs", "2"]
    monkeypatch.setattr(sys, "argv", command)
    task = ToyTask(ToyConfig(data=str(tmp_path / "shards"), hidden=8))
    tc = ToyTask.train_config(epochs=2, storage_path=str(tmp_path / "rr"), experiment="test-card")
    result = job.run(task, tc)

    client = MlflowClient(uri)
    text = client.get_model_version("toy", result.model_version).description
    assert f"`{pipeline.test_fingerprint(task)}`" in text
    counts = {split: manifest["splits"][split]["rows"] for split in ("train", "val", "test")}
    assert counts == {"train": 128, "val": 32, "test": 32}
    assert "Rows: train 128 · val 32 · test 32" in text
    assert f"Shards in `{tmp_path / 'shards'}`" in text
    assert "- `task.hidden`: `8` (default `16`)" in text and "- `train.epochs`: `2` (default `3`)" in text
    assert not re.search(r"`(task\.rows|train\.lr|train\.batch_size)`", text)
    assert f"**`test/accuracy` = {result.metrics['test/accuracy']:.4f}**" in text
    assert shell_words(text) == ["python", *command]
    assert f"trained by run {result.run_name}." in text and f"Its MLflow run (`{result.run_id}`" in text

    about = client.get_registered_model("toy").description
    assert ToyTask.summary in about and "python jobs/predict.py models:/toy@champion FILE" in about
