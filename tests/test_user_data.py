"""The user's own data: time-lapse photo folders and ESC-50-layout collections -> shards -> a short training run."""

from __future__ import annotations

import datetime
import io
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from cliptime.cli import make_shards_main
from cliptime.convert import write_user_shards
from cliptime.data.esc50 import ESC50Config, read_meta
from cliptime.data.shards import open_shards
from cliptime.data.sound_events import from_pcm16
from cliptime.data.timelapse import PhotoReader, TimelapseConfig, list_photos
from cliptime.errors import CliptimeError
from cliptime.pipeline import prepare
from cliptime.tasks import TASKS, make_task

CLIPTIME, TCLAP = TASKS["cliptime"], TASKS["tclap"]

START = datetime.datetime(2025, 3, 1, 8, 0, 0)
SERIES = ("dish-a", "dish-b", "dish-c", "dish-d")


def photo(path, shade: int, taken: datetime.datetime | None = None, size=(48, 36)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (shade, 255 - shade, 128))
    exif = Image.Exif()
    if taken is not None:
        exif.get_ifd(0x8769)[36867] = taken.strftime("%Y:%m:%d %H:%M:%S")
    image.save(path, exif=exif)


def exif_folder(root, photos_per_stage: int = 2) -> None:
    """SERIES/STAGE/i.jpg, one photo every 3 hours, times only in EXIF (each series starts at another hour)."""
    for s, series in enumerate(SERIES):
        i = 0
        for stage in ("spore", "hyphae", "mycelium"):
            for _ in range(photos_per_stage):
                photo(root / series / stage / f"{i:03d}.jpg", 40 * i % 255, START + datetime.timedelta(hours=s + 3 * i))
                i += 1


def rows(out, split: str) -> pd.DataFrame:
    """A split's rows, read with pyarrow: the shards are checked by the code under test, not by this helper."""
    return pq.read_table(out / split).to_pandas()


def test_timelapse_with_exif_times_and_stage_folders(ray_session, tmp_path):
    exif_folder(tmp_path / "photos")
    result = write_user_shards(CLIPTIME, "timelapse", tmp_path / "photos", tmp_path / "shards", TimelapseConfig())
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest == result["manifest"] and result["skipped"] == []
    assert manifest["source"]["hours"] == [0.0, 15.0]
    assert sum(m["rows"] for m in manifest["splits"].values()) == 24
    split_of = {s: split for split, names in manifest["source"]["series"].items() for s in names}
    assert sorted(split_of) == sorted(SERIES) and set(split_of.values()) == {"train", "val", "test"}
    for split in ("train", "val", "test"):
        df = rows(tmp_path / "shards", split)
        assert {split_of[s] for s in df["sequence"]} == {split}  # no series in two splits
        for _, series in df.groupby("sequence"):
            series = series.sort_values("frame")
            assert series["frame"].tolist() == list(range(6))
            assert series["hours"].tolist() == [0.0, 3.0, 6.0, 9.0, 12.0, 15.0]  # EXIF time minus the first photo's
            assert series["stage"].tolist() == ["spore"] * 2 + ["hyphae"] * 2 + ["mycelium"] * 2
            np.testing.assert_allclose(series["t"], series["hours"] / 15.0, rtol=1e-6)
        image = Image.open(io.BytesIO(df["image"].iloc[0]))
        assert image.size == (64, 64)  # cliptime-tiny-rn's input size
        assert all(c.strip() for c in df["caption"])


def test_timelapse_manifest_hours_timestamps_and_captions(ray_session, tmp_path):
    root = tmp_path / "photos"
    lines = ["path,stage,hours,timestamp,caption"]
    for s, series in enumerate(SERIES):
        for i, stage in enumerate(("spore", "hyphae", "mycelium")):
            photo(root / series / f"{i}.png", 60 * i)  # no EXIF: times come from the manifest
            if s < 2:
                lines.append(f"{series}/{i}.png,{stage},{10.0 * i + 1},,")
            else:
                stamp = (START + datetime.timedelta(hours=5 * i)).isoformat()
                lines.append(f"{series}/{i}.png,{stage},,{stamp},my caption {i}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    write_user_shards(CLIPTIME, "timelapse", root, tmp_path / "shards", TimelapseConfig(image_size=32))
    df = pd.concat(rows(tmp_path / "shards", s) for s in ("train", "val", "test"))
    by_series = {name: g.sort_values("frame") for name, g in df.groupby("sequence")}
    assert by_series["dish-a"]["hours"].tolist() == [1.0, 11.0, 21.0]
    assert by_series["dish-c"]["hours"].tolist() == [0.0, 5.0, 10.0]
    assert by_series["dish-d"]["caption"].tolist() == ["my caption 0", "my caption 1", "my caption 2"]
    assert by_series["dish-b"]["stage"].tolist() == ["spore", "hyphae", "mycelium"]


def truncated_photo(root):
    exif_folder(root)
    bad = root / "dish-b" / "hyphae" / "002.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    return str(bad)


def manifest_points_at_missing_file(root):
    exif_folder(root)
    (root / "manifest.csv").write_text("path,stage,hours\ndish-a/spore/000.jpg,spore,0\ndish-a/gone.jpg,spore,1\n")
    return "manifest.csv line 3"


def unparseable_timestamp(root):
    exif_folder(root)
    (root / "manifest.csv").write_text("path,stage,timestamp\ndish-c/spore/000.jpg,spore,next tuesday\n")
    return "cannot parse timestamp 'next tuesday'"


def photo_without_time(root):
    exif_folder(root)
    photo(root / "dish-d" / "mycelium" / "late.jpg", 10)  # neither EXIF nor manifest hours
    return "late.jpg: no time"


def fake_heic(root):
    """An iPhone photo PIL cannot decode (no HEIF plugin), here an ISO-media header with nothing behind it."""
    exif_folder(root)
    bad = root / "dish-a" / "hyphae" / "IMG_0001.HEIC"
    bad.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
    return str(bad)


def photo_listed_twice(root):
    exif_folder(root)
    (root / "manifest.csv").write_text(
        "path,stage,hours\ndish-a/spore/000.jpg,spore,0\ndish-b/spore/000.jpg,spore,0\ndish-a/./spore/000.jpg,spore,5\n"
    )
    return "manifest.csv line 4: dish-a/./spore/000.jpg is listed twice (also on line 2)"


@pytest.mark.parametrize(
    "make_bad",
    [
        truncated_photo,
        fake_heic,
        *(pytest.param(f, marks=pytest.mark.slow) for f in (manifest_points_at_missing_file, unparseable_timestamp)),
        *(pytest.param(f, marks=pytest.mark.slow) for f in (photo_without_time, photo_listed_twice)),
    ],
)
def test_timelapse_bad_input_stops_or_is_skipped(ray_session, tmp_path, make_bad):
    named = make_bad(tmp_path / "photos")
    with pytest.raises(CliptimeError, match="--skip-bad") as error:
        write_user_shards(CLIPTIME, "timelapse", tmp_path / "photos", tmp_path / "shards", TimelapseConfig())
    assert named in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "shards").exists() and [p.name for p in tmp_path.iterdir()] == ["photos"]

    result = write_user_shards(
        CLIPTIME, "timelapse", tmp_path / "photos", tmp_path / "shards", TimelapseConfig(), skip_bad=True
    )
    assert len(result["skipped"]) == 1 and named in result["skipped"][0]
    assert result["manifest"]["source"]["skipped"] == 1


@pytest.mark.parametrize("hours", ["inf", "-inf", "nan", "1e400"])
def test_manifest_hours_must_be_finite(tmp_path, hours):
    exif_folder(tmp_path)
    (tmp_path / "manifest.csv").write_text(f"path,stage,hours\ndish-a/spore/000.jpg,spore,{hours}\n")
    photos, problems = list_photos(tmp_path)
    assert [str(p) for p in problems] == [
        f"{tmp_path / 'manifest.csv'} line 2: hours {hours!r} is not a finite non-negative number"
    ]
    assert photos["hours"].isna().all()  # the photo keeps no hours from the bad row


def test_hidden_files_and_folders_are_not_photos(tmp_path):
    """macOS's `._*` resource forks (not images at all), `.DS_Store` and hidden folders are neither data nor bad
    input."""
    exif_folder(tmp_path)
    expected = sorted(str(p) for p in tmp_path.rglob("*.jpg"))
    (tmp_path / "dish-a" / "spore" / "._000.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    (tmp_path / "dish-a" / ".DS_Store").write_bytes(b"Bud1")
    photo(tmp_path / "dish-b" / ".thumbnails" / "000.jpg", 0)
    photo(tmp_path / ".Trashes" / "501" / "old.jpg", 0)
    photos, problems = list_photos(tmp_path)
    assert sorted(photos["input"]) == expected and problems == []


def test_a_folder_of_only_hidden_files_has_nothing_to_predict(tmp_path):
    """Prediction on a folder lists its files as make_shards does: hidden ones are not inputs."""
    from cliptime.predict import predict

    (tmp_path / "._photo.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    photo(tmp_path / ".cache" / "thumb.png", 0)
    with pytest.raises(CliptimeError, match="holds no CLIPTime input files"):
        predict("models:/unused/1", make_task("cliptime"), None, tmp_path, None)


def test_a_file_pil_cannot_decode_is_named_by_the_reader(tmp_path):
    """Without a HEIF plugin PIL cannot open HEIC: the photo is listed, and the read pass names it."""
    named = fake_heic(tmp_path)
    photos, _ = list_photos(tmp_path)
    assert named in set(photos["input"])
    read = PhotoReader(32)(pd.DataFrame({"input": [named, str(tmp_path / "dish-a" / "spore" / "000.jpg")]}))
    assert read["error"].iloc[0].startswith("unreadable or truncated image (cannot identify image file")
    assert read["error"].iloc[1] == "" and Image.open(io.BytesIO(read["image"].iloc[1])).size == (32, 32)


def test_a_photo_listed_twice_in_the_manifest_is_named(tmp_path):
    expected = photo_listed_twice(tmp_path)
    photos, problems = list_photos(tmp_path)
    assert [str(p) for p in problems] == [f"{tmp_path}/{expected}"]
    labelled = photos.set_index("input").loc[str(tmp_path / "dish-a" / "spore" / "000.jpg")]
    assert labelled["hours"] == 0.0  # the first row's labels; the duplicate is not applied
    assert photos["input"].is_unique


def test_empty_photo_folder_is_a_one_line_error(ray_session, tmp_path, capsys):
    (tmp_path / "photos" / "dish-a").mkdir(parents=True)
    assert make_shards_main(["timelapse", str(tmp_path / "photos"), str(tmp_path / "shards")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: photo folder") and "empty" in err
    assert not (tmp_path / "shards").exists()


# -- ESC-50 layout ---------------------------------------------------------------------------------------------
CATEGORIES = ("church_bells", "dog", "rain", "clock_tick")


def esc_folder(root, per_fold: int = 2) -> None:
    """Four categories x five folds x `per_fold` recordings, at 16 and 22.05 kHz, a tone per category."""
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    lines = ["filename,fold,target,category,esc10,src_file,take"]
    for fold in range(1, 6):
        for k in range(per_fold):
            for target, category in enumerate(CATEGORIES):
                sr = 16000 if k % 2 == 0 else 22050
                t = np.arange(sr) / sr
                x = 0.5 * np.sin(2 * np.pi * (300 + 200 * target) * t) * np.exp(-3 * t)
                name = f"{fold}-{100 * target + 10 * fold + k}-A-{target}.wav"
                sf.write(root / "audio" / name, x.astype(np.float32), sr)
                lines.append(f"{name},{fold},{target},{category},False,{100 * target + 10 * fold + k},A")
    (root / "meta" / "esc50.csv").write_text("\n".join(lines) + "\n")


def test_esc50_collection_becomes_mixed_order_clips(ray_session, tracking, tmp_path):
    esc_folder(tmp_path / "esc")
    cfg = ESC50Config(pairs_per_event=1, singles_fraction=0.5)
    result = write_user_shards(TCLAP, "esc50", tmp_path / "esc", tmp_path / "shards", cfg)
    source = result["manifest"]["source"]
    assert source["sample_rate"] == 16000 and source["clip_seconds"] == 2.0
    assert source["classes"]["church_bells"] == "church bells" and len(source["classes"]) == 4
    open_shards(tmp_path / "shards", "tclap", TASKS["tclap"].schema)  # every shard passes the training job's checks
    test = pq.read_table(tmp_path / "shards" / "test").to_pandas()
    mixed = test[test["second"] != ""]
    assert len(mixed) == 2 * len(CATEGORIES) * 2  # fold 5: 8 recordings, one pair each, both orders
    for _, clips in mixed.groupby("pair"):
        ab, ba = clips.to_dict("records")
        assert ab["negative"] == ba["caption"] and ba["negative"] == ab["caption"]  # exactly the reversed order
        assert (ab["first"], ab["second"]) == (ba["second"], ba["first"])
    assert all(len(from_pcm16(a)) == 32000 for a in test["audio"])
    assert (test["sample_rate"] == 16000).all()


@pytest.mark.slow  # a whole conversion through Ray Data: seconds
def test_esc50_shards_bring_their_own_classes(ray_session, tmp_path):
    """Zero-shot is scored against the shards' own categories: the task prepared from them carries them in its
    config, which is what workers, the test evaluation and the registered model are rebuilt from."""
    esc_folder(tmp_path / "esc")
    write_user_shards(TCLAP, "esc50", tmp_path / "esc", tmp_path / "shards", ESC50Config(pairs_per_event=1))
    data = prepare(make_task("tclap", {"data": str(tmp_path / "shards")}))
    assert data.task.event_classes == {c: c.replace("_", " ") for c in CATEGORIES}
    assert data.task.baseline().event_classes == data.task.event_classes
    assert data.rows["train"] > 0 and set(data.splits["test"].take(1)[0]) >= {"audio", "tokens", "first"}


@pytest.mark.slow  # a whole conversion through Ray Data: seconds
def test_timelapse_shards_bring_their_time_range(ray_session, tmp_path):
    exif_folder(tmp_path / "photos", photos_per_stage=3)
    write_user_shards(CLIPTIME, "timelapse", tmp_path / "photos", tmp_path / "shards", TimelapseConfig())
    data = prepare(make_task("cliptime", {"data": str(tmp_path / "shards")}))
    assert data.task.cfg.hours == (0.0, 24.0)  # the longest series: 9 photos, 3 hours apart


def unreadable_wav(root):
    esc_folder(root)
    bad = next((root / "audio").glob("3-*.wav"))
    bad.write_bytes(b"RIFF\x00\x00not really audio")
    return bad.name


def row_without_file(root):
    esc_folder(root)
    with open(root / "meta" / "esc50.csv", "a") as f:
        f.write("1-999-A-0.wav,1,0,church_bells,False,999,A\n")
    return "esc50.csv line 42"


@pytest.mark.parametrize("make_bad", [unreadable_wav, pytest.param(row_without_file, marks=pytest.mark.slow)])
def test_esc50_bad_input_stops_or_is_skipped(ray_session, tmp_path, make_bad):
    named = make_bad(tmp_path / "esc")
    with pytest.raises(CliptimeError, match="--skip-bad") as error:
        write_user_shards(TCLAP, "esc50", tmp_path / "esc", tmp_path / "shards", ESC50Config())
    assert named in str(error.value)
    assert not (tmp_path / "shards").exists() and [p.name for p in tmp_path.iterdir()] == ["esc"]
    result = write_user_shards(TCLAP, "esc50", tmp_path / "esc", tmp_path / "shards", ESC50Config(), skip_bad=True)
    assert len(result["skipped"]) == 1 and named in result["skipped"][0]


def test_esc50_recording_listed_twice_is_named(tmp_path):
    esc_folder(tmp_path)
    meta = tmp_path / "meta" / "esc50.csv"
    first = meta.read_text().splitlines()[1]
    with open(meta, "a") as f:
        f.write(first.replace(",1,", ",3,", 1) + "\n")  # the same file again, in another fold
    recordings, problems = read_meta(tmp_path, ESC50Config())
    name = first.split(",")[0]
    assert [str(p) for p in problems] == [f"{meta} line 42: audio/{name} is listed twice (also on line 2)"]
    assert (recordings["input"] == str(tmp_path / "audio" / name)).sum() == 1
    assert recordings.loc[recordings["input"] == str(tmp_path / "audio" / name), "fold"].item() == 1


def test_esc50_csv_with_missing_columns_is_named(ray_session, tmp_path, capsys):
    esc_folder(tmp_path / "esc")
    meta = tmp_path / "esc" / "meta" / "esc50.csv"
    meta.write_text(meta.read_text().replace("category", "label"))
    assert make_shards_main(["esc50", str(tmp_path / "esc"), str(tmp_path / "shards")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "esc50.csv lacks column(s) category" in last
    assert not (tmp_path / "shards").exists()


def esc50_row_with_an_extra_field(root):
    esc_folder(root)
    with open(root / "meta" / "esc50.csv", "a") as f:
        f.write("1-999-A-0.wav,1,0,church_bells,False,999,A,a stray note\n")
    return root / "meta" / "esc50.csv", "Expected 7 fields in line 42, saw 8"


def esc50_csv_empty(root):
    esc_folder(root)
    (root / "meta" / "esc50.csv").write_text("")
    return root / "meta" / "esc50.csv", "No columns to parse from file"


def manifest_not_text(root):
    exif_folder(root)
    (root / "manifest.csv").write_bytes(b"path,stage,hours\n\xff\xfe\x00d\x00i\x00s\x00h\x00\n")
    return root / "manifest.csv", "can't decode byte 0xff"


@pytest.mark.parametrize(
    "command, make_bad",
    [("esc50", esc50_row_with_an_extra_field), ("esc50", esc50_csv_empty), ("timelapse", manifest_not_text)],
)
def test_a_csv_file_that_is_no_table_is_one_line_naming_it(ray_session, tmp_path, capsys, command, make_bad):
    """A malformed CSV file is no row to skip: the command stops in one line naming the file and what is wrong,
    `--skip-bad` or not."""
    path, reason = make_bad(tmp_path / "input")
    assert make_shards_main([command, str(tmp_path / "input"), str(tmp_path / "shards"), "--skip-bad"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {path} is not a CSV table") and reason in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "shards").exists()
