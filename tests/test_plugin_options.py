"""The pytest plugin as a user meets it: its options wherever pytest runs, and a broken matrix file as one line."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

AXES = '[axes]\nengine = ["none"]\nqtype = ["*"]\nload = ["post-load"]\noffload = ["none"]\ndevice = ["cpu"]\n' \
       'model = ["dit-xs"]\ndtype = ["float32"]\n'
BROKEN = {  # mistake: (file, line named, what the message says)
    "syntax": ('[axes]\nengine = ["none"\n', 2, "TOML"),
    "unknown engine": (AXES.replace('["none"]', '["bnbb"]'), 2, "unknown engine 'bnbb' (did you mean 'bnb'?)"),
    "wrong type": (AXES + '[settings]\ncell_timeout_s = "long"\n', 10, "[settings.cell_timeout_s]"),
    "empty": ("", None, "[axes]: missing"),
}


def pytest_matrix(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-m", "matrix", "-p", "no:cacheprovider", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("mistake", BROKEN)
def test_a_broken_matrix_file_stops_the_run_with_one_error_line_and_status_4(tmp_path, mistake):
    text, line, what = BROKEN[mistake]
    path = tmp_path / "mine.toml"
    path.write_text(text)
    proc = pytest_matrix("--matrix", str(path))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 4, output[-3000:]
    errors = [x for x in output.splitlines() if x.startswith("ERROR:")]
    assert len(errors) == 1, output[-3000:]
    where = f"ERROR: {path}:{line}" if line else f"ERROR: {path}"
    assert errors[0].startswith(where) and what in errors[0], errors[0]
    assert not re.search(r"Traceback|_pytest|pluggy|\.py:\d+: in ", output), output[-3000:]  # no frames


def test_a_matrix_file_outside_the_checkout_is_found_with_the_option_and_its_value_apart(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    mine = elsewhere / "mine.toml"
    mine.write_text((REPO / "matrices" / "smoke.toml").read_text())
    results = tmp_path / "results.jsonl"
    proc = pytest_matrix("--matrix", str(mine), "--engine", "none", "--model", "dit-xs", "--results", str(results))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert records and {r["verdict"] for r in records} == {"ok"}


def test_run_from_another_folder_without_a_matrix_option_reads_the_checkouts_default(tmp_path):
    """`quantmatrix run` in a folder of one's own: matrices/default.toml of the checkout (it once looked in
    harness/, where there is none)."""
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--collect-only", "-q", "--engine", "none",
                           "--model", "dit-xs", "--offload", "none", "-p", "no:cacheprovider"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    assert "none/post-load/none/cpu/dit-xs/float32" in proc.stdout
