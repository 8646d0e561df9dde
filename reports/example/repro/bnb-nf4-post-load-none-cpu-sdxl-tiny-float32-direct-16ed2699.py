# Standalone reproduction of the quantmatrix cell bnb-nf4/post-load/none/cpu/sdxl-tiny/float32/direct
# as the harness ran it: engine bnb nf4, load post-load, offload none, device cpu, model sdxl-tiny (diffusers'
# UNet2DConditionModel, seeded random weights), dtype float32, stack direct.
# Recorded (run 20261207-173221-vm, 2026-12-07T17:34:00+00:00, host vm):
#   verdict:   wrong-output
#   expected:  works
#   note:      ran, but its output is not the model's: SQNR -0.0 dB < floor 3 dB (the type's floor: 4-bit codes
#              (about 18 dB by arithmetic, 8-28 dB measured): SQNR 3 dB, image PSNR 14 dB)
# Versions: python 3.11.7, torch 2.13.0+cpu, diffusers 0.42.1, accelerate 1.16.0; os Linux-6.18.44-fc-v1300-x86_64-with-glibc2.36
#   engines: autoround 0.16.1, bnb 0.50.2, gguf 0.19.0, modelopt 0.43.0, nncf 3.4.0, quanto 0.2.7, sdnq 0.2.8, torchao 0.18.0; device cpu: Intel(R) Xeon(R) Processor
# Run it alone: python this_file.py (needs torch, diffusers, accelerate, safetensors, bitsandbytes; its files go to
# a temporary directory it removes; no network). It runs the cell's first steps and checks the output against the
# float model's. Seed 0 and batch 1: the harness's default settings (every shipped matrix runs with them; records do
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
import bitsandbytes as bnb


CELL = 'bnb-nf4/post-load/none/cpu/sdxl-tiny/float32/direct'
MODEL = 'sdxl-tiny'
QTYPE = 'nf4'
SEED = 0
BATCH = 1
WARMUP = 2  # steps the harness runs after the first, before timing
DTYPE = torch.float32
DEVICE = torch.device('cpu')
FLOOR_DB = 3  # the type's SQNR floor


# ---------------------------------------------------------------- the model (quantmatrix's)
# Its shape (harness/models/specs.py MODELS) and diffusers constructor arguments (DIFFUSERS_CONFIGS).
REAL_CLASSES = {'sdxl': 'UNet2DConditionModel'}
MODELS = {'sdxl-tiny': types.SimpleNamespace(kind='sdxl', width=64, depth=1, heads=2, latent=16, channels=4,
                                             context_tokens=16, context_dim=64, levels=2, pooled_dim=64,
                                             shared_weights=False, pipeline=False)}
DIFFUSERS_CONFIGS = {'sdxl-tiny': dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128),
                                       layers_per_block=1, down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
                                       up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), attention_head_dim=(2, 4),
                                       use_linear_projection=True, addition_embed_type='text_time',
                                       addition_time_embed_dim=32, transformer_layers_per_block=(1, 1),
                                       projection_class_embeddings_input_dim=256, cross_attention_dim=64,
                                       norm_num_groups=32)}

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
def replace_linears(model: nn.Module, make) -> nn.Module:
    """Every plain nn.Linear of the model replaced by make(layer) (harness/engines/base.py replace_linears)."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, make(module))
    return model


def quantize_layer(layer: nn.Linear) -> nn.Module:
    """harness/engines/bnb.py quantize_layer: bitsandbytes quantizes when the layer moves to the device."""
    weight = layer.weight.data.to("cpu")
    bias = None if layer.bias is None else nn.Parameter(layer.bias.data.to("cpu"), requires_grad=False)
    q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias is not None, compute_dtype=DTYPE,
                          quant_type='nf4', compress_statistics=False, device="meta")
    q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type='nf4',
                                 compress_statistics=False)
    q.bias = bias
    return q.to(DEVICE)


def quantize(model: nn.Module) -> nn.Module:
    """The engine's own API after load."""
    return replace_linears(model, quantize_layer)  # harness/engines/bnb.py quantize


def check_output(output: torch.Tensor, reference: torch.Tensor) -> None:
    """The output against the float model's, as the harness judges it (harness/run/measure.py output_error; the
    type's SQNR floor from harness/engines/catalog.py): not finite, or below the floor, is the finding."""
    if not bool(torch.isfinite(output).all()):
        raise AssertionError("output not finite: NaN or infinity in the output")
    out, ref = output.detach().double().cpu().flatten(), reference.detach().double().cpu().flatten()
    noise, signal = (out - ref).pow(2).sum().item(), ref.pow(2).sum().item()
    sqnr = None if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else float("-inf"))
    print(f"SQNR against the float model: {'exact' if sqnr is None else f'{sqnr:.1f} dB'} (floor: {FLOOR_DB} dB)")
    if sqnr is not None and FLOOR_DB is not None and sqnr < FLOOR_DB:
        raise AssertionError(f"output below its type's floor: SQNR {sqnr:.1f} dB < {FLOOR_DB} dB (the model's output "
                             "is not what it computes)")


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
    model.to(DEVICE)
    return lambda: None


def main() -> None:
    torch.manual_seed(SEED)  # harness/run/execute.py prepare_cell
    inputs = make_inputs(MODEL, SEED, BATCH, DTYPE, DEVICE)
    with torch.no_grad():  # the float model's output (harness/run/execute.py _reference_file)
        reference = run(build_model(MODEL, SEED, DTYPE).to(DEVICE), inputs)
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
        check_output(output, reference)
    print("ran to the end of the forward step without an error")


if __name__ == "__main__":
    main()
