"""NVIDIA TensorRT Model Optimizer (`nvidia-modelopt`), SD.Next's "TensorRT" quantization: weight types as SD.Next
configures them. SD.Next passes diffusers' NVIDIAModelOptConfig (the `diffusers` stack's integration); the engine's
own API here is modelopt's: `mtq.quantize` with the same weight quantizer settings, then `mtq.compress`, which
replaces each quantized Linear by modelopt's real-quantized one (packed weights).

modelopt has real-quantized GEMMs for FP8 and NVFP4 on CUDA only (modelopt/torch/quantization/backends/
fp8_per_tensor_gemm.py:107); elsewhere a compressed layer dequantizes its weight and runs the float GEMM, so the
types run on a CPU.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from harness.engines.base import Engine

# SD.Next's configs, per `trt_quantization_type` (vladmandic/sdnext@d11a619 modules/model_quant.py:55-61; default
# "int8", ui_definitions.py:209), passed as NVIDIAModelOptConfig(**config) (model_quant.py:67).
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

# The same weight quantizers in modelopt's own terms (what NVIDIAModelOptConfig builds from the above:
# diffusers quantizers/quantization_config.py:842-880): code bits ((exponent, mantissa) for floats), blocks along
# the input dimension, and NF4's quantized scales.
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


# This engine in a standalone repro script: its fragment (harness/repro.py says how it is read and filled)
REPRO = {"imports": "import modelopt.torch.quantization as mtq",
         "tables": ("SDNEXT",), "values": {"QUANT_CFG": ("quant_config", ("SDNEXT", "WEIGHTS", "quant_config"))},
         "quantize": "mtq.quantize(model, QUANT_CFG, forward_loop=None)\nmtq.compress(model)"}


class ModelOptEngine(Engine):
    name = "modelopt"

    def quantize(self, model: nn.Module, qtype: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        import modelopt.torch.quantization as mtq

        mtq.quantize(model, quant_config(qtype), forward_loop=None)
        mtq.compress(model)
        return model
