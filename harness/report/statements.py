"""Documented statements against what the records show: drift by statement, and the upstream bug reports cited.

A statement is a rule of a matrix file, known in the records by its `source` (every record carries the
expectation that judged it). Each record is read against its statement as one of four findings: it holds, it
drifted (works now, fails differently, a claim does not hold), it broke (the process died, or what was documented
to work raised), or it could not be checked (the device was absent, the engine does not offer it). Reads result
records only.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

import pandas as pd

from harness.report import data as report_data

# "diffusers#14691", "huggingface/diffusers#14691", "diffusers#10800 / bitsandbytes#1525: ..."
REFERENCE = re.compile(r"(?<![\w/.-])([A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)?#\d+)")


class Finding(enum.StrEnum):
    """What one record says about its statement, in the order statements are sorted by."""

    BROKE = "broke"
    DRIFTED = "drifted"
    HOLDS = "holds"
    UNCHECKED = "unchecked"


FINDING_FIELDS = ("verdict", "expect", "device_absent")  # what finding() reads
HAPPENED_FIELDS = ("verdict", "claims_contradicted", "error_type", "error_message", "reason", "note")  # what_happened()


def finding(row: dict) -> Finding:
    verdict = row["verdict"]
    if verdict in report_data.DRIFT:
        return Finding.DRIFTED
    if verdict in report_data.BROKEN:
        return Finding.BROKE
    if verdict in report_data.PASSED:
        return Finding.HOLDS
    if verdict == "unavailable" and row["expect"] == "unavailable" and not row["device_absent"]:
        return Finding.HOLDS  # documented as unavailable, and the harness knows it is
    return Finding.UNCHECKED


def what_happened(row: dict) -> str:
    """One short phrase: what this cell did, for a statement's summary and its suggested correction."""
    verdict = row["verdict"]
    if verdict == "drift-claim":
        return f"works, but {row['claims_contradicted'] or 'a documented claim does not hold'}"
    if verdict == "wrong-output":
        note = row.get("note") or ""  # "ran, but ...: SQNR 4.3 dB < floor 7 dB (the type's floor: <why>)"
        below = note.split(": ", 1)[-1].split(" (the type's floor", 1)[0]
        return "runs, but its output is wrong" + (f" ({_first_line(below)})" if note else "")
    if verdict in report_data.RAN:
        return "works"
    if row["error_type"]:
        return f"fails with {row['error_type']}: {_first_line(row['error_message'])}"
    if verdict in report_data.BROKEN:
        return f"{verdict}: {_first_line(row['reason'])}"
    if verdict == "documented-error":
        return "fails as documented"
    return f"{verdict}: {_first_line(row['reason'])}"


def _first_line(text: str, limit: int = 160) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= limit else line[:limit - 1] + "…"


@dataclass
class Where:
    """One machine, device, stack and version set, and what the statement's cells did there."""

    machine: str
    device: str
    stack: str
    versions: str
    counts: dict[str, int]  # verdict -> cells
    findings: dict[str, int]  # Finding -> cells


@dataclass
class ErrorText:
    text: str
    layer: str
    cells: int


@dataclass
class Statement:
    source: str
    text: str  # the documented sentence ("" when the rule does not quote it)
    expected: str  # "fails with /pattern/", "works; claims: smaller, slower", "unavailable: reason"
    finding: Finding  # the worst over its cells
    where: list[Where]
    cells: dict[str, list[str]]  # Finding -> cell ids (with the machine where several)
    errors: list[ErrorText]
    devices: int  # distinct (machine, device) pairs with a checked cell
    checked: int  # cells that were checked (held, drifted or broke)
    references: list[str] = field(default_factory=list)  # upstream reports cited: "diffusers#14691"

    @property
    def users(self) -> tuple[int, int]:
        """How many users it touches, roughly: devices first, then cells."""
        return self.devices, self.checked


def _expected(row: pd.Series) -> str:
    kind = row["expect"]
    if kind == "error":
        return f"fails with /{row['pattern']}/"
    if kind == "unavailable":
        return "cannot be used" + (f" ({row['reason']})" if row["finding"] == Finding.HOLDS else "")
    claims = [c.split(":")[0] for c in row["claims"].split("; ") if c]
    return "works" + (f"; claims: {', '.join(claims)}" if claims else "")


def statements(latest: pd.DataFrame) -> list[Statement]:
    """One Statement per documented source among these records; drifted and broken first, the statements that
    touch most devices and cells first among them, held and unchecked ones last."""
    rows = latest[latest["source"] != ""]
    if rows.empty:
        return []
    rows = rows.assign(finding=[finding(r) for r in report_data.row_dicts(rows, FINDING_FIELDS)])
    several = rows["machine"].nunique() > 1
    out = []
    for source, group in rows.groupby("source", sort=False):
        where = []
        for (machine, device, stack, versions), g in group.groupby(["machine", "device", "stack", "versions"],
                                                                   sort=True):
            where.append(Where(machine, device, stack, versions, g["verdict"].value_counts().to_dict(),
                               g["finding"].value_counts().to_dict()))
        checked = group[group["finding"] != Finding.UNCHECKED]
        errors = []
        failing = group[(group["error_type"] != "") & (group["finding"] != Finding.HOLDS)]
        for (etype, message, layer), g in failing.groupby(["error_type", "error_message", "error_layer"], sort=False):
            errors.append(ErrorText(f"{etype}: {message}", layer, len(g)))
        errors.sort(key=lambda e: -e.cells)
        cells = {}
        for f in Finding:
            ids = group[group["finding"] == f]
            if len(ids):
                cells[f.value] = sorted((f"{i} on {m}" if several else i)
                                        for i, m in zip(ids["id"], ids["machine"], strict=True))
        worst = min((Finding(f) for f in group["finding"]), key=list(Finding).index)
        text = next((t for t in group["statement"] if t), "")
        expected = _expected(checked.iloc[0] if len(checked) else group.iloc[0])
        out.append(Statement(source, text, expected, worst, where, cells, errors,
                             checked[["machine", "device"]].drop_duplicates().shape[0], len(checked),
                             references(source)))
    order = list(Finding)
    out.sort(key=lambda s: (order.index(s.finding) if s.finding in (Finding.BROKE, Finding.DRIFTED) else 9,
                            -s.devices, -s.checked, order.index(s.finding), s.source))
    return out


def references(source: str) -> list[str]:
    """The upstream reports a source cites before its first colon: "diffusers#10800 / bitsandbytes#1525: ..."."""
    head = source.split(":", 1)[0] if ":" in source else source
    return REFERENCE.findall(head)


# ---------------------------------------------------------------------------------------------- upstream

class Reproduction(enum.StrEnum):
    REPRODUCES = "still reproduces"
    DIFFERENTLY = "fails differently"
    GONE = "no longer reproduces"
    UNCHECKED = "not checked"


def reproduction(row: dict) -> Reproduction:
    """Whether the reported bug shows in this cell. An 'error' rule states the bug: failing as documented is
    the bug; a 'works' rule states its fix: working is the fix."""
    verdict = row["verdict"]
    if row["expect"] == "error":
        if verdict == "documented-error":
            return Reproduction.REPRODUCES
        if verdict == "drift-works":
            return Reproduction.GONE
    elif verdict in report_data.RAN:
        return Reproduction.GONE
    if verdict in report_data.BROKEN or verdict == "drift-error":
        return Reproduction.DIFFERENTLY
    return Reproduction.UNCHECKED


@dataclass
class VersionSet:
    versions: str
    first: str  # when first measured
    status: Reproduction
    where: list[str]  # "machine, device, stack" where it was checked
    cells: int
    why: str = ""  # not checked: why (the records' reasons)


@dataclass
class UpstreamReport:
    references: list[str]
    source: str
    status: Reproduction  # tonight: in the newest version set measured (GONE: a candidate to close)
    since: str | None  # the version set from which it no longer reproduces (GONE only)
    seen: bool  # whether any record reproduced it (else `since` is only the oldest version set measured)
    history: list[VersionSet]  # oldest first
    errors: list[str]


def upstream(frame: pd.DataFrame) -> list[UpstreamReport]:
    """Each cited upstream report, from every record (not only the latest: when it stopped reproducing needs the
    nights before): its status in the newest version set, and since which version set it no longer reproduces."""
    rows = frame[frame["source"].map(lambda s: bool(references(s)))]
    if rows.empty:
        return []
    rows = rows.assign(repro=[reproduction(r) for r in report_data.row_dicts(rows, ("verdict", "expect"))])
    out = []
    for source, group in rows.groupby("source", sort=False):
        history = []
        for versions, g in group.groupby("versions", sort=False):
            checked = g[g["repro"] != Reproduction.UNCHECKED]
            status = next((s for s in (Reproduction.REPRODUCES, Reproduction.DIFFERENTLY, Reproduction.GONE)
                           if (checked["repro"] == s).any()), Reproduction.UNCHECKED)
            where = sorted({f"{m}, {d}, {s}" for m, d, s in zip(checked["machine"], checked["device"],
                                                                 checked["stack"], strict=True)})
            why = "; ".join(sorted(set(g[g["repro"] == Reproduction.UNCHECKED]["reason"]))[:2]) if checked.empty \
                else ""
            history.append(VersionSet(versions, g["started"].min(), status, where, len(checked), why))
        history.sort(key=lambda v: v.first)
        measured = [v for v in history if v.status is not Reproduction.UNCHECKED]
        status = measured[-1].status if measured else Reproduction.UNCHECKED
        since, last_bad = None, max((i for i, v in enumerate(measured) if v.status is not Reproduction.GONE),
                                    default=-1)
        if status is Reproduction.GONE:
            since = measured[last_bad + 1].versions
        failing = group[(group["repro"] != Reproduction.GONE) & (group["error_type"] != "")]
        errors = list(dict.fromkeys(f"{t}: {_first_line(m)}" for t, m in zip(failing["error_type"],
                                                                            failing["error_message"], strict=True)))[:5]
        out.append(UpstreamReport(references(source), source, status, since, last_bad >= 0, history, errors))
    out.sort(key=lambda r: (list(Reproduction).index(r.status), r.references))
    return out
