"""T-CLAP: CLAP fine-tuned with a temporal-focused loss on mixed-up clips of two sound events in order.

Shard schema (`TCLAPTask.schema`), one row per clip:

    audio        binary   mono 16-bit little-endian PCM (no header); length = clip_seconds * sample_rate
    sample_rate  int32    samples per second of `audio`
    caption      string   the positive caption ("A followed by B", a single event's plain caption, or free text)
    negative     string   the same caption with the two events in reversed order ("" where it states no order);
                          for an overlapping clip ("A while B"), an ordered caption of the same two events
    first        string   class of the first (or only) event; "" for a free-text caption, which names no class
    second       string   class of the second event ("" for single events and free-text captions)
    pair         int64    mixed clips: id shared by the A-B and the B-A clip of the same two instances; an
                          overlapping clip: an id of its own below -1 (no partner); else -1

The manifest's `source` records `sample_rate`, `clip_seconds` and the event `classes` with their labels; a task
resolved against it carries those classes in its config (`classes`), so zero-shot accuracy is scored against the
shards' own classes wherever the task is rebuilt.

Captioned audio (`make_shards.py clotho`, cliptime.data.clotho) has one row per (recording, caption), no classes
(`first` = ""), and negatives only for captions that state an order. The rows of one recording (the same audio) are
the contrastive positives of each other, as clips of the same events in the same order are for class-labelled rows.
Evaluation scores what the rows allow and leaves the rest out: T-Classify audio->text on the rows with a negative,
and recall@k over recordings (a recording captioned five times is one item to find); T-Classify text->audio needs
A-B/B-A clip pairs, and zero-shot accuracy and the held-out phrasing need classes, so free-text captions give none.

Loss: the symmetric audio-text contrastive loss with CLAP's learnable logit scale, gathered across DDP workers
(clips whose events match are all positives of each other), plus `temporal_weight` (lambda, 0.5 as in the paper)
times the temporal-focused loss, the mean of its two directions: for each caption with a negative, a two-way
softmax that prefers it over the reversed one; and for each A-B caption, one that prefers its clip over the B-A
clips in the batch (`reversed_audio_loss`: the reversed audio as a negative, T-Classify text->audio). The mean,
not the sum, so that lambda weighs order against content as the paper's one term does. A worker's batch without
any B-A clip of its A-B captions has no clip direction (0; at the default batch of 32, by the odds of 132 ordered
class pairs, about one in ten), so its caption direction counts half; the smaller each worker's batch, the more
often. `--lambda 0` is plain CLAP's loss. The temporal loss joins after the first `--temporal-start` of the epochs
(a curriculum: which events, then their order); from scratch, with it on from the first step, the tiny model's
zero-shot accuracy on single events swung from run to run and often fell far below the baseline's (measured
figures in the README).

The baseline trained beside T-CLAP is plain CLAP as the paper compares against: CLAP's loss (lambda 0) and CLAP's
own time-pooled audio embedding (no order pooling), on the same data and budget. Lambda 0 *with* order pooling is
an ablation, measured in benchmarks/quality.py: the contrastive loss alone already sees order captions.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import ray.data
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cliptime.config import option
from cliptime.data import clotho, esc50
from cliptime.data.generated import from_generator
from cliptime.data.order_phrases import HELDOUT_PHRASES, reversal
from cliptime.data.sound_events import EVENT_CLASSES, ORDER_TEMPLATES, SEAMS, generate_block, order_templates
from cliptime.errors import CliptimeError
from cliptime.models.clap import CLAPEncoder, check_clap, tokenize, waveform
from cliptime.tasks.base import Batch, Converter, NumpyBatch, Task, tokenize_distinct

PAIRS_PER_BLOCK = 25
# the settings that make the generated data set what it is (recorded in shard manifests)
GENERATED_DATA_FIELDS = (
    "train_pairs",
    "train_singles",
    "eval_pairs",
    "eval_singles",
    "test_singles",
    "gap",
    "seams",
    "simultaneous",
    "templates",
    "data_seed",
)


@dataclass(frozen=True)
class TCLAPConfig:
    data: str = option("", "Parquet shard directory from jobs/make_shards.py (default: generate the data)")
    train_pairs: int = option(500, "generated event pairs for training (each gives an A-B and a B-A clip)")
    train_singles: int = option(300, "generated single-event training clips")
    eval_pairs: int = option(100, "generated event pairs in each of the val and test splits")
    eval_singles: int = option(120, "generated single-event clips in the val split")
    test_singles: int = option(
        480, "generated single-event clips in the test split, where zero-shot accuracy is reported (each 0.2 points)"
    )
    gap: tuple[float, float] = option((0.0, 0.0), "range of the silent gap between the two events, seconds")
    seams: str = option(
        "mixed",
        "how a generated pair's two events join: mixed (per pair a silent gap from --gap, or a short one where it "
        "is 0; a crossfade; or no gap; alike in both orders, so the join is no cue) or gap (always a --gap gap)",
    )
    simultaneous: float = option(
        0.0,
        "share of the generated training pairs made one overlapping clip instead, captioned 'A while B' with "
        "'A followed by B' as its negative (val and test keep ordered pairs only)",
    )
    templates: str = option(
        "basic", "order-caption template set: basic (3 phrasings), rich (7) or grammar (246 composed from parts)"
    )
    data_seed: int = option(0, "seed of the generated data set")
    rephrase: str = option(
        "",
        "template sets joined by '+' (e.g. basic+grammar) from which each mixed training clip's order caption is drawn "
        "anew at every step after --rephrase-start, each set equally likely, the negative the same phrasing reversed; "
        "'' keeps each row's own caption. Validation and test captions are never redrawn",
    )
    rephrase_start: float = option(
        0.5, "fraction of the epochs trained on the rows' own captions before --rephrase draws them anew"
    )
    audio_model: str = option("cliptime-tiny-cnn6", "CLAP audio config (laion_clap's, or cliptime-tiny-cnn6)")
    text_model: str = option(
        "transformer",
        "CLAP text branch: transformer (trained from scratch) or roberta/bert/bart (pretrained, from the Hugging Face "
        "cache)",
    )
    pretrained: str = option("", "a LAION CLAP checkpoint file to start from (e.g. 630k-audioset-best.pt)")
    temporal_weight: float = option(
        0.5,
        "lambda: weight of the temporal-focused loss, the mean of its caption and clip directions (0: plain CLAP)",
        aliases=("--lambda",),
    )
    temporal_start: float = option(
        0.2,
        "fraction of the epochs trained on the contrastive loss alone before the temporal loss joins: the events "
        "first, then their order",
    )
    spec_time_drop: int = option(8, "SpecAugment time-stripe width in frames (laion_clap's default is 64)")
    order_pooling: bool = option(True, "add an order-aware pooling of the audio frames (see cliptime/models/clap.py)")
    baseline: bool = option(
        True, "also train plain CLAP (lambda 0, no order pooling) on the same data and budget, to compare"
    )
    classes: dict[str, str] = option(
        {}, "event classes (key -> caption label) of the data; empty: the generator's twelve", flag=False
    )


class TCLAPPreprocessor:
    """Shard rows -> 16-bit PCM clips of the model's length (the model takes them as they are, see
    `cliptime.models.clap.waveform`), token ids of caption and negative, contrastive keys."""

    def __init__(self, encoder_args: dict, classes: list[str]):
        self.encoder_args, self.classes = encoder_args, classes

    def tokenize(self, texts) -> np.ndarray:
        args = self.encoder_args
        return tokenize_distinct(lambda t: tokenize(t, args["text_model"], args["context_length"]), texts)

    def __call__(self, batch: NumpyBatch) -> NumpyBatch:
        samples = self.encoder_args["clip_samples"]
        audio = np.zeros((len(batch["audio"]), samples), dtype=np.int16)
        for i, data in enumerate(batch["audio"]):
            if int(batch["sample_rate"][i]) != self.encoder_args["sample_rate"]:
                raise CliptimeError(
                    f"clip {batch['caption'][i]!r} is sampled at {batch['sample_rate'][i]} Hz, "
                    f"the model takes {self.encoder_args['sample_rate']} Hz"
                )
            x = np.frombuffer(data, dtype="<i2")
            audio[i, : min(len(x), samples)] = x[:samples]
        index = {c: i for i, c in enumerate(self.classes)}
        first = np.array([index[c] if c else -1 for c in batch["first"]], dtype=np.int64)  # -1: free text
        second = np.array([index.get(c, -1) for c in batch["second"]], dtype=np.int64)
        pair = np.asarray(batch["pair"], dtype=np.int64)
        # the recording a row holds: captions of one recording share its audio. Every 16th sample names it as
        # surely (two recordings alike in all of those are not different sounds) at a sixteenth of the hashing.
        clip = np.array(
            [int.from_bytes(hashlib.blake2b(x[::16].tobytes(), digest_size=8).digest(), "little") >> 1 for x in audio],
            dtype=np.int64,
        )
        return {
            "audio": audio,
            "tokens": self.tokenize(batch["caption"]),
            "neg_tokens": self.tokenize(batch["negative"]),
            "first": first,
            "second": second,
            "key": contrastive_keys(first, second, pair, clip, len(self.classes)),
            "pair": pair,
            "clip": clip,
            "ordered": np.array([bool(n) for n in batch["negative"]], dtype=bool),  # it has a reversed-order negative
        }


def gather(x: torch.Tensor) -> torch.Tensor:
    """All workers' rows, with gradients flowing back to each worker's own rows (identity without DDP)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(torch.distributed.nn.functional.all_gather(x), dim=0)


def contrastive_loss(audio: torch.Tensor, text: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch; every clip whose key matches is a positive (soft target)."""
    all_audio, all_text, all_keys = gather(audio), gather(text), gather(keys)
    targets = (keys[:, None] == all_keys[None, :]).float()
    targets = targets / targets.sum(1, keepdim=True)
    a2t = -(F.log_softmax(scale * audio @ all_text.T, dim=-1) * targets).sum(1).mean()
    t2a = -(F.log_softmax(scale * text @ all_audio.T, dim=-1) * targets).sum(1).mean()
    return (a2t + t2a) / 2


def temporal_loss(
    audio: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, scale: torch.Tensor, mixed: torch.Tensor
) -> torch.Tensor:
    """-log softmax of the correct-order caption against the reversed one, averaged over mixed clips."""
    margin = scale * ((audio * neg).sum(-1) - (audio * pos).sum(-1))
    loss = F.softplus(margin)
    return (loss * mixed).sum() / mixed.sum().clamp(min=1)


def reversed_audio_loss(
    audio: torch.Tensor,
    text: torch.Tensor,
    pair: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """The reversed audio as a negative (T-Classify text->audio's direction): for each A-B caption of a mixed clip,
    -log softmax of its own clip against every mixed clip in this worker's batch that plays B then A (its own B-A
    partner, or other instances of the two classes), averaged over the rows that have one (0 when none has).
    Any B-A clip counts, not the partner alone: the shuffle buffer parts a pair's two rows, and a simulation of
    the default buffer at batch 32 put the partner in the same batch for about 1 row in 20."""
    mixed = pair >= 0  # ordered two-event clips (not single events, captions without classes, overlapping clips)
    swapped = (first[:, None] == second[None, :]) & (second[:, None] == first[None, :]) & mixed[:, None] & mixed
    own = scale * (text * audio).sum(-1)
    # a finite floor, not -inf, for the clips that are no negative: a row without any keeps finite gradients
    others = (scale * text @ audio.T).masked_fill(~swapped, -1e4)
    found = swapped.any(1).float()
    return (F.softplus(torch.logsumexp(others, 1) - own) * found).sum() / found.sum().clamp(min=1)


def contrastive_keys(
    first: np.ndarray, second: np.ndarray, pair: np.ndarray, clip: np.ndarray, classes: int
) -> np.ndarray:
    """Rows with equal keys are contrastive positives of each other: clips of the same event(s) in the same order;
    captions of one recording (free text, keyed by its audio, `clip`); an overlapping clip ("A while B", pair < -1)
    and the overlapping clips of the same two events in either order only, as overlapping audio is no positive of
    "A, then B" captions. The kinds never share a key: class keys are >= 1, recording keys >= 0, overlap keys < 0."""
    ordered = np.where(first >= 0, first * (classes + 1) + second + 1, clip)
    low, high = np.minimum(first, second), np.maximum(first, second)
    return np.where(pair < -1, -1 - (low << 20) - high, ordered)


def convert_clotho(
    clotho_dir: Path, cfg: clotho.ClothoConfig, scratch: Path, skip_bad: bool
) -> tuple[dict[str, ray.data.Dataset], dict, list[str]]:
    """A Clotho-layout captioned collection -> T-CLAP shard rows at the audio model's sample rate and clip length."""
    audio = check_clap(cfg.audio_model, "transformer")["audio_cfg"]
    return clotho.convert(clotho_dir, audio["sample_rate"], audio["clip_samples"], TCLAPTask.schema, scratch, skip_bad)


def convert_esc50(
    esc_dir: Path, cfg: esc50.ESC50Config, scratch: Path, skip_bad: bool
) -> tuple[dict[str, ray.data.Dataset], dict, list[str]]:
    """An ESC-50-layout collection -> T-CLAP shard rows at the audio model's sample rate and clip length."""
    audio = check_clap(cfg.audio_model, "transformer")["audio_cfg"]
    return esc50.convert(esc_dir, cfg, audio["sample_rate"], audio["clip_samples"], TCLAPTask.schema, scratch, skip_bad)


def convert_webdataset_events(
    tars: str | Path, cfg: esc50.EventSamplesConfig, scratch: Path, skip_bad: bool
) -> tuple[dict[str, ray.data.Dataset], dict, list[str]]:
    """WebDataset tar shards of single sound events -> T-CLAP shard rows of mixed-order clips, cut and mixed as an
    ESC-50 collection's."""
    audio = check_clap(cfg.audio_model, "transformer")["audio_cfg"]
    rate, samples = audio["sample_rate"], audio["clip_samples"]
    return esc50.convert_webdataset(tars, cfg, rate, samples, TCLAPTask.schema, scratch, skip_bad)


def webdataset_settings(cfg: TCLAPConfig) -> esc50.EventSamplesConfig:
    """How `--data TARS` converts WebDataset shards: clips for the task's audio model, with its gap range, order
    templates and data seed (every label found is a class)."""
    return esc50.EventSamplesConfig(
        audio_model=cfg.audio_model, gap=cfg.gap, templates=cfg.templates, seed=cfg.data_seed
    )


class TCLAPTask(Task):
    name = "tclap"
    title = "T-CLAP"
    summary = (
        "T-CLAP scores how well a caption describes a sound clip, order of events included: CLAP fine-tuned so that "
        '"A followed by B" and "B followed by A" score differently. Rank candidate captions of a clip, or ask which of '
        "two events plays first. Input: `audio`, an encoded clip (WAV, FLAC, OGG; resampled to the model's rate, "
        "cut or padded to its length), and `caption`, one row per clip and caption. Output: `caption` and `score`, "
        "the similarity of the clip's and the caption's embeddings (higher: a better match)."
    )
    aliases = ("sounds",)
    Config = TCLAPConfig
    schema = pa.schema(
        [
            ("audio", pa.binary()),
            ("sample_rate", pa.int32()),
            ("caption", pa.string()),
            ("negative", pa.string()),
            ("first", pa.string()),
            ("second", pa.string()),
            ("pair", pa.int64()),
        ]
    )
    label_column = "first"
    monitor = "val/tclassify_a2t"
    train_defaults = {"epochs": 16, "batch_size": 32, "lr": 1e-3}
    generated_fields = GENERATED_DATA_FIELDS
    data_fields = ("data", *GENERATED_DATA_FIELDS, "audio_model", "text_model", "classes")
    data_sizes = {"train_pairs": 8, "train_singles": 4, "eval_pairs": 4, "eval_singles": 4, "test_singles": 4}
    converters = {
        "esc50": Converter(
            esc50.ESC50Config,
            "ESC_DIR",
            "an ESC-50-layout sound collection (audio/*.wav, meta/esc50.csv)",
            convert_esc50,
        ),
        "webdataset-audio": Converter(
            esc50.EventSamplesConfig,
            "TARS",
            "WebDataset tar shards (a .tar file, or a folder or s3:// prefix of them) of single sound events: flac/wav "
            "and a json with the event's label (and optionally its source recording)",
            convert_webdataset_events,
            webdataset=webdataset_settings,
        ),
        "clotho": Converter(
            clotho.ClothoConfig,
            "CLOTHO_DIR",
            "a Clotho-layout captioned collection (clotho_captions_*.csv, development/, validation/, evaluation/)",
            convert_clotho,
        ),
    }

    @property
    def event_classes(self) -> dict[str, str]:
        """Event class key -> the label its captions use: the data's own, else the generator's."""
        return dict(self.cfg.classes) or {k: v[0] for k, v in EVENT_CLASSES.items()}

    @property
    def model_audio(self) -> dict:
        cfg = check_clap(self.cfg.audio_model, self.cfg.text_model)
        return {
            "sample_rate": cfg["audio_cfg"]["sample_rate"],
            "clip_samples": cfg["audio_cfg"]["clip_samples"],
            "context_length": cfg["text_cfg"].get("context_length", 77),
        }

    # -- data ----------------------------------------------------------------------------------------------
    def check(self) -> None:
        c = self.cfg
        order_templates(c.templates)
        for name in c.rephrase.split("+") if c.rephrase else ():  # "basic+" names an empty set: rejected
            if name not in ORDER_TEMPLATES:
                raise CliptimeError(
                    f"--rephrase {c.rephrase!r}: unknown template set {name!r} (known: {', '.join(ORDER_TEMPLATES)})"
                )
        check_clap(c.audio_model, c.text_model, c.pretrained)
        if not 0 <= c.gap[0] <= c.gap[1]:
            raise CliptimeError(f"--gap {c.gap[0]:g} {c.gap[1]:g}: expected 0 <= min <= max")
        if not 0 <= c.rephrase_start < 1:
            raise CliptimeError(f"--rephrase-start {c.rephrase_start:g}: expected a fraction of the epochs in [0, 1)")
        if c.seams not in SEAMS:
            raise CliptimeError(f"--seams {c.seams!r}: expected one of {', '.join(SEAMS)}")
        if not 0 <= c.simultaneous <= 1:
            raise CliptimeError(f"--simultaneous {c.simultaneous:g}: expected a share of the pairs in [0, 1]")
        if not 0 <= c.temporal_start < 1:
            raise CliptimeError(f"--temporal-start {c.temporal_start:g}: expected a fraction of the epochs in [0, 1)")
        if min(c.train_pairs, c.eval_pairs) < 1:
            raise CliptimeError("--train-pairs and --eval-pairs must be at least 1")

    def resolved(self, manifest: dict) -> TCLAPTask:
        """The shards' own event classes, once their clips are checked against the model's rate and length."""
        source, want = manifest.get("source", {}), self.model_audio
        sr, seconds = source.get("sample_rate"), source.get("clip_seconds")
        if sr != want["sample_rate"]:
            raise CliptimeError(
                f"{self.cfg.data}: clips are sampled at {sr} Hz, {self.cfg.audio_model} takes {want['sample_rate']} Hz"
            )
        if seconds is None or round(seconds * sr) != want["clip_samples"]:
            raise CliptimeError(
                f"{self.cfg.data}: clips last {seconds} s, {self.cfg.audio_model} takes "
                f"{want['clip_samples'] / want['sample_rate']:g} s"
            )
        return self.replace(classes=dict(source.get("classes", self.event_classes)))

    def source(self) -> dict:
        """What the generated data set is, for shard manifests."""
        a = self.model_audio
        return {
            "generator": "cliptime.data.sound_events",
            "sample_rate": a["sample_rate"],
            "clip_seconds": a["clip_samples"] / a["sample_rate"],
            "classes": self.event_classes,
            **{k: v for k, v in dataclasses.asdict(self.cfg).items() if k in GENERATED_DATA_FIELDS},
        }

    def generate(self) -> dict[str, ray.data.Dataset]:
        c, a = self.cfg, self.model_audio
        sizes = {
            "train": (c.train_pairs, c.train_singles),
            "val": (c.eval_pairs, c.eval_singles),
            "test": (c.eval_pairs, c.test_singles),
        }
        out = {}
        for split, (pairs, singles) in sizes.items():
            blocks = -(-pairs // PAIRS_PER_BLOCK)
            kwargs = dict(
                seed=c.data_seed,
                split=split,
                pairs=-(-pairs // blocks),
                singles=-(-singles // blocks),
                sample_rate=a["sample_rate"],
                clip_seconds=a["clip_samples"] / a["sample_rate"],
                gap_seconds=tuple(c.gap),
                template_set=c.templates,
                seams=c.seams,
                simultaneous=c.simultaneous,  # generate_block makes overlapping clips in the train split only
            )
            out[split] = from_generator(generate_block, "block", list(range(blocks)), self.schema, **kwargs)
        return out

    def preprocessor(self) -> TCLAPPreprocessor:
        args = {"audio_model": self.cfg.audio_model, "text_model": self.cfg.text_model, **self.model_audio}
        return TCLAPPreprocessor(args, list(self.event_classes))

    def train_transform(self, batch: Batch) -> Batch:
        """A random gain per clip, -6 to +3 dB: order and content, not level, are what the captions describe."""
        audio = waveform(batch["audio"])
        db = torch.empty(len(audio), 1, device=audio.device).uniform_(-6.0, 3.0)
        return {**batch, "audio": audio * 10 ** (db / 20)}

    # -- model and loss ------------------------------------------------------------------------------------
    def build_model(self, load_pretrained: bool = True) -> CLAPEncoder:
        c = self.cfg
        return CLAPEncoder(
            c.audio_model, c.text_model, c.pretrained if load_pretrained else "", c.spec_time_drop, c.order_pooling
        )

    def rephrasing_at(self, epoch: int | None, epochs: int | None) -> list[tuple[str, ...]]:
        """The template sets that mixed clips' captions are drawn from in `epoch` of `epochs` (`--rephrase`, none
        before `--rephrase-start`): first the order in the rows' own phrasings, then the same order in many."""
        if not self.cfg.rephrase or (epoch is not None and epoch < round(self.cfg.rephrase_start * epochs)):
            return []
        return [ORDER_TEMPLATES[name] for name in self.cfg.rephrase.split("+")]

    def temporal_weight_at(self, epoch: int | None, epochs: int | None) -> float:
        """Lambda in `epoch` of `epochs`: 0 for the first --temporal-start of the epochs, then --lambda (the
        whole weight outside a run)."""
        if epoch is not None and epoch < round(self.cfg.temporal_start * epochs):
            return 0.0
        return self.cfg.temporal_weight

    def loss(
        self, model: nn.Module, batch: Batch, epoch: int | None = None, epochs: int | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        template_sets = self.rephrasing_at(epoch, epochs)
        if template_sets:
            labels, text_model = list(self.event_classes.values()), self.cfg.text_model
            batch = rephrased(batch, template_sets, labels, lambda texts, n: tokenize(texts, text_model, n))
        audio, pos, neg, scale = model(batch["audio"], batch["tokens"], batch["neg_tokens"])
        lc = contrastive_loss(audio, pos, batch["key"], scale)
        lt = temporal_loss(audio, pos, neg, scale, batch["ordered"].float())
        lr = reversed_audio_loss(audio, pos, batch["pair"], batch["first"], batch["second"], scale)
        return lc + self.temporal_weight_at(epoch, epochs) * (lt + lr) / 2, {
            "contrastive_loss": lc,
            "temporal_loss": lt,
            "reversed_audio_loss": lr,
            "logit_scale": scale,
        }

    def baseline(self) -> TCLAPTask | None:
        if not self.cfg.baseline or self.cfg.temporal_weight == 0:
            return None
        return self.replace(temporal_weight=0.0, order_pooling=False, baseline=False)

    # -- evaluation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> tuple[dict[str, float], dict[str, Any]]:
        model.eval()
        columns = ("tokens", "neg_tokens", "first", "second", "key", "pair", "clip", "ordered")
        rows: dict[str, list] = {k: [] for k in ("a", *columns)}
        for batch in batches:
            a, _ = model(batch["audio"])
            for k, v in zip(rows, (a, *(batch[c] for c in columns))):
                rows[k].append(v.float().cpu() if v.is_floating_point() else v.cpu())
        r = {k: torch.cat(v) for k, v in rows.items()}
        r["t"], r["n"] = embed_distinct(model, torch.cat([r["tokens"], r["neg_tokens"]])).split(len(r["a"]))
        device = next(model.parameters()).device
        labels = list(self.event_classes.values())
        # each metric on the rows it is defined for; one no row allows is left out
        metrics = tclassify(r["a"], r["t"], r["n"], r["pair"], r["ordered"])
        mixed = r["second"] >= 0  # clips of two classed events, whose order a held-out phrasing can tell
        if mixed.any():
            pos, neg = heldout_phrasing(model, labels, r["first"], r["second"], r["pair"], mixed, r["t"].shape[1])
            heldout = tclassify(r["a"], pos, neg, r["pair"], mixed)
            metrics.update({f"{name}_heldout_phrasing": value for name, value in heldout.items()})
        metrics.update(retrieval(r["a"], r["t"], r["key"], r["clip"]))
        single = (r["first"] >= 0) & (r["second"] < 0)
        if single.any():
            _, label_emb, _ = model(None, model.tokenize(labels).to(device))
            guess = (r["a"][single] @ label_emb.float().cpu().T).argmax(-1)
            metrics["zeroshot_accuracy"] = float((guess == r["first"][single]).float().mean())
        return metrics, {"metrics": metrics}

    def figures(self, outputs: dict[str, Any], baseline: dict[str, Any] | None = None) -> dict[str, Any]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [
            name
            for name in (
                "tclassify_a2t",
                "tclassify_t2a",
                "tclassify_a2t_heldout_phrasing",
                "zeroshot_accuracy",
                "a2t_R1",
                "t2a_R1",
            )
            if name in outputs["metrics"]  # what the data allow (see evaluate)
        ]
        runs = {f"T-CLAP (lambda={self.cfg.temporal_weight:g})": outputs["metrics"]}
        if baseline is not None:
            runs["plain CLAP baseline"] = baseline["metrics"]
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(runs)
        for i, (label, m) in enumerate(runs.items()):
            ax.bar(np.arange(len(names)) + i * width, [m[n] for n in names], width, label=label)
        ax.axhline(0.5, color="gray", ls="--", lw=1)
        ax.set_xticks(np.arange(len(names)) + width * (len(runs) - 1) / 2, names, rotation=15)
        ax.set_ylim(0, 1)
        ax.set_title("T-Classify (chance 0.5), zero-shot and retrieval on held-out instances")
        ax.legend()
        fig.tight_layout()
        return {"tclassify_vs_baseline.png": fig}

    # -- serving -------------------------------------------------------------------------------------------
    def input_example(self) -> pd.DataFrame:
        import soundfile as sf

        a = self.model_audio
        buf = io.BytesIO()
        sf.write(buf, np.zeros(a["clip_samples"], dtype=np.float32), a["sample_rate"], format="WAV")
        return pd.DataFrame({"audio": [buf.getvalue()], "caption": ["a rising whistle followed by knocking"]})

    @torch.no_grad()
    def predict(self, model: nn.Module, inputs: pd.DataFrame) -> pd.DataFrame:
        """inputs: `audio` (WAV/FLAC bytes, resampled to the model's rate) and `caption`; adds a `score`."""
        import soundfile as sf
        from scipy.signal import resample_poly

        model.eval()
        device = next(model.parameters()).device
        a = self.model_audio
        clips = np.zeros((len(inputs), a["clip_samples"]), dtype=np.float32)
        for i, data in enumerate(inputs["audio"]):
            try:
                x, sr = sf.read(io.BytesIO(bytes(data)), dtype="float32", always_2d=True)
            except Exception as e:  # soundfile raises several types for unreadable input
                raise CliptimeError(f"input row {i}: not a readable audio file ({type(e).__name__})") from None
            x = x.mean(1)
            if not np.isfinite(x).all():
                raise CliptimeError(f"input row {i}: the audio contains NaN or infinite samples")
            if sr != a["sample_rate"]:
                x = resample_poly(x, a["sample_rate"], sr).astype(np.float32)
            clips[i, : min(len(x), a["clip_samples"])] = x[: a["clip_samples"]]
        audio, text, _ = model(torch.from_numpy(clips).to(device), model.tokenize(list(inputs["caption"])).to(device))
        return pd.DataFrame({"caption": list(inputs["caption"]), "score": (audio * text).sum(-1).cpu().numpy()})

    # -- prediction command ----------------------------------------------------------------------------------
    file_suffixes = ("wav", "flac", "ogg")

    @classmethod
    def add_predict_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--captions", nargs="+", default=[], help="candidate captions to rank")
        group.add_argument("--order", nargs=2, metavar=("A", "B"), help="two events: which plays first?")

    def prediction_rows(self, data: bytes, args: argparse.Namespace) -> pd.DataFrame:
        captions = args.captions
        if args.order:
            template = ORDER_TEMPLATES["basic"][0]
            a, b = args.order
            captions = [template.format(first=a, second=b), template.format(first=b, second=a)]
        if not captions:
            raise CliptimeError("give candidate captions with --captions, or two events with --order A B")
        return pd.DataFrame({"audio": [data] * len(captions), "caption": captions})

    def prediction_result(self, predictions: pd.DataFrame, args: argparse.Namespace) -> dict[str, Any]:
        result: dict[str, Any] = {"ranking": predictions.sort_values("score", ascending=False).to_dict("records")}
        if args.order:
            first_wins = predictions["score"].iloc[0] >= predictions["score"].iloc[1]
            result["order"] = list(args.order) if first_wins else list(reversed(args.order))
        return result


def rephrased(batch: Batch, template_sets: list[tuple[str, ...]], labels: list[str], tokenize) -> Batch:
    """`batch` with the caption of each mixed clip (`pair` >= 0: two classed events, one after the other) drawn anew
    from one of `template_sets` (each equally likely), then one of its phrasings, and its negative the same phrasing
    with the two events swapped. Single events, free-text captions and overlapping clips keep theirs.

    A row's caption is otherwise fixed when its data are made: with the 246 phrasings of `grammar`, each would meet a
    pair or two of 500, and a phrasing seen once teaches little about how people say "A, then B". Drawn every step,
    every phrasing meets many pairs. `tokenize(texts, context_length)` gives the model's token ids."""
    rows = torch.nonzero(batch["pair"] >= 0).squeeze(1)
    if len(rows) == 0:
        return batch
    which = torch.randint(len(template_sets), (len(rows),)).tolist()
    at = torch.rand(len(rows)).tolist()
    first, second = batch["first"][rows].tolist(), batch["second"][rows].tolist()
    texts = [
        reversal(template_sets[k][int(u * len(template_sets[k]))], labels[a], labels[b])
        for k, u, a, b in zip(which, at, first, second)
    ]
    ids = tokenize([t[0] for t in texts] + [t[1] for t in texts], batch["tokens"].shape[1])
    tokens, negatives = batch["tokens"].clone(), batch["neg_tokens"].clone()
    tokens[rows] = ids[: len(rows)].to(tokens)
    negatives[rows] = ids[len(rows) :].to(negatives)
    return {**batch, "tokens": tokens, "neg_tokens": negatives}


def embed_distinct(model, tokens: torch.Tensor) -> torch.Tensor:
    """Text embeddings of token rows, each distinct row embedded once. A row's embedding changes in its last bits
    with the batch it is computed in, so the same caption in two batches would not tie with itself, and a caption
    several recordings share (captioned audio) would be ranked by that noise in `retrieval`."""
    distinct, row_of = torch.unique(tokens, dim=0, return_inverse=True)
    device = next(model.parameters()).device
    chunks = [model(None, distinct[s : s + 256].to(device))[1] for s in range(0, len(distinct), 256)]
    return torch.cat(chunks).float().cpu()[row_of]


def heldout_phrasing(model, labels, first, second, pair, mixed, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings of each mixed clip's order told in a phrasing no training set uses, and of its reversal
    (zeros for single-event clips). Both clips of a pair get the same phrasing (`HELDOUT_PHRASES`, by pair id);
    `labels` are the caption labels of the event classes, by class index."""
    rows = torch.nonzero(mixed).squeeze(1).tolist()
    texts = [
        reversal(HELDOUT_PHRASES[int(pair[i]) % len(HELDOUT_PHRASES)], labels[first[i]], labels[second[i]])
        for i in rows
    ]
    pos, neg = torch.zeros(len(first), dim), torch.zeros(len(first), dim)
    if rows:
        tokens = model.tokenize([t[0] for t in texts] + [t[1] for t in texts])
        pos[rows], neg[rows] = embed_distinct(model, tokens).split(len(rows))
    return pos, neg


def tclassify(audio, pos, neg, pair, ordered) -> dict[str, float]:
    """T-Classify: audio->text picks the correct-order caption over the reversed one (rows `ordered`: with a
    negative); text->audio picks the A-B clip over the B-A clip of the same two instances for the caption "A ... B"
    (ordered rows of a `pair`). Each is left out where no row allows it."""
    out = {}
    if ordered.any():
        out["tclassify_a2t"] = float(((audio * pos).sum(-1) > (audio * neg).sum(-1))[ordered].float().mean())
    idx = torch.nonzero(ordered & (pair >= 0)).squeeze(1)
    partner = {}
    for i in idx.tolist():
        partner.setdefault(int(pair[i]), []).append(i)
    hits = []
    for members in partner.values():
        if len(members) == 2:
            i, j = members
            hits.append(float(pos[i] @ audio[i] > pos[i] @ audio[j]))
            hits.append(float(pos[j] @ audio[j] > pos[j] @ audio[i]))
    if hits:
        out["tclassify_t2a"] = float(np.mean(hits))
    return out


def retrieval(audio, text, keys, clips, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways between the distinct recordings (`clips`: a recording's id on each of its rows; one
    captioned five times is one item to find) and every row's caption; a retrieved item is correct when it has the
    row's key: the same events in the same order, or for free-text captions the same recording."""
    recordings = torch.from_numpy(np.unique(clips.numpy(), return_index=True)[1])
    # Scored once per distinct caption vector, then spread to its rows: a matrix product's entries for two equal
    # columns can differ in their last bits with the columns' places, and a caption that several recordings share
    # must tie with itself (evaluate embeds each distinct caption once, for the same reason).
    captions, caption_of = torch.unique(text, dim=0, return_inverse=True)
    sim = (audio[recordings] @ captions.T)[:, caption_of]
    relevant = keys[recordings][:, None] == keys[None, :]
    out = {}
    for name, s, r in (("a2t", sim, relevant), ("t2a", sim.T, relevant.T)):
        best_relevant = torch.where(r, s, torch.tensor(-np.inf)).max(1).values
        rank = (s > best_relevant[:, None]).sum(1)  # items scored above the best correct one
        for k in ks:
            out[f"{name}_R{k}"] = float((rank < k).float().mean())
    return out
