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


def test_block_linears_picks_the_low_resolution_blocks():
    from workbench.adapters import FEED_FORWARD_PROJECTIONS, block_linears
    from workbench.testing import tiny_unet2d_condition_xl
    from workbench.zoo import build_toy_t2i_unet

    unet = build_toy_t2i_unet()  # attention at 16x16 (down 1, up 1), at 8x8 (down 2, up 0) and in the mid block
    everything = block_linears(unet)
    low = block_linears(unet, levels=1)
    assert set(low) < set(everything)
    assert all(n.startswith(("mid_block.", "down_blocks.2.", "up_blocks.0.")) for n in low)
    assert set(block_linears(unet, levels=2)) == set(everything)
    assert any(n.startswith("mid_block.") for n in low)
    assert any(n.endswith(FEED_FORWARD_PROJECTIONS) for n in everything)
    xl = tiny_unet2d_condition_xl()
    assert block_linears(xl, levels=1) and all("down_blocks.0." not in n for n in block_linears(xl, levels=1))
    with pytest.raises(ValueError, match="levels must be None or a positive integer"):
        block_linears(unet, levels=0)


def test_named_adapters_switch_without_reloading_on_sd_and_sdxl_layouts():
    from workbench.adapters import adapter_names, block_linears, use_adapter
    from workbench.testing import tiny_unet2d_condition_xl

    unet = tiny_unet2d_condition(sample_size=16)
    base = _call(unet)
    generator = torch.Generator().manual_seed(0)
    for name in ("first", "second"):
        for p in add_lora(unet, rank=2, adapter_name=name, generator=generator, target_modules=block_linears(unet)):
            with torch.no_grad():
                p.add_(0.2 * torch.randn(p.shape, generator=generator))
    assert adapter_names(unet) == ["first", "second"]
    use_adapter(unet, "first")
    first = _call(unet)
    use_adapter(unet, "second")
    second = _call(unet)
    use_adapter(unet, "first")
    torch.testing.assert_close(_call(unet), first)
    use_adapter(unet, None)
    torch.testing.assert_close(_call(unet), base)
    assert not torch.allclose(first, second)
    with pytest.raises(ValueError, match="adapter_name 'third' is not attached"):
        use_adapter(unet, "third")

    xl = tiny_unet2d_condition_xl()
    for name in ("first", "second"):
        add_lora(xl, rank=2, adapter_name=name, target_modules=block_linears(xl, levels=1))
    use_adapter(xl, "second")
    assert xl.active_adapters() == ["second"]
