"""Offload modes, on accelerate's real hooks, applied the way diffusers and SD.Next apply them.

The harness never works around an engine's incompatibility with an offload mode: whatever accelerate raises when
it meets the engine's tensors is the finding. `apply_offload` returns a callable to run after each step (model
offload's "free the model" at the end of a pipeline call); it is a no-op for the other modes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from harness import devices
from harness.models.imitation import components


def apply_offload(model: nn.Module, mode: str, device: str, *, high_watermark: float = 0.6,
                  low_watermark: float = 0.2) -> Callable[[], None]:
    execution = devices.torch_device(device)
    if mode == "none":
        model.to(execution)
        return lambda: None
    if mode == "model":
        return _model_offload(model, execution)
    if mode == "sequential":
        _sequential_offload(model, execution)
        return lambda: None
    if mode == "balanced":
        BalancedOffload(model, device, high_watermark, low_watermark)
        return lambda: None
    raise ValueError(f"unknown offload mode {mode!r}")


def _model_offload(model: nn.Module, execution: torch.device) -> Callable[[], None]:
    """diffusers' enable_model_cpu_offload: the whole model moves to the device for its forward."""
    from accelerate import cpu_offload_with_hook

    model.to("cpu")
    _, hook = cpu_offload_with_hook(model, execution)
    return hook.offload


def _sequential_offload(model: nn.Module, execution: torch.device) -> None:
    """diffusers' enable_sequential_cpu_offload: weights live off-device, each submodule's arrive per forward."""
    from accelerate import cpu_offload

    model.to("cpu")
    cpu_offload(model, execution_device=execution, offload_buffers=len(model._parameters) > 0)


class BalancedOffload:
    """SD.Next's balanced offload: a hook per component moves it to the execution device before its forward; when
    device memory in use passes `high` (a fraction of the device's memory), the least recently used components go
    back to the CPU until use is under `low`."""

    def __init__(self, model: nn.Module, device: str, high: float, low: float):
        from accelerate.hooks import ModelHook, add_hook_to_module

        self.device, self.high, self.low = device, high, low
        self.execution = devices.torch_device(device)
        self.total = devices.total_memory(device)
        self.on_device: list[nn.Module] = []  # least recently used first
        self.offloads = 0
        model.to("cpu")
        owner = self

        class OffloadHook(ModelHook):
            def pre_forward(self, module, *args, **kwargs):
                owner.bring(module)
                return args, kwargs

        for component in components(model):
            add_hook_to_module(component, OffloadHook(), append=True)
        # Inputs and the parameters that belong to no component (e.g. a positional embedding) stay on the device.
        for p in model._parameters.values():
            if p is not None:
                p.data = p.data.to(self.execution)

    def bring(self, module: nn.Module) -> None:
        if module in self.on_device:
            self.on_device.remove(module)
        else:
            module.to(self.execution)
        self.on_device.append(module)
        if devices.memory_in_use(self.device) > self.high * self.total:
            while len(self.on_device) > 1 and devices.memory_in_use(self.device) > self.low * self.total:
                self.on_device.pop(0).to("cpu")
                self.offloads += 1
