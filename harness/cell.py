"""The cell's vocabulary: the axes of a matrix, the values they take, and `Cell`, one point of the matrix.

A leaf module: it imports nothing of the harness (and no torch), so that the matrix model, the reports and the
engines' catalog can all speak of cells without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

AXES = ("engine", "qtype", "load", "offload", "device", "model", "dtype")
LOAD_MODES = ("post-load", "on-the-fly", "prequantized")
OFFLOAD_MODES = ("none", "model", "sequential", "balanced")
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

    @property
    def id(self) -> str:
        quant = self.engine if self.qtype == "-" else f"{self.engine}-{self.qtype}"
        return "/".join((quant, self.load, self.offload, self.device, self.model, self.dtype))

    @classmethod
    def from_id(cls, cell_id: str) -> Cell:
        quant, *rest = cell_id.split("/")
        engine, _, qtype = quant.partition("-")
        return cls(engine, qtype or "-", *rest)

    def as_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def baseline(self) -> Cell:
        """The unquantized cell this one is compared with."""
        return Cell(BASELINE, "-", self.load, self.offload, self.device, self.model, self.dtype)
