"""SDNQ (SD.Next's own engine, `sdnq` on PyPI): integer and float weight types, with SD.Next's defaults (layers
under `minimum_allowed_numel` elements stay in float)."""

from __future__ import annotations

import torch
from torch import nn

from harness.engines.base import Engine


class SDNQEngine(Engine):
    name = "sdnq"
    qtypes = ("int8", "int6", "int4", "uint4", "float8_e4m3fn")
    loads = ("post-load", "on-the-fly")
    package = "sdnq"

    def quantize(self, model: nn.Module, qtype: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        from sdnq import sdnq_post_load_quant

        return sdnq_post_load_quant(model, weights_dtype=qtype, torch_dtype=dtype)

    def quantize_layer(self, layer: nn.Linear, qtype: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        holder = nn.Sequential(layer)  # the post-load entry point replaces children of the module it is given
        return self.quantize(holder, qtype, dtype=dtype, device=device)[0]
