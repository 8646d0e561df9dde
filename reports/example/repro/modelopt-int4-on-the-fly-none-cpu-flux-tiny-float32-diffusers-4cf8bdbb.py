# Reproduces the quantmatrix cell modelopt-int4/on-the-fly/none/cpu/flux-tiny/float32/diffusers (diffusers'
# FluxTransformer2DModel, seeded random weights), recorded in run 20261207-173221-vm (2026-12-07T17:35:08+00:00,
# host vm):
#   verdict:   fail (expected: works)
#   stage:     load (of prepare, load, offload, forward)
#   error:     TypeError: '<' not supported between instances of 'str' and 'int'
#   raised in: diffusers.models.modeling_utils
# Versions: python 3.11.7, torch 2.13.0+cpu, diffusers 0.42.1, accelerate 1.16.0, nvidia-modelopt 0.43.0; cpu:
# Intel(R) Xeon(R) Processor
# Run: python this_file.py (needs torch, diffusers, accelerate, safetensors, nvidia-modelopt; no network; files in a
# temporary directory). It should end with the error above, in its load step. Seed 0, batch 1: the harness's
# defaults. Written by quantmatrix, which it does not import.
import math
import tempfile
from pathlib import Path

import accelerate
import diffusers
import torch
from torch import nn

import modelopt.torch.quantization as mtq

DTYPE, DEVICE = torch.float32, torch.device('cpu')
SEED, BATCH, WARMUP = 0, 1, 2  # WARMUP: steps after the first, untimed


# diffusers' constructor arguments (harness/models/specs.py DIFFUSERS_CONFIGS['flux-tiny'])
CONFIG = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
              num_attention_heads=4, joint_attention_dim=128, pooled_projection_dim=128, guidance_embeds=False,
              axes_dims_rope=(8, 12, 12))


# harness/models/real.py, copied: the weights drawn in name order from the seed
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
        model = diffusers.FluxTransformer2DModel(**CONFIG)
    return seed_weights(model, SEED).eval()


QUANT_CFG = {'quant_cfg': {'*weight_quantizer': {'num_bits': 4, 'block_sizes': {-1: 128}, 'fake_quant': False},
    '*input_quantizer': {'enable': False}, '*output_quantizer': {'enable': False}, '*conv*': {'enable': False},
    '*patch_embed*': {'enable': False}, 'default': {'enable': False}},
    'algorithm': 'max'}  # harness/engines/modelopt_engine.py quant_config('int4')


def main() -> None:
    torch.manual_seed(SEED)  # as the harness seeds a cell
    with tempfile.TemporaryDirectory(prefix="quantmatrix-repro-") as name:
        tmp = Path(name)
        # prepare: the files the load reads, made as the harness makes them (harness/stacks/diffusers.py files)
        float_dir = tmp / "float"  # the float32 model as save_pretrained writes it (loading.make_float_dir)
        build_model(torch.float32).save_pretrained(str(float_dir))
        # load (harness/stacks/diffusers.py load)
        model = diffusers.FluxTransformer2DModel.from_pretrained(
            str(float_dir), torch_dtype=DTYPE,
                quantization_config=diffusers.NVIDIAModelOptConfig(quant_method="modelopt", quant_type='INT4',
                block_quantize=128, channel_quantize=-1, modules_to_not_convert=['conv', 'patch_embed']))
        model.eval()  # as the harness leaves it (harness/run/execute.py)
    print("ran to the end of the load step without an error")


if __name__ == "__main__":
    main()
