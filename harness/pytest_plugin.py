"""The pytest plugin: matrix cells as test items, run isolated, judged, recorded.

    pytest -m matrix [--matrix FILE] [--engine E,...] [--device D,...] [--offload O,...] [--results FILE]

Each cell is one parametrization of the generic test in tests/test_matrix.py, with the cell id as its test id,
so `-k 'nf4 and sequential'` selects cells. A record is appended to the results file as each cell ends.
"""

from __future__ import annotations

import datetime as dt
import signal
import socket
import time
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from harness.errors import QuantMatrixError
from harness.matrix import AXES, Cell, Matrix, load_matrix, select
from harness.verdict import Outcome, Verdict

DEFAULT_MATRIX = "matrices/default.toml"
_matrix_key = pytest.StashKey[Matrix]()
_run_key = pytest.StashKey["MatrixRun"]()


class DriftWarning(UserWarning):
    """Documented behaviour no longer holds (reported, not failed, under --drift=warn)."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("quantmatrix", "quantization compatibility matrix (run with -m matrix)")
    group.addoption("--matrix", default=None, metavar="FILE",
                    help=f"matrix file to expand into cells (default: {DEFAULT_MATRIX})")
    for axis in AXES:
        group.addoption(f"--{axis}", action="append", default=None, metavar="NAME[,NAME]",
                        help=f"only cells with this {axis} (repeatable, comma-separated)")
    group.addoption("--results", default=None, metavar="FILE",
                    help="results file to append records to (default: results/<run>.jsonl)")
    group.addoption("--drift", choices=("fail", "warn"), default="fail",
                    help="whether documentation drift fails the cell (default) or only warns")
    group.addoption("--cell-timeout", type=float, default=None, metavar="S",
                    help="per-cell timeout in seconds (default: the matrix's settings.cell_timeout_s)")
    group.addoption("--memory-limit", type=int, default=None, metavar="MB",
                    help="per-cell memory cap for CPU cells (default: the matrix's settings.memory_limit_mb)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "matrix: a cell of the quantization matrix (select with -m matrix)")


def _matrix(config: pytest.Config) -> Matrix:
    if _matrix_key not in config.stash:
        path = Path(config.getoption("matrix") or Path(config.rootpath, DEFAULT_MATRIX))
        try:
            matrix = load_matrix(path)
        except QuantMatrixError as exc:
            raise pytest.UsageError(str(exc)) from None
        overrides = {k: v for k, v in (("cell_timeout_s", config.getoption("cell_timeout")),
                                       ("memory_limit_mb", config.getoption("memory_limit"))) if v is not None}
        config.stash[_matrix_key] = replace(matrix, settings=replace(matrix.settings, **overrides))
    return config.stash[_matrix_key]


def _wanted(config: pytest.Config, axis: str) -> list[str] | None:
    raw = config.getoption(axis)
    return [v for item in raw for v in item.split(",") if v] if raw else None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cell" not in metafunc.fixturenames:
        return
    config = metafunc.config
    matrix = _matrix(config)
    cells = matrix.with_baselines(select(matrix.cells, **{a: _wanted(config, a) for a in AXES}))
    metafunc.parametrize("cell", cells, ids=[c.id for c in cells])


class MatrixRun:
    """One run: its id, results file, work directory and the verdicts so far."""

    def __init__(self, config: pytest.Config, matrix: Matrix, workdir: Path):
        from harness.engines import ENGINES
        from harness.results import ResultsWriter, environment

        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.id = f"{stamp}-{socket.gethostname()}"
        self.results = Path(config.getoption("results") or Path(config.rootpath, "results", f"{stamp}.jsonl"))
        self.writer = ResultsWriter(self.results)
        self.matrix, self.workdir = matrix, workdir
        self.drift_fails = config.getoption("drift") == "fail"
        import torch

        engine_versions = {name: e.version() for name, e in ENGINES.items() if e.package}
        self.env = environment(engine_versions)
        from harness.devices import cuda_capability

        # What a rule's `versions` may name: an engine, torch, triton, the NVIDIA GPU's compute capability.
        self.versions = {**engine_versions, "torch": torch.__version__, "triton": self.env["triton"],
                         "cuda_capability": cuda_capability()}
        self.verdicts: Counter[str] = Counter()
        self.measured: dict[Cell, dict] = {}  # metrics of the cells that ran, for claims against baselines
        self.by_rule: dict[int | None, RuleTally] = {}

    def run(self, cell: Cell) -> tuple[Verdict, str, dict]:
        from harness.execute import CellTask, unavailable_reason
        from harness.results import make_record, now_iso
        from harness.runner import run_isolated
        from harness.verdict import check_claims, judge

        expect = self.matrix.expectation(cell, self.versions)
        started, t0 = now_iso(), time.perf_counter()
        reason = unavailable_reason(cell)
        try:
            if reason:
                outcome = Outcome("unavailable", reason=reason)
            else:
                s = self.matrix.settings
                outcome = run_isolated(CellTask(cell, s, self.workdir), timeout_s=s.cell_timeout_s,
                                       memory_limit_mb=s.memory_limit_mb)
        except KeyboardInterrupt:
            outcome = Outcome("interrupted", reason="the run was interrupted while this cell ran")
            self._record(make_record(self.id, cell, expect, Verdict.INTERRUPTED, outcome.reason, outcome,
                                     self.env, started, time.perf_counter() - t0))
            raise
        claims = []
        if outcome.status == "ran":
            self.measured[cell] = outcome.metrics
            if expect.claims:
                claims = check_claims(expect, outcome.metrics, self.measured.get(cell.baseline))
        verdict, note = judge(expect, outcome, claims)
        record = make_record(self.id, cell, expect, verdict, note, outcome, self.env, started,
                             time.perf_counter() - t0, claims)
        self._record(record)
        self.by_rule.setdefault(expect.rule, RuleTally()).add(cell, verdict, outcome, claims)
        return verdict, note, record

    def _record(self, record: dict) -> None:
        self.writer.append(record)
        self.verdicts[record["verdict"]] += 1


class RuleTally:
    """What happened to the cells one rule decided: held, drifted, not checkable here, or broken."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.drifted: Counter[str] = Counter()  # what the drifted cells did instead
        self.broken: Counter[str] = Counter()
        self.unchecked: Counter[str] = Counter()  # why a cell could not be checked here
        self.absent: Counter[str] = Counter()  # devices this host lacks
        self.claims: Counter[tuple[str, str]] = Counter()

    def add(self, cell: Cell, verdict: Verdict, outcome: Outcome, claims: list) -> None:
        for c in claims:
            self.claims[(c.claim, c.status)] += 1
        if verdict.is_drift:
            self.counts["drifted"] += 1
            actual = outcome.error.text if outcome.error else "it worked"
            if verdict is Verdict.DRIFT_CLAIM:
                actual = "; ".join(f"{c.claim}: {c.detail}" for c in claims if c.status == "contradicted")
            self.drifted[f"{verdict.value} on {cell.device}: {actual[:200]}"] += 1
        elif verdict.passed or (verdict is Verdict.UNAVAILABLE and outcome.status != "unavailable"):
            self.counts["held"] += 1
        elif verdict is Verdict.UNAVAILABLE:
            self.counts["not checked"] += 1
            if (outcome.reason or "").startswith(f"device {cell.device}:"):
                self.absent[cell.device] += 1
            else:
                self.unchecked[outcome.reason or "unavailable"] += 1
        else:
            self.counts["broken"] += 1
            text = outcome.error.text if outcome.error else outcome.reason or ""
            self.broken[f"{verdict.value} on {cell.device}: {text[:200]}"] += 1


def _rule_lines(run: MatrixRun) -> list[str]:
    """One block per rule of the matrix: what it states and whether that held in this run."""
    lines = []
    for i, rule in enumerate(run.matrix.rules):
        e = rule.expect
        what = {"error": f"error /{e.pattern}/", "unavailable": f"unavailable ({e.reason})",
                "works": "works"}[e.kind]
        if e.claims:
            what += f", claims {', '.join(e.claims)} (tolerance {e.tolerance:g})"
        lines.append(f"rule {i} [{e.source or 'no source'}]: {what}")
        tally = run.by_rule.get(i)
        if not rule.holds_for(run.versions):
            found = ", ".join(f"{p} {run.versions.get(p) or 'absent'}" for p in rule.versions)
            wanted = ", ".join(f"{p} {'absent' if spec is None else spec}" for p, spec in rule.versions.items())
            lines.append(f"    NOT CHECKED here: the rule is for {wanted}; this run has {found}")
            continue
        if tally is None:
            lines.append("    NOT CHECKED: no cell of this run reached this rule (filters or earlier rules)")
            continue
        c = tally.counts
        status = "DRIFTED" if c["drifted"] else "BROKEN" if c["broken"] else "HELD" if c["held"] else "NOT CHECKED"
        counts = ", ".join(f"{k} {c[k]}" for k in ("held", "drifted", "broken", "not checked") if c[k])
        lines.append(f"    {status}: {counts}")
        if tally.claims:
            per: dict[str, list[str]] = {}
            for (claim, st), n in sorted(tally.claims.items()):
                per.setdefault(claim, []).append(f"{st} {n}")
            lines.append("    claims: " + "; ".join(f"{k} {', '.join(v)}" for k, v in per.items()))
        for texts in (tally.drifted, tally.broken, tally.unchecked):
            for text, n in texts.most_common(3):
                lines.append(f"      {n} x {text}" if texts is not tally.unchecked else
                             f"      {n} x not checked: {text}")
        if tally.absent:
            lines.append("      not checked on devices absent here: "
                         + ", ".join(f"{d} ({n})" for d, n in sorted(tally.absent.items())))
    return lines


@pytest.fixture(scope="session")
def matrix_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> MatrixRun:
    config = request.config
    if _run_key not in config.stash:
        config.stash[_run_key] = MatrixRun(config, _matrix(config), tmp_path_factory.mktemp("quantmatrix-work"))
    return config.stash[_run_key]


def check_cell(run: MatrixRun, cell: Cell, request: pytest.FixtureRequest) -> str | None:
    """Run the cell and record it; skip it when unavailable. Returns why it failed, or None when it passed."""
    verdict, note, record = run.run(cell)
    request.node.user_properties.append(("verdict", verdict.value))
    if verdict is Verdict.UNAVAILABLE:
        pytest.skip(f"unavailable: {note}")
    if verdict.is_drift and not run.drift_fails:
        warnings.warn(DriftWarning(f"{cell.id}: {verdict.value}: {note}"))
        return None
    if verdict.passed:
        return None
    detail = f"\n{record['error']['where']}" if record.get("error") else ""
    tail = f"\n--- cell output (tail) ---\n{record['output_tail']}" if record.get("output_tail") else ""
    return f"{verdict.value}: {note}{detail}{tail}"


@pytest.hookimpl(tryfirst=True)
def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config):
    verdict = dict(report.user_properties).get("verdict") if report.when == "call" else None
    if verdict is None:
        return None
    letter = {"ok": ".", "documented-error": "d", "unavailable": "s"}.get(verdict, "F")
    if verdict.startswith("drift-") and report.passed:
        letter = "w"
    return report.outcome, letter, verdict.upper()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    run = config.stash.get(_run_key, None)
    if run is None:
        return
    tr = terminalreporter
    tr.section("quantmatrix")
    total = sum(run.verdicts.values())
    for verdict in Verdict:
        if run.verdicts[verdict.value]:
            tr.write_line(f"  {verdict.value:<18}{run.verdicts[verdict.value]:>6}")
    tr.write_line(f"  {'cells':<18}{total:>6}")
    tr.write_line(f"results: {run.results}")
    if run.matrix.rules:
        tr.section(f"documented behaviour: the rules of {run.matrix.path.name}", sep="-")
        for line in _rule_lines(run):
            tr.write_line(line)


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_sessionstart(session: pytest.Session) -> None:
    # SIGTERM (CI cancelling a job) stops the run like Ctrl-C: the running cell is recorded as interrupted.
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
