"""The command line: clear errors with exit status 2, listing, validating and detecting files."""

import json
import subprocess
import sys
from pathlib import Path

from harness.cli import main
from harness.engines.registry import ENGINES
from harness.models.imitation import build_model

REPO = Path(__file__).resolve().parents[1]


def test_validate_bad_matrix_exits_2_with_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[axes]\nengine = ["none"]\noffload = ["sequentail"]\n')
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.toml" in err and "axes.offload" in err and "sequential" in err
    assert "Traceback" not in err


def test_validate_and_list_shipped_matrices(capsys):
    assert main(["validate", *map(str, sorted(REPO.glob("matrices/*.toml")))]) == 0
    capsys.readouterr()
    assert main(["list", str(REPO / "matrices" / "smoke.toml")]) == 0  # a matrix file taken as validate takes it
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["cell", "expected"]  # labelled as expectations, not results
    assert "none/post-load/sequential/cpu/dit-xs/float32/direct" in out


def test_list_shows_what_this_host_would_expect(capsys, monkeypatch):
    """`list` judges rules by this host's versions and lists only its devices unless --all-devices: on torch 2.13
    no quanto cell needs torch 2.4 (a rule limited to torch < 2.4); an older torch brings it back."""
    from harness.run import session

    sdnext = str(REPO / "matrices" / "sdnext.toml")
    assert main(["list", sdnext]) == 0
    captured = capsys.readouterr()
    cells = [line.split()[0] for line in captured.out.splitlines()[1:]]
    assert cells and {c.split("/")[3] for c in cells} == {"cpu"}  # this host's only device
    assert "Optimum-Quanto needs torch 2.4" not in captured.out and "more on devices it lacks" in captured.err
    assert main(["list", sdnext, "--all-devices"]) == 0
    every = capsys.readouterr().out
    assert {line.split()[0].split("/")[3] for line in every.splitlines()[1:]} >= {"cpu", "cuda", "xpu"}
    env, versions = session.host_environment()
    monkeypatch.setattr(session, "host_environment", lambda: (env, {**versions, "torch": "2.3.1"}))
    assert main(["list", sdnext]) == 0  # an older torch: the rule decides again
    assert "Optimum-Quanto needs torch 2.4" in capsys.readouterr().out


def test_run_help_shows_the_harness_options_first_and_all_of_them(capsys):
    import re

    from harness.cell import AXES
    from harness.run import plugin

    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: quantmatrix run") and len(out.splitlines()) < 40
    options = set(re.findall(r'addoption\("(--[a-z-]+)"', open(plugin.__file__).read()))
    assert options >= {"--matrix", "--results", "--resume", "--drift", "--cell-timeout", "--memory-limit"}
    for option in options | {f"--{axis.name}" for axis in AXES}:
        assert option in out, option


# Run in a fresh interpreter: `quantmatrix detect FILE...`, then the modules it had imported, written to a file.
DETECT_PROBE = """
import json, sys
from harness.cli import main
code = main(["detect", *sys.argv[2:]])
with open(sys.argv[1], "w") as f:
    json.dump(sorted(sys.modules), f)
sys.exit(code)
"""


def test_detecting_an_unquantized_file_imports_no_engine_and_prints_only_its_finding(tmp_path):
    """`detect` of a plain safetensors file is recognised by the baseline's reader before any engine's: no engine
    package is imported (nothing is written to the import log), and the terminal shows only the finding."""
    import os

    from harness.engines.catalog import CATALOG

    packages = sorted(e.import_name or e.package for e in CATALOG.values() if e.package)
    assert {"bitsandbytes", "optimum.quanto", "gguf", "nncf", "sdnq", "torchao"} <= set(packages)
    path = ENGINES["none"].save(build_model("dit-xs"), "-", tmp_path / "model.safetensors")
    log, modules = tmp_path / "imports.log", tmp_path / "modules.json"
    proc = subprocess.run([sys.executable, "-c", DETECT_PROBE, str(modules), str(path)], capture_output=True,
                          text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "QUANTMATRIX_IMPORT_LOG": str(log), "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{path}: engine=none qtype=-"
    assert proc.stderr == ""
    imported = json.loads(modules.read_text())
    assert "harness.cli" in imported and "safetensors" in imported  # the probe saw the detection's modules
    assert [m for m in imported if any(m == p or m.startswith(p + ".") for p in packages)] == []
    assert not log.exists() or log.read_text() == ""


def test_detect_reads_the_contents_and_reports_a_name_that_disagrees(tmp_path, capsys):
    path = ENGINES["none"].save(build_model("dit-xs"), "-", tmp_path / "misleading-nf4.safetensors")
    assert main(["detect", str(path)]) == 1
    out = capsys.readouterr().out
    assert "engine=none qtype=-" in out and "name disagrees" in out and "suggests bnb nf4" in out


def test_detect_confirms_conventional_names_that_agree(tmp_path, capsys):
    import torch

    model = build_model("dit-xs")
    nf4 = ENGINES["bnb"].save(ENGINES["bnb"].quantize(build_model("dit-xs"), "nf4", dtype=torch.float32,
                                                      device=torch.device("cpu")),
                              "nf4", tmp_path / "flux-nf4.safetensors")
    qint = ENGINES["quanto"].save(ENGINES["quanto"].quantize(model, "qint8", dtype=torch.float32,
                                                             device=torch.device("cpu")), "qint8",
                                  tmp_path / "flux-qint.safetensors")
    assert main(["detect", str(nf4), str(qint)]) == 0
    out = capsys.readouterr().out
    assert out.count("name agrees") == 2 and "engine=bnb qtype=nf4" in out and "engine=quanto qtype=qint8" in out


def test_detect_rejects_truncated_and_garbage_files(tmp_path, capsys):
    good = ENGINES["none"].save(build_model("dit-xs"), "-", tmp_path / "m.safetensors")
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(good.read_bytes()[:5000])
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    for path, words in [(truncated, "truncated"), (garbage, "past the end")]:
        assert main(["detect", str(path)]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and words in err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "quantmatrix"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "validate" in out.stdout


def test_a_closed_pipe_ends_the_listing_quietly():
    """`quantmatrix list matrices/sdnext.toml | head -3`: exit 0, no BrokenPipeError traceback."""
    proc = subprocess.run(f"{sys.executable} -m harness.cli list matrices/sdnext.toml | head -3; "
                          "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stdout.splitlines()) == 3


def test_a_closed_pipe_ends_the_doc_patch_quietly():
    """`report --doc-patch | head -60`: the patch fits the pipe's buffer, so the reader goes away while Python still
    holds unflushed output; that too ends with exit 0 and no traceback."""
    proc = subprocess.run(f"{sys.executable} -m harness.cli report results/reference/cpu-default.jsonl.gz --doc-patch"
                          " | head -60; exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "Exception" not in proc.stderr, \
        proc.stderr[-2000:]
    assert len(proc.stdout.splitlines()) == 60
