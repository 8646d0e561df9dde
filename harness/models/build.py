"""One door to every built-in model, imitation or real diffusers class: build it, make its inputs, run a step.

The rest of the harness asks here, by model name, and never needs to know which kind a model is.
"""

from __future__ import annotations

import torch
from torch import nn

from harness.models import imitation, pipelines, real
from harness.models.specs import MODELS


def _kind(name: str):
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; expected one of {list(MODELS)}")
    return pipelines if MODELS[name].pipeline else real if MODELS[name].real else imitation


def is_pipeline(name: str) -> bool:
    return MODELS[name].pipeline


def build_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The float model on the CPU with seeded weights (bit-identical for a seed), or a model's from the user's disk
    (models/sources.py); a pipeline as a pipelines.PipelineModel."""
    if MODELS[name].source:  # the user's checkpoint: its own weights, whatever the seed
        from harness.models.sources import load_float

        return load_float(name, dtype)
    if is_pipeline(name):
        return pipelines.PipelineModel(pipelines.build_pipeline(name, seed, dtype), name)
    model = _kind(name).build_model(name, seed, dtype)
    model._quantmatrix_name = name
    return model


def build_skeleton(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model with its weights on the meta device: what on-the-fly and pre-quantized loading fill in."""
    if is_pipeline(name) and MODELS[name].source:  # the user's pipeline: from its directory's configs
        from harness.models.sources import skeleton_pipeline

        return pipelines.PipelineModel(skeleton_pipeline(name, dtype), name)
    if is_pipeline(name):
        return pipelines.PipelineModel(pipelines.build_skeleton_pipeline(name, dtype), name)
    model = _kind(name).build_skeleton(name, dtype)
    model._quantmatrix_name = name
    return model


def make_inputs(name: str, seed: int = 0, batch: int = 1, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> dict:
    return _kind(name).make_inputs(name, seed, batch, dtype, device)


def run(model: nn.Module, inputs: dict) -> torch.Tensor | dict[str, torch.Tensor]:
    """One denoising step: the model's output tensor; a pipeline's generation: its latents and image."""
    if isinstance(model, pipelines.PipelineModel) or "latents" in inputs:
        return model(**inputs)
    return real.run(model, inputs)


def call_kwargs(inputs: dict[str, torch.Tensor]) -> dict:
    """The forward's keyword arguments (for engines that trace the model with an example input)."""
    return real.call_kwargs(inputs) if "latents" not in inputs else inputs


def components(name: str, model: nn.Module) -> list[nn.Module]:
    """The units balanced offload moves as a whole: a pipeline's components (the imitation pipeline's top-level
    modules); a denoiser alone is one component."""
    if isinstance(model, pipelines.PipelineModel):
        return list(model.parts().values())
    return imitation.components(model) if MODELS[name].kind == "pipe" else [model]


def example_inputs(model: nn.Module, dtype: torch.dtype, device: torch.device | str = "cpu") -> dict:
    """Forward keyword arguments for a built-in model instance (what engines that trace the model, e.g. NNCF,
    need)."""
    example = getattr(model, "_quantmatrix_example", None)  # a pipeline component's, captured in a real call
    if example is not None:
        return {k: (v.to(device=device, dtype=dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
                for k, v in example.items()}
    name = getattr(model, "_quantmatrix_name", None)
    if name is None:  # an imitation built by imitation.build_model directly: known by its spec
        name = next(n for n, spec in MODELS.items() if spec == getattr(model, "spec", None))
    return call_kwargs(make_inputs(name, dtype=dtype, device=device))
