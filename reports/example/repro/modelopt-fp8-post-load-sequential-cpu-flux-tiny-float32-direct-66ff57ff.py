# Standalone reproduction of the quantmatrix cell modelopt-fp8/post-load/sequential/cpu/flux-tiny/float32/direct
# as the harness ran it: engine modelopt fp8, load post-load, offload sequential, device cpu, model flux-tiny
# (diffusers' FluxTransformer2DModel, seeded random weights), dtype float32, stack direct.
# Recorded (run 20261207-173221-vm, 2026-12-07T17:35:04+00:00, host vm):
#   verdict:   fail
#   expected:  works
#   stage:     offload (of prepare, load, offload, forward)
#   error:     RuntimeError: Attempted to call `variable.set_data(tensor)`, but `variable` and `tensor` have incompatible tensor type.
#   raised in: modelopt.torch.quantization
#              innermost frames first: base_qtensor.py:118 to <- modeling.py:334 set_module_tensor_to_device <-
#              hooks.py:326 init_hook <- hooks.py:176 add_hook_to_module
# Versions: python 3.11.7, torch 2.13.0+cpu, diffusers 0.42.1, accelerate 1.16.0; os Linux-6.18.44-fc-v1300-x86_64-with-glibc2.36
#   engines: autoround 0.16.1, bnb 0.50.2, gguf 0.19.0, modelopt 0.43.0, nncf 3.4.0, quanto 0.2.7, sdnq 0.2.8, torchao 0.18.0; device cpu: Intel(R) Xeon(R) Processor
# Run it alone: python this_file.py (needs torch, diffusers, accelerate, safetensors, nvidia-modelopt; its files go
# to a temporary directory it removes; no network). It runs up to the offload step, where it should end with the
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


CELL = 'modelopt-fp8/post-load/sequential/cpu/flux-tiny/float32/direct'
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
# order: bit-identical to the harness's for the seed).

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


# ---------------------------------------------------------------- the cell's steps
SDNEXT = {
    "int8": {"quant_type": "INT8", "modules_to_not_convert": []},
    "int4": {"quant_type": "INT4", "block_quantize": 128, "channel_quantize": -1,
             "modules_to_not_convert": ["conv", "patch_embed"]},
    "fp8": {"quant_type": "FP8", "modules_to_not_convert": []},
    "nf4": {"quant_type": "NF4", "block_quantize": 128, "channel_quantize": -1, "scale_block_quantize": 8,
            "scale_channel_quantize": -1, "modules_to_not_convert": ["conv"]},
    "nvfp4": {"quant_type": "NVFP4", "block_quantize": 128, "channel_quantize": -1,
              "modules_to_not_convert": ["conv"]},
}


WEIGHTS = {
    "int8": {"num_bits": 8},
    "int4": {"num_bits": 4, "block_sizes": {-1: 128}},
    "fp8": {"num_bits": (4, 3)},
    "nf4": {"num_bits": 4, "block_sizes": {-1: 128, "scale_bits": 8, "scale_block_sizes": {-1: 8}}},
    "nvfp4": {"num_bits": (2, 1), "block_sizes": {-1: 128}},
}


def quant_config(qtype: str) -> dict:
    """modelopt's quantize config: weight-only (activations stay float, as in SD.Next's), every other quantizer
    off, max calibration (the weights' own ranges: no calibration data)."""
    skipped = {f"*{name}*": {"enable": False} for name in SDNEXT[qtype]["modules_to_not_convert"]}
    return {"quant_cfg": {"*weight_quantizer": {**copy.deepcopy(WEIGHTS[qtype]), "fake_quant": False},
                          "*input_quantizer": {"enable": False}, "*output_quantizer": {"enable": False},
                          **skipped, "default": {"enable": False}},
            "algorithm": "max"}

def quantize(model: nn.Module) -> nn.Module:
    """The engine's own API after load."""
    # harness/engines/modelopt_engine.py quantize: weight-only, max calibration, then real-quantized modules
    mtq.quantize(model, quant_config(QTYPE), forward_loop=None)
    mtq.compress(model)
    return model


def prepare(tmp: Path) -> Path | None:
    """The files the load reads, made as the harness makes them once per run (stage: prepare)."""
    return None  # drawn in memory: no file


def load(source: Path | None, tmp: Path) -> nn.Module:
    """Load (and quantize) the model (stage: load)."""
    # harness/stacks/loading.py load_post: the float model drawn from its seed, then the engine's API
    return quantize(build_model(MODEL, SEED, DTYPE))


def offload(model: nn.Module):
    """Install the offload mode; returns what to call after each step (stage: offload)."""
    # harness/offload.py offload_module: accelerate's functions on the module itself
    model.to("cpu")
    accelerate.cpu_offload(model, execution_device=DEVICE, offload_buffers=len(model._parameters) > 0)
    return lambda: None


def main() -> None:
    torch.manual_seed(SEED)  # harness/run/execute.py prepare_cell
    with tempfile.TemporaryDirectory(prefix="quantmatrix-repro-") as name:
        tmp = Path(name)
        print("prepare", flush=True)
        source = prepare(tmp)
        print("load", flush=True)
        model = load(source, tmp).eval()
        print("offload", flush=True)
        after_step = offload(model)
    print("ran to the end of the offload step without an error")


if __name__ == "__main__":
    main()
