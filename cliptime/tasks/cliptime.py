"""CLIPTime on fungal growth: stage classification and timestamp regression from an image and its caption.

Shard schema (`CLIPTimeTask.schema`), one row per photo:

    image     binary   encoded RGB image (cliptime.data.images: JPEG; PNG and others read too)
    stage     string   spore | hyphae | mycelium
    hours     float64  hours since the start of the series
    t         float32  normalized time in [0, 1] over the data set's time range (the regression target)
    caption   string   a description of the photo (from a template set, or the user's own)
    sequence  string   the series (colony, camera) the photo belongs to: splits never cut a series
    frame     int32    position of the photo in its series

Model: an open_clip backbone embeds image and caption; the L2-normalized embeddings are fused (`sum`, the
paper's element-wise sum, or `concat`); a linear classifier predicts the stage and a time head (the paper's
Time-Transformer, or an MLP for the ablation) regresses t with a sigmoid. Loss: `cls_weight * CE +
time_weight * MSE`.

Training is aimed at the image: each training image comes at a random quarter turn and flip, with its hue turned
(`--hue-jitter`) and, for a fraction, in grayscale (`--grayscale-fraction`), and with the stage-neutral caption
half of the time (`--caption-dropout`). A photo alone must then tell stage and time, from shapes rather than
colour; the evaluation's image-only, grayscale and hue-shifted accuracies show whether it does.
"""

from __future__ import annotations

import argparse
import functools
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import ray.data
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn

from cliptime.config import option
from cliptime.data import timelapse
from cliptime.data.fungal_growth import (
    NEUTRAL_CAPTION,
    STAGES,
    caption_templates,
    generate_sequence,
    split_of_sequence,
)
from cliptime.data.generated import from_generator
from cliptime.data.images import ENCODING as IMAGE_ENCODING
from cliptime.errors import CliptimeError
from cliptime.models.heads import time_head
from cliptime.models.open_clip_backbone import (
    check_backbone,
    create_backbone,
    embed_dim,
    image_size,
    tokenizer_for,
)
from cliptime.tasks.base import Batch, Converter, NumpyBatch, Task, tokenize_distinct


@dataclass(frozen=True)
class CLIPTimeConfig:
    data: str = option("", "Parquet shard directory from jobs/make_shards.py (default: generate the data)")
    sequences: int = option(60, "generated colonies (time-lapse sequences), split 70/15/15 by sequence")
    frames: int = option(100, "frames per generated sequence (frame i has t = i / (frames - 1))")
    image_size: int = option(64, "generated image size in pixels")
    hours: tuple[float, float] = option((0.0, 72.0), "time range in hours that a sequence covers")
    templates: str = option("generic", "caption template set of the generated data: generic or detailed")
    data_seed: int = option(0, "seed of the generated data set")
    model: str = option("cliptime-tiny-rn", "open_clip model name (the project registers cliptime-tiny-rn)")
    pretrained: str = option("", "open_clip weights: a local checkpoint file, or an open_clip tag (network)")
    freeze_backbone: bool = option(False, "keep the open_clip backbone frozen, train only the heads")
    fusion: str = option("sum", "how image and text embeddings are fused: sum (paper) or concat")
    head: str = option("transformer", "time head: transformer (the paper's Time-Transformer) or mlp")
    head_depth: int = option(2, "time head depth (encoder layers, or MLP hidden layers)")
    head_heads: int = option(8, "attention heads of the Time-Transformer")
    ffn_dim: int = option(2048, "feed-forward width of the Time-Transformer (hidden width of the MLP head)")
    cls_weight: float = option(1.0, "weight of the stage classification loss")
    time_weight: float = option(
        20.0, "weight of the time regression loss (MSE on normalized time; the paper weights both losses 1)"
    )
    caption_dropout: float = option(
        0.5, "probability of training with a stage-neutral caption, so image-only prediction works"
    )
    hue_jitter: float = option(
        0.5,
        "largest random hue rotation of a training image, in turns (0.5: any hue; 0: none), so colour alone "
        "cannot decide",
    )
    grayscale_fraction: float = option(0.2, "fraction of training images seen in grayscale")


class CLIPTimeModel(nn.Module):
    """open_clip backbone + fusion + stage classifier + time head. Takes uint8 HWC images and token ids."""

    def __init__(self, backbone: nn.Module, preprocess_cfg: dict, dim: int, cfg: CLIPTimeConfig):
        super().__init__()
        self.backbone = backbone
        self.image_size = image_size(cfg.model)
        self.register_buffer("mean", torch.tensor(preprocess_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess_cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.fusion = cfg.fusion
        fused = dim * (2 if cfg.fusion == "concat" else 1)
        self.classifier = nn.Linear(fused, len(STAGES))
        self.time_head = time_head(cfg.head, fused, cfg.head_depth, cfg.head_heads, cfg.ffn_dim)
        if cfg.freeze_backbone:
            self.backbone.requires_grad_(False)
        # CLIP's contrastive temperature (and SigLIP's bias) serve open_clip's own loss, unused here: frozen, or
        # DDP waits for their gradients and never all-reduces the bucket they share with other weights.
        for name in ("logit_scale", "logit_bias"):
            if isinstance(getattr(self.backbone, name, None), nn.Parameter):
                getattr(self.backbone, name).requires_grad_(False)

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float().div_(255.0)
        return F.normalize(self.backbone.encode_image((x - self.mean) / self.std), dim=-1)

    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone.encode_text(tokens), dim=-1)

    def predict_from(self, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stage logits, normalized time) of image and text embeddings; a single text row serves every image."""
        txt = txt.expand(len(img), -1)
        fused = img + txt if self.fusion == "sum" else torch.cat([img, txt], dim=-1)
        return self.classifier(fused), self.time_head(fused)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.predict_from(self.embed_image(image), self.embed_text(tokens))


def decode_image(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """A shard row's image (JPEG, PNG, ...) -> uint8 RGB HWC at the model's `size` (resized if the shards have
    another)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if image.size != size:
        image = image.resize(size, Image.BILINEAR)
    return np.asarray(image)


class CLIPTimePreprocessor:
    """Shard rows -> uint8 images at the model's size, token ids, stage index, normalized time."""

    def __init__(self, model: str, image_size: tuple[int, int]):
        self.model, self.size = model, image_size

    def __call__(self, batch: NumpyBatch) -> NumpyBatch:
        return {
            "image": np.stack([decode_image(b, self.size) for b in batch["image"]]),
            "tokens": tokenize_distinct(tokenizer_for(self.model), batch["caption"]),
            "stage": np.array([STAGES.index(s) for s in batch["stage"]], dtype=np.int64),
            "t": np.asarray(batch["t"], dtype=np.float32),
        }


def convert_timelapse(
    photos_dir: Path, cfg: timelapse.TimelapseConfig, scratch: Path, skip_bad: bool
) -> tuple[dict[str, ray.data.Dataset], dict, list[str]]:
    """A time-lapse photo folder -> CLIPTime shard rows, photos at the model's input size (or --image-size)."""
    return timelapse.convert(photos_dir, cfg, photo_size(cfg), CLIPTimeTask.schema, scratch, skip_bad)


def photo_size(cfg: timelapse.TimelapseConfig) -> int:
    """The side in pixels of converted photos: --image-size, else the input size of the model (checked first)."""
    check_backbone(cfg.model, "")
    return cfg.image_size or image_size(cfg.model)[0]


def convert_webdataset_photos(
    tars: str | Path, cfg: timelapse.TimelapseConfig, scratch: Path, skip_bad: bool
) -> tuple[dict[str, ray.data.Dataset], dict, list[str]]:
    """WebDataset tar shards of photos -> CLIPTime shard rows, photos prepared and split as a time-lapse folder's."""
    return timelapse.convert_webdataset(tars, cfg, photo_size(cfg), CLIPTimeTask.schema, scratch, skip_bad)


def webdataset_settings(cfg: CLIPTimeConfig) -> timelapse.TimelapseConfig:
    """How `--data TARS` converts WebDataset shards: photos at the model's input size, captions of the task's
    template set, series split with its data seed."""
    return timelapse.TimelapseConfig(model=cfg.model, templates=cfg.templates, seed=cfg.data_seed)


def _hue_rotation(turns: torch.Tensor) -> torch.Tensor:
    """(N,) rotations in turns -> (N, 3, 3) matrices turning RGB colours about the gray axis: each hue moves round
    the colour circle by the angle; grays, and each colour's mean over its channels, stay (Rodrigues' formula about
    the axis (1, 1, 1) / sqrt(3))."""
    angle = 2 * torch.pi * turns
    k = torch.full((3,), 3**-0.5, device=turns.device)
    cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], device=turns.device) * 3**-0.5
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    return cos * torch.eye(3, device=turns.device) + sin * cross + (1 - cos) * torch.outer(k, k)


def random_symmetry(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC square images, each at one of the square's eight symmetries (quarter turns and flips), all equally
    likely: a transpose, a vertical and a horizontal flip, each with probability 1/2 (no host sync on a GPU)."""
    coin = lambda: torch.rand(len(images), 1, 1, 1, device=images.device) < 0.5  # noqa: E731
    if images.shape[1] == images.shape[2]:
        images = torch.where(coin(), images.transpose(1, 2), images)
    images = torch.where(coin(), images.flip(1), images)
    return torch.where(coin(), images.flip(2), images)


def recolour_for_training(images: torch.Tensor, hue_jitter: float, grayscale_fraction: float) -> torch.Tensor:
    """uint8 NHWC training images with their hues turned by up to `hue_jitter` turns either way (a saturated
    colour may clip) and a `grayscale_fraction` of them in grayscale: stage and time must then be read from shapes
    rather than colours."""
    n = len(images)
    with torch.autocast(images.device.type, enabled=False):  # pixel levels in float32, whatever the step's AMP
        x = images.float()
        turns = (torch.rand(n, device=x.device) * 2 - 1) * hue_jitter
        x = torch.einsum("nij,nhwj->nhwi", _hue_rotation(turns), x)
        gray = torch.rand(n, device=x.device) < grayscale_fraction
        luma = TF.rgb_to_grayscale(x.permute(0, 3, 1, 2), num_output_channels=3).permute(0, 2, 3, 1)
        return torch.where(gray[:, None, None, None], luma, x).round_().clamp_(0, 255).to(torch.uint8)


# -- evaluation on variants of the test images -------------------------------------------------------------------
# The hue shift turns every hue a third of the colour circle (120 degrees; torchvision counts hue in turns). The
# CLIPTime authors' generator paints its stages yellow, orange and red (hues 60 to 0 degrees): turned, they are cyan
# to green, hues no stage has; where stages sit a third of the circle apart, each takes the next stage's hue
# (tests/test_cliptime_image.py). Shapes, brightness and saturation stay: a model that reads shape keeps its
# accuracy, one that reads colour loses it.
HUE_SHIFT = 1 / 3
# Recolourings of a batch's images, uint8 NCHW -> uint8 NCHW (images reach the model as uint8 pixels and the model
# normalizes them itself, so they are recoloured as they are). Grayscale keeps the luma in all three channels.
RECOLOURINGS = {
    "grayscale": lambda images: TF.rgb_to_grayscale(images, num_output_channels=3),
    "hue_shift": lambda images: TF.adjust_hue(images, HUE_SHIFT),
}
# What `evaluate` runs the model on, headline first, with the suffix of each one's metrics: the images with a
# stage-neutral caption, with their own captions, and recoloured with the neutral caption.
VARIANTS = {"image_only": "_image_only", "caption": "", "grayscale": "_grayscale", "hue_shift": "_hue_shift"}


def _predict_variants(
    model: CLIPTimeModel, batch: Batch, neutral: torch.Tensor, variants: Iterable[str]
) -> dict[str, tuple]:
    """(stage index, normalized time) on the CPU for each of `variants` (of `VARIANTS`) of a batch. The image-only
    and the caption variants share the images' embedding, and the neutral caption's embedding (`neutral`) serves
    every row: one image-tower pass per recolouring and one for the rest, and one text-tower pass."""
    original = model.embed_image(batch["image"])
    images_of = {
        v: original
        if v not in RECOLOURINGS
        else model.embed_image(RECOLOURINGS[v](batch["image"].permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        for v in variants
    }
    out = {}
    for variant, img in images_of.items():
        logits, t_pred = model.predict_from(img, model.embed_text(batch["tokens"]) if variant == "caption" else neutral)
        out[variant] = (logits.argmax(-1).cpu(), t_pred.float().cpu())
    return out


def _time_metrics(stage: np.ndarray, t: np.ndarray, t_pred: np.ndarray, span: float, suffix: str) -> dict:
    """Time MAE in hours, overall and per stage, and each stage's Spearman correlation of predicted and true time."""
    from scipy.stats import spearmanr

    err_hours = np.abs(t_pred - t) * span
    metrics = {f"time_mae_hours{suffix}": err_hours.mean()}
    for i, name in enumerate(STAGES):
        sel = stage == i
        if sel.any():
            metrics[f"time_mae_hours_{name}{suffix}"] = err_hours[sel].mean()
        if sel.sum() > 2 and np.ptp(t[sel]) > 0:
            metrics[f"spearman_{name}{suffix}"] = spearmanr(t_pred[sel], t[sel]).statistic
    return metrics


class CLIPTimeTask(Task):
    name = "cliptime"
    title = "CLIPTime"
    summary = (
        "From a photo of a fungal colony, and optionally a caption describing it, CLIPTime tells the growth stage "
        "(spore, hyphae or mycelium) and how many hours into its time-lapse series the photo was taken. Input: "
        "`image`, the encoded photo (PNG, JPEG, TIFF...), and `caption` (empty: a stage-neutral one, so the photo "
        "alone decides). Output: `stage`, `hours` and the probability of each stage (`prob_spore`, `prob_hyphae`, "
        "`prob_mycelium`)."
    )
    aliases = ("fungal",)
    Config = CLIPTimeConfig
    schema = pa.schema(
        [
            ("image", pa.binary()),
            ("stage", pa.string()),
            ("hours", pa.float64()),
            ("t", pa.float32()),
            ("caption", pa.string()),
            ("sequence", pa.string()),
            ("frame", pa.int32()),
        ]
    )
    label_column = "stage"
    monitor = "val/accuracy_image_only"  # the caption names the stage: a photo alone is the honest test
    train_defaults = {"epochs": 20, "batch_size": 64, "lr": 2e-3}
    generated_fields = ("sequences", "frames", "image_size", "hours", "templates", "data_seed")
    data_fields = ("data", *generated_fields, "model")
    data_format = IMAGE_ENCODING
    data_sizes = {"sequences": 7, "frames": 10}
    tiny_model = {"image_size": 32, "head_depth": 1, "ffn_dim": 64}
    converters = {
        "timelapse": Converter(
            timelapse.TimelapseConfig,
            "PHOTOS_DIR",
            "a folder of time-lapse photos, one sub-folder per series",
            convert_timelapse,
        ),
        "webdataset-images": Converter(
            timelapse.TimelapseConfig,
            "TARS",
            "WebDataset tar shards (a .tar file, or a folder or s3:// prefix of them) of photos: jpg/png/webp, a txt "
            "caption, a json with series, stage and hours (or timestamp)",
            convert_webdataset_photos,
            webdataset=webdataset_settings,
        ),
    }

    # -- data ----------------------------------------------------------------------------------------------
    def check(self) -> None:
        c = self.cfg
        if not c.hours[1] > c.hours[0]:
            raise CliptimeError(f"--hours {c.hours[0]:g} {c.hours[1]:g}: the time range must be positive")
        if c.frames < 2:
            raise CliptimeError(f"--frames {c.frames}: a sequence needs at least 2 frames")
        splits = [split_of_sequence(i, c.sequences) for i in range(c.sequences)]
        for split in ("train", "val", "test"):
            if split not in splits and not c.data:
                raise CliptimeError(f"--sequences {c.sequences} leaves the {split} split empty (use 7 or more)")
        caption_templates(c.templates)
        if c.fusion not in ("sum", "concat"):
            raise CliptimeError(f"--fusion {c.fusion!r}: expected sum or concat")
        if c.head not in ("transformer", "mlp"):
            raise CliptimeError(f"--head {c.head!r}: expected transformer or mlp")
        for flag, value, most in (
            ("--caption-dropout", c.caption_dropout, 1.0),
            ("--grayscale-fraction", c.grayscale_fraction, 1.0),
            ("--hue-jitter", c.hue_jitter, 0.5),
        ):
            if value > most:
                raise CliptimeError(f"{flag} {value:g}: expected at most {most:g}")
        check_backbone(c.model, c.pretrained)
        fused = embed_dim(c.model) * (2 if c.fusion == "concat" else 1)
        if c.head == "transformer" and fused % c.head_heads:
            raise CliptimeError(f"--head-heads {c.head_heads} does not divide the fused width {fused}")

    def source(self) -> dict:
        c = self.cfg
        return {
            "generator": "cliptime.data.fungal_growth",
            "hours": list(c.hours),
            "sequences": c.sequences,
            "frames": c.frames,
            "image_size": c.image_size,
            "templates": c.templates,
            "data_seed": c.data_seed,
            "image_encoding": self.data_format,
        }

    def resolved(self, manifest: dict) -> CLIPTimeTask:
        """The time range is the shards' own (a time-lapse folder's longest series, a generator's --hours)."""
        hours = manifest.get("source", {}).get("hours")
        return self if hours is None else self.replace(hours=(float(hours[0]), float(hours[1])))

    def generate(self) -> dict[str, ray.data.Dataset]:
        c = self.cfg
        kwargs = dict(
            seed=c.data_seed, frames=c.frames, size=c.image_size, hours=tuple(c.hours), template_set=c.templates
        )
        return {
            split: from_generator(
                generate_sequence,
                "index",
                [i for i in range(c.sequences) if split_of_sequence(i, c.sequences) == split],
                self.schema,
                **kwargs,
            )
            for split in ("train", "val", "test")
        }

    def preprocessor(self) -> CLIPTimePreprocessor:
        return CLIPTimePreprocessor(self.cfg.model, image_size(self.cfg.model))

    def train_transform(self, batch: Batch) -> Batch:
        """On the training device, per step: each image at one of the square's eight symmetries (growth has no
        orientation) and recoloured, and the stage-neutral caption for a `caption_dropout` share of the rows."""
        c = self.cfg
        images = random_symmetry(batch["image"])
        if c.hue_jitter or c.grayscale_fraction:
            images = recolour_for_training(images, c.hue_jitter, c.grayscale_fraction)
        tokens = batch["tokens"]
        if c.caption_dropout:
            drop = torch.rand(len(tokens), 1, device=tokens.device) < c.caption_dropout
            tokens = torch.where(drop, self.neutral_tokens.to(tokens.device), tokens)
        return {**batch, "image": images, "tokens": tokens}

    @functools.cached_property
    def neutral_tokens(self) -> torch.Tensor:
        return tokenizer_for(self.cfg.model)([NEUTRAL_CAPTION])[0]

    # -- model and loss ------------------------------------------------------------------------------------
    def build_model(self, load_pretrained: bool = True) -> CLIPTimeModel:
        c = self.cfg
        backbone, preprocess_cfg = create_backbone(c.model, c.pretrained if load_pretrained else "")
        return CLIPTimeModel(backbone, preprocess_cfg, embed_dim(c.model), c)

    def loss(
        self, model: nn.Module, batch: Batch, epoch: int | None = None, epochs: int | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, t_pred = model(batch["image"], batch["tokens"])
        cls = F.cross_entropy(logits, batch["stage"])
        reg = F.mse_loss(t_pred.float(), batch["t"])
        return self.cfg.cls_weight * cls + self.cfg.time_weight * reg, {"cls_loss": cls, "time_loss": reg}

    # -- evaluation ----------------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> tuple[dict[str, float], dict[str, Any]]:
        """The headline is what a user gets from a photo alone: `accuracy_image_only` and the image-only time
        metrics (`*_image_only`), with a stage-neutral caption. `accuracy` is caption-conditioned (the captions name
        the stage, so it is near 1 by construction); `accuracy_grayscale` and `accuracy_hue_shift` are image-only
        on recoloured images (see RECOLOURINGS): how much of the stage the model reads from colour."""
        return self._evaluate(model, batches, VARIANTS)

    def validate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        """Every metric of the test but the recoloured controls, which take an image-tower pass each: a third of
        the model passes of `evaluate`."""
        return self._evaluate(model, batches, [v for v in VARIANTS if v not in RECOLOURINGS])[0]

    @torch.no_grad()
    def _evaluate(
        self, model: nn.Module, batches: Iterable[Batch], variants: Iterable[str]
    ) -> tuple[dict[str, float], dict[str, Any]]:
        from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

        model.eval()
        device = next(model.parameters()).device
        neutral = model.embed_text(self.neutral_tokens[None].to(device))
        stage, t, runs = [], [], {variant: [] for variant in variants}
        for batch in batches:
            stage.append(batch["stage"].cpu())
            t.append(batch["t"].cpu())
            for variant, predicted in _predict_variants(model, batch, neutral, variants).items():
                runs[variant].append(predicted)
        stage, t = torch.cat(stage).numpy(), torch.cat(t).numpy()
        pred = {variant: torch.cat([p for p, _ in run]).numpy() for variant, run in runs.items()}
        t_pred = {variant: torch.cat([tp for _, tp in run]).numpy() for variant, run in runs.items()}
        span = self.cfg.hours[1] - self.cfg.hours[0]
        metrics = {
            **{f"accuracy{VARIANTS[v]}": accuracy_score(stage, pred[v]) for v in variants},
            "macro_f1": f1_score(stage, pred["caption"], average="macro", labels=range(len(STAGES)), zero_division=0),
            **_time_metrics(stage, t, t_pred["image_only"], span, VARIANTS["image_only"]),
            **_time_metrics(stage, t, t_pred["caption"], span, VARIANTS["caption"]),
        }
        outputs = {  # the figures show the image-only path: the caption-conditioned stages are right by construction
            "stage": stage,
            "hours": self.cfg.hours[0] + t * span,
            "hours_pred": self.cfg.hours[0] + t_pred["image_only"] * span,
            "confusion": confusion_matrix(stage, pred["image_only"], labels=range(len(STAGES))),
        }
        return {k: float(v) for k, v in metrics.items()}, outputs

    def figures(self, outputs: dict[str, Any], baseline: dict[str, Any] | None = None) -> dict[str, Any]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from sklearn.metrics import ConfusionMatrixDisplay

        fig_cm, ax = plt.subplots(figsize=(4.5, 4))
        ConfusionMatrixDisplay(outputs["confusion"], display_labels=STAGES).plot(ax=ax, colorbar=False)
        ax.set_title("stage confusion, image only (test)")
        fig_cm.tight_layout()

        fig_t, ax = plt.subplots(figsize=(5, 4.5))
        for i, name in enumerate(STAGES):
            sel = outputs["stage"] == i
            ax.scatter(outputs["hours"][sel], outputs["hours_pred"][sel], s=6, alpha=0.6, label=name)
        lo, hi = self.cfg.hours
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel("true hours")
        ax.set_ylabel("predicted hours")
        ax.set_title("time prediction, image only (test)")
        ax.legend()
        fig_t.tight_layout()
        return {"confusion_matrix.png": fig_cm, "time_pred_vs_true.png": fig_t}

    # -- serving -------------------------------------------------------------------------------------------
    def input_example(self) -> pd.DataFrame:
        blank = np.full((*image_size(self.cfg.model), 3), 200, dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(blank).save(buf, format="PNG")
        return pd.DataFrame({"image": [buf.getvalue()], "caption": ["a photo of fungal hyphae"]})

    @torch.no_grad()
    def predict(self, model: nn.Module, inputs: pd.DataFrame) -> pd.DataFrame:
        """inputs: `image` (encoded image bytes) and optional `caption` (empty: a stage-neutral caption)."""
        model.eval()
        device = next(model.parameters()).device
        captions = inputs["caption"] if "caption" in inputs else pd.Series([""] * len(inputs))
        captions = [c if isinstance(c, str) and c.strip() else NEUTRAL_CAPTION for c in captions]
        images = []
        for i, data in enumerate(inputs["image"]):
            try:  # a photo prepared and stored as make_shards does (upright, deep images scaled, center-cropped,
                # encoded as shards hold it), then decoded as training decodes it: the pixels a model trained on
                stored, _ = timelapse.read_photo(io.BytesIO(bytes(data)), model.image_size[0])
                images.append(decode_image(stored, model.image_size))
            except timelapse.UNREADABLE_IMAGE as e:
                raise CliptimeError(f"input row {i}: not a readable image ({type(e).__name__})") from None
        tokens = tokenizer_for(self.cfg.model)(captions).to(device)
        logits, t_pred = model(torch.from_numpy(np.stack(images)).to(device), tokens)
        probs = logits.softmax(-1).cpu().numpy()
        hours = self.cfg.hours[0] + t_pred.float().cpu().numpy() * (self.cfg.hours[1] - self.cfg.hours[0])
        out = pd.DataFrame({"stage": [STAGES[i] for i in probs.argmax(-1)], "hours": hours.astype(np.float64)})
        for i, name in enumerate(STAGES):
            out[f"prob_{name}"] = probs[:, i].astype(np.float64)
        return out

    # -- prediction command ----------------------------------------------------------------------------------
    file_suffixes = ("png", "jpg", "jpeg", "tif", "tiff", "bmp", "webp")

    @classmethod
    def add_predict_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--caption", default="", help="the photo's description (default: a stage-neutral one)")

    def prediction_rows(self, data: bytes, args: argparse.Namespace) -> pd.DataFrame:
        return pd.DataFrame({"image": [data], "caption": [args.caption]})

    def prediction_result(self, predictions: pd.DataFrame, args: argparse.Namespace) -> dict[str, Any]:
        return predictions.iloc[0].to_dict()

    def folder_summary(self, table: pd.DataFrame) -> dict[str, Any]:
        return {"images": len(table), "stages": table["stage"].value_counts().to_dict()}
