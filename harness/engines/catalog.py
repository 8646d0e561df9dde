"""What each engine offers, as data: its types, load modes, package, the class that implements it, the layer depth
of its error attribution, its name in reports and each type's expected bits per weight (the format's arithmetic).
No torch and no engine is imported here, so that a matrix file can be validated (and a report read) without
either; each engine module takes its entry from this table (`Engine.__init_subclass__`), so the two cannot
disagree. Adding an engine is its entry here and its module: the registry, the reports, the tests, the extras,
tox's pins and the device wheels read (or are checked against) this table. An engine from outside is one module
named in QUANTMATRIX_ENGINES that registers its row (`register`; docs/engines.md).
"""

from __future__ import annotations

import importlib
import math
import os
import re
from dataclasses import dataclass, field

ALL_LOADS = ("post-load", "on-the-fly", "prequantized")


@dataclass(frozen=True)
class Bits:
    """A format's stored bits per Linear weight: `flat` per weight plus `per_row` per output row (a scale, a
    zero point), `per_group` per group of `group` inputs of a row (a row shorter than a group is one group), and
    `rank` x (out + in) low-rank values of `rank_bits` each (SVD's factors), so for one layer bits per weight =
    flat + per_row / in + per_group / min(group, in) + rank (out + in) rank_bits / (out in)."""

    flat: float
    per_row: float = 0.0
    per_group: float = 0.0
    group: int = 0
    rank: int = 0
    rank_bits: float = 0.0

    def of(self, shapes: list[tuple[int, int]]) -> float:
        """Over Linear layers of these (out_features, in_features)."""
        weights = sum(o * i for o, i in shapes)
        return sum(o * i * self.flat + o * self.per_row
                   + (o * math.ceil(i / min(self.group, i)) * self.per_group if self.group else 0)
                   + self.rank * (o + i) * self.rank_bits for o, i in shapes) / weights


@dataclass(frozen=True)
class Floor:
    """The least output error a type may show against the float model (as llama.cpp's test-backend-ops bounds
    each op's error): SQNR of the output (a pipeline's final latents) and PSNR of a pipeline's decoded image, in
    dB; below either, a cell that ran is `wrong-output`. `why`: its rationale."""

    sqnr_db: float | None
    psnr_db: float | None
    why: str


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
    traces: bool = False  # quantizing traces the model with an example input (a pipeline's are captured)
    floors: dict[str, Floor] = field(default_factory=dict)  # per type (FLOORS by bits where not given)
    # the type a text encoder gets where it differs from the model's, as SD.Next's defaults give it
    text_encoder_types: dict[str, str] = field(default_factory=dict)
    # SD.Next today (vladmandic/sdnext@d11a619): "ships", "removed" (its 2026-04-01 release, commit 53839e464) or
    # "not offered"; what the report's engine table says
    sdnext: str = "not offered"

    @property
    def module(self) -> str:
        """The top-level module of its package (the layer its errors are attributed to)."""
        return (self.import_name or self.package or "").split(".")[0]


# Output error floors by the format's class. The arithmetic: a uniform b-bit code with a per-row or per-block
# absmax scale gives a weight SQNR of about 6.02 b + 4.8 - 20 log10(peak / rms) dB (Gaussian weights, peak/rms about
# 3.5 over 32-3072 inputs: -10.9 dB), so about 42 dB at 8 bits, 30 at 6, 18 at 4 and 6 at 2; fp8 e4m3's 3 mantissa
# bits about 31 dB. Outputs lose more through depth, denoising steps and text encoders: measured over the tiny
# models (flux/sd3/sdxl-tiny denoisers in float32, their pipelines in bf16 with the denoiser or the text encoders
# quantized, CPU, 2026-12-02) the outputs' SQNR ran 25-51 dB at 8 bits, 19-38 at fp8, 15-38 at 5-6 bits, 8-28 at
# 4 and -5.5-16 at 2; image PSNR 24.6-49 at 8 bits, 18.8-37.8 at 4, 10.8-25.4 at 2. Weights replaced by noise of
# the same scale (the fault engine's `noise`) give an SQNR of -3.2 to -0.9 dB and an image PSNR of 8.7-10.9 dB. Each
# SQNR floor sits above noise and under the lowest its class measured (4-bit 5.2 dB under, 5-6 bit 7.5, fp8 8.6,
# 8-bit 3.6, where GGUF Q8_0 quantizing SD3's T5 measured 15.6 dB against 25-39 dB for every other 8-bit case: a
# lead, not yet explained), except where a type measured as noise: quanto qint2 (-5.5 dB on a pipeline, -2.0 on
# flux-tiny) and bnb nf4 on sdxl-tiny in float32 (0.0 dB) are the wrong outputs this is meant to catch. Each PSNR
# floor lies between noise and the lowest measured (a tiny VAE's clamped image tells less apart). Below a floor the
# output is not the model's. 2-bit's SQNR floor is 0 dB: an output no closer to the model's than silence.
def _floor(sqnr: float, psnr: float, cls: str) -> Floor:
    return Floor(sqnr, psnr, f"{cls}: SQNR {sqnr:g} dB, image PSNR {psnr:g} dB")


FLOOR_8BIT = _floor(12, 20, "8-bit integer codes (about 42 dB by arithmetic, 25-51 dB measured)")
FLOOR_FP8 = _floor(10, 18, "fp8 (about 31 dB by arithmetic, 19-38 dB measured)")
FLOOR_6BIT = _floor(8, 16, "5- and 6-bit codes (about 28-34 dB by arithmetic, 15-38 dB measured)")
FLOOR_4BIT = _floor(3, 14, "4-bit codes (about 18 dB by arithmetic, 8-28 dB measured)")
FLOOR_2BIT = _floor(0, 12, "2-bit codes (about 6 dB by arithmetic, -5.5-16 dB measured)")
FLOOR_FLOAT = _floor(10, 18, "the float model (exact without casting; fp8 layerwise casting of it measured 27 dB)")
CAST_FLOORS = {"float8_e4m3fn": FLOOR_FP8, "float8_e5m2": _floor(6, 15, "fp8 e5m2 storage (2 mantissa bits)")}

_BNB4 = Bits(4 + 32 / 64)  # 4-bit codes, one fp32 absmax per block of 64
_BNB4_DQ = Bits(4 + 8 / 64 + 32 / (64 * 256))  # absmax as uint8, one fp32 per 256 absmax
_PER_ROW8 = Bits(8, 32)  # int8 codes, one fp32 scale per output row

# SDNQ's plain weight types: SD.Next's 18 (vladmandic/sdnext@d11a619 modules/shared_items.py:184) and int4, the
# package's own (not an SD.Next choice); harness/engines/sdnq.py OPTIONS.
SDNQ_PLAIN = ("int8", "uint8", "int6", "uint6", "uint5", "uint4", "uint3", "uint2", "float8_e4m3fn", "float8_e3m4fn",
              "float6_e3m2fn", "float5_e2m2fn", "float4_e2m1fn", "float3_e1m1fn", "float2_e1m0fn", "int16", "uint16",
              "float16", "int4")


def _sdnq_code_bits(qtype: str) -> int:
    return int(re.search(r"\d+", qtype).group())  # int8 -> 8, float6_e3m2fn -> 6


def _sdnq_bits(qtype: str) -> Bits:
    """sdnq's automatic group for a Linear: 2 ** (2 + code bits) inputs, with an fp32 scale (and for unsigned types
    an fp32 zero point) per group; measured over 128x128 and 256x1024 layers with sdnq 0.2.8 (2026-12-07)."""
    bits = _sdnq_code_bits(qtype)
    return Bits(bits, per_group=64 if qtype.startswith("uint") else 32, group=2 ** (2 + bits))


def _sdnq_floor(qtype: str) -> Floor:
    bits = _sdnq_code_bits(qtype)
    return (FLOOR_8BIT if bits >= 8 and not qtype.startswith("float8") else FLOOR_FP8 if bits == 8
            else FLOOR_6BIT if bits >= 5 else FLOOR_4BIT if bits == 4 else FLOOR_2BIT)


CATALOG: dict[str, EngineInfo] = {e.name: e for e in (
    EngineInfo("none", ("-",), "harness.engines.none:NoneEngine", ALL_LOADS, title="the unquantized model", sdnext="-",
               floors={"-": FLOOR_FLOAT}),
    EngineInfo("bnb", ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8"), "harness.engines.bnb:BitsAndBytesEngine",
               ALL_LOADS, "bitsandbytes", title="BitsAndBytes", sdnext="removed",
               bits={"nf4": _BNB4, "fp4": _BNB4, "nf4-dq": _BNB4_DQ, "fp4-dq": _BNB4_DQ,
                     "int8": _PER_ROW8},  # LLM.int8: fp32 scale per row (SCB)
               floors={"int8": FLOOR_8BIT, **dict.fromkeys(("nf4", "nf4-dq", "fp4", "fp4-dq"), FLOOR_4BIT)}),
    EngineInfo("quanto", ("qint8", "qint4", "qint2", "qfloat8"), "harness.engines.quanto:QuantoEngine",
               ALL_LOADS, "optimum-quanto", "optimum.quanto", title="Optimum-Quanto", sdnext="removed", layer_depth=2,
               bits={"qint8": _PER_ROW8, "qfloat8": _PER_ROW8,
                     "qint4": Bits(4 + 2 * 32 / 128),  # groups of 128 with fp32 scale and shift
                     "qint2": Bits(2 + 2 * 32 / 128)},
               floors={"qint8": FLOOR_8BIT, "qfloat8": FLOOR_FP8, "qint4": FLOOR_4BIT, "qint2": FLOOR_2BIT}),
    EngineInfo("gguf", ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"), "harness.engines.gguf_engine:GGUFEngine",
               ALL_LOADS, "gguf", title="GGUF", sdnext="ships", file_suffix=".gguf",
               bits={"Q8_0": Bits(8.5),  # blocks of 32: 32 x int8 + fp16 scale
                     "Q5_1": Bits(6.0), "Q5_0": Bits(5.5), "Q4_1": Bits(5.0), "Q4_0": Bits(4.5)},
               floors={"Q8_0": FLOOR_8BIT, "Q5_1": FLOOR_6BIT, "Q5_0": FLOOR_6BIT, "Q4_1": FLOOR_4BIT,
                       "Q4_0": FLOOR_4BIT}),
    EngineInfo("nncf", ("int8_sym", "int8_asym", "int4_sym", "int4_asym", "int4_sym-g128", "int4_asym-g128"),
               "harness.engines.nncf_engine:NNCFEngine", package="nncf", title="NNCF", sdnext="removed", traces=True,
               bits={"int8_sym": Bits(8, 16),  # fp16 scale per row
                     "int8_asym": Bits(8, 16 + 8)},  # and a uint8 zero point
               floors={"int8_sym": FLOOR_8BIT, "int8_asym": FLOOR_8BIT, **dict.fromkeys(
                   ("int4_sym", "int4_asym", "int4_sym-g128", "int4_asym-g128"), FLOOR_4BIT)}),
    # The plain weight types, then SD.Next's options (vladmandic/sdnext@d11a619 modules/model_quant.py:148-169,
    # defaults modules/ui_definitions.py:176-195) as its reference models name them ("uint4-svd-r32"):
    # harness/engines/sdnq.py OPTIONS. Bits in float32 (scales, zero points and SVD factors in the compute dtype);
    # the group is sdnq's automatic one for a Linear, 2 ** (2 + code bits (+1 with SVD)) inputs, unless set.
    EngineInfo("sdnq", (*SDNQ_PLAIN, "uint4-svd-r32", "int8-matmul", "uint4-matmul-fp8", "uint4-g32",
                        "uint4-dynamic", "uint4-hadamard"), "harness.engines.sdnq:SDNQEngine",
               ALL_LOADS, "sdnq", title="SDNQ", sdnext="ships",
               bits={**{t: _sdnq_bits(t) for t in SDNQ_PLAIN},
                     "int8-matmul": Bits(8, 32),  # quantized matmul: one scale per output row
                     "uint4-matmul-fp8": _sdnq_bits("uint4"),  # the matmul's type leaves the storage as it is
                     "uint4-g32": Bits(4, per_group=64, group=32),
                     "uint4-hadamard": _sdnq_bits("uint4"),  # rotated weights, the same storage
                     "uint4-svd-r32": Bits(4, per_group=64, group=128, rank=32, rank_bits=32)},
               # SD.Next quantizes a text encoder with the model's weight type ("Same as model") and without a
               # quantized matmul unless set (vladmandic/sdnext@d11a619 modules/ui_definitions.py:178-179,
               # modules/model_quant.py:104-119: sdnq_quantize_matmul_mode_te defaults to "disabled")
               text_encoder_types={"int8-matmul": "int8", "uint4-matmul-fp8": "uint4"},
               floors={**{t: _sdnq_floor(t) for t in SDNQ_PLAIN}, "int8-matmul": FLOOR_8BIT,
                       **dict.fromkeys(("uint4-svd-r32", "uint4-matmul-fp8", "uint4-g32", "uint4-dynamic",
                                        "uint4-hadamard"), FLOOR_4BIT)}),
    EngineInfo("torchao", ("int8_weight_only", "int8_dynamic", "float8_weight_only", "int4_weight_only"),
               "harness.engines.torchao_engine:TorchAOEngine", ("post-load", "on-the-fly"), "torchao",
               title="torchao", sdnext="removed",
               floors={"int8_weight_only": FLOOR_8BIT, "int8_dynamic": FLOOR_8BIT, "float8_weight_only": FLOOR_FP8,
                       "int4_weight_only": FLOOR_4BIT}),
    # SD.Next's "TensorRT" quantization, its five types as it names them (vladmandic/sdnext@d11a619
    # modules/model_quant.py:55-61): int8 and fp8 with one scale per tensor, int4 with a scale (float32 here) per
    # block of 128 inputs; nf4 and nvfp4 (block 128 too, as SD.Next sets them) are measured, not stated
    EngineInfo("modelopt", ("int8", "fp8", "int4", "nf4", "nvfp4"), "harness.engines.modelopt_engine:ModelOptEngine",
               package="nvidia-modelopt", import_name="modelopt", title="TensorRT Model Optimizer", sdnext="ships",
               layer_depth=3,
               bits={"int8": Bits(8), "fp8": Bits(8), "int4": Bits(4, per_group=32, group=128)},
               floors={"int8": FLOOR_8BIT, "fp8": FLOOR_FP8,
                       **dict.fromkeys(("int4", "nf4", "nvfp4"), FLOOR_4BIT)}),
    # diffusers loads AutoRound checkpoints only; the engine's API writes them (harness/engines/autoround_engine.py)
    EngineInfo("autoround", ("W4A16", "W8A16"), "harness.engines.autoround_engine:AutoRoundEngine", (),
               "auto-round", "auto_round", title="AutoRound",
               floors={"W4A16": FLOOR_4BIT, "W8A16": FLOOR_8BIT}),
    # diffusers' nunchaku_lite: Nunchaku's SVDQuant W4A4 checkpoints (int4, nvfp4), loaded only, CUDA only
    EngineInfo("nunchaku", ("svdq-int4", "svdq-nvfp4"), "harness.engines.nunchaku_engine:NunchakuEngine", (),
               title="Nunchaku", sdnext="ships", floors=dict.fromkeys(("svdq-int4", "svdq-nvfp4"),
                                                                              FLOOR_4BIT)),
    EngineInfo("fault", ("abort", "segfault", "hang", "spin", "oom", "exit", "raise", "flood", "orphan", "nan",
                         "noise", "slow"),
               "harness.engines.fault:FaultEngine", hidden=True, title="fault (test-only)",
               # the float model otherwise
               floors=dict.fromkeys(("flood", "orphan", "nan", "noise", "slow"), FLOOR_8BIT)),
)}



def register(info: EngineInfo) -> EngineInfo:
    """Add an engine defined outside this table: a module named in QUANTMATRIX_ENGINES calls this with its row
    before it defines its Engine class (and keeps torch out of its top level: this table is read without torch).
    Its repro fragment, if any, is its own REPRO (harness/repro.py)."""
    if info.name in CATALOG:
        raise ValueError(f"engine {info.name!r} is already in the catalog")
    CATALOG[info.name] = info
    return info


# Engines from outside the harness: modules (dotted names, comma-separated) imported here, each registering its row
PLUGINS = "QUANTMATRIX_ENGINES"
for _module in filter(None, (m.strip() for m in os.environ.get(PLUGINS, "").split(","))):
    importlib.import_module(_module)

ENGINE_NAMES = tuple(CATALOG)


def text_encoder_type(engine: str, qtype: str) -> str:
    """The type a text encoder is quantized with when the model's is `qtype` (EngineInfo.text_encoder_types)."""
    return CATALOG[engine].text_encoder_types.get(qtype, qtype) if engine in CATALOG else qtype


def output_floor(engine: str, qtype: str, cast: str = "-") -> Floor | None:
    """The output error floor of a cell's type and of its layerwise casting; None where no floor is known. With
    both, the two formats' errors are independent, so their noise powers add: 10^(-floor/10) each."""
    floor = CATALOG[engine].floors.get(qtype) if engine in CATALOG else None
    cast_floor = CAST_FLOORS.get(cast)
    if engine == "none" and cast_floor is not None:  # the float model's only error is the casting's
        return cast_floor
    if floor is None or cast_floor is None:
        return floor or cast_floor

    def added(a: float, b: float) -> float:
        return round(-10 * math.log10(10 ** (-a / 10) + 10 ** (-b / 10)), 1)

    return Floor(added(floor.sqnr_db, cast_floor.sqnr_db), added(floor.psnr_db, cast_floor.psnr_db),
                 f"{floor.why}, with {cast_floor.why} (their noise powers added)")
ENGINE_TITLES = {name: e.title for name, e in CATALOG.items()}
QTYPE_NAMES = tuple(sorted({q for e in CATALOG.values() for q in e.qtypes}))
