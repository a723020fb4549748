"""The zoo's training loop and checkpointing: resume equals an unbroken run; bad states are errors."""

import pytest
import torch

from workbench import checkpoint
from workbench.testing import tiny_ddpm_scheduler, tiny_unet2d
from workbench.toyworld import ToyWorld
from workbench.training import DiffusionTrainConfig, train_diffusion

WORLD = ToyWorld(image_size=16)


def _config(steps):
    return DiffusionTrainConfig(steps=steps, batch_size=4, warmup_steps=2, checkpoint_every=2, seed=3)


def test_resumed_training_equals_unbroken_training(tmp_path):
    unbroken = train_diffusion(
        tiny_unet2d(sample_size=16),
        tiny_ddpm_scheduler(),
        WORLD,
        config=_config(4),
        state_path=tmp_path / "a" / "state.safetensors",
    )
    # Stop after 2 steps, then a fresh process (fresh model) resumes from the state file to step 4.
    train_diffusion(
        tiny_unet2d(sample_size=16),
        tiny_ddpm_scheduler(),
        WORLD,
        config=_config(2),
        state_path=tmp_path / "b" / "state.safetensors",
    )
    resumed = train_diffusion(
        tiny_unet2d(sample_size=16, seed=99),
        tiny_ddpm_scheduler(),
        WORLD,
        config=_config(4),
        state_path=tmp_path / "b" / "state.safetensors",
    )
    for (name, a), (_, b) in zip(unbroken.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_segments_record_how_a_state_was_trained(tmp_path):
    state = tmp_path / "state.safetensors"
    for steps in (2, 2, 4):  # a run, a resume of the finished run (no-op), then a longer schedule on top
        train_diffusion(
            tiny_unet2d(sample_size=16), tiny_ddpm_scheduler(), WORLD, config=_config(steps), state_path=state
        )
    assert checkpoint.read_segments(state) == [{"from_step": 0, "steps": 2}, {"from_step": 2, "steps": 4}]
    assert checkpoint.read_segments(tmp_path / "missing.safetensors") == []


def test_extra_loss_terms_are_added_and_see_the_step(tmp_path):
    seen = []

    def term(step):
        seen.append((step.step, tuple(step.clean.shape), tuple(step.model_output.shape)))
        return step.model_output.pow(2).mean() * 0.0 + 1.0

    train_diffusion(
        tiny_unet2d(sample_size=16),
        tiny_ddpm_scheduler(),
        WORLD,
        config=_config(2),
        state_path=tmp_path / "state.safetensors",
        extra_losses={"constant": term},
    )
    assert seen == [(0, (4, 3, 16, 16), (4, 3, 16, 16)), (1, (4, 3, 16, 16), (4, 3, 16, 16))]


def test_corrupt_or_mismatched_state_is_a_clear_error(tmp_path):
    state = tmp_path / "state.safetensors"
    train_diffusion(tiny_unet2d(sample_size=16), tiny_ddpm_scheduler(), WORLD, config=_config(2), state_path=state)
    with pytest.raises(ValueError, match="does not match"):
        from workbench.testing import tiny_unet2d_condition

        train_diffusion(
            tiny_unet2d_condition(sample_size=16, in_channels=3),
            tiny_ddpm_scheduler(),
            WORLD,
            config=_config(4),
            state_path=state,
            encode_prompts=lambda captions: torch.zeros(len(captions), 4, 32),
        )
    state.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        train_diffusion(tiny_unet2d(sample_size=16), tiny_ddpm_scheduler(), WORLD, config=_config(4), state_path=state)


@pytest.mark.parametrize(("field", "value"), [("steps", 0), ("prompt_dropout", 1.5), ("ema_decay", 1.0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DiffusionTrainConfig(**{field: value})
