# Standalone reproduction of the quantmatrix cell quanto-qfloat8/prequantized/sequential/cpu/flux-tiny/float32/diffusers
# as the harness ran it: engine quanto qfloat8, load prequantized, offload sequential, device cpu, model flux-tiny
# (diffusers' FluxTransformer2DModel, seeded random weights), dtype float32, stack diffusers.
# Recorded (run 20261202-204800-vm, 2026-12-02T20:49:04+00:00, host vm):
#   verdict:   fail
#   expected:  works
#   stage:     offload (of prepare, load, offload, forward)
#   error:     RuntimeError: Device 'meta' does not have a corresponding module registered as 'torch.meta'.
#   raised in: diffusers.utils.torch_utils
#              innermost frames first: __init__.py:2985 get_device_module <- torch_utils.py:240 __init__ <-
#              torch_utils.py:323 empty_device_cache <- pipeline_utils.py:1347 enable_sequential_cpu_offload
# Versions: python 3.11.7, torch 2.13.0+cpu, diffusers 0.42.1, accelerate 1.16.0; os Linux-6.18.44-fc-v1045-x86_64-with-glibc2.36
#   engines: bnb 0.50.2, gguf 0.19.0, nncf 3.4.0, quanto 0.2.7, sdnq 0.2.8, torchao 0.18.0; device cpu: Intel(R) Xeon(R) Processor
# Run it alone: python this_file.py (needs torch, diffusers, accelerate, safetensors, optimum-quanto; its files go
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
import optimum.quanto


CELL = 'quanto-qfloat8/prequantized/sequential/cpu/flux-tiny/float32/diffusers'
MODEL = 'flux-tiny'
QTYPE = 'qfloat8'
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
    # harness/stacks/diffusers.py make_prequantized: what save_pretrained writes for the model diffusers
    # quantized while loading
    saved = tmp / "prequantized"
    model_class(MODEL).from_pretrained(str(float_dir), torch_dtype=DTYPE,
                               quantization_config=diffusers.QuantoConfig(weights_dtype='float8')).save_pretrained(str(saved))
    return saved


def load(source: Path | None, tmp: Path) -> nn.Module:
    """Load (and quantize) the model (stage: load)."""
    # harness/stacks/diffusers.py load_prequantized: the saved directory loaded back (its config names the engine)
    return model_class(MODEL).from_pretrained(str(source), torch_dtype=DTYPE)


def offload(model: nn.Module):
    """Install the offload mode; returns what to call after each step (stage: offload)."""
    # harness/offload.py offload_pipeline: the pipeline's own method, the model being its one component
    pipe = ComponentPipeline(model)
    pipe.enable_sequential_cpu_offload(device=DEVICE)
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
