"""The `direct` stack, the control: the engine's own API on the module (quantize after loading, a layer at a time
while loading from a float checkpoint, its own file format), offloaded by accelerate's functions on the module.
A pipeline: the engine's API on each component it quantizes, accelerate's functions on each component."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from harness import devices, offload
from harness.engines.base import Engine
from harness.engines.registry import ENGINES
from harness.models.specs import MODELS
from harness.settings import Settings
from harness.stacks import loading
from harness.stacks.base import SharedFile, Stack

# This stack in a standalone repro script (harness/repro.py reads it as text, without importing this module): the
# float model drawn in memory and the engine's statements after load (`{quantize}`), then accelerate's functions
# on the module per offload mode (offload_module below): the statements, and the one after each step.
REPRO = {
    "prepare": {"post-load": ""},
    "load": {"post-load": "model = build_model()  # drawn from its seed (loading.load_post)\n{quantize}"},
    "why_not": "the direct stack's on-the-fly and pre-quantized loads are the harness's own loader and file layout; "
               "only post-load is written for it",
    "offload": {"none": ("model.to(DEVICE)", ""),
                "model": ('model.to("cpu")\n_, hook = accelerate.cpu_offload_with_hook(model, DEVICE)',
                          "hook.offload()"),
                "sequential": ('model.to("cpu")\naccelerate.cpu_offload(model, execution_device=DEVICE, '
                               "offload_buffers=len(model._parameters) > 0)", ""),
                "group": ("from diffusers.hooks import apply_group_offloading\n\n"
                          "apply_group_offloading(model, {group})", "")},
    "why_not_offload": "balanced offload is SD.Next's algorithm as the harness implements it (harness/offload.py), "
                       "not an upstream API",
}


class DirectStack(Stack):
    name = "direct"

    def files(self, task) -> list[SharedFile]:
        cell, seed = task.cell, task.settings.seed
        dtype = getattr(torch, cell.dtype)
        out = []
        if MODELS[cell.model].shared_weights:  # its float model is loaded from the run's directory
            out.append(SharedFile(loading.float_dir_path(task.workdir, cell.model, seed, dtype),
                                  loading.make_float_dir(cell.model, seed, dtype), source=False))
        if cell.load == "on-the-fly":
            stored = loading.stored_dtype(cell.model, dtype)
            out.append(SharedFile(loading.float_checkpoint_path(task.workdir, cell.model, seed, stored),
                                  loading.make_float_checkpoint(float_model(task, stored))))
        elif cell.load == "prequantized":
            engine = ENGINES[cell.engine]
            out.append(SharedFile(loading.prequantized_path(task.workdir, engine, cell.qtype, cell.model, dtype, seed),
                                  loading.make_prequantized(engine, cell.qtype, cell.model, dtype, seed,
                                                            float_model(task, dtype))))
        return out

    def load(self, task, engine: Engine, source: Path | None) -> loading.Loaded:
        cell = task.cell
        dtype, device = getattr(torch, cell.dtype), devices.torch_device(cell.device)
        if cell.load == "post-load" and MODELS[cell.model].pipeline:
            return loading.load_post_pipeline(engine, cell.qtype, cell.model, cell.components,
                                              float_model(task, dtype), dtype, device, task.settings.seed)
        if cell.load == "post-load":
            return loading.load_post(engine, cell.qtype, float_model(task, dtype), dtype, device)
        if cell.load == "on-the-fly":
            return loading.load_on_the_fly(engine, cell.qtype, cell.model, source, dtype, device)
        return loading.load_prequantized(engine, cell.qtype, cell.model, source, dtype, device)

    def offload(self, model, mode, device, *, components, settings):
        return offload_module(model, mode, device, components=components, settings=settings)


def float_model(task, dtype: torch.dtype):
    """The cell's float model in `dtype`, when called: drawn from its seed, or loaded from the run's float directory
    for a model with shared weights (loading.float_model)."""
    return functools.partial(loading.float_model, task.workdir, task.cell.model, task.settings.seed, dtype)


def offload_module(model: nn.Module, mode: str, device: str, *, components: list[nn.Module] | None = None,
                   settings: Settings | None = None) -> offload.Installed:
    """The direct stack's offload: accelerate's functions on the module itself (diffusers' apply_group_offloading
    for group), on each component of a pipeline in turn; SD.Next's balanced offload."""
    s = settings or Settings()
    execution = devices.torch_device(device)
    if mode == "balanced":
        return offload.balanced(model, device, components, s)
    if mode == "none":
        model.to(execution)
        return offload.Installed()
    parts = offload.pipeline_parts(model)  # a model alone is its one part
    return _offload_parts(list(parts.values()) if parts is not None else [model], mode, execution, s)


def _offload_parts(parts: list[nn.Module], mode: str, execution: torch.device, s: Settings) -> offload.Installed:
    """A pipeline's components (or a model alone) through accelerate's functions, as the pipeline methods call
    them: model offload chains one hook per component in the pipeline's offload order (each moves the one before
    off the device: diffusers' enable_model_cpu_offload), sequential and group offload hook each component."""
    if mode == "model":
        from accelerate import cpu_offload_with_hook

        hooks, hook = [], None
        for part in parts:
            part.to("cpu")
            _, hook = cpu_offload_with_hook(part, execution, prev_module_hook=hook)
            hooks.append(hook)
        return offload.Installed(lambda: [h.offload() for h in hooks] and None)
    for part in parts:
        if mode == "sequential":
            _sequential_offload(part, execution)
        elif mode == "group":
            _group_offload(part, execution, s)
        else:
            raise ValueError(f"unknown offload mode {mode!r}")
    return offload.Installed()


def _group_offload(model: nn.Module, execution: torch.device, s: Settings) -> None:
    from diffusers.hooks import apply_group_offloading

    options = offload.group_options(s, execution)
    options.pop("exclude_modules", None)  # a pipeline's option (its components), not a module's
    apply_group_offloading(model, **options)


def _sequential_offload(model: nn.Module, execution: torch.device) -> None:
    """diffusers' enable_sequential_cpu_offload on the module: weights live off-device, each submodule's arrive per
    forward."""
    from accelerate import cpu_offload

    model.to("cpu")
    cpu_offload(model, execution_device=execution, offload_buffers=len(model._parameters) > 0)
