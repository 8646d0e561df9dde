"""What happened in a cell (Outcome), and the verdict of it against the documented expectation."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

from harness.matrix import Expectation


class Verdict(enum.StrEnum):
    OK = "ok"
    DOCUMENTED_ERROR = "documented-error"
    DRIFT_WORKS = "drift-works"
    DRIFT_ERROR = "drift-error"
    DRIFT_CLAIM = "drift-claim"  # worked, but a documented claim about its measurements does not hold
    FAIL = "fail"
    CRASH = "crash"
    TIMEOUT = "timeout"  # still computing at the cell timeout: a slow cell
    HANG = "hang"  # asleep at the cell timeout, no CPU progress: a deadlock
    OOM = "oom"
    INTERRUPTED = "interrupted"
    UNAVAILABLE = "unavailable"

    @property
    def passed(self) -> bool:
        return self in (Verdict.OK, Verdict.DOCUMENTED_ERROR)

    @property
    def is_drift(self) -> bool:
        return self in (Verdict.DRIFT_WORKS, Verdict.DRIFT_ERROR, Verdict.DRIFT_CLAIM)

    @property
    def ran(self) -> bool:
        """The cell ran to the end and was measured."""
        return self in (Verdict.OK, Verdict.DRIFT_WORKS, Verdict.DRIFT_CLAIM)


class Absence(enum.StrEnum):
    """Why the harness declared a cell unavailable: the only three sources of an `unavailable` verdict. An
    exception raised by an engine, diffusers or accelerate is never one of them."""

    DEVICE = "device-absent"  # this host lacks the device
    PACKAGE = "package-missing"  # the engine's package, or a package it needs for this type, is not installed
    NOT_OFFERED = "not-offered"  # the engine does not offer this operation or load mode (engines.NotOffered)


@dataclass
class ErrorInfo:
    type: str
    message: str
    where: str = ""
    stage: str = ""  # "prepare" | "load" | "quantize" | "offload" | "forward" | "process"

    @property
    def text(self) -> str:
        return f"{self.type}: {self.message}"


@dataclass
class Outcome:
    """What a cell's process reported, or what the runner saw of it."""

    status: str  # "ran" | "error" | "oom" | "unavailable" | "crash" | "timeout" | "hang" | "interrupted"
    metrics: dict[str, Any] = field(default_factory=dict)
    error: ErrorInfo | None = None
    reason: str | None = None
    device: dict[str, Any] = field(default_factory=dict)  # device_name, driver, ...
    output_tail: str | None = None
    absence: Absence | None = None  # set with status "unavailable", and only then
    process: dict[str, Any] = field(default_factory=dict)  # what the runner saw of a killed process (timeout)

    @classmethod
    def unavailable(cls, absence: Absence, reason: str) -> Outcome:
        return cls("unavailable", reason=reason, absence=absence)

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "metrics": self.metrics, "reason": self.reason, "device": self.device,
                "output_tail": self.output_tail, "absence": self.absence and self.absence.value,
                "process": self.process, "error": None if self.error is None else vars(self.error).copy()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Outcome:
        error = data.get("error")
        absence = data.get("absence")
        return cls(data["status"], data.get("metrics") or {}, ErrorInfo(**error) if error else None,
                   data.get("reason"), data.get("device") or {}, data.get("output_tail"),
                   Absence(absence) if absence else None, data.get("process") or {})


@dataclass
class ClaimResult:
    """One claim of a rule checked against the cell's baseline."""

    claim: str
    status: str  # "held" | "contradicted" | "inconclusive" | "unchecked"
    ratio: float | None = None  # cell / baseline
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None and v != ""}


def _latency(metrics: dict[str, Any]) -> float | None:
    return (metrics.get("latency_ms") or {}).get("median")


def _own_memory(metrics: dict[str, Any]) -> float | None:
    peak, base = metrics.get("peak_mem_bytes"), metrics.get("mem_base_bytes")
    return None if peak is None else peak - (base or 0)


# claim -> (what is compared, how to read it, which side of 1 the claim says the ratio lies: -1 below, +1 above,
# 0 "not above")
_RATIO_CLAIMS = {
    "smaller": ("stored bytes", lambda m: m.get("param_bytes"), -1),
    "less-memory": ("peak memory", _own_memory, -1),
    "slower": ("median latency", _latency, +1),
    "faster": ("median latency", _latency, -1),
    "not-slower": ("median latency", _latency, 0),
}


def check_claims(expect: Expectation, metrics: dict[str, Any], baseline: dict[str, Any] | None) -> list[ClaimResult]:
    """Each claim of `expect` against the baseline's metrics (None: the baseline did not run in this run).

    A ratio claim holds when the ratio lies beyond the tolerance on the claimed side of 1, is contradicted beyond
    it on the other side, and is inconclusive in between ("not-slower" has no middle: above 1 + tolerance
    contradicts it)."""
    results = []
    tol = expect.tolerance
    for claim in expect.claims:
        if claim == "name-matches-contents":
            hint = metrics.get("name_hint")
            status = {"agrees": "held", "disagrees": "contradicted"}.get(hint, "unchecked")
            results.append(ClaimResult(claim, status, detail=metrics.get("name_hint_detail") or
                                       "no pre-quantized file was read"))
            continue
        what, read, side = _RATIO_CLAIMS[claim]
        if baseline is None:
            results.append(ClaimResult(claim, "unchecked", detail="the baseline cell did not run in this run"))
            continue
        value, base = read(metrics), read(baseline)
        if value is None or not base:
            results.append(ClaimResult(claim, "unchecked", detail=f"no {what} measured"))
            continue
        ratio = value / base
        if side == 0:
            status = "held" if ratio <= 1 + tol else "contradicted"
        elif (ratio - 1) * side > tol:
            status = "held"
        elif (ratio - 1) * side < -tol:
            status = "contradicted"
        else:
            status = "inconclusive"
        results.append(ClaimResult(claim, status, ratio, f"{what} {ratio:.3g}x the baseline's"))
    return results


_PROCESS_VERDICTS = {"crash": Verdict.CRASH, "timeout": Verdict.TIMEOUT, "hang": Verdict.HANG, "oom": Verdict.OOM,
                     "interrupted": Verdict.INTERRUPTED}


def judge(expect: Expectation, outcome: Outcome, claims: list[ClaimResult] = ()) -> tuple[Verdict, str]:
    """The verdict and a one-line explanation. `claims`: the expectation's claims, checked (see check_claims)."""
    if outcome.status == "unavailable":
        return Verdict.UNAVAILABLE, outcome.reason or "unavailable"
    if outcome.status in _PROCESS_VERDICTS:
        return _PROCESS_VERDICTS[outcome.status], outcome.reason or outcome.status
    error = outcome.error
    source = f" [{expect.source}]" if expect.source else ""
    if expect.kind == "works":
        if outcome.status == "ran":
            broken = [c for c in claims if c.status == "contradicted"]
            if broken:
                return Verdict.DRIFT_CLAIM, ("worked, but documented claims do not hold: "
                                             + "; ".join(f"{c.claim}: {c.detail}" for c in broken) + source)
            held = [c.claim for c in claims if c.status == "held"]
            return Verdict.OK, "worked as expected" + (f"; claims held: {', '.join(held)}" if held else "")
        return Verdict.FAIL, f"expected to work, raised {error.text if error else outcome.status}"
    if expect.kind == "unavailable":
        # Only the harness declares a cell unavailable (status "unavailable", handled above): an exception from the
        # engine, diffusers or accelerate where a rule documents "unavailable" is a finding, not a skip.
        if outcome.status == "ran":
            return Verdict.DRIFT_WORKS, f"documented as unavailable ({expect.reason}){source}, but it worked"
        return Verdict.DRIFT_ERROR, (f"documented as unavailable ({expect.reason}){source}, but it ran and raised "
                                     f"{error.text if error else outcome.status}")
    # expect.kind == "error"
    if outcome.status == "ran":
        return Verdict.DRIFT_WORKS, f"documented to fail with /{expect.pattern}/{source}, but it worked"
    actual = error.text if error else outcome.status
    if expect.pattern and re.search(expect.pattern, actual):
        return Verdict.DOCUMENTED_ERROR, f"failed as documented{source}"
    return Verdict.DRIFT_ERROR, f"documented /{expect.pattern}/{source}, but raised {actual}"
