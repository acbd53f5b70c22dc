"""WebDataset tar shards -> shards: photos for CLIPTime, single sound events for T-CLAP, written here with tarfile."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from cliptime.cli import make_shards_main
from cliptime.convert import shard_folder, write_user_shards
from cliptime.data.esc50 import EventSamplesConfig
from cliptime.data.sound_events import from_pcm16
from cliptime.data.timelapse import TimelapseConfig, sample_labels, series_splits
from cliptime.errors import CliptimeError
from cliptime.pipeline import prepare
from cliptime.tasks import TASKS, make_task

CLIPTIME, TCLAP = TASKS["cliptime"], TASKS["tclap"]
SPLITS = ("train", "val", "test")
STAGE_OF = ("spore", "hyphae", "mycelium")


def write_tar(path, samples: list[dict[str, bytes]]) -> None:
    """A WebDataset shard: each sample's members as KEY.SUFFIX, in order (`__key__` names the sample)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for suffix, data in sample.items():
                if suffix != "__key__":
                    info = tarfile.TarInfo(f"{sample['__key__']}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def encoded(shade: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (shade, 255 - shade, 90)).save(buf, format=fmt)
    return buf.getvalue()


def photo_sample(key: str, series: str, stage: str, fmt: str = "PNG", caption: str | None = None, **time) -> dict:
    sample = {"__key__": key, fmt.lower().replace("jpeg", "jpg"): encoded(60 * STAGE_OF.index(stage), fmt)}
    if caption is not None:
        sample["txt"] = caption.encode()
    sample["json"] = json.dumps({"series": series, "stage": stage, **time}).encode()
    return sample


def photo_shards(root) -> None:
    """Four series of three photos (spore, hyphae, mycelium) in two tar files: dish-a and dish-b with hours (0, 5,
    10 and 1, 4, 7), dish-c and dish-d with ISO time stamps 6 hours apart; JPEG, PNG and WebP; captions on two."""
    write_tar(
        root / "shard-000.tar",
        [photo_sample(f"a{i}", "dish-a", s, "JPEG", f"dish a, photo {i}", hours=5 * i) for i, s in enumerate(STAGE_OF)]
        + [
            photo_sample(f"b{i}", "dish-b", s, "PNG", f"dish b, photo {i}", hours=1 + 3 * i)
            for i, s in enumerate(STAGE_OF)
        ],
    )
    write_tar(
        root / "sub" / "shard-001.tar",
        [
            photo_sample(f"{name}{i}", f"dish-{name}", s, "WEBP", timestamp=f"2025-03-01T{8 + 6 * i:02d}:00:00")
            for name in ("c", "d")
            for i, s in enumerate(STAGE_OF)
        ],
    )


def rows(out, split: str) -> pd.DataFrame:
    return pq.read_table(out / split).to_pandas()


def test_photo_shards_become_cliptime_shards_split_by_series(ray_session, tmp_path):
    photo_shards(tmp_path / "tars")
    result = write_user_shards(CLIPTIME, "webdataset-images", tmp_path / "tars", tmp_path / "shards", TimelapseConfig())
    manifest, source = result["manifest"], result["manifest"]["source"]
    assert result["skipped"] == [] and source["webdataset"] == str(tmp_path / "tars")
    assert source["hours"] == [0.0, 12.0]  # dish-c/d: 12 hours from their first time stamp
    splits = series_splits(["dish-a", "dish-b", "dish-c", "dish-d"], seed=0)  # the time-lapse converter's split
    assert source["series"] == {s: sorted(k for k, v in splits.items() if v == s) for s in SPLITS}
    assert {s: manifest["splits"][s]["rows"] for s in SPLITS} == {"train": 6, "val": 3, "test": 3}
    hours = {
        "dish-a": [0.0, 5.0, 10.0],
        "dish-b": [1.0, 4.0, 7.0],
        "dish-c": [0.0, 6.0, 12.0],
        "dish-d": [0.0, 6.0, 12.0],
    }
    for split in SPLITS:
        df = rows(tmp_path / "shards", split)
        assert {splits[s] for s in df["sequence"]} == {split}
        for series, photos in df.groupby("sequence"):
            photos = photos.sort_values("frame")
            assert photos["frame"].tolist() == [0, 1, 2]
            assert photos["stage"].tolist() == list(STAGE_OF)
            assert photos["hours"].tolist() == hours[series]
            np.testing.assert_allclose(photos["t"], photos["hours"] / 12.0, rtol=1e-6)
            if series in ("dish-a", "dish-b"):
                assert photos["caption"].tolist() == [f"dish {series[-1]}, photo {i}" for i in range(3)]
            else:  # no txt member: a caption of the stage's templates
                assert all(photos["caption"].str.len() > 0)
            image = Image.open(io.BytesIO(photos["image"].iloc[1]))  # model_photo's: the model's size
            assert image.size == (64, 64) and np.abs(np.subtract(image.getpixel((32, 32)), (60, 195, 90))).max() <= 4


@pytest.mark.slow
def test_one_tar_file_is_enough(ray_session, tmp_path):
    write_tar(
        tmp_path / "one.tar",
        [photo_sample(f"{s}{i}", s, stage, hours=2 * i) for s in "pqr" for i, stage in enumerate(STAGE_OF)],
    )
    cfg = TimelapseConfig(image_size=32)
    manifest = write_user_shards(CLIPTIME, "webdataset-images", tmp_path / "one.tar", tmp_path / "out", cfg)["manifest"]
    assert [manifest["splits"][s]["rows"] for s in SPLITS] == [3, 3, 3]
    assert manifest["source"]["image_size"] == 32 and manifest["source"]["hours"] == [0.0, 4.0]


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"series": 7, "stage": "spore", "hours": "2.5"}, {"series": "7", "hours": 2.5}),
        ({"series": "s", "stage": "hyphae", "timestamp": 1740816000}, {"timestamp": 1740816000.0}),
        ({"series": "s", "stage": "hyphae", "timestamp": "2025:03:01 08:00:00"}, {"timestamp": 1740816000.0}),
        ({"series": "s", "stage": "spore", "hours": True}, "hours True is not a finite non-negative number"),
        ({"series": "s", "stage": "spore", "hours": -1}, "hours -1 is not a finite non-negative number"),
        ({"series": "s", "stage": "spores", "hours": 1}, "unknown stage 'spores' (expected spore, hyphae, mycelium)"),
        ({"series": "s", "stage": "spore", "timestamp": "soon"}, "cannot parse timestamp 'soon'"),
        ({"stage": "spore", "hours": 1}, "json has no series"),
    ],
)
def test_photo_labels_from_a_samples_json(meta, expected):
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=re.escape(expected)):
            sample_labels(meta)
    else:
        labels = sample_labels(meta)
        assert {k: labels[k] for k in expected} == expected and labels["stage"] == meta["stage"]


def no_image(root):
    photo_shards(root)
    write_tar(root / "extra.tar", [{"__key__": "lonely", "txt": b"a caption", "json": b'{"series": "dish-a"}'}])
    return f"{root / 'extra.tar'} sample lonely: no photo member"


def unreadable_image(root):
    photo_shards(root)
    sample = photo_sample("broken", "dish-b", "spore", "JPEG", hours=2)
    sample["jpg"] = sample["jpg"][:150]
    write_tar(root / "extra.tar", [sample])
    return f"{root / 'extra.tar'} sample broken: unreadable or truncated image"


def no_stage(root):
    photo_shards(root)
    write_tar(
        root / "extra.tar",
        [{**photo_sample("x", "dish-a", "spore", hours=1), "json": b'{"series": "dish-a", "hours": 1}'}],
    )
    return f"{root / 'extra.tar'} sample x: json has no stage"


def no_time(root):
    photo_shards(root)
    write_tar(root / "extra.tar", [photo_sample("late", "dish-c", "mycelium")])
    return f"{root / 'extra.tar'} sample late: json has neither hours nor timestamp"


@pytest.mark.parametrize(
    "make_bad", [no_image, unreadable_image, *(pytest.param(f, marks=pytest.mark.slow) for f in (no_stage, no_time))]
)
def test_bad_photo_samples_stop_or_are_skipped(ray_session, tmp_path, make_bad):
    named = make_bad(tmp_path / "tars")
    with pytest.raises(CliptimeError, match="--skip-bad") as error:
        write_user_shards(CLIPTIME, "webdataset-images", tmp_path / "tars", tmp_path / "shards", TimelapseConfig())
    assert named in str(error.value) and "\n" not in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == ["tars"]  # nothing written, no scratch left
    result = write_user_shards(
        CLIPTIME, "webdataset-images", tmp_path / "tars", tmp_path / "shards", TimelapseConfig(), skip_bad=True
    )
    assert len(result["skipped"]) == 1 and result["skipped"][0].startswith(named)
    assert sum(s["rows"] for s in result["manifest"]["splits"].values()) == 12


@pytest.mark.parametrize(
    ("kind", "cfg", "what"),
    [
        ("webdataset-images", TimelapseConfig(), "photos"),
        pytest.param("webdataset-audio", EventSamplesConfig(), "samples", marks=pytest.mark.slow),
    ],
)
def test_only_bad_samples_leave_nothing_to_convert(ray_session, tmp_path, kind, cfg, what):
    write_tar(tmp_path / "tars" / "bad.tar", [{"__key__": "a", "json": b"{}"}, {"__key__": "b", "txt": b"caption"}])
    task = CLIPTIME if kind == "webdataset-images" else TCLAP
    with pytest.raises(CliptimeError, match=f"no usable {what} left after skipping 2 bad inputs"):
        write_user_shards(task, kind, tmp_path / "tars", tmp_path / "shards", cfg, skip_bad=True)
    assert not (tmp_path / "shards").exists()


def test_a_damaged_tar_file_is_named(ray_session, tmp_path, capsys):
    photo_shards(tmp_path / "tars")
    broken = tmp_path / "tars" / "shard-000.tar"
    broken.write_bytes(broken.read_bytes()[:1500])  # cut inside the second member
    args = ["webdataset-images", str(tmp_path / "tars"), str(tmp_path / "shards"), "--skip-bad"]
    assert make_shards_main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"error: {broken} is not a readable tar file (unexpected end of data)"
    assert not (tmp_path / "shards").exists()


def test_members_of_a_sample_apart_are_named(ray_session, tmp_path):
    a, b = photo_sample("k1", "dish-a", "spore", hours=0), photo_sample("k2", "dish-a", "hyphae", hours=1)
    path = tmp_path / "tars" / "unsorted.tar"
    write_tar(
        path,
        [{"__key__": "k1", "png": a["png"]}, {"__key__": "k2", "png": b["png"]}, {"__key__": "k1", "json": a["json"]}],
    )
    with pytest.raises(CliptimeError, match="key 'k1' are not contiguous") as error:
        write_user_shards(CLIPTIME, "webdataset-images", tmp_path / "tars", tmp_path / "shards", TimelapseConfig())
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def empty_tar(root):
    write_tar(root / "empty.tar", [])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root.mkdir(), "holds no .tar files"),
        (lambda root: None, "do not exist"),
        (empty_tar, "no samples"),
    ],
)
def test_no_samples_is_a_one_line_error(ray_session, tmp_path, make, message):
    make(tmp_path / "tars")
    with pytest.raises(CliptimeError, match=message):
        write_user_shards(CLIPTIME, "webdataset-images", tmp_path / "tars", tmp_path / "shards", TimelapseConfig())


@pytest.mark.slow
def test_data_may_name_tar_shards_converted_once(ray_session, tmp_path, monkeypatch, capsys):
    """`--data TARS`: converted into the cache on first use, the prepared task reading the converted shards; the
    next preparation finds them there; changed tar files are converted anew."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    photo_shards(tmp_path / "tars")
    data = prepare(make_task("cliptime", {"data": str(tmp_path / "tars")}))
    converted = data.task.cfg.data
    assert converted.startswith(str(tmp_path / "cache" / "cliptime" / "webdataset" / "cliptime-"))
    assert data.task.cfg.hours == (0.0, 12.0) and data.rows == {"train": 6, "val": 3, "test": 3}
    assert "converting WebDataset shards" in capsys.readouterr().out
    again = prepare(make_task("cliptime", {"data": str(tmp_path / "tars")}))
    assert again.task.cfg.data == converted and again.test_fingerprint == data.test_fingerprint
    assert "converting" not in capsys.readouterr().out
    write_tar(tmp_path / "tars" / "more.tar", [photo_sample("e0", "dish-e", "spore", hours=3)])
    more = shard_folder(make_task("cliptime", {"data": str(tmp_path / "tars")}))
    splits = json.loads(Path(more, "manifest.json").read_text())["splits"]
    assert more != converted and sum(split["rows"] for split in splits.values()) == 13


@pytest.mark.slow
def test_data_with_a_bad_sample_says_how_to_skip_it(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    named = no_stage(tmp_path / "tars")
    with pytest.raises(CliptimeError) as error:
        prepare(make_task("cliptime", {"data": str(tmp_path / "tars")}))
    assert named in str(error.value) and "make_shards.py webdataset-images TARS OUT" in str(error.value)
    assert not any((tmp_path / "cache" / "cliptime" / "webdataset").iterdir())


# -- T-CLAP: single sound events -----------------------------------------------------------------------------------
LABELS = ("dog", "church bells", "rain", "clock_tick")


def tone(label: str, sr: int, fmt: str) -> bytes:
    t = np.arange(sr // 2) / sr
    pitch = 300 + 200 * (LABELS.index(label) if label in LABELS else len(LABELS))
    x = 0.5 * np.sin(2 * np.pi * pitch * t) * np.exp(-3 * t)
    buf = io.BytesIO()
    sf.write(buf, np.stack([x, x], axis=1).astype(np.float32), sr, format=fmt)  # stereo: mixed down
    return buf.getvalue()


def event_sample(key: str, label: str, source: str | None, fmt: str = "WAV", sr: int = 22050) -> dict:
    meta = {"label": label, **({"source": source} if source else {})}
    return {"__key__": key, fmt.lower(): tone(label, sr, fmt), "json": json.dumps(meta).encode()}


def event_shards(root) -> None:
    """Six source recordings, each cut into one event of every label (24 samples), in two tar files, WAV at
    22.05 kHz and FLAC at 16 kHz."""
    for part, (fmt, sr) in enumerate((("WAV", 22050), ("FLAC", 16000))):
        samples = [
            event_sample(f"rec{3 * part + r}-{i}", label, f"rec{3 * part + r}", fmt, sr)
            for r in range(3)
            for i, label in enumerate(LABELS)
        ]
        write_tar(root / f"events-{part}.tar", samples)


def test_event_shards_become_mixed_order_clips(ray_session, tmp_path):
    event_shards(tmp_path / "tars")
    cfg = EventSamplesConfig(pairs_per_event=1, singles_fraction=0.0)
    result = write_user_shards(TCLAP, "webdataset-audio", tmp_path / "tars", tmp_path / "shards", cfg)
    manifest, source = result["manifest"], result["manifest"]["source"]
    assert source["classes"] == {
        "church bells": "church bells",
        "clock_tick": "clock tick",
        "dog": "dog",
        "rain": "rain",
    }
    assert source["sample_rate"] == 16000 and source["clip_seconds"] == 2.0
    splits = series_splits([f"rec{r}" for r in range(6)], seed=0, what="source recordings")
    events = {s: 4 * list(splits.values()).count(s) for s in SPLITS}  # four events per source recording
    assert events == {"train": 16, "val": 4, "test": 4}
    # every event starts one pair, in both orders
    assert {s: manifest["splits"][s]["rows"] for s in SPLITS} == {s: 2 * n for s, n in events.items()}
    for split in SPLITS:
        clips = rows(tmp_path / "shards", split)
        assert set(clips["first"]) == set(source["classes"]) and (clips["second"] != "").all()
        assert (clips["sample_rate"] == 16000).all() and all(len(from_pcm16(a)) == 32000 for a in clips["audio"])
        for _, pair in clips.groupby("pair"):
            ab, ba = pair.to_dict("records")
            assert ab["negative"] == ba["caption"] and (ab["first"], ab["second"]) == (ba["second"], ba["first"])


def unreadable_audio(root):
    event_shards(root)
    sample = event_sample("bad", "dog", "rec0")
    sample["wav"] = b"RIFF\x00\x00not really audio"
    write_tar(root / "extra.tar", [sample])
    return f"{root / 'extra.tar'} sample bad: unreadable audio"


def no_label(root):
    event_shards(root)
    write_tar(root / "extra.tar", [{**event_sample("nolabel", "dog", "rec1"), "json": b'{"source": "rec1"}'}])
    return f"{root / 'extra.tar'} sample nolabel: json has no label"


def unknown_label(root):
    event_shards(root)
    write_tar(root / "extra.tar", [event_sample("cat", "meow", "rec2")])
    return f"{root / 'extra.tar'} sample cat: unknown label 'meow'"


def no_audio(root):
    event_shards(root)
    write_tar(root / "extra.tar", [{"__key__": "silent", "json": b'{"label": "dog"}'}])
    return f"{root / 'extra.tar'} sample silent: no audio member"


@pytest.mark.parametrize(
    "make_bad",
    [unknown_label, *(pytest.param(f, marks=pytest.mark.slow) for f in (unreadable_audio, no_label, no_audio))],
)
def test_bad_event_samples_stop_or_are_skipped(ray_session, tmp_path, make_bad):
    named = make_bad(tmp_path / "tars")
    cfg = EventSamplesConfig(labels=",".join(LABELS), pairs_per_event=1, singles_fraction=0.0)
    with pytest.raises(CliptimeError, match="--skip-bad") as error:
        write_user_shards(TCLAP, "webdataset-audio", tmp_path / "tars", tmp_path / "shards", cfg)
    assert named in str(error.value) and "\n" not in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == ["tars"]
    result = write_user_shards(TCLAP, "webdataset-audio", tmp_path / "tars", tmp_path / "shards", cfg, skip_bad=True)
    assert len(result["skipped"]) == 1 and result["skipped"][0].startswith(named)
    assert sum(s["rows"] for s in result["manifest"]["splits"].values()) == 48  # the 24 good events, paired


@pytest.mark.slow
def test_make_shards_webdataset_audio_command(ray_session, tmp_path, capsys):
    event_shards(tmp_path / "tars")
    args = ["webdataset-audio", str(tmp_path / "tars"), str(tmp_path / "shards"), "--pairs-per-event", "1"]
    assert make_shards_main([*args, "--labels", "dog,rain"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(
        r"events-[01]\.tar sample rec\d-[13]: unknown label '(church bells|clock_tick)' \(--labels dog,rain\)", last
    )
    assert make_shards_main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["manifest"]["source"]["webdataset"] == str(tmp_path / "tars")
    assert sorted(result["manifest"]["source"]["classes"]) == sorted(LABELS)
