"""LoRA adapters on the zoo's UNet layouts: zero-initialised, only adapter weights train, safetensors round trip."""

import pytest
import torch

from workbench.adapters import add_lora, load_lora, save_lora
from workbench.testing import tiny_unet2d_condition


def _call(unet):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    states = torch.randn(2, 5, 32, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 500]), encoder_hidden_states=states).sample


def test_fresh_adapter_leaves_the_output_unchanged_and_only_it_trains():
    unet = tiny_unet2d_condition(sample_size=16)
    before = _call(unet)
    parameters = add_lora(unet, rank=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_call(unet), before)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert parameters and len(trainable) == len(parameters)
    assert {id(p) for p in trainable} == {id(p) for p in parameters}


def test_adapter_round_trips_through_safetensors(tmp_path):
    unet = tiny_unet2d_condition(sample_size=16)
    parameters = add_lora(unet, rank=2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in parameters:
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    adapted = _call(unet)
    path = save_lora(unet, tmp_path / "lora")
    assert list(path.glob("*.safetensors"))
    fresh = tiny_unet2d_condition(sample_size=16)
    assert not torch.allclose(_call(fresh), adapted)
    load_lora(fresh, path)
    torch.testing.assert_close(_call(fresh), adapted)


def test_same_generator_same_adapter():
    weights = []
    for _ in range(2):
        unet = tiny_unet2d_condition(sample_size=16)
        weights.append([p.clone() for p in add_lora(unet, rank=2, generator=torch.Generator().manual_seed(3))])
    for a, b in zip(*weights, strict=True):
        torch.testing.assert_close(a, b)


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        add_lora(tiny_unet2d_condition(sample_size=16), rank=0)
    with pytest.raises(ValueError, match="target_modules"):
        add_lora(tiny_unet2d_condition(sample_size=16), target_modules=("no_such_layer",))
    with pytest.raises(FileNotFoundError, match="path: no LoRA adapter"):
        load_lora(tiny_unet2d_condition(sample_size=16), tmp_path / "missing")
