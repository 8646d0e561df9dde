"""matrices/sdnext.toml holds every statement of the seed (SD.Next's wiki page "Quantization") as a rule.

The statements are listed here, as the issue that asked for them lists them (the seed itself is not part of the
checkout): each must be decided by a rule that says it (expectation, pattern or claims) and cites its section.
"""

from pathlib import Path

import pytest

from harness.cell import AXES, Cell
from harness.matrix import load_matrix

ROOT = Path(__file__).resolve().parents[1]
MATRIX = load_matrix(ROOT / "matrices" / "sdnext.toml", present_devices=("cpu",))


def rule_for(cell_id: str, versions: dict | None = None):
    cell = Cell.from_id(cell_id)
    assert cell in MATRIX.cells or cell.engine == "none", f"{cell_id} is not a cell of sdnext.toml"
    env = {"torch": "2.13.0", "triton": "3.6.0", "cuda_capability": "9.0", **(versions or {})}
    for rule in MATRIX.rules:
        if rule.matches(cell) and rule.holds_for(env):
            return rule.expect
    pytest.fail(f"no rule decides {cell_id}")


# (statement, a cell it is about, versions, expected kind, text the pattern/reason must hold, claims, cited section)
STATEMENTS = [
    ("bnb nf4 is not compatible with sequential offload", "bnb-nf4/post-load/sequential/cuda/dit-xs/float32", {},
     "error", "Blockwise quantization only supports 16/32-bit floats", (), "Errors"),
    ("quanto qint is not compatible with balanced offload", "quanto-qint8/post-load/balanced/cuda/dit-xs/float32",
     {}, "error", "QBytesTensor.__new__\\(\\) missing 5 required positional arguments", (), "Errors"),
    ("quanto qint is not compatible with sequential offload", "quanto-qint4/post-load/sequential/cpu/dit-xs/float32",
     {}, "error", "Expected all tensors to be on the same device", (), "Errors"),
    ("GGUF is not compatible with model offload", "gguf-Q4_0/post-load/model/cuda/dit-xs/float32", {}, "error", None,
     (), "GGUF"),
    ("GGUF is storage-only: smaller and slower", "gguf-Q8_0/post-load/none/cuda/dit-xs/float32", {}, "works", None,
     ("smaller", "slower"), "GGUF"),
    ("storage-only NNCF: smaller and slower, any platform", "nncf-int8_sym/post-load/none/cpu/dit-xs/float32", {},
     "works", None, ("smaller", "slower"), "NNCF"),
    ("Quanto qint8/qint4 highly efficient (compute-optimized)", "quanto-qint8/post-load/none/cuda/dit-xs/float32",
     {}, "works", None, ("smaller", "not-slower"), "Optimum-Quanto"),
    ("BnB compute-optimized", "bnb-nf4/post-load/none/cuda/dit-xs/float32", {}, "works", None,
     ("smaller", "not-slower"), "bnb compute-optimized"),
    ("BnB relies on triton; without it performance is reduced", "bnb-nf4/post-load/none/cuda/dit-xs/float32",
     {"triton": None}, "works", None, ("smaller", "slower"), "triton"),
    ("only BnB quantizes on the fly", "quanto-qint8/on-the-fly/none/cpu/dit-xs/float32", {}, "unavailable",
     "only BnB quantizes on the fly", (), "BitsAndBytes note"),
    ("only BnB allows balanced offload", "gguf-Q8_0/post-load/balanced/cpu/dit-xs/float32", {}, "unavailable",
     "only BnB allows balanced offload", (), "BitsAndBytes note"),
    ("post-load quantization for all types", "quanto-qint2/post-load/none/cpu/dit-xs/float32", {}, "works", None,
     (), "Using Quantized Models"),
    ("pre-quantized: type detected at load; conventional file names", "bnb-nf4/prequantized/none/cuda/dit-xs/float32",
     {}, "works", None, ("name-matches-contents",), "conventional names"),
    ("quanto *qint.safetensors", "quanto-qint8/prequantized/none/cpu/dit-xs/float32", {}, "works", None,
     ("name-matches-contents",), "conventional names"),
    ("GGUF .gguf files", "gguf-Q4_0/prequantized/none/cpu/dit-xs/float32", {}, "works", None,
     ("name-matches-contents", "smaller", "slower"), "conventional names"),
    ("all-in-one single-file GGUF cannot be loaded", "gguf-Q8_0/prequantized/none/cpu/pipe-xs/float32", {}, "error",
     "all-in-one GGUF", (), "all-in-one"),
    ("default bitsandbytes supports only NVIDIA GPUs", "bnb-int8/post-load/none/cpu/dit-xs/float32", {},
     "unavailable", "only NVIDIA GPUs", (), "BitsAndBytes limitations"),
    ("some BnB types need Turing or newer", "bnb-nf4/post-load/none/cuda/dit-xs/float32", {"cuda_capability": "7.0"},
     "unavailable", "Turing", (), "BitsAndBytes limitations"),
    ("Quanto needs torch 2.4", "quanto-qint8/post-load/none/cpu/dit-xs/float32", {"torch": "2.3.1"}, "unavailable",
     "torch 2.4", (), "Optimum-Quanto"),
    ("Quanto not supported on Intel IPEX", "quanto-qint8/post-load/none/xpu/dit-xs/float32", {}, "unavailable",
     "IPEX", (), "Optimum-Quanto"),
    ("Quanto not supported with ZLUDA", "quanto-qint8/post-load/none/cuda/dit-xs/float32",
     {"cuda_capability": "8.8"}, "unavailable", "ZLUDA", (), "Optimum-Quanto"),
]


@pytest.mark.parametrize("statement, cell_id, versions, kind, text, claims, section", STATEMENTS,
                         ids=[s[0] for s in STATEMENTS])
def test_statement_is_a_rule_citing_the_seed(statement, cell_id, versions, kind, text, claims, section):
    expect = rule_for(cell_id, versions)
    assert expect.kind == kind
    if text:
        assert text in (expect.pattern or expect.reason or "")
    assert set(claims) <= set(expect.claims)
    cited = expect.source or expect.reason or ""
    assert cited.startswith("seed:") and section in cited, cited


def test_every_rule_cites_the_seed_and_is_reached_by_a_statement():
    reached = {rule_for(cell_id, versions).rule for _, cell_id, versions, *_ in STATEMENTS}
    for i, rule in enumerate(MATRIX.rules):
        assert (rule.expect.source or rule.expect.reason or "").startswith("seed:"), f"rule {i} cites nothing"
        assert i in reached, f"rule {i} ({rule.expect.source or rule.expect.reason}) has no statement in this test"


def test_every_rule_quotes_its_statement_in_a_section_of_the_page_for_the_wiki_patch():
    assert MATRIX.document is not None and MATRIX.document.title == "Quantization"
    for i, rule in enumerate(MATRIX.rules):
        assert rule.expect.statement and rule.expect.section in MATRIX.document.sections, f"rule {i}"


def test_gguf_with_model_offload_documents_no_message_so_any_error_holds_it_and_working_is_drift():
    from harness.verdict import ErrorInfo, Outcome, Verdict, judge

    expect = rule_for("gguf-Q4_0/post-load/model/cuda/dit-xs/float32", {})
    for error in (ErrorInfo("RuntimeError", "dequantized on the device"), ErrorInfo("ValueError", "")):
        assert judge(expect, Outcome("error", error=error))[0] is Verdict.DOCUMENTED_ERROR
    assert judge(expect, Outcome("ran", metrics={}))[0] is Verdict.DRIFT_WORKS


def test_sdnext_today_runs_sdnqs_types_as_sdnext_lists_them_in_its_compute_dtype(capsys):
    """matrices/sdnext-today.toml: SD.Next's 18 SDNQ weight types (not int4, the package's own), a weight x matmul
    override, pre-quantized models in every offload mode, fp32 on a CPU and bf16 on a GPU (SD.Next's dtypes)."""
    from harness.cli import main
    from harness.engines.sdnq import SDNEXT_WEIGHTS

    today = load_matrix(ROOT / "matrices" / "sdnext-today.toml", present_devices=("cpu", "cuda"))
    types = {c.qtype for c in today.cells if c.engine == "sdnq"}
    assert set(SDNEXT_WEIGHTS) <= types and "int4" not in types and "uint4-matmul-fp8" in types
    assert {c.dtype for c in today.cells if c.device == "cpu"} == {"float32"}
    assert {c.dtype for c in today.cells if c.device == "cuda"} == {"bfloat16"}
    assert {c.offload for c in today.cells if c.engine == "sdnq" and c.load == "prequantized"} == set(
        AXES["offload"].known())
    assert main(["list", "--all-devices", str(ROOT / "matrices" / "sdnext-today.toml")]) == 0
    listed = capsys.readouterr().out.split()
    for qtype in ("uint8", "uint3", "uint2", "float4_e2m1fn", "float2_e1m0fn", "uint4-matmul-fp8"):
        assert f"sdnq-{qtype}/post-load/none/cpu/flux-tiny-pipe/float32/diffusers" in listed
    assert "sdnq-int8/prequantized/sequential/cpu/flux-tiny-pipe/float32/diffusers" in listed
    assert not [c for c in listed if "/cpu/" in c and "/bfloat16/" in c]
