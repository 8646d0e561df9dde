# Standalone reproduction of the quantmatrix cell modelopt-fp8/on-the-fly/none/cpu/flux-tiny/float32/diffusers
# as the harness ran it: engine modelopt fp8, load on-the-fly, offload none, device cpu, model flux-tiny (diffusers'
# FluxTransformer2DModel, seeded random weights), dtype float32, stack diffusers.
# Recorded (run 20261207-173221-vm, 2026-12-07T17:35:16+00:00, host vm):
#   verdict:   fail
#   expected:  works
#   stage:     forward (of prepare, load, offload, forward)
#   error:     TypeError: linear(): argument 'weight' (position 2) must be Tensor, not FP8QTensor
#   raised in: modelopt.torch.quantization
#              innermost frames first: linear.py:134 forward <- quant_module.py:192 forward <- quant_module.py:240
#              forward <- module.py:1789 _call_impl
# Versions: python 3.11.7, torch 2.13.0+cpu, diffusers 0.42.1, accelerate 1.16.0; os Linux-6.18.44-fc-v1300-x86_64-with-glibc2.36
#   engines: autoround 0.16.1, bnb 0.50.2, gguf 0.19.0, modelopt 0.43.0, nncf 3.4.0, quanto 0.2.7, sdnq 0.2.8, torchao 0.18.0; device cpu: Intel(R) Xeon(R) Processor
# Run it alone: python this_file.py (needs torch, diffusers, accelerate, safetensors, nvidia-modelopt; its files go
# to a temporary directory it removes; no network). It runs up to the forward step, where it should end with the
# error above. Seed 0 and batch 1: the harness's default settings (every shipped matrix runs with them; records do
# not carry them).
# Written by quantmatrix (`quantmatrix repro`, or its report); it imports nothing of quantmatrix.


from __future__ import annotations

import math
import tempfile
import types
from pathlib import Path

import torch
from torch import nn

import accelerate  # noqa: F401 - the model's skeleton and the offload hooks
import diffusers
import copy

import modelopt.torch.quantization as mtq


CELL = 'modelopt-fp8/on-the-fly/none/cpu/flux-tiny/float32/diffusers'
MODEL = 'flux-tiny'
QTYPE = 'fp8'
SEED = 0
BATCH = 1
WARMUP = 2  # steps the harness runs after the first, before timing
DTYPE = torch.float32
DEVICE = torch.device('cpu')


# ---------------------------------------------------------------- the model (quantmatrix's)
# Its shape (harness/models/specs.py MODELS) and diffusers constructor arguments (DIFFUSERS_CONFIGS).
REAL_CLASSES = {'flux': 'FluxTransformer2DModel'}
MODELS = {'flux-tiny': types.SimpleNamespace(kind='flux', width=128, depth=2, heads=4, latent=16, channels=16,
                                             context_tokens=16, context_dim=128, levels=2, pooled_dim=128,
                                             shared_weights=False, pipeline=False)}
DIFFUSERS_CONFIGS = {'flux-tiny': dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                       attention_head_dim=32, num_attention_heads=4, joint_attention_dim=128,
                                       pooled_projection_dim=128, guidance_embeds=False, axes_dims_rope=(8, 12, 12))}

# Copied from harness/models/real.py: the skeleton, the seeded weights (drawn parameter by parameter in name
# order: bit-identical to the harness's for the seed) and one denoising step's inputs.

def model_class(name: str) -> type[nn.Module]:
    import diffusers

    return getattr(diffusers, REAL_CLASSES[MODELS[name].kind])


def build_skeleton(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_class(name)(**DIFFUSERS_CONFIGS[name])
    return to_dtype(model, dtype).eval()


def seed_weights(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    drawn: dict[int, nn.Parameter] = {}
    for pname, p in sorted(module.named_parameters(remove_duplicate=False)):
        if id(p) not in drawn:
            if pname.endswith("bias"):
                value = torch.randn(p.shape, generator=gen) * 0.02
            elif p.dim() == 1:
                value = 1 + 0.1 * torch.randn(p.shape, generator=gen)
            else:
                value = torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel())
            drawn[id(p)] = nn.Parameter(value.to(p.dtype), requires_grad=False)
        owner, _, leaf = pname.rpartition(".")
        (module.get_submodule(owner) if owner else module)._parameters[leaf] = drawn[id(p)]
    return module


def build_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = seed_weights(build_skeleton(name, torch.float32), seed)
    return to_dtype(model, dtype).eval()


def to_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    computed = {(owner, name): buffer for owner in module.modules() for name, buffer in owner._buffers.items()
                if name in owner._non_persistent_buffers_set and buffer is not None}
    keep = getattr(type(module), "_keep_in_fp32_modules", None) if type(module).__module__.startswith(
        "diffusers.") and dtype.is_floating_point else None
    kept = {p: p.data.to(torch.float32) for name, p in module.named_parameters()
            if keep and any(part in keep for part in name.split("."))}
    module = nn.Module.to(module, dtype)
    for (owner, name), buffer in computed.items():  # made by the constructor, never loaded: as it made them
        owner._buffers[name] = buffer
    for param, data in kept.items():
        param.data = data
    return module


def make_inputs(name: str, seed: int = 0, batch: int = 1, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    spec = MODELS[name]
    gen = torch.Generator().manual_seed(seed + 1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    text = randn(batch, spec.context_tokens, spec.context_dim)
    pooled = randn(batch, spec.pooled_dim)
    if spec.kind == "flux":  # packed 2x2 latent patches; positions as the pipeline's image ids
        h = w = spec.latent // 2
        ids = torch.zeros(h, w, 3)
        ids[..., 1] += torch.arange(h)[:, None]
        ids[..., 2] += torch.arange(w)[None, :]
        inputs = {"hidden_states": randn(batch, h * w, spec.channels * 4), "encoder_hidden_states": text,
                  "pooled_projections": pooled, "timestep": torch.rand(batch, generator=gen),
                  "img_ids": ids.reshape(h * w, 3), "txt_ids": torch.zeros(spec.context_tokens, 3)}
        if DIFFUSERS_CONFIGS[name].get("guidance_embeds"):
            inputs["guidance"] = torch.full((batch,), 3.5)
    elif spec.kind == "sd3":
        inputs = {"hidden_states": randn(batch, spec.channels, spec.latent, spec.latent),
                  "encoder_hidden_states": text, "pooled_projections": pooled,
                  "timestep": torch.randint(0, 1000, (batch,), generator=gen).float()}
    else:  # sdxl: the pipeline's micro-conditioning (original size, crop, target size) in pixels
        size = spec.latent * 8
        inputs = {"sample": randn(batch, spec.channels, spec.latent, spec.latent),
                  "timestep": torch.randint(0, 1000, (batch,), generator=gen).float(),
                  "encoder_hidden_states": text, "text_embeds": pooled,
                  "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32)}
    return {k: (v if k == "timestep" else v.to(dtype)).to(device) for k, v in inputs.items()}


ADDED_CONDITIONS = ("text_embeds", "time_ids")


def call_kwargs(inputs: dict[str, torch.Tensor]) -> dict:
    kwargs = {k: v for k, v in inputs.items() if k not in ADDED_CONDITIONS}
    added = {k: inputs[k] for k in ADDED_CONDITIONS if k in inputs}
    if added:
        kwargs["added_cond_kwargs"] = added
    return kwargs


def run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**call_kwargs(inputs), return_dict=False)[0]


# ---------------------------------------------------------------- the cell's steps
class ComponentPipeline(diffusers.DiffusionPipeline):
    """The smallest pipeline: the model as its one component, so that diffusers' own offload methods run on it
    (harness/offload.py component_pipeline: what the diffusers stack offloads a model alone with)."""

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.register_modules(transformer=transformer)


def prepare(tmp: Path) -> Path | None:
    """The files the load reads, made as the harness makes them once per run (stage: prepare)."""
    float_dir = tmp / "float"  # harness/stacks/loading.py make_float_dir: the float32 model, save_pretrained
    build_model(MODEL, SEED, torch.float32).save_pretrained(str(float_dir))
    return float_dir


def load(source: Path | None, tmp: Path) -> nn.Module:
    """Load (and quantize) the model (stage: load)."""
    # harness/stacks/diffusers.py load_on_the_fly: diffusers quantizes while loading
    return model_class(MODEL).from_pretrained(str(source), torch_dtype=DTYPE, quantization_config=diffusers.NVIDIAModelOptConfig(quant_method="modelopt", quant_type='FP8', modules_to_not_convert=[]))


def offload(model: nn.Module):
    """Install the offload mode; returns what to call after each step (stage: offload)."""
    # harness/offload.py offload_pipeline: the pipeline's own method, the model being its one component
    pipe = ComponentPipeline(model)
    pipe.to(DEVICE)
    return lambda: None


def main() -> None:
    torch.manual_seed(SEED)  # harness/run/execute.py prepare_cell
    inputs = make_inputs(MODEL, SEED, BATCH, DTYPE, DEVICE)
    with tempfile.TemporaryDirectory(prefix="quantmatrix-repro-") as name:
        tmp = Path(name)
        print("prepare", flush=True)
        source = prepare(tmp)
        print("load", flush=True)
        model = load(source, tmp).eval()
        print("offload", flush=True)
        after_step = offload(model)
        print("forward", flush=True)
        with torch.no_grad():  # the first step, then the warm-up steps (harness/run/execute.py)
            output = run(model, inputs)
            after_step()
            for _ in range(WARMUP):
                run(model, inputs)
                after_step()
    print("ran to the end of the forward step without an error")


if __name__ == "__main__":
    main()
