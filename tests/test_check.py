"""`quantmatrix check MODEL`: its curated matrix, its table and recommendation from records, and (slow) the command
on this CPU end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import lines_of
from harness import check
from harness.errors import QuantMatrixError
from harness.matrix import parse_matrix
from harness.report import data as report_data

REPO = Path(__file__).resolve().parents[1]


def test_the_curated_matrix_is_each_engines_8_and_4_bit_types_on_sdnexts_path():
    cpu = parse_matrix(check.curated_matrix("flux-tiny-pipe", "cpu"))
    cells = {(c.engine, c.qtype) for c in cpu.cells}
    assert {("none", "-"), ("sdnq", "int8"), ("sdnq", "uint4"), ("bnb", "nf4"), ("gguf", "Q4_0")} <= cells
    assert {c.offload for c in cpu.cells} == {"none"}  # on a CPU an offload moves nothing: not checked
    assert {(c.stack, c.load, c.dtype) for c in cpu.cells} == {("diffusers", "post-load", "bfloat16")}
    cuda = parse_matrix(check.curated_matrix("flux-tiny-pipe", "cuda"))
    assert {c.offload for c in cuda.cells} == set(check.OFFLOADS)
    assert {c.stack for c in parse_matrix(check.curated_matrix("dit-xs", "cpu")).cells} == {"direct"}
    with pytest.raises(QuantMatrixError, match=r"unknown model 'flux-tiny-pip' \(did you mean 'flux-tiny-pipe'\?\)"):
        check.curated_matrix("flux-tiny-pip", "cpu")


@pytest.mark.parametrize("text, size", [("8GiB", 8 << 30), ("512MiB", 512 << 20), ("12G", 12 << 30),
                                        ("1.5GB", int(1.5 * 2**30)), ("4096", 4096)])
def test_a_memory_size_reads_as_people_write_it(text, size):
    assert check.memory_size(text) == size


def test_a_memory_size_that_is_not_one_is_one_line():
    with pytest.raises(QuantMatrixError, match="--memory '8 gigs': expected a size such as 8GiB"):
        check.memory_size("8 gigs")


def check_records(tmp_path: Path) -> report_data.Records:
    """The committed records of the cells a check of flux-tiny-pipe runs on this host's CPU."""
    matrix = parse_matrix(check.curated_matrix("flux-tiny-pipe", "cpu"))
    wanted = {c.id for c in matrix.cells}
    lines = [line for line in lines_of(REPO / "results" / "reference" / "cpu-default.jsonl.gz")
             if json.loads(line)["id"] in wanted]
    path = tmp_path / "check.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return report_data.load([path])


def test_the_memory_given_changes_the_recommendation(tmp_path):
    records = check_records(tmp_path)
    rows = check.table(records)
    assert len(rows) >= 10 and rows.iloc[0]["engine"] == "none"  # the float model first
    assert "Give --memory" in check.recommend(rows, None)
    peaks = rows[rows["right"]]["peak_mib"]
    float_peak = float(rows[rows["engine"] == "none"]["peak_mib"].iloc[0])
    assert "The float model fits" in check.recommend(check.table(records, 1 << 40), 1 << 40)
    below_float = int((float_peak - 0.5) * 2**20)  # the float model does not fit, something quantized does
    assert (peaks * 2**20 <= below_float).any()  # in the committed records, some quantized peak is lower
    said = check.recommend(check.table(records, below_float), below_float)
    assert said.startswith("In ") and "none -" not in said
    assert check.recommend(check.table(records, 1 << 20), 1 << 20).startswith(
        "Nothing measured fits in 1 MiB; the smallest peak: ")  # 1 MiB: below every peak
    assert peaks.min() > 1


def test_the_table_says_what_its_figures_cannot(tmp_path):
    text = check.render(check.table(check_records(tmp_path), 8 << 30), "cpu", "flux-tiny-pipe")
    assert text.splitlines()[0].split() == ["engine", "type", "offload", "result", "peak", "MiB", "mem", "x",
                                            "time", "x", "error", "dB", "SSIM", "fits"]
    assert "these peaks are this model's activations" in text and "On a CPU no offload mode is checked" in text


@pytest.mark.slow
def test_check_runs_a_tiny_pipeline_on_this_cpu_and_prints_its_table(tmp_path):
    results = tmp_path / "check.jsonl"
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "check", "flux-tiny-pipe", "--memory", "1GiB",
                           "--results", str(results)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(records) >= 10 and {r["cell"]["model"] for r in records} == {"flux-tiny-pipe"}
    table = proc.stdout[proc.stdout.index("engine  "):]
    assert any(line.startswith("none ") and " works " in line for line in table.splitlines())
    assert "The float model fits in 1.0 GiB" in table
