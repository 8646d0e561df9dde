"""diffusers' own model classes (FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel), built from
configs with seeded random weights, nothing from a hub; and their inputs, shaped as their pipelines feed them.

These are the models both stacks run on: the `diffusers` stack loads them through diffusers' quantizer
integrations, the `direct` stack hands the same module to the engine's own API.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from harness.models.specs import DIFFUSERS_CONFIGS, MODELS, REAL_CLASSES


def model_class(name: str) -> type[nn.Module]:
    import diffusers

    return getattr(diffusers, REAL_CLASSES[MODELS[name].kind])


def build_skeleton(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model with its parameters on the meta device (buffers, which the config computes, stay real)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_class(name)(**DIFFUSERS_CONFIGS[name])
    return to_dtype(model, dtype).eval()


def seed_weights(module: nn.Module, seed: int) -> nn.Module:
    """Seeded weights, drawn parameter by parameter in name order (bit-identical for a seed, whatever torch's
    default initialisers do): small biases, norm scales near 1, fan-in scaled normals. Tied parameters (T5's
    shared embedding) are drawn once and stay tied."""
    gen, drawn = torch.Generator().manual_seed(seed), {}
    for pname, p in sorted(module.named_parameters(remove_duplicate=False)):
        if id(p) not in drawn:
            z = torch.randn(p.shape, generator=gen)
            value = z * 0.02 if pname.endswith("bias") else 1 + 0.1 * z if p.dim() == 1 else z / math.sqrt(p[0].numel())
            drawn[id(p)] = nn.Parameter(value.to(p.dtype), requires_grad=False)
        owner, _, leaf = pname.rpartition(".")
        (module.get_submodule(owner) if owner else module)._parameters[leaf] = drawn[id(p)]
    return module


def build_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model from its skeleton with seeded weights (seed_weights)."""
    model = seed_weights(build_skeleton(name, torch.float32), seed)
    return to_dtype(model, dtype).eval()


def to_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module` in `dtype` as from_pretrained leaves it, so a model built here stores and computes what the same
    model loaded does: the buffers its constructor computes and no file holds keep the dtype the constructor gives
    them (_constructed_dtypes: a rotary embedding's inv_freq float32, Gemma's embed_scale the model's), and the
    parameters of a diffusers class's `_keep_in_fp32_modules` (Wan's time embedder and norms) stay in float32
    (model_loading_utils load_model_dict_into_meta). nn.Module.to casts: ModelMixin.to would warn about those
    modules."""
    computed = {(f"{prefix}.{name}".lstrip("."), owner, name): buffer for prefix, owner in module.named_modules()
                for name, buffer in owner._buffers.items()
                if name in owner._non_persistent_buffers_set and buffer is not None}
    keep = getattr(type(module), "_keep_in_fp32_modules", None) if type(module).__module__.startswith(
        "diffusers.") and dtype.is_floating_point else None
    kept = {p: p.data.to(torch.float32) for name, p in module.named_parameters()
            if keep and any(part in keep for part in name.split("."))}
    made = _constructed_dtypes(module, dtype) if computed else {}
    module = nn.Module.to(module, dtype)
    for (qualified, owner, name), buffer in computed.items():  # made by the constructor, never loaded
        owner._buffers[name] = buffer.to(made[qualified]) if qualified in made else buffer
    for param, data in kept.items():
        param.data = data
    return module


def _constructed_dtypes(module: nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtypes a transformers model's constructor gives its buffers when from_pretrained makes it in `dtype`:
    it constructs under torch's default dtype set to `dtype`, so a buffer made from a Python number takes it and one
    made in float32 on purpose keeps float32. Read from a twin constructed so on the meta device; {} for another
    kind of module (diffusers constructs in float32 and loads into it)."""
    if not type(module).__module__.startswith("transformers.") or not hasattr(module, "config") or not (
            dtype.is_floating_point) or dtype == torch.get_default_dtype():  # built so already: nothing to read
        return {}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            twin = type(module)(module.config)
    finally:
        torch.set_default_dtype(previous)
    return {name: b.dtype for name, b in twin.named_buffers() if b.is_floating_point()}


def make_inputs(name: str, seed: int = 0, batch: int = 1, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """One denoising step's inputs as the model's pipeline passes them (flat: `call_kwargs` nests SDXL's added
    conditions), drawn by the kind's function below from one generator."""
    spec = MODELS[name]
    inputs = INPUTS[spec.kind](spec, batch, torch.Generator().manual_seed(seed + 1), DIFFUSERS_CONFIGS[name])
    return {k: (v if k == "timestep" else v.to(dtype)).to(device) for k, v in inputs.items()}


def flux_inputs(spec, batch: int, gen: torch.Generator, config: dict) -> dict[str, torch.Tensor]:
    """Packed 2x2 latent patches; positions as the pipeline's image ids."""
    text, pooled = torch.randn(batch, spec.context_tokens, spec.context_dim, generator=gen), torch.randn(
        batch, spec.pooled_dim, generator=gen)
    h, rows = spec.latent // 2, torch.arange(spec.latent // 2, dtype=torch.float32)
    ids = torch.stack([torch.zeros(h, h), *torch.meshgrid(rows, rows, indexing="ij")], -1).reshape(h * h, 3)
    return {"hidden_states": torch.randn(batch, h * h, spec.channels * 4, generator=gen),
            "encoder_hidden_states": text, "pooled_projections": pooled, "timestep": torch.rand(batch, generator=gen),
            "img_ids": ids, "txt_ids": torch.zeros(spec.context_tokens, 3),
            **({"guidance": torch.full((batch,), 3.5)} if config.get("guidance_embeds") else {})}


def sd3_inputs(spec, batch: int, gen: torch.Generator, config: dict) -> dict[str, torch.Tensor]:
    text, pooled = torch.randn(batch, spec.context_tokens, spec.context_dim, generator=gen), torch.randn(
        batch, spec.pooled_dim, generator=gen)
    return {"hidden_states": torch.randn(batch, spec.channels, spec.latent, spec.latent, generator=gen),
            "encoder_hidden_states": text, "pooled_projections": pooled,
            "timestep": torch.randint(0, 1000, (batch,), generator=gen).float()}


def sdxl_inputs(spec, batch: int, gen: torch.Generator, config: dict) -> dict[str, torch.Tensor]:
    """The pipeline's micro-conditioning (original size, crop, target size) in pixels."""
    text, pooled = torch.randn(batch, spec.context_tokens, spec.context_dim, generator=gen), torch.randn(
        batch, spec.pooled_dim, generator=gen)
    size = spec.latent * 8
    return {"sample": torch.randn(batch, spec.channels, spec.latent, spec.latent, generator=gen),
            "timestep": torch.randint(0, 1000, (batch,), generator=gen).float(), "encoder_hidden_states": text,
            "text_embeds": pooled, "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch,
                                                            dtype=torch.float32)}


INPUTS = {"flux": flux_inputs, "sd3": sd3_inputs, "sdxl": sdxl_inputs}


ADDED_CONDITIONS = ("text_embeds", "time_ids")


def call_kwargs(inputs: dict[str, torch.Tensor]) -> dict:
    """The keyword arguments of the model's forward: SDXL's added conditions nested as its UNet takes them."""
    kwargs = {k: v for k, v in inputs.items() if k not in ADDED_CONDITIONS}
    added = {k: inputs[k] for k in ADDED_CONDITIONS if k in inputs}
    if added:
        kwargs["added_cond_kwargs"] = added
    return kwargs


def run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**call_kwargs(inputs), return_dict=False)[0]


