# Reproduces the quantmatrix cell quanto-qfloat8/prequantized/sequential/cpu/flux-tiny/float32/diffusers (diffusers'
# FluxTransformer2DModel, its own initial weights), recorded in run 20261202-204800-vm (2026-12-02T20:49:04+00:00,
# host vm):
#   verdict:   fail (expected: works)
#   stage:     offload (of prepare, load, offload, forward)
#   error:     RuntimeError: Device 'meta' does not have a corresponding module registered as 'torch.meta'.
#   raised in: diffusers.utils.torch_utils
# Versions: python 3.11.7, torch 2.13.0+cpu, diffusers 0.42.1, accelerate 1.16.0, optimum-quanto 0.2.7; cpu:
# Intel(R) Xeon(R) Processor
# Run: python this_file.py (needs torch, diffusers, accelerate, safetensors, optimum-quanto; no network; temporary
# files). It should end with the error above, in its offload step. Seed 0, batch 1: the harness's defaults.
import tempfile
from pathlib import Path

import diffusers
import torch
from torch import nn

DTYPE, DEVICE = torch.float32, torch.device('cpu')
SEED, BATCH, WARMUP = 0, 1, 2  # WARMUP: steps after the first, untimed


# diffusers' constructor arguments (harness/models/specs.py DIFFUSERS_CONFIGS['flux-tiny'])
CONFIG = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
              num_attention_heads=4, joint_attention_dim=128, pooled_projection_dim=128, guidance_embeds=False,
              axes_dims_rope=(8, 12, 12))


def build_model(dtype: torch.dtype = DTYPE) -> nn.Module:  # real.build_model; the class's own weights
    return diffusers.FluxTransformer2DModel(**CONFIG).to(dtype).eval()


class ComponentPipeline(diffusers.DiffusionPipeline):
    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.register_modules(transformer=transformer)


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
                quantization_config=diffusers.QuantoConfig(weights_dtype='float8')).save_pretrained(str(saved))
        # load (harness/stacks/diffusers.py load)
        model = diffusers.FluxTransformer2DModel.from_pretrained(str(saved), torch_dtype=DTYPE)
        model.eval()  # as the harness leaves it (harness/run/execute.py)
        # offload (harness/stacks/diffusers.py offload)
        pipe = ComponentPipeline(model)
        pipe.enable_sequential_cpu_offload(device=DEVICE)
    print("ran to the end of the offload step without an error")


if __name__ == "__main__":
    main()
