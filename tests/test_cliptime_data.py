import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from cliptime.data.fungal_growth import (
    CAPTION_TEMPLATES,
    STAGES,
    generate_sequence,
    split_of_sequence,
    stage_index,
)
from cliptime.errors import CliptimeError
from cliptime.tasks.cliptime import CLIPTimeTask

KW = dict(frames=12, size=48, hours=(0.0, 72.0), template_set="generic")


def test_same_seed_same_bytes_other_seed_other_colony():
    a = generate_sequence(3, 1, **KW)
    b = generate_sequence(3, 1, **KW)
    c = generate_sequence(4, 1, **KW)
    assert a == b
    assert a["image"][0] != c["image"][0]


def test_rows_fit_the_documented_schema_and_ranges():
    cols = generate_sequence(0, 2, **KW)
    table = pa.table(cols, schema=CLIPTimeTask.schema)  # raises if a column or type is off
    assert table.num_rows == 12
    t = np.array(cols["t"])
    assert t[0] == 0.0 and t[-1] == 1.0 and np.all(np.diff(t) > 0)
    assert np.allclose(cols["hours"], t * 72.0)
    for ti, stage in zip(t, cols["stage"]):
        assert stage == STAGES[0 if ti <= 0.1 else 1 if ti <= 0.5 else 2]
    image = Image.open(io.BytesIO(cols["image"][5]))
    assert image.size == (48, 48) and image.mode == "RGB"
    assert len(set(cols["sequence"])) == 1 and cols["frame"] == list(range(12))


def test_captions_come_from_the_stage_templates_of_the_chosen_set():
    for template_set in ("generic", "detailed"):
        cols = generate_sequence(0, 0, **{**KW, "template_set": template_set})
        for stage, caption in zip(cols["stage"], cols["caption"]):
            assert caption in CAPTION_TEMPLATES[template_set][stage]


def test_growth_is_visible_over_time():
    """More of the frame is stained as the colony grows (hyphae lengthen, the mycelium spreads)."""
    cols = generate_sequence(0, 2, frames=100, size=64, hours=(0, 72), template_set="generic")

    def stained(i):  # pixels far from the frame's median colour, the agar background
        im = np.asarray(Image.open(io.BytesIO(cols["image"][i]))).astype(float)
        return np.mean(np.abs(im - np.median(im.reshape(-1, 3), 0)).sum(-1) > 60)

    assert stained(20) < stained(60) < stained(99)


def test_stage_boundaries_match_the_paper():
    assert [stage_index(t) for t in (0.0, 0.1, 0.1001, 0.5, 0.5001, 1.0)] == [0, 0, 1, 1, 2, 2]


def test_splits_are_by_sequence_70_15_15():
    splits = [split_of_sequence(i, 40) for i in range(40)]
    assert splits.count("train") == 28 and splits.count("val") == 6 and splits.count("test") == 6


def test_unknown_template_set_is_named():
    with pytest.raises(CliptimeError, match="fancy"):
        generate_sequence(0, 0, **{**KW, "template_set": "fancy"})
