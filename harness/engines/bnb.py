"""bitsandbytes: 4-bit NF4/FP4 (with or without double quantization of the block statistics) and LLM.int8.

Its current releases have a CPU backend, used here on the CPU. Quantization happens when a parameter is moved with
`.to(device)`: the layer is built on the CPU and moved to the execution device (the CPU itself on a CPU host).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from harness.engines.base import Engine, replace_linears

FORMAT_KEY = "quantmatrix.format"
FOUR_BIT = {"nf4": ("nf4", False), "nf4-dq": ("nf4", True), "fp4": ("fp4", False), "fp4-dq": ("fp4", True)}


# This engine in a standalone repro script: its fragment (harness/repro.py says how it is read and filled)
REPRO = {
    "imports": "import bitsandbytes as bnb",
    "tables": ("FOUR_BIT",),
    "helpers": {"int8": """\
def quantize_layer(layer: nn.Linear) -> nn.Module:  # harness/engines/bnb.py quantize_layer
    bias = None if layer.bias is None else nn.Parameter(layer.bias.data.to("cpu"), requires_grad=False)
    q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias is not None, has_fp16_weights=False,
                            device="meta")
    q.weight = bnb.nn.Int8Params(layer.weight.data.to("cpu"), requires_grad=False, has_fp16_weights=False)
    q.bias = bias
    return q.to(DEVICE)  # bitsandbytes quantizes here""", "*": """\
def quantize_layer(layer: nn.Linear) -> nn.Module:  # harness/engines/bnb.py quantize_layer
    bias = None if layer.bias is None else nn.Parameter(layer.bias.data.to("cpu"), requires_grad=False)
    q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias is not None, compute_dtype=DTYPE,
                          quant_type={FOUR_BIT[0]!r}, compress_statistics={FOUR_BIT[1]!r}, device="meta")
    q.weight = bnb.nn.Params4bit(layer.weight.data.to("cpu"), requires_grad=False, quant_type={FOUR_BIT[0]!r},
                                 compress_statistics={FOUR_BIT[1]!r})
    q.bias = bias
    return q.to(DEVICE)  # bitsandbytes quantizes here"""},
    "quantize": """\
for name, layer in list(model.named_modules()):  # every plain Linear (harness/engines/base.py replace_linears)
    if type(layer) is nn.Linear:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, quantize_layer(layer))""",
}


class BitsAndBytesEngine(Engine):
    name = "bnb"

    def quantize(self, model: nn.Module, qtype: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        return replace_linears(model, lambda layer: self.quantize_layer(layer, qtype, dtype=dtype, device=device))

    def quantize_layer(self, layer: nn.Linear, qtype: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        import bitsandbytes as bnb

        weight = layer.weight.data.to("cpu")
        bias = None if layer.bias is None else nn.Parameter(layer.bias.data.to("cpu"), requires_grad=False)
        if qtype == "int8":
            q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias is not None,
                                    has_fp16_weights=False, device="meta")
            q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            quant_type, double = FOUR_BIT[qtype]
            q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias is not None, compute_dtype=dtype,
                                  quant_type=quant_type, compress_statistics=double, device="meta")
            q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type,
                                         compress_statistics=double)
        q.bias = bias
        return q.to(device)  # bitsandbytes quantizes here

    def save(self, model: nn.Module, qtype: str, path: Path) -> Path:
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path), metadata={FORMAT_KEY: json.dumps({"engine": self.name, "qtype": qtype})})
        return path

    def load(self, path: Path, skeleton: nn.Module, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        import bitsandbytes as bnb
        from safetensors.torch import load_file

        state = load_file(str(path))
        qtype = self.recognise(path)

        def rebuild(layer: nn.Linear, name: str) -> nn.Module:
            bias = state.get(f"{name}.bias")
            if qtype == "int8":
                q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias is not None,
                                        has_fp16_weights=False, device="meta")
                # Made on the device: Module.to swaps a parameter's data, not the old Int8Params' row scales (SCB),
                # which stayed on the CPU ("Expected a cuda device, but got: cpu", seen on an H200).
                q.weight = bnb.nn.Int8Params(state[f"{name}.weight"].to(device), requires_grad=False,
                                             has_fp16_weights=False)
                q.weight.CB, q.weight.SCB = q.weight.data, state[f"{name}.SCB"].to(device)
            else:
                quant_type, double = FOUR_BIT[qtype]
                q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias is not None,
                                      compute_dtype=dtype, quant_type=quant_type, compress_statistics=double,
                                      device="meta")
                stats = {k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.weight.")}
                q.weight = bnb.nn.Params4bit.from_prequantized(state[f"{name}.weight"], stats, device="cpu")
            q.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
            return q.to(device)

        linears = {name for name, m in skeleton.named_modules() if type(m) is nn.Linear}
        model = replace_linears(skeleton, rebuild, with_names=True)
        others = {k: v for k, v in state.items() if k.rsplit(".", 1)[0].split(".weight")[0] not in linears}
        model.load_state_dict(others, strict=False, assign=True)
        return model

    def recognise(self, path: Path) -> str | None:
        """4-bit: `*.weight.quant_state.bitsandbytes__nf4|fp4` entries (double quantization adds `nested_absmax`);
        int8: int8 weights with `SCB` row scales."""
        from safetensors import safe_open

        if path.suffix != ".safetensors":
            return None
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            kinds = {k.rsplit("__", 1)[1] for k in keys if ".quant_state.bitsandbytes__" in k}
            if len(kinds) == 1:
                kind = kinds.pop()
                double = any(k.endswith(".weight.nested_absmax") for k in keys)
                return f"{kind}-dq" if double else kind
            scb = [k for k in keys if k.endswith(".SCB")]
            if scb and f.get_slice(scb[0].removesuffix("SCB") + "weight").get_dtype() == "I8":
                return "int8"
        return None
