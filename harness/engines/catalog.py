"""What each engine offers, as data: its types, load modes and package. No torch and no engine is imported here, so
that a matrix file can be validated (and a report read) without either; each engine module takes its entry from
this table (`Engine.__init_subclass__`), so the two cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

ALL_LOADS = ("post-load", "on-the-fly", "prequantized")


@dataclass(frozen=True)
class EngineInfo:
    name: str
    qtypes: tuple[str, ...]  # the baseline has the single type "-"
    loads: tuple[str, ...] = ("post-load",)  # of "post-load", "on-the-fly", "prequantized"
    package: str | None = None  # the distribution whose import and version decide availability
    import_name: str | None = None  # its module, where the names differ
    hidden: bool = False  # test-only engines are left out of a matrix's "*"
    file_suffix: str = ".safetensors"  # of the files `save` writes


CATALOG: dict[str, EngineInfo] = {e.name: e for e in (
    EngineInfo("none", ("-",), ALL_LOADS),
    EngineInfo("bnb", ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8"), ALL_LOADS, "bitsandbytes"),
    EngineInfo("quanto", ("qint8", "qint4", "qint2", "qfloat8"), ALL_LOADS, "optimum-quanto", "optimum.quanto"),
    EngineInfo("gguf", ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"), ALL_LOADS, "gguf", file_suffix=".gguf"),
    EngineInfo("nncf", ("int8_sym", "int8_asym", "int4_sym", "int4_asym", "int4_sym-g128", "int4_asym-g128"),
               package="nncf"),
    EngineInfo("sdnq", ("int8", "int6", "int4", "uint4", "float8_e4m3fn"), ALL_LOADS, "sdnq"),
    EngineInfo("torchao", ("int8_weight_only", "int8_dynamic", "float8_weight_only", "int4_weight_only"),
               ("post-load", "on-the-fly"), "torchao"),
    EngineInfo("fault", ("abort", "segfault", "hang", "spin", "oom", "exit", "raise", "flood", "orphan"),
               hidden=True),
)}
