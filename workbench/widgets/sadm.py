"""The notebook panel of paper 5: set the structure weight and the critic's size, press Run, watch a 2-D run."""

from __future__ import annotations

from dataclasses import replace

import ipywidgets as w
import matplotlib.pyplot as plt

from workbench.plots.sadm import loss_curves_figure, points_figure
from workbench.sadm.experiment import HELD_OUT_SEED, POINT_SADM
from workbench.sadm.toy2d import PointWorld, point_metrics, sample_points, train_points
from workbench.widgets import show_figure

__all__ = ["train_panel"]


def train_panel(*, steps: int = 1500, redraw_every: int = 100, num_samples: int = 1000) -> w.VBox:
    """A 2-D training run from a Run button: live loss curves, then samples against plain training's.

    The knobs are the structure weight λ, the critic's width, the time window t_max, the relation
    (cosine or batch-centred cosine) and the world; both runs share the seed. Each press trains a plain and
    a SADM model (a few seconds each).

    Args:
        steps: the starting number of training steps.
        redraw_every: steps between redraws of the live loss plot.
        num_samples: points sampled from each model for the scatter and the measures.
    """
    weight = w.FloatLogSlider(
        value=POINT_SADM.structure_weight, base=10, min=-3, max=1, step=0.25, description="weight λ",
        continuous_update=False,
    )  # fmt: skip
    width = w.IntSlider(value=POINT_SADM.critic_width, min=4, max=256, step=4, description="critic width")
    window = w.IntSlider(value=POINT_SADM.max_timestep, min=50, max=999, step=50, description="t_max")
    world = w.Dropdown(options=["ring", "moons", "swissroll"], value="ring", description="world")
    relation = w.Dropdown(options=["cosine", "centred_cosine"], value=POINT_SADM.relation, description="relation")
    steps_box = w.IntSlider(value=steps, min=100, max=6000, step=100, description="steps")
    seed = w.IntText(value=0, description="seed", layout=w.Layout(width="160px"))
    run = w.Button(description="Run", button_style="primary")
    live = w.Output()
    result = w.Output()

    def on_run(_=None) -> None:
        run.disabled = True
        try:
            data = PointWorld(world.value)
            sadm = replace(
                POINT_SADM,
                structure_weight=weight.value,
                critic_width=width.value,
                max_timestep=window.value,
                relation=relation.value,
            )
            history: list[dict] = []

            def watch(step: int, logs) -> None:
                history.append({"step": step, **logs})
                if (step + 1) % redraw_every == 0 or step + 1 == steps_box.value:
                    show_figure(live, lambda: loss_curves_figure(history))

            game = train_points(data, sadm=sadm, steps=steps_box.value, seed=seed.value, callback=watch)
            plain = train_points(data, sadm=None, steps=steps_box.value, seed=seed.value)
            real = data.sample(num_samples, HELD_OUT_SEED).images
            samples = {
                "real": real,
                "plain": sample_points(plain.denoiser, num_samples, seed=HELD_OUT_SEED + 1),
                f"SADM λ={weight.value:.3g}": sample_points(game.denoiser, num_samples, seed=HELD_OUT_SEED + 1),
            }

            def summary():
                fig, axes = plt.subplots(1, 3, figsize=(9.5, 3.4), sharex=True, sharey=True)
                points_figure(samples, axes=axes)
                for ax, name in zip(axes[1:], list(samples)[1:], strict=True):
                    figures = point_metrics(samples[name], real, data)
                    ax.set_title(f"{name}\n" + ", ".join(f"{k}: {v:.3g}" for k, v in figures.items()), fontsize=7)
                fig.suptitle(f"{game.seconds:.1f} s with SADM, {plain.seconds:.1f} s plain", fontsize=9)
                fig.tight_layout()
                return fig

            show_figure(result, summary)
        finally:
            run.disabled = False

    run.on_click(on_run)
    return w.VBox(
        [
            w.HTML("<b>SADM on 2-D points</b>: press Run to train a SADM and a plain model (same seed)"),
            w.HBox([weight, width, window]),
            relation,
            w.HBox([world, steps_box, seed, run]),
            live,
            result,
        ]
    )
