"""Interactive panels for the notebooks.

Each panel is an ``ipywidgets.VBox`` whose callback calls one pure, tested function (from
``workbench.plots``) and draws into an ``Output``. Slow work runs from a Run button. Paper-specific panels
live in submodules (``workbench.widgets.timesteps``, ...).
"""

from __future__ import annotations

import ipywidgets as w
import matplotlib.pyplot as plt
from IPython.display import display

from workbench.plots.toyworld import biased_world_figure, prompt_samples_figure
from workbench.toyworld import ATTRIBUTES

__all__ = ["bias_panel", "prompt_panel", "show_figure"]


def show_figure(output: w.Output, make_figure) -> None:
    """Replace ``output``'s content by the figure ``make_figure()`` returns (errors shown, not raised)."""
    with output:
        output.clear_output(wait=True)
        try:
            fig = make_figure()
        except ValueError as error:
            print(f"error: {error}")
            return
        display(fig)
        plt.close(fig)  # drawn once, by display, not again by the inline backend


def bias_panel(attribute: str = "shape", *, n: int = 48, seed: int = 0) -> w.VBox:
    """Choose an attribute and the weight of each value; see samples of the biased world and its histogram."""
    choose = w.Dropdown(options=list(ATTRIBUTES), value=attribute, description="attribute")
    sliders_box = w.HBox()
    output = w.Output()

    def weights() -> dict[str, float]:
        return {s.description: s.value for s in sliders_box.children}

    def redraw(_=None) -> None:
        show_figure(output, lambda: biased_world_figure(choose.value, weights(), n=n, seed=seed))

    def rebuild(_=None) -> None:
        sliders = [
            w.FloatSlider(
                value=1.0,
                min=0.0,
                max=1.0,
                step=0.05,
                description=value,
                continuous_update=False,
                orientation="vertical",
                layout=w.Layout(width="70px"),
            )
            for value in ATTRIBUTES[choose.value]
        ]
        for slider in sliders:
            slider.observe(redraw, names="value")
        sliders_box.children = sliders
        redraw()

    choose.observe(rebuild, names="value")
    rebuild()
    return w.VBox([w.HTML("<b>Attribute bias</b>: weights are normalised to sum to 1"), choose, sliders_box, output])


def prompt_panel(pipe, *, prompt: str = "a red circle", num_images: int = 8, num_inference_steps: int = 20) -> w.VBox:
    """Type a prompt, set the guidance scale, press Run: samples from the text-to-image pipeline."""
    text = w.Text(value=prompt, description="prompt", layout=w.Layout(width="420px"))
    guidance = w.FloatSlider(value=4.0, min=1.0, max=10.0, step=0.5, description="guidance", continuous_update=False)
    seed = w.IntText(value=0, description="seed", layout=w.Layout(width="160px"))
    run = w.Button(description="Run", button_style="primary")
    output = w.Output()

    def on_run(_=None) -> None:
        show_figure(
            output,
            lambda: prompt_samples_figure(
                pipe,
                [text.value],
                guidance_scale=guidance.value,
                num_images=num_images,
                num_inference_steps=num_inference_steps,
                seed=seed.value,
            ),
        )

    run.on_click(on_run)
    on_run()
    return w.VBox([w.HBox([text, run]), w.HBox([guidance, seed]), output])
