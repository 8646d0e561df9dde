"""Judging: expectation x what happened -> verdict (DESIGN.md's table)."""

import pytest

from harness.matrix import Expectation
from harness.verdict import ErrorInfo, Outcome, Verdict, judge

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
    (PLATFORM, OTHER, Verdict.UNAVAILABLE),
    (PLATFORM, RAN, Verdict.DRIFT_WORKS),
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


def test_pattern_is_matched_against_type_and_message():
    expect = Expectation("error", pattern=r"^TypeError: .*missing 5 required positional arguments")
    assert judge(expect, raised("TypeError", "QBytesTensor.__new__() missing 5 required positional arguments"))[0] \
        is Verdict.DOCUMENTED_ERROR
    assert judge(expect, raised("ValueError", "missing 5 required positional arguments"))[0] is Verdict.DRIFT_ERROR


def test_only_ok_and_documented_error_pass():
    assert {v for v in Verdict if v.passed} == {Verdict.OK, Verdict.DOCUMENTED_ERROR}
