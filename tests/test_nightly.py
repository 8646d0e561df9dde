"""Running the matrix the nightly way: shards, xdist workers, resume after an interrupt, the workflow file."""

import configparser
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import SMOKE_DURATIONS, Run, run_matrix, sigint_default
from harness.devices import pin_worker
from harness.matrix import load_matrix

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["-m", "matrix", "--matrix", "matrices/smoke.toml", "-q", "-p", "no:cacheprovider"]


def pytest_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", *SMOKE, *args]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def verdicts(path: Path) -> dict[str, str]:
    out = {}
    for r in records(path):
        assert r["id"] not in out, f"{r['id']} recorded twice"
        out[r["id"]] = r["verdict"]
    return out


def same_results(run: list[dict], smoke_run) -> None:
    """A second run of the smoke matrix agrees with the session's: the same cells, verdicts, stored bytes, bits per
    weight and output hashes (seeded models, deterministic kernels on the CPU)."""
    first = smoke_run.by_id()
    again = {r["id"]: r for r in run}
    assert again.keys() == first.keys() and len(first) == 12
    for cell_id, r in again.items():
        assert r["verdict"] == first[cell_id]["verdict"], cell_id
        a, b = r["metrics"], first[cell_id]["metrics"]
        assert (a["param_bytes"], a["bits_per_weight"], a["output_sha256"]) == \
            (b["param_bytes"], b["bits_per_weight"], b["output_sha256"]), cell_id


@pytest.mark.slow
def test_the_smoke_baseline_reproduces_its_reference_bit_for_bit(smoke_run):
    """The post-load baseline is the separately computed reference output: error exactly 0."""
    baseline = [r for r in smoke_run.records if r["cell"]["engine"] == "none" and r["cell"]["load"] == "post-load"]
    assert baseline and all(r["metrics"]["max_abs_error"] == 0 for r in baseline)
    assert smoke_run.returncode == 0, smoke_run.stdout[-3000:]


def test_three_shards_collect_each_cell_once(tmp_path):
    """Sharding (pytest-split) partitions the matrix's cells: each in exactly one shard (collection only)."""
    collected = []
    for group in (1, 2, 3):
        out = subprocess.run(pytest_cmd("--collect-only", "--splits", "3", "--group", str(group)), cwd=REPO,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:]
        ids = [line for line in out.stdout.splitlines() if line.startswith("tests/test_matrix.py::")]
        assert ids, out.stdout[-2000:]
        collected.append(ids)
    every = [c.id for c in load_matrix(REPO / "matrices" / "smoke.toml").cells]
    assert sorted(i.split("[", 1)[1].rstrip("]") for i in sum(collected, [])) == sorted(every) and len(every) == 12


@pytest.mark.slow
def test_three_shards_run_each_cell_once_like_an_unsharded_run(tmp_path, smoke_run):
    durations = smoke_run.results.parent / SMOKE_DURATIONS  # the unsharded run stored its durations
    assert len(json.loads(durations.read_text())) == len(smoke_run.records)
    shards = tmp_path / "shards.jsonl"
    runs = Counter()
    for group in (1, 2, 3):
        out = subprocess.run(pytest_cmd("--results", str(shards), "--splits", "3", "--group", str(group),
                                        "--durations-path", str(durations), "--splitting-algorithm",
                                        "least_duration"),
                             cwd=REPO, check=True, capture_output=True, text=True, timeout=600)
        runs[group] = len(records(shards)) - sum(runs.values())
        assert "passed" in out.stdout
    assert all(n > 0 for n in runs.values())  # every shard ran some cells
    same_results(records(shards), smoke_run)  # the same cells, each once, with the same verdicts and figures


@pytest.mark.slow
def test_interrupted_run_resumes_where_it_stopped(tmp_path, smoke_run):
    results = tmp_path / "results.jsonl"
    proc = subprocess.Popen(pytest_cmd("--results", str(results)), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, preexec_fn=sigint_default)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not results.exists() or len(records(results)) < 4):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    first = records(results)
    assert 4 <= len(first) < 12, "the interrupt must land mid-run"
    from harness.report import data as report_data
    from harness.report.html import build

    partial = report_data.load([results])  # the report builds from what an interrupted run left
    assert partial.skipped == [] and len(partial.frame) == len(first)
    html = build(partial, tmp_path / "site").read_text()
    grids = (tmp_path / "site" / "grids.html").read_text()
    assert all(r["id"] in grids for r in first)  # every recorded cell in its grid
    # The overview counts every verdict, zeros included: its interrupted cell says how many the run left.
    shown = re.search(r'<td class="[^"]*" data-verdict="interrupted">(\d+)</td>', html)
    assert shown and int(shown.group(1)) == sum(r["verdict"] == "interrupted" for r in first)
    subprocess.run(pytest_cmd("--resume", str(results)), cwd=REPO, check=True, capture_output=True, timeout=600)
    after = records(results)
    assert after[:len(first)] == first  # earlier records intact
    final = [r for r in after if r["verdict"] != "interrupted"]
    assert {r["run"] for r in after} == {first[0]["run"]}  # the resumed run goes on under the same run id
    resumed = [r for r in after[len(first):]]
    assert {r["id"] for r in resumed}.isdisjoint({r["id"] for r in first if r["verdict"] != "interrupted"})
    same_results(final, smoke_run)  # every cell recorded exactly once, as an uninterrupted run records it


@pytest.mark.slow
def test_xdist_workers_write_one_intact_record_per_cell(tmp_path):
    results = tmp_path / "results.jsonl"
    out = subprocess.run(pytest_cmd("--results", str(results), "-n", "2", "-p", "no:benchmark"), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    lines = results.read_text().splitlines()
    parsed = [json.loads(line) for line in lines]  # every line whole
    assert len({r["run"] for r in parsed}) == 1  # the workers share the controller's run id
    share = max(1, (os.cpu_count() or 1) // 2)
    assert {r["env"]["threads"] for r in parsed} == {share}  # a fair share of the cores each
    # One record per cell, the same figures as one process with the same threads gives. Not the session's run's:
    # on some CPUs (this workplace's Xeons, 2026-12) a float32 output's bits change with the thread count.
    serial = tmp_path / "serial.jsonl"
    proc = run_matrix(serial, "--matrix", "matrices/smoke.toml", "-p", "no:benchmark",
                      env={**os.environ, "OMP_NUM_THREADS": str(share)})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert {r["env"]["threads"] for r in records(serial)} == {share}
    same_results(parsed, Run(serial, records(serial), proc.stdout, proc.returncode))


@pytest.mark.parametrize("kind, ids, expected", [
    ("cuda", ["0", "1"], ["0", "1", "0", "1"]),
    ("cuda", ["3", "5", "7"], ["3", "5", "7", "3"]),  # a preset CUDA_VISIBLE_DEVICES is honoured
    ("rocm", ["0", "1"], ["0", "1", "0", "1"]),
    ("xpu", ["0"], ["0", "0", "0", "0"]),
])
def test_workers_are_pinned_round_robin_to_the_visible_devices(kind, ids, expected):
    variable = {"cuda": "CUDA_VISIBLE_DEVICES", "rocm": "HIP_VISIBLE_DEVICES", "xpu": "ZE_AFFINITY_MASK"}[kind]
    assert [pin_worker(w, kind, ids) for w in range(4)] == [{variable: e} for e in expected]
    assert pin_worker(0, None, []) == {}


WORKFLOW = REPO / ".github" / "workflows" / "nightly.yml"


def check_workflow(path: Path) -> subprocess.CompletedProcess:
    """Validate against GitHub's workflow schema (vendored by check-jsonschema: no network)."""
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                           str(path)], capture_output=True, text=True, timeout=120)


def test_nightly_workflow_is_valid_and_has_a_job_per_vendor(tmp_path):
    import yaml

    assert check_workflow(WORKFLOW).returncode == 0
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("runs-on: ubuntu-latest", "runs_on: ubuntu-latest", 1))
    assert check_workflow(broken).returncode != 0  # the check can fail

    flow = yaml.safe_load(WORKFLOW.read_text())
    jobs = flow["jobs"]
    assert jobs["cpu"]["runs-on"] == "ubuntu-latest" and "if" not in jobs["cpu"]
    for job, label in (("nvidia", "nvidia"), ("amd", "amd-rocm"), ("intel", "intel-xpu")):
        assert "self-hosted" in jobs[job]["runs-on"] and label in jobs[job]["runs-on"]
        assert jobs[job]["if"].startswith("vars.HAS_")  # no runner: skipped, not failed
    report_installs = " ".join(s.get("run", "") for s in jobs["report"]["steps"] if "pip install" in s.get("run", ""))
    assert "[report]" in report_installs and "torch" not in report_installs  # reports need no torch
    for job in ("cpu", "nvidia", "amd", "intel"):
        steps = jobs[job]["steps"]
        assert any("pytest -m matrix" in s.get("run", "") for s in steps)
        assert any(s.get("uses", "").startswith("actions/upload-artifact") for s in steps)
        assert any("torch" in s.get("run", "") and "pip install" in s.get("run", "") for s in steps)
    report = jobs["report"]
    assert set(report["needs"]) == {"cpu", "nvidia", "amd", "intel"} and report["if"] == "always()"
    script = " ".join(s.get("run", "") for s in report["steps"])
    assert "quantmatrix report" in script and "quantmatrix compare" in script


def test_tox_has_version_axes_that_pin_torch_and_the_engines():
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(REPO / "tox.ini")
    current, oldest = ini["testenv:matrix-current"], ini["testenv:matrix-oldest"]
    # torch is pinned with the deps, which are installed before the package's own "torch>=2.4"
    assert "torch==2.13.0" in current["deps"] and "torch==2.4.1+cpu" in oldest["deps"]
    assert "commands_pre" not in current and "commands_pre" not in oldest
    for env in (current, oldest):
        pins = [line.strip() for line in env["deps"].splitlines() if line.strip()]
        assert pins and all("==" in p for p in pins)
        assert "bitsandbytes" in env["deps"] and "optimum-quanto" in env["deps"]


@pytest.mark.parametrize("status, passes", [(0, True), (1, True), (2, False), (3, False), (4, False), (5, False)])
def test_nightly_matrix_steps_let_findings_through_and_fail_on_the_harness_own_failures(status, passes):
    """pytest's exit status 1 (failing cells: findings, recorded) lets the night go on; 2 (interrupted), 3
    (internal error), 4 (usage error) and 5 (no cell collected) are the harness's own failures and fail it.
    Each matrix step runs as GitHub runs it (bash -e), with pytest standing in for the run's exit status."""
    import yaml

    steps = [step["run"] for job in yaml.safe_load(WORKFLOW.read_text())["jobs"].values()
             for step in job["steps"] if "pytest -m matrix" in step.get("run", "")]
    assert len(steps) >= 5  # cpu (two steps), nvidia, amd, intel
    for script in steps:
        fake = (f"pytest() {{ return {status}; }}\nnvidia-smi() {{ echo GPU 0; }}\npython() {{ echo 1; }}\n"
                ". () { :; }\n")
        proc = subprocess.run(["bash", "-e", "-c", fake + script], capture_output=True, text=True, timeout=30)
        assert (proc.returncode == 0) is passes, (status, script, proc.stderr)


SLOWDOWN_MATRIX = """
[axes]
engine = ["none", "quanto", "fault"]
qtype = ["qint8", "slow"]
load = ["post-load"]
offload = ["none"]
device = ["cpu"]
model = ["dit-s"]
dtype = ["float32"]

[settings]
warmup = 1
min_steps = 8
min_time_s = 0.2
"""


@pytest.mark.slow
def test_compare_of_two_real_runs_flags_exactly_the_cells_made_3x_slower_with_a_cpu_hog_beside_one(tmp_path):
    """Two runs of the same cells; in the second, the fault engine's `slow` cells really compute every step three
    times (QUANTMATRIX_FAULT_SLOWDOWN=3) and a busy loop holds one of the host's cores (here it makes every step
    about 12x slower: torch's two threads wait for each other). Paired timings cancel most of the hog, not all (it
    moved quanto's ratio 1.29x on CI), so the records say how long the steps' threads waited for a CPU and compare
    asks 2x of a cell timed so; it flags the slowed cell and nothing else. dit-s, not dit-xs: under the hog a 7 ms
    step's pairs spread too wide to tell (their interval is then inconclusive, not a regression)."""
    from harness.report import data as report_data
    from harness.report.compare import BUSY_WAIT, compare

    matrix = tmp_path / "slowdown.toml"
    matrix.write_text(SLOWDOWN_MATRIX)
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    run_matrix_file = [sys.executable, "-m", "pytest", *SMOKE[:2], "--matrix", str(matrix), "-q",
                       "-p", "no:cacheprovider"]
    subprocess.run([*run_matrix_file, "--results", str(old)], cwd=REPO, capture_output=True, timeout=600)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        subprocess.run([*run_matrix_file, "--results", str(new)], cwd=REPO, capture_output=True, timeout=600,
                       env={**os.environ, "QUANTMATRIX_FAULT_SLOWDOWN": "3"})
    finally:
        hog.kill()
    slowed = {r["id"] for r in records(new) if r["cell"]["engine"] == "fault"}
    assert len(slowed) == 1 and all(r["verdict"] == "ok" for r in records(new)), verdicts(new)
    changes = compare(report_data.load([old]), report_data.load([new]))
    # quanto's and the fault engine's cells; the float model without offload is its own reference, not compared
    assert changes.latency_compared == 2
    assert {c.id for c in changes.regressed} == slowed, [(c.kind, c.id, c.old, c.new) for c in changes.items]
    loads = [r["metrics"]["host_load"] for r in records(new)]
    assert all(h["cpus"] >= 1 and h["wall_s"] > 0 for h in loads)
    assert all(h["cpu_wait"] >= BUSY_WAIT for h in loads), loads  # the hog, measured where each cell was timed
