"""What happened in a cell (Outcome), and the verdict of it against the documented expectation."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

from harness.matrix import Expectation


class Verdict(str, enum.Enum):
    OK = "ok"
    DOCUMENTED_ERROR = "documented-error"
    DRIFT_WORKS = "drift-works"
    DRIFT_ERROR = "drift-error"
    FAIL = "fail"
    CRASH = "crash"
    TIMEOUT = "timeout"
    OOM = "oom"
    INTERRUPTED = "interrupted"
    UNAVAILABLE = "unavailable"

    @property
    def passed(self) -> bool:
        return self in (Verdict.OK, Verdict.DOCUMENTED_ERROR)

    @property
    def is_drift(self) -> bool:
        return self in (Verdict.DRIFT_WORKS, Verdict.DRIFT_ERROR)


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

    status: str  # "ran" | "error" | "oom" | "unavailable" | "crash" | "timeout" | "interrupted"
    metrics: dict[str, Any] = field(default_factory=dict)
    error: ErrorInfo | None = None
    reason: str | None = None
    device: dict[str, Any] = field(default_factory=dict)  # device_name, driver, ...
    output_tail: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "metrics": self.metrics, "reason": self.reason, "device": self.device,
                "output_tail": self.output_tail,
                "error": None if self.error is None else vars(self.error).copy()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Outcome:
        error = data.get("error")
        return cls(data["status"], data.get("metrics") or {}, ErrorInfo(**error) if error else None,
                   data.get("reason"), data.get("device") or {}, data.get("output_tail"))


_PROCESS_VERDICTS = {"crash": Verdict.CRASH, "timeout": Verdict.TIMEOUT, "oom": Verdict.OOM,
                     "interrupted": Verdict.INTERRUPTED}


def judge(expect: Expectation, outcome: Outcome) -> tuple[Verdict, str]:
    """The verdict and a one-line explanation."""
    if outcome.status == "unavailable":
        return Verdict.UNAVAILABLE, outcome.reason or "unavailable"
    if outcome.status in _PROCESS_VERDICTS:
        return _PROCESS_VERDICTS[outcome.status], outcome.reason or outcome.status
    error = outcome.error
    if expect.kind == "works":
        if outcome.status == "ran":
            return Verdict.OK, "worked as expected"
        return Verdict.FAIL, f"expected to work, raised {error.text if error else outcome.status}"
    if expect.kind == "unavailable":
        if outcome.status == "ran":
            return Verdict.DRIFT_WORKS, f"documented as unavailable ({expect.reason}), but it worked"
        return Verdict.UNAVAILABLE, f"{expect.reason} (raised {error.text if error else outcome.status})"
    # expect.kind == "error"
    source = f" [{expect.source}]" if expect.source else ""
    if outcome.status == "ran":
        return Verdict.DRIFT_WORKS, f"documented to fail with /{expect.pattern}/{source}, but it worked"
    actual = error.text if error else outcome.status
    if expect.pattern and re.search(expect.pattern, actual):
        return Verdict.DOCUMENTED_ERROR, f"failed as documented{source}"
    return Verdict.DRIFT_ERROR, f"documented /{expect.pattern}/{source}, but raised {actual}"
