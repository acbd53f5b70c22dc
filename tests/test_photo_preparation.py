"""Photos as the model sees them: deep (16-bit, float) images scaled rather than clipped, and one preparation for
shards and predictions (EXIF orientation, center crop)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from cliptime.data.timelapse import PhotoReader
from cliptime.tasks import make_task

SIZE = 64  # cliptime-tiny-rn's input size


def through_make_shards(path) -> np.ndarray:
    """The pixels a shard row holds for the photo at `path` (make_shards' read pass, in-process)."""
    read = PhotoReader(SIZE)(pd.DataFrame({"input": [str(path)]}))
    assert read["error"].iloc[0] == ""
    return np.asarray(Image.open(io.BytesIO(read["image"].iloc[0])))


class InputRecorder(nn.Module):
    """Stands in for a CLIPTime model: keeps the images `predict` hands it."""

    image_size = (SIZE, SIZE)

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.images = None

    def forward(self, image, tokens):
        self.images = image.numpy()
        return torch.zeros(len(image), 3), torch.zeros(len(image))


def through_predict(path) -> np.ndarray:
    """The pixels the model gets when the registered model predicts on the file at `path`."""
    model = InputRecorder()
    make_task("cliptime").predict(model, pd.DataFrame({"image": [path.read_bytes()]}))
    return model.images[0]


def ramp_12_bit(path):
    """A horizontal ramp over a 12-bit camera's range (0..4095), stored as a 16-bit PNG."""
    Image.fromarray(np.tile(np.linspace(0, 4095, SIZE).round().astype(np.uint16), (SIZE, 1))).save(path)


def float_ramp(low: float, high: float):
    def write(path):
        Image.fromarray(np.tile(np.linspace(low, high, SIZE, dtype=np.float32), (SIZE, 1))).save(path)

    return write


@pytest.mark.parametrize(
    "name,write,mode",
    [
        ("ramp.png", ramp_12_bit, "I;16"),
        ("ramp.tif", float_ramp(0.0, 1.0), "F"),
        ("counts.tif", float_ramp(-3.0, 500.0), "F"),
    ],
    ids=["12-bit-png", "float-0-to-1-tiff", "float-counts-tiff"],
)
def test_deep_images_are_scaled_not_clipped(tmp_path, name, write, mode):
    path = tmp_path / name
    write(path)
    assert Image.open(path).mode == mode
    assert Image.open(path).convert("RGB").getextrema()[0] in ((0, 255), (0, 1))  # PIL alone clips or blackens
    pixels = through_make_shards(path)
    row = pixels[0, :, 0].astype(int)
    assert (pixels == pixels[..., :1]).all()  # gray stays gray
    assert row[0] == 0 and row[-1] == 255  # the whole range is used...
    assert (row == 255).mean() < 0.05 and (np.diff(row) >= 0).all()  # ...not saturated, in the same order
    assert len(np.unique(row)) > SIZE * 0.9
    np.testing.assert_array_equal(through_predict(path), pixels)


def test_an_image_with_nan_pixels_is_unreadable(tmp_path):
    values = np.ones((8, 8), dtype=np.float32)
    values[2, 3] = np.nan
    Image.fromarray(values).save(tmp_path / "nan.tif")
    read = PhotoReader(SIZE)(pd.DataFrame({"input": [str(tmp_path / "nan.tif")]}))
    assert read["error"].iloc[0] == "unreadable or truncated image (NaN or infinite pixel values)"


def test_prediction_prepares_a_photo_exactly_as_make_shards(tmp_path):
    """A phone photo stored sideways (EXIF orientation 6: rotate 90 degrees clockwise to view), not square: both
    paths turn it upright and center-crop it, where prediction used to stretch it as stored."""
    stored = np.zeros((40, 60, 3), dtype=np.uint8)  # 60 wide, 40 high as stored
    stored[:, :30] = (255, 0, 0)  # left half red: after the rotation, the top
    stored[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    pixels = through_make_shards(tmp_path / "sideways.jpg")
    assert pixels.shape == (SIZE, SIZE, 3)
    assert pixels[2, SIZE // 2, 0] > 200 and pixels[2, SIZE // 2, 2] < 50  # upright: red on top
    assert pixels[-3, SIZE // 2, 2] > 200 and pixels[-3, SIZE // 2, 0] < 50  # blue at the bottom
    np.testing.assert_array_equal(through_predict(tmp_path / "sideways.jpg"), pixels)
