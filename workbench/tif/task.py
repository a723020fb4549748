"""The toy few-shot task: classes that differ in the fine-grained mark (and the shape), a salient cue that lies.

Classes are (shape, mark) pairs: by default the three shapes times the three marks, nine classes. In the few
training shots every class also carries the value of a salient attribute that belongs to its mark (by
default the shape's colour: plain shapes red, dotted green, striped blue), so within a shape a learner that
fits the shots can tell the marks apart by colour alone. In the test set the colour is drawn independently
of the class, so only the mark predicts it. This is the paper's setting in miniature: the nuanced attribute
(the mark, a few dark pixels) is erased by the forward process at smaller t than the prominent, spuriously
correlated one.

Two ways to name the classes, for the methods that read names (Diffusion Classifier with class prompts,
zero-shot CLIP): ``"names"`` says the mark and the shape ("a large dotted circle ..."), which the toy models
were trained on; ``"tokens"`` gives each class a meaningless token instead ("a large hta shape ..."), the
paper's customised setting (re-identification, "person hta"), where a name carries nothing to read. TiF
itself never reads a name: one prompt is shared by every class and identity lives in the adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from workbench.tif.learner import FewShotSet
from workbench.toyworld import ATTRIBUTES, ToyWorld, caption

__all__ = ["CUSTOM_TOKENS", "MarkTask"]

# Rare, meaningless words for the customised setting; none occurs in a toy-world caption.
CUSTOM_TOKENS = ("hta", "sks", "vyx", "qoz", "fep", "jum", "wib", "krd", "zel", "plo", "gax", "tev")

Naming = Literal["names", "tokens"]


@dataclass(frozen=True)
class MarkTask:
    """Few-shot classification of (shape, mark) under a spurious cue tied to the mark.

    Attributes:
        spurious_attribute: the salient attribute tied to the mark in the shots ("colour" or "background").
        spurious_values: its value for each mark's shots, in ``ATTRIBUTES["mark"]`` order; the test set
            cycles through these independently of the class.
        shapes: the shapes that are part of the class (one shape: three classes, the marks).
        size, background, colour: the attributes held fixed (the one named in ``spurious_attribute`` is
            ignored). Large shapes keep the mark visible at 32x32.
    """

    spurious_attribute: str = "colour"
    spurious_values: tuple[str, ...] = ("red", "green", "blue")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    size: str = "large"
    background: str = "grey"
    colour: str = "red"

    def __post_init__(self) -> None:
        if self.spurious_attribute not in ("colour", "background"):
            raise ValueError(f"spurious_attribute must be 'colour' or 'background', got {self.spurious_attribute!r}")
        allowed = ATTRIBUTES[self.spurious_attribute]
        marks = ATTRIBUTES["mark"]
        if len(self.spurious_values) != len(marks) or any(v not in allowed for v in self.spurious_values):
            raise ValueError(f"spurious_values must be {len(marks)} values from {allowed}, got {self.spurious_values}")
        if len(set(self.spurious_values)) != len(self.spurious_values):
            raise ValueError(f"spurious_values must be distinct, got {self.spurious_values}")
        shapes = tuple(self.shapes)
        if not shapes or len(set(shapes)) != len(shapes) or any(s not in ATTRIBUTES["shape"] for s in shapes):
            raise ValueError(f"shapes must be distinct values from {ATTRIBUTES['shape']}, got {self.shapes}")

    @property
    def marks(self) -> tuple[str, ...]:
        return ATTRIBUTES["mark"]

    @property
    def class_names(self) -> tuple[str, ...]:
        """``"mark-shape"`` per class, shape-major; just the marks when there is one shape."""
        if len(self.shapes) == 1:
            return self.marks
        return tuple(f"{mark}-{shape}" for shape in self.shapes for mark in self.marks)

    def _class_attributes(self, index: int) -> tuple[str, str]:
        shape, mark = divmod(index, len(self.marks))
        return self.shapes[shape], self.marks[mark]

    @property
    def prompt(self) -> str:
        """The shared class prompt: the fixed attributes only (never the mark, the spurious cue, nor a shape
        that is part of the class)."""
        return caption(self._fixed())

    def class_prompts(self, naming: Naming = "names") -> dict[str, str]:
        """One prompt per class (Diffusion Classifier's zero-shot conditions, zero-shot CLIP's captions).

        Args:
            naming: ``"names"``: the shared prompt with the class's mark and shape; ``"tokens"``: the shared
                prompt with one meaningless token per class (the customised setting).
        """
        if naming == "names":
            return {
                name: caption({**self._fixed(), "shape": shape, "mark": mark})
                for index, name in enumerate(self.class_names)
                for shape, mark in [self._class_attributes(index)]
            }
        if naming == "tokens":
            if len(self.class_names) > len(CUSTOM_TOKENS):
                raise ValueError(f"naming='tokens' supports at most {len(CUSTOM_TOKENS)} classes")
            noun = self.shapes[0] if len(self.shapes) == 1 else "shape"
            return {
                name: self.prompt.replace(noun, f"{token} {noun}", 1)
                for name, token in zip(self.class_names, CUSTOM_TOKENS, strict=False)
            }
        raise ValueError(f"naming must be 'names' or 'tokens', got {naming!r}")

    def _fixed(self) -> dict[str, str]:
        fixed = {"size": self.size, "background": self.background, "colour": self.colour}
        if len(self.shapes) == 1:
            fixed["shape"] = self.shapes[0]
        fixed.pop(self.spurious_attribute)
        return fixed

    def _images(self, index: int, value: str, n: int, rng: np.random.Generator, world: ToyWorld) -> np.ndarray:
        shape, mark = self._class_attributes(index)
        fixed = {**self._fixed(), "shape": shape, "mark": mark, self.spurious_attribute: value}
        return world.sample(n, rng, fixed=fixed).images

    def shots(self, shots_per_class: int, rng: np.random.Generator | int) -> FewShotSet:
        """``shots_per_class`` training images per class, each with its mark's spurious value."""
        if not isinstance(shots_per_class, int) or shots_per_class < 1:
            raise ValueError(f"shots_per_class must be a positive integer, got {shots_per_class!r}")
        rng = np.random.default_rng(rng)
        world = ToyWorld()
        images, labels = [], []
        for index in range(len(self.class_names)):
            value = self.spurious_values[index % len(self.marks)]
            images.append(self._images(index, value, shots_per_class, rng, world))
            labels += [index] * shots_per_class
        labels = np.array(labels)
        return FewShotSet(np.concatenate(images), labels, self.class_names, self.prompt, labels.copy())

    def test_set(self, images_per_class: int, rng: np.random.Generator | int) -> FewShotSet:
        """``images_per_class`` test images per class, the spurious value cycling independently of the class.

        ``spurious`` holds, per image, the class its cue points to: the same shape, and the mark whose shots
        had this image's spurious value.
        """
        if not isinstance(images_per_class, int) or images_per_class < 1:
            raise ValueError(f"images_per_class must be a positive integer, got {images_per_class!r}")
        rng = np.random.default_rng(rng)
        world = ToyWorld()
        marks = len(self.marks)
        images, labels, spurious = [], [], []
        for index in range(len(self.class_names)):
            for j in range(images_per_class):
                value = j % marks
                images.append(self._images(index, self.spurious_values[value], 1, rng, world))
                labels.append(index)
                spurious.append(index - index % marks + value)
        return FewShotSet(np.concatenate(images), np.array(labels), self.class_names, self.prompt, np.array(spurious))
