"""How CLIPTime shards store images: JPEG at quality 95 without chroma subsampling, at the model's input size.

Against PNG, the shards are 2-3x smaller and an image decodes 2.5x faster (224 px: 0.66 ms against 1.67 ms with
PIL on one core; torchvision's libjpeg-turbo `decode_jpeg` was no faster than PIL's), for a mean error of about 3 of
255 levels, mostly the generator's sensor noise (exploratory figures: docs/measurements.md, "Feeding a GPU").
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

ENCODING = "JPEG q95 4:4:4"  # recorded in generated shards' manifests and the test fingerprint


def encode_image(image: np.ndarray | Image.Image) -> bytes:
    """An RGB image (uint8 HWC array or PIL image) as a shard row's bytes."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()
