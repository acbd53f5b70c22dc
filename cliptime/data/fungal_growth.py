"""Procedural, time-annotated images of a growing fungal colony (the CLIPTime training data).

Semantics follow what is known of the paper's generator, drawn with our own code: a *sequence* is one colony
photographed `frames` times; frame i has normalized time T = i / (frames - 1); the stage is fixed by T
(T <= 0.1 spore, T <= 0.5 hyphae, else mycelium); spores fade as hyphae take over; branch length and count grow
with T; splits are made by sequence, never by frame.

Every frame is drawn from the sequence's own random structure (spore positions, hyphal trees, colony disc), so
the growth is continuous within a sequence, and each stage carries a visible time signal:
- spore: spores swell, and germ tubes appear late in the stage;
- hyphae: filaments lengthen and new branches emerge;
- mycelium: a dense network whose radius and density grow.
Per sequence: position, spore count, stain colour, background texture and illumination; per frame: blur, noise,
small illumination changes. Deterministic for (seed, sequence index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cliptime.data.images import encode_image
from cliptime.errors import CliptimeError

STAGES = ("spore", "hyphae", "mycelium")
SPORE_END = 0.1  # T <= 0.1: spore
HYPHAE_END = 0.5  # T <= 0.5: hyphae, else mycelium

# Caption template sets. `generic` names the stage in a few words; `detailed` describes what the stage looks
# like (the paper's prompt-sensitivity question). NEUTRAL_CAPTION carries no stage: it is what caption dropout
# trains with and what prediction uses when the user gives no text.
CAPTION_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "generic": {
        "spore": ("a photo of fungal spores", "fungal spores under a microscope", "a microscopy image of spores"),
        "hyphae": ("a photo of fungal hyphae", "fungal hyphae under a microscope", "a microscopy image of hyphae"),
        "mycelium": (
            "a photo of a fungal mycelium",
            "a fungal mycelium under a microscope",
            "a microscopy image of a mycelium",
        ),
    },
    "detailed": {
        "spore": (
            "spores are small round reproductive cells that swell before they germinate",
            "a few round fungal spores, some with short germ tubes just emerging",
            "isolated spherical spores on agar, the earliest stage of fungal growth",
        ),
        "hyphae": (
            "hyphae are thin branching filaments that grow out of germinated spores",
            "long thread-like hyphae spreading and branching from the spores",
            "a sparse web of elongating hyphal filaments with new side branches",
        ),
        "mycelium": (
            "a mycelium is a dense network of interwoven hyphae forming a colony",
            "a thick mat of branching filaments covering a growing circular colony",
            "a mature fungal colony with a dense radial network of hyphae",
        ),
    },
}
NEUTRAL_CAPTION = "a microscope photo of a fungal culture"

# Stain colours (RGB) of common microscopy stains, and agar backgrounds.
STAINS = np.array([[40, 60, 160], [150, 40, 120], [90, 40, 150], [30, 90, 70], [60, 50, 40]], dtype=np.float32)
BACKGROUNDS = np.array([[232, 220, 190], [225, 225, 215], [240, 230, 215], [215, 220, 230]], dtype=np.float32)


def stage_index(t: float) -> int:
    return 0 if t <= SPORE_END else (1 if t <= HYPHAE_END else 2)


def caption_templates(template_set: str) -> dict[str, tuple[str, ...]]:
    if template_set not in CAPTION_TEMPLATES:
        raise CliptimeError(f"unknown caption template set {template_set!r} (known: {', '.join(CAPTION_TEMPLATES)})")
    return CAPTION_TEMPLATES[template_set]


@dataclass
class _Branch:
    points: np.ndarray  # (K, 2) polyline in pixels
    cumlen: np.ndarray  # (K,) cumulative length along the polyline
    birth: float  # T at which it starts to grow
    speed: float  # pixels per unit of T
    primary: bool  # grows out of a spore (not a side branch)


class ColonySequence:
    """The random structure of one colony, from which any frame of its time course is drawn."""

    def __init__(self, seed: int, index: int, size: int):
        self.size = size
        self.seed, self.index = seed, index
        rng = np.random.default_rng([seed, index])
        s = size / 64.0  # structure scales with the canvas
        self.stain = STAINS[rng.integers(len(STAINS))] * rng.uniform(0.8, 1.2, 3)
        self.background = self._background(rng)
        self.center = rng.uniform(0.3, 0.7, 2) * size
        n_spores = int(rng.integers(3, 9))
        spread = rng.uniform(4, 10) * s
        self.spores = self.center + rng.normal(0, spread, (n_spores, 2))
        self.spore_radius = rng.uniform(1.2, 2.0, n_spores) * s
        self.branches: list[_Branch] = []
        for p, r in zip(self.spores, self.spore_radius):
            for k in range(int(rng.integers(1, 3))):  # primary hyphae per spore
                angle = rng.uniform(0, 2 * np.pi)
                start = p + r * np.array([np.cos(angle), np.sin(angle)])
                self._grow_tree(rng, start, angle, birth=SPORE_END + 0.02 * k, depth=0, s=s)
        self.germ_angle = rng.uniform(0, 2 * np.pi, n_spores)
        # Mycelium network: short segments scattered over the final colony disc; a segment at radius rho
        # appears once the disc has reached it, so both radius and density grow with T.
        self.colony_radius = rng.uniform(0.32, 0.45) * size
        n_seg = int(420 * s * s)
        rho = self.colony_radius * np.sqrt(rng.uniform(0, 1, n_seg))
        phi = rng.uniform(0, 2 * np.pi, n_seg)
        mid = self.center + np.stack([rho * np.cos(phi), rho * np.sin(phi)], 1)
        direction = phi + rng.normal(0, 0.6, n_seg)
        half = rng.uniform(1.5, 4.0, n_seg)[:, None] * s * np.stack([np.cos(direction), np.sin(direction)], 1)
        self.segments = np.concatenate([mid - half, mid + half], 1)
        self.segment_rho = rho
        self.segment_birth = HYPHAE_END + rng.uniform(0, 1 - HYPHAE_END, n_seg)

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        size = self.size
        base = BACKGROUNDS[rng.integers(len(BACKGROUNDS))] * rng.uniform(0.9, 1.05)
        coarse = rng.normal(0, 1, (6, 6)).astype(np.float32)
        texture = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
        fine = rng.normal(0, 0.35, (size, size)).astype(np.float32)
        yy, xx = np.mgrid[0:size, 0:size] / size
        gx, gy = rng.uniform(-0.15, 0.15, 2)
        light = 1.0 + gx * (xx - 0.5) + gy * (yy - 0.5) - 0.25 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
        shade = light * (1 + 0.035 * texture + 0.02 * fine)
        return base[None, None, :] * shade[..., None]

    def _grow_tree(self, rng, start, angle, birth, depth, s):
        n = int(rng.integers(12, 17))
        step = 2.0 * s
        angles = angle + np.cumsum(rng.normal(0, 0.18, n))
        deltas = step * np.stack([np.cos(angles), np.sin(angles)], 1)
        points = np.concatenate([start[None], start + np.cumsum(deltas, 0)], 0)
        cumlen = np.concatenate([[0.0], np.cumsum(np.full(n, step))])
        # Hyphae of every colony extend at about the same rate (+-10%), so that length tells time; a primary
        # hypha reaches its full length (24-32 px on a 64-px frame) around T ~ 0.5-0.65.
        speed = 60.0 * s * rng.uniform(0.9, 1.1)
        self.branches.append(_Branch(points, cumlen, birth, speed, primary=depth == 0))
        if depth < 2:
            for _ in range(int(rng.integers(1, 3))):
                j = int(rng.integers(2, n))
                side = angles[j - 1] + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
                # A side branch is born when its parent's tip passes the branching point, plus a delay.
                child_birth = birth + cumlen[j] / speed + rng.uniform(0.02, 0.08)
                self._grow_tree(rng, points[j], side, child_birth, depth + 1, s)

    def frame(self, t: float, rng: np.random.Generator) -> np.ndarray:
        """The colony at normalized time t in [0, 1] as an (H, W, 3) uint8 array."""
        size = self.size
        s = size / 64.0
        mask = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(mask)
        # Mycelium: a filled colony disc, then the network segments reached so far.
        if t > HYPHAE_END:
            growth = (t - HYPHAE_END) / (1 - HYPHAE_END)
            radius = self.colony_radius * (0.35 + 0.65 * growth)
            cx, cy = self.center
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=int(40 + 70 * growth))
            visible = (self.segment_birth <= t) & (self.segment_rho <= radius)
            for seg in self.segments[visible]:
                draw.line(seg.tolist(), fill=210, width=1)
        # Hyphae: each branch shows the part of its polyline grown by time t.
        for b in self.branches:
            if t <= b.birth:
                continue
            # A primary hypha starts from its spore's germ tube, so it is visible from its first frame on.
            length = (t - b.birth) * b.speed + (3.0 * s if b.primary else 0.0)
            k = int(np.searchsorted(b.cumlen, min(length, b.cumlen[-1]), side="right"))
            pts = b.points[: max(k, 2)]
            draw.line([tuple(p) for p in pts], fill=235, width=max(1, int(round(s))))
        # Spores: swell during the spore stage, grow germ tubes late in it, fade while hyphae take over.
        swell = 1.0 + 0.6 * min(t, SPORE_END) / SPORE_END
        fade = 1.0 - 0.75 * np.clip((t - SPORE_END) / (HYPHAE_END - SPORE_END), 0, 1)
        germ = np.clip((t - 0.05) / (SPORE_END - 0.05), 0, 1)
        for (x, y), r0, a in zip(self.spores, self.spore_radius, self.germ_angle):
            r = r0 * swell
            draw.ellipse([x - r, y - r, x + r, y + r], fill=int(255 * fade))
            if germ > 0:
                tip = (x + (r + 2.2 * r0 * germ) * np.cos(a), y + (r + 2.2 * r0 * germ) * np.sin(a))
                draw.line([(x, y), tip], fill=int(220 * fade), width=1)
        blur = rng.uniform(0.0, 0.7) * s
        if blur > 0.15:
            mask = mask.filter(ImageFilter.GaussianBlur(blur))
        alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
        image = self.background * rng.uniform(0.93, 1.07) * (1 - 0.85 * alpha) + self.stain * 0.85 * alpha
        image += rng.normal(0, rng.uniform(2, 7), image.shape)
        return np.clip(image, 0, 255).astype(np.uint8)


def generate_sequence(
    seed: int,
    index: int,
    *,
    frames: int,
    size: int,
    hours: tuple[float, float],
    template_set: str,
) -> dict[str, list]:
    """All frames of sequence `index` as columns of the fungal shard schema (see cliptime.tasks.cliptime)."""
    templates = caption_templates(template_set)
    colony = ColonySequence(seed, index, size)
    rng = np.random.default_rng([seed, index, 1])
    columns: dict[str, list] = {k: [] for k in ("image", "stage", "hours", "t", "caption", "sequence", "frame")}
    for i in range(frames):
        t = i / (frames - 1)
        stage = STAGES[stage_index(t)]
        choices = templates[stage]
        columns["image"].append(encode_image(colony.frame(t, rng)))
        columns["stage"].append(stage)
        columns["hours"].append(hours[0] + t * (hours[1] - hours[0]))
        columns["t"].append(t)
        columns["caption"].append(choices[int(rng.integers(len(choices)))])
        columns["sequence"].append(f"gen-{seed}-{index:05d}")
        columns["frame"].append(i)
    return columns


def split_of_sequence(index: int, num_sequences: int, fractions=(0.7, 0.15, 0.15)) -> str:
    """Sequence-level split (70/15/15 by default): consecutive blocks of sequence indices."""
    n_train = round(fractions[0] * num_sequences)
    n_val = round(fractions[1] * num_sequences)
    return "train" if index < n_train else ("val" if index < n_train + n_val else "test")
