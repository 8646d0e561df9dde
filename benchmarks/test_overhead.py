"""Per-cell harness overhead: an isolated cell against the same work done in-process.

The difference (forkserver fork, pickling the task, reading back the outcome and output tail) is what isolation
costs each cell; `load_s` of the record is the model build. Both are reported in the benchmark's extra_info.
"""

import statistics
import time

import pytest

from harness.cell import Cell
from harness.matrix import Settings
from harness.run.execute import CellTask, execute_cell
from harness.run.isolation import run_isolated

CELL = Cell("none", "-", "post-load", "none", "cpu", "dit-xs", "float32")
MINIMAL = Settings(warmup=0, min_steps=1, min_time_s=0.0)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    task = CellTask(CELL, MINIMAL, tmp_path_factory.mktemp("work"))
    assert run_isolated(task, timeout_s=300).status == "ran"  # starts the forkserver, caches the reference
    return task


def test_in_process_cell(benchmark, task):
    outcome = benchmark.pedantic(execute_cell, args=(task,), rounds=10, iterations=1)
    assert outcome.status == "ran"
    benchmark.extra_info["model_build_s"] = outcome.metrics["load_s"]


def test_isolated_cell(benchmark, task):
    outcome = benchmark.pedantic(run_isolated, args=(task,), kwargs={"timeout_s": 300}, rounds=10, iterations=1)
    assert outcome.status == "ran"
    assert execute_cell(task).status == "ran"  # warm the in-process path first
    t = []
    for _ in range(5):
        t0 = time.perf_counter()
        execute_cell(task)
        t.append(time.perf_counter() - t0)
    overhead = benchmark.stats.stats.median - statistics.median(t)
    benchmark.extra_info["isolation_overhead_s"] = round(overhead, 4)
    benchmark.extra_info["model_build_s"] = round(outcome.metrics["load_s"], 4)
    print(f"\nper-cell isolation overhead: {overhead * 1e3:.0f} ms (median isolated "
          f"{benchmark.stats.stats.median * 1e3:.0f} ms vs in-process {statistics.median(t) * 1e3:.0f} ms); "
          f"model build {outcome.metrics['load_s'] * 1e3:.0f} ms")
