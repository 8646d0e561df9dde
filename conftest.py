"""The suite's shared fixtures and its tiers.

Tiers: `pytest` runs the fast tier (unit and small-integration tests; a few minutes on two cores); `pytest -m slow`
the end-to-end runs (whole matrices through `pytest -m matrix` in a subprocess, the warm pool's faults);
`pytest -m benchmark` the benchmarks (benchmarks/, every test there is marked). `.ci/run` runs all three.

Session fixtures stand in for runs several tests would otherwise each repeat: the committed reference records of
this host's default matrix (the report tests read them instead of running 490 cells), one smoke-matrix run (the
shard, xdist and resume tests compare their verdicts, bits per weight and output hashes with it) and one fault run
per cell runner. Nothing here imports torch: `pytest -m matrix` loads this file too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent
REFERENCE = REPO / "results" / "reference"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under benchmarks/ is in the benchmark tier (those marked benchmark_slow only in their own)."""
    for item in items:
        if Path(str(item.fspath)).is_relative_to(REPO / "benchmarks") and not item.get_closest_marker(
                "benchmark_slow"):
            item.add_marker(pytest.mark.benchmark)


FAST_TIER_WORKERS = 2


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """A bare `pytest` (the fast tier: no -m, -k, -n or tests named) runs on two xdist workers where the host has
    two cores: its tests are independent, and the tier takes half the time. Before xdist's own hook, which turns
    the number into workers; `-n 0` runs it in one process."""
    given = config.invocation_params.args
    if (config.pluginmanager.has_plugin("xdist") and config.option.numprocesses is None
            and "PYTEST_XDIST_WORKER" not in os.environ and (os.cpu_count() or 1) >= FAST_TIER_WORKERS
            and not any(a.startswith(("-m", "-k", "-n", "--numprocesses")) or not a.startswith("-") for a in given)):
        config.option.numprocesses = FAST_TIER_WORKERS
        config.option.benchmark_disable = True  # no benchmark runs in this tier: pytest-benchmark need not warn


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: end-to-end runs of whole matrices (pytest -m slow)")
    config.addinivalue_line("markers", "benchmark: the benchmarks (pytest -m benchmark; benchmarks/)")


def require_engines() -> bool:
    """In CI (QUANTMATRIX_REQUIRE_ENGINES=1) a missing engine package fails the test that needs it: a broken
    install must not pass as skips."""
    return os.environ.get("QUANTMATRIX_REQUIRE_ENGINES", "0") not in ("", "0")


def lines_of(path: Path) -> list[str]:
    """A results file's record lines, plain or gzipped (the committed references are)."""
    from harness.results import file_lines

    return [line.rstrip("\n") for _, line in file_lines(path)]


def records_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in lines_of(path)]


def _missing_engine() -> str:
    """What a skip for a missing engine says: the harness's own words, or pytest.importorskip's for an engine's
    module (its top-level module, from the catalog)."""
    from harness.engines.catalog import CATALOG

    modules = sorted({info.module for info in CATALOG.values() if info.module})
    return r"engine package .* is not installed|could not import '(" + "|".join(map(re.escape, modules)) + r")\b"


MISSING_ENGINE = _missing_engine()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """With QUANTMATRIX_REQUIRE_ENGINES=1 (CI), a test skipped because an engine package is not installed fails."""
    report = (yield).get_result()
    if report.skipped and require_engines() and re.search(MISSING_ENGINE, str(report.longrepr)):
        report.outcome = "failed"
        report.longrepr = f"QUANTMATRIX_REQUIRE_ENGINES=1: {report.longrepr}"


@pytest.fixture(scope="session")
def reference_records() -> Path:
    """The default matrix as measured on this kind of host (2 CPU cores; 891 cells on both stacks), committed in
    results/reference/: what the report tests read."""
    return REFERENCE / "cpu-default.jsonl.gz"


def sigint_default() -> None:
    """For a run a test interrupts: SIGINT's default. A background job without job control inherits SIGINT
    ignored (bash), and Python then installs no KeyboardInterrupt handler; a terminal gives the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_matrix(results: Path, *args: str, timeout: float = 900, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """`pytest -m matrix` in a subprocess from the checkout, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "matrix", "--results", str(results), "-q",
                           "-p", "no:cacheprovider", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check:
        assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-2000:]
    return proc


@dataclass(frozen=True)
class Run:
    results: Path
    records: list[dict]
    stdout: str
    returncode: int

    def by_id(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for r in self.records:
            assert r["id"] not in out, f"{r['id']} recorded twice"
            out[r["id"]] = r
        return out


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Run:
    """matrices/smoke.toml run once (12 cells), its durations stored for pytest-split."""
    where = tmp_path_factory.mktemp("smoke")
    results, durations = where / "smoke.jsonl", where / "durations.json"
    proc = run_matrix(results, "--matrix", "matrices/smoke.toml", "--store-durations", "--durations-path",
                      str(durations))
    return Run(results, records_of(results), proc.stdout, proc.returncode)


SMOKE_DURATIONS = "durations.json"  # beside the smoke run's results
