"""Procedural sound events and the "mixed-up" order clips T-CLAP trains on.

Twelve clearly distinct event classes, each synthesized from random per-instance parameters (pitch, duration,
envelope, loudness, noise). An *instance* is one draw of those parameters; train, validation and test draw
from disjoint seed streams, so evaluation always hears instances it never trained on.

A mixed clip places event A, then event B (different classes) in a fixed-length clip, with leading silence, a
join and trailing silence. It is generated in both orders from the same two instances: the A-B row's positive
caption ("A followed by B", from an order-template set) is the B-A row's negative, and vice versa, so the
negative is always exactly the reversed order, and T-Classify can compare the A-B and B-A clips.
The join (`seams`, see `draw_join`) is drawn per pair, the same in both orders: a silent gap, a short crossfade
or none, so how the two events meet is no cue to what the caption says.
A share of the training pairs (`simultaneous`) becomes one overlapping clip instead: A and B over the same
stretch, captioned "A while B", whose negative is an ordered caption of the same two events; val and test keep
ordered pairs only, so T-Classify means the same whatever the share.
Single-event clips with plain captions are mixed in so retrieval and zero-shot classification keep working.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cliptime.data.order_phrases import SIMULTANEOUS_PHRASES, TRAIN_PHRASES, reversal
from cliptime.errors import CliptimeError

Rng = np.random.Generator


def _env(n: int, attack: float, decay: float | None = None) -> np.ndarray:
    """Linear attack over `attack` of the event, then sustain (decay None) or exponential decay."""
    t = np.linspace(0, 1, n, endpoint=False)
    a = np.clip(t / max(attack, 1e-3), 0, 1)
    return a if decay is None else a * np.exp(-t / decay)


def _sweep(f0: float, f1: float, n: int, sr: int, log: bool = True) -> np.ndarray:
    freq = np.geomspace(f0, f1, n) if log else np.linspace(f0, f1, n)
    return np.sin(2 * np.pi * np.cumsum(freq) / sr)


def rising_whistle(rng: Rng, n: int, sr: int) -> np.ndarray:
    f0 = rng.uniform(500, 1100)
    return _sweep(f0, f0 * rng.uniform(2.0, 3.0), n, sr) * _env(n, 0.1) * _env(n, 0.0, 0.9)[::-1] ** 0.3


def falling_tone(rng: Rng, n: int, sr: int) -> np.ndarray:
    f0 = rng.uniform(1200, 2400)
    return _sweep(f0, f0 / rng.uniform(2.0, 3.0), n, sr) * _env(n, 0.05)


def bell(rng: Rng, n: int, sr: int) -> np.ndarray:
    f = rng.uniform(400, 900)
    t = np.arange(n) / sr
    partials = [(1.0, 1.0), (2.76, 0.5), (5.40, 0.3), (8.93, 0.15)]
    tone = sum(a * np.sin(2 * np.pi * f * r * t) * np.exp(-t * r * rng.uniform(3, 5)) for r, a in partials)
    return tone * _env(n, 0.01)


def buzz(rng: Rng, n: int, sr: int) -> np.ndarray:
    f = rng.uniform(70, 160)
    phase = (np.arange(n) * f / sr) % 1.0
    saw = 2 * phase - 1
    return 0.6 * saw * _env(n, 0.05) * (1 - _env(n, 0.9) ** 8)


def noise_burst(rng: Rng, n: int, sr: int) -> np.ndarray:
    noise = rng.normal(0, 0.5, n)
    k = int(rng.integers(2, 6))  # a crude low-pass: moving average of k samples
    noise = np.convolve(noise, np.ones(k) / k, mode="same") * np.sqrt(k)
    return noise * _env(n, 0.02, rng.uniform(0.15, 0.3))


def click_train(rng: Rng, n: int, sr: int) -> np.ndarray:
    out = np.zeros(n)
    period = int(sr / rng.uniform(8, 20))
    click = np.exp(-np.arange(int(0.004 * sr)) / (0.0008 * sr)) * rng.choice([-1, 1], int(0.004 * sr))
    for start in range(int(rng.integers(0, period // 2)), n - len(click), period):
        out[start : start + len(click)] += click
    return out


def chirps(rng: Rng, n: int, sr: int) -> np.ndarray:
    out = np.zeros(n)
    count = int(rng.integers(3, 6))
    length = int(min(n / count * 0.6, 0.08 * sr))
    f0 = rng.uniform(2000, 3200)
    chirp = _sweep(f0, f0 * 1.6, length, sr) * np.hanning(length)
    for k in range(count):
        start = int(k * n / count)
        out[start : start + length] += chirp
    return out


def pluck(rng: Rng, n: int, sr: int) -> np.ndarray:
    f = rng.uniform(150, 400)
    t = np.arange(n) / sr
    tone = sum(np.sin(2 * np.pi * f * h * t) * np.exp(-t * (4 + 3 * h)) / h for h in range(1, 7))
    return tone * _env(n, 0.005)


def harmonic_chord(rng: Rng, n: int, sr: int) -> np.ndarray:
    f = rng.uniform(200, 400)
    t = np.arange(n) / sr
    tone = sum(np.sin(2 * np.pi * f * r * t) for r in (1.0, 1.26, 1.5)) / 3
    return tone * _env(n, 0.3) * (1 - _env(n, 0.85) ** 10)


def knock(rng: Rng, n: int, sr: int) -> np.ndarray:
    out = np.zeros(n)
    f = rng.uniform(90, 220)
    length = int(0.09 * sr)
    t = np.arange(length) / sr
    hit = np.sin(2 * np.pi * f * t) * np.exp(-t * 45) + 0.3 * rng.normal(0, 1, length) * np.exp(-t * 200)
    count = int(rng.integers(2, 4))
    for k in range(count):
        start = int(k * n / count)
        out[start : start + min(length, n - start)] += hit[: n - start]
    return out


def siren(rng: Rng, n: int, sr: int) -> np.ndarray:
    t = np.arange(n) / sr
    f0, depth, rate = rng.uniform(600, 900), rng.uniform(200, 350), rng.uniform(2.0, 4.0)
    freq = f0 + depth * np.sin(2 * np.pi * rate * t)
    return np.sin(2 * np.pi * np.cumsum(freq) / sr) * _env(n, 0.1)


def water_drops(rng: Rng, n: int, sr: int) -> np.ndarray:
    out = np.zeros(n)
    length = int(0.05 * sr)
    for start in np.sort(rng.integers(0, max(1, n - length), int(rng.integers(3, 6)))):
        f0 = rng.uniform(900, 1500)
        drop = _sweep(f0 * 1.8, f0, length, sr) * np.exp(-np.arange(length) / (0.012 * sr))
        out[start : start + length] += drop
    return out


EVENT_CLASSES: dict[str, tuple[str, Callable[[Rng, int, int], np.ndarray]]] = {
    "rising_whistle": ("a rising whistle", rising_whistle),
    "falling_tone": ("a falling tone", falling_tone),
    "bell": ("a ringing bell", bell),
    "buzz": ("a low buzz", buzz),
    "noise_burst": ("a burst of noise", noise_burst),
    "click_train": ("a train of clicks", click_train),
    "chirps": ("bird-like chirps", chirps),
    "pluck": ("a plucked string", pluck),
    "harmonic_chord": ("a harmonic chord", harmonic_chord),
    "knock": ("knocking", knock),
    "siren": ("a wailing siren", siren),
    "water_drops": ("dripping water", water_drops),
}

# Order templates: {first} happens before {second}. The negative caption of a clip is the same template with
# the two events swapped. `basic` and `rich` are short fixed lists; `grammar` composes hundreds of phrasings from
# parts (cliptime.data.order_phrases), none of those its held-out evaluation uses.
ORDER_TEMPLATES: dict[str, tuple[str, ...]] = {
    "basic": ("{first} followed by {second}", "first {first}, then {second}", "{second} after {first}"),
    "rich": (
        "{first} followed by {second}",
        "first {first}, then {second}",
        "{second} after {first}",
        "{first}, and then {second}",
        "{first} before {second}",
        "{second}, preceded by {first}",
        "{first} comes first and {second} comes next",
    ),
    "grammar": TRAIN_PHRASES,
}
SINGLE_TEMPLATES = ("{event}", "the sound of {event}", "{event} is heard")


def order_templates(name: str) -> tuple[str, ...]:
    if name not in ORDER_TEMPLATES:
        raise CliptimeError(f"unknown order template set {name!r} (known: {', '.join(ORDER_TEMPLATES)})")
    return ORDER_TEMPLATES[name]


def synthesize(event: str, rng: Rng, seconds: float, sr: int) -> np.ndarray:
    """One instance of `event`: peak-normalized, then scaled to a random loudness."""
    n = max(16, int(seconds * sr))
    x = EVENT_CLASSES[event][1](rng, n, sr)
    x = x / (np.abs(x).max() + 1e-8)
    x = x + rng.normal(0, rng.uniform(0.0, 0.03), n)  # per-instance recording noise
    return x * 10 ** (rng.uniform(-10, 0) / 20)


def place(events: list[np.ndarray], clip_samples: int, lead: int, gap: int, rng: Rng) -> np.ndarray:
    """Events one after the other from `lead`, `gap` samples apart, in a clip with a faint noise floor. A negative
    gap crossfades: each event's end overlaps the next one's start by -gap samples, fading out as it fades in."""
    clip = rng.normal(0, 10 ** (-55 / 20), clip_samples)
    fade = min(-gap, *(len(e) for e in events)) if gap < 0 else 0
    # equal power (sin/cos): the two events are unrelated sounds, so the overlap keeps their level
    fade_in = np.sin(0.5 * np.pi * (np.arange(fade) + 0.5) / max(fade, 1))
    pos = lead
    for k, e in enumerate(events):
        if fade:
            e = e.copy()
            if k > 0:
                e[:fade] *= fade_in
            if k < len(events) - 1:
                e[len(e) - fade :] *= fade_in[::-1]
        clip[pos : pos + len(e)] += e[: clip_samples - pos]
        pos += len(e) - fade if fade else len(e) + gap
    return np.clip(clip, -1, 1).astype(np.float32)


SEAMS = ("mixed", "gap")
SHORT_GAP = (0.01, 0.05)  # seconds: fits in the tail that event_room keeps free whatever the --gap range
CROSSFADE = (0.02, 0.06)  # seconds one event's end overlaps the next one's start


def draw_join(rng: Rng, gap_seconds: tuple[float, float], seams: str, sample_rate: int) -> int:
    """Samples between a pair's two events, negative for a crossfade (see `place`). "gap": a silent gap from
    `gap_seconds`, as all data were before seam control. "mixed": a silent gap (from `gap_seconds`, or a short one
    where that is 0), a crossfade, or a butt join, one third each: a mixed clip's join is no cue."""
    if seams == "gap":
        return int(rng.uniform(*gap_seconds) * sample_rate)
    kind = int(rng.integers(3))
    if kind == 0:
        return int(rng.uniform(*(gap_seconds if gap_seconds[1] > 0 else SHORT_GAP)) * sample_rate)
    if kind == 1:
        return -int(rng.uniform(*CROSSFADE) * sample_rate)
    return 0


def to_pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def from_pcm16(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767.0


SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}  # disjoint seed streams: held-out instances are new draws
COLUMNS = ("audio", "sample_rate", "caption", "negative", "first", "second", "pair")  # the T-CLAP shard schema


class ClipWriter:
    """Collects clips as columns of the T-CLAP shard schema (see cliptime.tasks.tclap). `seams` (see `draw_join`)
    is "gap" unless a caller asks: the converters of event collections (cliptime.data.esc50) have no such setting."""

    def __init__(
        self, sample_rate: int, clip_samples: int, template_set: str, labels: dict[str, str], seams: str = "gap"
    ):
        self.sr, self.n, self.labels, self.seams = sample_rate, clip_samples, labels, seams
        self.templates = order_templates(template_set)
        self.columns: dict[str, list] = {k: [] for k in COLUMNS}

    def _add(self, audio, caption, negative, first, second, pair) -> None:
        for k, v in zip(COLUMNS, (to_pcm16(audio), self.sr, caption, negative, first, second, pair)):
            self.columns[k].append(v)

    def add_pair(self, a: str, b: str, ea: np.ndarray, eb: np.ndarray, pair: int, gap_seconds, rng: Rng) -> None:
        """Instances `ea` of class `a` and `eb` of class `b`, in both orders, with the same lead-in and join; each
        row's negative caption is the other row's positive, i.e. exactly the reversed order."""
        lead = int(rng.uniform(0.0, 0.1) * self.sr)
        gap = draw_join(rng, gap_seconds, self.seams, self.sr)
        template = self.templates[int(rng.integers(len(self.templates)))]
        for first, second, events in ((a, b, [ea, eb]), (b, a, [eb, ea])):
            caption, negative = reversal(template, self.labels[first], self.labels[second])
            self._add(place(events, self.n, lead, gap, rng), caption, negative, first, second, pair)

    def add_overlap(self, a: str, b: str, ea: np.ndarray, eb: np.ndarray, pair: int, rng: Rng) -> None:
        """Instances `ea` and `eb` from the same moment on, one row captioned as heard together ("A while B"); its
        negative is an ordered caption of the same two events ("A, then B"): overlapping sounds are not one after
        the other. `pair` is the row's own id, below -1 (schema in cliptime.tasks.tclap): it has no partner."""
        lead = int(rng.uniform(0.0, 0.1) * self.sr)
        mix = np.zeros(max(len(ea), len(eb)))
        mix[: len(ea)] += ea
        mix[: len(eb)] += eb
        mix /= max(1.0, np.abs(mix).max())  # two loud events together would clip, which ordered clips never do
        phrase = SIMULTANEOUS_PHRASES[int(rng.integers(len(SIMULTANEOUS_PHRASES)))]
        template = self.templates[int(rng.integers(len(self.templates)))]
        la, lb = self.labels[a], self.labels[b]
        caption, negative = phrase.format(first=la, second=lb), template.format(first=la, second=lb)
        self._add(place([mix], self.n, lead, 0, rng), caption, negative, a, b, pair)

    def add_single(self, event: str, x: np.ndarray, rng: Rng) -> None:
        lead = int(rng.integers(0, self.n - len(x) + 1))
        caption = SINGLE_TEMPLATES[int(rng.integers(len(SINGLE_TEMPLATES)))].format(event=self.labels[event])
        self._add(place([x], self.n, lead, 0, rng), caption, "", event, "", -1)


def event_room(clip_seconds: float, gap_seconds: tuple[float, float]) -> float:
    """Seconds that two events share in a clip after the longest lead-in, gap and tail."""
    room = clip_seconds - 0.1 - gap_seconds[1] - 0.05
    if room < 0.2:
        raise CliptimeError(f"a {clip_seconds:g}-s clip is too short for two events and a {gap_seconds[1]:g}-s gap")
    return room


def generate_block(
    seed: int,
    split: str,
    block: int,
    *,
    pairs: int,
    singles: int,
    sample_rate: int,
    clip_seconds: float,
    gap_seconds: tuple[float, float],
    template_set: str,
    seams: str = "mixed",
    simultaneous: float = 0.0,
) -> dict[str, list]:
    """`pairs` mixed clips in both orders and `singles` single-event clips, as columns of the T-CLAP schema; in
    the train split a share `simultaneous` of the pairs is one overlapping clip instead (val and test: none)."""
    classes = list(EVENT_CLASSES)
    labels = {k: v[0] for k, v in EVENT_CLASSES.items()}
    out = ClipWriter(sample_rate, int(clip_seconds * sample_rate), template_set, labels, seams)
    rng = np.random.default_rng([seed, SPLIT_STREAMS[split], block])
    room = event_room(clip_seconds, gap_seconds)
    for p in range(pairs):
        a, b = (classes[i] for i in rng.choice(len(classes), 2, replace=False))
        # no draw when off: the same seed gives the same ordered pairs as before the option existed
        together = split == "train" and simultaneous > 0 and rng.random() < simultaneous
        # overlapping events last as long as an ordered pair together: the clip's length tells nothing
        share = (0.7, 1.0) if together else (0.35, 0.5)
        ea, eb = (synthesize(e, rng, rng.uniform(*share) * room, sample_rate) for e in (a, b))
        if together:
            out.add_overlap(a, b, ea, eb, -2 - (block * pairs + p), rng)
        else:
            out.add_pair(a, b, ea, eb, block * pairs + p, gap_seconds, rng)
    for _ in range(singles):
        event = classes[int(rng.integers(len(classes)))]
        out.add_single(event, synthesize(event, rng, rng.uniform(0.3, 0.6) * clip_seconds, sample_rate), rng)
    return out.columns
