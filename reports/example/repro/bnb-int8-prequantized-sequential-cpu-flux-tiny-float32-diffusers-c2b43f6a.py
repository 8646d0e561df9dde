# Reproduces the quantmatrix cell bnb-int8/prequantized/sequential/cpu/flux-tiny/float32/diffusers (diffusers'
# FluxTransformer2DModel, its own initial weights), recorded in run 20261202-204800-vm (2026-12-02T20:48:56+00:00,
# host vm):
#   verdict:   documented-error (expected: error /TypeError: new\(\) received an invalid combination of arguments - got \(Tensor, requires_grad=bool\)|RuntimeError: No GPU found/)
#   stage:     prepare (of prepare, load, offload, forward)
#   error:     RuntimeError: No GPU found. A GPU is needed for quantization.
#   raised in: diffusers.quantizers.bitsandbytes
# Versions: python 3.11.7, torch 2.13.0+cpu, diffusers 0.42.1, accelerate 1.16.0, bitsandbytes 0.50.2; cpu: Intel(R)
# Xeon(R) Processor
# Run: python this_file.py (needs torch, diffusers, accelerate, safetensors, bitsandbytes; no network; temporary
# files). It should end with the error above, in its prepare step. Seed 0, batch 1: the harness's defaults.
import tempfile
from pathlib import Path

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


def build_model(dtype: torch.dtype = DTYPE) -> nn.Module:  # real.build_model; the class's own weights
    return diffusers.FluxTransformer2DModel(**CONFIG).to(dtype).eval()


def quantize_layer(layer: nn.Linear) -> nn.Module:  # harness/engines/bnb.py quantize_layer
    bias = None if layer.bias is None else nn.Parameter(layer.bias.data.to("cpu"), requires_grad=False)
    q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias is not None, has_fp16_weights=False,
                            device="meta")
    q.weight = bnb.nn.Int8Params(layer.weight.data.to("cpu"), requires_grad=False, has_fp16_weights=False)
    q.bias = bias
    return q.to(DEVICE)  # bitsandbytes quantizes here


def main() -> None:
    torch.manual_seed(SEED)  # as the harness seeds a cell
    with tempfile.TemporaryDirectory(prefix="quantmatrix-repro-") as name:
        tmp = Path(name)
        # prepare: the files the load reads, made as the harness makes them (harness/stacks/diffusers.py files)
        float_dir = tmp / "float"  # the float32 model as save_pretrained writes it (loading.make_float_dir)
        build_model(torch.float32).save_pretrained(str(float_dir))
        saved = tmp / "prequantized"  # what save_pretrained writes of the model quantized while loading
        diffusers.FluxTransformer2DModel.from_pretrained(
            str(float_dir), torch_dtype=DTYPE,
                quantization_config=diffusers.BitsAndBytesConfig(load_in_8bit=True)).save_pretrained(str(saved))
    print("ran to the end of the prepare step without an error")


if __name__ == "__main__":
    main()
