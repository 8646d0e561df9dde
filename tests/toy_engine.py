"""A test-only engine added as one module and its row, nothing else (tests/test_new_engine.py): round to nearest,
weights stored as int8 codes of `LEVELS[qtype]` steps either side of zero with one float32 scale per output row.
"rtn8" keeps the model's output; "rtn1" (three levels) does not, so its cells fail and get a repro script.

Named in QUANTMATRIX_ENGINES (`tests.toy_engine`), the catalog imports it: it registers its row before its Engine
class is defined, and keeps torch out of its top level (the catalog is read without torch).
"""

from __future__ import annotations

import functools

from harness.engines.base import Engine, replace_linears
from harness.engines.catalog import Bits, EngineInfo, Floor, register

LEVELS = {"rtn8": 127, "rtn1": 1}
register(EngineInfo("toy", tuple(LEVELS), "tests.toy_engine:ToyEngine", title="Toy RTN (test-only)",
                    bits=dict.fromkeys(LEVELS, Bits(8, 32)),  # int8 codes, a float32 scale per row
                    floors={"rtn8": Floor(30, 25, "8-bit codes: about 42 dB by arithmetic"),
                            "rtn1": Floor(30, 25, "held to the 8-bit floor: its output is not the model's")}))

# This engine in a standalone repro script: its fragment (harness/repro.py says how it is read and filled)
REPRO = {
    "tables": ("LEVELS",), "copy": ("RoundedLinear",),  # the layer as rounded_linear makes it
    "quantize": """\
for name, layer in list(model.named_modules()):
    if type(layer) is nn.Linear:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, RoundedLinear(layer, {LEVELS}))""",
}


@functools.cache
def rounded_linear() -> type:
    """The layer that stores the codes (made on first use: torch is imported here, not at the module's top)."""
    import torch
    from torch import nn

    class RoundedLinear(nn.Module):
        def __init__(self, layer: nn.Linear, levels: int):
            super().__init__()
            weight = layer.weight.detach().float()
            scale = weight.abs().amax(1, keepdim=True).clamp_min(1e-12) / levels
            self.register_buffer("weight", (weight / scale).round().clamp(-levels, levels).to(torch.int8))
            self.register_buffer("weight_scale", scale)
            self.bias = layer.bias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weight = (self.weight.float() * self.weight_scale).to(x.dtype)
            return nn.functional.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    return RoundedLinear


class ToyEngine(Engine):
    name = "toy"

    def quantize(self, model, qtype: str, *, dtype, device):
        return replace_linears(model, lambda layer: rounded_linear()(layer, LEVELS[qtype]))
