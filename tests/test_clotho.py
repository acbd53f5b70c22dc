"""Clotho-layout captioned audio -> T-CLAP shards: order-swapped negatives by rule, split mapping, bad input, and a
tiny T-CLAP trained and evaluated on the shards."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import nn

from cliptime.cli import make_shards_main, train_main
from cliptime.convert import write_user_shards
from cliptime.data.clotho import ClothoConfig, read_captions
from cliptime.data.order_phrases import ORDER_RULES, reversed_caption
from cliptime.data.shards import open_shards
from cliptime.data.sound_events import from_pcm16
from cliptime.errors import CliptimeError
from cliptime.tasks import TASKS, make_task
from cliptime.tasks.tclap import retrieval

TCLAP = TASKS["tclap"]
SR = 16000  # the tiny audio model's rate; its clips last 2 s

# -- the rules -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("example", [e for examples, _ in ORDER_RULES for e in examples.split(" | ")])
def test_each_rule_swaps_the_two_events_around_its_connective(example):
    """Every rule's examples are its specification: X and Y trade places, the connective stays as written."""
    caption = example.replace("X", "a bell rings").replace("Y", "knocking")
    expected = example.replace("X", "@").replace("Y", "a bell rings").replace("@", "knocking")
    assert reversed_caption(caption) == expected
    assert reversed_caption(expected) == caption


@pytest.mark.parametrize(
    "caption,negative",
    [
        # a capital and the full stop belong to the sentence, not to the event that opened it
        ("A dog barks, then a car passes by.", "A car passes by, then a dog barks."),
        ("Rain falls. Then thunder rumbles!", "Thunder rumbles. Then rain falls!"),
        ("I speak and then TV noise starts", "TV noise starts and then I speak"),
        ("A door creaks open before footsteps walk away.", "Footsteps walk away before a door creaks open."),
        ("A whistle blows after the crowd cheers.", "The crowd cheers after a whistle blows."),
        ("A car is followed by a truck", "A truck is followed by a car"),
        # the connective opens the caption: the phrases on either side of the comma trade places
        ("After a beep, a man speaks.", "After a man speaks, a beep."),
        # order words mark a time, not an event: they stay where they are
        ("First a dog barks, then a car passes.", "First a car passes, then a dog barks."),
        ("A dog barks first, then a car passes.", "A car passes first, then a dog barks."),
    ],
)
def test_ordered_captions_get_exactly_the_reversed_caption(caption, negative):
    assert reversed_caption(caption) == negative


@pytest.mark.parametrize(
    "caption",
    [
        "Rain falls on a tin roof.",
        "A dog barks while birds chirp in the background.",  # at the same time
        "Birds chirp every now and then.",
        "Birds chirp one after another.",
        "A man talks after a while.",
        "After a few seconds, a man talks.",
        "A dog barks, then a car passes, then a bird sings.",  # three events: no single reversal
        "A dog barks before a car passes and then stops.",
        "A dog barks and then",
        "Then a car passes.",
    ],
)
def test_captions_that_state_no_order_of_two_events_get_no_negative(caption):
    assert reversed_caption(caption) == ""


# -- a tiny Clotho-layout collection -------------------------------------------------------------------------------
FOLDERS = {"development": 4, "validation": 2, "evaluation": 2}  # recordings per split
CAPTIONS = (
    "A low hum, then a high beep.",  # ordered
    "A low hum followed by a high beep",  # ordered
    "Two tones play.",
    "A machine hums and beeps",
    "A tone is heard, as another plays",
)


def tone(freqs: tuple[float, ...], seconds: float, sr: int) -> np.ndarray:
    """Tones one after another, each for an equal share of `seconds`."""
    t = np.arange(int(seconds * sr / len(freqs))) / sr
    return np.concatenate([0.5 * np.sin(2 * np.pi * f * t) for f in freqs]).astype(np.float32)


def clotho_folder(root, captions=CAPTIONS) -> dict[str, list[str]]:
    """FOLDERS' recordings: two tones in order (the second folder's at 22.05 kHz, 3 s long: resampled and cut; the
    evaluation's 1 s long: padded), one FLAC, each with `captions`. Returns the file names per folder."""
    root.mkdir(parents=True, exist_ok=True)
    names = {}
    for f, (folder, n) in enumerate(FOLDERS.items()):
        (root / folder).mkdir()
        lines = ["file_name," + ",".join(f"caption_{i + 1}" for i in range(len(captions)))]
        sr, seconds = (22050, 3.0) if folder == "validation" else (SR, 1.0 if folder == "evaluation" else 2.0)
        names[folder] = [f"{folder}_{i}.{'flac' if i == 1 else 'wav'}" for i in range(n)]
        for i, name in enumerate(names[folder]):
            sf.write(root / folder / name, tone((200 + 50 * i + 400 * f, 900 + 100 * i), seconds, sr), sr)
            lines.append(name + "," + ",".join(f'"{c}"' for c in captions))
        (root / f"clotho_captions_{folder}.csv").write_text("\n".join(lines) + "\n")
    return names


@pytest.mark.slow  # a whole conversion through Ray Data: seconds
def test_clotho_collection_becomes_one_row_per_recording_and_caption(ray_session, tmp_path):
    names = clotho_folder(tmp_path / "clotho")
    result = write_user_shards(TCLAP, "clotho", tmp_path / "clotho", tmp_path / "shards", ClothoConfig())
    assert result["skipped"] == []
    source = result["manifest"]["source"]
    assert (source["sample_rate"], source["clip_seconds"], source["classes"]) == (SR, 2.0, {})
    assert source["ordered_captions"] == {"train": 8, "val": 4, "test": 4}  # two of five captions per recording
    open_shards(tmp_path / "shards", "tclap", TCLAP.schema)  # every shard passes the training job's checks
    for split, folder in (("train", "development"), ("val", "validation"), ("test", "evaluation")):
        rows = pq.read_table(tmp_path / "shards" / split).to_pandas()
        assert len(rows) == 5 * FOLDERS[folder] == result["manifest"]["splits"][split]["rows"]
        assert sorted(rows["caption"]) == sorted(CAPTIONS * FOLDERS[folder])
        for caption, negative in zip(rows["caption"], rows["negative"]):
            assert negative == {
                CAPTIONS[0]: "A high beep, then a low hum.",
                CAPTIONS[1]: "A high beep followed by a low hum",
            }.get(caption, "")
        assert (rows["first"] == "").all() and (rows["second"] == "").all() and (rows["pair"] == -1).all()
        assert (rows["sample_rate"] == SR).all()
        clips = [from_pcm16(a) for a in rows["audio"]]
        assert all(len(x) == 2 * SR for x in clips)
        assert len({a for a in rows["audio"]}) == len(names[folder])  # a recording's five rows share its clip
        if folder == "evaluation":  # 1-s recordings: the clip's second half is silence
            assert all(np.abs(x[SR:]).max() == 0 and np.abs(x[:SR]).max() > 0.4 for x in clips)


class TextTable(nn.Module):
    """A stand-in CLAP: a clip embeds as the one-hot of its first sample; a text (its token: its index in `texts`)
    as its vector in `table`."""

    def __init__(self, texts: list[str], table: dict[str, list[float]]):
        super().__init__()
        self.texts, self.table, self.unused = texts, table, nn.Parameter(torch.zeros(1))

    def forward(self, audio, *token_batches):
        embed = [torch.tensor([self.table[self.texts[i]] for i in t[:, 0].tolist()]).float() for t in token_batches]
        clip = None if audio is None else F.one_hot(audio[:, 0].long(), 2).float()
        return (clip, *embed, torch.tensor(1.0))


def test_caption_rows_are_keyed_by_their_recording_and_score_what_they_allow():
    """Preprocessed caption rows: the captions of one recording are the contrastive positives of each other, only
    the ordered ones count for the temporal loss; evaluation reports T-Classify audio->text and retrieval, and
    leaves out what free text cannot give (text->audio T-Classify, held-out phrasing, zero-shot accuracy)."""
    task = make_task("tclap", {"data": "/shards"}).resolved({"source": {"sample_rate": SR, "clip_seconds": 2.0}})
    recordings = [b"\x01\x00" * (2 * SR), b"\x02\x00" * (2 * SR)]
    captions = ["hum, then beep", "two tones", "click before buzz", "a buzz"]
    rows = {
        "audio": np.array([recordings[0], recordings[0], recordings[1], recordings[1]], dtype=object),
        "sample_rate": np.full(4, SR),
        "caption": np.array(captions, dtype=object),
        "negative": np.array([reversed_caption(c) for c in captions], dtype=object),
        "first": np.array([""] * 4, dtype=object),
        "second": np.array([""] * 4, dtype=object),
        "pair": np.full(4, -1),
    }
    assert list(rows["negative"]) == ["beep, then hum", "", "buzz before click", ""]
    batch = {k: torch.as_tensor(v) for k, v in task.preprocessor()(rows).items()}
    key = batch["key"].tolist()
    assert key[0] == key[1] != key[2] == key[3]
    assert batch["ordered"].tolist() == [True, False, True, False]
    assert (batch["first"] == -1).all() and (batch["second"] == -1).all()

    # every caption embeds as its own recording; the reversed "click before buzz" as that recording too (a miss)
    table = {"hum, then beep": [1, 0], "two tones": [1, 0], "click before buzz": [0, 1], "a buzz": [0, 1]}
    table.update({"beep, then hum": [0, 1], "buzz before click": [0, 1], "": [0, 0]})
    texts = list(table)
    batch["tokens"] = torch.tensor([[texts.index(c)] for c in rows["caption"]])
    batch["neg_tokens"] = torch.tensor([[texts.index(n)] for n in rows["negative"]])
    batch["audio"][:, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    metrics, _ = task.evaluate(TextTable(texts, table), [batch])
    assert set(metrics) == {"tclassify_a2t", "a2t_R1", "a2t_R5", "a2t_R10", "t2a_R1", "t2a_R5", "t2a_R10"}
    assert metrics["tclassify_a2t"] == 0.5 and metrics["t2a_R1"] == metrics["a2t_R1"] == 1.0


def test_retrieval_counts_a_recording_captioned_many_times_once():
    """Two recordings, two captions each; the first caption is closer to the other recording: one recording
    ranks above the right one, not its two rows."""
    audio = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    text = torch.tensor([[0.4, 0.6], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    clips = keys = torch.tensor([7, 7, 9, 9])
    r = retrieval(audio, text, keys, clips, ks=(1, 2))
    assert r["t2a_R1"] == 0.75 and r["t2a_R2"] == 1.0
    assert r["a2t_R1"] == 1.0  # each recording: its best caption ranks first


# -- bad input -----------------------------------------------------------------------------------------------------
def test_bad_rows_are_named_by_file_and_line(tmp_path):
    clotho_folder(tmp_path)
    sf.write(tmp_path / "development" / "development_9.wav", tone((440.0,), 1.0, SR), SR)
    csv = tmp_path / "clotho_captions_development.csv"
    good = csv.read_text().splitlines()[1]
    with open(csv, "a") as f:
        f.write("missing.wav," + ",".join(["a caption"] * 5) + "\n")  # line 6
        f.write(good + "\n")  # line 7: listed twice
        f.write("development_2.wav,too,few\n")  # line 8
        f.write("development_9.wav,,b,c,d,e\n")  # line 9
    items, problems = read_captions(tmp_path, "train")
    assert [str(p) for p in problems] == [
        f"{csv} line 6: development/missing.wav does not exist",
        f"{csv} line 7: development/development_0.wav is listed twice (also on line 2)",
        f"{csv} line 8: 3 fields, the header has 6",
        f"{csv} line 9: empty caption_1",
    ]
    assert len(items) == 4 and {i["split"] for i in items} == {"train"}


def unreadable_recording(root) -> str:
    clotho_folder(root)
    (root / "development" / "development_2.wav").write_bytes(b"RIFF\x00\x00not really audio")
    return "development_2.wav"


def row_without_file(root) -> str:
    clotho_folder(root)
    with open(root / "clotho_captions_validation.csv", "a") as f:
        f.write("gone.wav," + ",".join(["a caption"] * 5) + "\n")
    return "clotho_captions_validation.csv line 4"


@pytest.mark.parametrize("make_bad", [unreadable_recording, pytest.param(row_without_file, marks=pytest.mark.slow)])
def test_bad_input_stops_or_is_skipped(ray_session, tmp_path, make_bad):
    named = make_bad(tmp_path / "clotho")
    with pytest.raises(CliptimeError, match="--skip-bad") as error:
        write_user_shards(TCLAP, "clotho", tmp_path / "clotho", tmp_path / "shards", ClothoConfig())
    assert named in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == ["clotho"]  # nothing written
    cfg = ClothoConfig()
    result = write_user_shards(TCLAP, "clotho", tmp_path / "clotho", tmp_path / "shards", cfg, skip_bad=True)
    assert len(result["skipped"]) == 1 and named in result["skipped"][0]
    rows = 5 * (sum(FOLDERS.values()) - (make_bad is unreadable_recording))  # five captions per readable recording
    assert sum(s["rows"] for s in result["manifest"]["splits"].values()) == rows


def test_a_missing_csv_is_a_one_line_error(ray_session, tmp_path, capsys):
    clotho_folder(tmp_path / "clotho")
    (tmp_path / "clotho" / "clotho_captions_evaluation.csv").unlink()
    assert make_shards_main(["clotho", str(tmp_path / "clotho"), str(tmp_path / "shards")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "clotho_captions_evaluation.csv is missing" in err[-1]
    assert not (tmp_path / "shards").exists()


def test_a_csv_without_caption_columns_is_named(tmp_path):
    clotho_folder(tmp_path)
    csv = tmp_path / "clotho_captions_validation.csv"
    csv.write_text(csv.read_text().replace("caption_1", "text"))
    with pytest.raises(CliptimeError, match=r"clotho_captions_validation.csv lacks column\(s\) caption_1"):
        read_captions(tmp_path, "val")


def test_a_test_split_without_ordered_captions_is_named(ray_session, tmp_path):
    """T-Classify, the task's validation and test measure, needs captions that state an order."""
    clotho_folder(tmp_path / "clotho")
    csv = tmp_path / "clotho" / "clotho_captions_evaluation.csv"
    csv.write_text(csv.read_text().replace(", then", " and").replace(" followed by", " and"))
    with pytest.raises(CliptimeError, match="clotho_captions_evaluation.csv: no caption states the order"):
        write_user_shards(TCLAP, "clotho", tmp_path / "clotho", tmp_path / "shards", ClothoConfig())


# -- end to end ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tclap_trains_and_evaluates_on_clotho_shards(ray_session, tracking, tmp_path, capsys):
    clotho_folder(tmp_path / "clotho")
    assert make_shards_main(["clotho", str(tmp_path / "clotho"), str(tmp_path / "shards")]) == 0
    capsys.readouterr()
    argv = ["--data", str(tmp_path / "shards"), "--no-baseline", "--epochs", "1", "--batch-size", "8"]
    argv += ["--storage-path", str(tmp_path / "runs"), "--experiment", "clotho", "--no-register"]
    assert train_main("tclap", "", argv) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    scored = {"tclassify_a2t", "a2t_R1", "a2t_R5", "a2t_R10", "t2a_R1", "t2a_R5", "t2a_R10"}
    assert {k for k in result["metrics"] if k.startswith("test/")} == {f"test/{k}" for k in scored}
    assert {k for k in result["metrics"] if k.startswith("val/")} == {f"val/{k}" for k in scored}
    metrics = result["metrics"]
    assert 4 * metrics["test/tclassify_a2t"] in (0, 1, 2, 3, 4)  # four test captions state an order
    # two test recordings with the same five captions: each recording's best caption ties the best of all, and a
    # caption's recording is one of two, in reach of R@5 (were each recording's five rows ranked, not always)
    assert metrics["test/a2t_R1"] == metrics["test/t2a_R5"] == 1.0
    assert list(result["headline"]) == ["test/tclassify_a2t"]
