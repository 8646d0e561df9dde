"""What a run's records say about each rule of its matrix: the summary printed at the end of a matrix run.

Built from the records alone (the results file), so that it is the same whether the cells ran in this process, in
pytest-xdist workers, or in a run that was resumed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from harness.matrix import ExpectKind, Matrix
from harness.results import device_was_absent
from harness.verdict import Absence, ClaimStatus, Verdict


class RuleTally:
    """What happened to the cells one rule decided: held, drifted, not checkable here, or broken."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.drifted: Counter[str] = Counter()  # what the drifted cells did instead
        self.broken: Counter[str] = Counter()
        self.unchecked: Counter[str] = Counter()  # why a cell could not be checked here
        self.absent: Counter[str] = Counter()  # devices this host lacks
        self.claims: Counter[tuple[str, str]] = Counter()

    def add(self, record: dict) -> None:
        verdict, device = Verdict(record["verdict"]), record["cell"]["device"]
        where = f"{device}, {record['cell'].get('stack', 'direct')} stack"
        error = record.get("error")
        error_text = f"{error['type']}: {error['message']}" if error else None
        claims = record.get("claims") or []
        for c in claims:
            self.claims[(c["claim"], c["status"])] += 1
        if verdict.is_drift:
            self.counts["drifted"] += 1
            actual = error_text or "it worked"
            if verdict is Verdict.DRIFT_CLAIM:
                actual = "; ".join(f"{c['claim']}: {c.get('detail', '')}" for c in claims
                                   if c["status"] == ClaimStatus.CONTRADICTED)
            self.drifted[f"{verdict.value} on {where}: {actual[:200]}"] += 1
        elif verdict.passed:
            self.counts["held"] += 1
        elif (verdict is Verdict.UNAVAILABLE and record.get("absence") == Absence.NOT_OFFERED.value
              and (record.get("expect") or {}).get("kind") == ExpectKind.UNAVAILABLE):
            self.counts["held"] += 1  # the harness itself knows the engine does not offer it, as documented
        elif verdict is Verdict.UNAVAILABLE:
            self.counts["not checked"] += 1
            reason = record.get("reason") or "unavailable"
            if device_was_absent(record):
                self.absent[device] += 1
            else:
                self.unchecked[reason] += 1
        else:
            self.counts["broken"] += 1
            why = error_text or record.get("reason") or record.get("note") or ""
            self.broken[f"{verdict.value} on {where}: {why[:200]}"] += 1


def verdict_counts(records: Iterable[dict]) -> Counter[str]:
    return Counter(r["verdict"] for r in records)


def rule_lines(matrix: Matrix, versions: Mapping[str, str | None], records: Iterable[dict]) -> list[str]:
    """One block per rule of the matrix: what it states and whether that held in these records."""
    tallies: dict[int, RuleTally] = {}
    for r in records:
        rule = (r.get("expect") or {}).get("rule")
        if rule is not None:
            tallies.setdefault(rule, RuleTally()).add(r)
    lines = []
    for i, rule in enumerate(matrix.rules):
        e = rule.expect
        what = {ExpectKind.ERROR: f"error /{e.pattern}/", ExpectKind.UNAVAILABLE: f"unavailable ({e.reason})",
                ExpectKind.WORKS: "works"}[e.kind]
        if e.claims:
            what += f", claims {', '.join(e.claims)} (tolerance {e.tolerance:g})"
        lines.append(f"rule {i} [{e.source or 'no source'}]: {what}")
        tally = tallies.get(i)
        if not rule.holds_for(versions):
            found = ", ".join(f"{p} {versions.get(p) or 'absent'}" for p in rule.versions)
            wanted = ", ".join(f"{p} {'absent' if spec is None else spec}" for p, spec in rule.versions.items())
            lines.append(f"    NOT CHECKED here: the rule is for {wanted}; this run has {found}")
            continue
        if tally is None:
            lines.append("    NOT CHECKED: no cell of this run reached this rule (filters or earlier rules)")
            continue
        c = tally.counts
        status = "DRIFTED" if c["drifted"] else "BROKEN" if c["broken"] else "HELD" if c["held"] else "NOT CHECKED"
        lines.append(f"    {status}: " + ", ".join(f"{k} {c[k]}" for k in ("held", "drifted", "broken", "not checked")
                                                  if c[k]))
        if tally.claims:
            per: dict[str, list[str]] = {}
            for (claim, st), n in sorted(tally.claims.items()):
                per.setdefault(claim, []).append(f"{st} {n}")
            lines.append("    claims: " + "; ".join(f"{k} {', '.join(v)}" for k, v in per.items()))
        for text, n in [*tally.drifted.most_common(3), *tally.broken.most_common(3)]:
            lines.append(f"      {n} x {text}")
        for text, n in tally.unchecked.most_common(3):
            lines.append(f"      {n} x not checked: {text}")
        if tally.absent:
            lines.append("      not checked on devices absent here: "
                         + ", ".join(f"{d} ({n})" for d, n in sorted(tally.absent.items())))
    return lines
