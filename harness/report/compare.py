"""Changes between two sets of runs (e.g. last night and tonight), cell by cell on each machine.

    quantmatrix compare OLD.jsonl NEW.jsonl [--threshold 0.25]

Lists cells newly broken, newly fixed and newly drifted, and latency or peak-memory regressions. Latency is the
cell's paired ratio to its float model (timed beside it in the cell's own process, so a busy machine slows both
alike) with its 90% interval: a cell is slower only when tonight's whole interval lies above last night's by more
than the threshold (new lo > old hi x (1 + threshold)); records without paired timings are not compared on
latency, and the count says so. Pairing cancels most of a busy machine, not all: a busy loop beside a run (one of two
cores) moved a quanto cell's ratio 1.29x on CI, where its kernels and the float model's wait differently. So where
the cell's threads waited for a CPU a fifth of the time or more while either run timed it (`host_load.cpu_wait`;
another worker on its own core makes them wait about none), a cell is slower only beyond BUSY_FACTOR (2x), and the
line says which run waited.
Peak memory is compared as a ratio to each run's own unquantized baseline with no
offload (same device, model, dtype, load and stack), or in the cell's own offload mode where a run has no
no-offload baseline. Exits 1 when something regressed (newly broken, slower or bigger beyond the threshold), so
CI can gate on it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import pandas as pd

from harness.errors import printable
from harness.report import data as report_data
from harness.verdict import Verdict

BUSY_WAIT = 0.2  # a timing's threads waited for a CPU this share of the wall time or more: taken beside load
BUSY_FACTOR = 2.0  # what a latency change timed beside load must exceed (load alone moved a ratio 1.29x)


class ChangeKind(enum.StrEnum):
    """What changed in a cell between two sets of records, in the order they are listed."""

    NEWLY_BROKEN = "newly broken"
    SLOWER = "slower"
    MORE_MEMORY = "more memory"
    NEWLY_DRIFTED = "newly drifted"
    NEWLY_FIXED = "newly fixed"

    @property
    def regression(self) -> bool:
        return self in (ChangeKind.NEWLY_BROKEN, ChangeKind.SLOWER, ChangeKind.MORE_MEMORY)


@dataclass
class Change:
    machine: str
    id: str
    kind: ChangeKind
    old: str
    new: str


@dataclass
class Changes:
    items: list[Change] = field(default_factory=list)
    compared: int = 0
    latency_compared: int = 0  # cells both runs timed in pairs with their float model
    threshold: float = 0.25

    @property
    def regressed(self) -> list[Change]:
        return [c for c in self.items if c.kind.regression]

    def of(self, kind: ChangeKind) -> list[Change]:
        return [c for c in self.items if c.kind is kind]


def _good(verdict: str) -> bool:
    return verdict in report_data.PASSED or verdict == Verdict.UNAVAILABLE


def compare(old: report_data.Records, new: report_data.Records, threshold: float = 0.25) -> Changes:
    changes = Changes(threshold=threshold)
    a, b = old.latest(per_versions=False), new.latest(per_versions=False)
    if a.empty or b.empty:
        return changes
    both = a.merge(b, on=["machine", "id"], suffixes=("_old", "_new"))
    changes.compared = len(both)
    for _, r in both.iterrows():
        vo, vn = r["verdict_old"], r["verdict_new"]
        where = dict(machine=r["machine"], id=r["id"])
        if vn in report_data.BROKEN and vo not in report_data.BROKEN:
            changes.items.append(Change(**where, kind=ChangeKind.NEWLY_BROKEN, old=vo, new=f"{vn}: {_why(r, 'new')}"))
        elif vo in report_data.BROKEN and vn not in report_data.BROKEN and _good(vn):
            changes.items.append(Change(**where, kind=ChangeKind.NEWLY_FIXED, old=f"{vo}: {_why(r, 'old')}", new=vn))
        if vn in report_data.DRIFT and vo not in report_data.DRIFT:
            changes.items.append(Change(**where, kind=ChangeKind.NEWLY_DRIFTED, old=vo, new=f"{vn}: {r['note_new']}"))
        slower = _slower(r, threshold)
        if slower is not None:
            changes.latency_compared += 1
            if slower:
                above = r["latency_lo_new"] / r["latency_hi_old"]
                waited = _busy(r)
                busy = (f" (its threads waited for a CPU in the {' and '.join(waited)} run: flagged beyond "
                        f"{max(1 + threshold, BUSY_FACTOR):g}x)") if waited else ""
                changes.items.append(Change(**where, kind=ChangeKind.SLOWER, old=_interval(r, "old"),
                                            new=f"{_interval(r, 'new')} ({above:.2f}x above the old interval){busy}"))
        ratio = _ratios(r, "mem")
        if ratio is not None:
            ro, rn, against = ratio
            if ro > 0 and rn / ro > 1 + threshold:
                changes.items.append(Change(**where, kind=ChangeKind.MORE_MEMORY, old=f"{ro:.3g}x {against}",
                                            new=f"{rn:.3g}x {against} ({rn / ro:.2f}x worse)"))
    order = list(ChangeKind)
    changes.items.sort(key=lambda c: (order.index(c.kind), c.machine, c.id))
    return changes


def _slower(row: pd.Series, threshold: float) -> bool | None:
    """Whether the new paired interval lies wholly above the old one by more than the threshold (by more than
    BUSY_FACTOR where either run was timed beside other load); None where either record has no paired timing (or
    either is the float model itself, 1 by definition)."""
    if row["latency_pairing_old"] != "paired" or row["latency_pairing_new"] != "paired":
        return None
    lo, hi = row["latency_lo_new"], row["latency_hi_old"]
    if not (report_data.finite(lo) and report_data.finite(hi)) or hi <= 0:
        return None
    return lo / hi > max(1 + threshold, BUSY_FACTOR if _busy(row) else 0.0)


def _busy(row: pd.Series) -> list[str]:
    """The runs ("old", "new") whose timing of the cell left its threads waiting for a CPU BUSY_WAIT or more."""
    return [side for side in ("old", "new")
            if report_data.finite(row[f"cpu_wait_{side}"]) and row[f"cpu_wait_{side}"] >= BUSY_WAIT]


def _interval(row: pd.Series, side: str) -> str:
    return (f"{row[f'latency_paired_{side}']:.3g}x float ({row[f'latency_lo_{side}']:.3g}-"
            f"{row[f'latency_hi_{side}']:.3g})")


def _ratios(row: pd.Series, figure: str) -> tuple[float, float, str] | None:
    """(old, new, against what) for a figure: to the no-offload baseline where both runs have one, else to the
    baseline in the same offload mode; None where either run lacks both."""
    for column, against in ((f"{figure}_vs_none", "no-offload baseline"), (f"{figure}_ratio", "baseline")):
        ro, rn = row[f"{column}_old"], row[f"{column}_new"]
        if report_data.finite(ro) and report_data.finite(rn):
            return ro, rn, against
    return None


def _why(row: pd.Series, side: str) -> str:
    return (row[f"error_message_{side}"] or row[f"reason_{side}"] or "")[:160]


def render(changes: Changes) -> str:
    lines = [f"compared {changes.compared} cells present in both (threshold {changes.threshold:g}); latency on the "
             f"{changes.latency_compared} timed in pairs with their float model in both"]
    for kind in ChangeKind:
        items = changes.of(kind)
        lines.append(f"{kind}: {len(items)}")
        # text from a record, escaped: a newline, carriage return or ANSI escape in it cannot forge a line
        lines.extend(printable(f"  {c.id}  on {c.machine}: {c.old} -> {c.new}") for c in items)
    lines.append("REGRESSED" if changes.regressed else "no regression")
    return "\n".join(lines)
