"""The notebook panel of paper 6: a prompt, a method to compare with the base sampler, images side by side."""

from __future__ import annotations

import ipywidgets as w

from workbench.plots.singdiffusion import method_rows_figure
from workbench.singdiffusion.experiment import METHODS, compare_prompt
from workbench.widgets import show_figure

__all__ = ["compare_panel"]


def compare_panel(
    pipe,
    module,
    *,
    prompt: str = "a red circle on a black background",
    offset_pipe=None,
    num_images: int = 6,
    num_inference_steps: int = 20,
    seed: int = 0,
) -> w.VBox:
    """Type a prompt, pick what to compare with the base sampler, press Run: rows of images from the same noise.

    Args:
        pipe: the toy text-to-image pipeline.
        module: the trained SingDiffusion module (``zoo.load("toy-t2i-sing")``).
        prompt: the starting prompt (toy-world words only: the oracle needs them).
        offset_pipe: a pipeline fine-tuned with offset noise, if you have one (adds it to the choices).
        num_images, num_inference_steps, seed: what Run samples.
    """
    choices = [m for m in METHODS if m != "base" and (m != "offset noise" or offset_pipe is not None)]
    text = w.Text(value=prompt, description="prompt", layout=w.Layout(width="440px"))
    against = w.ToggleButtons(options=["all", *choices], value="singdiffusion", description="compare")
    guidance = w.FloatSlider(value=4.0, min=1.0, max=8.0, step=0.5, description="guidance", continuous_update=False)
    seed_box = w.IntText(value=seed, description="seed", layout=w.Layout(width="160px"))
    run = w.Button(description="Run", button_style="primary")
    output = w.Output()

    def on_run(_=None) -> None:
        methods = ["base", *(choices if against.value == "all" else [against.value])]
        show_figure(
            output,
            lambda: method_rows_figure(
                compare_prompt(
                    pipe,
                    text.value,
                    methods=methods,
                    module=module,
                    offset_pipe=offset_pipe,
                    num_images=num_images,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance.value,
                    seed=seed_box.value,
                ),
                title=f"{text.value!r}, guidance {guidance.value}, same noise in each column",
            ),
        )

    run.on_click(on_run)
    against.observe(on_run, names="value")
    on_run()
    return w.VBox([w.HBox([text, run]), against, w.HBox([guidance, seed_box]), output])
