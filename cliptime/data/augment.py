"""Per-epoch random augmentation, run by Ray Data on decoded batches.

This module imports numpy only, on purpose: Ray Data runs it in short tasks each epoch, and a task whose
function lives beside torch and the model libraries first spends seconds importing them, and every epoch's
first batch waits for that. Decoding, which needs those libraries, runs once per data set instead.
"""

from __future__ import annotations

import numpy as np


class FlipRotateCaptionDropout:
    """Images: a random quarter turn and flip (growth has no orientation); captions: with probability
    `caption_dropout`, the stage-neutral caption's tokens, so the model also learns to predict from images."""

    def __init__(self, neutral_tokens: np.ndarray, caption_dropout: float):
        self.neutral_tokens, self.caption_dropout = neutral_tokens, caption_dropout

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rng = np.random.default_rng()
        images = np.stack([np.rot90(im, int(rng.integers(4))) for im in batch["image"]])
        flip = rng.random(len(images)) < 0.5
        images[flip] = images[flip, :, ::-1]
        tokens = batch["tokens"].copy()
        tokens[rng.random(len(tokens)) < self.caption_dropout] = self.neutral_tokens
        return {**batch, "image": np.ascontiguousarray(images), "tokens": tokens}
