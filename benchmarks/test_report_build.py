"""How long the HTML report takes to read records and build its site as `quantmatrix report` does by default (with the
wiki patch of matrices/sdnext.toml): 10,000 records in at most 3.5 s, 100,000 in at most 30 s on the project's 2-core
host (issue 16). The budget holds the CPU time of the best of several rounds (the build is one single-threaded
process): a neighbour on this shared VM adds wall time, not the build's own CPU time, so noise cannot fail it and
no retry or sleep is needed; wall times are kept in the benchmark's stats. The 100,000-record one is
`benchmark_slow` (pytest -m benchmark_slow benchmarks/)."""

import json
import time

import pytest

from harness.matrix import load_matrix
from harness.report import data as report_data
from harness.report.html import build

REFERENCE = "results/reference/h200-sdnext-dit-xs.jsonl"
RULES = "matrices/sdnext.toml"  # the CLI's default --rules


def many_records(tmp_path, rootdir, count: int):
    """The H200's records as 10 machines x many nights, `count` in all."""
    seed = [line for line in (rootdir / REFERENCE).read_text().splitlines() if line.strip()]
    path = tmp_path / f"{count}.jsonl"
    with path.open("w") as out:
        written, night = 0, 0
        while written < count:
            for line in seed[:count - written]:
                r = json.loads(line)
                r["run"] = f"night{night:04d}"
                r["env"]["host"] = f"runner{night % 10}"
                r["started"] = f"2026-{1 + night // 280:02d}-{1 + night // 10 % 28:02d}T00:00:{night % 60:02d}+00:00"
                out.write(json.dumps(r) + "\n")
                written += 1
            night += 1
    return path


def site(benchmark, path, out, budget_s: float, rules, rounds: int = 5):
    """The best round's CPU time against the budget: on a shared 2-core host one round of the same build swings by
    about 15% (2.8-3.4 s for 10,000 records, 2026-12-03), so the best of several is the build's own cost."""
    cpu: list[float] = []

    def run():
        t0 = time.process_time()
        index = build(report_data.load([path]), out, rules=load_matrix(rules))
        cpu.append(time.process_time() - t0)
        return index

    index = benchmark.pedantic(run, rounds=rounds, iterations=1)
    assert index.exists() and "Overview" in index.read_text() and (out / "doc-patch.md").exists()
    benchmark.extra_info["cpu_s"] = [round(t, 2) for t in cpu]
    best = min(cpu)
    assert best <= budget_s, f"the site took {best:.2f} s of CPU at best (budget {budget_s} s; rounds: {cpu})"


@pytest.mark.benchmark(group="report")
def test_report_for_10000_records(benchmark, tmp_path, request):
    path = many_records(tmp_path, request.config.rootpath, 10_000)
    assert len(report_data.load([path]).frame) == 10_000
    # 3.5 s: the site grew repro scripts, paired-latency columns, record checks and the wiki patch's support tables
    # and judging (best rounds 2.8-3.3 s on 2026-12-03, 1.98 s before them): a doubling still fails
    site(benchmark, path, tmp_path / "site", budget_s=3.5, rules=request.config.rootpath / RULES, rounds=8)


@pytest.mark.benchmark_slow
@pytest.mark.benchmark(group="report")
def test_report_for_100000_records(benchmark, tmp_path, request):
    path = many_records(tmp_path, request.config.rootpath, 100_000)
    site(benchmark, path, tmp_path / "site", budget_s=30.0, rules=request.config.rootpath / RULES)
