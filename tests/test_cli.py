"""The command line: clear errors with exit status 2, listing, validating and detecting files."""

import subprocess
import sys
from pathlib import Path

from harness.cli import main
from harness.engines import ENGINES
from harness.models import build_model

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
    assert main(["list", "--matrix", str(REPO / "matrices" / "smoke.toml")]) == 0
    assert "none/post-load/sequential/cpu/dit-xs/float32" in capsys.readouterr().out


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
