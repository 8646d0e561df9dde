"""The matrix run end to end, as a user runs it: `pytest -m matrix` in a subprocess, records checked."""

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from harness.matrix import OFFLOAD_MODES
from harness.results import read_records

REPO = Path(__file__).resolve().parents[1]


def run_matrix(results: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-m", "matrix", "--results", str(results), "-q",
                           "-p", "no:cacheprovider", *args], cwd=REPO, capture_output=True, text=True, timeout=900)


def test_default_matrix_baseline_is_ok_in_every_offload_mode_for_every_model(tmp_path):
    results = tmp_path / "default.jsonl"
    proc = run_matrix(results, "--engine", "none")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "quantmatrix" in proc.stdout and str(results) in proc.stdout  # the summary names where results went
    records, skipped = read_records(results)  # read_records validates each record against the schema
    assert skipped == [] and records
    ok = defaultdict(set)
    for r in records:
        if r["verdict"] == "ok":
            ok[r["cell"]["model"]].add(r["cell"]["offload"])
    assert set(ok) == {"dit-xs", "unet-xs"}
    assert all(modes == set(OFFLOAD_MODES) for modes in ok.values())
    assert all(r["env"]["device_name"] and r["env"]["torch"] for r in records)


def test_two_smoke_runs_store_the_same_bytes_and_give_bit_identical_baseline_outputs(tmp_path):
    runs = []
    for name in ("a", "b"):
        results = tmp_path / f"{name}.jsonl"
        proc = run_matrix(results, "--matrix", "matrices/smoke.toml")
        assert proc.returncode == 0, proc.stdout[-3000:]
        runs.append({r["id"]: r for r in map(json.loads, results.read_text().splitlines())})
    a, b = runs
    assert a.keys() == b.keys() and len(a) >= 10
    for cell_id in a:
        ma, mb = a[cell_id]["metrics"], b[cell_id]["metrics"]
        assert (ma["param_bytes"], ma["bits_per_weight"]) == (mb["param_bytes"], mb["bits_per_weight"]), cell_id
        assert ma["output_sha256"] == mb["output_sha256"], cell_id
    # The post-load baseline reproduces the separately computed reference bit for bit.
    baseline = [r for r in a.values() if r["cell"]["engine"] == "none" and r["cell"]["load"] == "post-load"]
    assert baseline and all(r["metrics"]["max_abs_error"] == 0 for r in baseline)
