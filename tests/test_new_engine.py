"""An engine is one module and its catalog row: tests/toy_engine.py, named in QUANTMATRIX_ENGINES and changing no
other file, is listed, runs on both stacks, is judged, reported, and gets a standalone script that reproduces its
failure; the report still imports no torch."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness.results import read_records

REPO = Path(__file__).resolve().parents[1]
MATRIX = """\
[matrix]
name = "toy"
description = "the test-only engine of tests/toy_engine.py"

[axes]
engine = ["none", "toy"]
qtype = ["-", "rtn8", "rtn1"]
load = ["post-load"]
offload = ["none", "model"]
device = ["cpu"]
model = ["flux-tiny"]
dtype = ["float32"]
stack = ["direct", "diffusers"]
"""


def quantmatrix(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_an_engine_added_as_one_module_is_listed_run_reported_and_reproduced(tmp_path):
    env = {**os.environ, "QUANTMATRIX_ENGINES": "tests.toy_engine",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    matrix, results = tmp_path / "toy.toml", tmp_path / "toy.jsonl"
    matrix.write_text(MATRIX)
    listed = quantmatrix("list", str(matrix), env=env)
    assert listed.returncode == 0, listed.stderr
    toy = sorted(set(re.findall(r"toy-rtn[18]/post-load/\w+/cpu/flux-tiny/float32/\w+", listed.stdout)))
    assert len(toy) == 8, listed.stdout  # 2 types x 2 offload modes x 2 stacks
    without = subprocess.run([sys.executable, "-m", "harness.cli", "list", str(matrix)], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert without.returncode != 0 and "toy" in without.stderr  # unknown without its module: one clear line

    ran = quantmatrix("run", "--matrix", str(matrix), "--results", str(results), "-q", "-p", "no:cacheprovider",
                      env=env)
    # read as JSON here: this process's catalog lacks the engine, so its reader refuses the records (untrusted input
    # naming an unknown engine), as it should
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert {r["id"] for r in records} >= set(toy), ran.stdout[-3000:]
    assert read_records(results)[1] and "'toy' is not a known engine" in read_records(results)[1][0]
    verdicts = {r["id"]: r for r in records if r["cell"]["engine"] == "toy"}
    for cell_id, r in verdicts.items():
        assert r["metrics"]["bits_per_weight"] == pytest.approx(8 + 32 / 128, abs=0.5), cell_id  # int8 + scale
        assert r["verdict"] == ("ok" if "rtn8" in cell_id else "wrong-output"), (cell_id, r["verdict"], r["note"])

    site = tmp_path / "site"
    built = subprocess.run([sys.executable, "-c", "import sys\nfrom harness.cli import main\n"
                            f"code = main(['report', {str(results)!r}, '-o', {str(site)!r}])\n"
                            "print('TORCH', 'torch' in sys.modules)\nsys.exit(code)"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0 and "TORCH False" in built.stdout, built.stderr[-3000:]
    assert "Toy RTN (test-only)" in (site / "index.html").read_text() + (site / "grids.html").read_text()
    scripts = sorted((site / "repro").glob("toy-rtn1-*.py"))
    assert scripts, sorted(p.name for p in (site / "repro").glob("*.py"))

    script = scripts[0]
    text = script.read_text()
    assert "class RoundedLinear(nn.Module)" in text and "harness" not in re.sub(r"#.*", "", text)
    record = next(r for r in records if r["id"] == re.search(r"cell (\S+)", text).group(1))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "output below its type's floor" in proc.stderr, proc.stderr[-2000:]
    assert f"SQNR {record['metrics']['sqnr_db']:.1f} dB <" in proc.stderr, proc.stderr[-2000:]
