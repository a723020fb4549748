"""The notebook panels of paper 4 (TiF): the weighting curve's knee, and one test image's per-class losses."""

from __future__ import annotations

import ipywidgets as w
import matplotlib.pyplot as plt

from workbench.plots import image_grid
from workbench.plots.tif import class_losses_figure, weights_figure
from workbench.tif.classify import timestep_weights, weight_knee
from workbench.tif.experiment import image_losses
from workbench.tif.learner import FewShotSet
from workbench.widgets import show_figure

__all__ = ["test_image_panel", "weights_panel"]


def weights_panel(noise_scheduler, *, distance: float = 5.0) -> w.VBox:
    """A slider for the class distance d: TiF's weights w_t and their knee, against uniform and large-t only."""
    slider = w.FloatLogSlider(
        value=distance, base=10, min=-0.5, max=2.0, step=0.05, description="distance d", continuous_update=False
    )
    output = w.Output()

    def redraw(_=None) -> None:
        def figure():
            tif = timestep_weights("tif", noise_scheduler, distance=slider.value)
            curves = {"TiF": tif, "uniform (DC)": timestep_weights("uniform", noise_scheduler)}
            curves["large t only"] = timestep_weights("large", noise_scheduler)
            return weights_figure(curves, knee=weight_knee(tif))

        show_figure(output, figure)

    slider.observe(redraw, names="value")
    redraw()
    return w.VBox([slider, output])


def test_image_panel(pipe, noise_scheduler, test: FewShotSet, record: dict, *, num_timesteps: int = 20) -> w.VBox:
    """Pick a test image and press Run: the image, and each class adapter's error against t (shared noise).

    Args:
        test: the test images (their true class and spurious value label the curves).
        record: the adapters' record from :func:`workbench.tif.experiment.demo_adapters`.
    """
    index = w.IntSlider(value=0, min=0, max=len(test) - 1, description="test image", continuous_update=False)
    seed = w.IntText(value=0, description="noise seed", layout=w.Layout(width="180px"))
    run = w.Button(description="Run", button_style="primary")
    output = w.Output()

    def on_run(_=None) -> None:
        def figure():
            i = index.value
            result = image_losses(
                pipe, noise_scheduler, test.images[i], record, num_timesteps=num_timesteps, seed=seed.value
            )
            fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), width_ratios=(1, 3), layout="constrained")
            predicted = test.class_names[int(result.predictions[0])]
            image_grid(
                test.images[i : i + 1], ax=left, title=f"true {test.class_names[test.labels[i]]}, TiF: {predicted}"
            )
            spurious = None if test.spurious is None else int(test.spurious[i])
            weights = timestep_weights("tif", noise_scheduler, distance=float(record["distance"]))[result.timesteps]
            class_losses_figure(
                result.errors[0],
                result.timesteps,
                test.class_names,
                true_class=int(test.labels[i]),
                spurious_class=spurious,
                weights=weights,
                ax=right,
            )
            return fig

        show_figure(output, figure)

    run.on_click(on_run)
    return w.VBox([w.HBox([index, seed, run]), output])
