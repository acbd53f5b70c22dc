"""Time-lapse photo folders -> CLIPTime shards (the schema documented in cliptime.tasks.cliptime).

Layout::

    PHOTOS_DIR/
      manifest.csv             # optional: path,stage,hours or path,stage,timestamp (+ optional caption)
      SERIES_A/                # one sub-folder per series: one culture, one camera
        0001.jpg ...
      SERIES_B/
        hyphae/0001.jpg ...    # or stages from sub-folder names (spore/, hyphae/, mycelium/)

WebDataset tar shards of photos (`convert_webdataset`) carry the same labels in each sample's json member
(`series`, `stage`, `hours` or `timestamp`) and its caption as a `txt` member; their photos are prepared and their
series split exactly as a folder's.

Every photo in a series sub-folder is used; `manifest.csv` (paths relative to PHOTOS_DIR) labels the photos it
names. A photo's time: `hours` from the manifest; else its time stamp (the manifest's `timestamp`, else the
photo's EXIF DateTimeOriginal) minus that of the first photo of its series. Its stage: the manifest's, else
the name of a folder on its path. Its caption: the manifest's, else one of the stage's templates. Photos are
prepared by `model_photo` (upright by EXIF, 8-bit RGB, center-cropped and resized to the model's input size),
which prediction uses too. Hidden files and folders (macOS's `._*`) are ignored; a photo PIL cannot decode (HEIC
without a plugin, a damaged file) is a bad input. Splits (70/15/15, at least one series each) are by series,
never by photo. The normalized time t is hours over the longest series' span (`source.hours` of the manifest).
"""

from __future__ import annotations

import datetime
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
from PIL import Image, ImageOps

from cliptime.config import option
from cliptime.data import webdataset
from cliptime.data.fungal_growth import STAGES, caption_templates
from cliptime.data.images import encode_image
from cliptime.data.shards import display, file_system
from cliptime.data.user_files import BadInput, by_split, read_checked, read_csv_table, settle, visible_files
from cliptime.errors import CliptimeError

# HEIC/HEIF are listed so that an iPhone's photos are named as unreadable (PIL decodes them only with a plugin
# such as pillow-heif registered), not silently left out.
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".avif", ".heic", ".heif"}
# what PIL raises for a file it cannot decode, and to_rgb8 for NaN pixels
UNREADABLE_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
MANIFEST = "manifest.csv"
EXIF_IFD, DATETIME_ORIGINAL = 0x8769, 36867
EXIF_TIME_FORMAT = "%Y:%m:%d %H:%M:%S"


@dataclass
class TimelapseConfig:
    model: str = option("cliptime-tiny-rn", "open_clip model the shards are for: photos get its input size")
    image_size: int = option(0, "resize photos to this many pixels instead (0: the model's input size)")
    templates: str = option("generic", "caption template set for photos that have no caption")
    seed: int = option(0, "seed of the split by series and of the caption choice")


def parse_time(text: str) -> float:
    """Seconds since the epoch of an ISO 8601 or EXIF ("2024:05:01 13:45:00") time stamp; naive means UTC."""
    text = text.strip()
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        when = datetime.datetime.strptime(text, EXIF_TIME_FORMAT)  # raises ValueError naming the text
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def to_rgb8(image: Image.Image) -> Image.Image:
    """8-bit RGB of an image of any mode, scaling deep images rather than clipping them (PIL's own conversion
    clips a 16-bit image at 255 and turns a 0..1 float image black).

    Integer images of more than 8 bits (modes I;16*, I) are divided by the top value of the smallest even bit
    depth, at least 8, that holds the image's maximum, taken for the camera's bit depth, which 16-bit files seldom
    record (a 12-bit camera's frames stored in 16-bit files are divided by 4095, a full 16-bit image by 65535). A frame
    whose maximum is below a quarter of its camera's range is therefore brightened 4 times (16 times below a
    sixteenth, ...); negative values become 0. Float images (mode F) are taken as 0..1 when all values lie there,
    else stretched from their minimum to their maximum. NaN or infinite pixels raise ValueError."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image.convert("RGB")
    x = np.asarray(image, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("NaN or infinite pixel values")
    if image.mode == "F":
        lo, hi = (0.0, 1.0) if 0 <= x.min() and x.max() <= 1 else (x.min(), x.max())
    else:
        bits = max(8, int(x.max()).bit_length())
        lo, hi = 0.0, 2.0 ** (bits + bits % 2) - 1
    scaled = np.clip((x - lo) / ((hi - lo) or 1.0), 0.0, 1.0) * 255
    return Image.fromarray(np.round(scaled).astype(np.uint8), "L").convert("RGB")


def model_photo(photo: Image.Image, size: int) -> Image.Image:
    """A photo as the model sees it: turned upright by its EXIF orientation, in 8-bit RGB (`to_rgb8`),
    center-cropped and resized to `size` x `size`. Shards and predictions both prepare photos here, so a model is
    asked about photos prepared exactly as those it learnt from. Decodes the whole file: truncation fails here."""
    return ImageOps.fit(to_rgb8(ImageOps.exif_transpose(photo)), (size, size), Image.BICUBIC)


def read_photo(source: str | Path | IO[bytes], size: int) -> tuple[bytes, str]:
    """(the shard bytes of the photo prepared by `model_photo` at `size`, its raw EXIF DateTimeOriginal or "") of a
    photo file or its bytes; raises one of UNREADABLE_IMAGE for a photo that cannot be decoded."""
    with Image.open(source) as photo:
        taken = str(photo.getexif().get_ifd(EXIF_IFD).get(DATETIME_ORIGINAL, "")).strip("\x00 ")
        prepared = model_photo(photo, size)
    return encode_image(prepared), taken


def unreadable_image(e: Exception) -> str:
    return f"unreadable or truncated image ({str(e).splitlines()[0] if str(e) else type(e).__name__})"


class PhotoReader:
    """Read pass (see cliptime.data.user_files): a photo -> a shard image at the model's size and its raw EXIF time."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out: dict[str, list] = {"error": [], "image": [], "exif_time": []}
        for path in batch["input"]:
            image, taken, error = b"", "", ""
            try:
                image, taken = read_photo(path, self.size)
            except UNREADABLE_IMAGE as e:
                error = unreadable_image(e)
            for k, v in zip(out, (error, image, taken)):
                out[k].append(v)
        return batch.assign(**out)


# a WebDataset sample's photo member: any suffix a photo folder takes (PHOTO_SUFFIXES), the first one present
PHOTO_MEMBERS = tuple(sorted(suffix.lstrip(".") for suffix in PHOTO_SUFFIXES))


def sample_labels(meta: dict[str, Any]) -> dict[str, Any]:
    """A WebDataset photo's series, stage and time from its json member (`series`, `stage`, and `hours` or a
    `timestamp`: ISO 8601 or EXIF text, or seconds since the epoch); raises ValueError saying what is wrong."""
    series, stage = ("" if meta.get(k) is None else str(meta[k]).strip() for k in ("series", "stage"))
    labels = {**_no_labels(), "series": series}
    if not series:
        raise ValueError("json has no series")
    if not stage:
        raise ValueError("json has no stage")
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (expected {', '.join(STAGES)})")
    labels["stage"] = stage
    hours, when = meta.get("hours"), meta.get("timestamp")
    if hours is None and when is None:
        raise ValueError("json has neither hours nor timestamp")
    if hours is not None:
        try:
            if isinstance(hours, bool):
                raise TypeError(hours)
            labels["hours"] = finite_non_negative(float(hours))
        except (TypeError, ValueError):
            raise ValueError(f"hours {hours!r} is not a finite non-negative number") from None
    elif isinstance(when, (int, float)) and not isinstance(when, bool):
        labels["timestamp"] = float(when)
    else:
        try:
            labels["timestamp"] = parse_time(str(when))
        except ValueError:
            raise ValueError(f"cannot parse timestamp {when!r}") from None
    return labels


class SamplePhotoReader:
    """Read pass over WebDataset samples (cliptime.data.webdataset): a photo member (jpg, png, webp, ...), a `txt`
    caption (optional) and a `json` member with its labels (`sample_labels`) -> the photo as a shard image at the
    model's size (`read_photo`) and its labels, or the error that makes the sample bad.
    Times come from the json only."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, members: webdataset.Members) -> dict[str, Any]:
        row = {"error": "", "image": b"", "exif_time": "", "series": "", **_no_labels()}
        photo = next((members[k] for k in PHOTO_MEMBERS if k in members), None)
        try:
            if photo is None:
                raise ValueError(f"no photo member ({', '.join(PHOTO_MEMBERS)})")
            row.update(sample_labels(webdataset.member_json(members)))
            row["caption"] = members.get("txt", b"").decode("utf-8", errors="replace").strip()
        except ValueError as e:
            return {**row, "error": str(e)}
        try:
            row["image"], _ = read_photo(io.BytesIO(photo), self.size)
        except UNREADABLE_IMAGE as e:
            row["error"] = unreadable_image(e)
        return row


def finite_non_negative(x: float) -> float:
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(x)
    return x


def _no_labels() -> dict[str, Any]:
    """A photo's labels before the manifest and its folders say anything (NaN: not known yet)."""
    return {"stage": "", "hours": math.nan, "timestamp": math.nan, "caption": ""}


def _stage_from_folders(rel: Path) -> str:
    return next((part for part in rel.parts[:-1] if part in STAGES), "")


def list_photos(root: Path) -> tuple[pd.DataFrame, list[BadInput]]:
    """One row per photo: input (path), series, and the labels the manifest and folder names give it."""
    if not root.is_dir():
        raise CliptimeError(f"photo folder {root} does not exist")
    files = visible_files(root, PHOTO_SUFFIXES)
    if not files:
        raise CliptimeError(f"photo folder {root} is empty: no {'/'.join(sorted(PHOTO_SUFFIXES))} files found")
    rows = {p.relative_to(root): _no_labels() for p in files}
    problems: list[BadInput] = []
    manifest = root / MANIFEST
    if manifest.exists():
        table = read_csv_table(manifest)
        if "path" not in table.columns:
            raise CliptimeError(f"{manifest} has no 'path' column (expected path,stage,hours or path,stage,timestamp)")
        listed: dict[Path, int] = {}  # photo -> the manifest line that labels it
        for i, row in enumerate(table.to_dict("records")):
            where = f"{manifest} line {i + 2}"
            rel = Path(row["path"])  # Path equality ignores "./" and doubled slashes
            if not (root / rel).is_file():
                problems.append(BadInput(where, f"{row['path']} does not exist"))
                continue
            if rel in listed:
                problems.append(BadInput(where, f"{row['path']} is listed twice (also on line {listed[rel]})"))
                continue
            listed[rel] = i + 2
            labels = rows.setdefault(rel, _no_labels())
            labels["caption"] = row.get("caption", "")
            stage = row.get("stage", "").strip()
            if stage in STAGES:
                labels["stage"] = stage
            elif stage:
                problems.append(BadInput(where, f"unknown stage {stage!r} (expected {', '.join(STAGES)})"))
            hours = row.get("hours", "").strip()
            try:
                if hours:
                    labels["hours"] = finite_non_negative(float(hours))
            except ValueError:
                problems.append(BadInput(where, f"hours {hours!r} is not a finite non-negative number"))
            try:
                if row.get("timestamp", "").strip():
                    labels["timestamp"] = parse_time(row["timestamp"])
            except ValueError:
                problems.append(BadInput(where, f"cannot parse timestamp {row['timestamp']!r}"))
    table = []
    for rel, labels in rows.items():
        if len(rel.parts) < 2:
            problems.append(BadInput(str(root / rel), "photo is not in a series sub-folder"))
            continue
        stage = labels["stage"] or _stage_from_folders(rel)
        table.append({"input": str(root / rel), "series": rel.parts[0], **labels, "stage": stage})
    return pd.DataFrame(table), problems


def series_splits(series: list[str], seed: int, what: str = "series") -> dict[str, str]:
    """70/15/15 by series (or other groups of inputs that `what` names), in a seeded random order, with at least one
    series in each split."""
    if len(series) < 3:
        raise CliptimeError(f"{len(series)} {what} found: splits are by {what}, so at least 3 are needed")
    order = [series[i] for i in np.random.default_rng(seed).permutation(len(series))]
    n_val = n_test = max(1, round(0.15 * len(series)))
    n_train = len(order) - n_val - n_test
    return {s: ("train" if i < n_train else "val" if i < n_train + n_val else "test") for i, s in enumerate(order)}


def label_photos(photos: pd.DataFrame, cfg: TimelapseConfig) -> tuple[pd.DataFrame, list[BadInput]]:
    """Hours from the manifest or time stamps, caption and frame per photo; photos lacking a stage or a time are
    returned as problems (split and normalized time are attached later, by AttachLabels)."""
    if photos.empty:  # every photo was a bad input
        return photos, []
    problems: list[BadInput] = []
    photos = photos.copy()
    exif = []
    for r in photos.itertuples():
        try:
            exif.append(parse_time(r.exif_time) if r.exif_time else math.nan)
        except ValueError:
            exif.append(math.nan)  # an unreadable camera clock counts as none
    photos["when"] = photos["timestamp"].fillna(pd.Series(exif, index=photos.index))
    since_start = photos["when"] - photos.groupby("series")["when"].transform("min")
    photos["hours"] = photos["hours"].fillna(since_start / 3600)
    keep = []
    for r in photos.itertuples():
        if not r.stage:
            problems.append(BadInput(r.input, f"no stage: name it in {MANIFEST} or use a {'/'.join(STAGES)} folder"))
        elif math.isnan(r.hours):
            reason = f"no time: no hours or timestamp in {MANIFEST}, no EXIF DateTimeOriginal"
            problems.append(BadInput(r.input, reason))
        else:
            keep.append(r.Index)
    photos = photos.loc[keep]
    if photos.empty:
        return photos, problems
    templates = caption_templates(cfg.templates)

    def caption(r) -> str:
        choices = templates[r.stage]
        return r.caption or choices[zlib.crc32(f"{cfg.seed}:{r.input}".encode()) % len(choices)]

    photos["caption"] = [caption(r) for r in photos.itertuples()]
    photos["frame"] = photos.groupby("series")["hours"].rank(method="first").astype(np.int32) - 1
    return photos, problems


class AttachLabels:
    """Second pass: checked photos + their labels -> rows of the CLIPTime shard schema and their split."""

    def __init__(self, labels: pd.DataFrame, max_hours: float, splits: dict[str, str]):
        self.labels, self.max_hours, self.splits = labels.set_index("input"), max_hours, splits

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch[batch["input"].isin(self.labels.index)]
        lab = self.labels.loc[batch["input"]]
        return pd.DataFrame(
            {
                "image": batch["image"].to_numpy(),
                "stage": lab["stage"].to_numpy(),
                "hours": lab["hours"].to_numpy(np.float64),
                "t": (lab["hours"] / self.max_hours).to_numpy(np.float32),
                "caption": lab["caption"].to_numpy(),
                "sequence": lab["series"].to_numpy(),
                "frame": lab["frame"].to_numpy(np.int32),
                "split": lab["series"].map(self.splits).to_numpy(),
            }
        )


def convert(
    photos_dir: str | Path, cfg: TimelapseConfig, size: int, schema: pa.Schema, scratch: Path, skip_bad: bool
) -> tuple[dict[str, ray.data.Dataset], dict[str, Any], list[str]]:
    """(lazy `schema` datasets per split, the manifest's `source`, the skipped inputs) for a time-lapse folder."""
    root = Path(photos_dir).expanduser().resolve()
    caption_templates(cfg.templates)
    photos, problems = list_photos(root)
    settle(problems, skip_bad)
    good, unreadable = read_checked(photos[["input"]], PhotoReader(size), scratch)
    times = good.select_columns(["input", "exif_time"]).to_pandas()
    source = {"converter": "cliptime.data.timelapse", "photos_dir": str(root)}
    photos = photos.merge(times, on="input")
    return split_by_series(
        good, photos, problems + unreadable, cfg, size, schema, skip_bad, f"photo folder {root}", source
    )


def split_by_series(
    good: ray.data.Dataset,
    photos: pd.DataFrame,
    problems: list[BadInput],
    cfg: TimelapseConfig,
    size: int,
    schema: pa.Schema,
    skip_bad: bool,
    where: str,
    source: dict[str, Any],
) -> tuple[dict[str, ray.data.Dataset], dict[str, Any], list[str]]:
    """The second half of a conversion, whatever held the photos: `photos` (one row per good photo of `good`, with
    its series and the labels found) labelled (`label_photos`), every problem settled, the series split, and the
    labels attached to the prepared photos. `where` names the input in errors; `source` in the manifest, which
    gets the rest of its `source` here."""
    labels, unlabeled = label_photos(photos, cfg)
    skipped = settle(problems + unlabeled, skip_bad)
    if labels.empty:
        raise CliptimeError(f"{where}: no usable photos left after skipping {len(skipped)} bad inputs")
    max_hours = float(labels["hours"].max())
    if max_hours <= 0:
        raise CliptimeError(f"{where}: every photo is at hour 0, so there is no time to learn")
    splits = series_splits(sorted(labels["series"].unique()), cfg.seed)
    rows = good.map_batches(AttachLabels(labels, max_hours, splits), batch_format="pandas")
    source = {
        **source,
        "hours": [0.0, max_hours],
        "image_size": size,
        "series": {s: sorted(k for k, v in splits.items() if v == s) for s in ("train", "val", "test")},
        "templates": cfg.templates,
        "skipped": len(skipped),
    }
    return by_split(rows, schema), source, skipped


def convert_webdataset(
    location: str | Path, cfg: TimelapseConfig, size: int, schema: pa.Schema, scratch: Path, skip_bad: bool
) -> tuple[dict[str, ray.data.Dataset], dict[str, Any], list[str]]:
    """(lazy `schema` datasets per split, the manifest's `source`, the skipped samples) for WebDataset tar shards
    of photos (`SamplePhotoReader`), split by series as a time-lapse folder is."""
    caption_templates(cfg.templates)
    shards = display(*file_system(location))  # a URI without its query: no credentials in messages or manifests
    good, bad = webdataset.read_samples(location, SamplePhotoReader(size), scratch)
    settle(bad, skip_bad)
    photos = good.drop_columns(["image"]).to_pandas()
    source = {"converter": "cliptime.data.timelapse:webdataset", "webdataset": shards}
    return split_by_series(good, photos, bad, cfg, size, schema, skip_bad, f"WebDataset shards {shards}", source)
