# Reproduces the quantmatrix cell quanto-qfloat8/post-load/sequential/cpu/flux-tiny/float32/direct (diffusers'
# FluxTransformer2DModel, its own initial weights), recorded in run 20261202-204800-vm (2026-12-02T20:49:00+00:00,
# host vm):
#   verdict:   documented-error (expected: error /WeightQBytesTensor.__new__\(\) missing 6 required positional arguments/)
#   stage:     offload (of prepare, load, offload, forward)
#   error:     TypeError: WeightQBytesTensor.__new__() missing 6 required positional arguments: 'axis', 'size', 'stride', 'data', 'scale', and 'activation_qtype'
#   raised in: accelerate.utils
# Versions: python 3.11.7, torch 2.13.0+cpu, diffusers 0.42.1, accelerate 1.16.0, optimum-quanto 0.2.7; cpu:
# Intel(R) Xeon(R) Processor
# Run: python this_file.py (needs torch, diffusers, accelerate, optimum-quanto; no network; temporary files). It
# should end with the error above, in its offload step. Seed 0, batch 1: the harness's defaults.
import accelerate
import diffusers
import torch
from torch import nn

import optimum.quanto

DTYPE, DEVICE = torch.float32, torch.device('cpu')
SEED, BATCH, WARMUP = 0, 1, 2  # WARMUP: steps after the first, untimed


# diffusers' constructor arguments (harness/models/specs.py DIFFUSERS_CONFIGS['flux-tiny'])
CONFIG = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
              num_attention_heads=4, joint_attention_dim=128, pooled_projection_dim=128, guidance_embeds=False,
              axes_dims_rope=(8, 12, 12))


def build_model(dtype: torch.dtype = DTYPE) -> nn.Module:  # real.build_model; the class's own weights
    return diffusers.FluxTransformer2DModel(**CONFIG).to(dtype).eval()


def main() -> None:
    torch.manual_seed(SEED)  # as the harness seeds a cell
    # load (harness/stacks/direct.py load)
    model = build_model()  # the float model (stacks/direct.py load_post)
    optimum.quanto.quantize(model, weights=optimum.quanto.qfloat8)
    optimum.quanto.freeze(model)
    model.eval()  # as the harness leaves it (harness/run/execute.py)
    # offload (harness/stacks/direct.py offload)
    model.to("cpu")
    accelerate.cpu_offload(model, execution_device=DEVICE, offload_buffers=len(model._parameters) > 0)
    print("ran to the end of the offload step without an error")


if __name__ == "__main__":
    main()
