"""The toy world: procedural images of simple shapes with known attributes and captions.

Every image shows one shape on a flat background. Its attributes are the ground truth that the papers'
experiments measure against:

- ``shape`` (circle, square, triangle), ``colour`` (red, green, blue, yellow), ``size`` (small, medium,
  large) and a continuous position (``x``, ``y``: the shape's centre in pixels);
- ``mark``: a fine-grained detail inside the shape (plain, dotted: a small dark dot at the centre, striped:
  thin dark lines one pixel wide). It is the first thing noise erases, which is what the TiF learner needs;
- ``background``: brightness from pure black to pure white (black 0, dark 0.25, grey 0.5, light 0.75,
  white 1), which is what SingDiffusion needs.

Attribute frequencies are set per world (``ToyWorld(bias={"shape": {"circle": 0.8, "square": 0.2}})``),
which is what Balancing Act needs. Rendering is vectorised numpy with anti-aliased edges from signed
distances, deterministic given a ``numpy.random.Generator``, and runs at tens of thousands of images per
second (``python -m workbench bench toyworld``).

Images are float32 arrays of shape (N, 3, H, W) in [0, 1]; :func:`to_model_space` maps them to the
[-1, 1] range the diffusion models use.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "ATTRIBUTES",
    "BACKGROUND_LEVELS",
    "COLOURS",
    "ToyBatch",
    "ToyWorld",
    "caption",
    "from_model_space",
    "load_digits",
    "render",
    "to_model_space",
]

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle"),
    "colour": ("red", "green", "blue", "yellow"),
    "size": ("small", "medium", "large"),
    "mark": ("plain", "dotted", "striped"),
    "background": ("black", "dark", "grey", "light", "white"),
}

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
BACKGROUND_LEVELS: dict[str, float] = {"black": 0.0, "dark": 0.25, "grey": 0.5, "light": 0.75, "white": 1.0}

# Radius (in pixels at 32x32) of each size; shapes scale with the image size.
_SIZE_RADIUS = {"small": 4.0, "medium": 6.5, "large": 9.0}
# Per-shape scale so that the three shapes of one size look about equally large.
_SHAPE_SCALE = {"circle": 1.0, "square": 0.85, "triangle": 1.3}
_MARK_DARKENING = 0.45  # the mark is the shape's colour times this: visible, but only just at 32x32
_COLOUR_JITTER = 0.04  # per-channel uniform jitter, so colours are categories rather than single points


def _validate_bias(bias: Mapping[str, Mapping[str, float]]) -> dict[str, np.ndarray]:
    probabilities = {}
    for attribute, frequencies in bias.items():
        if attribute not in ATTRIBUTES:
            raise ValueError(f"bias: unknown attribute {attribute!r}; allowed: {sorted(ATTRIBUTES)}")
        values = ATTRIBUTES[attribute]
        p = np.zeros(len(values))
        for value, frequency in frequencies.items():
            if value not in values:
                raise ValueError(f"bias[{attribute!r}]: unknown value {value!r}; allowed: {list(values)}")
            if not (np.isfinite(frequency) and frequency >= 0):
                raise ValueError(f"bias[{attribute!r}][{value!r}] must be a finite number >= 0, got {frequency}")
            p[values.index(value)] = frequency
        if not np.isclose(p.sum(), 1.0, atol=1e-6):
            raise ValueError(f"bias[{attribute!r}] must sum to 1, got {p.sum():.6g} from {dict(frequencies)}")
        probabilities[attribute] = p / p.sum()
    return probabilities


@dataclass(frozen=True)
class ToyBatch:
    """A batch of toy-world images with their ground truth.

    Attributes:
        images: float32 (N, 3, H, W) in [0, 1].
        labels: attribute name -> int64 (N,) index into ``ATTRIBUTES[name]``.
        x, y: float32 (N,) centre of the shape in pixels.
        captions: one caption per image, built from its attributes.
    """

    images: np.ndarray
    labels: dict[str, np.ndarray]
    x: np.ndarray
    y: np.ndarray
    captions: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def values(self, attribute: str) -> list[str]:
        """The attribute's value names, one per image."""
        names = ATTRIBUTES[attribute]
        return [names[i] for i in self.labels[attribute]]


@dataclass(frozen=True)
class ToyWorld:
    """A distribution over toy images: image size plus (optionally biased) attribute frequencies.

    Args:
        image_size: height and width in pixels (16 to 256).
        bias: attribute -> {value: frequency}; frequencies must sum to 1, unlisted values get 0.
            Attributes not named are uniform.
    """

    image_size: int = 32
    bias: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int | np.integer) or not 16 <= self.image_size <= 256:
            raise ValueError(f"image_size must be an integer from 16 to 256, got {self.image_size!r}")
        _validate_bias(self.bias)

    def probabilities(self, attribute: str) -> np.ndarray:
        """Frequency of each value of ``attribute`` in this world, in ``ATTRIBUTES`` order."""
        if attribute not in ATTRIBUTES:
            raise ValueError(f"attribute must be one of {sorted(ATTRIBUTES)}, got {attribute!r}")
        biased = _validate_bias(self.bias)
        n = len(ATTRIBUTES[attribute])
        return biased.get(attribute, np.full(n, 1.0 / n))

    def sample(
        self,
        n: int,
        rng: np.random.Generator | int,
        *,
        fixed: Mapping[str, str] | None = None,
        caption_dropout: float = 0.0,
    ) -> ToyBatch:
        """Draw ``n`` images.

        Args:
            n: number of images (>= 1).
            rng: a numpy Generator, or an integer seed.
            fixed: attribute -> value to force for every image (e.g. ``{"shape": "circle"}``).
            caption_dropout: probability that each attribute word is left out of a caption (training
                augmentation that teaches partial prompts such as "a red circle").
        """
        if not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        rng = np.random.default_rng(rng)
        fixed = dict(fixed or {})
        for attribute, value in fixed.items():
            if attribute not in ATTRIBUTES:
                raise ValueError(f"fixed: unknown attribute {attribute!r}; allowed: {sorted(ATTRIBUTES)}")
            if value not in ATTRIBUTES[attribute]:
                raise ValueError(f"fixed[{attribute!r}]: unknown value {value!r}; allowed: {ATTRIBUTES[attribute]}")

        labels = {}
        for attribute, values in ATTRIBUTES.items():
            if attribute in fixed:
                labels[attribute] = np.full(n, values.index(fixed[attribute]), dtype=np.int64)
            else:
                labels[attribute] = rng.choice(len(values), size=n, p=self.probabilities(attribute))
        # Position: uniform over the centres that keep the whole shape inside the image.
        scale = self.image_size / 32
        radius = np.array([_SIZE_RADIUS[s] for s in ATTRIBUTES["size"]])[labels["size"]] * scale
        radius *= np.array([_SHAPE_SCALE[s] for s in ATTRIBUTES["shape"]])[labels["shape"]]
        margin = radius + 1
        x = rng.uniform(margin, self.image_size - margin).astype(np.float32)
        y = rng.uniform(margin, self.image_size - margin).astype(np.float32)
        jitter = rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, size=(n, 3)).astype(np.float32)
        images = render(labels, x, y, image_size=self.image_size, colour_jitter=jitter)
        keep = rng.random((n, len(ATTRIBUTES))) >= caption_dropout
        captions = [
            caption(
                {a: ATTRIBUTES[a][labels[a][i]] for j, a in enumerate(ATTRIBUTES) if keep[i, j]},
            )
            for i in range(n)
        ]
        return ToyBatch(images=images, labels=labels, x=x, y=y, captions=captions)

    def batches(
        self, batch_size: int, rng: np.random.Generator | int, *, caption_dropout: float = 0.0
    ) -> Iterator[ToyBatch]:
        """An endless stream of fresh batches (the training data never repeats)."""
        rng = np.random.default_rng(rng)
        while True:
            yield self.sample(batch_size, rng, caption_dropout=caption_dropout)


def caption(attributes: Mapping[str, str]) -> str:
    """The caption for a (possibly partial) set of attributes.

    ``caption({"size": "small", "colour": "red", "mark": "striped", "shape": "circle",
    "background": "dark"})`` is "a small red striped circle on a dark background"; a missing shape reads
    "shape" ("a red shape"), a missing background drops the "on a ... background" clause.
    """
    for attribute, value in attributes.items():
        if attribute not in ATTRIBUTES:
            raise ValueError(f"attributes: unknown attribute {attribute!r}; allowed: {sorted(ATTRIBUTES)}")
        if value not in ATTRIBUTES[attribute]:
            raise ValueError(f"attributes[{attribute!r}]: unknown value {value!r}; allowed: {ATTRIBUTES[attribute]}")
    words = [attributes[a] for a in ("size", "colour", "mark") if a in attributes]
    words.append(attributes.get("shape", "shape"))
    text = "a " + " ".join(words)
    if "background" in attributes:
        text += f" on a {attributes['background']} background"
    return text


def render(
    labels: Mapping[str, np.ndarray | Sequence[int]],
    x: np.ndarray | Sequence[float],
    y: np.ndarray | Sequence[float],
    *,
    image_size: int = 32,
    colour_jitter: np.ndarray | None = None,
) -> np.ndarray:
    """Render images from attribute indices and positions.

    Args:
        labels: attribute -> int (N,) indices into ``ATTRIBUTES[attribute]``; all five attributes.
        x, y: (N,) centre of each shape in pixels.
        image_size: output height and width.
        colour_jitter: optional (N, 3) offsets added to each shape colour.

    Returns:
        float32 (N, 3, image_size, image_size) in [0, 1].
    """
    missing = set(ATTRIBUTES) - set(labels)
    if missing:
        raise ValueError(f"labels must give every attribute; missing {sorted(missing)}")
    idx = {a: np.asarray(labels[a], dtype=np.int64) for a in ATTRIBUTES}
    n = len(idx["shape"])
    for attribute, values in ATTRIBUTES.items():
        if idx[attribute].shape != (n,) or (n and (idx[attribute].min() < 0 or idx[attribute].max() >= len(values))):
            raise ValueError(f"labels[{attribute!r}] must be {n} indices in [0, {len(values)}), got {idx[attribute]}")
    cx = np.asarray(x, dtype=np.float32).reshape(n, 1, 1)
    cy = np.asarray(y, dtype=np.float32).reshape(n, 1, 1)

    scale = image_size / 32
    base_radius = np.array([_SIZE_RADIUS[s] for s in ATTRIBUTES["size"]], dtype=np.float32)[idx["size"]] * scale
    shape_scale = np.array([_SHAPE_SCALE[s] for s in ATTRIBUTES["shape"]], dtype=np.float32)[idx["shape"]]
    r = (base_radius * shape_scale).reshape(n, 1, 1)

    grid = np.arange(image_size, dtype=np.float32) + 0.5  # pixel centres
    dx = grid[None, None, :] - cx  # (N, 1, W)
    dy = grid[None, :, None] - cy  # (N, H, 1)

    # Signed distance to each shape's edge (negative inside); the label picks one per image.
    circle = np.sqrt(dx**2 + dy**2) - r
    square = np.maximum(np.abs(dx), np.abs(dy)) - r
    # Upward equilateral triangle with circumradius r: three half-planes at inradius r / 2 (y points down).
    triangle = np.maximum(np.maximum(dy, 0.866 * dx - 0.5 * dy), -0.866 * dx - 0.5 * dy) - 0.5 * r
    shape = idx["shape"].reshape(n, 1, 1)
    distance = np.where(shape == 0, circle, np.where(shape == 1, square, triangle))
    coverage = np.clip(0.5 - distance, 0.0, 1.0)  # anti-aliased edge, one pixel wide

    # The fine-grained mark, drawn as darkening inside the shape.
    mark = idx["mark"].reshape(n, 1, 1)
    dot = np.clip(1.5 * scale + 0.5 - np.sqrt(dx**2 + dy**2), 0.0, 1.0)
    stripes = np.broadcast_to((np.floor(dy + 0.5 * image_size) % 3 == 0).astype(np.float32), distance.shape)
    darkening = np.where(mark == 1, dot, np.where(mark == 2, stripes, 0.0))
    shade = 1.0 - (1.0 - _MARK_DARKENING) * darkening  # (N, H, W)

    colour_table = np.array([COLOURS[c] for c in ATTRIBUTES["colour"]], dtype=np.float32)
    colour = colour_table[idx["colour"]]
    if colour_jitter is not None:
        colour = colour + np.asarray(colour_jitter, dtype=np.float32).reshape(n, 3)
    colour = np.clip(colour, 0.0, 1.0)
    level = np.array([BACKGROUND_LEVELS[b] for b in ATTRIBUTES["background"]], dtype=np.float32)
    background = level[idx["background"]].reshape(n, 1, 1, 1)

    foreground = colour[:, :, None, None] * shade[:, None]
    alpha = coverage[:, None]
    images = background * (1.0 - alpha) + foreground * alpha
    return images.astype(np.float32, copy=False)


def to_model_space(images: np.ndarray) -> np.ndarray:
    """[0, 1] images to the [-1, 1] range the diffusion models are trained on."""
    return images * 2.0 - 1.0


def from_model_space(samples: np.ndarray) -> np.ndarray:
    """Model outputs in [-1, 1] back to [0, 1] images (clipped)."""
    return np.clip((samples + 1.0) / 2.0, 0.0, 1.0)


def load_digits(image_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped with scikit-learn: no download).

    Args:
        image_size: 8, or a multiple of 8 (nearest-neighbour upscaling).

    Returns:
        images: float32 (N, 1, image_size, image_size) in [0, 1]; labels: int64 (N,) digits 0-9.
    """
    if not isinstance(image_size, int) or image_size < 8 or image_size % 8:
        raise ValueError(f"image_size must be a positive multiple of 8, got {image_size!r}")
    from sklearn.datasets import load_digits as _sklearn_digits

    digits = _sklearn_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    factor = image_size // 8
    if factor > 1:
        images = images.repeat(factor, axis=2).repeat(factor, axis=3)
    return images, digits.target.astype(np.int64)
