"""optimum-quanto: weights as qint8, qint4, qint2 or qfloat8 tensor subclasses (`quantize` + `freeze`).

qint4/qint2 build a C++ extension on first use (cached under TORCH_EXTENSIONS_DIR): a one-time cost that lands in
the first such cell's quantize_s. Forward runs under `torch.no_grad()` (quanto's packed types reject inference mode).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from harness.engines.base import Engine, safetensors_contents

QMAP_KEY = "quanto.quantization_map"
# diffusers' QuantoConfig names the weight types without the q
DIFFUSERS_WEIGHTS = {"qint8": "int8", "qint4": "int4", "qint2": "int2", "qfloat8": "float8"}


# This engine in a standalone repro script: its fragment (harness/repro.py says how it is read and filled)
REPRO = {"imports": "import optimum.quanto", "tables": ("DIFFUSERS_WEIGHTS",),
         "quantize": "optimum.quanto.quantize(model, weights=optimum.quanto.{qtype})\noptimum.quanto.freeze(model)"}


class QuantoEngine(Engine):
    name = "quanto"

    @staticmethod
    def _weights(qtype: str):
        import optimum.quanto as oq

        return getattr(oq, qtype)

    def quantize(self, model: nn.Module, qtype: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        from optimum.quanto import freeze, quantize

        quantize(model, weights=self._weights(qtype))
        freeze(model)
        return model

    def quantize_layer(self, layer: nn.Linear, qtype: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        holder = nn.Sequential(layer)  # quanto replaces children, never the module it is given
        return self.quantize(holder, qtype, dtype=dtype, device=device)[0]

    def save(self, model: nn.Module, qtype: str, path: Path) -> Path:
        from optimum.quanto import quantization_map
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path), metadata={QMAP_KEY: json.dumps(quantization_map(model))})
        return path

    def load(self, path: Path, skeleton: nn.Module, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        from optimum.quanto import requantize
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            qmap = json.loads(f.metadata()[QMAP_KEY])
        model = skeleton.to_empty(device="cpu")
        requantize(model, load_file(str(path)), qmap, device=torch.device("cpu"))
        return model

    def recognise(self, path: Path) -> str | None:
        """Quanto's quantization map (stored in the safetensors metadata) names the weight type; every quantized
        weight is stored as `_data` and `_scale` tensors."""
        contents = safetensors_contents(path)
        if contents is None:
            return None
        meta, names = contents
        if QMAP_KEY not in meta or not any(k.endswith(".weight._scale") for k in names):
            return None
        kinds = {entry.get("weights") for entry in json.loads(meta[QMAP_KEY]).values()}
        if len(kinds) != 1:
            return None
        kind = kinds.pop()
        return "qfloat8" if kind and kind.startswith("qfloat8") else kind if kind in self.qtypes else None
