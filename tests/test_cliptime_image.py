"""CLIPTime's image-only metrics on data sets whose answer is known: a tiny model trained in-process (no Ray) where
colour alone decides the stage must lose it in grayscale (to chance) and under the hue shift (below chance); where
shape alone decides it, the stage survives both. Images are drawn at the backbone's input size (64 px)."""

import numpy as np
import pytest
import torch
from matplotlib.colors import rgb_to_hsv
from PIL import Image, ImageDraw

from cliptime.data.fungal_growth import NEUTRAL_CAPTION, STAGES
from cliptime.models.open_clip_backbone import image_size, tokenizer_for
from cliptime.tasks.cliptime import RECOLOURINGS, CLIPTimeTask, _hue_rotation, recolour_for_training
from cliptime.train import make_optimizer, make_scheduler

CHANCE = 1 / len(STAGES)
PER_STAGE = {"train": 80, "test": 40}  # images per stage of each split
LUMA = np.array([0.2989, 0.587, 0.114])  # the weights of torchvision's rgb_to_grayscale


def colour_set(n_per_stage: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One disc on a gray background in every image; only the disc's hue tells the stage. Its colour is a luma plus
    a chroma at the stage's angle (0, 120 or 240 degrees, +-20) in the plane of colours without luma, so that every
    stage has the same grayscale images: HSV hues about 8, 132 and 244 degrees."""
    u = np.cross(LUMA, [1.0, 1.0, 1.0])
    u /= np.linalg.norm(u)
    v = np.cross(LUMA, u)
    v /= np.linalg.norm(v)
    stage = np.repeat(np.arange(len(STAGES)), n_per_stage)
    images = []
    for s in stage:
        angle = np.radians(120 * s + rng.uniform(-20, 20))
        colour = rng.uniform(90, 170) + rng.uniform(40, 70) * (np.cos(angle) * u + np.sin(angle) * v)
        mask = disc_mask(size, rng)
        images.append(paint(mask, np.full(3, rng.uniform(90, 170)), colour, rng))
    return np.stack(images), stage


def shape_set(n_per_stage: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Scattered dots, three lines across the image or one filled disc by stage, in a random colour on a random
    lighter background (luma at least 60 levels above): the stage is in the shapes, which grayscale keeps, and not
    in the colour."""
    stage = np.repeat(np.arange(len(STAGES)), n_per_stage)
    images = []
    for s in stage:
        mask = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(mask)
        if s == 0:
            for x, y in rng.uniform(8, size - 8, (int(rng.integers(6, 11)), 2)):
                r = rng.uniform(2, 3.5)
                draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
        elif s == 1:
            for x, y, angle in zip(*rng.uniform(0.2, 0.8, (2, 3)) * size, rng.uniform(0, np.pi, 3)):
                dx, dy = size * np.cos(angle), size * np.sin(angle)
                draw.line([x - dx, y - dy, x + dx, y + dy], fill=255, width=3)
        else:
            mask = disc_mask(size, rng)
        background, colour = rng.uniform(150, 255, 3), rng.uniform(0, 255, 3)
        while LUMA @ (background - colour) < 60:
            colour = rng.uniform(0, 255, 3)
        images.append(paint(mask, background, colour, rng))
    return np.stack(images), stage


def disc_mask(size: int, rng: np.random.Generator) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    x, y = rng.uniform(0.3, 0.7, 2) * size
    r = rng.uniform(0.15, 0.28) * size
    ImageDraw.Draw(mask).ellipse([x - r, y - r, x + r, y + r], fill=255)
    return mask


def paint(mask: Image.Image, background: np.ndarray, colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 HWC image: `colour` where the mask is, `background` elsewhere, with a little pixel noise."""
    alpha = np.asarray(mask, dtype=np.float64)[..., None] / 255
    image = background * (1 - alpha) + colour * alpha + rng.normal(0, 3, (*alpha.shape[:2], 3))
    return np.clip(image, 0, 255).round().astype(np.uint8)


def train_and_test(make_set, epochs: int) -> dict[str, float]:
    """Train a tiny CLIPTime model on `make_set`'s images with the stage-neutral caption (the image is all it has),
    with the training loop's optimizer and schedule, then evaluate it on a held-out set drawn the same way. Times
    are random and not trained (`time_weight` 0): these sets test the stage only."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    task = CLIPTimeTask.tiny(time_weight=0.0)
    model = task.build_model()
    size = image_size(task.cfg.model)[0]
    neutral = tokenizer_for(task.cfg.model)([NEUTRAL_CAPTION])

    def batches(split: str, batch_size: int) -> list[dict[str, torch.Tensor]]:
        images, stage = make_set(PER_STAGE[split], size, rng)
        order = rng.permutation(len(stage))
        return [
            {
                "image": torch.from_numpy(images[i]),
                "tokens": neutral.expand(len(i), -1),
                "stage": torch.from_numpy(stage[i]),
                "t": torch.from_numpy(rng.uniform(0, 1, len(i)).astype(np.float32)),
            }
            for i in np.array_split(order, -(-len(order) // batch_size))
        ]

    train, test = batches("train", 24), batches("test", 256)
    tc = CLIPTimeTask.train_config(epochs=epochs, lr=2e-3)
    _, optimizer = make_optimizer(model, tc)
    scheduler = make_scheduler(optimizer, tc, len(train))
    model.train()
    for _ in range(epochs):
        for batch in train:
            loss, _ = task.loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    metrics, _ = task.evaluate(model, test)
    print({k: round(v, 3) for k, v in metrics.items() if k.startswith("accuracy")})
    return metrics


def test_grayscale_and_hue_shift_recolour_as_documented():
    """Pure red in grayscale is its luma in every channel; a hue shift of a third of a turn makes it pure green."""
    red = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    red[:, 0] = 255
    assert torch.equal(RECOLOURINGS["grayscale"](red), torch.full_like(red, int(0.2989 * 255)))
    assert torch.equal(RECOLOURINGS["hue_shift"](red), torch.roll(red, 1, dims=1))


@pytest.mark.slow  # trains a model in-process: 7-13 s each
def test_colour_decided_stages_are_lost_in_grayscale_and_under_the_hue_shift():
    m = train_and_test(colour_set, epochs=4)
    assert m["accuracy_image_only"] > CHANCE + 0.45
    assert abs(m["accuracy_grayscale"] - CHANCE) < 0.1  # every stage has the same grayscale images
    assert m["accuracy_hue_shift"] < CHANCE - 0.2  # every stage now has the next stage's hue


@pytest.mark.slow  # trains a model in-process: 7-13 s each
def test_shape_decided_stages_survive_grayscale_and_the_hue_shift():
    m = train_and_test(shape_set, epochs=8)
    assert m["accuracy_image_only"] > CHANCE + 0.45
    assert m["accuracy_grayscale"] > CHANCE + 0.45
    assert m["accuracy_hue_shift"] > CHANCE + 0.45


def test_training_recolouring_turns_hues_and_grays_and_keeps_brightness():
    """The training augmentation: a hue turn keeps each pixel's brightness (the mean of its channels) and, by a
    third of a turn, is torchvision's hue shift; grayscale is torchvision's; up to half a turn either way, a red
    disc comes out in every third of the colour circle."""
    torch.manual_seed(0)
    # grays of 80-176 with channels at most 30 apart: a turn keeps a colour's distance from gray, so none clips
    images = (torch.randint(80, 177, (64, 8, 8, 1)) + torch.randint(-15, 16, (64, 8, 8, 3))).to(torch.uint8)
    turned = recolour_for_training(images, hue_jitter=0.5, grayscale_fraction=0.0)
    assert not torch.equal(turned, images)
    assert (turned.float().mean(-1) - images.float().mean(-1)).abs().max() <= 1.0  # rounding only
    third = torch.einsum("nij,nhwj->nhwi", _hue_rotation(torch.full((64,), 1 / 3)), images.float()).round()
    assert torch.equal(third.to(torch.uint8), RECOLOURINGS["hue_shift"](images.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    gray = recolour_for_training(images, hue_jitter=0.0, grayscale_fraction=1.0)
    expected = RECOLOURINGS["grayscale"](images.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert (gray.int() - expected.int()).abs().max() <= 1
    red = torch.zeros(300, 1, 1, 3, dtype=torch.uint8)
    red[..., 0] = 200
    hues = rgb_to_hsv(recolour_for_training(red, 0.5, 0.0).numpy() / 255)[..., 0].flatten()
    assert all(((hues >= lo) & (hues < lo + 1 / 3)).sum() > 50 for lo in (0, 1 / 3, 2 / 3))


def test_training_turns_and_flips_each_image_to_one_of_the_eight_symmetries_and_drops_a_share_of_captions():
    """The on-device augmentation of a training step: every image comes out as one of the square's eight
    symmetries of itself, all eight about equally often, and about `caption_dropout` of the rows get the
    stage-neutral caption's tokens, the others keep their own."""
    torch.manual_seed(0)
    task = CLIPTimeTask(CLIPTimeTask.Config(caption_dropout=0.5, hue_jitter=0.0, grayscale_fraction=0.0))
    one = torch.arange(16, dtype=torch.uint8).reshape(1, 4, 4, 1).expand(1, 4, 4, 3)  # no symmetry of its own
    symmetries = [torch.rot90(im, k, dims=(0, 1)) for im in (one[0], one[0].flip(1)) for k in range(4)]
    n = 1600
    tokens = tokenizer_for(task.cfg.model)(["spores on agar"] * n)
    out = task.train_transform({"image": one.expand(n, 4, 4, 3).clone(), "tokens": tokens.clone()})
    which = [next(i for i, s in enumerate(symmetries) if torch.equal(im, s)) for im in out["image"]]
    counts = np.bincount(which, minlength=8)
    assert counts.min() > n / 8 * 0.75, counts  # each symmetry near 200 of 1600
    neutral = tokenizer_for(task.cfg.model)([NEUTRAL_CAPTION])[0]
    dropped = (out["tokens"] == neutral).all(1)
    kept = (out["tokens"] == tokens).all(1)
    assert bool((dropped | kept).all()) and 0.45 < dropped.float().mean() < 0.55


def test_validation_scores_as_the_test_does_without_the_recoloured_controls(monkeypatch):
    """Each epoch's validation gives the test's metrics with the same values, less the recoloured controls, and
    runs the image tower once per batch where the test runs it once per recolouring more."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    task = CLIPTimeTask.tiny()
    model = task.build_model()
    images, stage = colour_set(8, image_size(task.cfg.model)[0], rng)
    tokens = tokenizer_for(task.cfg.model)(["fungal spores"] * len(stage))
    batch = {
        "image": torch.from_numpy(images),
        "tokens": tokens,
        "stage": torch.from_numpy(stage),
        "t": torch.from_numpy(rng.uniform(0, 1, len(stage)).astype(np.float32)),
    }
    passes = []
    embed_image = model.embed_image
    monkeypatch.setattr(model, "embed_image", lambda images: passes.append(len(images)) or embed_image(images))
    tested, _ = task.evaluate(model, [batch])
    test_passes, passes[:] = len(passes), []
    validated = task.validate(model, [batch])
    controls = {f"accuracy_{name}" for name in RECOLOURINGS}
    assert controls <= set(tested) and not controls & set(validated)
    assert validated == {k: v for k, v in tested.items() if k not in controls}
    assert (len(passes), test_passes) == (1, 1 + len(RECOLOURINGS))
