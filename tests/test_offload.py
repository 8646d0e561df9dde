"""Offload modes run on accelerate's real hooks and do not change the output."""

import pytest
import torch

from harness.models.imitation import build_model, components, make_inputs
from harness.offload import BalancedOffload, apply_offload


@pytest.fixture(scope="module")
def reference():
    model, inputs = build_model("unet-xs"), make_inputs("unet-xs")
    with torch.no_grad():
        return inputs, model(**inputs)


@pytest.mark.parametrize("mode", ["none", "model", "sequential", "balanced"])
def test_every_offload_mode_gives_the_same_output(mode, reference):
    inputs, expected = reference
    model = build_model("unet-xs")
    after_step = apply_offload(model, mode, "cpu")
    with torch.no_grad():
        out = model(**inputs)
    after_step()
    assert torch.equal(out, expected)


def test_model_offload_uses_accelerates_user_hook():
    model = build_model("dit-xs")
    apply_offload(model, "model", "cpu")
    assert type(model._hf_hook).__name__ == "CpuOffload"


def test_sequential_offload_keeps_weights_off_device_between_forwards():
    model = build_model("dit-xs")
    apply_offload(model, "sequential", "cpu")
    # accelerate's cpu_offload leaves placeholders on the meta device; the weights live in the hooks' map.
    assert model.blocks[0].attn.to_q.weight.device.type == "meta"
    assert type(model.blocks[0].attn.to_q._hf_hook).__name__ == "AlignDevicesHook"


def test_balanced_offload_hooks_every_component_and_obeys_watermarks():
    model, inputs = build_model("dit-xs"), make_inputs("dit-xs")
    # Watermarks below any real memory use: every forward passes the high mark and offloads down to one component.
    balanced = BalancedOffload(model, "cpu", high=1e-9, low=1e-10)
    assert all(hasattr(c, "_hf_hook") for c in components(model))
    with torch.no_grad():
        model(**inputs)
    assert len(balanced.on_device) == 1
    assert balanced.offloads == len(components(model)) - 1

    with torch.no_grad():
        relaxed_model = build_model("dit-xs")
        relaxed = BalancedOffload(relaxed_model, "cpu", high=1.0, low=0.5)
        relaxed_model(**inputs)
    assert relaxed.offloads == 0 and len(relaxed.on_device) == len(components(relaxed_model))
