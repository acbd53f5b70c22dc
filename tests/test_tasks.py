"""Tasks are values, built alike by every entry point, and the generic modules name none of them."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cliptime.cli import train_parser
from cliptime.config import TrainConfig, from_namespace
from cliptime.data.sound_events import EVENT_CLASSES
from cliptime.errors import CliptimeError
from cliptime.tasks import ALIASES, TASKS, make_task, task_class, task_ref
from cliptime.tune import SweepSpec
from tests.conftest import ROOT
from tests.toy_task import ToyTask

# An ESC-50-layout collection's manifest: classes of its own, none of them the generator's.
ESC_CLASSES = {"church_bells": "church bells", "dog": "dog", "rain": "rain", "clock_tick": "clock tick"}
ESC_MANIFEST = {"task": "tclap", "source": {"sample_rate": 16000, "clip_seconds": 2.0, "classes": ESC_CLASSES}}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_entry_point_gets_the_same_defaults(name):
    """The job's flags, a sweep with nothing fixed or searched, and the task's own presets agree."""
    cls = TASKS[name]
    job = from_namespace(TrainConfig, train_parser(name).parse_args([]))
    _, sweep = SweepSpec(name, cls.monitor, "max", 1, 1, 0, {"type": "fifo"}).settings({}, job.storage_path, "")
    preset = cls.train_config()
    assert job == preset == dataclasses.replace(sweep, experiment=job.experiment)
    assert all(getattr(preset, k) == v for k, v in cls.train_defaults.items())
    assert from_namespace(cls.Config, train_parser(name).parse_args([])) == cls.Config()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_a_task_is_a_value(name):
    task = make_task(name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.cfg.data = "elsewhere"
    changed = task.replace(data="elsewhere")
    assert changed.cfg.data == "elsewhere" and task.cfg.data == ""
    assert make_task(task_ref(task), dataclasses.asdict(task.cfg)).cfg == task.cfg  # rebuilt as a worker does


def test_cliptime_takes_its_time_range_from_the_shards():
    task = make_task("cliptime").resolved({"source": {"hours": [0.0, 24.0]}})
    assert task.cfg.hours == (0.0, 24.0)
    assert make_task("cliptime", dataclasses.asdict(task.cfg)).cfg.hours == (0.0, 24.0)


def test_tclap_takes_its_classes_from_the_shards_wherever_it_is_rebuilt():
    task = make_task("tclap", {"data": "/shards"}).resolved(ESC_MANIFEST)
    rebuilt = make_task(task_ref(task), dataclasses.asdict(task.cfg))  # what Ray workers and the test run see
    assert rebuilt.event_classes == ESC_CLASSES and rebuilt.preprocessor().classes == list(ESC_CLASSES)
    assert rebuilt.baseline().event_classes == ESC_CLASSES
    assert make_task("tclap").event_classes == {k: v[0] for k, v in EVENT_CLASSES.items()}  # generated data


def test_tclap_shards_for_another_rate_are_named():
    manifest = {"source": {**ESC_MANIFEST["source"], "sample_rate": 48000}}
    with pytest.raises(CliptimeError, match="sampled at 48000 Hz"):
        make_task("tclap", {"data": "/shards"}).resolved(manifest)


class LabelEcho(nn.Module):
    """A stand-in CLAP that knows every answer: a clip embeds as the one-hot of the caption label of its event
    (carried in its first sample), a text as the one-hot of itself among the known labels."""

    def __init__(self, labels: list[str]):
        super().__init__()
        self.labels = labels
        self.unused = nn.Parameter(torch.zeros(1))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.labels.index(t) if t in self.labels else 0 for t in texts])

    def forward(self, audio, *token_batches):
        """(clip embeddings or None, one text embedding per token batch..., logit scale), as CLAPEncoder."""
        n = len(self.labels)
        texts = [F.one_hot(t if t.dim() == 1 else t[:, 0], n).float() for t in token_batches]
        clip = None if audio is None else F.one_hot(audio[:, 0].long(), n).float()
        return (clip, *texts, torch.tensor(1.0))


def test_zero_shot_is_scored_against_the_shards_own_classes():
    """On an ESC-50-layout data set a perfect model scores 1.0, also in a task rebuilt from its config (the
    remote test evaluation); scored against the generator's twelve labels it would score a quarter."""
    task = make_task(task_ref(TASKS["tclap"]), dataclasses.asdict(make_task("tclap").resolved(ESC_MANIFEST).cfg))
    labels = list(ESC_CLASSES.values()) + [v[0] for v in EVENT_CLASSES.values()]
    firsts = np.array(list(ESC_CLASSES) * 2, dtype=object)
    rows = {
        "audio": np.array([b"\0\0" * 32000] * len(firsts), dtype=object),
        "sample_rate": np.full(len(firsts), 16000),
        "caption": firsts,
        "negative": np.array([""] * len(firsts), dtype=object),
        "first": firsts,
        "second": np.array([""] * len(firsts), dtype=object),
        "pair": np.full(len(firsts), -1),
    }
    batch = {k: torch.as_tensor(v) for k, v in task.preprocessor()(rows).items()}
    batch["tokens"] = batch["neg_tokens"] = torch.tensor([labels.index(ESC_CLASSES[c]) for c in firsts])[:, None]
    batch["audio"][:, 0] = batch["tokens"][:, 0].float()
    metrics, _ = task.evaluate(LabelEcho(labels), [batch])
    assert metrics["zeroshot_accuracy"] == 1.0
    generator_classes = task.replace(classes={})
    metrics, _ = generator_classes.evaluate(LabelEcho(labels), [batch])
    assert metrics["zeroshot_accuracy"] == pytest.approx(0.25)


def generic_modules() -> list[Path]:
    package = ROOT / "cliptime"
    return [p for p in package.glob("*.py") if p.name not in ("__init__.py",)]


@pytest.mark.parametrize("path", generic_modules(), ids=lambda p: p.name)
def test_generic_modules_name_no_task(path):
    """A third task is one module under tasks/: no generic module spells a task's name, alias or converter."""
    names = {*TASKS, *ALIASES, *(kind for cls in TASKS.values() for kind in cls.converters)}
    names |= {cls.title for cls in TASKS.values()} | {cls.__name__ for cls in TASKS.values()}
    names.discard("cliptime")  # also the project's name: its package, its default MLflow experiment
    strings = {node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)} | {
        node.id for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Name)
    }
    assert not names & strings, f"{path.name} names {sorted(names & strings)}"


def test_make_shards_shows_only_data_flags(capsys):
    from cliptime.cli import make_shards_main

    with pytest.raises(SystemExit):
        make_shards_main(["cliptime", "--help"])
    shown = capsys.readouterr().out
    assert "--sequences" in shown and "--templates" in shown
    assert "--fusion" not in shown and "--cls-weight" not in shown and "--epochs" not in shown


def test_old_names_still_work():
    assert task_class("fungal") is TASKS["cliptime"] and task_class("sounds") is TASKS["tclap"]
    assert task_class("tests.toy_task:ToyTask") is ToyTask and task_ref(ToyTask) == "tests.toy_task:ToyTask"
    with pytest.raises(CliptimeError, match="unknown task 'video'"):
        task_class("video")


def test_decoding_tokenizes_each_distinct_caption_once_and_keeps_the_rows_in_order():
    """Captions from templates repeat within a decode batch; each distinct one is tokenized once, and every row
    gets its own caption's ids (the task's real tokenizers: CLIPTime's open_clip one, T-CLAP's CLIP BPE)."""
    from cliptime.models.clap import tokenize as clap_tokenize
    from cliptime.models.open_clip_backbone import tokenizer_for
    from cliptime.tasks.base import tokenize_distinct

    calls = []

    def spelled(texts):
        calls.append(list(texts))
        return torch.tensor([[len(t), ord(t[0])] for t in texts])

    captions = np.array(["b spore", "a hypha", "b spore", "c", "a hypha"], dtype=object)
    assert tokenize_distinct(spelled, captions).tolist() == [[7, 98], [7, 97], [7, 98], [1, 99], [7, 97]]
    assert calls == [["a hypha", "b spore", "c"]]
    cliptime_tokens = tokenizer_for(make_task("cliptime").cfg.model)
    assert np.array_equal(tokenize_distinct(cliptime_tokens, captions), cliptime_tokens(list(captions)).numpy())
    tclap = make_task("tclap").preprocessor()
    expected = clap_tokenize(list(captions), "transformer", tclap.encoder_args["context_length"]).numpy()
    assert tclap.encoder_args["text_model"] == "transformer" and np.array_equal(tclap.tokenize(captions), expected)
