"""What each engine offers, as data: its types, load modes, package, the class that implements it, the layer depth
of its error attribution, its name in reports and each type's expected bits per weight (the format's arithmetic).
No torch and no engine is imported here, so that a matrix file can be validated (and a report read) without
either; each engine module takes its entry from this table (`Engine.__init_subclass__`), so the two cannot
disagree. Adding an engine is its entry here and its module: the registry, the reports, the tests, the extras,
tox's pins and the device wheels read (or are checked against) this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALL_LOADS = ("post-load", "on-the-fly", "prequantized")


@dataclass(frozen=True)
class Bits:
    """A format's stored bits per Linear weight: `flat` per weight plus `per_row` per output row (a scale, a
    zero point), so bits per weight = flat + per_row / in_features."""

    flat: float
    per_row: float = 0.0

    def of(self, shapes: list[tuple[int, int]]) -> float:
        """Over Linear layers of these (out_features, in_features)."""
        weights = sum(o * i for o, i in shapes)
        return sum(o * i * self.flat + o * self.per_row for o, i in shapes) / weights


@dataclass(frozen=True)
class EngineInfo:
    name: str
    qtypes: tuple[str, ...]  # the baseline has the single type "-"
    implementation: str  # "module:Class" of its Engine subclass
    loads: tuple[str, ...] = ("post-load",)  # of "post-load", "on-the-fly", "prequantized"
    package: str | None = None  # the distribution whose import and version decide availability
    import_name: str | None = None  # its module, where the names differ
    title: str = ""  # its name in reports and the wiki patch ("BitsAndBytes")
    layer_depth: int = 1  # how many components of a module name say which layer raised (optimum.quanto: 2)
    bits: dict[str, Bits] = field(default_factory=dict)  # expected bits per weight, per type (where fixed)
    hidden: bool = False  # test-only engines are left out of a matrix's "*"
    file_suffix: str = ".safetensors"  # of the files `save` writes

    @property
    def module(self) -> str:
        """The top-level module of its package (the layer its errors are attributed to)."""
        return (self.import_name or self.package or "").split(".")[0]


_BNB4 = Bits(4 + 32 / 64)  # 4-bit codes, one fp32 absmax per block of 64
_BNB4_DQ = Bits(4 + 8 / 64 + 32 / (64 * 256))  # absmax as uint8, one fp32 per 256 absmax
_PER_ROW8 = Bits(8, 32)  # int8 codes, one fp32 scale per output row

CATALOG: dict[str, EngineInfo] = {e.name: e for e in (
    EngineInfo("none", ("-",), "harness.engines.none:NoneEngine", ALL_LOADS, title="the unquantized model"),
    EngineInfo("bnb", ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8"), "harness.engines.bnb:BitsAndBytesEngine",
               ALL_LOADS, "bitsandbytes", title="BitsAndBytes",
               bits={"nf4": _BNB4, "fp4": _BNB4, "nf4-dq": _BNB4_DQ, "fp4-dq": _BNB4_DQ,
                     "int8": _PER_ROW8}),  # LLM.int8: fp32 scale per row (SCB)
    EngineInfo("quanto", ("qint8", "qint4", "qint2", "qfloat8"), "harness.engines.quanto:QuantoEngine",
               ALL_LOADS, "optimum-quanto", "optimum.quanto", title="Optimum-Quanto", layer_depth=2,
               bits={"qint8": _PER_ROW8, "qfloat8": _PER_ROW8,
                     "qint4": Bits(4 + 2 * 32 / 128),  # groups of 128 with fp32 scale and shift
                     "qint2": Bits(2 + 2 * 32 / 128)}),
    EngineInfo("gguf", ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"), "harness.engines.gguf_engine:GGUFEngine",
               ALL_LOADS, "gguf", title="GGUF", file_suffix=".gguf",
               bits={"Q8_0": Bits(8.5),  # blocks of 32: 32 x int8 + fp16 scale
                     "Q5_1": Bits(6.0), "Q5_0": Bits(5.5), "Q4_1": Bits(5.0), "Q4_0": Bits(4.5)}),
    EngineInfo("nncf", ("int8_sym", "int8_asym", "int4_sym", "int4_asym", "int4_sym-g128", "int4_asym-g128"),
               "harness.engines.nncf_engine:NNCFEngine", package="nncf", title="NNCF",
               bits={"int8_sym": Bits(8, 16),  # fp16 scale per row
                     "int8_asym": Bits(8, 16 + 8)}),  # and a uint8 zero point
    EngineInfo("sdnq", ("int8", "int6", "int4", "uint4", "float8_e4m3fn"), "harness.engines.sdnq:SDNQEngine",
               ALL_LOADS, "sdnq", title="SDNQ"),
    EngineInfo("torchao", ("int8_weight_only", "int8_dynamic", "float8_weight_only", "int4_weight_only"),
               "harness.engines.torchao_engine:TorchAOEngine", ("post-load", "on-the-fly"), "torchao",
               title="torchao"),
    EngineInfo("fault", ("abort", "segfault", "hang", "spin", "oom", "exit", "raise", "flood", "orphan"),
               "harness.engines.fault:FaultEngine", hidden=True, title="fault (test-only)"),
)}

ENGINE_NAMES = tuple(CATALOG)
ENGINE_TITLES = {name: e.title for name, e in CATALOG.items()}
QTYPE_NAMES = tuple(sorted({q for e in CATALOG.values() for q in e.qtypes}))
