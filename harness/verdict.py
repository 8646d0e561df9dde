"""What happened in a cell (Outcome), and the verdict of it against the documented expectation."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

from harness.engines.catalog import Floor
from harness.matrix import FACTOR_CLAIMS, Expectation, ExpectKind, parse_claim


class Verdict(enum.StrEnum):
    OK = "ok"
    DOCUMENTED_ERROR = "documented-error"
    DRIFT_WORKS = "drift-works"
    DRIFT_ERROR = "drift-error"
    DRIFT_CLAIM = "drift-claim"  # worked, but a documented claim about its measurements does not hold
    FAIL = "fail"
    WRONG_OUTPUT = "wrong-output"  # ran, but its output is below its type's floor: not the model's output
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
    def broken(self) -> bool:
        """It should have worked (or failed as documented) and did neither: an error, or its process died."""
        return self in (Verdict.FAIL, Verdict.WRONG_OUTPUT, Verdict.CRASH, Verdict.TIMEOUT, Verdict.HANG, Verdict.OOM)

    @property
    def ran(self) -> bool:
        """The cell ran to the end and was measured (a wrong output too: its figures say how wrong)."""
        return self in (Verdict.OK, Verdict.DRIFT_WORKS, Verdict.DRIFT_CLAIM, Verdict.WRONG_OUTPUT)


class Status(enum.StrEnum):
    """What a cell's process reported, or what the runner saw of it."""

    RAN = "ran"  # ran to the end and was measured
    ERROR = "error"  # an engine, accelerate or torch raised
    OOM = "oom"
    UNAVAILABLE = "unavailable"  # the harness's own knowledge (see Absence)
    CRASH = "crash"
    TIMEOUT = "timeout"
    HANG = "hang"
    INTERRUPTED = "interrupted"


class ClaimStatus(enum.StrEnum):
    HELD = "held"
    CONTRADICTED = "contradicted"
    INCONCLUSIVE = "inconclusive"
    UNCHECKED = "unchecked"  # nothing to compare with (no baseline in the run, no figure measured)


class Absence(enum.StrEnum):
    """Why the harness declared a cell unavailable: the only three sources of an `unavailable` verdict. An
    exception raised by an engine, diffusers or accelerate is never one of them."""

    DEVICE = "device-absent"  # this host lacks the device
    PACKAGE = "package-missing"  # the engine's package, or a package it needs for this type, is not installed
    NOT_OFFERED = "not-offered"  # the engine does not offer this operation or load mode (engines.NotOffered)


class Stage(enum.StrEnum):
    """Where in a cell an error happened."""

    PREPARE = "prepare"  # inputs, reference output, the float checkpoint or pre-quantized file
    LOAD = "load"  # loading the model, quantizing it (after, while, or before: the file) included
    LORA = "lora"  # loading the LoRA onto the quantized model (fusing, merging)
    OFFLOAD = "offload"  # installing the offload hooks
    COMPILE = "compile"  # torch.compile and the first compiled call (dynamo's tracing, inductor's build)
    FORWARD = "forward"  # the steps
    PROCESS = "process"  # the cell's process itself (killed at the timeout, refused by the cell server)


@dataclass
class ErrorInfo:
    type: str
    message: str
    where: str = ""
    stage: str = ""  # a Stage; "" for errors recorded before stages existed
    origin: str = ""  # the module of the innermost frame (where it was raised)
    layer: str = ""  # the package of the stack that raised it: diffusers.quantizers.gguf, accelerate.hooks, ...

    @property
    def text(self) -> str:
        return f"{self.type}: {self.message}"


@dataclass
class Outcome:
    """What a cell's process reported, or what the runner saw of it."""

    status: Status
    metrics: dict[str, Any] = field(default_factory=dict)
    error: ErrorInfo | None = None
    reason: str | None = None
    device: dict[str, Any] = field(default_factory=dict)  # device_name, driver, ...
    output_tail: str | None = None
    absence: Absence | None = None  # set with status "unavailable", and only then
    process: dict[str, Any] = field(default_factory=dict)  # what the runner saw of a killed process (timeout)
    warnings: list[str] = field(default_factory=list)  # distinct warnings raised while it ran (deprecations...)

    def __post_init__(self) -> None:
        self.status = Status(self.status)

    @classmethod
    def unavailable(cls, absence: Absence, reason: str) -> Outcome:
        return cls(Status.UNAVAILABLE, reason=reason, absence=absence)

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "metrics": self.metrics, "reason": self.reason, "device": self.device,
                "output_tail": self.output_tail, "absence": self.absence and self.absence.value,
                "process": self.process, "warnings": self.warnings,
                "error": None if self.error is None else vars(self.error).copy()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Outcome:
        error = data.get("error")
        absence = data.get("absence")
        return cls(Status(data["status"]), data.get("metrics") or {}, ErrorInfo(**error) if error else None,
                   data.get("reason"), data.get("device") or {}, data.get("output_tail"),
                   Absence(absence) if absence else None, data.get("process") or {}, data.get("warnings") or [])


@dataclass
class ClaimResult:
    """One claim of a rule checked against the cell's baseline."""

    claim: str
    status: ClaimStatus
    ratio: float | None = None  # cell / baseline
    detail: str = ""

    def __post_init__(self) -> None:
        self.status = ClaimStatus(self.status)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None and v != ""}


def _latency(metrics: dict[str, Any]) -> float | None:
    return (metrics.get("latency_ms") or {}).get("median")


def _own_memory(metrics: dict[str, Any]) -> float | None:
    """The generation's peak above the cell's start (records before 2026-12: the cell's one peak)."""
    peak, base = metrics.get("run_peak_mem_bytes", metrics.get("peak_mem_bytes")), metrics.get("mem_base_bytes")
    return None if peak is None else peak - (base or 0)


# The least share of the float model's peak its weights must hold for a memory figure to speak of the format:
# measured on the committed records, the CPU toy models' weights are 9-36% of their peak, dit-mem's 92% on a CPU,
# dit-s's 52% and dit-l's 97% on the H200
WEIGHTS_DOMINATE = 0.5


def memory_not_the_format(baseline: dict[str, Any]) -> str | None:
    """Why a peak memory ratio to this float model cannot speak for the format, or None: its weights are under
    WEIGHTS_DOMINATE of its peak (activations, the allocator's and the process's own memory dominate)."""
    own, weights = _own_memory(baseline), baseline.get("param_bytes")
    if not own or not weights or weights / own >= WEIGHTS_DOMINATE:
        return None
    return (f"the float model's weights are {weights / own:.0%} of its peak memory: at this scale a peak is "
            "activations and the process, not the format (needs a model whose weights dominate)")


# claim -> (what is compared, how to read it, which side of 1 the claim says the ratio lies: -1 below, +1 above,
# 0 "not above")
_RATIO_CLAIMS = {
    "smaller": ("stored bytes", lambda m: m.get("param_bytes"), -1),
    "less-memory": ("peak memory", _own_memory, -1),
    "slower": ("median latency", _latency, +1),
    "faster": ("median latency", _latency, -1),
    "not-slower": ("median latency", _latency, 0),
}


LATENCY_CLAIMS = ("slower", "faster", "not-slower")


def paired_latency(metrics: dict[str, Any]) -> tuple[dict | None, str]:
    """The cell's paired latency ratio to the float model (metrics.latency_vs_float), or None and why there is
    none. Latency claims are judged on it only: a ratio to a baseline timed at another moment is the machine's
    load as much as the engine's."""
    paired = metrics.get("latency_vs_float")
    if isinstance(paired, dict) and "ratio" in paired:
        return paired, ""
    why = paired.get("unpaired") if isinstance(paired, dict) else None
    return None, f"no paired latency against the float model ({why or 'not measured: a record from before pairing'})"


def _interval_status(lo: float, hi: float, side: int, tol: float) -> ClaimStatus:
    """A latency claim against the paired interval: held when the whole interval lies beyond the tolerance on the
    claimed side of 1, contradicted when it lies beyond it on the other side, inconclusive when it overlaps."""
    if side == 0:  # not above 1 + tolerance
        return ClaimStatus.HELD if hi <= 1 + tol else ClaimStatus.CONTRADICTED if lo > 1 + tol \
            else ClaimStatus.INCONCLUSIVE
    near, far = (lo, hi) if side > 0 else (1 / hi, 1 / lo)  # how many times slower, or faster
    if near > 1 + tol:
        return ClaimStatus.HELD
    if far < 1 - tol:
        return ClaimStatus.CONTRADICTED
    return ClaimStatus.INCONCLUSIVE


def _paired_claim(claim: str, side: int, tol: float, metrics: dict[str, Any]) -> ClaimResult:
    paired, why = paired_latency(metrics)
    if paired is None:
        return ClaimResult(claim, ClaimStatus.UNCHECKED, detail=why)
    status = _interval_status(paired["lo"], paired["hi"], side, tol)
    return ClaimResult(claim, status, paired["ratio"], f"median latency {paired['ratio']:.3g}x the float model's "
                                                       f"(paired, 90% interval {paired['lo']:.3g}-"
                                                       f"{paired['hi']:.3g}, n={int(paired['n'])})")


def check_claims(expect: Expectation, metrics: dict[str, Any], baseline: dict[str, Any] | None) -> list[ClaimResult]:
    """Each claim of `expect` against the baseline's metrics (None: the baseline did not run in this run).

    A ratio claim holds when the ratio lies beyond the tolerance on the claimed side of 1, is contradicted beyond
    it on the other side, and is inconclusive in between ("not-slower" has no middle when exact: above 1 +
    tolerance contradicts it). Latency claims read the cell's paired ratio to the float model and its interval
    (paired_latency), never the baseline cell's own timing."""
    results = []
    tol = expect.tolerance
    for claim in expect.claims:
        name, factor = parse_claim(claim) or (claim, None)
        if factor is not None:
            results.append(_factor_claim(claim, FACTOR_CLAIMS[name], factor, tol, metrics, baseline))
            continue
        if claim == "name-matches-contents":
            hint = metrics.get("name_hint")
            status = {"agrees": ClaimStatus.HELD, "disagrees": ClaimStatus.CONTRADICTED}.get(hint,
                                                                                       ClaimStatus.UNCHECKED)
            results.append(ClaimResult(claim, status, detail=metrics.get("name_hint_detail") or
                                       "no pre-quantized file was read"))
            continue
        what, read, side = _RATIO_CLAIMS[claim]
        if claim in LATENCY_CLAIMS:
            results.append(_paired_claim(claim, side, tol, metrics))
            continue
        if baseline is None:
            results.append(ClaimResult(claim, ClaimStatus.UNCHECKED,
                                       detail="the baseline cell did not run in this run"))
            continue
        if claim == "less-memory" and memory_not_the_format(baseline):
            results.append(ClaimResult(claim, ClaimStatus.UNCHECKED, detail=memory_not_the_format(baseline)))
            continue
        value, base = read(metrics), read(baseline)
        if value is None or not base:
            results.append(ClaimResult(claim, ClaimStatus.UNCHECKED, detail=f"no {what} measured"))
            continue
        ratio = value / base
        if side == 0:
            status = ClaimStatus.HELD if ratio <= 1 + tol else ClaimStatus.CONTRADICTED
        elif (ratio - 1) * side > tol:
            status = ClaimStatus.HELD
        elif (ratio - 1) * side < -tol:
            status = ClaimStatus.CONTRADICTED
        else:
            status = ClaimStatus.INCONCLUSIVE
        results.append(ClaimResult(claim, status, ratio, f"{what} {ratio:.3g}x the baseline's"))
    return results


def _factor_claim(claim: str, kind: str, factor: float, tol: float, metrics: dict[str, Any],
                  baseline: dict[str, Any] | None) -> ClaimResult:
    """A published factor ("smaller-by:3.0"): held when the measured factor is at least `factor` less the
    tolerance, contradicted otherwise; for latency, on the paired interval (held when all of it reaches the
    factor, contradicted when none of it does, inconclusive between)."""
    what, read, side = _RATIO_CLAIMS[kind]
    if kind in LATENCY_CLAIMS:
        paired, why = paired_latency(metrics)
        if paired is None:
            return ClaimResult(claim, ClaimStatus.UNCHECKED, detail=why)
        bound = factor * (1 - tol)
        status = ClaimStatus.HELD if paired["lo"] >= bound else ClaimStatus.CONTRADICTED if paired["hi"] < bound \
            else ClaimStatus.INCONCLUSIVE
        return ClaimResult(claim, status, paired["ratio"],
                           f"median latency {paired['ratio']:.3g}x the float model's (paired, 90% interval "
                           f"{paired['lo']:.3g}-{paired['hi']:.3g}; claimed {factor:g}x slower)")
    if baseline is None:
        return ClaimResult(claim, ClaimStatus.UNCHECKED, detail="the baseline cell did not run in this run")
    if kind == "less-memory" and memory_not_the_format(baseline):
        return ClaimResult(claim, ClaimStatus.UNCHECKED, detail=memory_not_the_format(baseline))
    value, base = read(metrics), read(baseline)
    if not value or not base:
        return ClaimResult(claim, ClaimStatus.UNCHECKED, detail=f"no {what} measured")
    ratio = value / base
    measured = ratio if side > 0 else 1 / ratio  # how many times slower, or smaller
    status = ClaimStatus.HELD if measured >= factor * (1 - tol) else ClaimStatus.CONTRADICTED
    word = "slower" if side > 0 else "smaller"
    return ClaimResult(claim, status, ratio, f"{what} {ratio:.3g}x the baseline's ({measured:.2f}x {word}; "
                                             f"claimed {factor:g}x)")


_PROCESS_VERDICTS = {Status.CRASH: Verdict.CRASH, Status.TIMEOUT: Verdict.TIMEOUT, Status.HANG: Verdict.HANG,
                     Status.OOM: Verdict.OOM, Status.INTERRUPTED: Verdict.INTERRUPTED}


def below_floor(metrics: dict[str, Any], floor: Floor | None) -> str | None:
    """What of the output falls below the type's floor, or None (no floor, or above it; a figure of None is a
    bit-identical output: infinitely far above)."""
    if floor is None:
        return None
    below = []
    for key, bound, what in (("sqnr_db", floor.sqnr_db, "SQNR"), ("psnr_db", floor.psnr_db, "image PSNR")):
        value = metrics.get(key)
        if bound is not None and value is not None and value < bound:
            below.append(f"{what} {value:.1f} dB < floor {bound:g} dB")
    return "; ".join(below) or None


def judge(expect: Expectation, outcome: Outcome, claims: list[ClaimResult] = (),
          floor: Floor | None = None) -> tuple[Verdict, str]:
    """The verdict and a one-line explanation. `claims`: the expectation's claims, checked (see check_claims);
    `floor`: the output error bound of the cell's type (engines.catalog), below which a cell that worked is
    `wrong-output`."""
    if outcome.status is Status.UNAVAILABLE:
        return Verdict.UNAVAILABLE, outcome.reason or "unavailable"
    if outcome.status in _PROCESS_VERDICTS:
        return _PROCESS_VERDICTS[outcome.status], outcome.reason or outcome.status
    error = outcome.error
    source = f" [{expect.source}]" if expect.source else ""
    wrong = below_floor(outcome.metrics, floor) if outcome.status is Status.RAN else None
    if wrong:  # whatever was documented: it did not work, and it did not fail either
        return Verdict.WRONG_OUTPUT, f"ran, but its output is not the model's: {wrong} (the type's floor: {floor.why})"
    if expect.kind is ExpectKind.WORKS:
        if outcome.status is Status.RAN:
            broken = [c for c in claims if c.status is ClaimStatus.CONTRADICTED]
            if broken:
                return Verdict.DRIFT_CLAIM, ("worked, but documented claims do not hold: "
                                             + "; ".join(f"{c.claim}: {c.detail}" for c in broken) + source)
            held = [c.claim for c in claims if c.status is ClaimStatus.HELD]
            return Verdict.OK, "worked as expected" + (f"; claims held: {', '.join(held)}" if held else "")
        return Verdict.FAIL, f"expected to work, raised {error.text if error else outcome.status}"
    if expect.kind is ExpectKind.UNAVAILABLE:
        # Only the harness declares a cell unavailable (status "unavailable", handled above): an exception from the
        # engine, diffusers or accelerate where a rule documents "unavailable" is a finding, not a skip.
        if outcome.status is Status.RAN:
            return Verdict.DRIFT_WORKS, f"documented as unavailable ({expect.reason}){source}, but it worked"
        return Verdict.DRIFT_ERROR, (f"documented as unavailable ({expect.reason}){source}, but it ran and raised "
                                     f"{error.text if error else outcome.status}")
    # expect.kind is ExpectKind.ERROR
    if outcome.status is Status.RAN:
        return Verdict.DRIFT_WORKS, f"documented to fail with /{expect.pattern}/{source}, but it worked"
    actual = error.text if error else outcome.status
    if expect.pattern and re.search(expect.pattern, actual):
        return Verdict.DOCUMENTED_ERROR, f"failed as documented{source}"
    return Verdict.DRIFT_ERROR, f"documented /{expect.pattern}/{source}, but raised {actual}"
