"""SDNQ (SD.Next's own engine, `sdnq` on PyPI): integer and float weight types, with SD.Next's defaults (layers
under `minimum_allowed_numel` elements stay in float).

Files: `save_sdnq_model` / `load_sdnq_model` need a diffusers or transformers model (`save_pretrained`, a config
class); the built-in models are plain modules, so the file is what those write inside: the quantized state dict
as safetensors with the model's SDNQConfig (in the metadata rather than a `quantization_config.json` beside it),
and loading goes through the same `pre_quantized=True` path that `load_sdnq_model` takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from harness.engines.base import Engine, safetensors_contents

CONFIG_KEY = "sdnq.quantization_config"

# Each type's SDNQConfig options beyond sdnq's defaults, as SD.Next sets them (vladmandic/sdnext@d11a619
# modules/model_quant.py:148-169: sdnq_use_svd, sdnq_svd_rank (default 32), sdnq_svd_steps (8), sdnq_group_size,
# sdnq_use_dynamic_quantization, sdnq_use_hadamard, sdnq_quantize_matmul_mode; modules/ui_definitions.py:176-195).
# The plain weight types are SD.Next's 18 (modules/shared_items.py:184 sdnq_quant_modes) and int4, the package's
# own (not an SD.Next choice). A quantized matmul's type is a second choice (shared_items.py:185 sdnq_matmul_modes:
# disabled, enabled, int8, uint8, float8_e4m3fn, float16): `-matmul` is "enabled" (sdnq picks int8 for integer
# weights), `-matmul-fp8` an override.
SDNEXT_WEIGHTS = ("int8", "uint8", "int6", "uint6", "uint5", "uint4", "uint3", "uint2", "float8_e4m3fn",
                  "float8_e3m4fn", "float6_e3m2fn", "float5_e2m2fn", "float4_e2m1fn", "float3_e1m1fn",
                  "float2_e1m0fn", "int16", "uint16", "float16")
# a literal (the repro generator reads it without importing this module): each weight type alone, then options
OPTIONS = {
    "int8": {"weights_dtype": "int8"},
    "uint8": {"weights_dtype": "uint8"},
    "int6": {"weights_dtype": "int6"},
    "uint6": {"weights_dtype": "uint6"},
    "uint5": {"weights_dtype": "uint5"},
    "uint4": {"weights_dtype": "uint4"},
    "uint3": {"weights_dtype": "uint3"},
    "uint2": {"weights_dtype": "uint2"},
    "float8_e4m3fn": {"weights_dtype": "float8_e4m3fn"},
    "float8_e3m4fn": {"weights_dtype": "float8_e3m4fn"},
    "float6_e3m2fn": {"weights_dtype": "float6_e3m2fn"},
    "float5_e2m2fn": {"weights_dtype": "float5_e2m2fn"},
    "float4_e2m1fn": {"weights_dtype": "float4_e2m1fn"},
    "float3_e1m1fn": {"weights_dtype": "float3_e1m1fn"},
    "float2_e1m0fn": {"weights_dtype": "float2_e1m0fn"},
    "int16": {"weights_dtype": "int16"},
    "uint16": {"weights_dtype": "uint16"},
    "float16": {"weights_dtype": "float16"},
    "int4": {"weights_dtype": "int4"},
    "uint4-svd-r32": {"weights_dtype": "uint4", "use_svd": True, "svd_rank": 32, "svd_steps": 8},
    "int8-matmul": {"weights_dtype": "int8", "use_quantized_matmul": True},
    "uint4-matmul-fp8": {"weights_dtype": "uint4", "use_quantized_matmul": True,
                         "quantized_matmul_dtype": "float8_e4m3fn"},
    "uint4-g32": {"weights_dtype": "uint4", "group_size": 32},
    "uint4-dynamic": {"weights_dtype": "uint4", "use_dynamic_quantization": True},
    "uint4-hadamard": {"weights_dtype": "uint4", "use_hadamard": True},
}
# What tells the types apart in a saved config, with sdnq's defaults (a key a config lacks has its default)
SIGNATURE = {"weights_dtype": None, "use_svd": False, "use_quantized_matmul": False, "quantized_matmul_dtype": None,
             "group_size": 0, "use_dynamic_quantization": False, "use_hadamard": False}


def qtype_of(config: dict) -> str | None:
    """The type whose options a saved SDNQConfig has (its to_dict())."""
    def signature(options: dict) -> tuple:
        return tuple(options.get(k, default) for k, default in SIGNATURE.items()) + (
            (options.get("svd_rank", 32),) if options.get("use_svd") else ())

    found = signature(config)
    return next((q for q, options in OPTIONS.items() if signature(options) == found), None)


# Where SD.Next has SDNQ quantize each layer and leave it, by offload mode (vladmandic/sdnext@d11a619
# modules/model_quant.py:77-94 get_sdnq_devices, for both its "pre" and "post" modes, with its defaults: device_map
# "default", sdnq_quantize_with_gpu True, diffusers_to_gpu False, sdnq_quantize_shuffle_weights False, in
# modules/ui_definitions.py:105, 110, 194, 196): on the execution device; left there without offload or with model
# offload, else returned to the CPU, where the offload keeps it.
KEPT_ON_DEVICE = ("none", "model")


def sdnext_devices(offload: str, device: torch.device) -> dict[str, torch.device]:
    """SDNQ's quantization_device and return_device as SD.Next passes them for a cell's offload mode."""
    return {"quantization_device": device,
            "return_device": device if offload in KEPT_ON_DEVICE else torch.device("cpu")}


# This engine in a standalone repro script: its fragment (harness/repro.py says how it is read and filled)
REPRO = {"imports": "import sdnq  # also registers SDNQ's quantizer with diffusers", "tables": ("OPTIONS",),
         "quantize": "model = sdnq.sdnq_post_load_quant(  # placed as SD.Next places it (sdnext_devices)\n"
                     "    model, torch_dtype=DTYPE, {OPTIONS:kw}, quantization_device=DEVICE,\n"
                     "    return_device={return_device})",
         # by the cell's offload mode, as sdnext_devices gives it (KEPT_ON_DEVICE)
         "by_offload": {"return_device": {"none": "DEVICE", "model": "DEVICE", "*": "torch.device('cpu')"}}}


class SDNQEngine(Engine):
    name = "sdnq"

    def quantize(self, model: nn.Module, qtype: str, *, dtype: torch.dtype, device: torch.device,
                 **placement: torch.device) -> nn.Module:
        """sdnq's post-load entry point with the type's options; `placement`: its quantization and return devices
        (where the model lies, unless given)."""
        from sdnq import sdnq_post_load_quant

        return sdnq_post_load_quant(model, torch_dtype=dtype, **OPTIONS[qtype], **placement)

    def quantize_for(self, model: nn.Module, qtype: str, *, dtype: torch.dtype, device: torch.device,
                     offload: str) -> nn.Module:
        return self.quantize(model, qtype, dtype=dtype, device=device, **sdnext_devices(offload, device))

    def quantize_layer(self, layer: nn.Linear, qtype: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        holder = nn.Sequential(layer)  # the post-load entry point replaces children of the module it is given
        return self.quantize(holder, qtype, dtype=dtype, device=device)[0]

    def save(self, model: nn.Module, qtype: str, path: Path) -> Path:
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path), metadata={CONFIG_KEY: json.dumps(model.quantization_config.to_dict())})
        return path

    def load(self, path: Path, skeleton: nn.Module, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        from safetensors import safe_open
        from safetensors.torch import load_file
        from sdnq import SDNQConfig, sdnq_post_load_quant

        with safe_open(str(path), framework="pt") as f:
            config = SDNQConfig.from_dict(json.loads(f.metadata()[CONFIG_KEY]))
        model = sdnq_post_load_quant(skeleton.to_empty(device="cpu"), torch_dtype=dtype, pre_quantized=True,
                                     quantization_config=config)
        model.load_state_dict(load_file(str(path)), strict=True, assign=True)
        return model

    def recognise(self, path: Path) -> str | None:
        """The SDNQConfig in the metadata names the weight type; quantized layers store `scale` beside `weight`."""
        contents = safetensors_contents(path)
        if contents is None:
            return None
        meta, names = contents
        if CONFIG_KEY not in meta or not any(k.endswith(".scale") for k in names):
            return None
        qtype = qtype_of(json.loads(meta[CONFIG_KEY]))
        return qtype if qtype in self.qtypes else None
