"""Clotho-layout captioned audio -> T-CLAP shards (schema in cliptime.tasks.tclap), one row per (recording, caption).

Layout::

    CLOTHO_DIR/
      clotho_captions_development.csv   # file_name,caption_1,...,caption_5 -> the train split
      clotho_captions_validation.csv    #                                    -> val
      clotho_captions_evaluation.csv    #                                    -> test
      development/  validation/  evaluation/   # the recordings each CSV names: WAV or FLAC, any rate and channels

A CSV has a `file_name` column and caption columns `caption_1`, `caption_2`, ... (Clotho has five); every caption
of a recording becomes one row with the recording's audio, resampled to the model's rate and cut to its loudest
stretch of clip length (padded with silence when shorter), as the ESC-50 converter cuts its events. A caption that
states the order of two events (`cliptime.data.order_phrases.ORDER_RULES`: "X, then Y", "X followed by Y",
"Y after X", ...) gets the same caption with the two events swapped as its negative; the others get none (""), as
single-event clips do. Captions name no event classes: `first` and `second` are "" and `pair` is -1. T-Classify,
the task's validation measure, needs ordered captions, so the validation and evaluation sets must have some.
The schema holds one caption per row, so a recording's clip is stored once per caption (five times for Clotho).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import ray.data
from ray.data.expressions import col

from cliptime.config import option
from cliptime.data.esc50 import EventReader
from cliptime.data.order_phrases import reversed_caption
from cliptime.data.user_files import BadInput, read_checked, settle
from cliptime.errors import CliptimeError

SPLITS = {"train": "development", "val": "validation", "test": "evaluation"}  # split -> Clotho's name for it
CAPTION_COLUMN = re.compile(r"caption_\d+")


@dataclass(frozen=True)
class ClothoConfig:
    audio_model: str = option("cliptime-tiny-cnn6", "CLAP audio config the clips are for: its rate and clip length")


def captions_csv(root: Path, split: str) -> Path:
    return root / f"clotho_captions_{SPLITS[split]}.csv"


def read_captions(root: Path, split: str) -> tuple[list[dict[str, Any]], list[BadInput]]:
    """One item per recording of `split`'s CSV: input (path), split, its captions and their negatives."""
    path = captions_csv(root, split)
    if not path.is_file():
        raise CliptimeError(
            f"{path} is missing: a Clotho-layout folder has clotho_captions_{{development,validation,evaluation}}.csv "
            "and the development/, validation/ and evaluation/ audio folders"
        )
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            lines = [(reader.line_num, row) for row in reader if row]  # blank lines are no rows
    except UnicodeDecodeError:
        raise CliptimeError(f"{path} is not UTF-8 text") from None
    except csv.Error as e:
        raise CliptimeError(f"{path} is not a readable CSV ({e})") from None
    if not lines:
        raise CliptimeError(f"{path} is empty (needs the header file_name,caption_1,...)")
    (_, header), rows = lines[0], lines[1:]
    missing = [c for c in ("file_name", "caption_1") if c not in header]
    if missing:
        raise CliptimeError(f"{path} lacks column(s) {', '.join(missing)} (needs file_name,caption_1,...)")
    if not rows:
        raise CliptimeError(f"{path} lists no recordings")
    captions = [c for c in header if CAPTION_COLUMN.fullmatch(c)]
    items, problems = [], []
    listed: dict[Path, int] = {}  # recording -> the line that lists it
    for line, values in rows:
        where = f"{path} line {line}"
        if len(values) != len(header):
            problems.append(BadInput(where, f"{len(values)} fields, the header has {len(header)}"))
            continue
        row = dict(zip(header, values))
        name = row["file_name"].strip()
        audio = root / SPLITS[split] / name
        empty = [c for c in captions if not row[c].strip()]
        if not name:
            problems.append(BadInput(where, "empty file_name"))
        elif not audio.is_file():
            problems.append(BadInput(where, f"{SPLITS[split]}/{name} does not exist"))
        elif audio in listed:
            problems.append(BadInput(where, f"{SPLITS[split]}/{name} is listed twice (also on line {listed[audio]})"))
        elif empty:
            problems.append(BadInput(where, f"empty {', '.join(empty)}"))
        else:
            listed[audio] = line
            texts = [row[c].strip() for c in captions]
            items.append(
                {
                    "input": str(audio),
                    "split": split,
                    "captions": texts,
                    "negatives": list(map(reversed_caption, texts)),
                }
            )
    return items, problems


class CaptionRows:
    """Second pass: each recording -> one shard row per caption, its clip padded to the model's length."""

    def __init__(self, sample_rate: int, clip_samples: int, schema: pa.Schema):
        self.sample_rate, self.clip_samples, self.schema = sample_rate, clip_samples, schema

    def __call__(self, recordings: pd.DataFrame) -> pa.Table:
        rows = recordings.explode(["captions", "negatives"])
        n = len(rows)
        return pa.table(
            {
                "audio": [a + bytes(2 * self.clip_samples - len(a)) for a in rows["audio"]],  # 16-bit silence
                "sample_rate": [self.sample_rate] * n,
                "caption": list(rows["captions"]),
                "negative": list(rows["negatives"]),
                "first": [""] * n,
                "second": [""] * n,
                "pair": [-1] * n,
            },
            schema=self.schema,
        )


def convert(
    clotho_dir: str | Path, sample_rate: int, clip_samples: int, schema: pa.Schema, scratch: Path, skip_bad: bool
) -> tuple[dict[str, ray.data.Dataset], dict[str, Any], list[str]]:
    """(lazy `schema` datasets per split, the manifest's `source`, the skipped inputs) for a Clotho-layout folder."""
    root = Path(clotho_dir).expanduser().resolve()
    if not root.is_dir():
        raise CliptimeError(f"Clotho folder {root} does not exist")
    items, problems = [], []
    for split in SPLITS:
        split_items, split_problems = read_captions(root, split)
        items += split_items
        problems += split_problems
    settle(problems, skip_bad)
    recordings = pd.DataFrame(items, columns=["input", "split", "captions", "negatives"])
    clips, unreadable = read_checked(recordings, EventReader(sample_rate, clip_samples), scratch)
    skipped = settle(problems + unreadable, skip_bad)
    kept = recordings[~recordings["input"].isin({b.input for b in unreadable})]
    ordered = {split: 0 for split in SPLITS}
    for split, negatives in zip(kept["split"], kept["negatives"]):
        ordered[split] += sum(map(bool, negatives))
    for split in SPLITS:
        if not (kept["split"] == split).any():
            raise CliptimeError(f"{captions_csv(root, split)}: no readable recording is left")
        if split != "train" and not ordered[split]:
            raise CliptimeError(
                f'{captions_csv(root, split)}: no caption states the order of two events ("X, then Y", "X followed '
                "by Y\", ...); T-Classify, the task's validation and test measure, needs some"
            )
    rows = CaptionRows(sample_rate, clip_samples, schema)
    datasets = {
        split: clips.filter(expr=col("split") == split).map_batches(rows, batch_format="pandas") for split in SPLITS
    }
    source = {
        "converter": "cliptime.data.clotho",
        "clotho_dir": str(root),
        "sample_rate": sample_rate,
        "clip_seconds": clip_samples / sample_rate,
        "classes": {},  # free-text captions name no event classes
        "ordered_captions": ordered,
        "skipped": len(skipped),
    }
    return datasets, source, skipped
