"""The report's first screen: how many cells got each verdict, then per machine, device and stack, engines by
offload mode (how many of the engine's types work there, its worst verdict apart, with counts) and what the
engine's best type saves and costs at the largest model measured. Reads result records only."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import pandas as pd

from harness.cell import AXES
from harness.report import data as report_data

# worst first: what a user must see before anything else
SEVERITY = ("crash", "oom", "hang", "timeout", "fail", "wrong-output",
            "drift-error", "drift-works", "drift-claim", "interrupted",
            "documented-error", "ok", "unavailable")


RIGHT = frozenset(v for v in report_data.RAN if v != "wrong-output")  # ran to a right output


def rank(verdict: str) -> int:
    return SEVERITY.index(verdict) if verdict in SEVERITY else -1  # a verdict this version does not know: first


def counts(latest: pd.DataFrame) -> list[tuple[str, int]]:
    """(verdict, cells) for every verdict, worst first, zeros included (a zero is news too)."""
    found = latest["verdict"].value_counts().to_dict() if len(latest) else {}
    unknown = sorted(set(found) - set(SEVERITY))
    return [(v, int(found.get(v, 0))) for v in (*unknown, *SEVERITY)]


@dataclass
class Summary:
    """One engine in one offload mode: how many of its types work there (in one load mode at least, every cell of
    the type in it, each model, ran to a right output; unavailable cells not counted), its worst verdict apart, and
    the counts."""

    verdict: str
    counts: list[tuple[str, int]]  # worst first, non-zero only
    working: int = 0  # types that work
    types: int = 0  # types measured (not only unavailable)

    @property
    def text(self) -> str:
        return (f"{self.working} of {self.types} types work; " if self.types else "") \
            + ", ".join(f"{n} {v}" for v, n in self.counts)

    @property
    def css(self) -> str:
        """The entry's colour: by how many types work (not by the worst verdict, which is shown apart)."""
        if not self.types:
            return "na"
        return "ok" if self.working == self.types else "fail" if self.working == 0 else "some"


@dataclass
class Best:
    """The engine's type that saves the most stored bytes (no offload, largest model measured), and its cost."""

    qtype: str
    saved: float  # 1 - stored bytes / baseline's
    latency: float | None  # latency / baseline's
    model: str


@dataclass
class Table:
    machine: str  # the machines of the device class, joined
    device: str  # the device class
    stack: str
    offloads: list[str]
    rows: list[tuple[str, list[Summary | None], Best | None]]  # engine, per offload, best type
    model: str  # the largest model measured
    grid: str  # the anchor of the detail grid


# The overview has a table per device class and stack: the machines of one class join (a type works or not on a CPU
# whichever CPU it is); the plots beside them are per machine (timings depend on the CPU model).
GROUPED = ("device_class", "stack")


def _plain(rows: pd.DataFrame) -> pd.Series:
    """Rows with every other axis that has a default at it (no layerwise casting, and so on): the plain cells the
    best type is chosen among."""
    plain = pd.Series(True, index=rows.index)
    for axis in AXES:
        if axis.default is not None and axis.name not in GROUPED:
            plain &= rows[axis.name] == axis.default
    return plain


def _best(rows: pd.DataFrame, model: str) -> dict[str, Best]:
    """Per engine, its type that stores the fewest bytes (ties: the faster) at `model` with no offload."""
    ran = rows[(rows["offload"] == "none") & (rows["model"] == model) & rows["verdict"].isin(report_data.RAN)
               & _plain(rows) & (rows["engine"] != "none")].dropna(subset=["bytes_ratio"])
    top = ran.sort_values(["bytes_ratio", "latency_ratio"]).drop_duplicates("engine")
    return {e: Best(str(q), 1 - float(b), float(lat) if report_data.finite(lat) else None, model)
            for e, q, b, lat in zip(top["engine"], top["qtype"], top["bytes_ratio"], top["latency_ratio"],
                                    strict=True)}


def tables(latest: pd.DataFrame, grid_anchor) -> list[Table]:
    """One table per device class and stack (devices absent on their machine left out). `grid_anchor(machine,
    versions, device)` names the detail grid a table links to (the newest machine's)."""
    out = []
    # slices of only what is read: a groupby copies every column of each group
    latest = latest[["machine", "device_class", "device_absent", *AXES.names, "verdict", "param_bytes",
                     "bytes_ratio", "latency_ratio", "started", "versions"]]
    latest = latest[~latest["device_absent"].astype(bool)]
    for (device, stack), rows in latest.groupby(list(GROUPED), sort=True):
        offloads = report_data.offload_order(rows["offload"])
        model = report_data.largest_model(rows)
        best = _best(rows, model)
        found: dict[tuple[str, str], list[tuple[str, int]]] = {}
        for (engine, offload, verdict), n in rows.groupby(["engine", "offload", "verdict"]).size().items():
            found.setdefault((engine, offload), []).append((str(verdict), int(n)))
        # a type works in a mode when it works in one of its load modes (each of its cells there: every model);
        # plain dicts: a groupby per table cost more than the rest of the overview
        by_load: dict[tuple, bool] = {}
        for engine, offload, qtype, load, verdict in zip(rows["engine"], rows["offload"], rows["qtype"],
                                                         rows["load"], rows["verdict"], strict=True):
            if verdict != "unavailable":
                key = (engine, offload, qtype, load)
                by_load[key] = by_load.get(key, True) and verdict in RIGHT
        by_type: dict[tuple, bool] = {}
        for (engine, offload, qtype, _), ok in by_load.items():
            by_type[(engine, offload, qtype)] = by_type.get((engine, offload, qtype), False) or ok
        works: dict[tuple, list[int]] = {}
        for (engine, offload, _), ok in by_type.items():
            count = works.setdefault((engine, offload), [0, 0])
            count[0] += ok
            count[1] += 1
        lines = []
        for engine in sorted(set(rows["engine"]), key=lambda e: (e != "none", e)):
            per = []
            for offload in offloads:
                counted = sorted(found.get((engine, offload), []), key=lambda vn: rank(vn[0]))
                k, n = works.get((engine, offload), (0, 0))
                per.append(Summary(counted[0][0], counted, k, n) if counted else None)
            lines.append((engine, per, best.get(engine)))
        newest = rows.sort_values("started").iloc[-1]
        out.append(Table(" + ".join(sorted(set(rows["machine"]))), device, stack, offloads, lines, model,
                         grid_anchor(newest["machine"], newest["versions"], newest["device"])))
    return out


# The order diffusers' offload tests expect of peak memory: no offload above model offload, above group and
# balanced, above sequential (tests/hooks/test_group_offloading.py, tests/models/test_modeling_common.py).
MEMORY_ORDER = (("none",), ("model",), ("group", "balanced"), ("sequential",))


@dataclass
class MemoryOrder:
    machine: str
    device: str
    cell: str  # engine, type, load, model, dtype, stack
    peaks: dict[str, float]  # offload mode -> peak memory above the cell's start, bytes
    broken: list[str]  # "model (12.1 GiB) above none (11.0 GiB)"


def memory_order(latest: pd.DataFrame, tolerance: float = 0.05, slack_bytes: int = 64 << 20) -> list[MemoryOrder]:
    """Per machine, device and working combination measured in two or more offload modes: whether its peak memory
    orders as diffusers' tests expect (a mode may exceed the one above it by `tolerance` and `slack_bytes`: the
    allocator's and kernels' workspaces, which decide the order of a model of a few MiB)."""
    ran = latest[latest["verdict"].isin(report_data.RAN)].dropna(subset=["own_mem_bytes"])
    out = []
    keys = ["machine", "device", *(a for a in AXES.names if a not in ("offload", "device"))]
    combos: dict[tuple, dict[str, float]] = {}  # plain dicts: a groupby's slices cost ~0.5 s at 10,000 records
    for *key, offload, mem in zip(*(ran[c] for c in [*keys, "offload", "own_mem_bytes"]), strict=True):
        combos.setdefault(tuple(key), {})[offload] = float(mem)
    for key, peaks in sorted(combos.items()):
        ranks = [[m for m in tier if m in peaks] for tier in MEMORY_ORDER]
        if sum(map(len, ranks)) < 2:
            continue
        broken = []
        for i, upper in enumerate(ranks):
            for lower_tier in ranks[i + 1:]:
                for a in upper:
                    for b in lower_tier:
                        if peaks[b] > peaks[a] * (1 + tolerance) + slack_bytes:
                            broken.append(f"{b} ({peaks[b] / 2**30:.2f} GiB) above {a} ({peaks[a] / 2**30:.2f} GiB)")
        machine, device, *rest = key
        out.append(MemoryOrder(machine, device, " · ".join(str(v) for v in rest if v != "-"), peaks, broken))
    return out


@dataclass
class EngineLine:
    """One engine: its name in reports, whether SD.Next ships it today, and where its cells ran to a right output
    (per machine and device: cells that did / cells measured), with why the others did not run."""

    engine: str
    title: str
    sdnext: str
    ran: list[tuple[str, str, int, int]]  # (machine, device, right, measured): unavailable cells not counted
    unavailable: list[tuple[str, int]]  # (reason, cells), most cells first


def engines(latest: pd.DataFrame) -> list[EngineLine]:
    """Every engine the catalog offers (test-only ones left out), in catalog order, whether or not it has records:
    which SD.Next ships, which ran where and why the rest did not."""
    from harness.engines.catalog import CATALOG

    out = []
    for name, info in CATALOG.items():
        if info.hidden:
            continue
        rows = latest[latest["engine"] == name]
        ran = []
        for (machine, device), group in rows.groupby(["machine", "device"], sort=True):
            measured = group[group["verdict"] != "unavailable"]
            if len(measured):
                ran.append((machine, device, int(measured["verdict"].isin(RIGHT).sum()), len(measured)))
        absent = rows[rows["verdict"] == "unavailable"]["reason"].value_counts()
        out.append(EngineLine(name, info.title, info.sdnext, ran, [(r, int(n)) for r, n in absent.items()]))
    return out


@dataclass
class Coverage:
    """What the records measured, per device class, and what they did not: the first thing a reader needs before
    trusting any entry below it."""

    rows: list[dict]  # device class, machines, cells, models with their scale, stacks, SD.Next's path, offload
    missing: list[str]  # what was not measured at all


def _params(rows: pd.DataFrame) -> str:
    """Each model measured, largest first, with its parameter count (from its float model's stored bytes)."""
    base = rows[(rows["engine"] == "none") & rows["verdict"].isin(report_data.RAN)].dropna(
        subset=["param_bytes", "bits_per_weight"])
    count = (base["param_bytes"] * 8 / base["bits_per_weight"]).groupby(base["model"]).median()
    named = [f"{m} ({_scale(n)})" for m, n in count.sort_values(ascending=False).items()]
    return ", ".join(named + sorted(set(rows["model"]) - set(count.index)))


def _scale(n: float) -> str:
    return f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.0f} k"


def coverage(latest: pd.DataFrame) -> Coverage:
    rows, missing = [], []
    for device_class, group in latest.groupby("device_class", sort=True):
        ran = group[~group["device_absent"]]
        if ran.empty:
            continue
        sdnext = int((ran["path"] == "sdnext").sum())
        rows.append({"device": device_class, "machines": ran["machine"].nunique(), "cells": len(ran),
                     "models": _params(ran), "stacks": ", ".join(sorted(set(ran["stack"]))),
                     "sdnext": f"{sdnext} cells" if sdnext else "not measured",
                     "moved": "yes" if ran["offload_moved"].eq(True).any() else
                     "no: the hooks ran, nothing moved" if (ran["offload"] != "none").any() else "no offload"})
    measured = {r["device"].split()[0] for r in rows}
    for device in AXES["device"].known():
        if device not in measured:
            missing.append(f"{device}: no cell ran")
        elif device != "cpu" and all(r["sdnext"] == "not measured" for r in rows if r["device"].split()[0] == device):
            missing.append(f"{device} through SD.Next's path (the diffusers stack on a whole pipeline)")
    return Coverage(rows, missing)


@dataclass
class Answer:
    """One engine's type in one offload mode on one device class: whether its cells there ran to a right output
    (every cell, some, none; "not measured" without a cell), on which path, and the figures of its largest model."""

    verdict: str  # "works" | "some" | "fails" (an entry without cells is "not measured": no Answer)
    right: int = 0
    measured: int = 0
    sdnext: bool = False  # a cell on SD.Next's path (the diffusers stack, a whole pipeline) among them
    moved: bool | None = None  # an offload that moved weights between devices; None without offload
    model: str = ""  # the largest model with a right cell
    mem: float | None = None  # generation peak / the baseline's, where weights dominate the peak
    latency: float | None = None  # paired latency / the float model's
    sqnr: float | None = None  # dB against the float model's output
    grid: str = ""  # the detail grid's anchor

    SYMBOLS = {"works": ("✓", "ok"), "some": ("⚠", "some"), "fails": ("✗", "fail")}

    @property
    def symbol(self) -> str:
        return self.SYMBOLS[self.verdict][0]

    @property
    def css(self) -> str:
        return self.SYMBOLS[self.verdict][1]

    @property
    def limits(self) -> list[str]:
        """What the evidence cannot speak for, said beside the entry."""
        out = [] if self.sdnext else ["control path only"]
        return out + (["nothing moved"] if self.moved is False else [])


@dataclass
class Answers:
    """The first table: engine · type × device class, offload modes as its second level (one shown at a time)."""

    classes: list[str]  # device classes, measured ones first; "cuda" always (the question users come with)
    offloads: list[str]
    rows: list[tuple[str, str, dict[tuple[str, str], Answer]]]  # engine, type, (offload, class) -> answer


def _median(values: list) -> float | None:
    values = [v for v in values if report_data.finite(v)]
    return float(statistics.median(values)) if values else None


ANSWER_FIELDS = ("engine", "qtype", "offload", "device_class", "verdict", "started", "machine", "versions", "device",
                 "path", "offload_moved", "model", "param_bytes", "bytes_ratio", "mem_ratio", "latency_ratio",
                 "sqnr_db")


def answers(latest: pd.DataFrame, grid_anchor) -> Answers:
    """Every engine and type measured (test-only engines left out), on every device class and offload mode: its
    answer, or "not measured". `grid_anchor(machine, versions, device)` names the detail a click opens."""
    measured = latest[~latest["device_absent"].astype(bool) & (latest["verdict"] != "unavailable")]
    classes = sorted(set(measured["device_class"]), key=lambda c: (c != "cpu", c))
    if not any(c.startswith("cuda") for c in classes):
        classes.append("cuda")
    offloads = report_data.offload_order(latest["offload"])
    groups: dict[tuple[str, str, str, str], list[dict]] = {}
    for r in report_data.row_dicts(measured, ANSWER_FIELDS):  # plain dicts: a frame per group was most of the time
        groups.setdefault((r["engine"], r["qtype"], r["offload"], r["device_class"]), []).append(r)
    entries: dict[tuple[str, str], dict[tuple[str, str], Answer]] = {}
    for (engine, qtype, offload, device_class), rows in sorted(groups.items()):
        right = [r for r in rows if r["verdict"] in RIGHT]
        verdict = "works" if len(right) == len(rows) else "some" if right else "fails"
        newest = max(rows, key=lambda r: r["started"])
        answer = Answer(verdict, len(right), len(rows), any(r["path"] == "sdnext" for r in rows),
                        None if offload == "none" else any(r["offload_moved"] is True for r in rows),
                        grid=grid_anchor(newest["machine"], newest["versions"], newest["device"]))
        if right:
            answer.model = report_data.largest_model(right)
            top = [r for r in right if r["model"] == answer.model]
            answer.mem, answer.latency, answer.sqnr = (_median([r[c] for r in top]) for c in ("mem_ratio",
                                                                                           "latency_ratio", "sqnr_db"))
        entries.setdefault((engine, qtype), {})[(offload, device_class)] = answer
    rows = [(e, q, entries[(e, q)]) for e, q in sorted(entries, key=lambda eq: (eq[0] != "none", eq))]
    return Answers(classes, offloads, rows)
