"""ESC-50-layout sound collections -> T-CLAP shards of mixed-up order clips (schema in cliptime.tasks.tclap).

Layout::

    ESC_DIR/
      audio/*.wav          # any sample rate, mono or multi-channel (mixed down)
      meta/esc50.csv       # filename,fold,target,category[,src_file,...]

The categories become the event classes ("church_bells" -> "church bells"). Each recording is resampled to the
model's rate and cut to its loudest stretch of event length (ESC-50 clips are 5 s with silence around the sound).
Fold `test_fold` (5) is held out as the test split; validation takes 15% of the other folds' source recordings
(`src_file`, so takes of one recording never straddle train and validation). Mixed clips are made as in the
generated set (cliptime.data.sound_events): two events of different categories, in both orders, with order
captions and the reversed caption as negative; single-event clips with plain captions are mixed in. Partners
are drawn among the events of one shuffled batch of the split, so the mixing streams like the rest.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import ray.data
from ray.data.expressions import col

from cliptime.config import option
from cliptime.data.sound_events import ClipWriter, event_room, from_pcm16, order_templates, to_pcm16
from cliptime.data.user_files import BadInput, read_checked, settle
from cliptime.errors import CliptimeError

META = Path("meta") / "esc50.csv"
REQUIRED_COLUMNS = ("filename", "fold", "target", "category")
MIX_BATCH = 64  # events among which partners are drawn


@dataclass
class ESC50Config:
    audio_model: str = option("cliptime-tiny-cnn6", "CLAP audio config the clips are for: its rate and clip length")
    test_fold: int = option(5, "fold held out as the test split")
    pairs_per_event: int = option(2, "mixed pairs (each in both orders) that each event starts")
    singles_fraction: float = option(0.3, "share of events that also appear alone with a plain caption")
    gap: tuple[float, float] = option((0.0, 0.0), "range of the silent gap between the two events, seconds")
    templates: str = option("basic", "order-caption template set: basic, rich or grammar (composed phrasings)")
    seed: int = option(0, "seed of the validation split, the shuffling and the mixing")


def label_of(category: str) -> str:
    return category.replace("_", " ").strip()


def loudest(x: np.ndarray, n: int) -> np.ndarray:
    """The `n`-sample stretch of `x` with the most energy (all of `x` if it is shorter)."""
    if len(x) <= n:
        return x
    energy = np.concatenate([[0.0], np.cumsum(x.astype(np.float64) ** 2)])
    start = int(np.argmax(energy[n:] - energy[:-n]))
    return x[start : start + n]


class EventReader:
    """Read pass (see cliptime.data.user_files): a recording -> its loudest event-length stretch at the model's
    rate, as 16-bit PCM."""

    def __init__(self, sample_rate: int, event_samples: int):
        self.sample_rate, self.event_samples = sample_rate, event_samples

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import soundfile as sf
        from scipy.signal import resample_poly

        errors, audio = [], []
        for path in batch["input"]:
            try:
                x, sr = sf.read(path, dtype="float32", always_2d=True)
                x = x.mean(axis=1)
                if len(x) == 0:
                    raise ValueError("no samples")
                if not np.isfinite(x).all():
                    raise ValueError("NaN or infinite samples")
                if sr != self.sample_rate:
                    g = math.gcd(sr, self.sample_rate)
                    x = resample_poly(x, self.sample_rate // g, sr // g).astype(np.float32)
                errors.append("")
                audio.append(to_pcm16(loudest(x, self.event_samples)))
            except (sf.LibsndfileError, RuntimeError, ValueError) as e:
                errors.append(f"unreadable audio ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
                audio.append(b"")
        return batch.assign(error=errors, audio=audio)


def read_meta(root: Path, cfg: ESC50Config) -> tuple[pd.DataFrame, list[BadInput]]:
    """One row per recording: input (path), category, and its split."""
    if not root.is_dir():
        raise CliptimeError(f"ESC-50 folder {root} does not exist")
    meta = root / META
    if not meta.is_file():
        raise CliptimeError(f"{meta} is missing: an ESC-50-layout folder has meta/esc50.csv and audio/")
    table = pd.read_csv(meta, dtype=str, keep_default_na=False)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise CliptimeError(f"{meta} lacks column(s) {', '.join(missing)} (needs {','.join(REQUIRED_COLUMNS)})")
    if table.empty:
        raise CliptimeError(f"{meta} lists no recordings")
    rows, problems = [], []
    listed: dict[Path, int] = {}  # recording -> the line that lists it
    for i, row in enumerate(table.to_dict("records")):
        where = f"{meta} line {i + 2}"
        path = root / "audio" / row["filename"]
        if not row["filename"] or not path.is_file():
            problems.append(BadInput(where, f"audio/{row['filename']} does not exist"))
        elif path in listed:
            problems.append(BadInput(where, f"audio/{row['filename']} is listed twice (also on line {listed[path]})"))
        elif not row["fold"].strip().isdigit():
            problems.append(BadInput(where, f"fold {row['fold']!r} is not a number"))
        elif not row["category"].strip():
            problems.append(BadInput(where, "empty category"))
        else:
            listed[path] = i + 2
            src = row.get("src_file") or Path(row["filename"]).stem
            rows.append({"input": str(path), "category": row["category"].strip(), "fold": int(row["fold"]), "src": src})
    recordings = pd.DataFrame(rows, columns=["input", "category", "fold", "src"])
    recordings["split"] = assign_splits(recordings, cfg, meta)
    return recordings, problems


def assign_splits(recordings: pd.DataFrame, cfg: ESC50Config, meta: Path) -> list[str]:
    test = recordings["fold"] == cfg.test_fold
    if not test.any():
        raise CliptimeError(f"{meta}: no recordings in fold {cfg.test_fold} (the --test-fold)")
    sources = sorted(recordings.loc[~test, "src"].unique(), key=lambda s: zlib.crc32(f"{cfg.seed}:{s}".encode()))
    if len(sources) < 2:
        raise CliptimeError(f"{meta}: the folds other than {cfg.test_fold} need recordings of at least 2 sources")
    val = set(sources[: max(1, round(0.15 * len(sources)))])
    return ["test" if t else ("val" if s in val else "train") for t, s in zip(test, recordings["src"])]


class MixEvents:
    """Second pass: a shuffled batch of one split's events -> its mixed clips (both orders) and single clips."""

    def __init__(self, cfg: ESC50Config, sample_rate: int, clip_samples: int, labels: dict[str, str], schema):
        self.cfg, self.sample_rate, self.clip_samples, self.labels = cfg, sample_rate, clip_samples, labels
        self.schema = schema

    def __call__(self, events: pd.DataFrame) -> pa.Table:
        return pa.table(self.mix(events.reset_index(drop=True)), schema=self.schema)

    def mix(self, events: pd.DataFrame) -> dict[str, list]:
        key = "|".join(events["input"]).encode()
        rng = np.random.default_rng([self.cfg.seed, zlib.crc32(key)])
        out = ClipWriter(self.sample_rate, self.clip_samples, self.cfg.templates, self.labels)
        audio = [from_pcm16(a) for a in events["audio"]]
        categories = events["category"].to_numpy()
        for i, a in enumerate(categories):
            partners = np.flatnonzero(categories != a)
            for k in range(self.cfg.pairs_per_event if len(partners) else 0):
                j = int(rng.choice(partners))
                digest = hashlib.blake2b(f"{events['input'][i]}|{events['input'][j]}|{k}".encode(), digest_size=8)
                pair = int.from_bytes(digest.digest(), "little") >> 1  # ids shared by the A-B and B-A clips
                out.add_pair(a, categories[j], audio[i], audio[j], pair, tuple(self.cfg.gap), rng)
            if rng.random() < self.cfg.singles_fraction:
                out.add_single(a, audio[i], rng)
        return out.columns


def convert(
    esc_dir: str | Path,
    cfg: ESC50Config,
    sample_rate: int,
    clip_samples: int,
    schema: pa.Schema,
    scratch: Path,
    skip_bad: bool,
) -> tuple[dict[str, ray.data.Dataset], dict[str, Any], list[str]]:
    """(lazy `schema` datasets per split, the manifest's `source`, the skipped inputs) for an ESC-50 folder."""
    root = Path(esc_dir).expanduser().resolve()
    order_templates(cfg.templates)
    if not 0 <= cfg.gap[0] <= cfg.gap[1]:
        raise CliptimeError(f"--gap {cfg.gap[0]:g} {cfg.gap[1]:g}: expected 0 <= min <= max")
    clip_seconds = clip_samples / sample_rate
    event_samples = int(0.5 * event_room(clip_seconds, tuple(cfg.gap)) * sample_rate)
    recordings, problems = read_meta(root, cfg)
    settle(problems, skip_bad)
    events, unreadable = read_checked(recordings, EventReader(sample_rate, event_samples), scratch)
    skipped = settle(problems + unreadable, skip_bad)
    kept = recordings[~recordings["input"].isin({b.input for b in unreadable})]
    for split in ("train", "val", "test"):
        if kept.loc[kept["split"] == split, "category"].nunique() < 2:
            raise CliptimeError(f"{root}: the {split} split needs recordings of at least 2 categories to mix")
    labels = {c: label_of(c) for c in sorted(kept["category"].unique())}
    mixer = MixEvents(cfg, sample_rate, clip_samples, labels, schema)
    datasets = {
        split: events.filter(expr=col("split") == split)
        .random_shuffle(seed=cfg.seed)
        .map_batches(mixer, batch_format="pandas", batch_size=MIX_BATCH)
        for split in ("train", "val", "test")
    }
    source = {
        "converter": "cliptime.data.esc50",
        "esc_dir": str(root),
        "sample_rate": sample_rate,
        "clip_seconds": clip_seconds,
        "classes": labels,
        "test_fold": cfg.test_fold,
        "pairs_per_event": cfg.pairs_per_event,
        "templates": cfg.templates,
        "skipped": len(skipped),
    }
    return datasets, source, skipped
