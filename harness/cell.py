"""The cell's vocabulary: the axes of a matrix, declared once, and `Cell`, one point of the matrix.

Every other part reads `AXES`: the Cell's fields and id (and how older ids and records read), matrix validation
and expansion, the plugin's options and `quantmatrix run --help`, the report's columns, grouping and wording,
`cells.csv`. Adding an axis is one `Axis` entry here plus the code that acts on it.

A leaf module: it imports nothing of the harness (and no torch), so that the matrix model, the reports and the
engines' catalog can all speak of cells without importing one another. Values found elsewhere (the engines'
names, the models') are named as "module:attribute" and read when first asked for.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

BASELINE = "none"


@dataclass(frozen=True)
class Axis:
    """One axis of the matrix, and everything the harness derives from it."""

    name: str
    values: tuple[str, ...] | str  # the known values, or "module:attribute" where they are found
    help: str  # what the axis is, for the options' help ("only cells with this <help>")
    default: str | None = None  # what a matrix file, a record or an id that leaves the axis out means; None: required
    join: str = "/"  # how the value joins the id: "/" a part of its own; "-" or "+" appended to the part before
    omit: str | None = None  # a value the id leaves out (with join "-" or "+"): "bnb", not "bnb--"
    baseline: str | None = None  # its value in the unquantized cell a cell is compared with; None: the cell's own
    control: str | None = None  # its value in the control cell (the layer that tells which broke); None: the cell's
    wildcards: tuple[str, ...] = ("*",)  # what a matrix's [axes] may say besides values
    # How the wiki patch says it: a value in a phrase ("{} offload"), after a preposition in a rule's description
    # ("with sequential offload"), or by its own words ("module:attribute" of a dict: value -> words); several
    # values joined by `sep`. `narrows`: named where a finding differs from the rest of its rule's cells.
    phrase: str = "{}"
    preposition: str = ""
    words: str | None = None
    sep: str = " or "
    narrows: bool = True
    label: str = ""  # the report's heading for it (default: the name)
    option: bool = True  # a pytest / `quantmatrix run` option --<name> selects cells by it
    # Values a record may carry besides the known ones: a regex of names users give (their own models, named in
    # another run's matrix); plain names only, so they stay safe in ids, paths and pages. None: known values only.
    named: str | None = None

    def known(self) -> tuple[str, ...]:
        if isinstance(self.values, tuple):
            return self.values
        return _resolve(self.values)

    @property
    def heading(self) -> str:
        return self.label or self.name

    @property
    def treatment(self) -> bool:
        """Something added on top of a quantized model (casting, more components, compile, a LoRA): its id joins it
        with "+", and it has a default (none of it)."""
        return self.join == "+" and self.default is not None

    def describe(self, values) -> str:
        """The values in the wiki patch's words: "with sequential or model offload", "through diffusers"."""
        if self.words is not None:
            named = _words(self.words)
            return self.sep.join(named.get(v, v) for v in values)
        text = self.phrase.format(self.sep.join(values))
        return f"{self.preposition} {text}" if self.preposition else text


@functools.cache
def _words(where: str) -> dict[str, str]:
    module, _, attribute = where.partition(":")
    return dict(getattr(importlib.import_module(module), attribute))


def _resolve(where: str) -> tuple[str, ...]:
    """Read each time (a tuple of a dict's keys costs microseconds): a table changed at run time, a model added by
    a test, is seen."""
    module, _, attribute = where.partition(":")
    return tuple(getattr(importlib.import_module(module), attribute))


class Axes:
    """The registry: the axes in id order. Extensions (and a test) may `register` one more."""

    def __init__(self, *axes: Axis):
        self._axes: list[Axis] = []
        self._index: dict[str, int] = {}
        self._names: tuple[str, ...] = ()
        for axis in axes:
            self.register(axis)

    def register(self, axis: Axis) -> Axis:
        if axis.name in self._index:
            raise ValueError(f"axis {axis.name!r} is declared twice")
        if axis.default is None and self._axes and self._axes[-1].default is not None and axis.join == "/":
            raise ValueError(f"axis {axis.name!r} needs a default: older ids leave out only trailing parts")
        self._index[axis.name] = len(self._axes)
        self._axes.append(axis)
        self._names = tuple(a.name for a in self._axes)
        return axis

    def unregister(self, name: str) -> None:
        """Remove an axis registered later (a test's dummy axis)."""
        del self._axes[self._index.pop(name)]
        self._index = {a.name: i for i, a in enumerate(self._axes)}
        self._names = tuple(a.name for a in self._axes)

    def __iter__(self) -> Iterator[Axis]:
        return iter(tuple(self._axes))

    def __len__(self) -> int:
        return len(self._axes)

    def __getitem__(self, name: str) -> Axis:
        return self._axes[self._index[name]]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def index(self, name: str) -> int:
        return self._index[name]

    @property
    def names(self) -> tuple[str, ...]:
        return self._names  # kept with the registry: read for every row of a report

    @property
    def defaults(self) -> dict[str, str]:
        """What a record, a matrix file or an id written before an axis existed means by leaving it out."""
        return {a.name: a.default for a in self._axes if a.default is not None}


AXES = Axes(
    Axis("engine", "harness.engines.catalog:ENGINE_NAMES", "engine (a name of the engines' catalog)",
         words="harness.engines.catalog:ENGINE_TITLES"),
    Axis("qtype", "harness.engines.catalog:QTYPE_NAMES", "quant type", join="-", omit="-", baseline="-", sep="/",
         label="type"),
    Axis("load", ("post-load", "on-the-fly", "prequantized"), "load mode", words="harness.cell:LOAD_WORDS"),
    Axis("offload", ("none", "model", "sequential", "balanced", "group"), "offload mode (SD.Next's)",
         phrase="{} offload", preposition="with"),
    Axis("device", ("cpu", "cuda", "rocm", "xpu", "mps"), "device", wildcards=("*", "present"), preposition="on",
         narrows=False),
    Axis("model", "harness.models.specs:MODELS", "model", preposition="for",
         named=r"[a-z0-9][a-z0-9._-]{0,47}"),  # harness/models/sources.py NAME: a matrix's [models.NAME]
    Axis("dtype", ("float32", "bfloat16", "float16"), "compute dtype", preposition="in", narrows=False),
    # Whose code loads, quantizes and offloads the model: the engine's own API on the module (`direct`, the
    # control), or diffusers' quantizer integrations and pipeline offload methods (`diffusers`, what SD.Next and
    # diffusers users run). The stacks are declared in harness/stacks/. Ids and records from before this axis
    # existed are direct.
    Axis("stack", "harness.stacks.catalog:STACK_NAMES", "stack (the code that loads, quantizes and offloads)",
         default="direct", control="direct", phrase="{} stack", words="harness.stacks.catalog:STACK_PHRASES"),
    # Layerwise casting (diffusers' enable_layerwise_casting, which SD.Next applies on top of quantization):
    # weights stored in this dtype, cast to the compute dtype per layer. "-": none.
    Axis("cast", ("-", "float8_e4m3fn", "float8_e5m2"), "layerwise casting storage dtype", default="-", join="+",
         omit="-", baseline="-", phrase="{} layerwise casting", preposition="with"),
    # Which of a pipeline's components are quantized: the denoiser (what a single-component model has), the
    # denoiser and the text encoders SD.Next's "TE" option quantizes, or those text encoders only
    # (models.specs.component_names). The baseline quantizes nothing: its components are the default.
    Axis("components", "harness.models.specs:COMPONENT_VALUES", "quantized components", default="denoiser",
         join="+", omit="denoiser", baseline="denoiser", phrase="{} quantized", preposition="with"),
    # torch.compile of the denoiser, applied last (harness/treatments/compiling.py): diffusers' compile_repeated_blocks
    # (`regional`) or the whole module (`full`), with diffusers' tests' options per offload mode. "-": not compiled.
    Axis("compile", ("-", "regional", "full"), "torch.compile mode", default="-", join="+", omit="-",
         phrase="{} compile", preposition="with"),
    # A LoRA on the quantized denoiser (harness/treatments/lora.py): made offline per model, rank 4 or 16. "-":
    # none. The baseline carries the same LoRA: the cell is judged against the float model with it.
    Axis("lora", ("-", "r4", "r16"), "LoRA", default="-", join="+", omit="-", phrase="a {} LoRA",
         preposition="with"),
    # How the LoRA is applied: peft's layers beside the quantized ones (diffusers' load_lora_adapter), merged into
    # them (fuse_lora), or SD.Next's SDNQ path (dequantize, add, requantize). Only with a LoRA.
    Axis("lora_fuse", ("unfused", "fused", "merged"), "LoRA application", default="unfused", join="+",
         omit="unfused", baseline="unfused", phrase="the LoRA {}"),
)
LOAD_WORDS = {"on-the-fly": "quantized on the fly during load", "post-load": "quantized right after load",
              "prequantized": "loaded pre-quantized"}


@functools.total_ordering
class Cell:
    """One point of the matrix: a value (a plain string) per axis, in AXES order. Immutable and hashable;
    `Cell("none", "-", "post-load", ...)` or by name; axes with a default may be left out."""

    __slots__ = ("_values",)

    def __init__(self, *values: str, **named: str):
        names = AXES.names
        if len(values) > len(names):
            raise TypeError(f"Cell takes at most {len(names)} values ({', '.join(names)}), got {len(values)}")
        given = dict(zip(names, values, strict=False))
        for name, value in named.items():
            if name not in AXES:
                raise TypeError(f"Cell has no axis {name!r}; expected one of {list(names)}")
            if name in given:
                raise TypeError(f"Cell got axis {name!r} twice")
            given[name] = value
        out = []
        for axis in AXES:
            value = given.get(axis.name, axis.default)
            if value is None:
                raise TypeError(f"Cell needs a value for axis {axis.name!r}")
            out.append(value)
        object.__setattr__(self, "_values", tuple(out))

    @classmethod
    def of(cls, values: tuple[str, ...]) -> Cell:
        """A cell from one value per axis, in AXES order, unchecked (expanding 100,000 cells of a matrix)."""
        if len(values) != len(AXES):
            raise TypeError(f"Cell.of takes {len(AXES)} values ({', '.join(AXES.names)}), got {len(values)}")
        cell = object.__new__(cls)
        object.__setattr__(cell, "_values", values)
        return cell

    def __getattr__(self, name: str) -> str:
        try:
            return self._values[AXES.index(name)]
        except (KeyError, IndexError):
            raise AttributeError(f"Cell has no axis {name!r}") from None

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Cell is immutable; use cell.replace(...)")

    def __reduce__(self):
        return _cell_from_dict, (self.as_dict(),)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cell) and self._values == other._values

    def __lt__(self, other: Cell) -> bool:
        return self._values < other._values

    def __hash__(self) -> int:
        return hash(self._values)

    def __repr__(self) -> str:
        return "Cell(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()) + ")"

    def replace(self, **changes: str) -> Cell:
        return Cell(**{**self.as_dict(), **changes})

    def as_dict(self) -> dict[str, str]:
        return dict(zip(AXES.names, self._values, strict=True))

    @property
    def id(self) -> str:
        parts: list[str] = []
        for axis, value in zip(AXES, self._values, strict=True):
            if axis.join == "/":
                parts.append(value)
            elif value != axis.omit:
                parts[-1] += axis.join + value
        return "/".join(parts)

    @property
    def ids(self) -> tuple[str, ...]:
        """Today's id, then the ids a record written before the trailing axes existed carries for the same cell
        (those axes at their defaults: `.../float32` for `.../float32/direct`)."""
        parts, slots, values = self.id.split("/"), _slots(), self.as_dict()
        out, n = [self.id], len(slots)
        while n > 1 and all(values[a.name] == a.default for a in slots[n - 1]):
            n -= 1
            out.append("/".join(parts[:n]))
        return tuple(out)

    @classmethod
    def from_id(cls, cell_id: str) -> Cell:
        """The cell of an id, today's or an older one (its missing trailing parts take their axes' defaults)."""
        slots = _slots()
        parts = cell_id.split("/")
        if len(parts) > len(slots):
            raise ValueError(f"cell id {cell_id!r} has {len(parts)} parts; expected at most {len(slots)}")
        values: dict[str, str] = {}
        for slot, part in zip(slots, parts, strict=False):
            values.update(_read_part(slot, part))
        return cls(**values)

    @property
    def baseline(self) -> Cell:
        """The unquantized cell this one is compared with."""
        return self.replace(**{a.name: a.baseline for a in AXES if a.baseline is not None}, engine=BASELINE)

    @property
    def control(self) -> Cell:
        """The same combination on the control stack: where it works and this cell does not, the integration
        broke."""
        return self.replace(**{a.name: a.control for a in AXES if a.control is not None})


def unknown_values(values: dict[str, object]) -> list[str]:
    """Problems with a cell's values as read from outside (a record, an id): each names the axis and the value
    that is not one of the axis's known values. A record is untrusted input: a value this version does not know
    (a newer axis value, or anything crafted) is refused here, never carried into a script or a path."""
    problems = []
    for name, value in values.items():
        if name not in AXES:
            problems.append(f"cell.{name}: no such axis (expected {', '.join(AXES.names)})")
        elif value not in AXES[name].known() and not (AXES[name].named and isinstance(value, str)
                                                         and re.fullmatch(AXES[name].named, value)):
            problems.append(f"cell.{name}: {value!r} is not a known {AXES[name].help} here")
    return problems


def _cell_from_dict(values: dict[str, str]) -> Cell:
    return Cell(**values)


def _slots() -> list[list[Axis]]:
    """The id's parts: each a "/" axis followed by the axes appended to it."""
    slots: list[list[Axis]] = []
    for axis in AXES:
        if axis.join == "/":
            slots.append([axis])
        else:
            slots[-1].append(axis)
    return slots


def _read_part(slot: list[Axis], part: str) -> dict[str, str]:
    """One part of an id: the primary value up to the first joiner of an appended axis, then each appended axis
    in order (an earlier one by its known values, the last one takes the rest)."""
    primary, *appended = slot
    cut = min((i for i, ch in enumerate(part) if ch in {a.join for a in appended}), default=len(part))
    out, rest = {primary.name: part[:cut]}, part[cut:]
    for i, axis in enumerate(appended):
        last = i == len(appended) - 1
        if rest.startswith(axis.join) and rest != axis.join:
            if last:
                out[axis.name], rest = rest[1:], ""
                continue
            for value in sorted(axis.known(), key=len, reverse=True):
                token = axis.join + value
                if rest == token or rest.startswith(token) and rest[len(token)] in {a.join for a in appended}:
                    out[axis.name], rest = value, rest[len(token):]
                    break
        if axis.name not in out:
            out[axis.name] = axis.omit if axis.omit is not None else axis.default
    if rest:
        raise ValueError(f"cell id part {part!r}: cannot read {rest!r}")
    return out
