"""The DistriFusion panel (arXiv 2402.19481): choose N, the warm-up and the mode; Run shows the images
against one device."""

from __future__ import annotations

import ipywidgets as w
from diffusers import DiffusionPipeline

from workbench.distrifusion.compare import compare_modes
from workbench.distrifusion.config import MODES
from workbench.plots.distrifusion import comparison_figure
from workbench.widgets import show_figure

__all__ = ["patch_parallel_panel"]


def patch_parallel_panel(
    pipe: DiffusionPipeline,
    *,
    height: int = 64,
    width: int = 64,
    num_inference_steps: int = 20,
    seed: int = 0,
    prompt: str | None = None,
    guidance_scale: float = 1.0,
    run_now: bool = True,
) -> w.VBox:
    """N devices, warm-up steps and mode; Run samples with the simulator (the mode and naive patches).

    The callback calls :func:`workbench.distrifusion.compare.compare_modes` and draws
    :func:`workbench.plots.distrifusion.comparison_figure` into the panel's ``Output``.
    """
    devices = w.Dropdown(options=[1, 2, 4], value=2, description="devices N")
    warmup = w.IntSlider(
        value=4, min=0, max=max(num_inference_steps - 1, 0), description="warm-up", continuous_update=False
    )
    mode = w.Dropdown(options=[m for m in MODES if m != "naive_patch"], value="corrected_async_gn", description="mode")
    run = w.Button(description="Run", button_style="primary")
    output = w.Output()

    def on_run(_=None) -> None:
        run.disabled = True
        try:
            show_figure(
                output,
                lambda: comparison_figure(
                    compare_modes(
                        pipe,
                        num_devices=devices.value,
                        modes=(mode.value, "naive_patch"),
                        warmup_steps=warmup.value,
                        height=height,
                        width=width,
                        num_inference_steps=num_inference_steps,
                        seed=seed,
                        prompt=prompt,
                        guidance_scale=guidance_scale,
                    )
                ),
            )
        finally:
            run.disabled = False

    run.on_click(on_run)
    if run_now:
        on_run()
    header = w.HTML(
        f"<b>Patch parallelism</b> (simulated ranks) on a {height}x{width} canvas, {num_inference_steps} steps"
    )
    return w.VBox([header, w.HBox([devices, warmup]), w.HBox([mode, run]), output])
