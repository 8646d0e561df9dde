"""Per-cell harness overhead, on both stacks and with both cell runners: an isolated cell against the same work
done in-process.

The difference (forkserver fork, pickling the task, reading back the outcome and output tail) is what isolation
costs each cell, held to ISOLATION_BUDGET_S (the README's figures are 50-85 ms; a cell that re-imported torch or
its engines would cost seconds); `load_s` of the record is the model build (direct) or diffusers'
`from_pretrained` (diffusers). What the cell spends outside loading, quantizing and its steps (preparing inputs,
counting storage, installing hooks, the reference) is the in-process overhead. All are reported in the
benchmark's extra_info and printed.
"""

import statistics
import time

import pytest

from harness.cell import Cell
from harness.run.execute import CellTask, execute_cell
from harness.run.isolation import run_isolated
from harness.settings import Settings

CELLS = {
    "dit-xs-direct": Cell("none", "-", "post-load", "none", "cpu", "dit-xs", "float32"),
    "flux-tiny-direct": Cell("none", "-", "post-load", "none", "cpu", "flux-tiny", "float32", "direct"),
    "flux-tiny-diffusers": Cell("none", "-", "post-load", "none", "cpu", "flux-tiny", "float32", "diffusers"),
}
MINIMAL = Settings(warmup=0, min_steps=1, min_time_s=0.0)
# The best isolated round against the best in-process one (noise only adds time, so the minima are the estimate).
ISOLATION_BUDGET_S = 0.3
POOL_HANDOVER_BUDGET_S = 1.0  # a ready worker's handover, reading the outcome back, refilling after


@pytest.fixture(scope="module", params=list(CELLS))
def task(request, tmp_path_factory):
    task = CellTask(CELLS[request.param], MINIMAL, tmp_path_factory.mktemp("work"))
    assert run_isolated(task, timeout_s=300).status == "ran"  # starts the forkserver, caches the reference
    return task


def own_work_s(metrics: dict) -> float:
    """Loading, quantizing and the steps: the cell's own work (the first step plus the timed ones)."""
    lat = metrics["latency_ms"]
    return metrics["load_s"] + (metrics["quantize_s"] or 0) + lat["median"] * (lat["n"] + 1) / 1e3


def test_in_process_cell(benchmark, task):
    outcome = benchmark.pedantic(execute_cell, args=(task,), rounds=10, iterations=1)
    assert outcome.status == "ran"
    overhead = benchmark.stats.stats.median - own_work_s(outcome.metrics)
    benchmark.extra_info["in_process_overhead_s"] = round(overhead, 4)
    benchmark.extra_info["load_s"] = outcome.metrics["load_s"]
    print(f"\n{task.cell.id}: in-process overhead {overhead * 1e3:.0f} ms of {benchmark.stats.stats.median * 1e3:.0f}"
          f" ms (load {outcome.metrics['load_s'] * 1e3:.0f} ms)")


def test_isolated_cell(benchmark, task):
    outcome = benchmark.pedantic(run_isolated, args=(task,), kwargs={"timeout_s": 300}, rounds=10, iterations=1)
    assert outcome.status == "ran"
    assert execute_cell(task).status == "ran"  # warm the in-process path first
    t = []
    for _ in range(5):
        t0 = time.perf_counter()
        execute_cell(task)
        t.append(time.perf_counter() - t0)
    isolation = benchmark.stats.stats.median - statistics.median(t)
    best = benchmark.stats.stats.min - min(t)
    benchmark.extra_info["isolation_overhead_best_s"] = round(best, 4)
    assert best < ISOLATION_BUDGET_S, f"isolating a cell cost {best * 1e3:.0f} ms at best"
    harness = benchmark.stats.stats.median - own_work_s(outcome.metrics)
    benchmark.extra_info["isolation_overhead_s"] = round(isolation, 4)
    benchmark.extra_info["harness_overhead_s"] = round(harness, 4)
    benchmark.extra_info["load_s"] = round(outcome.metrics["load_s"], 4)
    print(f"\n{task.cell.id}: isolation {isolation * 1e3:.0f} ms, harness overhead in all {harness * 1e3:.0f} ms "
          f"(median isolated {benchmark.stats.stats.median * 1e3:.0f} ms, in-process {statistics.median(t) * 1e3:.0f}"
          f" ms, load {outcome.metrics['load_s'] * 1e3:.0f} ms)")


@pytest.fixture
def pool_runner(monkeypatch):
    from harness.run import pool

    monkeypatch.setenv("QUANTMATRIX_CELL_RUNNER", "pool")
    monkeypatch.setenv("QUANTMATRIX_POOL_REFILL", "after")  # no import competes with the timed cell
    yield pool
    pool.close()


def test_isolated_cell_from_the_warm_pool(benchmark, task, pool_runner):
    """The pool's handover (QUANTMATRIX_CELL_RUNNER=pool, as on an accelerator build) with its next worker ready and
    no import beside the cell (refill after the cell): the steady state of a box whose workers import on other
    cores. A worker's imports take longer than these tiny cells, so each round first waits for its worker (not
    timed); that wait is reported beside."""
    import time as clock

    ready = []

    def wait():
        t0 = clock.perf_counter()
        assert pool_runner.pool().wait_ready()
        ready.append(clock.perf_counter() - t0)
        return (task,), {"timeout_s": 300}

    outcome = benchmark.pedantic(run_isolated, setup=wait, rounds=5, iterations=1)
    assert outcome.status == "ran"
    harness = benchmark.stats.stats.median - own_work_s(outcome.metrics)
    benchmark.extra_info["harness_overhead_s"] = round(harness, 4)
    benchmark.extra_info["worker_ready_wait_s"] = round(statistics.median(ready), 2)
    best = benchmark.stats.stats.min - own_work_s(outcome.metrics)
    assert best < POOL_HANDOVER_BUDGET_S, f"a ready pool worker's cell cost {best * 1e3:.0f} ms beyond its work"
    print(f"\n{task.cell.id} (pool): harness overhead in all {harness * 1e3:.0f} ms (median isolated "
          f"{benchmark.stats.stats.median * 1e3:.0f} ms); waited {statistics.median(ready):.1f} s for a ready worker")
