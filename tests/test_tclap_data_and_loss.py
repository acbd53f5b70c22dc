import hashlib
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from cliptime.data.order_phrases import (
    HELDOUT_PATTERNS,
    HELDOUT_PHRASES,
    SIMULTANEOUS_PHRASES,
    TRAIN_PATTERNS,
    TRAIN_PHRASES,
    reversal,
)
from cliptime.data.sound_events import (
    EVENT_CLASSES,
    ORDER_TEMPLATES,
    SHORT_GAP,
    ClipWriter,
    from_pcm16,
    generate_block,
    place,
)
from cliptime.errors import CliptimeError
from cliptime.tasks import make_task
from cliptime.tasks.tclap import (
    TCLAPTask,
    contrastive_keys,
    contrastive_loss,
    heldout_phrasing,
    rephrased,
    retrieval,
    reversed_audio_loss,
    tclassify,
    temporal_loss,
)

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


def test_seams_gap_makes_the_data_made_before_seam_control():
    """Shards on disk stay reproducible. Captions and classes, not audio bytes, are pinned (float rounding may
    differ between machines): any change in the random draws moves them."""
    cols = generate_block(0, "train", 1, **KW, seams="gap")
    text = "\n".join(cols["caption"] + cols["negative"] + cols["first"] + cols["second"] + list(map(str, cols["pair"])))
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == "9cfbc889848b5d2c"


def loud(x: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.abs(x) > 0.2)


def test_a_negative_gap_crossfades_and_no_gap_butts_the_events():
    a, b = np.full(800, 0.5), np.full(600, 0.4)
    rng = np.random.default_rng(0)
    for gap in (-160, 0):  # no silent stretch between the events: one loud run, shortened by the overlap
        x = place([a, b], 4000, 100, gap, rng)
        assert np.array_equal(loud(x), np.arange(100, 100 + 1400 + gap)), gap
        assert np.abs(x).max() < 0.5 * np.sqrt(2) + 0.01  # equal-power fades: the overlap does not jump in level
    x = place([a, b], 4000, 100, 200, rng)
    assert np.array_equal(loud(x), np.r_[100:900, 1100:1700])  # a silent gap of 200 samples


@pytest.mark.parametrize("seams", ["mixed", "gap"])
def test_both_orders_of_a_pair_share_a_join_that_varies_from_pair_to_pair(seams):
    """Equal-length constant events: the loud stretches of the A-B and the B-A clip coincide exactly when they
    share lead-in and join; the join's kind shows in the loud run's length."""
    writer = ClipWriter(16000, 6000, "basic", {"bell": "a bell", "knock": "knocking"}, seams)
    a, b, n = np.full(1000, 0.5), np.full(1000, 0.4), 1000
    rng = np.random.default_rng(0)
    for pair in range(30):
        writer.add_pair("bell", "knock", a, b, pair, (0.0, 0.0), rng)
    kinds = []
    for k in range(0, 60, 2):
        ab, ba = (loud(from_pcm16(writer.columns["audio"][i])) for i in (k, k + 1))
        assert np.array_equal(ab, ba)
        span = ab[-1] - ab[0] + 1
        if span < 2 * n:
            kinds.append("crossfade")
            assert len(ab) == span and 2 * n - span >= 0.02 * 16000 - 1
        elif span == 2 * n:
            kinds.append("butt")
        else:
            kinds.append("gap")
            assert len(ab) == 2 * n and SHORT_GAP[0] * 16000 - 1 <= span - 2 * n <= SHORT_GAP[1] * 16000
    assert set(kinds) == ({"crossfade", "butt", "gap"} if seams == "mixed" else {"butt"})  # "gap": --gap 0 0


def test_overlapping_clips_sound_both_events_at_once_and_are_not_their_order():
    cols = generate_block(0, "train", 0, **{**KW, "simultaneous": 1.0})
    labels = {k: v[0] for k, v in EVENT_CLASSES.items()}
    overlap = [i for i, p in enumerate(cols["pair"]) if p < -1]
    assert len(overlap) == 6 and len({cols["pair"][i] for i in overlap}) == 6  # one row each, an id of its own
    for i in overlap:
        first, second = labels[cols["first"][i]], labels[cols["second"][i]]
        assert cols["caption"][i] in {p.format(first=first, second=second) for p in SIMULTANEOUS_PHRASES}
        ordered = {
            t.format(first=x, second=y) for t in ORDER_TEMPLATES["rich"] for x, y in ((first, second), (second, first))
        }
        assert cols["negative"][i] in ordered
    # half of them: both kinds, no id shared between an ordered pair and an overlapping clip
    cols = generate_block(0, "train", 0, **{**KW, "simultaneous": 0.5})
    ids = [p for p in cols["pair"] if p != -1]
    assert min(ids) < -1 < 0 <= max(ids) and all(ids.count(p) == (2 if p >= 0 else 1) for p in ids)
    # evaluation keeps T-Classify's A-B/B-A pairs only
    for split in ("val", "test"):
        cols = generate_block(0, split, 0, **{**KW, "simultaneous": 1.0})
        assert min(cols["pair"]) == -1 and sorted(cols["pair"]).count(0) == 2


def test_an_overlapping_clip_holds_both_events_in_one_window():
    writer = ClipWriter(16000, 8000, "basic", {"bell": "a bell", "buzz": "a low buzz"})
    t = np.arange(4000) / 16000
    a, b = 0.8 * np.sin(2 * np.pi * 500 * t), 0.8 * np.sin(2 * np.pi * 3000 * t[:3000])
    writer.add_overlap("bell", "buzz", a, b, -2, np.random.default_rng(0))
    x = from_pcm16(writer.columns["audio"][0])
    start = loud(x)[0]
    spectrum = np.abs(np.fft.rfft(x[start + 500 : start + 2100]))  # 0.1 s: 10-Hz bins
    assert spectrum[50] > 20 * np.median(spectrum) and spectrum[300] > 20 * np.median(spectrum)
    assert np.abs(x).max() <= 1.0 and np.abs(x).max() > 0.9  # scaled to fit, not clipped
    assert (writer.columns["first"], writer.columns["second"], writer.columns["pair"]) == (["bell"], ["buzz"], [-2])
    assert writer.columns["caption"][0].startswith("a bell") and writer.columns["negative"][0] != ""


def test_overlapping_clips_are_positives_of_their_own_kind_only():
    # an A-B clip, an overlapping A+B clip, a B+A one, a single event, a free-text caption (keyed by its recording)
    first, second = np.array([0, 0, 1, 2, -1]), np.array([1, 1, 0, -1, -1])
    pair, clip = np.array([4, -2, -3, -1, -1]), np.array([7, 8, 9, 10, 12345])
    keys = contrastive_keys(first, second, pair, clip, classes=12)
    ordered = [0 * 13 + 1 + 1, 2 * 13 - 1 + 1, 12345]  # first * (classes + 1) + second + 1; free text: its clip
    assert keys[1] == keys[2] and keys[1] not in (*ordered, 1 * 13 + 0 + 1)
    assert keys[[0, 3, 4]].tolist() == ordered


def test_reversed_audio_loss_prefers_each_caption_s_own_clip_over_the_reversed_ones():
    """Rows: A-B and B-A of pair 0, a single event, an overlapping clip."""
    audio = F.normalize(torch.tensor([[1.0, 0.2, 0.0], [0.2, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]), dim=-1)
    pair, first, second = torch.tensor([0, 0, -1, -2]), torch.tensor([0, 1, 2, 0]), torch.tensor([1, 0, -1, 1])
    scale = torch.tensor(10.0)
    near = reversed_audio_loss(audio, audio, pair, first, second, scale)  # each caption embeds as its own clip
    far = reversed_audio_loss(audio, audio[[1, 0, 2, 3]], pair, first, second, scale)  # ... as its partner's
    tie = reversed_audio_loss(audio, torch.ones(4, 3), pair, first, second, scale)
    assert near < torch.log(torch.tensor(2.0)) < far and torch.isclose(tie, torch.log(torch.tensor(2.0)))
    # the rows without a partner do not count: the pair's two rows alone give the same loss
    assert torch.isclose(near, reversed_audio_loss(audio[:2], audio[:2], pair[:2], first[:2], second[:2], scale))
    # no B-A clip in the batch (other classes, or the same order): exactly 0, and backward still works
    text = audio.clone().requires_grad_()
    alone = reversed_audio_loss(audio, text, pair, first, torch.tensor([1, 2, -1, 1]), scale)
    same_order = reversed_audio_loss(audio, text, pair, torch.tensor([0, 0, 2, 0]), torch.tensor([1, 1, -1, 1]), scale)
    assert alone.item() == 0 and same_order.item() == 0
    (alone + same_order).backward()
    assert not text.grad.any()
    # gradients reach the paired rows' captions and both clips, nothing else
    audio, text = audio.clone().requires_grad_(), audio[[1, 0, 2, 3]].clone().requires_grad_()
    reversed_audio_loss(audio, text, pair, first, second, scale).backward()
    assert text.grad[:2].abs().sum(1).gt(0).all() and not text.grad[2:].any()
    assert audio.grad[:2].abs().sum(1).gt(0).all() and not audio.grad[2:].any()
    # another instance of the two classes in reversed order counts as the partner does: two B-A clips, twice the odds
    two = reversed_audio_loss(
        audio[[0, 1, 1]], audio[[0, 1, 1]], torch.tensor([0, 0, 5]), first[[0, 1, 1]], second[[0, 1, 1]], scale
    )
    one = reversed_audio_loss(audio[:2], audio[:2], pair[:2], first[:2], second[:2], scale)
    assert two > one


def test_the_phrase_grammar_says_the_order_many_ways_and_holds_some_out():
    assert (len(TRAIN_PATTERNS), len(TRAIN_PHRASES), len(HELDOUT_PATTERNS), len(HELDOUT_PHRASES)) == (16, 246, 8, 116)
    trained = [phrase for phrases in (*ORDER_TEMPLATES.values(), SIMULTANEOUS_PHRASES) for phrase in phrases]
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


def test_rephrasing_draws_each_mixed_clip_s_caption_anew_with_its_exact_reversal():
    labels = ["a dog barking", "knocking", "a wailing siren"]
    sets = [
        ("{first} then {second}",),
        ("{second} after {first}", "after {first}, {second}", "{first} precedes {second}"),
    ]
    texts: list[str] = []  # a stand-in tokenizer: a text's ids are its index here, repeated over the context

    def tokenize(batch_texts, context_length):
        for t in batch_texts:
            if t not in texts:
                texts.append(t)
        return torch.tensor([[100 + texts.index(t)] * context_length for t in batch_texts])

    # a mixed pair in both orders, a single event, an overlapping clip, and a mixed clip of other classes
    pair, first, second = torch.tensor([0, 0, -1, -2, 1]), torch.tensor([0, 1, 2, 0, 2]), torch.tensor([1, 0, -1, 1, 0])
    tokens, neg_tokens = torch.arange(5)[:, None].repeat(1, 8), -torch.arange(5)[:, None].repeat(1, 8)
    batch = {"pair": pair, "first": first, "second": second, "tokens": tokens, "neg_tokens": neg_tokens}
    from_first_set = 0
    for _ in range(400):
        out = rephrased(batch, sets, labels, tokenize)
        for k, kept in (("tokens", tokens), ("neg_tokens", neg_tokens)):
            assert torch.equal(out[k][[2, 3]], kept[[2, 3]])  # no order to rephrase
        for row in (0, 1, 4):
            caption, negative = (texts[int(out[k][row, 0]) - 100] for k in ("tokens", "neg_tokens"))
            a, b = labels[first[row]], labels[second[row]]
            assert (caption, negative) in [reversal(p, a, b) for ps in sets for p in ps]
            from_first_set += " then " in caption
    assert torch.equal(batch["tokens"], tokens) and torch.equal(batch["neg_tokens"], neg_tokens)  # input kept
    assert set(texts) >= {reversal(p, labels[0], labels[1])[0] for ps in sets for p in ps}  # every phrasing drawn
    assert 0.45 < from_first_set / 1200 < 0.55  # each set equally likely, however many phrasings it has


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
    assert torch.isclose(
        full, parts["contrastive_loss"] + 0.5 * (parts["temporal_loss"] + parts["reversed_audio_loss"]) / 2
    )  # lambda 0.5 on the mean of the temporal loss's two directions
    assert parts["reversed_audio_loss"] > 0  # the batch holds both orders of pair 0
    for epoch, joined in ((0, False), (1, False), (2, True), (7, True)):  # round(0.25 * 8) = 2 epochs without
        loss, parts = task.loss(model, batch, epoch, 8)
        assert torch.isclose(loss, full if joined else parts["contrastive_loss"]), epoch
        assert parts["temporal_loss"] > 0  # still logged while it does not count
    assert torch.isclose(task.loss(model, batch)[0], full)  # a pure function of (epoch, epochs): nothing stuck


def test_rephrasing_joins_after_its_start_and_changes_the_captions_the_loss_sees(monkeypatch):
    import cliptime.tasks.tclap as tclap
    from tests.test_task_models import BATCHES

    task = make_task("tclap", {"rephrase": "basic+grammar", "rephrase_start": 0.25})
    model = task.build_model().eval()
    batch = BATCHES["tclap"](torch.Generator().manual_seed(0))
    own, _ = make_task("tclap", {}).loss(model, batch, 2, 8)
    redrawn, _ = task.loss(model, batch, 2, 8)  # the real tokenizer, on the batch's mixed pair
    assert torch.isfinite(redrawn) and not torch.isclose(redrawn, own)
    drawn_in = []
    monkeypatch.setattr(tclap, "rephrased", lambda b, sets, *_: drawn_in.append(sets) or b)
    for epoch in range(8):
        task.loss(model, batch, epoch, 8)
    assert len(drawn_in) == 6  # round(0.25 * 8) = 2 epochs on the rows' own captions
    assert drawn_in[0] == [ORDER_TEMPLATES["basic"], ORDER_TEMPLATES["grammar"]]
    make_task("tclap", {}).loss(model, batch, 7, 8)
    assert len(drawn_in) == 6  # the default keeps the rows' captions


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


@pytest.mark.parametrize("seed", range(10))
def test_a_caption_two_recordings_share_ties_with_itself_in_retrieval(seed):
    """Two recordings with the same five caption vectors: each recording's best caption is also the other's copy,
    and ties with it (a2t R@1 = 1). Scored in one matrix product, equal columns can differ in their last bits
    with their places (seed 3 gave R@1 0.5 so on this machine's BLAS)."""
    g = torch.Generator().manual_seed(seed)
    audio = F.normalize(torch.randn(2, 512, generator=g), dim=-1)
    captions = F.normalize(torch.randn(5, 512, generator=g), dim=-1)
    recording = torch.arange(2).repeat_interleave(5)
    assert retrieval(audio[recording], captions.repeat(2, 1), recording, recording)["a2t_R1"] == 1.0


def test_recordings_that_share_their_captions_tie_whatever_batch_each_caption_came_in():
    """Captioned audio where 16 recordings carry the same five captions, in batches of other sizes: each
    recording's best caption is every recording's, and must tie with its copies exactly (a2t R@1 = 1). Embedded in
    the batch it came in, the same caption differs in its last bits from batch to batch, and that noise ranks some
    copies above a recording's own (R@1 0.81)."""
    task = make_task("tclap")
    torch.manual_seed(0)
    model = task.build_model().eval()
    recordings = torch.arange(16).repeat_interleave(5)
    captions = [f"a sound, heard take {i % 5}" for i in range(80)]
    tokens = model.tokenize(captions)
    audio = 0.1 * torch.randn(16, 32000, generator=torch.Generator().manual_seed(1))[recordings]
    none = torch.full((80,), -1)
    rows = {"audio": audio, "tokens": tokens, "neg_tokens": tokens, "first": none, "second": none, "pair": none}
    rows |= {"key": recordings, "clip": recordings, "ordered": torch.zeros(80, dtype=torch.bool)}
    cuts = [0, 7, 30, 33, 80]  # batches of 7, 23, 3 and 47 rows
    batches = [{k: v[a:b] for k, v in rows.items()} for a, b in zip(cuts, cuts[1:])]
    metrics, _ = task.evaluate(model, batches)
    assert metrics["a2t_R1"] == 1.0


@pytest.mark.parametrize(
    "config,named",
    [
        ({"templates": "limerick"}, "limerick"),
        ({"pretrained": "/no/such/630k-audioset-best.pt"}, "/no/such/630k-audioset-best.pt"),
        ({"audio_model": "Cnn99"}, "Cnn99"),
        ({"temporal_weight": -1.0}, "--lambda"),
        ({"temporal_start": 1.0}, "--temporal-start"),
        ({"seams": "splice"}, "--seams"),
        ({"simultaneous": 1.5}, "--simultaneous"),
        ({"rephrase": "basic+limerick"}, "limerick"),
        ({"rephrase": "basic+"}, "--rephrase"),
        ({"rephrase_start": 1.0}, "--rephrase-start"),
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


@pytest.mark.slow
def test_a_pretrained_hugging_face_text_branch_trains_from_the_local_cache(tmp_path):
    """`--text-model roberta` (the text branch of LAION's released checkpoints) on a tiny RoBERTa written into a
    Hugging Face cache: the check passes, the branch loads the cached weights, the data path tokenizes with its
    tokenizer, padding is masked out, the loss reaches the branch, and evaluation runs; `bart` gives every trainable
    parameter a gradient; without the weights in the cache, the check names what is missing. In a fresh process:
    the cache location is read at import."""
    code = f"""
import pathlib
import numpy as np, torch
from tokenizers import ByteLevelBPETokenizer
from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast
from cliptime.data.sound_events import generate_block
from cliptime.errors import CliptimeError
from cliptime.tasks import make_task

def cache_snapshot(name):  # the folder of one cached revision of `name`, laid out as the hub cache does
    repo = pathlib.Path({str(tmp_path)!r}) / "hub" / ("models--" + name.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    return snapshot


def preprocessed(task, cols):
    return task.preprocessor()({{k: np.array(v, dtype=object if isinstance(v[0], (bytes, str)) else None)
                                 for k, v in cols.items()}})


snapshot = cache_snapshot("roberta-base")
bpe = ByteLevelBPETokenizer()
bpe.train_from_iterator(["a rising whistle followed by knocking, then dripping water"] * 5, vocab_size=300,
                        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
bpe.save_model(str(snapshot))
tokenizer = RobertaTokenizerFast(vocab=str(snapshot / "vocab.json"), merges=str(snapshot / "merges.txt"))
assert tokenizer.vocab_size == 300 and tokenizer.pad_token_id == 1
tokenizer.save_pretrained(str(snapshot))
torch.manual_seed(0)
# roberta-base's width (laion_clap's projection is built for 768), one layer
config = RobertaConfig(vocab_size=tokenizer.vocab_size, hidden_size=768, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=40, pad_token_id=tokenizer.pad_token_id)
cached = RobertaModel(config)
cached.save_pretrained(str(snapshot))

task = make_task("tclap", {{"text_model": "roberta", "baseline": False}})
task.check()
model = task.build_model()
branch = model.clap.text_branch
assert type(branch).__name__ == "RobertaModel" and branch.config.num_hidden_layers == 1
assert torch.equal(branch.embeddings.word_embeddings.weight, cached.embeddings.word_embeddings.weight)

kw = dict(sample_rate=16000, clip_seconds=2.0, gap_seconds=(0.0, 0.0), template_set="basic")
cols = generate_block(0, "train", 0, pairs=2, singles=1, **kw)
batch = preprocessed(task, cols)
want = tokenizer(list(cols["caption"]), padding="max_length", truncation=True, max_length=32)["input_ids"]
assert batch["tokens"].tolist() == want
assert (batch["tokens"][:, -1] == tokenizer.pad_token_id).all()

tokens = torch.from_numpy(batch["tokens"])
model.eval()
with torch.no_grad():
    # a caption padded to the context embeds as it does alone, unpadded
    alone = torch.tensor(tokenizer([cols["caption"][0]])["input_ids"])
    unpadded = model.clap.encode_text({{"input_ids": alone, "attention_mask": torch.ones_like(alone)}}, device="cpu")
    assert torch.allclose(model.embed_text(tokens[:1]), torch.nn.functional.normalize(unpadded, dim=-1), atol=1e-5)
model.train()
loss, _ = task.loss(model, {{k: torch.from_numpy(v) for k, v in batch.items()}})
loss.backward()
assert branch.embeddings.word_embeddings.weight.grad.abs().sum() > 0

test = {{k: torch.from_numpy(v) for k, v in batch.items()}}
metrics, _ = task.evaluate(model, [test])
assert {{"tclassify_a2t", "zeroshot_accuracy"}} <= set(metrics)

# BART: laion_clap embeds with its encoder; the decoder runs without a gradient, so it must be frozen (DDP
# waits for a gradient of every trainable parameter)
from transformers import BartConfig, BartModel, BartTokenizerFast
bart_snapshot = cache_snapshot("facebook/bart-base")
bpe.save_model(str(bart_snapshot))
BartTokenizerFast(vocab=str(bart_snapshot / "vocab.json"), merges=str(bart_snapshot / "merges.txt")).save_pretrained(
    str(bart_snapshot))
BartModel(BartConfig(vocab_size=300, d_model=768, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=40,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2)).save_pretrained(str(bart_snapshot))
bart_task = make_task("tclap", {{"text_model": "bart", "baseline": False}})
bart_task.check()
bart = bart_task.build_model()
batch = preprocessed(bart_task, cols)
loss, _ = bart_task.loss(bart, {{k: torch.from_numpy(v) for k, v in batch.items()}})
loss.backward()
assert [n for n, p in bart.named_parameters() if p.requires_grad and p.grad is None] == []
assert bart.clap.text_branch.get_input_embeddings().weight.grad.abs().sum() > 0

(snapshot / "model.safetensors").unlink()
try:
    task.check()
except CliptimeError as e:
    assert "roberta-base" in str(e) and "weights" in str(e), e
else:
    raise AssertionError("check passed without the weights")
print("roberta ok")
"""
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "roberta ok" in proc.stdout, proc.stderr[-3000:]
