"""The notebook panel of paper 1: re-optimise the time steps live, compare samples on demand."""

from __future__ import annotations

import ipywidgets as w

from workbench.plots.timesteps import sample_rows_figure, schedules_figure
from workbench.timesteps import BASELINES, SOLVERS, NoiseSchedule, StepOptimConfig
from workbench.timesteps.experiment import compare_samples, compare_schedules
from workbench.widgets import show_figure

__all__ = ["schedule_panel"]


def schedule_panel(
    schedule: NoiseSchedule,
    pipe: object | None = None,
    *,
    num_steps: int = 6,
    prompt: str = "a red circle",
    num_images: int = 6,
    guidance_scale: float = 4.0,
    seed: int = 0,
    config: StepOptimConfig | None = None,
) -> w.VBox:
    """Solver, order, N and a baseline: the optimised steps are recomputed (well under a second) and drawn
    beside the baseline's; with a ``pipe``, Run samples both from the same noise and shows them side by side.

    Args:
        schedule: the noise schedule to optimise for (``NoiseSchedule.from_scheduler(pipe.scheduler)``).
        pipe: the toy text-to-image pipeline (or any with ``unet``/``scheduler``); None: schedules only.
        num_steps: the starting N.
        prompt, num_images, guidance_scale, seed: what Run samples.
        config: the optimiser's settings.
    """
    solver = w.Dropdown(options=list(SOLVERS), value="unipc", description="solver")
    order = w.Dropdown(options=[1, 2, 3], value=3, description="order")
    steps = w.IntSlider(value=num_steps, min=1, max=20, description="N (NFE)", continuous_update=False)
    baseline = w.Dropdown(options=list(BASELINES), value="uniform_lambda", description="baseline")
    run = w.Button(
        description="Run",
        button_style="primary",
        disabled=pipe is None,
        tooltip="sample with both schedules" if pipe is not None else "no pipeline given",
    )
    schedule_output, sample_output = w.Output(), w.Output()

    def schedules() -> dict:
        return compare_schedules(
            schedule,
            solver=solver.value,
            order=order.value,
            num_steps=steps.value,
            baselines=[baseline.value],
            config=config,
        )

    def redraw(_=None) -> None:
        title = f"{solver.value} order {order.value}, N = {steps.value}"
        show_figure(schedule_output, lambda: schedules_figure(schedules(), title=title))

    def on_run(_=None) -> None:
        show_figure(
            sample_output,
            lambda: sample_rows_figure(
                compare_samples(
                    pipe,
                    schedules(),
                    solver=solver.value,
                    order=order.value,
                    prompt=prompt,
                    num_images=num_images,
                    guidance_scale=guidance_scale,
                    seed=seed,
                ),
                title=f"{prompt!r}, same noise",
            ),
        )

    for control in (solver, order, steps, baseline):
        control.observe(redraw, names="value")
    run.on_click(on_run)
    redraw()
    return w.VBox([w.HBox([solver, order]), w.HBox([steps, baseline, run]), schedule_output, sample_output])
