"""Hostile and careless input (issue 36's probes): each ends in one line naming the file, the field and what was
expected (or a report that names the bad line), with no traceback, no code run, no user file touched.

The crafted record that carried code into a repro script is tested in test_repro.py, the killed run in
test_isolation.py; this file holds the rest."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REFERENCE, run_matrix
from harness.cli import main
from harness.results import TEXT_LIMIT, ResultsWriter, capped, read_records

REPO = Path(__file__).resolve().parents[1]
FEW = REFERENCE / "h200-gpu-large-dit-l.jsonl"  # small: 12 records


def first_record() -> dict:
    return json.loads(FEW.read_text().splitlines()[0])


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err


# ------------------------------------------------------------------------------------------ records

BAD = [("error", "boom"), ("env", "linux"), ("expect", ["works"]), ("claims", ["x"]), ("started", 12345),
       ("run", None)]


@pytest.mark.parametrize(("field", "value"), BAD)
def test_a_wrongly_typed_record_is_a_named_line_and_the_rest_are_reported(field, value, tmp_path, capsys):
    good = [json.loads(line) for line in FEW.read_text().splitlines()[:3]]
    bad = {**good[0], field: value}
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in [bad, *good[1:]]))
    assert main(["report", str(results), "-o", str(tmp_path / "site"), "--rules", ""]) == 0
    out = capsys.readouterr()
    assert "(2 records, 1 skipped)" in out.out and "Traceback" not in out.err
    assert f"r.jsonl:1: {field}" in (tmp_path / "site" / "index.html").read_text()
    assert main(["report", str(results), "--markdown"]) == 0
    assert main(["compare", str(results), str(results)]) == 0
    assert main(["repro", bad["id"], "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and "does not validate" in err and f"r.jsonl:1: {field}" in err


def test_numbers_no_figure_can_be_are_each_a_named_line_and_nothing_overflows(tmp_path, capsys):
    """An integer of 401 digits overflowed every float conversion of the report and compare (a traceback): such a
    record is skipped, naming the field, as one with an infinite or NaN figure (JSON's 1e999, NaN) is."""
    good = [json.loads(line) for line in FEW.read_text().splitlines()[:3]]
    huge, odd = json.loads(json.dumps(good[0])), json.loads(json.dumps(good[1]))
    huge["metrics"]["peak_mem_bytes"] = 10 ** 400
    text = json.dumps(odd).replace('"sqnr_db": ', '"sqnr_db": 1e999, "was": ', 1)
    odd_line = text.replace('"bits_per_weight": ', '"bits_per_weight": NaN, "was_bits": ', 1)
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps(huge) + "\n" + odd_line + "\n" + json.dumps(good[2]) + "\n")
    records, skipped = read_records(results)
    assert len(records) == 1 and skipped == [
        f"{results}:1: metrics.peak_mem_bytes: an integer of 401 digits; expected one within 64 bits",
        f"{results}:2: metrics.bits_per_weight is nan, expected a finite number; metrics.sqnr_db is inf, expected a "
        "finite number"]
    assert main(["report", str(results), "-o", str(tmp_path / "site"), "--rules", ""]) == 0
    assert main(["report", str(results), "--markdown"]) == 0
    assert main(["compare", str(results), str(results)]) == 0
    assert main(["repro", huge["id"], "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "metrics.peak_mem_bytes: an integer of 401 digits" in err


def test_a_file_of_one_torn_line_gives_a_report_that_says_so(tmp_path, capsys):
    """What a run killed in its first cell leaves: no valid record."""
    results = tmp_path / "torn.jsonl"
    results.write_text('{"schema": 1, "run": "cut sho')
    assert main(["report", str(results), "-o", str(tmp_path / "site")]) == 0  # with the wiki patch's rules
    assert "(0 records, 1 skipped): no valid record" in capsys.readouterr().out
    assert "torn.jsonl:1: not a JSON record" in (tmp_path / "site" / "index.html").read_text()
    assert main(["report", str(results), "--doc-patch", "-o", str(tmp_path / "patch.md")]) == 0


# ------------------------------------------------------------------------------------------ matrices

AXES_ALL = "\n".join(f'{axis} = "*"' for axis in ("engine", "qtype", "load", "offload", "device", "model", "dtype",
                                                  "stack", "cast", "components", "compile", "lora", "lora_fuse"))


def test_a_matrix_of_every_axis_is_refused_before_it_expands(tmp_path, capsys):
    path = tmp_path / "everything.toml"
    path.write_text(f"[axes]\n{AXES_ALL}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and "[axes]: expands to " in err and "over the limit of 100,000 cells" in err
    assert "--max-cells" in err and "model " in err  # how to narrow it: the axes' widths
    with pytest.raises(SystemExit) as exited:  # a bound of 0 (or NaN, or negative) is no bound
        main(["validate", str(path), "--max-cells", "0"])
    assert exited.value.code == 2 and "--max-cells: expected a finite number > 0, got '0'" in capsys.readouterr().err


SMALL = """[axes]
engine = "none"
qtype = "*"
load = "post-load"
offload = "none"
device = "cpu"
model = "dit-xs"
dtype = "float32"
"""


@pytest.mark.parametrize(("settings", "problem"), [
    ("cell_timeout_s = nan", "[settings.cell_timeout_s]: expected a finite number, got nan"),
    ("cell_timeout_s = 0", "[settings.cell_timeout_s]: expected a value > 0, got 0"),
    ("min_time_s = -1.0", "[settings.min_time_s]: expected a value >= 0, got -1.0"),
    ("batch = 0", "[settings.batch]: expected a value > 0, got 0"),
    ("min_steps = 100\nmax_steps = 1", "[settings]: expected min_steps <= max_steps, got 100 and 1"),
])
def test_settings_that_cannot_mean_anything_are_refused(settings, problem, tmp_path, capsys):
    path = tmp_path / "m.toml"
    path.write_text(f"{SMALL}[settings]\n{settings}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and problem in err


def test_an_unknown_filter_value_is_one_line_and_a_filter_of_nothing_runs_nothing(tmp_path):
    smoke = str(REPO / "matrices" / "smoke.toml")
    typo = run_matrix(tmp_path / "r.jsonl", "--matrix", smoke, "--engine", "bnbx", check=False)
    assert typo.returncode == 4 and "INTERNALERROR" not in typo.stdout + typo.stderr
    assert "--engine bnbx: not a known engine (a name of the engines' catalog) (did you mean 'bnb'?)" in typo.stderr
    none = run_matrix(tmp_path / "r.jsonl", "--matrix", smoke, "--engine", "torchao", check=False)
    assert none.returncode == 5 and "INTERNALERROR" not in none.stdout + none.stderr  # pytest's "nothing ran"
    assert "quantmatrix: 0 cells: --engine torchao selects none of the 12 cells" in none.stdout
    assert not (tmp_path / "r.jsonl").exists()
    nan = run_matrix(tmp_path / "r.jsonl", "--matrix", smoke, "--cell-timeout", "nan", check=False)
    assert nan.returncode == 4 and "--cell-timeout: expected a finite number > 0, got 'nan'" in nan.stderr


# ------------------------------------------------------------------------------------------ output paths

def test_each_output_problem_is_one_line_and_no_input_is_written_over(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "victim.jsonl"
    results.write_bytes(FEW.read_bytes())
    (tmp_path / "a-file").write_text("mine")
    cases = [
        (["report", "victim.jsonl", "-o", "a-file", "--rules", ""], "a-file: is a file; expected a folder"),
        (["report", "victim.jsonl", "-o", "a-file/sub", "--rules", ""], "a-file/sub: cannot make the folder"),
        (["report", "victim.jsonl", "-o", "/proc/quantmatrix-report", "--rules", ""], "cannot make the folder"),
        (["report", "victim.jsonl", "--markdown", "-o", "victim.jsonl"], "victim.jsonl: is an input of this command"),
        (["report", "victim.jsonl", "--doc-patch", "-o", "."], ".: is a folder; expected a file"),
        (["report", "victim.jsonl", "--markdown", "-o", "missing/x.md"], "cannot write: no folder 'missing'"),
        (["report", "victim.jsonl", "--upstream", "a-file"], "a-file: is a file; expected a folder"),
    ]
    for argv, problem in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert one_line(err) and problem in err, (argv, err)
    assert results.read_bytes() == FEW.read_bytes() and (tmp_path / "a-file").read_text() == "mine"


def test_repro_writes_no_script_over_an_input_or_into_a_missing_folder(tmp_path, capsys):
    upstream = REFERENCE / "cpu-upstream.jsonl.gz"
    cell = "gguf-Q8_0/prequantized/sequential/cpu/flux-tiny/float32/diffusers"
    assert main(["repro", cell, "--results", str(upstream), "-o", str(tmp_path / "missing" / "x.py")]) == 2
    assert one_line(err := capsys.readouterr().err) and "cannot write: no folder" in err
    copy = tmp_path / "u.jsonl.gz"
    copy.write_bytes(upstream.read_bytes())
    assert main(["repro", cell, "--results", str(copy), "-o", str(copy)]) == 2
    assert one_line(err := capsys.readouterr().err) and "is an input of this command" in err
    assert copy.read_bytes() == upstream.read_bytes()


# ------------------------------------------------------------------------------------------ sizes and time

def test_an_error_text_is_capped_with_its_head_and_tail_and_its_length(tmp_path):
    text = "head " + "x" * 50_000_000 + " tail"
    kept = capped(text)
    assert len(kept) < TEXT_LIMIT + 100 and kept.startswith("head ") and kept.endswith(" tail")
    assert f"of {len(text):,} characters left out" in kept
    assert capped("short") == "short"


def test_a_short_write_is_retried_until_the_whole_line_is_written(tmp_path, monkeypatch):
    """os.write may write fewer bytes than asked (a signal, a quota): the writer goes on from where it stopped."""
    real = os.write
    calls = []

    def short(fd, data):
        calls.append(len(data))
        return real(fd, bytes(data[:7]))  # a real write of the first 7 bytes only

    record = first_record()
    monkeypatch.setattr(os, "write", short)
    ResultsWriter(tmp_path / "r.jsonl").append(record)
    monkeypatch.setattr(os, "write", real)
    assert len(calls) > 10
    records, skipped = read_records(tmp_path / "r.jsonl")
    assert skipped == [] and records == [record]


class Payload:
    """What a malicious pickle does when unpickled: creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_detect_reports_each_file_and_never_unpickles_or_blocks(tmp_path):
    """A real malicious pickle and a torch zip of one, a FIFO and a GGUF whose string arrays run past the bound:
    each one line, in the order given, the file after them still detected; nothing runs, nothing blocks."""
    import gguf
    import numpy as np
    import torch

    marker = tmp_path / "PWNED"
    (tmp_path / "model.bin").write_bytes(pickle.dumps(Payload(marker)))
    torch.save({"w": Payload(marker)}, tmp_path / "model.pt")  # the zip format torch.load reads
    os.mkfifo(tmp_path / "fifo.safetensors")
    writer = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), "quantmatrix")
    writer.add_array("tokenizer.ggml.tokens", ["t"] * (1 << 19 | 1))
    writer.add_tensor("x.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    good = tmp_path / "good.gguf"
    writer = gguf.GGUFWriter(str(good), "quantmatrix")
    writer.add_tensor("x.weight", gguf.quants.quantize(np.ones((4, 32), dtype=np.float32),
                                                       gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    names = ["model.bin", "model.pt", "fifo.safetensors", "vocab.gguf", "good.gguf"]
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "detect", *names], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = proc.stderr.splitlines()
    assert [e.split(":", 3)[2].strip() for e in errors] == names[:4], errors
    assert "not a regular file (a FIFO)" in errors[2] and "strings; expected at most 524288" in errors[3]
    assert proc.stdout.startswith("good.gguf: engine=gguf qtype=Q8_0")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ terminal and CSV

def test_compare_escapes_control_characters_so_a_record_cannot_forge_a_line(tmp_path, capsys):
    old = first_record()
    new = json.loads(json.dumps(old))
    new["run"] = old["run"] + "-new"
    new["verdict"], new["metrics"] = "fail", None
    new["error"] = {"type": "E", "message": "m", "stage": "load"}
    old["env"]["host"] = new["env"]["host"] = "box\r\x1b[2Kno regression\nREGRESSED"
    for name, record in (("old", old), ("new", new)):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(record) + "\n")
    assert main(["compare", str(tmp_path / "old.jsonl"), str(tmp_path / "new.jsonl")]) == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\\x1b[2Kno regression\\x0aREGRESSED" in out
    assert out.splitlines()[-1] == "REGRESSED"


def test_a_text_that_a_spreadsheet_would_run_is_neutralised_in_cells_csv(tmp_path):
    import pandas as pd

    record = first_record()
    record["note"], record["env"]["host"] = "=HYPERLINK(\"http://x\",\"y\")", "+1+1"
    (tmp_path / "r.jsonl").write_text(json.dumps(record) + "\n")
    assert main(["report", str(tmp_path / "r.jsonl"), "-o", str(tmp_path / "site"), "--rules", ""]) == 0
    row = pd.read_csv(tmp_path / "site" / "cells.csv").iloc[0]
    assert row["note"] == "'=HYPERLINK(\"http://x\",\"y\")" and row["host"] == "'+1+1"
    assert row["qtype"] == record["cell"]["qtype"]  # an axis value stays as it is


# ------------------------------------------------------------------------------------------ interrupts

def test_an_interrupt_while_a_claims_baseline_runs_keeps_the_finished_cells_record(tmp_path):
    """Ctrl-C while the baseline a cell's claims need is measured (a shard or an xdist worker that did not run
    it): the cell had finished, so its record is written (its claims unjudged: no baseline), then the run stops.
    The interrupt's moment is staged (a real signal cannot be timed into that window); the cell runs for real."""
    from harness.cell import Cell
    from harness.matrix import parse_matrix
    from harness.results import environment
    from harness.run.session import MatrixRun

    matrix = parse_matrix(SMALL.replace('engine = "none"', 'engine = ["none", "quanto"]').replace(
        'qtype = "*"', 'qtype = ["qint8"]') + '[[rule]]\nmatch = { engine = "quanto" }\nexpect = "works"\n'
        'claims = ["smaller"]\nsource = "a test"\n[settings]\nwarmup = 0\nmin_steps = 1\nmin_time_s = 0.0\n')
    run = MatrixRun.__new__(MatrixRun)
    run.id, run.results, run.matrix, run.workdir = "r", tmp_path / "r.jsonl", matrix, tmp_path
    run.writer, run.env, run.versions = ResultsWriter(run.results), environment({}), {}
    run.measured, run.done = {}, {}
    cell = Cell("quanto", "qint8", "post-load", "none", "cpu", "dit-xs", "float32")
    execute = run._execute

    def interrupted_at_the_baseline(c):
        if c == cell.baseline:
            raise KeyboardInterrupt
        return execute(c)

    run._execute = interrupted_at_the_baseline
    with pytest.raises(KeyboardInterrupt):
        run.run(cell)
    records, skipped = read_records(run.results)
    assert skipped == [] and [r["id"] for r in records] == [cell.id]
    assert records[0]["verdict"] == "ok" and [c["status"] for c in records[0]["claims"]] == ["unchecked"]


def test_a_document_page_that_is_not_there_is_one_line(tmp_path, capsys):
    path = tmp_path / "m.toml"
    path.write_text(f'{SMALL}[document]\ntitle = "T"\npage = "missing.md"\n')
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and "[document.page]: no file 'missing.md'" in err


def test_a_pickled_weights_file_in_a_model_directory_is_never_read(tmp_path):
    """A diffusers model directory, and a pipeline's, whose weights are a real malicious pickle (and a torch zip of
    one) where the safetensors should be: every load the stacks make reads safetensors only, so the pickle is
    refused unread (diffusers names the missing file), never unpickled."""
    import torch

    from harness.engines.registry import ENGINES
    from harness.models.build import build_model
    from harness.models.pipelines import load_pipeline
    from harness.stacks.diffusers import load_post

    marker = tmp_path / "PWNED"
    model = build_model("flux-tiny")
    pipeline = build_model("flux-tiny-pipe")
    for kind, write in (("pickle", lambda p: p.write_bytes(pickle.dumps(Payload(marker)))),
                        ("torch zip", lambda p: torch.save({"w": Payload(marker)}, p))):
        folder = tmp_path / kind.replace(" ", "-")
        model.save_pretrained(str(folder / "model"))
        pipeline.pipe.save_pretrained(str(folder / "pipe"))
        for weights in [*folder.glob("model/*.safetensors"), *folder.glob("pipe/transformer/*.safetensors")]:
            weights.unlink()
            write(weights.with_suffix(".bin"))
        with pytest.raises(OSError, match="safetensors"):
            load_post(ENGINES["none"], "-", "flux-tiny", folder / "model", torch.float32, torch.device("cpu"))
        with pytest.raises(OSError, match="safetensors"):
            load_pipeline("flux-tiny-pipe", folder / "pipe", torch.bfloat16)
        assert not marker.exists(), kind


def test_a_gzipped_results_file_is_read_within_a_bound_and_a_broken_one_is_one_line(tmp_path, monkeypatch, capsys):
    """The committed references are gzipped; a crafted .gz that decompresses past the bound, or a file that is not
    gzip at all, is one line naming it, never a traceback or a full memory."""
    import gzip

    from harness import results

    good = tmp_path / "good.jsonl.gz"
    good.write_bytes(gzip.compress(FEW.read_bytes()))
    assert len(read_records(good)[0]) == len(FEW.read_text().splitlines())  # read as the plain file is
    monkeypatch.setattr(results, "GZIP_LIMIT", 1000)
    assert main(["report", str(good), "--markdown"]) == 2
    assert one_line(err := capsys.readouterr().err) and "good.jsonl.gz: holds more than" in err
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_text("not gzip\n")
    assert main(["report", str(fake), "--markdown"]) == 2
    assert one_line(err := capsys.readouterr().err) and "fake.jsonl.gz: cannot read results file" in err
