"""Isolation: every kind of fault in a cell becomes that cell's verdict, and the run goes on; with both cell
runners: the fork server (CPU builds of torch) and the warm pool (accelerator builds; forced here with
QUANTMATRIX_CELL_RUNNER=pool)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from harness.cell import Cell
from harness.matrix import Settings
from harness.run.execute import CellTask
from harness.run.isolation import OUTPUT_TAIL_BYTES, run_isolated

REPO = Path(__file__).resolve().parents[1]
QUICK = Settings(warmup=0, min_steps=1, min_time_s=0.0)


def fault_cell(qtype: str) -> Cell:
    return Cell("fault", qtype, "post-load", "none", "cpu", "dit-xs", "float32")


@pytest.fixture(params=["fork", "pool"])
def runner(request, monkeypatch):
    """Which cell runner the test's cells use (in this process, and in a pytest run it starts)."""
    from harness.run import pool

    monkeypatch.setenv("QUANTMATRIX_CELL_RUNNER", request.param)
    monkeypatch.setenv("QUANTMATRIX_POOL_REFILL", "during")  # the next worker imports while a cell runs: faster here
    yield request.param
    pool.close()  # no waiting worker outlives the test


@pytest.mark.parametrize("qtype, status, reason", [
    ("abort", "crash", "SIGABRT"),
    ("segfault", "crash", "SIGSEGV"),
    ("exit", "crash", "exited with code 3"),
    ("hang", "hang", "cell timeout of 4 s, and no CPU progress"),
    ("spin", "timeout", "cell timeout of 4 s, still computing"),
    ("oom", "oom", "MemoryError"),
    ("raise", "error", "ValueError during load"),
])
def test_each_fault_gets_its_status(runner, tmp_path, qtype, status, reason):
    timeout_s = 4 if qtype in ("hang", "spin") else 120
    outcome = run_isolated(CellTask(fault_cell(qtype), QUICK, tmp_path), timeout_s=timeout_s, memory_limit_mb=768)
    assert outcome.status == status
    assert reason in outcome.reason


@pytest.mark.parametrize("qtype, hung", [("hang", True), ("spin", False)])
def test_a_cell_killed_at_its_timeout_carries_its_threads_stacks_and_cpu_time(runner, tmp_path, qtype, hung):
    outcome = run_isolated(CellTask(fault_cell(qtype), QUICK, tmp_path), timeout_s=4)
    process = outcome.process
    assert process["hung"] is hung
    assert process["cpu_s"] is not None and (process["cpu_s"] < 1.5 if hung else process["cpu_s"] > 1.0)
    # the Python stack of the thread that hung, down to the engine's frame, from faulthandler before the kill
    assert "Current thread" in process["stacks"] and "fault.py" in process["stacks"]
    assert "in quantize" in process["stacks"] and "execute.py" in process["stacks"]
    assert outcome.error.type == ("Hang" if hung else "Timeout")
    assert "fault.py" in outcome.error.where.split(" <- ")[0]  # innermost frame first


def test_a_flood_of_output_is_kept_as_a_bounded_tail(runner, tmp_path):
    outcome = run_isolated(CellTask(fault_cell("flood"), QUICK, tmp_path), timeout_s=60)
    assert outcome.status == "ran"
    assert outcome.output_tail.startswith("[... ") and "earlier bytes cut" in outcome.output_tail
    assert len(outcome.output_tail) < OUTPUT_TAIL_BYTES + 100


def _sleepers() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if p.info["cmdline"] and "import time; time.sleep(600)" in " ".join(p.info["cmdline"]):
            found.append(p)
    return found


def test_processes_a_cell_leaves_behind_are_killed(runner, tmp_path):
    before = {p.pid for p in _sleepers()}
    outcome = run_isolated(CellTask(fault_cell("orphan"), QUICK, tmp_path), timeout_s=60)
    assert outcome.status == "ran"
    psutil.wait_procs([p for p in _sleepers() if p.pid not in before], timeout=5)
    assert {p.pid for p in _sleepers()} - before == set()


FAULT_MATRIX = """
[axes]
engine = ["fault", "none"]
qtype = ["abort", "segfault", "exit", "raise", "hang", "oom", "flood", "orphan"]
load = ["post-load"]
offload = ["none"]
device = ["cpu"]
model = ["dit-xs"]
dtype = ["float32"]

[settings]
warmup = 0
min_steps = 1
min_time_s = 0.0
cell_timeout_s = 10
memory_limit_mb = 768
"""


def test_a_run_goes_on_after_every_kind_of_fault_and_records_every_cell(runner, tmp_path):
    before = {p.pid for p in _sleepers()}
    matrix, results = tmp_path / "faults.toml", tmp_path / "results.jsonl"
    matrix.write_text(FAULT_MATRIX)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "matrix", "--matrix", str(matrix),
                           "--results", str(results), "-p", "no:cacheprovider", "-q",
                           str(REPO / "tests" / "test_matrix.py")], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:]  # the faults fail; the run itself completes
    records = [json.loads(line) for line in results.read_text().splitlines()]  # every line whole
    verdicts = {r["id"]: r["verdict"] for r in records}
    assert len(records) == len(verdicts) == 9  # none lost, none duplicated
    assert verdicts == {
        "none/post-load/none/cpu/dit-xs/float32/direct": "ok",  # baselines run first
        "fault-abort/post-load/none/cpu/dit-xs/float32/direct": "crash",
        "fault-segfault/post-load/none/cpu/dit-xs/float32/direct": "crash",
        "fault-exit/post-load/none/cpu/dit-xs/float32/direct": "crash",
        "fault-raise/post-load/none/cpu/dit-xs/float32/direct": "fail",
        "fault-hang/post-load/none/cpu/dit-xs/float32/direct": "hang",
        "fault-oom/post-load/none/cpu/dit-xs/float32/direct": "oom",
        "fault-flood/post-load/none/cpu/dit-xs/float32/direct": "ok",
        "fault-orphan/post-load/none/cpu/dit-xs/float32/direct": "ok",
    }
    hang = next(r for r in records if r["cell"]["qtype"] == "hang")
    assert "fault.py" in hang["process"]["stacks"] and hang["error"]["type"] == "Hang"  # the record says why
    flood = next(r for r in records if r["cell"]["qtype"] == "flood")
    assert len(flood["output_tail"]) < OUTPUT_TAIL_BYTES + 100  # 8 MiB of output, a bounded excerpt kept
    assert all(r["output_tail"] is None or len(r["output_tail"]) < OUTPUT_TAIL_BYTES + 100 for r in records)
    assert "6 failed, 3 passed" in proc.stdout
    psutil.wait_procs([p for p in _sleepers() if p.pid not in before], timeout=5)
    assert {p.pid for p in _sleepers()} - before == set()  # the orphan's child was killed with its cell


FAULT_QTYPES = 'qtype = ["abort", "segfault", "exit", "raise", "hang", "oom", "flood", "orphan"]'
INTERRUPT_MATRIX = FAULT_MATRIX.replace(FAULT_QTYPES, 'qtype = ["hang"]').replace(
    'cell_timeout_s = 10', 'cell_timeout_s = 600')


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_stops_the_run_within_seconds_and_records_the_running_cell(runner, tmp_path, sig):
    matrix, results = tmp_path / "hang.toml", tmp_path / "results.jsonl"
    matrix.write_text(INTERRUPT_MATRIX)
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-m", "matrix", "--matrix", str(matrix), "--results",
                             str(results), "-p", "no:cacheprovider", "-q", str(REPO / "tests" / "test_matrix.py")],
                            cwd=REPO, stdout=open(tmp_path / "pytest.log", "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (results.exists() and results.read_text().count("\n") >= 1):
        time.sleep(0.2)  # the baseline is recorded: the hanging cell starts
    time.sleep(3)  # and has run for a while
    cells = _cell_processes(proc.pid)  # with the pool, the waiting next worker too: it must go with the run
    assert cells
    sent = time.monotonic()
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert time.monotonic() - sent < 10
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["id"], r["verdict"]) for r in records] == [
        ("none/post-load/none/cpu/dit-xs/float32/direct", "ok"),  # baselines run first
        ("fault-hang/post-load/none/cpu/dit-xs/float32/direct", "interrupted")]
    gone, alive = psutil.wait_procs(cells, timeout=5)
    assert alive == []


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
