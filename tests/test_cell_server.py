"""The cell server forks cells from a thread-free process: what a fork leaves behind of other threads (a held lock,
a pool that believes its worker is alive) is what deadlocked SDNQ's cells in full runs (harness/run/cell_server.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALL_ENGINES = "bnb,gguf,nncf,none,quanto,sdnq,torchao"


def fresh_machine_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """As on a machine that never ran the harness: no inductor cache (the cell server then compiles sdnq's import
    test itself), no OpenVINO consent file in the home (nncf's telemetry then starts its thread pool)."""
    home, cache = tmp_path / "home", tmp_path / "inductor"
    home.mkdir()
    return {**os.environ, "HOME": str(home), "TORCHINDUCTOR_CACHE_DIR": str(cache), **extra}


RUN_ONE_CELL = """
import json, sys, tempfile
from pathlib import Path
from harness.run.execute import CellTask
from harness.cell import Cell
from harness.settings import Settings
from harness.run.isolation import run_isolated
cell = Cell("none", "-", "post-load", "none", "cpu", "dit-xs", "float32")
outcome = run_isolated(CellTask(cell, Settings(warmup=0, min_steps=1, min_time_s=0.0), Path(tempfile.mkdtemp())),
                       timeout_s=120)
print(json.dumps(outcome.as_dict()))
"""


def run_one_cell(env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUN_ONE_CELL], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_with_every_engine_preloaded_on_a_fresh_machine_the_server_forks_with_no_other_thread(tmp_path):
    outcome = run_one_cell(fresh_machine_env(tmp_path, QUANTMATRIX_PRELOAD=ALL_ENGINES))
    assert outcome["status"] == "ran", outcome["error"]  # the fork check found no thread besides the main one


def test_a_server_holding_another_thread_refuses_to_fork_cells_and_names_the_thread(tmp_path):
    env = fresh_machine_env(tmp_path, QUANTMATRIX_PRELOAD="fault", QUANTMATRIX_FAULT_IMPORT_THREAD="1")
    outcome = run_one_cell(env)
    assert outcome["status"] == "error"
    assert outcome["error"]["type"] == "HarnessError"
    assert "'fault-import-thread' (Python thread" in outcome["error"]["message"]
    assert "forked cell none/post-load/none/cpu/dit-xs/float32/direct (" in outcome["error"]["message"]  # which cell


@pytest.mark.slow
def test_sdnq_cells_after_the_server_compiled_sdnqs_import_test_all_run_well_inside_the_timeout(tmp_path):
    """The cells that hung until the timeout on a fresh machine: SDNQ on the fly, with sdnq preloaded by the
    server (3 or more of its cells in the run) and an empty inductor cache."""
    results = tmp_path / "results.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "matrix", "--matrix", "matrices/default.toml", "--engine", "sdnq",
         "--load", "on-the-fly", "--offload", "none", "--device", "cpu", "--model", "flux-tiny", "--stack", "direct",
         "--cell-timeout", "120", "--results", str(results), "-p", "no:cacheprovider", "-q", "tests/test_matrix.py"],
        cwd=REPO, env=fresh_machine_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert results.exists(), proc.stdout[-3000:]
    records = [json.loads(line) for line in results.read_text().splitlines()]
    sdnq = [r for r in records if r["cell"]["engine"] == "sdnq"]
    assert len(sdnq) == 5, proc.stdout[-3000:]
    assert {r["verdict"] for r in records} == {"ok"}, [(r["id"], r["verdict"], r["reason"]) for r in records]
    assert proc.returncode == 0
    # what sdnq prints when the cell server imports it ("SDNQ: OpenVINO MM kernels are not available! ...") went to
    # the import log, not to the user's terminal
    assert "SDNQ" not in proc.stdout + proc.stderr
