"""The notebook panel of paper 3: choose a target distribution and a guidance scale, sample a guided batch."""

from __future__ import annotations

import math

import ipywidgets as w

from workbench.debias.experiment import DEFAULT_SCALES, VALUES, guided_batch
from workbench.plots.debias import guided_batch_figure
from workbench.widgets import show_figure

__all__ = ["target_panel"]


def target_panel(pipe, adps, evaluator, *, num_images: int = 16, seed: int = 0) -> w.VBox:
    """Attribute, target share of its first value, and scale; Run samples one guided batch (a few seconds)
    and shows what the evaluation CNN reads next to the target.

    Args:
        pipe: the toy-uncond pipeline; adps: its ADP heads (``load_adps()``); evaluator: ``load_classifier()``.
        num_images: the batch size (distribution guidance steers this batch).
        seed: the noise (the same noise for every setting, so changes are the guidance's).
    """
    attribute = w.Dropdown(options=list(VALUES), value="shape", description="attribute")
    share = w.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05, description="target", continuous_update=False)
    default = DEFAULT_SCALES["distribution"]
    scale = w.FloatLogSlider(
        value=default,
        base=10,
        min=math.log10(default) - 2,
        max=math.log10(default) + 1,
        step=0.1,
        description="scale",
        continuous_update=False,
    )
    label = w.HTML()
    run = w.Button(description="Run", button_style="primary")
    output = w.Output()

    def describe(_=None) -> None:
        first, second = VALUES[attribute.value]
        label.value = f"target: {share.value:.0%} {first}, {1 - share.value:.0%} {second}"

    def on_run(_=None) -> None:
        def figure():
            result = guided_batch(
                pipe,
                adps,
                evaluator,
                attribute=attribute.value,
                share=share.value,
                scale=scale.value,
                num_images=num_images,
                seed=seed,
            )
            distributions = {"guided": result["observed"], "target": result["target"]}
            return guided_batch_figure(result["images"], distributions, result["class_names"], title=label.value)

        show_figure(output, figure)

    for control in (attribute, share):
        control.observe(describe, names="value")
    run.on_click(on_run)
    describe()
    on_run()
    return w.VBox([w.HBox([attribute, share]), w.HBox([scale, run]), label, output])
