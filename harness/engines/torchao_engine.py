"""torchao: `quantize_` with weight-only and dynamic-activation configs; weights become tensor subclasses."""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from harness.engines.base import Engine

CONFIGS = {
    "int8_weight_only": "Int8WeightOnlyConfig",
    "int8_dynamic": "Int8DynamicActivationInt8WeightConfig",
    "float8_weight_only": "Float8WeightOnlyConfig",
    "int4_weight_only": "Int4WeightOnlyConfig",
}


# This engine in a standalone repro script: its fragment (harness/repro.py says how it is read and filled)
REPRO = {"imports": "import torchao.quantization as tq", "tables": ("CONFIGS",),
         "quantize": "tq.quantize_(model, tq.{CONFIGS}())"}


class TorchAOEngine(Engine):
    name = "torchao"

    def unavailable_reason(self, qtype: str, device: str) -> str | None:
        reason = super().unavailable_reason(qtype, device)
        if reason is None and qtype == "int4_weight_only" and importlib.util.find_spec("mslk") is None:
            return "torchao's Int4WeightOnlyConfig needs the extra package 'mslk', which is not installed"
        return reason

    def quantize(self, model: nn.Module, qtype: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        import torchao.quantization as tq

        tq.quantize_(model, getattr(tq, CONFIGS[qtype])())
        return model

    def quantize_layer(self, layer: nn.Linear, qtype: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        return self.quantize(layer, qtype, dtype=dtype, device=device)
