"""The result record (one JSON line per cell), the environment it carries, and the results store."""

from __future__ import annotations

import datetime as dt
import fcntl
import functools
import gzip
import json
import logging
import math
import os
import platform
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.cell import Cell, unknown_values
from harness.engines.catalog import CATALOG
from harness.errors import QuantMatrixError
from harness.matrix import VERSIONED, Expectation, ExpectKind
from harness.stacks.catalog import STACK_CATALOG
from harness.verdict import Absence, ClaimResult, Outcome, Stage, Verdict

log = logging.getLogger(__name__)

SCHEMA = 1
METRIC_KEYS = ("param_bytes", "disk_bytes", "bits_per_weight", "peak_mem_bytes", "mem_base_bytes", "mem_kind",
               "latency_ms", "quantize_s", "load_s", "sqnr_db", "cosine", "max_abs_error")


def environment(engine_versions: dict[str, str | None]) -> dict[str, Any]:
    """Host, OS and versions; the device's name and driver are added by the cell that used it."""
    import importlib.metadata

    import torch

    from harness.devices import cpu_name

    # triton: bitsandbytes' and SDNQ's fast paths need it (the seed: "without it, performance is reduced")
    versions = {}
    for package in ("triton", "diffusers", "accelerate"):  # the stack's layers that decide verdicts too
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"host": socket.gethostname(), "os": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, **versions, "cpu": cpu_name(), "engines": engine_versions}


def absent_device_reason(device: str, why: str) -> str:
    """The reason text recorded for a cell whose device this host lacks (its `absence` says so as data)."""
    return f"device {device}: {why}"


def device_was_absent(record: dict) -> bool:
    """Whether the record is of a cell whose device its host lacked: its `absence` field, or, in records written
    before that field existed, the reason's "device X: " prefix."""
    if record.get("absence") is not None:
        return record["absence"] == Absence.DEVICE
    reason, device = record.get("reason") or "", record["cell"]["device"]
    return record.get("verdict") == Verdict.UNAVAILABLE and reason.startswith(f"device {device}: ")




def rule_versions(env: dict[str, Any]) -> dict[str, Any]:
    """The versions a rule may be limited by, as far as `env` notes them (a key it lacks is unknown, not absent)."""
    return {**(env.get("engines") or {}), **{k: env[k] for k in VERSIONED if k in env}}


# The stack's layers (diffusers, accelerate) decide verdicts as much as the engines do: a resumed run with another
# release of either starts a new run rather than mixing two version sets under one run id.
ENVIRONMENT_KEYS = ("host", "cpu", "os", "python", *VERSIONED, "engines")


def environment_key(env: dict[str, Any]) -> str:
    """What makes two records' environments the same for --resume (the device name and driver are per cell)."""
    return json.dumps({k: env.get(k) for k in ENVIRONMENT_KEYS}, sort_keys=True)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


TEXT_LIMIT = 20_000  # characters of one text field of a record: an error's message, its frames, a note, a reason


def capped(text: str | None, limit: int = TEXT_LIMIT) -> str | None:
    """`text` within `limit` characters: its head and tail kept (where an error says what and where), the length
    of what was left out said between them. A 50 MB exception message would otherwise be written whole into the
    record, and three times into the report."""
    if text is None or len(text) <= limit:
        return text
    keep = limit // 2
    return f"{text[:keep]}\n[... {len(text) - 2 * keep:,} of {len(text):,} characters left out ...]\n{text[-keep:]}"


def make_record(run: str, cell: Cell, expect: Expectation, verdict: Verdict, note: str, outcome: Outcome,
                env: dict[str, Any], started: str, duration_s: float,
                claims: list[ClaimResult] = ()) -> dict[str, Any]:
    error = None if outcome.error is None else {k: capped(v) if isinstance(v, str) else v
                                                for k, v in vars(outcome.error).items()}
    return _finite({
        "schema": SCHEMA, "run": run, "id": cell.id, "cell": cell.as_dict(), "expect": expect.as_dict(),
        "verdict": verdict.value, "note": capped(note), "reason": capped(outcome.reason),
        "absence": outcome.absence and outcome.absence.value,
        **({"process": outcome.process} if outcome.process else {}),
        **({"warnings": outcome.warnings} if outcome.warnings else {}),
        "error": error, "metrics": outcome.metrics or None, "output_tail": capped(outcome.output_tail),
        "env": {**env, **outcome.device}, "started": started, "duration_s": round(duration_s, 4),
        **({"claims": [c.as_dict() for c in claims]} if claims else {}),
    })


@functools.lru_cache(maxsize=4096)
def _cell_and_ids(fields: tuple) -> tuple[Cell | None, tuple[str, ...], list[str]]:
    """A record's cell, the ids its record may carry (today's, and those written before its trailing axes existed:
    Cell.ids), or the problems of its values: each must be a known value of its axis, and the type one of its
    engine's (a record is untrusted input: nothing unknown reaches a script, a path or a query). Cached: a results
    file repeats its cells night after night."""
    values = dict(fields)
    problems = unknown_values(values)
    engine = CATALOG.get(values.get("engine"))
    qtype = values.get("qtype", "-")
    if not problems and engine is not None and qtype not in engine.qtypes:
        problems.append(f"cell.qtype: {qtype!r} is not a type of engine {engine.name!r} "
                        f"(expected one of {', '.join(engine.qtypes)})")
    if problems:
        return None, (), problems
    try:
        cell = Cell(**values)
    except TypeError as exc:
        return None, (), [f"cell: {exc}"]
    return cell, cell.ids, []


def _quantizes_in_load(cell: Cell) -> bool:
    stack = STACK_CATALOG.get(cell.stack)
    return stack is not None and cell.load in stack.quantizes_in_load


REQUIRED = ("run", "id", "cell", "expect", "verdict", "env", "started", "duration_s")
_TEXT = (str, type(None))
# Each field's JSON type: a record is untrusted input (merged files, nightly artifacts), and one of another type
# would otherwise end a report in a traceback
FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "run": ((str,), "a string"), "id": ((str,), "a string"), "cell": ((dict,), "an object"),
    "expect": ((dict,), "an object"), "verdict": ((str,), "a string"), "env": ((dict,), "an object"),
    "started": ((str,), "a string"), "duration_s": ((int, float), "a number"),
    "note": (_TEXT, "a string or null"), "reason": (_TEXT, "a string or null"),
    "absence": (_TEXT, "a string or null"), "output_tail": (_TEXT, "a string or null"),
    "error": ((dict, type(None)), "an object or null"), "metrics": ((dict, type(None)), "an object or null"),
    "process": ((dict,), "an object"), "warnings": ((list,), "a list"), "claims": ((list,), "a list"),
}
# Fields inside them the report reads as text (a number or an object there is refused, never shown as code)
NESTED_TEXT = {"expect": ("kind", "pattern", "source", "statement", "reason"),
               "error": ("type", "message", "stage", "layer", "where"),
               "env": ("host", "cpu", "os", "python", "torch", "triton", "diffusers", "accelerate", "device_name",
                       "driver", "cuda_capability")}


STAGES = tuple(s.value for s in Stage)
KINDS = tuple(k.value for k in ExpectKind)


def _nested_problems(record: dict) -> list[str]:
    """Problems inside a record's objects: their text fields strings (or null), env.engines an object of versions,
    each claim an object with a text claim and status, each warning a string, metrics' parts objects."""
    problems = []
    for key, names in NESTED_TEXT.items():
        part = record.get(key) or {}
        problems += [f"{key}.{name}: expected a string or null, got {type(part[name]).__name__}"
                     for name in names if name in part and not isinstance(part[name], _TEXT)]
    stage, kind = (record.get("error") or {}).get("stage"), record["expect"].get("kind")
    if stage and stage not in STAGES:
        problems.append(f"error.stage: {stage!r} is not one of {', '.join(STAGES)}")
    if kind and kind not in KINDS:
        problems.append(f"expect.kind: {kind!r} is not one of {', '.join(KINDS)}")
    engines = record["env"].get("engines", {})
    if not isinstance(engines, dict) or not all(isinstance(v, _TEXT) for v in engines.values()):
        problems.append("env.engines: expected an object of version strings")
    for i, claim in enumerate(record.get("claims") or ()):
        if not isinstance(claim, dict) or not all(isinstance(claim.get(k), str) for k in ("claim", "status")):
            problems.append(f"claims[{i}]: expected an object with a string claim and status")
    if not all(isinstance(w, str) for w in record.get("warnings") or ()):
        problems.append("warnings: expected a list of strings")
    metrics = record.get("metrics") or {}
    for name in ("latency_ms", "components", "phases", "quantized_layers", "lora", "compile", "latency_vs_float",
                 "latency_vs_uncompiled", "host_load"):
        if metrics.get(name) is not None and not isinstance(metrics[name], dict):
            problems.append(f"metrics.{name}: expected an object, got {type(metrics[name]).__name__}")
    for name in ("components", "phases"):
        part = metrics.get(name)
        if isinstance(part, dict) and not all(isinstance(v, dict) for v in part.values()):
            problems.append(f"metrics.{name}: expected an object of objects")
    return problems


def validate_record(record: Any) -> list[str]:
    """Problems with a record (empty when it follows the schema)."""
    if not isinstance(record, dict):
        return ["record is not a JSON object"]
    if record.get("schema") != SCHEMA:
        return [f"schema is {record.get('schema')!r}, expected {SCHEMA}"]
    problems = [f"missing {key!r}" for key in REQUIRED if key not in record]
    problems += [f"{key}: expected {what}, got {type(record[key]).__name__}" for key, (types, what) in FIELDS.items()
                 if key in record and not isinstance(record[key], types)]
    if problems:
        return problems
    fields = record["cell"]
    if not all(isinstance(v, str) for v in fields.values()):
        return ["cell: expected an object of strings (engine, qtype, load, offload, device, model, dtype, ...)"]
    cell, ids, problems = _cell_and_ids(tuple(fields.items()))
    if cell is None:
        return list(problems)
    problems = _nested_problems(record)
    if problems:
        return problems
    if record["id"] not in ids:
        problems.append(f"id {record['id']!r} does not match cell {cell.id!r}")
    try:
        verdict = Verdict(record["verdict"])
    except ValueError:
        return problems + [f"unknown verdict {record['verdict']!r}"]
    metrics = record.get("metrics")
    if verdict.ran:
        if not isinstance(metrics, dict):
            return problems + ["a cell that ran has no metrics"]
        for key in METRIC_KEYS:
            if key not in metrics:
                problems.append(f"metrics.{key} missing")
            elif metrics[key] is None and not (key == "sqnr_db" and metrics.get("max_abs_error") == 0) \
                    and not (key == "quantize_s" and _quantizes_in_load(cell)):
                problems.append(f"metrics.{key} is null")  # quantize_s null: quantized inside diffusers' load call
        lat = metrics.get("latency_ms") or {}
        if not all(isinstance(lat.get(k), (int, float)) for k in ("median", "p10", "p90", "n")):
            problems.append("metrics.latency_ms lacks median/p10/p90/n")
        problems += impossible_figures(metrics)
    elif verdict is not Verdict.UNAVAILABLE and not record.get("error") and not record.get("reason"):
        problems.append(f"verdict {verdict.value} without an error or reason")
    for key in ("torch", "python", "host", "engines"):
        if key not in record["env"]:
            problems.append(f"env.{key} missing")
    return problems


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def impossible_figures(metrics: dict[str, Any]) -> list[str]:
    """Figures no measurement can give: negative bytes or times, bits per weight not above 0 or above float32's
    width (a model storing more than float32 weights; not the compute dtype's: diffusers keeps a class's
    `_keep_in_fp32_modules`, Wan's time embedder, in float32 in a bf16 model), a non-finite number, a cosine
    outside [-1, 1], a paired latency interval that does not hold its ratio. Each problem names the field."""
    problems = []

    def need(key: str, value: Any, low: float | None = 0, high: float | None = None, *, strict=False) -> None:
        if value is None:
            return
        if type(value) is float or type(value) is int:  # the common case first: every report reads every record
            if value == value and (low is None or (value > low if strict else value >= low)) and \
                    (high is None or value <= high) and value not in (math.inf, -math.inf):
                return
        if not _number(value):
            problems.append(f"metrics.{key} is {value!r}, expected a finite number")
        elif low is not None and (value <= low if strict else value < low - 1e-9 * abs(low)):
            problems.append(f"metrics.{key} is {value!r}, expected {'above' if strict else 'at least'} {low}")
        elif high is not None and value > high + 1e-9 * abs(high):  # rounding: a float model's exact width
            problems.append(f"metrics.{key} is {value!r}, expected at most {high}")

    for key in ("param_bytes", "disk_bytes", "peak_mem_bytes", "mem_base_bytes", "quantize_s", "load_s",
                "max_abs_error", "load_peak_mem_bytes", "run_peak_mem_bytes", "resident_mem_bytes"):  # last 3: 2026-12
        need(key, metrics.get(key))
    bits = 32  # float32's width, whatever the compute dtype (see above)
    need("bits_per_weight", metrics.get("bits_per_weight"), 0, bits, strict=True)
    for name, part in (metrics.get("components") or {}).items():
        if isinstance(part, dict):
            need(f"components.{name}.bits_per_weight", part.get("bits_per_weight"), 0, bits, strict=True)
            need(f"components.{name}.bytes", part.get("bytes"))
    for key in ("median", "p10", "p90"):
        need(f"latency_ms.{key}", (metrics.get("latency_ms") or {}).get(key))
    need("cosine", metrics.get("cosine"), -1, 1)
    need("ssim", metrics.get("ssim"), -1, 1)
    need("ms_ssim", metrics.get("ms_ssim"), -1, 1)  # 2026-12: where an image has MS-SSIM's five scales
    for key in ("sqnr_db", "psnr_db"):
        need(key, metrics.get(key), None)
    for name in ("latency_vs_float", "latency_vs_uncompiled"):
        paired = metrics.get(name)
        if isinstance(paired, dict) and "ratio" in paired:
            for key in ("ratio", "lo", "hi", "float_ms"):
                need(f"{name}.{key}", paired.get(key), 0, strict=True)
            if all(_number(paired.get(k)) for k in ("ratio", "lo", "hi")) and \
                    not paired["lo"] <= paired["ratio"] <= paired["hi"]:
                problems.append(f"metrics.{name}: ratio {paired['ratio']} outside its interval "
                                f"{paired['lo']}-{paired['hi']}")
    compiled = metrics.get("compile")
    if isinstance(compiled, dict):
        need("compile.first_call_s", compiled.get("first_call_s"))
        for key in ("graphs", "graph_breaks", "recompiles"):
            need(f"compile.{key}", compiled.get(key))
    return problems


class ResultsWriter:
    """Appends records to a JSON-lines file: each record is one `write` of one whole line under an exclusive
    lock, so concurrent writers (pytest-xdist workers, several runs) never interleave."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _mend_torn_line(fd)
            write_all(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write every byte: os.write may write fewer than asked (a signal, a full pipe or disk quota), and the rest
    continues the same line under the same lock."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _mend_torn_line(fd: int) -> None:
    """If a writer died mid-line, end that line so the next record starts on its own."""
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        os.write(fd, b"\n")


INT_LIMIT = 1 << 63  # a record's integers are counts and bytes: 64 bits hold them; beyond, no float holds them either


class _Integers:
    """json's parse_int: Python's own int, noting one beyond INT_LIMIT (which no figure is, and which overflows
    every float conversion the report makes)."""

    def __init__(self) -> None:
        self.huge = False

    def __call__(self, text: str) -> int:
        value = int(text)
        self.huge = self.huge or not -INT_LIMIT <= value < INT_LIMIT
        return value


def parse_record(line: str) -> tuple[Any, list[str]]:
    """A results line as JSON (raises json.JSONDecodeError), and its problems: the schema's (validate_record), or
    each field holding an integer beyond 64 bits."""
    integers = _Integers()
    record = json.loads(line, parse_int=integers)
    return record, (_huge_integers(record) if integers.huge else validate_record(record))


def _huge_integers(value: Any, where: str = "") -> list[str]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _huge_integers(v, f"{where}.{k}".lstrip("."))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _huge_integers(v, f"{where}[{i}]")]
    if isinstance(value, int) and not -INT_LIMIT <= value < INT_LIMIT:
        return [f"{where or 'record'}: an integer of {len(str(abs(value)))} digits; expected one within 64 bits"]
    return []


def read_records(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Valid records of a results file, and a description of each line skipped (torn, not JSON, bad schema)."""
    records, skipped = [], []
    for number, line in file_lines(Path(path)):
        try:
            record, problems = parse_record(line)
        except json.JSONDecodeError as exc:
            skipped.append(f"{path}:{number}: not a JSON record ({exc.msg})")
            continue
        if problems:
            skipped.append(f"{path}:{number}: {'; '.join(problems)}")
            continue
        records.append(record)
    for message in skipped:
        log.warning("skipped %s", message)
    return records, skipped


# The most a gzipped results file may hold once decompressed (a 1228-cell run is 4 MB): more is refused, so a small
# crafted file cannot fill the memory of whoever reads it
GZIP_LIMIT = 1 << 30


def file_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a results file with their numbers: plain JSONL, or gzipped (`.jsonl.gz`, how the
    committed reference records are kept), each a clear error when the file cannot be read."""
    read, zipped = 0, path.suffix == ".gz"
    try:
        with (gzip.open(path, "rt", encoding="utf-8", errors="replace") if zipped
              else open(path, encoding="utf-8", errors="replace")) as f:
            for number, line in enumerate(f, 1):
                read += len(line)
                if zipped and read > GZIP_LIMIT:
                    raise QuantMatrixError(f"holds more than {GZIP_LIMIT >> 20} MiB of records once decompressed; "
                                           "expected a results file", path=path)
                if line.strip():
                    yield number, line
    except (OSError, EOFError) as exc:  # gzip's "not a gzipped file" and a truncated stream among them
        raise QuantMatrixError(f"cannot read results file: {getattr(exc, 'strerror', None) or exc}",
                               path=path) from None
