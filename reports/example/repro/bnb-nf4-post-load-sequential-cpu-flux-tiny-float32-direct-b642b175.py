# Reproduces the quantmatrix cell bnb-nf4/post-load/sequential/cpu/flux-tiny/float32/direct (diffusers'
# FluxTransformer2DModel, its own initial weights), recorded in run 20261202-204800-vm (2026-12-02T20:48:54+00:00,
# host vm):
#   verdict:   fail (expected: works)
#   stage:     forward (of prepare, load, offload, forward)
#   error:     NotImplementedError: Cannot copy out of meta tensor; no data!
#   raised in: bitsandbytes
# Versions: python 3.11.7, torch 2.13.0+cpu, diffusers 0.42.1, accelerate 1.16.0, bitsandbytes 0.50.2; cpu: Intel(R)
# Xeon(R) Processor
# Run: python this_file.py (needs torch, diffusers, accelerate, bitsandbytes; no network; temporary files). It
# should end with the error above, in its forward step. Seed 0, batch 1: the harness's defaults.
import types

import accelerate
import diffusers
import torch
from torch import nn

import bitsandbytes as bnb

DTYPE, DEVICE = torch.float32, torch.device('cpu')
SEED, BATCH, WARMUP = 0, 1, 2  # WARMUP: steps after the first, untimed


# diffusers' constructor arguments (harness/models/specs.py DIFFUSERS_CONFIGS['flux-tiny'])
CONFIG = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
              num_attention_heads=4, joint_attention_dim=128, pooled_projection_dim=128, guidance_embeds=False,
              axes_dims_rope=(8, 12, 12))
SHAPE = types.SimpleNamespace(channels=16, context_dim=128, context_tokens=16, latent=16, pooled_dim=128)


def build_model(dtype: torch.dtype = DTYPE) -> nn.Module:  # real.build_model; the class's own weights
    return diffusers.FluxTransformer2DModel(**CONFIG).to(dtype).eval()


# harness/models/real.py, copied: a step's inputs
def flux_inputs(spec, batch: int, gen: torch.Generator, config: dict) -> dict[str, torch.Tensor]:
    text, pooled = torch.randn(batch, spec.context_tokens, spec.context_dim, generator=gen), torch.randn(
        batch, spec.pooled_dim, generator=gen)
    h, rows = spec.latent // 2, torch.arange(spec.latent // 2, dtype=torch.float32)
    ids = torch.stack([torch.zeros(h, h), *torch.meshgrid(rows, rows, indexing="ij")], -1).reshape(h * h, 3)
    return {"hidden_states": torch.randn(batch, h * h, spec.channels * 4, generator=gen),
            "encoder_hidden_states": text, "pooled_projections": pooled, "timestep": torch.rand(batch, generator=gen),
            "img_ids": ids, "txt_ids": torch.zeros(spec.context_tokens, 3),
            **({"guidance": torch.full((batch,), 3.5)} if config.get("guidance_embeds") else {})}


def make_inputs(seed: int, batch: int, device) -> dict:  # real.make_inputs
    inputs = flux_inputs(SHAPE, batch, torch.Generator().manual_seed(seed + 1), CONFIG)
    return {k: (v if k == "timestep" else v.to(DTYPE)).to(device) for k, v in inputs.items()}


def quantize_layer(layer: nn.Linear) -> nn.Module:  # harness/engines/bnb.py quantize_layer
    bias = None if layer.bias is None else nn.Parameter(layer.bias.data.to("cpu"), requires_grad=False)
    q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias is not None, compute_dtype=DTYPE,
                          quant_type='nf4', compress_statistics=False, device="meta")
    q.weight = bnb.nn.Params4bit(layer.weight.data.to("cpu"), requires_grad=False, quant_type='nf4',
                                 compress_statistics=False)
    q.bias = bias
    return q.to(DEVICE)  # bitsandbytes quantizes here


def main() -> None:
    torch.manual_seed(SEED)  # as the harness seeds a cell
    inputs = make_inputs(SEED, BATCH, DEVICE)
    # load (harness/stacks/direct.py load)
    model = build_model()  # the float model (stacks/direct.py load_post)
    for name, layer in list(model.named_modules()):  # every plain Linear (harness/engines/base.py replace_linears)
        if type(layer) is nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, quantize_layer(layer))
    model.eval()  # as the harness leaves it (harness/run/execute.py)
    # offload (harness/stacks/direct.py offload)
    model.to("cpu")
    accelerate.cpu_offload(model, execution_device=DEVICE, offload_buffers=len(model._parameters) > 0)
    # forward: the first step, then the warm-up steps
    with torch.no_grad():
        for _ in range(1 + WARMUP):
            model(**inputs, return_dict=False)[0]
    print("ran to the end of the forward step without an error")


if __name__ == "__main__":
    main()
