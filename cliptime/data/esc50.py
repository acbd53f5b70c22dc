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

WebDataset tar shards of single events (`convert_webdataset`): each sample a flac or wav member and a json member
with the event's `label` (and optionally the `source` recording it was cut from). Their events are cut and mixed
as ESC-50's; the splits are 70/15/15 by source recording (each sample its own without one), as time-lapse photos
are split by series.
"""

from __future__ import annotations

import hashlib
import io
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import ray.data
from ray.data.expressions import col

from cliptime.config import option
from cliptime.data import webdataset
from cliptime.data.shards import display, file_system
from cliptime.data.sound_events import ClipWriter, event_room, from_pcm16, order_templates, to_pcm16
from cliptime.data.timelapse import series_splits
from cliptime.data.user_files import BadInput, read_checked, read_csv_table, settle
from cliptime.errors import CliptimeError

META = Path("meta") / "esc50.csv"
REQUIRED_COLUMNS = ("filename", "fold", "target", "category")
MIX_BATCH = 64  # events among which partners are drawn


@dataclass
class MixConfig:
    """How single events become order clips: the settings every converter of event collections shares."""

    audio_model: str = option("cliptime-tiny-cnn6", "CLAP audio config the clips are for: its rate and clip length")
    pairs_per_event: int = option(2, "mixed pairs (each in both orders) that each event starts")
    singles_fraction: float = option(0.3, "share of events that also appear alone with a plain caption")
    gap: tuple[float, float] = option((0.0, 0.0), "range of the silent gap between the two events, seconds")
    templates: str = option(
        "basic", "order-caption template set: basic (3 phrasings), rich (7) or grammar (246 composed from parts)"
    )
    seed: int = option(0, "seed of the splits, the shuffling and the mixing")


@dataclass
class ESC50Config(MixConfig):
    test_fold: int = option(5, "fold held out as the test split")


@dataclass
class EventSamplesConfig(MixConfig):
    """WebDataset tar shards of single events (`convert_webdataset`)."""

    labels: str = option(
        "", "the event labels samples may have, comma-separated: a sample with another is a bad input (empty: any)"
    )


def label_of(category: str) -> str:
    return category.replace("_", " ").strip()


def loudest(x: np.ndarray, n: int) -> np.ndarray:
    """The `n`-sample stretch of `x` with the most energy (all of `x` if it is shorter)."""
    if len(x) <= n:
        return x
    energy = np.concatenate([[0.0], np.cumsum(x.astype(np.float64) ** 2)])
    start = int(np.argmax(energy[n:] - energy[:-n]))
    return x[start : start + n]


def read_event(source: str | Path | IO[bytes], sample_rate: int, event_samples: int) -> bytes:
    """A recording (a file or its bytes) mixed down to mono, resampled to `sample_rate` and cut to its loudest
    `event_samples`, as 16-bit PCM; raises RuntimeError or ValueError (soundfile's errors are both) for audio that
    cannot be read."""
    import soundfile as sf
    from scipy.signal import resample_poly

    x, sr = sf.read(source, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    if len(x) == 0:
        raise ValueError("no samples")
    if not np.isfinite(x).all():
        raise ValueError("NaN or infinite samples")
    if sr != sample_rate:
        g = math.gcd(sr, sample_rate)
        x = resample_poly(x, sample_rate // g, sr // g).astype(np.float32)
    return to_pcm16(loudest(x, event_samples))


def unreadable_audio(e: Exception) -> str:
    return f"unreadable audio ({str(e).splitlines()[0] if str(e) else type(e).__name__})"


class EventReader:
    """Read pass (see cliptime.data.user_files): a recording -> its loudest event-length stretch at the model's
    rate, as 16-bit PCM."""

    def __init__(self, sample_rate: int, event_samples: int):
        self.sample_rate, self.event_samples = sample_rate, event_samples

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        errors, audio = [], []
        for path in batch["input"]:
            try:
                audio.append(read_event(path, self.sample_rate, self.event_samples))
                errors.append("")
            except (RuntimeError, ValueError) as e:
                errors.append(unreadable_audio(e))
                audio.append(b"")
        return batch.assign(error=errors, audio=audio)


# a WebDataset sample's recording member, the first one present
AUDIO_MEMBERS = ("flac", "wav")


class SampleEventReader:
    """Read pass over WebDataset samples (cliptime.data.webdataset): a recording member (flac or wav) and a `json`
    member naming its event `label` (and, optionally, the `source` recording it was cut from, so that events of one
    recording stay in one split) -> the event as `EventReader` cuts it, or the error that makes the sample bad."""

    def __init__(self, sample_rate: int, event_samples: int, labels: tuple[str, ...]):
        self.sample_rate, self.event_samples, self.labels = sample_rate, event_samples, labels

    def __call__(self, members: webdataset.Members) -> dict[str, Any]:
        row = {"error": "", "audio": b"", "category": "", "source": ""}
        recording = next((members[k] for k in AUDIO_MEMBERS if k in members), None)
        try:
            if recording is None:
                raise ValueError(f"no audio member ({', '.join(AUDIO_MEMBERS)})")
            meta = webdataset.member_json(members)
            label = meta.get("label")
            if not isinstance(label, str) or not label.strip():
                raise ValueError("json has no label")
            if self.labels and label.strip() not in self.labels:
                raise ValueError(f"unknown label {label!r} (--labels {','.join(self.labels)})")
            row["category"], row["source"] = label.strip(), str(meta.get("source") or "")
        except ValueError as e:
            return {**row, "error": str(e)}
        try:
            row["audio"] = read_event(io.BytesIO(recording), self.sample_rate, self.event_samples)
        except (RuntimeError, ValueError) as e:
            row["error"] = unreadable_audio(e)
        return row


def read_meta(root: Path, cfg: ESC50Config) -> tuple[pd.DataFrame, list[BadInput]]:
    """One row per recording: input (path), category, and its split."""
    if not root.is_dir():
        raise CliptimeError(f"ESC-50 folder {root} does not exist")
    meta = root / META
    if not meta.is_file():
        raise CliptimeError(f"{meta} is missing: an ESC-50-layout folder has meta/esc50.csv and audio/")
    table = read_csv_table(meta)
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


def event_samples(cfg: MixConfig, sample_rate: int, clip_samples: int) -> int:
    """Samples of one event: half of what a clip leaves for two events around their gap (the template set and the
    gap are checked first)."""
    order_templates(cfg.templates)
    if not 0 <= cfg.gap[0] <= cfg.gap[1]:
        raise CliptimeError(f"--gap {cfg.gap[0]:g} {cfg.gap[1]:g}: expected 0 <= min <= max")
    return int(0.5 * event_room(clip_samples / sample_rate, tuple(cfg.gap)) * sample_rate)


def mixed_splits(
    events: ray.data.Dataset,
    kept: pd.DataFrame,
    cfg: MixConfig,
    sample_rate: int,
    clip_samples: int,
    schema: pa.Schema,
    where: str,
) -> tuple[dict[str, ray.data.Dataset], dict[str, Any]]:
    """The second half of a conversion, whatever held the events: the good events (`events`, with their input,
    category, split and audio; `kept`: their category and split) mixed into order clips per split, and what the
    manifest's `source` says of them. `where` names the input in errors."""
    for split in ("train", "val", "test"):
        if kept.loc[kept["split"] == split, "category"].nunique() < 2:
            raise CliptimeError(f"{where}: the {split} split needs recordings of at least 2 categories to mix")
    labels = {c: label_of(c) for c in sorted(kept["category"].unique())}
    mixer = MixEvents(cfg, sample_rate, clip_samples, labels, schema)
    datasets = {
        split: events.filter(expr=col("split") == split)
        .random_shuffle(seed=cfg.seed)
        .map_batches(mixer, batch_format="pandas", batch_size=MIX_BATCH)
        for split in ("train", "val", "test")
    }
    source = {
        "sample_rate": sample_rate,
        "clip_seconds": clip_samples / sample_rate,
        "classes": labels,
        "pairs_per_event": cfg.pairs_per_event,
        "templates": cfg.templates,
    }
    return datasets, source


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
    samples = event_samples(cfg, sample_rate, clip_samples)
    recordings, problems = read_meta(root, cfg)
    settle(problems, skip_bad)
    events, unreadable = read_checked(recordings, EventReader(sample_rate, samples), scratch)
    skipped = settle(problems + unreadable, skip_bad)
    kept = recordings[~recordings["input"].isin({b.input for b in unreadable})]
    datasets, mixed = mixed_splits(events, kept, cfg, sample_rate, clip_samples, schema, str(root))
    source = {
        "converter": "cliptime.data.esc50",
        "esc_dir": str(root),
        **mixed,
        "test_fold": cfg.test_fold,
        "skipped": len(skipped),
    }
    return datasets, source, skipped


def source_recordings(events: pd.DataFrame) -> pd.Series:
    """Each WebDataset event's source recording, what splits keep together: its json's `source`, else itself."""
    return events["source"].where(events["source"] != "", events["input"])


def convert_webdataset(
    location: str | Path,
    cfg: EventSamplesConfig,
    sample_rate: int,
    clip_samples: int,
    schema: pa.Schema,
    scratch: Path,
    skip_bad: bool,
) -> tuple[dict[str, ray.data.Dataset], dict[str, Any], list[str]]:
    """(lazy `schema` datasets per split, the manifest's `source`, the skipped samples) for WebDataset tar shards of
    single events (`SampleEventReader`): split 70/15/15 by source recording (`timelapse.series_splits`), then mixed
    into order clips as an ESC-50 folder's events are."""
    samples = event_samples(cfg, sample_rate, clip_samples)
    labels = tuple(label.strip() for label in cfg.labels.split(",") if label.strip())
    shards = display(*file_system(location))  # a URI without its query: no credentials in messages or manifests
    where = f"WebDataset shards {shards}"
    events, bad = webdataset.read_samples(location, SampleEventReader(sample_rate, samples, labels), scratch)
    skipped = settle(bad, skip_bad)
    kept = events.select_columns(["input", "category", "source"]).to_pandas()
    if kept.empty:
        raise CliptimeError(f"{where}: no usable samples left after skipping {len(skipped)} bad inputs")
    splits = series_splits(sorted(source_recordings(kept).unique()), cfg.seed, "source recordings")
    kept["split"] = source_recordings(kept).map(splits)
    events = events.add_column("split", lambda batch: source_recordings(batch).map(splits), batch_format="pandas")
    datasets, mixed = mixed_splits(events, kept, cfg, sample_rate, clip_samples, schema, where)
    source = {"converter": "cliptime.data.esc50:webdataset", "webdataset": shards, **mixed, "skipped": len(skipped)}
    return datasets, source, skipped
