# Reproduces the quantmatrix cell bnb-nf4/post-load/none/cpu/sdxl-tiny/float32/direct (diffusers'
# UNet2DConditionModel, seeded random weights), recorded in run 20261207-173221-vm (2026-12-07T17:34:00+00:00, host
# vm):
#   verdict:   wrong-output (expected: works)
#   note:      ran, but its output is not the model's: SQNR -0.0 dB < floor 3 dB (the type's floor: 4-bit codes
#              (about 18 dB by arithmetic, 8-28 dB measured): SQNR 3 dB, image PSNR 14 dB)
# Versions: python 3.11.7, torch 2.13.0+cpu, diffusers 0.42.1, accelerate 1.16.0, bitsandbytes 0.50.2; cpu: Intel(R)
# Xeon(R) Processor
# Run: python this_file.py (needs torch, diffusers, accelerate, bitsandbytes; no network; files in a temporary
# directory). It runs the first steps and checks the output against the float model's. Seed 0, batch 1: the
# harness's defaults. Written by quantmatrix, which it does not import.
import math
import types

import accelerate
import diffusers
import torch
from torch import nn

import bitsandbytes as bnb

DTYPE, DEVICE = torch.float32, torch.device('cpu')
SEED, BATCH, WARMUP = 0, 1, 2  # WARMUP: steps after the first, untimed
FLOOR_DB = 3  # the type's SQNR floor (harness/engines/catalog.py)


# diffusers' constructor arguments (harness/models/specs.py DIFFUSERS_CONFIGS['sdxl-tiny'])
CONFIG = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
              down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'), up_block_types=('CrossAttnUpBlock2D',
              'UpBlock2D'), attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type='text_time',
              addition_time_embed_dim=32, transformer_layers_per_block=(1, 1),
              projection_class_embeddings_input_dim=256, cross_attention_dim=64, norm_num_groups=32)
SHAPE = types.SimpleNamespace(channels=4, context_dim=64, context_tokens=16, latent=16, pooled_dim=64)


# harness/models/real.py, copied: the weights drawn in name order from the seed, a step's inputs
def seed_weights(module: nn.Module, seed: int) -> nn.Module:
    gen, drawn = torch.Generator().manual_seed(seed), {}
    for pname, p in sorted(module.named_parameters(remove_duplicate=False)):
        if id(p) not in drawn:
            z = torch.randn(p.shape, generator=gen)
            value = z * 0.02 if pname.endswith("bias") else 1 + 0.1 * z if p.dim() == 1 else z / math.sqrt(p[0].numel())
            drawn[id(p)] = nn.Parameter(value.to(p.dtype), requires_grad=False)
        owner, _, leaf = pname.rpartition(".")
        (module.get_submodule(owner) if owner else module)._parameters[leaf] = drawn[id(p)]
    return module


def build_model(dtype: torch.dtype = DTYPE) -> nn.Module:  # real.build_model
    with accelerate.init_empty_weights():
        model = diffusers.UNet2DConditionModel(**CONFIG)
    return seed_weights(model, SEED).eval()


def sdxl_inputs(spec, batch: int, gen: torch.Generator, config: dict) -> dict[str, torch.Tensor]:
    text, pooled = torch.randn(batch, spec.context_tokens, spec.context_dim, generator=gen), torch.randn(
        batch, spec.pooled_dim, generator=gen)
    size = spec.latent * 8
    return {"sample": torch.randn(batch, spec.channels, spec.latent, spec.latent, generator=gen),
            "timestep": torch.randint(0, 1000, (batch,), generator=gen).float(), "encoder_hidden_states": text,
            "text_embeds": pooled, "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch,
                                                            dtype=torch.float32)}


def make_inputs(seed: int, batch: int, device) -> dict:  # real.make_inputs
    inputs = sdxl_inputs(SHAPE, batch, torch.Generator().manual_seed(seed + 1), CONFIG)
    return {k: (v if k == "timestep" else v.to(DTYPE)).to(device) for k, v in inputs.items()}


ADDED_CONDITIONS = ("text_embeds", "time_ids")


def call_kwargs(inputs: dict[str, torch.Tensor]) -> dict:
    kwargs = {k: v for k, v in inputs.items() if k not in ADDED_CONDITIONS}
    added = {k: inputs[k] for k in ADDED_CONDITIONS if k in inputs}
    if added:
        kwargs["added_cond_kwargs"] = added
    return kwargs


def quantize_layer(layer: nn.Linear) -> nn.Module:  # harness/engines/bnb.py quantize_layer
    bias = None if layer.bias is None else nn.Parameter(layer.bias.data.to("cpu"), requires_grad=False)
    q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias is not None, compute_dtype=DTYPE,
                          quant_type='nf4', compress_statistics=False, device="meta")
    q.weight = bnb.nn.Params4bit(layer.weight.data.to("cpu"), requires_grad=False, quant_type='nf4',
                                 compress_statistics=False)
    q.bias = bias
    return q.to(DEVICE)  # bitsandbytes quantizes here


def check_output(output: torch.Tensor, reference: torch.Tensor) -> None:  # harness/run/measure.py output_error
    assert bool(torch.isfinite(output).all()), "output not finite: NaN or infinity in the output"
    out, ref = output.detach().double().cpu().flatten(), reference.detach().double().cpu().flatten()
    noise, signal = (out - ref).pow(2).sum().item(), ref.pow(2).sum().item()
    sqnr = None if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else float("-inf")
    print(f"SQNR against the float model: {'exact' if sqnr is None else f'{sqnr:.1f} dB'} (floor: {FLOOR_DB} dB)")
    assert sqnr is None or FLOOR_DB is None or sqnr >= FLOOR_DB, \
        f"output below its type's floor: SQNR {sqnr:.1f} dB < {FLOOR_DB} dB (the output is not the model's)"


def main() -> None:
    torch.manual_seed(SEED)  # as the harness seeds a cell
    inputs = make_inputs(SEED, BATCH, DEVICE)
    with torch.no_grad():  # the float model's output, which the cell's is judged against
        reference = build_model().to(DEVICE)(**call_kwargs(inputs), return_dict=False)[0]
    # load (harness/stacks/direct.py load)
    model = build_model()  # drawn from its seed (loading.load_post)
    for name, layer in list(model.named_modules()):  # every plain Linear (harness/engines/base.py replace_linears)
        if type(layer) is nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, quantize_layer(layer))
    model.eval()  # as the harness leaves it (harness/run/execute.py)
    # offload (harness/offload.py)
    model.to(DEVICE)
    # forward: the first step, then the warm-up steps
    with torch.no_grad():
        output = model(**call_kwargs(inputs), return_dict=False)[0]
        for _ in range(WARMUP):
            model(**call_kwargs(inputs), return_dict=False)[0]
    check_output(output, reference)
    print("ran to the end of the forward step without an error")


if __name__ == "__main__":
    main()
