"""Changes between two sets of runs (e.g. last night and tonight), cell by cell on each machine.

    quantmatrix compare OLD.jsonl NEW.jsonl [--threshold 0.25]

Lists cells newly broken, newly fixed and newly drifted, and latency or peak-memory regressions. Figures are
compared as ratios to each run's own baseline cell, so a faster or slower machine (or a noisy night that slows
everything alike) is not a regression. Exits 1 when something regressed (newly broken, slower or bigger beyond
the threshold), so CI can gate on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from harness import report_data


@dataclass
class Change:
    machine: str
    id: str
    kind: str  # "newly broken" | "newly fixed" | "newly drifted" | "slower" | "more memory"
    old: str
    new: str


@dataclass
class Changes:
    items: list[Change] = field(default_factory=list)
    compared: int = 0
    threshold: float = 0.25

    REGRESSIONS = ("newly broken", "slower", "more memory")

    @property
    def regressed(self) -> list[Change]:
        return [c for c in self.items if c.kind in self.REGRESSIONS]

    def of(self, kind: str) -> list[Change]:
        return [c for c in self.items if c.kind == kind]


def _good(verdict: str) -> bool:
    return verdict in report_data.PASSED or verdict == "unavailable"


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
            changes.items.append(Change(**where, kind="newly broken", old=vo, new=f"{vn}: {_why(r, 'new')}"))
        elif vo in report_data.BROKEN and vn not in report_data.BROKEN and _good(vn):
            changes.items.append(Change(**where, kind="newly fixed", old=f"{vo}: {_why(r, 'old')}", new=vn))
        if vn.startswith("drift-") and not vo.startswith("drift-"):
            changes.items.append(Change(**where, kind="newly drifted", old=vo, new=f"{vn}: {r['note_new']}"))
        for metric, kind in (("latency_ratio", "slower"), ("mem_ratio", "more memory")):
            ro, rn = r[f"{metric}_old"], r[f"{metric}_new"]
            if report_data.finite(ro) and report_data.finite(rn) and ro > 0 and rn / ro > 1 + threshold:
                changes.items.append(Change(**where, kind=kind, old=f"{ro:.3g}x baseline",
                                            new=f"{rn:.3g}x baseline ({rn / ro:.2f}x worse)"))
    order = ["newly broken", "slower", "more memory", "newly drifted", "newly fixed"]
    changes.items.sort(key=lambda c: (order.index(c.kind), c.machine, c.id))
    return changes


def _why(row: pd.Series, side: str) -> str:
    return (row[f"error_message_{side}"] or row[f"reason_{side}"] or "")[:160]


def render(changes: Changes) -> str:
    lines = [f"compared {changes.compared} cells present in both (threshold {changes.threshold:g})"]
    for kind in ("newly broken", "slower", "more memory", "newly drifted", "newly fixed"):
        items = changes.of(kind)
        lines.append(f"{kind}: {len(items)}")
        lines.extend(f"  {c.id}  on {c.machine}: {c.old} -> {c.new}" for c in items)
    lines.append("REGRESSED" if changes.regressed else "no regression")
    return "\n".join(lines)
