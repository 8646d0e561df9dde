"""Isolation: every kind of fault in a cell becomes that cell's verdict, and the run goes on; with both cell
runners: the fork server (CPU builds of torch) and the warm pool (accelerator builds; forced here with
QUANTMATRIX_CELL_RUNNER=pool)."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from conftest import sigint_default
from harness.cell import Cell
from harness.run.execute import CellTask
from harness.run.isolation import OUTPUT_TAIL_BYTES, RAN_TAIL_BYTES, run_isolated
from harness.settings import Settings

REPO = Path(__file__).resolve().parents[1]
QUICK = Settings(warmup=0, min_steps=1, min_time_s=0.0)


def fault_cell(qtype: str) -> Cell:
    return Cell("fault", qtype, "post-load", "none", "cpu", "dit-xs", "float32")


@pytest.fixture(params=["fork", pytest.param("pool", marks=pytest.mark.slow)])
def runner(request, monkeypatch):
    """Which cell runner the test's cells use (in this process, and in a pytest run it starts)."""
    from harness.run import pool

    monkeypatch.setenv("QUANTMATRIX_CELL_RUNNER", request.param)
    monkeypatch.setenv("QUANTMATRIX_POOL_REFILL", "during")  # the next worker imports while a cell runs: faster here
    yield request.param
    pool.close()  # no waiting worker outlives the test


FAULT_MATRIX = """
[axes]
engine = ["fault", "none"]
qtype = ["abort", "segfault", "exit", "raise", "hang", "spin", "oom", "flood", "orphan", "nan", "noise"]
load = ["post-load"]
offload = ["none"]
device = ["cpu"]
model = ["dit-xs"]
dtype = ["float32"]

[settings]
warmup = 0
min_steps = 1
min_time_s = 0.0
cell_timeout_s = 6
memory_limit_mb = 768
"""


def _sleepers() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if p.info["cmdline"] and "import time; time.sleep(600)" in " ".join(p.info["cmdline"]):
            found.append(p)
    return found


@dataclass
class FaultRun:
    runner: str
    records: dict[str, dict]  # by qtype ("-": the baseline)
    returncode: int
    stdout: str
    orphans_left: set[int]  # the orphan fault's sleeping child, if it outlived its cell
    results: Path


@pytest.fixture(scope="module", params=["fork", pytest.param("pool", marks=pytest.mark.slow)])
def fault_run(request, tmp_path_factory) -> FaultRun:
    """Every fault of the fault engine, one cell each, in one `pytest -m matrix` run per cell runner: each fault
    test reads its cell's record from it."""
    before = {p.pid for p in _sleepers()}
    where = tmp_path_factory.mktemp(f"faults-{request.param}")
    matrix, results = where / "faults.toml", where / "results.jsonl"
    matrix.write_text(FAULT_MATRIX)
    env = {**os.environ, "QUANTMATRIX_CELL_RUNNER": request.param, "QUANTMATRIX_POOL_REFILL": "during"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "matrix", "--matrix", str(matrix),
                           "--results", str(results), "-p", "no:cacheprovider", "-q",
                           str(REPO / "tests" / "test_matrix.py")], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)
    records = [json.loads(line) for line in results.read_text().splitlines()]  # every line whole
    psutil.wait_procs([p for p in _sleepers() if p.pid not in before], timeout=5)
    return FaultRun(request.param, {r["cell"]["qtype"]: r for r in records}, proc.returncode, proc.stdout,
                    {p.pid for p in _sleepers()} - before, results)


@pytest.mark.parametrize("qtype, verdict, reason", [
    ("abort", "crash", "SIGABRT"),
    ("segfault", "crash", "SIGSEGV"),
    ("exit", "crash", "exited with code 3"),
    ("hang", "hang", "cell timeout of 6 s, and no CPU progress"),
    ("spin", "timeout", "cell timeout of 6 s, still computing"),
    ("oom", "oom", "MemoryError"),
    ("raise", "fail", "ValueError during load"),
])
def test_each_fault_gets_its_verdict(fault_run, qtype, verdict, reason):
    record = fault_run.records[qtype]
    assert record["verdict"] == verdict and reason in record["reason"], record["reason"]


@pytest.mark.parametrize("qtype, hung", [("hang", True), ("spin", False)])
def test_a_cell_killed_at_its_timeout_carries_its_threads_stacks_and_cpu_time(fault_run, qtype, hung):
    record = fault_run.records[qtype]
    process = record["process"]
    assert process["hung"] is hung
    assert process["cpu_s"] is not None and (process["cpu_s"] < 1.5 if hung else process["cpu_s"] > 1.0)
    # the Python stack of the thread that hung, down to the engine's frame, from faulthandler before the kill
    assert "Current thread" in process["stacks"] and "fault.py" in process["stacks"]
    assert "in quantize" in process["stacks"] and "execute.py" in process["stacks"]
    assert record["error"]["type"] == ("Hang" if hung else "Timeout")
    assert "fault.py" in record["error"]["where"].split(" <- ")[0]  # innermost frame first


def test_a_flood_of_output_is_kept_as_a_bounded_tail(fault_run):
    tail = fault_run.records["flood"]["output_tail"]
    assert fault_run.records["flood"]["verdict"] == "ok"
    assert tail.startswith("[... ") and "earlier bytes cut" in tail  # 8 MiB of output, a bounded excerpt kept
    assert len(tail) < RAN_TAIL_BYTES + 100  # a cell that ran: its last lines (its warnings are kept apart)
    assert all(r["output_tail"] is None or len(r["output_tail"]) < OUTPUT_TAIL_BYTES + 100
               for r in fault_run.records.values())


def test_processes_a_cell_leaves_behind_are_killed(fault_run):
    record = fault_run.records["orphan"]
    assert record["verdict"] == "ok"
    started = re.search(r"orphan child pid (\d+)", record["output_tail"] or "")
    assert started, record["output_tail"]  # the child existed: its cell started it
    assert int(started[1]) not in {p.pid for p in _sleepers()}  # and was killed with its cell
    assert fault_run.orphans_left == set()


def test_a_run_goes_on_after_every_kind_of_fault_and_records_every_cell(fault_run):
    assert fault_run.returncode == 1, fault_run.stdout[-3000:]  # the faults fail; the run itself completes
    assert sorted(fault_run.records) == sorted(["-", "abort", "segfault", "exit", "raise", "hang", "spin", "oom",
                                                "flood", "orphan", "nan", "noise"])  # none lost, none duplicated
    assert fault_run.records["-"]["verdict"] == "ok"
    assert "9 failed, 3 passed" in fault_run.stdout
    short = fault_run.stdout[fault_run.stdout.index("short test summary info"):]  # -rfEs: failures, not only skips
    listed = re.findall(r"^([A-Z-]+) tests/test_matrix\.py::test_cell\[fault-", short, re.M)
    assert len(listed) == 9 and "PASSED" not in listed, short[:3000]  # each under its verdict: CRASH, HANG, FAIL...


def test_a_nan_output_fails_and_a_replaced_model_is_wrong_output_in_summary_overview_and_csv(fault_run, tmp_path):
    """NaN weights: the cell ran but its output is not finite (fail, its record and figures kept); weights silently
    replaced by noise of the same scale: below the type's floor (wrong-output). Both are counted where a user
    looks: the run's summary and cells.csv (the report's overview counts no test-only cell)."""
    from harness.report import data as report_data
    from harness.report import html as report_html
    from harness.results import validate_record

    nan, noise = fault_run.records["nan"], fault_run.records["noise"]
    assert nan["verdict"] == "fail" and nan["reason"] == "output not finite", nan["reason"]
    assert nan["error"]["type"] == "NonFiniteOutput" and nan["metrics"]["output_finite"] is False
    assert noise["verdict"] == "wrong-output", noise["note"]
    assert noise["metrics"]["sqnr_db"] < 0 and "< floor 12 dB" in noise["note"], noise["note"]
    assert validate_record(nan) == [] and validate_record(noise) == []
    summary = fault_run.stdout[fault_run.stdout.index("= quantmatrix ="):]
    assert re.search(r"^\s*wrong-output\s+1$", summary, re.M) and re.search(r"^\s*fail\s+2$", summary, re.M), summary
    page = report_html.build(report_data.load([fault_run.results]), tmp_path / "report").read_text()
    # the overview counts no test-only cell (test_report.py checks it counts a real engine's wrong output); the
    # fault engine's cells are in cells.csv and their grid
    assert re.search(r'data-verdict="wrong-output">0<', page) and re.search(r'data-verdict="fail">0<', page)
    rows = list(csv.DictReader((tmp_path / "report" / "cells.csv").open()))
    verdicts = {r["id"].split("/")[0]: r["verdict"] for r in rows}
    assert verdicts["fault-nan"] == "fail" and verdicts["fault-noise"] == "wrong-output", verdicts


def test_run_isolated_contains_a_crash_and_an_error_in_this_process(tmp_path):
    """The runner's own entry point, without the plugin: a segfault is the cell's crash, not the caller's."""
    crash = run_isolated(CellTask(fault_cell("segfault"), QUICK, tmp_path), timeout_s=120)
    assert crash.status == "crash" and "SIGSEGV" in crash.reason
    raised = run_isolated(CellTask(fault_cell("raise"), QUICK, tmp_path), timeout_s=120)
    assert raised.status == "error" and "ValueError during load" in raised.reason


def test_a_warm_pool_worker_runs_one_cell_and_reports_its_error(monkeypatch, tmp_path):
    """The pool runner (accelerator builds) at small scale: one spawned, pre-imported worker, one cell."""
    from harness.run import pool

    monkeypatch.setenv("QUANTMATRIX_CELL_RUNNER", "pool")
    try:
        outcome = run_isolated(CellTask(fault_cell("raise"), QUICK, tmp_path), timeout_s=300)
    finally:
        pool.close()
    assert outcome.status == "error" and "ValueError during load" in outcome.reason


FAULT_QTYPES = ('qtype = ["abort", "segfault", "exit", "raise", "hang", "spin", "oom", "flood", "orphan", "nan", '
                '"noise"]')
INTERRUPT_MATRIX = FAULT_MATRIX.replace(FAULT_QTYPES, 'qtype = ["hang"]').replace(
    'cell_timeout_s = 6', 'cell_timeout_s = 600')


def _hanging_run(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """A run of the baseline and then a cell that hangs (timeout 600 s), once that cell has run for a while."""
    matrix, results = tmp_path / "hang.toml", tmp_path / "results.jsonl"
    matrix.write_text(INTERRUPT_MATRIX)
    # A background job without job control inherits SIGINT ignored (bash), and Python then installs no
    # KeyboardInterrupt handler: the run is given SIGINT's default, as a terminal gives it.
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-m", "matrix", "--matrix", str(matrix), "--results",
                             str(results), "-p", "no:cacheprovider", "-q", str(REPO / "tests" / "test_matrix.py")],
                            cwd=REPO, stdout=open(tmp_path / "pytest.log", "w"), stderr=subprocess.STDOUT,
                            preexec_fn=sigint_default)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (results.exists() and results.read_text().count("\n") >= 1):
        time.sleep(0.2)  # the baseline is recorded: the hanging cell starts
    time.sleep(3)  # and has run for a while
    return proc, results


@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_an_interrupt_stops_the_run_within_seconds_and_records_the_running_cell(runner, tmp_path, sig):
    proc, results = _hanging_run(tmp_path)
    cells = _cell_processes(proc.pid)  # with the pool, the waiting next worker too: it must go with the run
    assert cells
    proc.send_signal(sig)
    proc.wait(timeout=60)  # raises if the run waits on its cell (whose timeout is 600 s): no wall-clock budget
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["id"], r["verdict"]) for r in records] == [
        ("none/post-load/none/cpu/dit-xs/float32/direct", "ok"),  # baselines run first
        ("fault-hang/post-load/none/cpu/dit-xs/float32/direct", "interrupted")]
    gone, alive = psutil.wait_procs(cells, timeout=5)
    assert alive == []


def test_a_killed_run_leaves_no_process_behind(runner, tmp_path):
    """SIGKILL of the run (no handler can run): the hanging cell (timeout 600 s), the fork server, the pool's
    waiting worker and multiprocessing's resource tracker all end with it, checked by pid."""
    proc, _ = _hanging_run(tmp_path)
    assert _cell_processes(proc.pid)
    everything = psutil.Process(proc.pid).children(recursive=True)
    assert any("forkserver" in " ".join(p.cmdline()) for p in everything)
    proc.kill()
    proc.wait(timeout=10)
    gone, alive = psutil.wait_procs(everything, timeout=15)
    assert alive == [], [(p.pid, p.cmdline()[:4]) for p in alive]


def _cell_processes(pytest_pid: int) -> list[psutil.Process]:
    """The running cell processes: descendants of pytest that lead their own session (the runner's setsid), which
    tells them from helper processes an engine import may start."""
    try:
        descendants = psutil.Process(pytest_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    cells = []
    for p in descendants:
        try:
            if os.getsid(p.pid) == p.pid:
                cells.append(p)
        except ProcessLookupError:
            pass
    return cells


def _age(p: psutil.Process) -> float:
    try:
        return time.time() - p.create_time()
    except psutil.NoSuchProcess:
        return 0.0


UNAVAILABLE_OVER_A_RAISE = FAULT_MATRIX.replace('engine = ["fault", "none"]', 'engine = ["fault"]').replace(
    FAULT_QTYPES, 'qtype = ["raise"]').replace('load = ["post-load"]', 'load = ["post-load", "on-the-fly"]') + """
[[rule]]
match = { engine = "fault" }
expect = "unavailable"
reason = "documented: the fault engine is not supported here"
source = "a test's documentation"
"""


def test_an_engine_raising_where_unavailable_is_documented_is_drift_in_record_summary_and_report(tmp_path):
    from harness.report import data as report_data
    from harness.report import html as report_html

    matrix, results = tmp_path / "unavailable.toml", tmp_path / "results.jsonl"
    matrix.write_text(UNAVAILABLE_OVER_A_RAISE)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "matrix", "--matrix", str(matrix), "--results",
                           str(results), "-p", "no:cacheprovider", "-q", str(REPO / "tests" / "test_matrix.py")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:]  # drift fails the run (--drift fail, the default)
    by_load = {r["cell"]["load"]: r for r in (json.loads(line) for line in results.read_text().splitlines())}
    raised = by_load["post-load"]
    assert raised["verdict"] == "drift-error"
    assert "not supported here" in raised["note"] and "fault engine: a plain exception" in raised["note"]
    # the fault engine has no on-the-fly path: the harness itself knows it is unavailable, which the rule states
    assert by_load["on-the-fly"]["verdict"] == "unavailable" and by_load["on-the-fly"]["absence"] == "not-offered"
    summary = proc.stdout[proc.stdout.index("documented behaviour"):]
    assert "DRIFTED: held 1, drifted 1" in summary, summary
    assert "drift-error on cpu, direct stack: ValueError: fault engine: a plain exception" in summary
    html = report_html.build(report_data.load([results]), tmp_path / "report").read_text()
    drift = html[html.index('<section id="drift"'):html.index('<section id="upstream"')]
    assert "fault-raise/post-load/none/cpu/dit-xs/float32/direct" in drift
    assert "ValueError: fault engine: a plain exception" in drift
