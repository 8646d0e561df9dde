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

import functools
import re
from collections import defaultdict
from dataclasses import dataclass, field
from types import SimpleNamespace

import pandas as pd

from harness.cell import AXES, BASELINE, Cell
from harness.engines.catalog import output_floor
from harness.matrix import Matrix, Rule
from harness.report import data as report_data
from harness.report.statements import FINDING_FIELDS, HAPPENED_FIELDS, Finding, finding, what_happened
from harness.verdict import ErrorInfo, Outcome, Status, Verdict, check_claims, judge

PROCESS_STATUS = {"crash": Status.CRASH, "timeout": Status.TIMEOUT, "hang": Status.HANG, "oom": Status.OOM,
                  "interrupted": Status.INTERRUPTED}
MARK = {Finding.HOLDS: "✓ holds", Finding.DRIFTED: "⚠ drifted", Finding.BROKE: "✗ broke",
        Finding.UNCHECKED: "– not measured"}


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
        return newest.assign(rule=pd.Series(dtype=int), recorded_verdict=pd.Series(dtype=str),
                             claim_status=pd.Series(dtype=object))
    # the baselines' records only, for claims
    bases = records.frame[records.frame["cell_id"] == records.frame["baseline_id"]]
    by_id = {(row["run"], row["id"]): row for row in report_data.row_dicts(bases, ("run", "id", "verdict",
                                                                                 *METRIC_FIELDS))}
    rules, verdicts, contradicted, notes, checked_claims = [], [], [], [], []
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
            checked_claims.append({})
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
        checked_claims.append({c.claim.split(":")[0]: (str(c.status), c.detail or "") for c in claims})
    kinds = [matrix.rules[i].expect.kind.value if i >= 0 else e for i, e in zip(rules, newest["expect"], strict=True)]
    return newest.assign(recorded_verdict=newest["verdict"], verdict=verdicts, rule=rules,
                         claims_contradicted=contradicted, expect=kinds, note=notes, claim_status=checked_claims)


def _baseline_id(row: dict) -> str:
    return Cell(**{k: row[k] for k in AXES.names}).baseline.id


SUGGESTION_LIMIT = 200  # characters: one sentence a maintainer can paste


@dataclass
class Check:
    """What the records say about one rule's statement."""

    finding: Finding
    lines: list[str]  # what was measured, as sentences
    suggestion: str | None  # one sentence (at most SUGGESTION_LIMIT characters) where it no longer holds
    table: list[str] = field(default_factory=list)  # markdown: the combinations that differ, with whole error texts


def failures(newest: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(machine, cell id) -> what failed ("TypeError", the process verdict, or "wrong-output") for every record; ""
    where the cell ran to a right output or was unavailable; ("*", cell id) -> the same on the first machine that
    recorded the cell."""
    bad = (~newest["recorded_verdict"].isin(report_data.RAN) & (newest["recorded_verdict"] != "unavailable")) \
        | (newest["recorded_verdict"] == WRONG)
    out = {(m, i): (e or v) if b else "" for m, i, e, v, b in zip(
        newest["machine"], newest["cell_id"], newest["error_type"], newest["recorded_verdict"], bad, strict=True)}
    for (_, cell_id), what in list(out.items()):  # ("*", id): on any machine, for a cell whose machine lacks it
        out.setdefault(("*", cell_id), what)
    return out


def _failure(row: dict) -> str:
    return row["error_type"] or row["recorded_verdict"]


def shared_with_baseline(row: dict, failed: dict[tuple[str, str], str]) -> bool:
    """Whether a cell fails as the float model does in the same offload mode, device and stack: then the failure is
    the offload's or the stack's, never the engine's (the float model's own failures too)."""
    if not failed.get((row["machine"], row["cell_id"])):
        return False
    if row["engine"] == BASELINE:
        return True
    # its baseline; where none was recorded (a pre-quantized cell's), the float model loaded as usual
    base = row["baseline_id"] if ("*", row["baseline_id"]) in failed \
        else _post_load_baseline(tuple(row[k] for k in AXES.names))
    # on its machine; where that machine did not run it, on another (the same device, stack and versions' failure)
    return failed.get((row["machine"], base), failed.get(("*", base))) == _failure(row)


def wrong_in_every_load(row: dict, failed: dict[tuple[str, str], str]) -> bool:
    """Whether a cell runs to a wrong output and so does its twin loaded post-load (or, for a post-load cell, its
    pre-quantized twin): the type's output quality, which a statement of loading does not speak of."""
    if row["recorded_verdict"] != WRONG:
        return False
    twins = [_twin(tuple(row[k] for k in AXES.names), load) for load in AXES["load"].known() if load != row["load"]]
    return any(failed.get((row["machine"], t), failed.get(("*", t))) == WRONG for t in twins if t)


@functools.lru_cache(maxsize=4096)
def _twin(values: tuple[str, ...], load: str) -> str:
    try:
        return Cell(**dict(zip(AXES.names, values, strict=True))).replace(load=load).id
    except ValueError:
        return ""


@functools.lru_cache(maxsize=4096)
def _post_load_baseline(values: tuple[str, ...]) -> str:
    return Cell(**dict(zip(AXES.names, values, strict=True))).replace(load="post-load").baseline.id


def _claims_finding(row: dict, claims: tuple[str, ...]) -> Finding | None:
    """A statement judged by some of its rule's claims: their statuses only. None: the cell did not run to a right
    output, so it has no speed or size to judge (the statements of compatibility judge it)."""
    if row["verdict"] not in report_data.RAN or row["verdict"] == "wrong-output":
        return None
    status = [(row["claim_status"] or {}).get(c, ("unchecked", ""))[0] for c in claims]
    if "contradicted" in status:
        return Finding.DRIFTED
    return Finding.HOLDS if all(s == "held" for s in status) else Finding.UNCHECKED


def _short(row: dict, finding_: Finding, rule: Rule) -> str:
    """What a cell did, in a few words, for the suggested sentence (the table has the whole text)."""
    if finding_ is Finding.HOLDS:
        return {"error": "fails as stated", "unavailable": "is unavailable as stated"}.get(rule.expect.kind.value,
                                                                                          "works as stated")
    contradicted = _judged_contradictions(row, rule)
    if contradicted:
        return "works, but its " + " and ".join(contradicted) + " claim does not hold"
    if row["verdict"] == "wrong-output":
        return "runs to a wrong output"
    if row["verdict"] in report_data.RAN:
        return "works"
    if row["error_type"]:
        return f"fails with {row['error_type']}"
    return f"ends in a {row['verdict']}"


VERB = {"works": "work", "works,": "work,", "fails": "fail", "is": "are", "runs": "run", "ends": "end"}


def _counted(n: int, phrase: str) -> str:
    """"3 work as stated", "1 fails with TypeError": the short phrase agreeing with its count."""
    verb, _, rest = phrase.partition(" ")
    if n != 1:
        verb, rest = VERB.get(verb, verb), rest.replace(" its ", " their ")
    return f"{n} {verb} {rest}".rstrip()


def _judged_contradictions(row: dict, rule: Rule) -> list[str]:
    status = row["claim_status"] or {}
    return [c for c, (s, _) in status.items()
            if s == "contradicted" and (not rule.judged_claims or c in rule.judged_claims)]


def _whole(row: dict, finding_: Finding, rule: Rule) -> str:
    """What a cell did, with its error's first line (never cut within it)."""
    if finding_ is Finding.HOLDS:
        return _short(row, finding_, rule)
    if _judged_contradictions(row, rule):
        parts = [p for p in row["claims_contradicted"].split("; ")
                 if not rule.judged_claims or p.split(" ", 1)[0] in rule.judged_claims]
        return "works, but " + "; ".join(parts)
    if row["error_type"]:
        return f"fails with {row['error_type']}: {_first_line(row['error_message'])}"
    return _whole_text(row)


def _first_line(message: str) -> str:
    """An error message's first line, whole (a traceback's or a compiler's explanation follows it); a first line
    that announces what follows ("expected one of:") keeps it, on one line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if lines and lines[0].endswith(":"):
        return " ".join(lines)
    return lines[0] if lines else ""


def _whole_text(row: dict) -> str:
    """What happened, with a process verdict's reason whole (what_happened cuts it to a line for the report)."""
    if row["verdict"] in report_data.BROKEN and row["reason"]:
        return f"{row['verdict']}: {' '.join(row['reason'].split())}"
    return what_happened(row)


def check(rule: Rule, index: int, newest: pd.DataFrame, failed: dict[tuple[str, str], str] | None = None,
          matrix: Matrix | None = None, cells: list[SimpleNamespace] | None = None) -> Check:
    """What the records show for one rule's statement; `newest`: judged() (`cells`: its rows' cells, _cells()).
    Only the cells and claims that test the statement judge it (rule.judges), and never a failure the float model
    shares."""
    failed = failures(newest) if failed is None else failed
    rows = newest[newest["rule"] == index]
    view = report_data.row_dicts(rows, (*FINDING_FIELDS, *HAPPENED_FIELDS, *AXES.names, "machine", "cell_id",
                                        "baseline_id", "claim_status", "recorded_verdict", "offload_moved", "path"))
    found, left = _sort_out(rule, view, failed)
    left_out = _left_out_lines(rule, view, found, left)
    keep = [i for i, f in enumerate(found) if f is not None and f is not Finding.UNCHECKED]
    if not keep:
        reason = ("no cell's offload moved weights between devices; needs a run on an accelerator (CPU only: "
                  "the hooks ran, nothing moved)" if left["hooks_only"] == len(view) and left["hooks_only"]
                  else _unchecked_reason(rule, index, rows, newest, matrix, cells))
        return Check(Finding.UNCHECKED, [f"Not measured: {reason}."] + left_out, None)
    checked = rows.iloc[keep]
    worst = min((found[i] for i in keep), key=list(Finding).index)
    shorts: dict[str, list[int]] = defaultdict(list)
    wholes: dict[str, list[int]] = defaultdict(list)
    for position in keep:
        shorts[_short(view[position], found[position], rule)].append(position)
        wholes[_whole(view[position], found[position], rule)].append(position)
    by_short = sorted(shorts.items(), key=lambda g: -len(g[1]))
    lines = [f"{len(keep)} cell(s) checked, on {_where(checked)}: "
             + ", ".join(_counted(len(p), phrase) for phrase, p in by_short) + ".",
             f"Measured with {_versions(checked)}.", *left_out]
    if worst is Finding.HOLDS:
        return Check(worst, lines, None)
    return Check(worst, lines, _suggestion(rule, by_short, len(keep), _devices(checked)),
                 _combinations(rows, checked, wholes))


def _sort_out(rule: Rule, view: list[dict], failed: dict) -> tuple[list[Finding | None], dict[str, int]]:
    """Each cell's finding for the statement, or None where it is left out, and how many were left out why."""
    found: list[Finding | None] = []
    left = dict.fromkeys(("outside", "treated", "shared", "not_run", "hooks_only", "type_output"), 0)
    about_offload = any(o != "none" for o in rule.match.get("offload", ()))
    about_load = "load" in rule.match and "engine" not in rule.match and "type" not in rule.match
    for r in view:
        cell = SimpleNamespace(**{k: r[k] for k in AXES.names})
        why = ("treated" if not rule.untreated(cell) else "outside" if not rule.judges_cell(cell)
               # a statement of offloading needs an offload that moved weights between devices
               else "hooks_only" if about_offload and r["offload"] != "none" and r["offload_moved"] is not True
               else "shared" if shared_with_baseline(r, failed)
               # a statement of loading is not judged by a type's output, wrong whichever way it is loaded
               else "type_output" if about_load and wrong_in_every_load(r, failed) else None)
        if why is not None:
            left[why] += 1
            found.append(None)
        elif rule.judged_claims and finding(r) is not Finding.UNCHECKED:
            f = _claims_finding(r, rule.judged_claims)
            left["not_run"] += f is None
            found.append(f)
        else:
            found.append(finding(r))
    return found, left


def _left_out_lines(rule: Rule, view: list[dict], found: list[Finding | None], left: dict[str, int]) -> list[str]:
    """What was left out of judging the statement, and why, one line each."""
    lines = []
    if left["hooks_only"]:
        lines.append(f"{left['hooks_only']} cell(s) left out: {HOOKS_ONLY}.")
    if left["shared"]:
        lines.append(f"{left['shared']} cell(s) left out: the float model fails the same way in the same offload "
                     "mode, device and stack (the offload's or the stack's failure, not the engine's).")
    if left["treated"]:
        lines.append(f"{left['treated']} cell(s) left out: {TREATED}.")
    if left["type_output"]:
        lines.append(f"{left['type_output']} cell(s) left out: {TYPE_OUTPUT}.")
    if left["outside"]:
        where = " ".join(AXES[k].describe(v) for k, v in rule.judges.items())
        lines.append(f"{left['outside']} cell(s) left out: the statement is judged by the cells {where} only.")
    claims = " and ".join(rule.judged_claims)
    unclear = [view[i] for i, f in enumerate(found) if f is Finding.UNCHECKED and rule.judged_claims
               and view[i]["verdict"] in report_data.RAN]
    if unclear:
        why = sorted({d for r in unclear for c, (st, d) in (r["claim_status"] or {}).items()
                      if c in rule.judged_claims and st != "held" and d} or {"no figure to compare"})
        lines.append(f"{len(unclear)} cell(s) ran, but their {claims} claim(s) could not be judged: "
                     f"{'; '.join(why[:2])}.")
    if left["not_run"]:
        lines.append(f"{left['not_run']} cell(s) left out: they did not run to a right output, and the statement "
                     f"is judged by its {claims} claim(s) only.")
    return lines


def _suggestion(rule: Rule, by_short: list[tuple[str, list[int]]], checked: int, devices: str) -> str:
    """The sentence that replaces the statement: at most SUGGESTION_LIMIT characters, counting cells."""
    subject = _subject(rule)
    if len(by_short) == 1:
        suggestion = f"{subject} {by_short[0][0]} on {devices}."
    else:
        parts = ", ".join(_counted(len(p), phrase) for phrase, p in by_short[:2])
        rest = sum(len(p) for _, p in by_short[2:])  # cells, not kinds of outcome
        suggestion = (f"{subject}, on {devices}: of {checked} cells, {parts}"
                      + (f", {rest} otherwise" if rest > 0 else "") + " (the table gives each combination).")
    if len(suggestion) > SUGGESTION_LIMIT:
        suggestion = f"{subject}: what happens differs by combination on {devices} (see the table)."
    if len(suggestion) > SUGGESTION_LIMIT:
        suggestion = f"What happens differs by combination on {devices} (see the table)."
    return suggestion


def _combinations(rows: pd.DataFrame, checked: pd.DataFrame, wholes: dict[str, list[int]]) -> list[str]:
    """The table of the combinations that differ: cells, what they share, devices, what happened."""
    groups = sorted(wholes.items(), key=lambda g: -len(g[1]))
    table = ["| cells | combination | devices | what happened |", "|---|---|---|---|"]
    for phrase, positions in groups:
        frame = rows.iloc[positions]
        narrow = _narrow(frame, checked) or ("the others" if len(groups) > 1 else "all")
        table.append(f"| {len(positions)} | {_cell_text(narrow)} | "
                     f"{', '.join(sorted(set(frame['device'])))} | {_cell_text(phrase)} |")
    return table


TREATED = ("they add what the statement does not name (layerwise casting, more components quantized, compile or a "
           "LoRA), which has statements of its own")
WRONG = Verdict.WRONG_OUTPUT.value
TYPE_OUTPUT = ("their type runs to a wrong output however it is loaded (the type's quality, which the statement "
               "does not speak of)")
HOOKS_ONLY = "on the CPU the offload's hooks run but no weight moves between devices (its execution device is the CPU)"


def _devices(checked: pd.DataFrame) -> str:
    """The devices the checked cells ran on, each said with the path its evidence is on where none of its cells
    took SD.Next's (the diffusers stack on a whole pipeline): "cpu and cuda (control path only)"."""
    plain, control = [], []
    for device in sorted(set(checked["device"])):
        (plain if "sdnext" in set(checked[checked["device"] == device]["path"]) else control).append(device)
    said = " and ".join(plain)
    if control:  # "cpu, and on cuda (control path only)": the qualifier never reads as the other devices'
        said += (", and on " if plain else "") + " and ".join(control) + " (control path only)"
    return said


def _cell_text(text: str) -> str:
    return text.replace("|", "\\|")


PLURAL = {"qtype": "types", "dtype": "compute dtypes", "cast": "casts"}


def _subject(rule: Rule) -> str:
    """The combination a rule matches, in words, with no long lists: "BitsAndBytes with sequential offload"."""
    m = rule.match
    words = [] if "engine" in m else ["every engine"]
    for axis in AXES:
        if axis.name in m and axis.name != "device":  # the devices measured are said after it, not those matched
            values = m[axis.name]
            plural = PLURAL.get(axis.name, axis.name + "s")
            words.append(f"{len(values)} {plural}" if axis.name == "qtype" and len(values) > 2
                         else axis.describe(values))
    text = " ".join(words)
    return text[0].upper() + text[1:]


def _where(rows: pd.DataFrame) -> str:
    pairs = sorted(set(zip(rows["machine"], rows["device"], strict=True)))
    return ", ".join(f"{d} ({m})" for m, d in pairs)


def _unchecked_reason(rule: Rule, index: int, rows: pd.DataFrame, newest: pd.DataFrame, matrix: Matrix | None,
                      cells: list[SimpleNamespace] | None = None) -> str:
    """What is missing for a statement no record checked, as exactly as the records tell."""
    # a device a host lacks says nothing of the statement: look further (astype: an empty frame's column is no mask)
    here = rows[~rows["device_absent"].astype(bool)]
    unavailable = sorted({r for r, v in zip(here["reason"], here["verdict"], strict=True) if v == "unavailable" and r})
    if unavailable:
        return "every cell it decides was unavailable: " + "; ".join(unavailable[:3])
    if len(here):
        return f"each of the {len(here)} cells it decides was left out (below)"
    candidates = newest[[rule.matches(c) for c in (cells or _cells(newest))]] if len(newest) else newest
    measured = sorted(set(newest[~newest["device_absent"]]["device"])) if len(newest) else []
    needs = rule.match.get("device")
    if candidates.empty:
        if needs and not set(needs) & set(measured):
            return f"it needs a {' or '.join(needs)} device; the records measured {', '.join(measured) or 'none'}"
        return "no record of a cell it matches (run its matrix file to check it)"
    present = candidates[~candidates["device_absent"].astype(bool)]
    if rule.versions:
        wanted = ", ".join(f"{p} {'absent' if s is None else s}" for p, s in rule.versions.items())
        on = f" on a {' or '.join(needs)} device" if needs else ""
        if present.empty:
            return f"it applies only with {wanted}{on}, and no record measured such a device"
        had = sorted({", ".join(f"{p} {v[p] or 'absent'}" if p in v else f"{p} not recorded" for p in rule.versions)
                      for v in present["package_versions"]})
        return f"it applies only with {wanted}{on}; the records measured there had {'; '.join(had)}"
    taken = candidates[(candidates["rule"] >= 0) & (candidates["rule"] != index)]
    if len(taken) and matrix is not None:
        sources = sorted({matrix.rules[i].expect.source or f"rule {i + 1}" for i in taken["rule"]})
        return (f"the {len(taken)} records of cells it matches were decided by earlier rules ("
                + "; ".join(sources[:3]) + (f"; {len(sources) - 3} more" if len(sources) > 3 else "") + ")")
    return "no record of a cell it matches (run its matrix file to check it)"


def _cells(newest: pd.DataFrame) -> list[SimpleNamespace]:
    """Each row's cell, for rules to match."""
    return [SimpleNamespace(**dict(zip(AXES.names, values, strict=True)))
            for values in zip(*(newest[k] for k in AXES.names), strict=True)]


def _narrow(frame: pd.DataFrame, checked: pd.DataFrame) -> str:
    """What a group of cells has in common that the rest of the rule's cells do not: "sequential offload"."""
    words = []
    for axis in AXES:
        mine, every = set(frame[axis.name]), set(checked[axis.name])
        if axis.narrows and mine != every:
            if axis.omit == "-" and mine == {"-"}:  # "no compile", not "- compile"
                words.append(f"no {axis.name}")
            else:
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


# ------------------------------------------------------------------------------------- support tables

LEGEND = ("✓ every type measured works there; ⚠ k of n types work; ✗ none does. A type works where, in one of its "
          "load modes at least, every cell of it (each model and dtype measured) ran to a right output; unavailable "
          "cells are not counted. A footnote gives the commonest failure of the rest.")


CELL_LEGEND = ("✓ every cell of the type measured there (each model, load mode and dtype) ran to a right output; "
               "⚠ k of n cells did; ✗ none did. Unavailable cells are not counted.")


def _works(row: dict) -> bool:
    return row["recorded_verdict"] in report_data.RAN and row["recorded_verdict"] != "wrong-output"


def _support_entry(mine: list[dict], unit: str, failed: dict, notes: dict[str, int]) -> str:
    """One entry of a support table: how many `unit`s work among these cells ("⚠ 2/3"), with a footnote number for
    the commonest failure (added to `notes`)."""
    units: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in mine:
        units[r[unit]][r["load"]].append(r)
    if not units:
        return ""
    # a type works where it works in one of its load modes (each of its cells there)
    working = sum(any(all(_works(r) for r in cells) for cells in loads.values()) for loads in units.values())
    symbol = "✓" if working == len(units) else "✗" if working == 0 else "⚠"
    entry = f"{symbol} {working}/{len(units)}"
    bad = [r for r in mine if not _works(r)]
    if bad:
        texts: dict[str, int] = defaultdict(int)
        for r in bad:
            texts[_failure_text(r, failed)] += 1
        text = max(texts, key=lambda t: texts[t])
        entry += f" [{notes.setdefault(text, len(notes) + 1)}]"
    return entry


def support_tables(newest: pd.DataFrame, row_axis: str = "engine", unit: str = "qtype",
                   failed: dict[tuple[str, str], str] | None = None, legend: str = LEGEND) -> list[str]:
    """Markdown: a table per machine, device and stack, a row per `row_axis` value, a column per offload mode;
    each entry counts the `unit`s (an engine's types) that work there, the way llama.cpp's docs/ops.md comes from
    its test cases. A footnote gives the commonest failure of each entry that is not all ✓, with its whole text.
    `failed`: failures() of every record (the float model's among them), for the failures it shares."""
    frame = newest[~newest["device_absent"] & (newest["recorded_verdict"] != "unavailable")]
    if frame.empty:
        return []
    failed = failures(newest) if failed is None else failed
    out: list[str] = []
    notes: dict[str, int] = {}
    hooks_only = False
    fields = (*AXES.names, "machine", "cell_id", "baseline_id", "recorded_verdict", "verdict", "error_type",
              "error_message", "claims_contradicted", "reason", "note")
    for (machine, device, stack), group in frame.groupby(["machine", "device", "stack"], sort=True):
        if row_axis == "engine" and set(group["engine"]) <= {BASELINE}:
            continue
        offloads = [o for o in AXES["offload"].known() if o in set(group["offload"])]
        keys = [k for k in AXES[row_axis].known() if k in set(group[row_axis])]
        unmoved = [o for o in offloads if o != "none" and not group[group["offload"] == o]["offload_moved"].eq(
            True).any()]  # None (no offload) and False alike: nothing moved
        hooks_only = hooks_only or bool(unmoved)
        heads = [f"{o} (hooks only)" if o in unmoved else o for o in offloads]
        out += [f"### {device}, {AXES['stack'].describe((stack,))} ({machine})", "",
                f"| {row_axis if row_axis == 'engine' else AXES[row_axis].label} | " + " | ".join(heads) + " |",
                "|---|" + "---|" * len(offloads)]
        rows = report_data.row_dicts(group, fields)
        for key in keys:
            entries = [_support_entry([r for r in rows if r[row_axis] == key and r["offload"] == offload], unit,
                                      failed, notes) for offload in offloads]
            out.append(f"| {AXES[row_axis].describe((key,))} | " + " | ".join(entries) + " |")
        out.append("")
    if not out:
        return []
    if hooks_only:
        legend += (f" An offload column marked hooks only: {HOOKS_ONLY}; it says the hooks work with the engine, "
                   "not that the offload does or what it saves.")
    out += [legend, ""] + [f"{n}. {_cell_text(text)}" for text, n in notes.items()]
    return out + [""]


def _failure_text(row: dict, failed: dict[tuple[str, str], str]) -> str:
    if row["recorded_verdict"] == "wrong-output":
        text = "runs, but its output is wrong" + (f": {row['note'].split(': ', 1)[-1]}" if row["note"] else "")
    elif row["error_type"]:
        text = f"{row['error_type']}: {' '.join(row['error_message'].split())}"
    else:
        text = _whole_text(row)
    if row["engine"] != BASELINE and shared_with_baseline(row, failed):
        text += " (the float model fails the same way here: the offload's or the stack's failure)"
    return text


# ----------------------------------------------------------------------------------------------- render

@dataclass
class Judged:
    """One rule's statement as the patch judged it (the report's first screen lists them)."""

    section: str
    statement: str
    source: str
    finding: Finding
    suggestion: str | None
    engines: tuple[str, ...] = ()  # the engines its rule names (none: every engine)


@dataclass
class Patch:
    text: str  # the markdown
    tally: dict[Finding, int]  # statements by finding
    judged: list[Judged]
    newest: pd.DataFrame | None = field(default=None, repr=False)  # judged(): what the edited page draws from
    failed: dict | None = field(default=None, repr=False)  # failures() of `newest`

    @property
    def headline(self) -> str:
        """"Statements checked: 3 broke, ...": the line the patch and the report's first screen share."""
        return "Statements checked: " + ", ".join(f"{self.tally.get(f, 0)} {MARK[f].split(' ', 1)[1]}"
                                                  for f in Finding) + "."


def render(matrix: Matrix, records: report_data.Records) -> str:
    """The patch, as markdown."""
    return assess(matrix, records).text


def _heading(matrix: Matrix) -> list[str]:
    """The patch's title, the page's address and the note on the engines the tool no longer ships."""
    document = matrix.document
    lines = [f"# {document.title if document else matrix.name}: what the records show", ""]
    if document and document.url:
        lines += [f"Page: <{document.url}>", ""]
    if document and document.removed:
        names = AXES["engine"].describe(document.removed).split(" or ")
        listed = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
        lines += [f"> **No longer shipped.** The {document.removed_in} release removed {listed}, which this page "
                  f"still documents" + (f" ({document.removed_note})" if document.removed_note else "")
                  + ". Their statements below were checked through diffusers' integrations and the engines' own "
                  "APIs, not through the tool.", ""]
    return lines


def _by_section(matrix: Matrix) -> dict[str, dict[str, list[tuple[int, Rule]]]]:
    """The rules that document a statement, by the page's section and statement, in the rules' order."""
    by_section: dict[str, dict[str, list[tuple[int, Rule]]]] = defaultdict(dict)
    for index, rule in enumerate(matrix.rules):
        if rule.expect.source is None and rule.expect.statement is None:
            continue
        statement = rule.expect.statement or rule.expect.source
        by_section[rule.expect.section or ""].setdefault(statement, []).append((index, rule))
    return by_section


def assess(matrix: Matrix, records: report_data.Records) -> Patch:
    """The patch, and how each statement came out."""
    newest = judged(matrix, records)
    failed = failures(newest) if len(newest) else {}
    cells = _cells(newest) if len(newest) else []
    document = matrix.document
    lines = _heading(matrix)
    summary_at = len(lines)
    lines += [f"Generated by quantmatrix from the rules in `{matrix.path.name}` and {len(newest)} records (the "
              f"newest of each cell on each machine: {', '.join(sorted(set(newest['machine']))) or 'none'}). Each "
              "statement is quoted as the page has it; below it, what was measured, and where it no longer holds, a "
              "suggested sentence and a table of the combinations that differ.", ""]
    table = support_tables(newest[newest["engine"] != "sdnq"], failed=failed) if len(newest) else []
    if table:
        lines += ["## Compatibility (measured)", "", "Engine by offload mode, per device and stack.", "", *table]
    sections = list(document.sections) if document else []
    by_section = _by_section(matrix)
    tally: dict[Finding, int] = defaultdict(int)
    out: list[Judged] = []
    for section in sections + ([""] if "" in by_section else []):
        if section not in by_section:
            continue
        lines += [f"## {section or 'Statements without a section'}", ""]
        for statement, rules in by_section[section].items():
            lines += [f"> {statement}", ""]
            for index, rule in rules:
                result = check(rule, index, newest, failed, matrix, cells)
                tally[result.finding] += 1
                out.append(Judged(section, statement, rule.expect.source or "", result.finding, result.suggestion,
                                  tuple(rule.match.get("engine", ()))))
                detail = rule.expect.source if len(rules) > 1 or rule.expect.statement else ""
                lines.append(f"- **{MARK[result.finding]}**" + (f" ({detail})" if detail else "") + ": "
                             + " ".join(result.lines))
                if result.suggestion:
                    lines.append(f"  - Suggested: {result.suggestion}")
                if result.table:
                    lines += ["", *result.table, ""]
            lines.append("")
    sdnq = newest[newest["engine"] == "sdnq"] if len(newest) else newest
    sdnq_table = support_tables(sdnq, row_axis="qtype", unit="cell_id", failed=failed, legend=CELL_LEGEND) \
        if len(sdnq) else []
    if sdnq_table:
        lines += ["## SDNQ (measured; the page has no section for it)", "",
                  "SDNQ's types by offload mode, per device and stack, from the records.", "", *sdnq_table]
    patch = Patch("", dict(tally), out, newest, failed)
    lines[summary_at:summary_at] = [patch.headline, ""]
    patch.text = without_local_paths("\n".join(lines))
    return patch


# Paths of the machine a record was made on, which mean nothing on the page (and name a user's folders): an
# installed package's files from its package on, the run's work folder and temporary or home folders as a mark
_LOCAL = [(re.compile(r"""[^\s'"(\[]*/(?:site|dist)-packages/"""), ""),
          (re.compile(r"""[^\s'"(\[]*/quantmatrix-work/"""), "<run folder>/"),
          (re.compile(r"""(?<![\w.])/(?:tmp|var/tmp|root|home/[^/\s]+|Users/[^/\s]+|work)/[^\s'"),\]]*"""),
           "<local path>")]


def without_local_paths(text: str) -> str:
    """`text` with the local paths error messages carry (virtualenvs, site-packages, temporary folders) cut."""
    for pattern, replacement in _LOCAL:
        text = pattern.sub(replacement, text)
    return text
