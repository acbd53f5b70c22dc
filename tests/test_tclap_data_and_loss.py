import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from cliptime.data.order_phrases import HELDOUT_PATTERNS, HELDOUT_PHRASES, TRAIN_PATTERNS, TRAIN_PHRASES, reversal
from cliptime.data.sound_events import EVENT_CLASSES, ORDER_TEMPLATES, from_pcm16, generate_block
from cliptime.errors import CliptimeError
from cliptime.tasks import make_task
from cliptime.tasks.tclap import TCLAPTask, contrastive_loss, heldout_phrasing, retrieval, tclassify, temporal_loss

KW = dict(pairs=6, singles=4, sample_rate=16000, clip_seconds=2.0, gap_seconds=(0.0, 0.15), template_set="rich")


def test_generator_is_deterministic_and_fits_the_schema():
    a = generate_block(1, "train", 0, **KW)
    assert a == generate_block(1, "train", 0, **KW)
    assert a["audio"][0] != generate_block(2, "train", 0, **KW)["audio"][0]
    table = pa.table(a, schema=TCLAPTask.schema)
    assert table.num_rows == 2 * 6 + 4
    for data in a["audio"]:
        x = from_pcm16(data)
        assert x.shape == (32000,) and np.abs(x).max() <= 1.0 and np.abs(x).max() > 0.05


def test_held_out_instances_differ_from_training_ones():
    train, test = generate_block(0, "train", 0, **KW), generate_block(0, "test", 0, **KW)
    assert not set(train["audio"]) & set(test["audio"])


@pytest.mark.parametrize("template_set", ["rich", "grammar"])
def test_negative_is_exactly_the_reversed_order(template_set):
    cols = generate_block(0, "val", 3, **{**KW, "template_set": template_set})
    labels = {k: v[0] for k, v in EVENT_CLASSES.items()}
    by_pair = {}
    for i, pair in enumerate(cols["pair"]):
        if pair >= 0:
            by_pair.setdefault(pair, []).append(i)
    assert len(by_pair) == 6
    for i, j in by_pair.values():
        assert (cols["first"][i], cols["second"][i]) == (cols["second"][j], cols["first"][j])
        for k in (i, j):
            first, second = labels[cols["first"][k]], labels[cols["second"][k]]
            template = next(
                t for t in ORDER_TEMPLATES[template_set] if t.format(first=first, second=second) == cols["caption"][k]
            )
            assert cols["negative"][k] == template.format(first=second, second=first)
        assert cols["negative"][i] == cols["caption"][j] and cols["negative"][j] == cols["caption"][i]
    singles = [i for i, p in enumerate(cols["pair"]) if p < 0]
    assert len(singles) == 4 and all(cols["negative"][i] == "" and cols["second"][i] == "" for i in singles)


def test_the_phrase_grammar_says_the_order_many_ways_and_holds_some_out():
    assert (len(TRAIN_PATTERNS), len(TRAIN_PHRASES), len(HELDOUT_PATTERNS), len(HELDOUT_PHRASES)) == (16, 246, 8, 116)
    trained = [phrase for phrases in ORDER_TEMPLATES.values() for phrase in phrases]  # every template set
    assert not set(trained) & set(HELDOUT_PHRASES)
    assert all(h not in t for h in HELDOUT_PATTERNS for t in trained)  # no held-out pattern inside a phrase
    for phrase in TRAIN_PHRASES + HELDOUT_PHRASES:
        caption, negative = reversal(phrase, "a bell", "knocking")
        assert caption != negative and caption.count("a bell") == caption.count("knocking") == 1
        assert sorted(re.findall(r"\w+", caption)) == sorted(re.findall(r"\w+", negative))  # the same words
        assert reversal(phrase, "knocking", "a bell") == (negative, caption)


class TextTable(torch.nn.Module):
    """A stand-in CLAP whose text embeddings are looked up in a table (an unknown text embeds to zeros)."""

    def __init__(self, table: dict[str, torch.Tensor]):
        super().__init__()
        self.table, self.texts, self.weight = table, [], torch.nn.Parameter(torch.zeros(1))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        self.texts += texts
        return torch.arange(len(self.texts) - len(texts), len(self.texts))

    def forward(self, audio, *token_batches):
        embed = [torch.stack([self.table.get(self.texts[i], torch.zeros(2)) for i in t]) for t in token_batches]
        return (None, *embed, None)


def test_heldout_phrasing_scores_each_clip_against_its_own_reversed_caption():
    """Two pairs of mixed clips and a single: a text model that gives the held-out caption of each clip's true
    order the clip's own embedding scores 1 both ways; one that gives it to the reversed caption scores 0."""
    first, second = torch.tensor([0, 1, 0, 1, 0]), torch.tensor([1, 0, 1, 0, -1])
    pair, mixed = torch.tensor([0, 0, 1, 1, -1]), second >= 0
    audio = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = ["a bell", "knocking"]
    for right in (True, False):
        table = {}
        for i in range(4):
            caption, negative = reversal(HELDOUT_PHRASES[int(pair[i])], labels[first[i]], labels[second[i]])
            table[caption if right else negative] = audio[i]
        pos, neg = heldout_phrasing(TextTable(table), labels, first, second, pair, mixed, 2)
        assert not pos[4].any() and not neg[4].any()  # a single-event clip has no order to tell
        expected = 1.0 if right else 0.0
        assert tclassify(audio, pos, neg, pair, mixed) == {"tclassify_a2t": expected, "tclassify_t2a": expected}


def test_train_transform_scales_each_clip_by_its_own_gain_and_keeps_the_rest():
    task = make_task("tclap", {})
    audio = torch.ones(256, 100)
    batch = {"audio": audio, "key": torch.arange(256)}
    out = task.train_transform(batch)
    gain_db = 20 * torch.log10(out["audio"][:, 0])
    assert torch.equal(out["audio"], out["audio"][:, :1].expand(-1, 100))  # one gain per clip
    assert gain_db.min() >= -6.0 - 1e-4 and gain_db.max() <= 3.0 + 1e-4 and gain_db.std() > 1.0
    assert out["key"] is batch["key"] and torch.equal(audio, torch.ones(256, 100))  # the input is left as it was


def test_temporal_loss_falls_when_the_positive_caption_is_closer():
    audio = F.normalize(torch.tensor([[1.0, 0.0, 0.0]]), dim=-1)
    pos_far, pos_near = F.normalize(torch.tensor([[0.2, 1.0, 0.0]]), dim=-1), audio.clone()
    neg = F.normalize(torch.tensor([[0.5, 0.0, 1.0]]), dim=-1)
    scale, mixed = torch.tensor(10.0), torch.ones(1)
    far = temporal_loss(audio, pos_far, neg, scale, mixed)
    near = temporal_loss(audio, pos_near, neg, scale, mixed)
    assert near < far
    # equal similarity to both captions: the two-way softmax gives log 2
    assert torch.isclose(temporal_loss(audio, neg, neg, scale, mixed), torch.log(torch.tensor(2.0)))
    # single-event clips (mixed = 0) do not count
    assert temporal_loss(audio, pos_far, neg, scale, torch.zeros(1)) == 0


def test_temporal_loss_joins_after_the_contrastive_only_epochs():
    from tests.test_task_models import BATCHES

    task = make_task("tclap", {"temporal_start": 0.25})
    model = task.build_model().eval()  # no SpecAugment: the same embeddings in every call
    batch = BATCHES["tclap"](torch.Generator().manual_seed(0))
    full, parts = task.loss(model, batch)  # outside the training loop: the whole loss
    assert torch.isclose(full, parts["contrastive_loss"] + 0.5 * parts["temporal_loss"])
    for epoch, joined in ((0, False), (1, False), (2, True), (7, True)):  # round(0.25 * 8) = 2 epochs without
        loss, parts = task.loss(model, batch, epoch, 8)
        assert torch.isclose(loss, full if joined else parts["contrastive_loss"]), epoch
        assert parts["temporal_loss"] > 0  # still logged while it does not count
    assert torch.isclose(task.loss(model, batch)[0], full)  # a pure function of (epoch, epochs): nothing stuck


def test_order_features_follow_the_order_of_events_not_their_place_in_the_clip():
    from cliptime.models.clap import order_features

    frames_n, hop = 16, 100
    rng = np.random.default_rng(0)
    event_a, event_b = rng.normal(0, 1, 2 * hop), rng.normal(0, 1, 3 * hop) * 0.5

    def clip(events, start):
        """Audio with `events` back to back from frame `start`, and frames that are each its frame's samples'
        energy in two bands (a stand-in for an encoder whose frames see their own part of the clip)."""
        audio = np.zeros(frames_n * hop)
        at = start * hop
        for e in events:
            audio[at : at + len(e)] = e
            at += len(e)
        chunks = audio.reshape(frames_n, hop)
        frames = np.stack([(chunks[:, ::2] ** 2).mean(1), (chunks[:, 1::2] ** 2).mean(1)], 1)
        return torch.tensor(frames, dtype=torch.float32)[None], torch.tensor(audio, dtype=torch.float32)[None]

    early, late = order_features(*clip([event_a], 1)), order_features(*clip([event_a], 11))
    assert torch.allclose(early, late, atol=1e-5)  # a single event: the same wherever it sits
    ab, ba = order_features(*clip([event_a, event_b], 2)), order_features(*clip([event_b, event_a], 2))
    assert not torch.allclose(ab, ba, atol=1e-3)
    assert torch.allclose(ab, order_features(*clip([event_a, event_b], 9)), atol=1e-5)


def test_contrastive_loss_prefers_aligned_pairs_and_treats_equal_keys_as_positives():
    eye = torch.eye(4)
    keys = torch.arange(4)
    aligned = contrastive_loss(eye, eye, keys, torch.tensor(10.0))
    shuffled = contrastive_loss(eye, eye[[1, 0, 3, 2]], keys, torch.tensor(10.0))
    assert aligned < shuffled
    # two clips of the same events: either caption is right, so swapping them costs nothing
    same = torch.tensor([0, 0, 2, 3])
    assert torch.isclose(
        contrastive_loss(eye, eye[[1, 0, 2, 3]], same, torch.tensor(10.0)),
        contrastive_loss(eye, eye, same, torch.tensor(10.0)),
    )


def test_tclassify_and_retrieval_on_hand_made_embeddings():
    audio = torch.eye(4)
    pos, neg = torch.eye(4), torch.eye(4)[[1, 0, 3, 2]] * 0.5
    pair, mixed = torch.tensor([0, 0, 1, 1]), torch.ones(4, dtype=torch.bool)
    assert tclassify(audio, pos, neg, pair, mixed) == {"tclassify_a2t": 1.0, "tclassify_t2a": 1.0}
    r = retrieval(audio, pos, torch.arange(4), torch.arange(4))
    assert r["a2t_R1"] == 1.0 and r["t2a_R1"] == 1.0
    r = retrieval(audio, pos[[1, 0, 2, 3]], torch.arange(4), torch.arange(4))
    assert r["a2t_R1"] == 0.5 and r["a2t_R5"] == 1.0


@pytest.mark.parametrize(
    "config,named",
    [
        ({"templates": "limerick"}, "limerick"),
        ({"pretrained": "/no/such/630k-audioset-best.pt"}, "/no/such/630k-audioset-best.pt"),
        ({"audio_model": "Cnn99"}, "Cnn99"),
        ({"temporal_weight": -1.0}, "--lambda"),
        ({"temporal_start": 1.0}, "--temporal-start"),
    ],
)
def test_bad_settings_are_named(config, named):
    with pytest.raises(CliptimeError, match=named.replace(".", r"\.").replace("-", r"\-")):
        make_task("tclap", config).check()


def test_wrong_sample_rate_in_shards_is_named():
    cols = generate_block(0, "train", 0, **{**KW, "pairs": 1, "singles": 0})
    batch = {k: np.array(v, dtype=object if isinstance(v[0], (bytes, str)) else None) for k, v in cols.items()}
    prep = make_task("tclap").preprocessor()
    assert prep(dict(batch))["audio"].shape == (2, 32000)
    with pytest.raises(CliptimeError, match="48000 Hz, the model takes 16000 Hz"):
        prep({**batch, "sample_rate": np.array([48000, 48000])})


def test_prediction_input_nan_audio_and_non_audio_are_named():
    import io

    import pandas as pd
    import soundfile as sf

    task = make_task("tclap")
    model = task.build_model()
    buf = io.BytesIO()
    sf.write(buf, np.full(16000, np.nan, dtype=np.float32), 16000, format="WAV", subtype="FLOAT")
    with pytest.raises(CliptimeError, match="NaN"):
        task.predict(model, pd.DataFrame({"audio": [buf.getvalue()], "caption": ["knocking"]}))
    with pytest.raises(CliptimeError, match="not a readable audio file"):
        task.predict(model, pd.DataFrame({"audio": [b"GIF89a not audio"], "caption": ["knocking"]}))
    # another sample rate is resampled, not refused
    buf = io.BytesIO()
    sf.write(buf, np.zeros(44100, dtype=np.float32), 44100, format="WAV")
    out = task.predict(model, pd.DataFrame({"audio": [buf.getvalue()], "caption": ["knocking"]}))
    assert len(out) == 1 and np.isfinite(out["score"]).all()


def test_offline_loader_never_touches_the_network():
    """Build, tokenize and run the CLAP model in a fresh process whose sockets all refuse to connect."""
    code = """
import socket
def refuse(*args, **kwargs):
    raise SystemExit(f"network access attempted: {args}")
socket.socket.connect = refuse
socket.create_connection = refuse
import torch
from cliptime.tasks import make_task
task = make_task("tclap")
task.check()
model = task.build_model().eval()
audio, text, scale = model(torch.zeros(2, 32000), model.tokenize(["a rising whistle", "knocking"]))
assert audio.shape == text.shape == (2, 256)
print("offline ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "offline ok" in proc.stdout, proc.stderr[-3000:]
