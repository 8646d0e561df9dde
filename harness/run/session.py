"""One matrix run in one pytest process: its identity, its environment, running a cell and recording it, and the
baselines that claims are measured against. The pytest plugin (plugin.py) drives it."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest

from harness.cell import Cell
from harness.matrix import Matrix
from harness.verdict import Outcome, Status, Verdict

IDS_KEY = pytest.StashKey[tuple]()  # (run id, results file), shared by xdist workers
ENV_KEY = pytest.StashKey[tuple]()  # (environment, versions) of this process


class HarnessFailure(Exception):
    """The harness itself went wrong on a cell (an impossible figure): the cell fails, and nothing is recorded."""


def publishable(record: dict) -> dict:
    """The record, when it follows the schema and holds no impossible figure (results.validate_record); otherwise
    the harness measured wrong, and the cell fails as a harness failure with nothing written."""
    from harness.results import validate_record

    problems = validate_record(record)
    if problems:
        raise HarnessFailure(f"{record.get('id')}: harness failure, record not written: {'; '.join(problems)}")
    return record


class DriftWarning(UserWarning):
    """Documented behaviour no longer holds (reported, not failed, under --drift=warn)."""


def environment(config: pytest.Config) -> tuple[dict, dict[str, str | None]]:
    """This process's environment (for records) and the versions a rule's `versions` may name (an engine, torch,
    triton, diffusers, accelerate, the NVIDIA GPU's compute capability), worked out once."""
    if ENV_KEY not in config.stash:
        config.stash[ENV_KEY] = host_environment()
    return config.stash[ENV_KEY]


def host_environment() -> tuple[dict, dict[str, str | None]]:
    """This host's environment and the versions its rules are judged by (`quantmatrix list` asks too)."""
    from harness.devices import cuda_capability
    from harness.engines.registry import ENGINES
    from harness.results import environment as base_environment
    from harness.results import rule_versions

    env = base_environment({name: e.version() for name, e in ENGINES.items() if e.package})
    env["cuda_capability"] = cuda_capability()  # in the record too, so the report can judge rules by it again
    return env, rule_versions(env)


class MatrixRun:
    """One run (in one process): its id, results file, work directory, and the metrics measured so far."""

    def __init__(self, config: pytest.Config, matrix: Matrix, workdir: Path):
        from harness.results import ResultsWriter, environment_key, read_records

        self.id, self.results = config.stash[IDS_KEY]
        self.writer = ResultsWriter(self.results)
        self.matrix, self.workdir = matrix, workdir
        self.drift_fails = config.getoption("drift") == "fail"
        self.env, self.versions = environment(config)
        self.measured: dict[Cell, dict] = {}  # metrics of the cells that ran, for claims against baselines
        self.done: dict[str, str] = {}  # cells a resumed run already recorded: id -> run
        if config.getoption("resume"):
            key = environment_key(self.env)
            for r in read_records(Path(config.getoption("resume")))[0]:
                if environment_key(r["env"]) == key and r["verdict"] != Verdict.INTERRUPTED:
                    self.done[r["id"]] = r["run"]
                    if r.get("metrics"):
                        self.measured[Cell(**r["cell"])] = r["metrics"]

    def run(self, cell: Cell) -> tuple[Verdict, str, dict]:
        from harness.engines.catalog import output_floor
        from harness.results import make_record, now_iso
        from harness.verdict import check_claims, judge

        expect = self.matrix.expectation(cell, self.versions)
        started, t0 = now_iso(), time.perf_counter()
        try:
            outcome = self._execute(cell)
        except KeyboardInterrupt:
            outcome = Outcome(Status.INTERRUPTED, reason="the run was interrupted while this cell ran")
            self.writer.append(make_record(self.id, cell, expect, Verdict.INTERRUPTED, outcome.reason, outcome,
                                           self.env, started, time.perf_counter() - t0))
            raise
        claims, interrupted = [], None
        if outcome.status is Status.RAN:
            self.measured[cell] = outcome.metrics
            if expect.claims:
                try:
                    base = self._baseline(cell)
                except KeyboardInterrupt as exc:  # while its baseline ran: the cell's record is kept, its claims
                    base, interrupted = None, exc  # not judged (no baseline), and the run stops after writing it
                claims = check_claims(expect, outcome.metrics, base)
        verdict, note = judge(expect, outcome, claims, output_floor(cell.engine, cell.qtype, cell.cast))
        record = make_record(self.id, cell, expect, verdict, note, outcome, self.env, started,
                             time.perf_counter() - t0, claims)
        self.writer.append(publishable(record))
        if interrupted is not None:
            raise interrupted
        return verdict, note, record

    def _execute(self, cell: Cell) -> Outcome:
        from harness.run.execute import CellTask, unavailable
        from harness.run.isolation import run_isolated

        absent = unavailable(cell)
        if absent is not None:
            return absent
        s = self.matrix.settings
        return run_isolated(CellTask(cell, s, self.workdir), timeout_s=s.cell_timeout_s,
                            memory_limit_mb=s.memory_limit_mb)

    def _baseline(self, cell: Cell) -> dict | None:
        """The baseline's metrics for a cell's claims. Baselines run first; when this process has not run it (a
        shard or xdist worker got it, or -k left it out) it is measured here, unrecorded (its record is the other
        process's)."""
        base = cell.baseline
        if base not in self.measured:
            outcome = self._execute(base)
            self.measured[base] = outcome.metrics if outcome.status is Status.RAN else None
        return self.measured[base]


def check_cell(run: MatrixRun, cell: Cell, request: pytest.FixtureRequest) -> str | None:
    """Run the cell and record it; skip it when unavailable. Returns why it failed, or None when it passed."""
    if cell.id in run.done:
        pytest.skip(f"already recorded by run {run.done[cell.id]} (--resume)")
    try:
        verdict, note, record = run.run(cell)
    except HarnessFailure as exc:
        return str(exc)
    request.node.user_properties.append(("verdict", verdict.value))
    if verdict is Verdict.UNAVAILABLE:
        pytest.skip(f"unavailable: {note}")
    if verdict.is_drift and not run.drift_fails:
        warnings.warn(DriftWarning(f"{cell.id}: {verdict.value}: {note}"), stacklevel=2)
        return None
    if verdict.passed:
        return None
    detail = f"\n{record['error']['where']}" if record.get("error") else ""
    tail = f"\n--- cell output (tail) ---\n{record['output_tail']}" if record.get("output_tail") else ""
    return f"{verdict.value}: {note}{detail}{tail}"
