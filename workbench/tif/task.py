"""The toy few-shot task: classes that differ only in the fine-grained mark, a salient cue that lies.

In the few training shots every class comes with its own value of a salient attribute (by default the
shape's colour: plain shapes red, dotted green, striped blue), so a learner that fits the shots can
separate them by colour alone. In the test set the colour is drawn independently of the class, so only the
mark predicts it. This is the paper's setting in miniature: the nuanced attribute (the mark, a few dark
pixels) is erased by the forward process at smaller t than the prominent, spuriously correlated one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workbench.tif.learner import FewShotSet
from workbench.toyworld import ATTRIBUTES, ToyWorld, caption

__all__ = ["MarkTask"]


@dataclass(frozen=True)
class MarkTask:
    """Few-shot classification of the mark under a spurious cue.

    Attributes:
        spurious_attribute: the salient attribute tied to the class in the shots ("colour" or "background").
        spurious_values: its value for each class's shots, in ``ATTRIBUTES["mark"]`` order; the test set
            draws it uniformly from these, independently of the class.
        shape, size, background, colour: the attributes held fixed (the one named in
            ``spurious_attribute`` is ignored). Large shapes keep the mark visible at 32x32.
    """

    spurious_attribute: str = "colour"
    spurious_values: tuple[str, ...] = ("red", "green", "blue")
    shape: str = "circle"
    size: str = "large"
    background: str = "grey"
    colour: str = "red"

    def __post_init__(self) -> None:
        if self.spurious_attribute not in ("colour", "background"):
            raise ValueError(f"spurious_attribute must be 'colour' or 'background', got {self.spurious_attribute!r}")
        allowed = ATTRIBUTES[self.spurious_attribute]
        if len(self.spurious_values) != len(self.class_names) or any(v not in allowed for v in self.spurious_values):
            raise ValueError(
                f"spurious_values must be {len(self.class_names)} values from {allowed}, got {self.spurious_values}"
            )

    @property
    def class_names(self) -> tuple[str, ...]:
        return ATTRIBUTES["mark"]

    @property
    def prompt(self) -> str:
        """The shared class prompt: the fixed attributes only (never the mark nor the spurious one)."""
        return caption(self._fixed(include_spurious=False))

    def class_prompts(self) -> dict[str, str]:
        """One prompt per class naming its mark (Diffusion Classifier's zero-shot conditions)."""
        return {m: caption({**self._fixed(include_spurious=False), "mark": m}) for m in self.class_names}

    def _fixed(self, *, include_spurious: bool) -> dict[str, str]:
        fixed = {"shape": self.shape, "size": self.size, "background": self.background, "colour": self.colour}
        if not include_spurious:
            fixed.pop(self.spurious_attribute)
        return fixed

    def shots(self, shots_per_class: int, rng: np.random.Generator | int) -> FewShotSet:
        """``shots_per_class`` training images per class, each class with its own spurious value."""
        if not isinstance(shots_per_class, int) or shots_per_class < 1:
            raise ValueError(f"shots_per_class must be a positive integer, got {shots_per_class!r}")
        rng = np.random.default_rng(rng)
        world = ToyWorld()
        images, labels, spurious = [], [], []
        for index, (mark, value) in enumerate(zip(self.class_names, self.spurious_values, strict=True)):
            fixed = {**self._fixed(include_spurious=False), "mark": mark, self.spurious_attribute: value}
            images.append(world.sample(shots_per_class, rng, fixed=fixed).images)
            labels += [index] * shots_per_class
            spurious += [index] * shots_per_class
        return FewShotSet(np.concatenate(images), np.array(labels), self.class_names, self.prompt, np.array(spurious))

    def test_set(self, images_per_class: int, rng: np.random.Generator | int) -> FewShotSet:
        """``images_per_class`` test images per class, the spurious value cycling independently of the class."""
        if not isinstance(images_per_class, int) or images_per_class < 1:
            raise ValueError(f"images_per_class must be a positive integer, got {images_per_class!r}")
        rng = np.random.default_rng(rng)
        world = ToyWorld()
        images, labels, spurious = [], [], []
        for index, mark in enumerate(self.class_names):
            for j in range(images_per_class):
                value = j % len(self.spurious_values)
                fixed = {
                    **self._fixed(include_spurious=False),
                    "mark": mark,
                    self.spurious_attribute: self.spurious_values[value],
                }
                images.append(world.sample(1, rng, fixed=fixed).images)
                labels.append(index)
                spurious.append(value)
        return FewShotSet(np.concatenate(images), np.array(labels), self.class_names, self.prompt, np.array(spurious))
