"""The cell's vocabulary: the axes of a matrix, the values they take, and `Cell`, one point of the matrix.

A leaf module: it imports nothing of the harness (and no torch), so that the matrix model, the reports and the
engines' catalog can all speak of cells without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

AXES = ("engine", "qtype", "load", "offload", "device", "model", "dtype", "stack", "cast")
LOAD_MODES = ("post-load", "on-the-fly", "prequantized")
OFFLOAD_MODES = ("none", "model", "sequential", "balanced", "group")  # SD.Next's offload modes
# Whose code loads, quantizes and offloads the model: the engine's own API and accelerate's hooks on the module
# (`direct`, the control), or diffusers' quantizer integrations and pipeline offload methods (`diffusers`, the path
# SD.Next and diffusers users take).
STACKS = ("direct", "diffusers")
# Layerwise casting (diffusers' enable_layerwise_casting, which SD.Next applies on top of quantization): weights
# stored in this dtype and cast to the compute dtype per layer. "-": none.
CASTS = ("-", "float8_e4m3fn", "float8_e5m2")
DEVICES = ("cpu", "cuda", "rocm", "xpu", "mps")
DTYPES = ("float32", "bfloat16", "float16")
BASELINE = "none"


@dataclass(frozen=True, order=True)
class Cell:
    """One point of the matrix; every field is a plain string."""

    engine: str
    qtype: str
    load: str
    offload: str
    device: str
    model: str
    dtype: str
    stack: str = "direct"  # records written before the stack axis existed are direct
    cast: str = "-"

    @property
    def id(self) -> str:
        quant = self.engine if self.qtype == "-" else f"{self.engine}-{self.qtype}"
        stack = self.stack if self.cast == "-" else f"{self.stack}+{self.cast}"
        return "/".join((quant, self.load, self.offload, self.device, self.model, self.dtype, stack))

    @classmethod
    def from_id(cls, cell_id: str) -> Cell:
        quant, *rest = cell_id.split("/")
        engine, _, qtype = quant.partition("-")
        if len(rest) == 6:
            stack, _, cast = rest.pop().partition("+")
            rest += [stack, cast or "-"]
        return cls(engine, qtype or "-", *rest)

    def as_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def baseline(self) -> Cell:
        """The unquantized cell this one is compared with."""
        return Cell(BASELINE, "-", self.load, self.offload, self.device, self.model, self.dtype, self.stack)

    @property
    def control(self) -> Cell:
        """The same combination on the direct stack: where it works and this cell does not, the integration broke."""
        return Cell(self.engine, self.qtype, self.load, self.offload, self.device, self.model, self.dtype, "direct",
                    self.cast)
