"""A captioned world of coloured shapes: procedural images, captions, and a fidelity score.

The tiny text-to-image model learns this world on a CPU (``algo=diffusion_sft``), then preference
tuning improves how well its samples follow prompts. Every image is N same-coloured shapes of
one kind on a white background; its caption names them: "a red circle", "two blue squares",
"three green triangles" (optionally "... on a white background").

``ShapesFidelity`` scores an image against a caption from the pixels alone (no learned model).
Foreground pixels (far from white) form 4-connected blobs; three parts, each in [0, 1]:

- colour: share of foreground pixels nearest the named colour;
- count: 1 / (1 + |blobs - named count|), so one shape too many or too few halves it and a
  speckled background (dozens of blobs) is worth almost nothing;
- shape: mean over blobs of a fill-ratio credit. A blob's fill ratio (area over bounding-box
  area) is ~1 for a square, pi/4 for a circle and 1/2 for a triangle (``NOMINAL_FILL``). A blob
  within ``FILL_TOLERANCE`` of the named shape's nominal fill (the rasterisation error of the
  5-10 px shapes the world draws) earns 1; the credit then falls linearly to 0 at
  ``FILL_ZERO_CREDIT``, the distance between the two closest nominal fills (square and circle),
  so a blob drawn as another shape earns nothing.

The score is their mean. A procedural render scores 1 on its own caption; near misses (one
shape too many, a blob between two shapes) score between a hit and a far miss instead of tying
with the far miss.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rlplat.envs.preference.online import PromptSet
from rlplat.envs.preference.proxy import ScoreSource

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
BACKGROUND = (255, 255, 255)
# Fill ratio (area / bounding-box area) of each ideal shape: square 1, circle pi/4, triangle 1/2.
NOMINAL_FILL = {"square": 1.0, "circle": float(np.pi / 4), "triangle": 0.5}
# Fill ratios within this of the nominal earn full shape credit: the largest rasterisation error
# of the 5-10 px shapes ``render`` draws (a 6 px circle fills 0.889, a 6 px triangle 0.6).
FILL_TOLERANCE = 0.11
# Fill ratios this far from the nominal earn no shape credit: the gap between the two closest
# nominal fills (square 1 and circle pi/4), i.e. a blob that looks like another shape.
FILL_ZERO_CREDIT = 1.0 - float(np.pi / 4)
# Pixels closer than this (RGB distance) to white are background.
_BACKGROUND_DIST = 90.0
# Blobs smaller than this many pixels are noise, not shapes.
_MIN_BLOB = 4
#: The score's parts (``fidelity_parts``), which ``ShapesFidelity(weights=...)`` may weigh.
PARTS = ("color", "count", "shape")
_CAPTION = re.compile(r"^(a|an|one|two|three) (\w+) (circle|square|triangle)s?( on a white background)?$")


@dataclass(frozen=True)
class ShapeSpec:
    """What an image shows: ``count`` shapes of one ``shape`` in one ``color``."""

    count: int
    color: str
    shape: str

    def caption(self, background: bool = False) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        text = f"{COUNT_WORDS[self.count]} {self.color} {noun}"
        return text + " on a white background" if background else text


def parse_caption(caption: str) -> ShapeSpec:
    """The spec a caption names; ValueError naming the caption when it is outside the world."""
    match = _CAPTION.match(caption.strip().lower())
    if not match or match.group(2) not in COLORS:
        raise ValueError(
            f"caption {caption!r} is not in the shapes world: expected '<a|two|three> <colour> <shape>[s]' with "
            f"colour in {sorted(COLORS)} and shape in {list(SHAPES)}"
        )
    count = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}[match.group(1)]
    return ShapeSpec(count, match.group(2), match.group(3))


def all_specs() -> list[ShapeSpec]:
    """Every spec of the world (3 counts x 6 colours x 3 shapes = 54)."""
    return [ShapeSpec(n, c, s) for n in COUNT_WORDS for c in COLORS for s in SHAPES]


def prompt_split(heldout_fraction: float = 0.25, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out) captions: a fixed random split of the 54 specs, so benchmarks report
    reward on prompts the tuning never saw. Every colour, shape and count still occurs in train."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be in (0, 1)")
    specs = all_specs()
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        order = rng.permutation(len(specs))
        cut = round(len(specs) * heldout_fraction)
        train = [specs[i] for i in order[cut:]]
        covered = ({s.color for s in train}, {s.shape for s in train}, {s.count for s in train})
        if covered == (set(COLORS), set(SHAPES), set(COUNT_WORDS)):
            return [s.caption() for s in train], [specs[i].caption() for i in order[:cut]]
    raise RuntimeError(f"no split with held-out fraction {heldout_fraction} keeps every word in train")


def _mask(shape: str, side: int) -> np.ndarray:
    """Boolean [side, side] footprint of one shape filling its box."""
    yy, xx = np.mgrid[0:side, 0:side] + 0.5
    if shape == "square":
        return np.ones((side, side), bool)
    if shape == "circle":
        r = side / 2
        return (xx - r) ** 2 + (yy - r) ** 2 <= r * r
    # Upward triangle: apex at the top centre, base along the bottom row.
    half_width = xx - side / 2
    return np.abs(half_width) <= yy / 2


def render(spec: ShapeSpec, size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 [size, size, 3]: ``spec.count`` non-overlapping shapes at random places and sizes."""
    rng = rng or np.random.default_rng()
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUND
    taken = np.zeros((size, size), bool)
    lo, hi = max(4, size // 6), max(5, size // 3)
    placed = 0
    for _ in range(200):
        if placed == spec.count:
            break
        side = int(rng.integers(lo, hi + 1))
        y, x = (int(v) for v in rng.integers(0, size - side + 1, 2))
        # One pixel of margin so blobs never touch (they must count as separate shapes).
        y0, x0, y1, x1 = max(0, y - 1), max(0, x - 1), min(size, y + side + 1), min(size, x + side + 1)
        if taken[y0:y1, x0:x1].any():
            continue
        mask = _mask(spec.shape, side)
        image[y : y + side, x : x + side][mask] = COLORS[spec.color]
        taken[y : y + side, x : x + side] = True
        placed += 1
    if placed != spec.count:
        raise RuntimeError(f"could not place {spec.count} shapes in a {size}px image; use a larger size")
    return image


def sample_dataset(n: int, size: int = 32, seed: int = 0, background_prob: float = 0.5) -> tuple[np.ndarray, list[str]]:
    """``n`` random (image uint8 [n, size, size, 3], caption) pairs, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    specs = all_specs()
    images, captions = [], []
    for i in rng.integers(0, len(specs), n):
        spec = specs[int(i)]
        images.append(render(spec, size, rng))
        captions.append(spec.caption(background=bool(rng.random() < background_prob)))
    return np.stack(images), captions


def _blobs(foreground: np.ndarray) -> list[np.ndarray]:
    """Connected components (4-neighbour) of a boolean mask, as arrays of (y, x) pixels."""
    seen = np.zeros_like(foreground)
    height, width = foreground.shape
    blobs = []
    for y, x in zip(*np.nonzero(foreground)):
        if seen[y, x]:
            continue
        stack, pixels = [(y, x)], []
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            pixels.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < height and 0 <= nx < width and foreground[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(pixels) >= _MIN_BLOB:
            blobs.append(np.asarray(pixels))
    return blobs


def _fill_ratio(pixels: np.ndarray) -> float:
    height = pixels[:, 0].max() - pixels[:, 0].min() + 1
    width = pixels[:, 1].max() - pixels[:, 1].min() + 1
    return len(pixels) / float(height * width)


def count_credit(blobs: int, count: int) -> float:
    """1 / (1 + |blobs - count|): 1 for the named count, 1/2 one off, decaying with the error."""
    return 1.0 / (1.0 + abs(blobs - count))


def shape_credit(fill: float, shape: str) -> float:
    """Credit in [0, 1] of a blob with fill ratio ``fill`` for ``shape``: 1 within ``FILL_TOLERANCE``
    of the shape's nominal fill, falling linearly to 0 at ``FILL_ZERO_CREDIT`` from it."""
    distance = abs(fill - NOMINAL_FILL[shape])
    return float(np.clip((FILL_ZERO_CREDIT - distance) / (FILL_ZERO_CREDIT - FILL_TOLERANCE), 0.0, 1.0))


def fidelity_parts(image: np.ndarray, spec: ShapeSpec) -> dict[str, float]:
    """Colour, count and shape agreement of one uint8 image [H, W, 3] with ``spec`` (each in [0, 1];
    see the module docstring)."""
    pixels = image.astype(np.float32)
    foreground = np.linalg.norm(pixels - np.asarray(BACKGROUND, np.float32), axis=-1) > _BACKGROUND_DIST
    blobs = _blobs(foreground)
    if not blobs:
        return {"color": 0.0, "count": 0.0, "shape": 0.0}
    palette = np.asarray(list(COLORS.values()), np.float32)
    nearest = np.argmin(np.linalg.norm(pixels[foreground][:, None] - palette[None], axis=-1), axis=1)
    color = float(np.mean(nearest == list(COLORS).index(spec.color)))
    shape = float(np.mean([shape_credit(_fill_ratio(b), spec.shape) for b in blobs]))
    return {"color": color, "count": count_credit(len(blobs), spec.count), "shape": shape}


class ShapesFidelity(ScoreSource):
    """Programmatic prompt fidelity in [0, 1]: mean of colour, count and shape agreement (``fidelity_parts``).

    Args:
        weights: Weight of each part (``PARTS``; a part not named weighs 1), for a training reward
            that stresses one part: the score is then their weighted mean. The ``eval/fidelity``
            side metric (``prompt_fidelity``) stays the plain mean whatever the reward's weights.
    """

    name = "shapes_fidelity"
    cheap_to_build = True

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        given = dict(weights or {})
        unknown = sorted(set(given) - set(PARTS))
        if unknown:
            raise ValueError(f"preference.score.weights names {unknown}: the parts are {list(PARTS)}")
        self.weights = {part: float(given.get(part, 1.0)) for part in PARTS}
        if not all(w >= 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError(f"preference.score.weights={self.weights}: each weight must be >= 0 and one > 0")

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        total = sum(self.weights.values())
        out = []
        for image, prompt in zip(images, prompts):
            parts = fidelity_parts(image, parse_caption(prompt))
            out.append(sum(self.weights[p] * parts[p] for p in PARTS) / total)
        return np.asarray(out, np.float32)


def shapes_captions(prompts: Sequence[str]) -> bool:
    """Whether every prompt is a caption of the shapes world (so the shapes score applies)."""
    try:
        for prompt in prompts:
            parse_caption(prompt)
    except ValueError:
        return False
    return True


def prompt_fidelity(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray | None:
    """Shapes-world prompt fidelity [B] in [0, 1] of uint8 images [B, H, W, 3] for their captions,
    whatever the run's reward (whether a JPEG-tuned model still draws what it is asked for); None
    when a caption is outside the shapes world (e.g. Pick-a-Pic prompts), which has no such score."""
    if not shapes_captions(prompts):
        return None
    return np.asarray(ShapesFidelity()(images, prompts), np.float64)


class ShapesPrompts(PromptSet):
    """The shapes world as a prompt set: the fixed train / held-out split, and rendered demonstrations.

    Args:
        heldout_fraction: Share of the 54 specs held out for evaluation (``prompt_split``).
        split_seed: Seed of that split (fixed, so every run and benchmark agrees on it).
        image_size: Side of rendered demonstrations (the tiny model's image size).
        background_prob: Share of demonstration captions that end in "on a white background".
    """

    has_demonstrations = True
    has_fidelity = True

    def __init__(self, heldout_fraction: float = 0.25, split_seed: int = 0, image_size: int = 32,
                 background_prob: float = 0.5) -> None:
        super().__init__(*prompt_split(heldout_fraction, split_seed))
        self.image_size = int(image_size)
        self.background_prob = float(background_prob)

    def fidelity(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray | None:
        """Shapes-world prompt fidelity of the images (``prompt_fidelity``)."""
        return prompt_fidelity(images, prompts)

    def demonstrations(self, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
        """``n`` rendered (image, caption) pairs over every spec of the world (``sample_dataset``).

        Pretraining sees all 54 specs, as a base model knows its world; the held-out split only
        keeps preference tuning from drawing the evaluation prompts.
        """
        return sample_dataset(n, self.image_size, seed, self.background_prob)
