"""A patch for the page a matrix's rules state: markdown a wiki maintainer can paste over it.

    quantmatrix report RESULTS... --doc-patch [--rules matrices/sdnext.toml] [-o FILE]

For each section of the rules file's [document], each statement as written, then what the newest records show
(on which devices, with which versions) and, where it drifted or broke, a suggested sentence built from what was
measured. Statements that no record checked say why. Generated from the rules and the records only.

Each record is judged again against the rules file, as the run would have judged it (the first rule that matches
the cell and holds for the record's versions; claims against the same run's baseline record): a record judged by
another matrix file (the default matrix, say) still tells whether a statement of this page holds.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pandas as pd

from harness.cell import AXES, Cell
from harness.engines.catalog import output_floor
from harness.matrix import ExpectKind, Matrix, Rule
from harness.report import data as report_data
from harness.report.statements import FINDING_FIELDS, HAPPENED_FIELDS, Finding, finding, what_happened
from harness.verdict import ErrorInfo, Outcome, Status, check_claims, judge

PROCESS_STATUS = {"crash": Status.CRASH, "timeout": Status.TIMEOUT, "hang": Status.HANG, "oom": Status.OOM,
                  "interrupted": Status.INTERRUPTED}
MARK = {Finding.HOLDS: "✓ holds", Finding.DRIFTED: "⚠ drifted", Finding.BROKE: "✗ broke",
        Finding.UNCHECKED: "– not checked"}


def describe(rule: Rule) -> str:
    """The combination a rule matches, in words: "BitsAndBytes nf4/nf4-dq with sequential offload"."""
    m = rule.match
    words = [] if "engine" in m else ["every engine"]
    words += [axis.describe(m[axis.name]) for axis in AXES if axis.name in m]
    return " ".join(words)


def _where(rows: pd.DataFrame) -> str:
    pairs = sorted(set(zip(rows["machine"], rows["device"], strict=True)))
    return ", ".join(f"{d} ({m})" for m, d in pairs)


def _unchecked_reason(rule: Rule, rows: pd.DataFrame, newest: pd.DataFrame) -> str:
    if len(rows):
        reasons = sorted({r for r in rows["reason"] if r})
        return "every matching cell was unavailable: " + "; ".join(reasons[:3])
    if rule.versions:
        wanted = ", ".join(f"{p} {'absent' if s is None else s}" for p, s in rule.versions.items())
        return f"it applies only with {wanted}; no record was measured with those versions"
    if "device" in rule.match:
        have = sorted(set(newest["device"])) or ["none"]
        return f"it needs a {' or '.join(rule.match['device'])} device; the records have {', '.join(have)}"
    return "no record of a cell it matches (run its matrix file to check it)"


METRIC_FIELDS = ("param_bytes", "peak_mem_bytes", "mem_base_bytes", "latency_ms", "name_hint", "name_hint_detail",
                 "sqnr_db", "psnr_db", "latency_pairing", "latency_paired", "latency_lo", "latency_hi",
                 "latency_pairs", "latency_unpaired")


def _metrics(row: dict) -> dict:
    return {"param_bytes": row["param_bytes"], "peak_mem_bytes": row["peak_mem_bytes"],
            "mem_base_bytes": row["mem_base_bytes"], "latency_ms": {"median": row["latency_ms"]},
            "name_hint": row["name_hint"], "name_hint_detail": row["name_hint_detail"],
            "sqnr_db": row["sqnr_db"], "psnr_db": row["psnr_db"], **_paired(row)}


def _paired(row: dict) -> dict:
    """The record's paired latency (metrics.latency_vs_float) from its row; nothing for a record from before."""
    if row["latency_pairing"] == "paired":
        return {"latency_vs_float": {"ratio": row["latency_paired"], "lo": row["latency_lo"],
                                     "hi": row["latency_hi"], "n": row["latency_pairs"]}}
    if row["latency_pairing"] == "unpaired":
        return {"latency_vs_float": {"unpaired": row["latency_unpaired"]}}
    return {}


def _outcome(row: dict) -> Outcome:
    """What happened in a record's cell, read back from the record."""
    verdict = row["verdict"]
    if verdict in report_data.RAN:
        return Outcome(Status.RAN, _metrics(row))
    if verdict == "unavailable":
        return Outcome(Status.UNAVAILABLE, reason=row["reason"])
    if verdict in PROCESS_STATUS:
        return Outcome(PROCESS_STATUS[verdict], reason=row["reason"])
    return Outcome(Status.ERROR, error=ErrorInfo(row["error_type"] or "Error", row["error_message"]),
                   reason=row["reason"])


def judged(matrix: Matrix, records: report_data.Records) -> pd.DataFrame:
    """The newest record of each cell on each machine, judged against `matrix`'s rules: columns `rule` (the index
    of the rule that decides, -1 for none) and `verdict` (the recorded one is kept as `recorded_verdict`)."""
    newest = records.latest(per_versions=False)
    newest = newest[newest["engine"] != "fault"]  # the harness's own fault-injection engine states nothing
    if newest.empty:
        return newest.assign(rule=pd.Series(dtype=int), recorded_verdict=pd.Series(dtype=str))
    # the baselines' records only, for claims
    bases = records.frame[records.frame["cell_id"] == records.frame["baseline_id"]]
    by_id = {(row["run"], row["id"]): row for row in report_data.row_dicts(bases, ("run", "id", "verdict",
                                                                                 *METRIC_FIELDS))}
    rules, verdicts, contradicted, notes = [], [], [], []
    for row in report_data.row_dicts(newest, (*AXES.names, *HAPPENED_FIELDS, *METRIC_FIELDS, "run",
                                              "package_versions")):
        cell = SimpleNamespace(**{k: row[k] for k in AXES.names})
        known = row["package_versions"]  # a rule on a version the record did not note (older records) is skipped
        index = next((i for i, r in enumerate(matrix.rules) if r.matches(cell) and set(r.versions) <= set(known)
                      and r.holds_for(known)), -1)
        rules.append(index)
        if index < 0:
            verdicts.append(row["verdict"])
            contradicted.append(row["claims_contradicted"])
            notes.append(row["note"])
            continue
        expect = matrix.rules[index].expect
        outcome = _outcome(row)
        claims = []
        if outcome.status is Status.RAN and expect.claims:
            base = by_id.get((row["run"], _baseline_id(row)))
            claims = check_claims(expect, outcome.metrics, None if base is None or base["verdict"] not in
                                  report_data.RAN else _metrics(base))
        verdict, note = judge(expect, outcome, claims, output_floor(row["engine"], row["qtype"], row["cast"]))
        verdicts.append(verdict.value)
        notes.append(note)  # what the re-judged verdict says (a wrong output's figures against its floor)
        contradicted.append("; ".join(f"{c.claim} ({c.detail})" for c in claims if c.status == "contradicted"))
    kinds = [matrix.rules[i].expect.kind.value if i >= 0 else e for i, e in zip(rules, newest["expect"], strict=True)]
    return newest.assign(recorded_verdict=newest["verdict"], verdict=verdicts, rule=rules,
                         claims_contradicted=contradicted, expect=kinds, note=notes)


def _baseline_id(row: dict) -> str:
    return Cell(**{k: row[k] for k in AXES.names}).baseline.id


def check(rule: Rule, index: int, newest: pd.DataFrame) -> tuple[Finding, list[str], str | None]:
    """(finding, lines of what the records show, suggested sentence or None) for one rule; `newest`: judged()."""
    rows = newest[newest["rule"] == index]
    view = report_data.row_dicts(rows, (*FINDING_FIELDS, *HAPPENED_FIELDS))
    found = [finding(r) for r in view]
    checked = rows[[f is not Finding.UNCHECKED for f in found]]
    if checked.empty:
        return Finding.UNCHECKED, [f"Not checked: {_unchecked_reason(rule, rows, newest)}."], None
    findings = [f for f in found if f is not Finding.UNCHECKED]
    worst = min(findings, key=list(Finding).index)
    by_phrase: dict[str, list[int]] = defaultdict(list)  # positions in `rows`
    for position, (f, row) in enumerate(zip(found, view, strict=True)):
        if f is not Finding.UNCHECKED:
            by_phrase["as stated" if f is Finding.HOLDS else what_happened(row)].append(position)
    groups = sorted(((phrase, rows.iloc[positions]) for phrase, positions in by_phrase.items()),
                    key=lambda g: -len(g[1]))
    lines = [f"{len(frame)} cell(s) {phrase}" + (f" ({narrow})" if (narrow := _narrow(frame, checked)) else "")
             + f", on {_where(frame)}, with {_versions(frame)}." for phrase, frame in groups]
    suggestion = None
    if worst is not Finding.HOLDS:
        parts = []
        for phrase, frame in groups:
            narrow = _narrow(frame, checked)
            if phrase == "as stated":
                phrase = "fails as stated" if rule.expect.kind is ExpectKind.ERROR else "behaves as stated"
            parts.append((f"{narrow}: " if narrow else "") + f"{phrase} on {', '.join(sorted(set(frame['device'])))}")
        text = describe(rule)
        suggestion = text[0].upper() + text[1:] + ": " + "; ".join(parts) + "."
    return worst, lines, suggestion


def _narrow(frame: pd.DataFrame, checked: pd.DataFrame) -> str:
    """What a group of cells has in common that the rest of the rule's cells do not: "sequential offload"."""
    words = []
    for axis in AXES:
        mine, every = set(frame[axis.name]), set(checked[axis.name])
        if axis.narrows and mine != every:
            words.append(axis.phrase.format("/".join(sorted(mine))))
    return ", ".join(words)


def _versions(frame: pd.DataFrame) -> str:
    """The versions that matter to these cells: torch, their engines, and diffusers and accelerate."""
    engines = sorted(set(frame["engine"]))
    out = set()
    for v in {id(v): v for v in frame["package_versions"]}.values():  # a version set's rows share one dict
        out.add(", ".join([f"torch {v.get('torch')}"] + [f"{e} {v[e]}" for e in engines if v.get(e)]
                          + [f"{k} {v[k]}" for k in ("diffusers", "accelerate") if v.get(k)]))
    return "; ".join(sorted(out))


def render(matrix: Matrix, records: report_data.Records) -> str:
    """The patch, as markdown."""
    newest = judged(matrix, records)
    document = matrix.document
    title = document.title if document else matrix.name
    lines = [f"# {title}: what the records show", "",
             f"Generated by quantmatrix from the rules in `{matrix.path.name}` and {len(newest)} records (the newest "
             f"of each cell on each machine: {', '.join(sorted(set(newest['machine']))) or 'none'}). Each statement "
             "is quoted as the page has it; below it, what was measured, and where it no longer holds, a suggested "
             "sentence.", ""]
    if document and document.url:
        lines[-1:-1] = [f"Page: <{document.url}>", ""]
    sections = list(document.sections) if document else []
    by_section: dict[str, dict[str, list[tuple[int, Rule]]]] = defaultdict(dict)
    for index, rule in enumerate(matrix.rules):
        if rule.expect.source is None and rule.expect.statement is None:
            continue
        statement = rule.expect.statement or rule.expect.source
        by_section[rule.expect.section or ""].setdefault(statement, []).append((index, rule))
    tally: dict[Finding, int] = defaultdict(int)
    for section in sections + ([""] if "" in by_section else []):
        if section not in by_section:
            continue
        lines += [f"## {section or 'Statements without a section'}", ""]
        for statement, rules in by_section[section].items():
            lines += [f"> {statement}", ""]
            for index, rule in rules:
                worst, shown, suggestion = check(rule, index, newest)
                tally[worst] += 1
                detail = rule.expect.source if len(rules) > 1 or rule.expect.statement else ""
                lines.append(f"- **{MARK[worst]}**" + (f" ({detail})" if detail else "") + ": "
                             + " ".join(shown))
                if suggestion:
                    lines.append(f"  - Suggested: {suggestion}")
            lines.append("")
    summary = ", ".join(f"{tally[f]} {MARK[f].split(' ', 1)[1]}" for f in Finding)
    lines[2:2] = [f"Statements checked: {summary}.", ""]
    return "\n".join(lines)
