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


class SDNQEngine(Engine):
    name = "sdnq"

    def quantize(self, model: nn.Module, qtype: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        from sdnq import sdnq_post_load_quant

        return sdnq_post_load_quant(model, weights_dtype=qtype, torch_dtype=dtype)

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
        qtype = json.loads(meta[CONFIG_KEY]).get("weights_dtype")
        return qtype if qtype in self.qtypes else None
