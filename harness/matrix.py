"""The matrix model: cells, expectation rules, loading a matrix file and expanding it.

A matrix file (TOML) declares axes, optional models from disk, include/exclude tables and expectation rules:

    [models.my-flux]           # optional: a model read from disk (models/sources.py), named in [axes] model
    path = "/data/FLUX.1-dev"  # pipeline dir (model_index.json), model dir (config.json), or a .safetensors file
    config = "..."             # the single file's architecture (a directory with config.json)
    call = { height = 512 }    # pipelines: the call's arguments over the defaults (2 steps, 32 latent pixels)
    [models.my-shape]          # or a diffusers class at a shape of one's own, with seeded weights
    class = "FluxTransformer2DModel"
    config = { num_layers = 1, num_single_layers = 2, attention_head_dim = 32, num_attention_heads = 4,
               joint_attention_dim = 128, pooled_projection_dim = 128, axes_dims_rope = [8, 12, 12] }
                               # over the class's defaults, or a directory with config.json

    [axes]
    engine  = ["*"]            # "*": every registered engine
    qtype   = ["*"]            # "*": every type of each engine; names filter across engines
    load    = ["post-load"]    # "*": every load mode each engine offers
    offload = ["none", "model", "sequential", "balanced", "group"]
    device  = ["present"]      # "present": the devices this host has; "*": all known
    model   = ["dit-xs", "flux-tiny"]
    dtype   = ["float32"]
    stack   = ["direct", "diffusers"]   # optional (default "direct"); diffusers runs only the real model classes
    cast    = ["-", "float8_e4m3fn"]     # optional (default "-"): diffusers' layerwise casting, diffusers stack only
    components = ["denoiser", "denoiser+te"]   # optional (default "denoiser"): a pipeline's quantized components
    compile = ["-", "regional"]  # optional (default "-"): torch.compile, "regional" or "full"
    lora    = ["-", "r4"]        # optional (default "-"): a LoRA of rank 4 or 16 on the denoiser
    lora_fuse = ["unfused"]      # optional: "unfused" | "fused" | "merged" (SD.Next's SDNQ path), with a LoRA

    [[exclude]]                # drop cells matching every field given (a value or a list of values)
    offload = "balanced"
    model = "unet-xs"

    [[include]]                # add the product of these values (fields left out take the axes' values)
    engine = "none"
    dtype = "bfloat16"

    [[rule]]                   # expectation; rules are checked in order and the first match decides
    match = { engine = "bnb", qtype = "nf4", offload = "sequential" }
    expect = "error"           # "works" | "error" | "unavailable"
    pattern = "Blockwise quantization only supports 16/32-bit floats"   # regex over "Type: message"
    source = "seed: Errors"
    section = "Errors"         # optional: the [document] section the statement is in (for the wiki patch)
    statement = "BitsAndBytes nf4 quantization is not compatible with sequential offload"   # optional: verbatim
    versions = { torch = ">=2.4" }   # optional: the rule holds only for these releases of torch, an engine,
                               # diffusers, accelerate,
                               # triton, or the GPU's cuda_capability; "absent": only when it is not there
    reason = "..."             # for "unavailable"
    claims = ["smaller", "slower"]   # for "works": measured against the baseline cell (see CLAIMS); with a
                               # published factor: "smaller-by:3.0", "less-memory-by:2.5", "slower-by:1.5"
    judges = { claims = ["slower"], offload = "none" }   # optional: the cells and claims that test the statement
                               # (the wiki patch judges it by those only; the run judges every cell it matches)
    tolerance = 0.1            # a claim holds beyond this ratio margin, is contradicted beyond it on the other side

    [document]                 # optional: the page the rules state (quantmatrix report --doc-patch)
    title = "Quantization"
    url = "https://github.com/vladmandic/sdnext/wiki/Quantization"
    sections = ["Quantization", "BitsAndBytes", "Errors"]   # in the page's order

    [settings]                 # run settings, see Settings
    [offload.balanced]         # high_watermark / low_watermark, fractions of device memory; always, never
                               # (class names), models_not_to_offload (SD.Next's model types: "f1", "sdxl")
    [offload.group]            # type ("leaf_level" | "block_level"), blocks_per_group, use_stream, low_cpu_mem_usage
"""

from __future__ import annotations

import enum
import itertools
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from harness.cell import AXES, BASELINE, Cell
from harness.engines.catalog import CATALOG
from harness.errors import QuantMatrixError, did_you_mean
from harness.models import sources
from harness.models.sources import Source
from harness.models.specs import MODELS, component_names
from harness.settings import Settings
from harness.stacks.catalog import STACK_CATALOG


class ExpectKind(enum.StrEnum):
    """What a rule documents for the cells it matches."""

    WORKS = "works"
    ERROR = "error"  # fails with an error matching the rule's pattern
    UNAVAILABLE = "unavailable"  # cannot be used (only the harness makes a cell unavailable; see verdict.judge)


EXPECT_KINDS = tuple(k.value for k in ExpectKind)
# Claims a rule can make about a cell's measurements, each against its baseline cell (the unquantized model with
# the same load, offload, device, model and dtype, run in the same run).
CLAIMS = {
    "smaller": "stored bytes below the baseline's",
    "less-memory": "peak memory (above the cell's start) below the baseline's",
    # latency: the cell's steps timed in pairs with its float model's in the same process (metrics.latency_vs_float),
    # judged on the ratio's 90% interval, so a busy machine cannot decide them
    "slower": "step latency above the float model's (its paired interval beyond the tolerance)",
    "faster": "step latency below the float model's (its paired interval beyond the tolerance)",
    "not-slower": "step latency not above the float model's (compute-optimized kernels)",
    "name-matches-contents": "the pre-quantized file's conventional name agrees with the engine and type detected "
                             "from its contents",
}
# A claim with a factor, as published figures state them: "smaller-by:3.0" (stored bytes at most a third of the
# baseline's), "less-memory-by:2.5" (peak memory), "slower-by:1.5" (latency at least
# 1.5x the float model's, all of its paired interval).
FACTOR_CLAIMS = {"smaller-by": "smaller", "less-memory-by": "less-memory", "slower-by": "slower"}
_FACTOR = re.compile(r"^(?P<claim>[a-z-]+-by):(?P<factor>\d+(\.\d+)?)$")


def parse_claim(text: str) -> tuple[str, float | None] | None:
    """(claim, factor) of a claim's text: ("smaller", None), ("smaller-by", 3.0); None when it is no claim."""
    if text in CLAIMS:
        return text, None
    found = _FACTOR.match(text)
    if found and found["claim"] in FACTOR_CLAIMS and float(found["factor"]) > 1:
        return found["claim"], float(found["factor"])
    return None
DEFAULT_TOLERANCE = 0.1


@dataclass(frozen=True)
class Expectation:
    kind: ExpectKind = ExpectKind.WORKS
    pattern: str | None = None
    source: str | None = None
    reason: str | None = None
    claims: tuple[str, ...] = ()
    tolerance: float = DEFAULT_TOLERANCE
    rule: int | None = None  # index of the rule in its matrix file; None: no rule matched
    statement: str | None = None  # the documented sentence, verbatim
    section: str | None = None  # where in the document it is

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ExpectKind(self.kind))

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in vars(self).items()
                               if v is not None and k not in ("claims", "tolerance")}
        if self.claims:
            out["claims"], out["tolerance"] = list(self.claims), self.tolerance
        return out


@dataclass(frozen=True)
class Rule:
    match: Mapping[str, tuple[str, ...]]
    expect: Expectation
    versions: Mapping[str, SpecifierSet | None] = field(default_factory=dict)  # None: must be absent
    # Which of its cells and claims test the documented statement (the wiki patch judges it by those only): a
    # statement of speed by its latency claims, one of a load mode by the cells without offload. Empty: all.
    judges: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    judged_claims: tuple[str, ...] = ()

    def matches(self, cell: Cell) -> bool:
        return all(getattr(cell, k) in values for k, values in self.match.items())

    def judges_cell(self, cell: Any) -> bool:
        """Whether a cell tests the statement: it is among `judges`, and untreated (`untreated`)."""
        return all(getattr(cell, k) in values for k, values in self.judges.items()) and self.untreated(cell)

    def untreated(self, cell: Any) -> bool:
        """Whether every treatment the rule does not name (layerwise casting, quantized components, compile, LoRA)
        is at its default for the cell: a statement about an engine is never judged by what compile or a LoRA does
        to it."""
        return all(getattr(cell, axis.name) == axis.default for axis in AXES
                   if axis.treatment and axis.name not in self.match and axis.name not in self.judges)

    def holds_for(self, versions: Mapping[str, str | None]) -> bool:
        """Whether the rule applies with these versions (a spec of None: the package must be absent)."""
        for package, spec in self.versions.items():
            found = versions.get(package)
            if spec is None or found is None:
                if (spec is None) != (found is None):
                    return False
                continue
            try:
                if Version(found) not in spec:
                    return False
            except InvalidVersion:
                return False
        return True


@dataclass(frozen=True)
class Document:
    """The page a matrix's rules state, for the wiki patch: its title, address and sections in order."""

    title: str
    url: str = ""
    sections: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()  # engines the page documents that the tool no longer ships
    removed_in: str = ""  # the release that removed them
    removed_note: str = ""  # what the tool ships instead, as its release notes say
    page: Path | None = None  # the page's text as the project keeps it: what the edited page and its diff start from


@dataclass(frozen=True)
class Matrix:
    path: Path
    name: str
    cells: tuple[Cell, ...]
    rules: tuple[Rule, ...]
    settings: Settings
    document: Document | None = None

    def expectation(self, cell: Cell, versions: Mapping[str, str | None] | None = None) -> Expectation:
        """The first rule that matches the cell and holds for these versions decides; none: it must work."""
        for rule in self.rules:
            if rule.matches(cell) and (versions is None or rule.holds_for(versions)):
                return rule.expect
        return Expectation()

    def with_baselines(self, cells: Iterable[Cell]) -> list[Cell]:
        """`cells`, baselines first, plus the baseline of every cell a rule makes claims about (the claims are
        measured against it, in the same run)."""
        cells = list(cells)
        have = set(cells)
        extra = [c.baseline for c in cells if any(r.expect.claims and r.matches(c) for r in self.rules)]
        cells.extend(dict.fromkeys(b for b in extra if b not in have))
        return sorted(cells, key=lambda c: c.engine != BASELINE)


# ---------------------------------------------------------------------------------------------- loading

_TOP_KEYS = {"matrix", "models", "axes", "include", "exclude", "rule", "settings", "offload", "document"}
# What a rule's `versions` may name besides an engine (or its package), as a record's env notes it.
VERSIONED = ("torch", "triton", "diffusers", "accelerate", "cuda_capability")
PACKAGE_ENGINES = {e.package: e.name for e in CATALOG.values() if e.package and e.package != e.name}

_RULE_KEYS = {"match", "expect", "pattern", "source", "reason", "versions", "claims", "tolerance", "statement",
              "section", "judges"}


class _Doc:
    """Typed access to a parsed TOML document that reports mistakes with the file, line and key."""

    def __init__(self, path: Path, text: str = ""):
        self.path, self.text = path, text

    def fail(self, key: str, message: str) -> QuantMatrixError:
        return QuantMatrixError(message, path=self.path, key=key, line=_line_of(self.text, key))

    def table(self, value: Any, key: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a table, got {_kind(value)}")
        return value

    def strings(self, value: Any, key: str) -> list[str]:
        """A string or a non-empty list of unique strings."""
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise self.fail(key, f"expected a string or a non-empty list of strings, got {_kind(value)}")
        dupes = sorted({v for v in value if value.count(v) > 1})
        if dupes:
            raise self.fail(key, f"duplicate values {dupes}; expected each value once")
        return value

    def check_keys(self, table: dict, allowed: Iterable[str], key: str) -> None:
        allowed = sorted(allowed)
        for k in table:
            if k not in allowed:
                where = f"{key}.{k}" if key else k
                raise self.fail(where, f"unknown key{did_you_mean(k, allowed)}; expected one of {allowed}")


def _line_of(text: str, key: str) -> int | None:
    """The line (1-based) where `key` (e.g. "axes.offload", "rule[2].pattern") is written, best effort: tomllib
    gives no positions, so the table header is found first, then the key inside its block."""
    parts = re.findall(r"([A-Za-z0-9_-]+)(?:\[(\d+)\])?", key)
    if not parts or not text:
        return None
    lines = text.splitlines()
    headers = []  # (line index, dotted name)
    for i, line in enumerate(lines):
        m = re.match(r"\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$", line)
        if m:
            headers.append((i, re.sub(r"\s+", "", m.group(1))))

    def find(name: str, start: int, end: int) -> int | None:
        pattern = re.compile(rf"(^|[{{,])\s*\"?{re.escape(name)}\"?\s*=")
        return next((i for i in range(start, end) if pattern.search(lines[i])), None)

    for k in range(len(parts), 0, -1):
        name = ".".join(p for p, _ in parts[:k])
        matching = [i for i, h in headers if h == name]
        index = int(parts[k - 1][1]) if parts[k - 1][1] else 0
        if len(matching) > index:
            start = matching[index]
            end = next((i for i, _ in headers if i > start), len(lines))
            if k == len(parts):
                return start + 1
            found = find(parts[k][0], start + 1, end)
            return (found if found is not None else start) + 1
    first_header = headers[0][0] if headers else len(lines)
    found = find(parts[0][0], 0, first_header)
    return None if found is None else found + 1


def _kind(value: Any) -> str:
    return {dict: "a table", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)


# Expanded together, from the engines' catalog: each engine's own types and load modes.
QUANT_AXES = ("engine", "qtype", "load")


def optional_axes() -> dict[str, list[str]]:
    """Axes a matrix file may leave out, and the values they then take (files written before these axes existed)."""
    return {name: [default] for name, default in AXES.defaults.items()}


def _axis_values(doc: _Doc, axis: str, raw: Any, key: str, *, wildcards: bool, table: Mapping | None = None
                 ) -> list[str]:
    """The axis's values, each checked against what it may be. `table`: the table they were read from, whose
    engines narrow the types a mistake is told about."""
    values = doc.strings(raw, key)
    known = AXES[axis].known()
    specials = set(AXES[axis].wildcards)
    for v in values:
        if wildcards and v in specials:
            continue
        if v not in known:
            if axis == "qtype":
                raise doc.fail(key, _unknown_qtype(v, (table or {}).get("engine")))
            raise doc.fail(key, f"unknown {axis} {v!r}{did_you_mean(v, known)}; expected one of {list(known)}"
                           + (f" or {sorted(specials)}" if wildcards else "") + _explain(axis))
    return values


def _unknown_qtype(value: str, engines: Any) -> str:
    """An unknown type, with the types of the engines the table names (every engine's but the test-only ones
    when it names none): "unknown qtype 'nf5'; quanto offers qint2, qint4, qint8, qfloat8"."""
    from harness.engines.catalog import CATALOG

    named = [e for e in ([engines] if isinstance(engines, str) else engines or []) if e in CATALOG]
    shown = named or [e for e, info in CATALOG.items() if not info.hidden]
    offered = sorted({q for e in shown for q in CATALOG[e].qtypes})
    if named:
        return (f"unknown qtype {value!r}{did_you_mean(value, offered)}; expected a type of "
                + "; ".join(f"{e}: {', '.join(CATALOG[e].qtypes)}" for e in named) + " (or '*')")
    return f"unknown qtype {value!r}{did_you_mean(value, offered)}; expected one of {offered} or ['*']"


def _explain(axis: str) -> str:
    """What an axis's values stand for, where a value alone does not say (the pipelines' components)."""
    if axis != "components":
        return ""
    return " (" + "; ".join(f"{m}: " + ", ".join(f"{k} = {'+'.join(v)}" for k, v in component_names(m).items())
                            for m, spec in MODELS.items() if spec.pipeline and not spec.shared_weights) + ")"


@dataclass(frozen=True)
class _Expansion:
    """What a table of axes expands to, before any cell is made: the engine/type/load combinations and the values
    of every other axis. `count` multiplies them (an upper bound: the stacks, components and LoRA filters come
    after) without enumerating anything."""

    quant: list[tuple[str, str, str]]
    rest: list[list[str]]

    @property
    def count(self) -> int:
        return len(self.quant) * math.prod(len(v) for v in self.rest)

    def widths(self) -> str:
        """The axes with more than one value and how many each has: "engine/qtype/load 96 x model 31 x ..."."""
        names = [QUANT_AXES, *((a,) for a in AXES.names[3:])]
        sizes = [len(self.quant), *map(len, self.rest)]
        return " x ".join(f"{'/'.join(n)} {k}" for n, k in zip(names, sizes, strict=True) if k > 1)


def _expansion(axes: Mapping[str, list[str]], present_devices: tuple[str, ...]) -> _Expansion:
    """Every valid engine/qtype/load combination, and the other axes' values ("*" and "present" resolved)."""
    def resolve(axis: str) -> list[str]:
        values = axes[axis]
        out: list[str] = []
        for v in values:
            if v == "*" and axis == "engine":  # test-only engines run only when named
                out.extend(name for name, e in CATALOG.items() if not e.hidden)
            elif v == "*":
                out.extend(AXES[axis].known())
            elif v == "present":
                out.extend(present_devices)
            else:
                out.append(v)
        return list(dict.fromkeys(out))

    qtype_filter, load_filter = axes["qtype"], axes["load"]
    quant: list[tuple[str, str, str]] = []
    for name in resolve("engine"):
        engine = CATALOG[name]
        qtypes = engine.qtypes if "*" in qtype_filter else [q for q in engine.qtypes if q in qtype_filter]
        if name == BASELINE:
            qtypes = engine.qtypes  # the baseline is a cell whatever types are asked for
        loads = engine.loads if "*" in load_filter else load_filter
        quant.extend((name, q, m) for q in qtypes for m in loads)
    if AXES.names[:3] != QUANT_AXES:
        raise AssertionError(f"the axes {QUANT_AXES} must lead AXES (the id's first parts)")
    return _Expansion(quant, [resolve(a) for a in AXES.names[3:]])


# The most cells a matrix may expand to unless the caller raises it (--max-cells): a matrix of every axis "*" is
# tens of millions of combinations, which would exhaust memory before a cell runs
MAX_CELLS = 100_000


def _bounded(doc: _Doc, key: str, expansion: _Expansion, total: int, max_cells: int) -> int:
    """`total` plus this table's combinations; over `max_cells`, one line with the count and how to narrow it."""
    total += expansion.count
    if total > max_cells:
        raise doc.fail(key, f"expands to {total:,} combinations, over the limit of {max_cells:,} cells "
                       f"({expansion.widths()}); narrow the widest axes (\"*\" is every known value) or raise the "
                       "limit with --max-cells")
    return total


def _product(expansion: _Expansion) -> list[Cell]:
    """The cells of an expansion: every engine/qtype/load combination times the other axes."""
    quant, rest = expansion.quant, expansion.rest
    cells = [Cell.of((e, q, m, *combo)) for (e, q, m) in quant for combo in itertools.product(*rest)]
    default = AXES["components"].default
    # The baseline quantizes nothing: it is the cell of the default components, whichever were asked for
    cells = [c.replace(components=default) if c.engine == BASELINE and c.components != default else c for c in cells]
    return list(dict.fromkeys(c for c in cells if runs_on_its_stack(c) and has_components(c) and lora_fused(c)))


def has_components(cell: Cell) -> bool:
    """Whether the model has what the cell quantizes (a denoiser alone has no text encoder)."""
    return cell.components in component_names(cell.model)


def lora_fused(cell: Cell) -> bool:
    """Whether the cell's LoRA application has a LoRA to apply (without one, only the default is a cell)."""
    return cell.lora != "-" or cell.lora_fuse == AXES["lora_fuse"].default


def _check_components(doc: _Doc, key: str, table: Mapping[str, list[str]]) -> None:
    """A components value named for a model that lacks it is bad input (a "*" narrows instead)."""
    wanted = [v for v in table.get("components", ()) if v != "*"]
    for model in (m for m in table.get("model", ()) if m in MODELS):
        own = component_names(model)
        for value in wanted:
            if value not in own:
                parts = "; ".join(f"{k} = {'+'.join(v)}" for k, v in own.items())
                raise doc.fail(f"{key}.components", f"model {model!r} has no component {value!r} (its components: "
                               f"{parts}); expected one of {list(own)}")


def runs_on_its_stack(cell: Cell) -> bool:
    """Whether the cell's stack has the combination at all (the diffusers stack loads diffusers' model classes,
    not the harness's imitations, and alone casts layerwise): a matrix naming both stacks gets these only."""
    return STACK_CATALOG[cell.stack].accepts(cell.model, cell.cast)


def _selector(doc: _Doc, raw: Any, key: str, *, wildcards: bool = False) -> dict[str, tuple[str, ...]]:
    table = doc.table(raw, key)
    doc.check_keys(table, AXES.names, key)
    if not table:
        raise doc.fail(key, "empty table; expected at least one of " + ", ".join(AXES.names))
    return {k: tuple(_axis_values(doc, k, v, f"{key}.{k}", wildcards=wildcards, table=table))
            for k, v in table.items()}


# Settings that must be above zero (a zero or NaN timeout would never time a cell out; a batch of 0 runs nothing)
POSITIVE = ("batch", "min_steps", "max_steps", "cell_timeout_s")

# Settings field -> key of [offload.group] (SD.Next's group offload options)
_GROUP = {"group_type": "type", "group_blocks": "blocks_per_group", "group_stream": "use_stream",
          "group_low_cpu_mem": "low_cpu_mem_usage"}


def _settings(doc: _Doc, data: dict) -> Settings:
    raw = dict(doc.table(data.get("settings", {}), "settings"))
    defaults = Settings()
    allowed = {f.name for f in fields(Settings)} - {"high_watermark", "low_watermark", "models",
                                                    "models_not_to_offload"} - set(_GROUP)
    doc.check_keys(raw, allowed, "settings")
    offload = doc.table(data.get("offload", {}), "offload")
    doc.check_keys(offload, ["balanced", "group"], "offload")
    balanced = dict(doc.table(offload.get("balanced", {}), "offload.balanced"))
    doc.check_keys(balanced, ["high_watermark", "low_watermark", "always", "never", "models_not_to_offload"],
                   "offload.balanced")
    group = doc.table(offload.get("group", {}), "offload.group")
    doc.check_keys(group, list(_GROUP.values()), "offload.group")
    values: dict[str, Any] = {}
    for field_name, key in _GROUP.items():
        if key not in group:
            continue
        value, where = group[key], f"offload.group.{key}"
        if field_name == "group_type" and value not in ("leaf_level", "block_level"):
            raise doc.fail(where, f"expected \"leaf_level\" or \"block_level\", got {value!r}")
        if field_name == "group_blocks" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise doc.fail(where, f"expected an integer >= 1, got {value!r}")
        if field_name in ("group_stream", "group_low_cpu_mem") and not isinstance(value, bool):
            raise doc.fail(where, f"expected true or false, got {_kind(value)}")
        values[field_name] = value
    for key in ("always", "never"):
        if key in balanced:
            values[f"offload_{key}"] = tuple(doc.strings(balanced.pop(key), f"offload.balanced.{key}"))
    if "models_not_to_offload" in balanced:
        values["models_not_to_offload"] = tuple(doc.strings(balanced.pop("models_not_to_offload"),
                                                            "offload.balanced.models_not_to_offload"))
    for key, value in {**raw, **balanced}.items():
        where = f"offload.balanced.{key}" if key in balanced else f"settings.{key}"
        expected = float if key.endswith("watermark") else type(getattr(defaults, key))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (expected is int and
                                                                            not isinstance(value, int)):
            raise doc.fail(where, f"expected {'an integer' if expected is int else 'a number'}, got {_kind(value)}")
        if not math.isfinite(value):
            raise doc.fail(where, f"expected a finite number, got {value}")
        if key in POSITIVE and value <= 0:
            raise doc.fail(where, f"expected a value > 0, got {value}")
        if value < 0 and not key.endswith("watermark"):  # a watermark SD.Next corrects (offload.sdnext_watermarks)
            raise doc.fail(where, f"expected a value >= 0, got {value}")
        values[key] = expected(value)
    settings = Settings(**values)
    if settings.min_steps > settings.max_steps:
        raise doc.fail("settings", f"expected min_steps <= max_steps, got {settings.min_steps} and "
                       f"{settings.max_steps}")
    low, high = settings.low_watermark, settings.high_watermark
    if (low is None) != (high is None):
        raise doc.fail("offload.balanced", "expected both high_watermark and low_watermark, or neither (SD.Next's "
                       "defaults for the device's memory class)")
    return settings  # watermarks outside 0 <= low <= high <= 1: SD.Next corrects them, so does the run (offload.py)


def _document(doc: _Doc, data: dict) -> Document | None:
    if "document" not in data:
        return None
    raw = doc.table(data["document"], "document")
    doc.check_keys(raw, ["title", "url", "sections", "removed", "removed_in", "removed_note", "page"], "document")
    for k in ("title", "url", "removed_in", "removed_note", "page"):
        if k in raw and not isinstance(raw[k], str):
            raise doc.fail(f"document.{k}", f"expected a string, got {_kind(raw[k])}")
    if not raw.get("title"):
        raise doc.fail("document.title", "missing; expected the page's title")
    sections = doc.strings(raw.get("sections", []), "document.sections") if "sections" in raw else []
    removed = tuple(_axis_values(doc, "engine", raw["removed"], "document.removed", wildcards=False)) \
        if "removed" in raw else ()
    if removed and not raw.get("removed_in"):
        raise doc.fail("document.removed_in", "missing; expected the release that removed the engines in removed")
    page = None
    if raw.get("page"):
        page = (doc.path.parent / raw["page"]).resolve()
        if not page.is_file():
            raise doc.fail("document.page", f"no file {raw['page']!r} (from {doc.path.parent}); expected the page's "
                           "text, relative to the matrix file")
    return Document(raw["title"], raw.get("url", ""), tuple(sections), removed, raw.get("removed_in", ""),
                    raw.get("removed_note", ""), page)


def _rule(doc: _Doc, raw: Any, key: str, index: int, document: Document | None = None) -> Rule:
    table = doc.table(raw, key)
    doc.check_keys(table, _RULE_KEYS, key)
    if "match" not in table:
        raise doc.fail(f"{key}.match", "missing; expected a table of cell fields to match")
    match = _selector(doc, table["match"], f"{key}.match")
    kind = table.get("expect")
    if kind not in EXPECT_KINDS:
        raise doc.fail(f"{key}.expect", f"expected one of {list(EXPECT_KINDS)}, got {kind!r}"
                       + (did_you_mean(kind, EXPECT_KINDS) if isinstance(kind, str) else ""))
    for k in ("pattern", "source", "reason", "statement", "section"):
        if k in table and not isinstance(table[k], str):
            raise doc.fail(f"{key}.{k}", f"expected a string, got {_kind(table[k])}")
    pattern = table.get("pattern")
    if kind == "error":
        if not pattern:
            raise doc.fail(f"{key}.pattern", "missing; an 'error' rule needs a regular expression to match")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise doc.fail(f"{key}.pattern", f"invalid regular expression ({exc}); expected a Python regex") from None
    if kind == "unavailable" and not table.get("reason"):
        raise doc.fail(f"{key}.reason", "missing; an 'unavailable' rule must say why")
    versions = _rule_versions(doc, table, key)
    claims = _rule_claims(doc, table, key, kind)
    tolerance = table.get("tolerance", DEFAULT_TOLERANCE)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise doc.fail(f"{key}.tolerance", f"expected a number from 0 up to (not including) 1, got {tolerance!r}")
    section = table.get("section")
    if section is not None and (document is None or section not in document.sections):
        known = list(document.sections) if document else []
        raise doc.fail(f"{key}.section", f"unknown section {section!r}{did_you_mean(section, known)}; expected one "
                                         f"of [document] sections {known}")
    expect = Expectation(kind, pattern, table.get("source"), table.get("reason"), tuple(claims), float(tolerance),
                         index, table.get("statement"), section)
    judges = dict(doc.table(table.get("judges", {}), f"{key}.judges"))
    judged_claims = doc.strings(judges.pop("claims"), f"{key}.judges.claims") if "claims" in judges else []
    names = [c.split(":")[0] for c in claims]
    for c in judged_claims:
        if c not in names:
            raise doc.fail(f"{key}.judges.claims", f"{c!r} is not one of the rule's claims; expected one of {names}")
    if "judges" in table and "statement" not in table:
        raise doc.fail(f"{key}.judges", "judges says which cells test the rule's statement; expected a statement")
    return Rule(match, expect, versions, _selector(doc, judges, f"{key}.judges") if judges else {},
                tuple(judged_claims))


def _rule_versions(doc: _Doc, table: dict, key: str) -> dict[str, SpecifierSet | None]:
    """A rule's `versions`: package (an engine, its distribution, or one of VERSIONED) -> specifier, or None for
    "absent"."""
    versions: dict[str, SpecifierSet | None] = {}
    for package, spec in doc.table(table.get("versions", {}), f"{key}.versions").items():
        if package in PACKAGE_ENGINES:  # an engine named by its distribution ("bitsandbytes"): records key engines
            package = PACKAGE_ENGINES[package]
        elif package not in CATALOG and package not in VERSIONED:
            raise doc.fail(f"{key}.versions.{package}", "unknown; expected an engine or its package ("
                           + ", ".join(sorted({*CATALOG, *PACKAGE_ENGINES} - {"none", "fault"}))
                           + ") or one of " + ", ".join(VERSIONED))
        if not isinstance(spec, str):
            raise doc.fail(f"{key}.versions.{package}", f"expected a version specifier string, got {_kind(spec)}")
        if spec == "absent":
            versions[package] = None
            continue
        try:
            versions[package] = SpecifierSet(spec)
        except InvalidSpecifier:
            raise doc.fail(f"{key}.versions.{package}",
                           f"invalid version specifier {spec!r}; expected e.g. '>=2.4,<2.6' or 'absent'") from None
    return versions


def _rule_claims(doc: _Doc, table: dict, key: str, kind: str) -> list[str]:
    """A rule's `claims`, each a known claim or a factor claim; only a rule that expects the cell to work has any."""
    claims: list[str] = []
    if "claims" in table:
        claims = doc.strings(table["claims"], f"{key}.claims")
        for c in claims:
            if parse_claim(c) is None:
                raise doc.fail(f"{key}.claims", f"unknown claim {c!r}{did_you_mean(c, CLAIMS)}; expected one of "
                                                f"{list(CLAIMS)}, or {', '.join(f'{k}:F' for k in FACTOR_CLAIMS)} "
                                                f"with a factor F above 1")
        if kind != "works":
            raise doc.fail(f"{key}.claims", f"claims need a cell that runs; expected expect = 'works', got {kind!r}")
    return claims


def parse_matrix(text: str, path: Path | str = "<matrix>", *, present_devices: tuple[str, ...] = ("cpu",),
                 max_cells: int = MAX_CELLS) -> Matrix:
    """Validate a matrix document and expand it into its cells (refused, before expanding, over `max_cells`)."""
    path = Path(path)
    doc = _Doc(path, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"line (\d+)", str(exc))
        line = int(found.group(1)) if found else (text.count("\n") or 1) if "end of document" in str(exc) else None
        raise QuantMatrixError(f"TOML syntax error: {exc}", path=path, line=line) from None
    doc.check_keys(data, _TOP_KEYS, "")
    meta = doc.table(data.get("matrix", {}), "matrix")
    doc.check_keys(meta, ["name", "description"], "matrix")
    models = _models(doc, data)  # before the axes: they may name these models
    axes = _axes(doc, data)
    expansion = _expansion(axes, present_devices)
    total = _bounded(doc, "axes", expansion, 0, max_cells)
    cells = _product(expansion)
    for i, raw in enumerate(_array(doc, data, "include")):
        key = f"include[{i}]"
        sel = _selector(doc, raw, key, wildcards=True)
        table = {a: list(sel.get(a, axes[a])) for a in AXES.names}
        if "components" in sel:  # inherited from [axes], a value the model lacks narrows instead
            _check_components(doc, key, table)
        expansion = _expansion(table, present_devices)
        total = _bounded(doc, key, expansion, total, max_cells)
        extra = _product(expansion)
        if not extra:
            raise doc.fail(key, "adds no cell (no engine offers that qtype/load); expected at least one")
        cells.extend(extra)
    for i, raw in enumerate(_array(doc, data, "exclude")):
        key = f"exclude[{i}]"
        sel = _selector(doc, raw, key)
        cells = [c for c in cells if not all(getattr(c, k) in v for k, v in sel.items())]
    cells = sorted(set(cells))
    if not cells:
        raise doc.fail("axes", "the matrix expands to no cell; expected at least one")
    document = _document(doc, data)
    rules = tuple(_rule(doc, raw, f"rule[{i}]", i, document) for i, raw in enumerate(_array(doc, data, "rule")))
    for i, rule in enumerate(rules):
        if not any(rule.matches(c) for c in cells):
            raise doc.fail(f"rule[{i}].match", "matches no cell of this matrix; expected a rule that applies")
    name = meta.get("name", path.stem)
    if not isinstance(name, str):
        raise doc.fail("matrix.name", f"expected a string, got {_kind(name)}")
    return Matrix(path, name, tuple(cells), rules, replace(_settings(doc, data), models=models), document)


def _axes(doc: _Doc, data: dict) -> dict[str, list[str]]:
    """[axes], every axis's values (an optional axis left out: its default)."""
    if "axes" not in data:
        raise doc.fail("axes", "missing; expected a table with the keys " + ", ".join(AXES.names)
                       + f" ({', '.join(optional_axes())} optional)")
    raw_axes = doc.table(data["axes"], "axes")
    doc.check_keys(raw_axes, AXES.names, "axes")
    axes = {a: _axis_values(doc, a, raw_axes[a], f"axes.{a}", wildcards=True, table=raw_axes)
            for a in AXES.names if a in raw_axes}
    optional = optional_axes()
    for axis in AXES.names:
        if axis not in axes and axis in optional:
            axes[axis] = optional[axis]
        elif axis not in axes:
            raise doc.fail(f"axes.{axis}", "missing; expected a string or list of strings")
    _check_components(doc, "axes", axes)
    return axes


def _models(doc: _Doc, data: dict) -> tuple[Source, ...]:
    """The [models.NAME] tables, each read from disk (configs only) and registered among the models."""
    raw = doc.table(data.get("models", {}), "models")
    out = tuple(sources.from_table(name, table, doc.path) for name, table in raw.items())
    for source in out:
        sources.register(source)
    return out


def _array(doc: _Doc, data: dict, key: str) -> list:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise doc.fail(key, f"expected an array of tables ([[{key}]]), got {_kind(value)}")
    return value


def load_matrix(path: Path | str, *, present_devices: tuple[str, ...] = ("cpu",),
                max_cells: int = MAX_CELLS) -> Matrix:
    """Read, validate and expand a matrix file. `present_devices`: what the device "present" stands for; the
    caller discovers them (harness.devices.present_devices(), which imports torch): the matrix model does not."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise QuantMatrixError(f"cannot read matrix file: {exc.strerror}", path=path) from None
    except UnicodeDecodeError:
        raise QuantMatrixError("not a UTF-8 text file; expected a TOML matrix", path=path) from None
    return parse_matrix(text, path, present_devices=present_devices, max_cells=max_cells)


def select(cells: Iterable[Cell], **wanted: Iterable[str] | None) -> list[Cell]:
    """Cells whose fields are among the wanted values (a field left None is not filtered)."""
    filters = {k: set(v) for k, v in wanted.items() if v}
    return [c for c in cells if all(getattr(c, k) in v for k, v in filters.items())]
