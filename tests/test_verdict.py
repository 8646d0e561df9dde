"""Judging: expectation x what happened -> verdict (DESIGN.md's table)."""

import pytest

from harness.matrix import Expectation
from harness.verdict import Absence, ErrorInfo, Outcome, Verdict, judge

WORKS = Expectation()
DOCUMENTED = Expectation("error", pattern=r"Blockwise quantization only supports 16/32-bit floats",
                         source="seed: Errors")
PLATFORM = Expectation("unavailable", reason="bitsandbytes needs an NVIDIA GPU")


def raised(type_, message):
    return Outcome("error", error=ErrorInfo(type_, message, "", "forward"))


RAN = Outcome("ran", metrics={"x": 1})
MATCHING = raised("ValueError", "Blockwise quantization only supports 16/32-bit floats, but got torch.uint8")
OTHER = raised("RuntimeError", "Expected all tensors to be on the same device")


@pytest.mark.parametrize("expect, outcome, verdict", [
    (WORKS, RAN, Verdict.OK),
    (WORKS, OTHER, Verdict.FAIL),
    (DOCUMENTED, MATCHING, Verdict.DOCUMENTED_ERROR),
    (DOCUMENTED, RAN, Verdict.DRIFT_WORKS),
    (DOCUMENTED, OTHER, Verdict.DRIFT_ERROR),
    (PLATFORM, OTHER, Verdict.DRIFT_ERROR),  # only the harness declares a cell unavailable, never a raise
    (PLATFORM, RAN, Verdict.DRIFT_WORKS),
    (PLATFORM, Outcome.unavailable(Absence.NOT_OFFERED, "bnb does not offer it"), Verdict.UNAVAILABLE),
    (PLATFORM, Outcome("crash", reason="SIGSEGV"), Verdict.CRASH),
    (WORKS, Outcome("hang", reason="asleep"), Verdict.HANG),
    (WORKS, Outcome("crash", reason="SIGSEGV"), Verdict.CRASH),
    (DOCUMENTED, Outcome("timeout", reason="t"), Verdict.TIMEOUT),
    (WORKS, Outcome("oom", reason="m"), Verdict.OOM),
    (WORKS, Outcome("unavailable", reason="no GPU"), Verdict.UNAVAILABLE),
    (WORKS, Outcome("interrupted", reason="^C"), Verdict.INTERRUPTED),
])
def test_judge(expect, outcome, verdict):
    assert judge(expect, outcome)[0] is verdict


def test_drift_error_note_carries_documented_and_actual_text():
    _, note = judge(DOCUMENTED, OTHER)
    assert "Blockwise quantization" in note and "Expected all tensors to be on the same device" in note
    assert "seed: Errors" in note


def test_a_raise_where_unavailable_is_documented_is_drift_with_both_texts():
    verdict, note = judge(PLATFORM, OTHER)
    assert verdict is Verdict.DRIFT_ERROR
    assert "bitsandbytes needs an NVIDIA GPU" in note and "Expected all tensors to be on the same device" in note


def test_pattern_is_matched_against_type_and_message():
    expect = Expectation("error", pattern=r"^TypeError: .*missing 5 required positional arguments")
    assert judge(expect, raised("TypeError", "QBytesTensor.__new__() missing 5 required positional arguments"))[0] \
        is Verdict.DOCUMENTED_ERROR
    assert judge(expect, raised("ValueError", "missing 5 required positional arguments"))[0] is Verdict.DRIFT_ERROR


def test_only_ok_and_documented_error_pass():
    assert {v for v in Verdict if v.passed} == {Verdict.OK, Verdict.DOCUMENTED_ERROR}


def test_error_of_the_documented_type_with_another_message_is_drift():
    expect = Expectation("error", pattern=r"^TypeError: QBytesTensor.__new__\(\) missing 5 required")
    verdict, note = judge(expect, raised("TypeError", "WeightQBitsTensor.__new__() missing 7 required positional "
                                                      "arguments"))
    assert verdict is Verdict.DRIFT_ERROR
    assert "QBytesTensor" in note and "WeightQBitsTensor" in note  # documented and actual text, both


def test_version_limited_rule_applies_only_inside_its_range():
    from harness.matrix import parse_matrix

    matrix = parse_matrix('''
[axes]
engine = ["none"]
qtype = ["*"]
load = ["post-load"]
offload = ["none"]
device = ["cpu"]
model = ["dit-xs"]
dtype = ["float32"]
[[rule]]
match = { engine = "none" }
expect = "unavailable"
reason = "old torch"
versions = { torch = "<2.4" }
[[rule]]
match = { engine = "none" }
expect = "error"
pattern = "x"
versions = { triton = "absent" }
''')
    cell = matrix.cells[0]
    inside = matrix.expectation(cell, {"torch": "2.3.1", "triton": "3.0"})
    assert inside.kind == "unavailable" and judge(inside, OTHER)[0] is Verdict.DRIFT_ERROR  # raised: a finding
    # Outside the range the rule does not apply: the next one (triton absent) decides, then the default.
    assert matrix.expectation(cell, {"torch": "2.13.0", "triton": None}).kind == "error"
    outside = matrix.expectation(cell, {"torch": "2.13.0", "triton": "3.6.0"})
    assert outside.kind == "works" and judge(outside, RAN)[0] is Verdict.OK
    assert judge(outside, OTHER)[0] is Verdict.FAIL


# ---------------------------------------------------------------------------------------------- claims

from harness.verdict import check_claims  # noqa: E402

BASE = {"param_bytes": 1000, "latency_ms": {"median": 10.0}, "peak_mem_bytes": 500, "mem_base_bytes": 100}


def metrics(bytes_=1000, latency=1.0, peak=500, interval=(0.0, 0.0)):
    """A cell's metrics; `latency`: its paired ratio to the float model, `interval` how far below and above it
    the ratio's interval reaches (fractions of it)."""
    paired = {"ratio": latency, "lo": latency * (1 - interval[0]), "hi": latency * (1 + interval[1]), "n": 10,
              "float_ms": 10.0}
    return {"param_bytes": bytes_, "latency_ms": {"median": 10.0 * latency}, "peak_mem_bytes": peak,
            "mem_base_bytes": 100, "latency_vs_float": paired}


@pytest.mark.parametrize("claim, measured, status", [
    ("smaller", metrics(bytes_=300), "held"),
    ("smaller", metrics(bytes_=1000), "inconclusive"),
    ("smaller", metrics(bytes_=2000), "contradicted"),
    ("slower", metrics(latency=3.0), "held"),
    ("slower", metrics(latency=1.05), "inconclusive"),
    ("slower", metrics(latency=0.5), "contradicted"),
    ("faster", metrics(latency=0.5), "held"),
    ("faster", metrics(latency=3.0), "contradicted"),
    ("not-slower", metrics(latency=1.09), "held"),
    ("not-slower", metrics(latency=0.5), "held"),
    ("not-slower", metrics(latency=1.15), "contradicted"),
    # the paired interval decides: one that overlaps the tolerance is inconclusive, whatever its median says
    ("slower", metrics(latency=1.3, interval=(0.2, 0.2)), "inconclusive"),  # 1.04-1.56
    ("slower", metrics(latency=1.3, interval=(0.1, 0.2)), "held"),  # 1.17-1.56
    ("slower", metrics(latency=0.7, interval=(0.1, 0.5)), "inconclusive"),  # 0.63-1.05
    ("faster", metrics(latency=0.8, interval=(0.1, 0.2)), "inconclusive"),  # 0.72-0.96: not 1.1x faster
    ("faster", metrics(latency=2.0, interval=(0.5, 0.1)), "inconclusive"),  # 1.0-2.2
    ("not-slower", metrics(latency=1.05, interval=(0.1, 0.2)), "inconclusive"),  # 0.95-1.26
    ("less-memory", metrics(peak=300), "held"),  # 200 above its start vs the baseline's 400
    ("less-memory", metrics(peak=900), "contradicted"),
    # published factors (matrices/published.toml): against the baseline's 1000 bytes, 400 bytes of memory
    ("smaller-by:3.0", metrics(bytes_=300), "held"),  # 3.33x smaller
    ("smaller-by:3.0", metrics(bytes_=340), "held"),  # 2.94x: within the tolerance of 10 %
    ("smaller-by:3.0", metrics(bytes_=400), "contradicted"),  # 2.5x
    ("slower-by:1.5", metrics(latency=1.6), "held"),
    ("slower-by:1.5", metrics(latency=1.2), "contradicted"),
    ("slower-by:1.5", metrics(latency=1.5, interval=(0.2, 0.2)), "inconclusive"),  # 1.2-1.8 around 1.35
    ("less-memory-by:2.5", metrics(peak=250), "held"),  # 150 above its start: 2.67x less
    ("less-memory-by:2.5", metrics(peak=400), "contradicted"),  # 300: 1.33x
])
def test_claims_against_the_baseline(claim, measured, status):
    [result] = check_claims(Expectation(claims=(claim,), tolerance=0.1), measured, BASE)
    assert result.status == status, result


@pytest.mark.parametrize("claim", ["slower", "faster", "not-slower", "slower-by:1.5"])
def test_a_latency_claim_without_a_paired_timing_is_unchecked_never_judged_on_two_cells_timed_apart(claim):
    """The baseline cell's own timing is never read: it ran at another moment, under another load."""
    unpaired = {**metrics(latency=5.0), "latency_vs_float": {"unpaired": "the float model does not fit"}}
    [result] = check_claims(Expectation(claims=(claim,)), unpaired, BASE)
    assert result.status == "unchecked" and "the float model does not fit" in result.detail
    old = {k: v for k, v in metrics(latency=5.0).items() if k != "latency_vs_float"}  # a record from before
    [result] = check_claims(Expectation(claims=(claim,)), old, BASE)
    assert result.status == "unchecked" and "before pairing" in result.detail


@pytest.mark.parametrize("claim", ["less-memory", "less-memory-by:2.5"])
def test_a_memory_claim_needs_a_model_whose_weights_dominate_its_peak(claim):
    """A toy model's peak is activations and the process: its memory ratio says nothing of the format."""
    toy = {**BASE, "param_bytes": 40}  # 40 bytes of weights under a 400-byte peak
    [result] = check_claims(Expectation(claims=(claim,)), metrics(peak=150), toy)
    assert result.status == "unchecked" and "weights are 10% of its peak" in result.detail
    [result] = check_claims(Expectation(claims=(claim,)), metrics(peak=150), BASE)
    assert result.status == "held"


def test_claims_without_a_baseline_are_unchecked_and_do_not_drift():
    expect = Expectation(claims=("smaller", "slower"))
    results = check_claims(expect, metrics(), None)
    # latency needs no baseline cell: the cell timed its float model beside it (a ratio of 1: not slower)
    assert [r.status for r in results] == ["unchecked", "inconclusive"]
    assert judge(expect, RAN, results)[0] is Verdict.OK


def test_contradicted_claim_is_drift_with_the_measured_ratio():
    expect = Expectation(claims=("smaller", "slower"), source="seed: GGUF")
    results = check_claims(expect, metrics(bytes_=300, latency=0.4), BASE)
    verdict, note = judge(expect, RAN, results)
    assert verdict is Verdict.DRIFT_CLAIM and verdict.is_drift and not verdict.passed
    assert "slower" in note and "0.4x" in note and "seed: GGUF" in note


def test_name_claim_reads_the_files_name_check():
    expect = Expectation(claims=("name-matches-contents",))
    assert check_claims(expect, {"name_hint": "agrees"}, None)[0].status == "held"
    assert check_claims(expect, {"name_hint": "disagrees"}, None)[0].status == "contradicted"
    assert check_claims(expect, {"name_hint": "no hint"}, None)[0].status == "unchecked"
    assert check_claims(expect, {}, None)[0].status == "unchecked"


def test_an_output_below_its_floor_is_wrong_output_whatever_the_documentation_said():
    from harness.engines.catalog import FLOOR_FP8, output_floor
    from harness.matrix import ExpectKind
    from harness.verdict import Status

    floor = output_floor("sdnq", "int8")
    garbage = Outcome(Status.RAN, metrics={"sqnr_db": -3.0, "psnr_db": 9.0})
    close = Outcome(Status.RAN, metrics={"sqnr_db": 30.0, "psnr_db": 40.0})
    exact = Outcome(Status.RAN, metrics={"sqnr_db": None, "psnr_db": None})  # bit-identical: infinitely above
    for kind in (ExpectKind.WORKS, ExpectKind.ERROR, ExpectKind.UNAVAILABLE):
        expect = Expectation(kind, pattern="x" if kind is ExpectKind.ERROR else None,
                             reason="r" if kind is ExpectKind.UNAVAILABLE else None)
        verdict, note = judge(expect, garbage, floor=floor)
        assert verdict is Verdict.WRONG_OUTPUT and "SQNR -3.0 dB < floor 12 dB" in note and "PSNR 9.0" in note
        assert judge(expect, close, floor=floor)[0] is not Verdict.WRONG_OUTPUT
        assert judge(expect, exact, floor=floor)[0] is not Verdict.WRONG_OUTPUT
    assert judge(Expectation(ExpectKind.WORKS), garbage)[0] is Verdict.OK  # no floor known: not judged by it
    # the float model's only error under fp8 casting is the casting's; a quantized one's adds to it
    assert output_floor("none", "-", "float8_e4m3fn") == FLOOR_FP8
    assert output_floor("sdnq", "int8", "float8_e4m3fn").sqnr_db < min(output_floor("sdnq", "int8").sqnr_db, 10)
