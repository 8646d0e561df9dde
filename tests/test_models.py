"""Built-in models: seeded, bit-identical, shaped like the real thing."""

import pytest
import torch
from torch import nn

from harness.models.imitation import MODELS, build_model, build_skeleton, make_inputs

TINY = ["dit-xs", "unet-xs"]


@pytest.mark.parametrize("name", TINY)
def test_same_seed_gives_bit_identical_weights_inputs_and_output(name):
    a, b = build_model(name, seed=7), build_model(name, seed=7)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    xa, xb = make_inputs(name, seed=7), make_inputs(name, seed=7)
    assert all(torch.equal(xa[k], xb[k]) for k in xa)
    with torch.no_grad():
        assert torch.equal(a(**xa), b(**xb))


def test_another_seed_gives_other_weights():
    a, b = build_model("dit-xs", seed=0), build_model("dit-xs", seed=1)
    assert not torch.equal(a.blocks[0].attn.to_q.weight, b.blocks[0].attn.to_q.weight)


@pytest.mark.parametrize("name", TINY)
def test_one_denoising_step_maps_latents_to_latents_of_sane_scale(name):
    model, inputs = build_model(name), make_inputs(name)
    with torch.no_grad():
        out = model(**inputs)
    assert out.shape == inputs["latents"].shape
    assert torch.isfinite(out).all() and 0.05 < out.std().item() < 20


def test_dit_has_adaptive_norm_attention_and_mlp_blocks():
    model = build_skeleton("dit-xs")
    block = model.blocks[0]
    assert isinstance(block.adaLN_modulation[1], nn.Linear)
    assert block.adaLN_modulation[1].out_features == 6 * MODELS["dit-xs"].width
    assert hasattr(block, "attn") and hasattr(block, "mlp")


def test_unet_has_res_blocks_attention_and_skips():
    model = build_skeleton("unet-xs")
    names = {type(m).__name__ for m in model.modules()}
    assert {"ResBlock", "SpatialTransformer", "Conv2d", "GroupNorm"} <= names
    assert len(model.down_blocks) == len(model.up_blocks)


@pytest.mark.parametrize("name, low, high", [("dit-l", 1.5e9, 3e9), ("unet-m", 2e8, 4e8)])
def test_large_sizes_have_realistic_layer_shapes(name, low, high):
    model = build_skeleton(name)  # meta device: no memory
    params = sum(p.numel() for p in model.parameters())
    assert low < params < high
    widths = {m.in_features for m in model.modules() if isinstance(m, nn.Linear)}
    assert max(widths) >= 1280


def test_dtype_is_applied_to_weights_and_inputs():
    model = build_model("dit-xs", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert make_inputs("dit-xs", dtype=torch.bfloat16)["latents"].dtype == torch.bfloat16


# ------------------------------------------------------------------------- diffusers' real model classes

REAL_TINY = ["flux-tiny", "sd3-tiny", "sdxl-tiny"]


@pytest.mark.parametrize("name", REAL_TINY)
def test_real_classes_build_offline_and_give_bit_identical_outputs_for_a_seed(name, monkeypatch):
    from harness.models import build

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing comes from a hub
    a, b = build.build_model(name, seed=3), build.build_model(name, seed=3)
    assert type(a).__module__.startswith("diffusers.models")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    with torch.no_grad():
        out_a = build.run(a, build.make_inputs(name, seed=3))
        out_b = build.run(b, build.make_inputs(name, seed=3))
    assert torch.equal(out_a, out_b)
    assert torch.isfinite(out_a).all() and 0.05 < out_a.std().item() < 20
    other = build.build_model(name, seed=4)
    assert any(not torch.equal(va, vb) for va, vb in zip(a.state_dict().values(), other.state_dict().values(),
                                                         strict=True))


@pytest.mark.parametrize("name", REAL_TINY)
def test_every_linear_of_the_tiny_real_models_has_at_least_64_inputs(name):
    from harness.models import build

    widths = [m.in_features for m in build.build_skeleton(name).modules() if isinstance(m, nn.Linear)]
    assert widths and min(widths) >= 64


def test_the_real_shapes_are_flux_dev_and_the_sdxl_unet():
    from harness.models import build

    flux = sum(p.numel() for p in build.build_skeleton("flux-dev").parameters())
    sdxl = sum(p.numel() for p in build.build_skeleton("sdxl").parameters())
    assert 11.5e9 < flux < 12.5e9  # Flux-dev's transformer: 11.9 B parameters
    assert 2.5e9 < sdxl < 2.7e9  # SDXL's UNet: 2.57 B
    inputs = build.make_inputs("flux-dev", device="meta")
    assert inputs["hidden_states"].shape == (1, 4096, 64)  # a 1024x1024 image: 4096 packed latent tokens
    assert inputs["encoder_hidden_states"].shape == (1, 512, 4096)  # 512 T5 tokens
