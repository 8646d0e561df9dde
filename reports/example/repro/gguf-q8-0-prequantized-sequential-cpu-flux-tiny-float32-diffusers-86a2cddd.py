# Reproduces the quantmatrix cell gguf-Q8_0/prequantized/sequential/cpu/flux-tiny/float32/diffusers (diffusers'
# FluxTransformer2DModel, its own initial weights), recorded in run 20261202-204800-vm (2026-12-02T20:48:56+00:00,
# host vm):
#   verdict:   documented-error (expected: error /KeyError: None/)
#   stage:     offload (of prepare, load, offload, forward)
#   error:     KeyError: None
#   raised in: diffusers.quantizers.gguf
# Versions: python 3.11.7, torch 2.13.0+cpu, diffusers 0.42.1, accelerate 1.16.0, gguf 0.19.0; cpu: Intel(R) Xeon(R)
# Processor
# Run: python this_file.py (needs torch, diffusers, accelerate, safetensors, gguf, numpy; no network; temporary
# files). It should end with the error above, in its offload step. Seed 0, batch 1: the harness's defaults.
import tempfile
from pathlib import Path

import diffusers
import torch
from torch import nn

import gguf
import numpy as np

DTYPE, DEVICE = torch.float32, torch.device('cpu')
SEED, BATCH, WARMUP = 0, 1, 2  # WARMUP: steps after the first, untimed


# diffusers' constructor arguments (harness/models/specs.py DIFFUSERS_CONFIGS['flux-tiny'])
CONFIG = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
              num_attention_heads=4, joint_attention_dim=128, pooled_projection_dim=128, guidance_embeds=False,
              axes_dims_rope=(8, 12, 12))


def build_model(dtype: torch.dtype = DTYPE) -> nn.Module:  # real.build_model; the class's own weights
    return diffusers.FluxTransformer2DModel(**CONFIG).to(dtype).eval()


def write_gguf(model: nn.Module, path: Path) -> Path:  # harness/engines/gguf_engine.py quantize, then save
    kind, state = gguf.GGMLQuantizationType.Q8_0, model.state_dict()
    linears = {name for name, module in model.named_modules() if type(module) is nn.Linear}
    order = []  # the quantized model's state dict: a quantized Linear holds its bias before its packed weight
    for name in state:
        owner, _, leaf = name.rpartition(".")
        if not (owner in linears and leaf == "weight" and f"{owner}.bias" in state):
            order += [name, f"{owner}.weight"] if owner in linears and leaf == "bias" else [name]
    writer = gguf.GGUFWriter(str(path), "quantmatrix")
    for name in order:
        tensor = state[name].detach().float().cpu().numpy()
        if name.rpartition(".")[0] in linears and name.endswith(".weight"):
            writer.add_tensor(name, np.ascontiguousarray(gguf.quants.quantize(tensor, kind)), raw_dtype=kind)
        else:
            writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


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
        saved = write_gguf(build_model(), tmp / 'model.gguf')  # the engine's file of the float model
        # load (harness/stacks/diffusers.py load)
        model = diffusers.FluxTransformer2DModel.from_single_file(
            str(saved), config=str(float_dir), torch_dtype=DTYPE,
            quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=DTYPE))
        model.eval()  # as the harness leaves it (harness/run/execute.py)
        # offload (harness/stacks/diffusers.py offload)
        pipe = ComponentPipeline(model)
        pipe.enable_sequential_cpu_offload(device=DEVICE)
    print("ran to the end of the offload step without an error")


if __name__ == "__main__":
    main()
