"""The unquantized baseline: every quantized cell is compared with it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from harness.engines.base import Engine

FORMAT_KEY = "quantmatrix.format"


# This engine in a standalone repro script: its fragment (harness/repro.py says how it is read and filled)
REPRO = {"quantize": ""}  # the float model as loaded


class NoneEngine(Engine):
    name = "none"

    def quantize(self, model: nn.Module, qtype: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        return model

    def quantize_layer(self, layer: nn.Linear, qtype: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        return layer

    def save(self, model: nn.Module, qtype: str, path: Path) -> Path:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
                  metadata={FORMAT_KEY: json.dumps({"engine": self.name})})
        return path

    def load(self, path: Path, skeleton: nn.Module, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        from safetensors.torch import load_file

        skeleton.load_state_dict(load_file(str(path)), assign=True)
        return skeleton.to(dtype)

    def recognise(self, path: Path) -> str | None:
        """A safetensors file whose tensors are all plain floating point is an unquantized checkpoint."""
        from safetensors import safe_open

        if path.suffix != ".safetensors":
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if any(k != FORMAT_KEY for k in meta):
                return None
            floats = {"F32", "F16", "BF16", "F64"}
            if all(f.get_slice(k).get_dtype() in floats for k in f.keys()):
                return "-"
        return None
