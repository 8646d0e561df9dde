"""Harness benchmarks: expanding a 100,000-cell matrix, and the wall time of whole matrix runs on this CPU.

The matrix runs are `benchmark_slow` (minutes; left out of the default `pytest`): run them with
`pytest benchmarks/test_matrix_scale.py -m benchmark_slow`.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.matrix import parse_matrix

REPO = Path(__file__).resolve().parents[1]

# Every engine and type x 4 offloads x 5 devices x every model x 3 dtypes, in all load modes, with a few rules to
# evaluate for every cell. The built-in models give 40,000 cells; 16 more model names make it 110,000.
BIG = """
[axes]
engine = ["*"]
qtype = ["*"]
load = ["*"]
offload = ["none", "model", "sequential", "balanced"]
device = ["*"]
model = ["*"]
dtype = ["*"]
[[rule]]
match = { engine = "bnb", offload = "sequential" }
expect = "error"
pattern = "meta tensor"
[[rule]]
match = { engine = "gguf" }
expect = "works"
claims = ["smaller", "slower"]
"""


def test_expand_100k_cells(benchmark, monkeypatch):
    from harness.models import specs as models

    for i in range(16):
        monkeypatch.setitem(models.MODELS, f"dit-x{i}", models.MODELS["dit-xs"])
    matrix = benchmark.pedantic(parse_matrix, args=(BIG, "big.toml"),  # past the default bound, on purpose
                                kwargs={"present_devices": ("cpu",), "max_cells": 1_000_000}, rounds=3, iterations=1)
    assert len(matrix.cells) >= 100_000
    benchmark.extra_info["cells"] = len(matrix.cells)
    started = time.perf_counter()
    kinds = {matrix.expectation(c).kind for c in matrix.cells}
    benchmark.extra_info["expectations_s"] = round(time.perf_counter() - started, 3)
    assert kinds == {"works", "error"}


@pytest.mark.benchmark_slow
@pytest.mark.parametrize("matrix, workers", [("smoke", 0), ("smoke", 2), ("default", 0), ("default", 2)])
def test_matrix_wall_time(benchmark, tmp_path, matrix, workers):
    results = tmp_path / "results.jsonl"

    def run():
        return subprocess.run([sys.executable, "-m", "pytest", "-m", "matrix", "--matrix", f"matrices/{matrix}.toml",
                               "-q", "-p", "no:cacheprovider", "-p", "no:benchmark", "-n", str(workers),
                               "--results", str(results)], cwd=REPO, timeout=3600, capture_output=True, text=True)

    proc = benchmark.pedantic(run, rounds=1, iterations=1)
    # 0: every cell passed, 1: some cells failed (findings); anything else is the harness failing, not a timing
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(records) == len({r["id"] for r in records}) > 0
    assert not any(r["verdict"] in ("timeout", "hang", "crash") for r in records), \
        [(r["id"], r["verdict"]) for r in records if r["verdict"] in ("timeout", "hang", "crash")]
