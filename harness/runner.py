"""The isolated cell runner: each cell in its own process, forked from a server that has imported torch.

Why not pytest-forked or pytest-xdist's crash handling: pytest-forked forks the pytest process itself (which may
have run torch ops, so its OpenMP pool and any accelerator context would be inherited broken) and has no timeout
or memory verdicts; xdist restarts a crashed worker but reports a generic failure and has no per-test timeout;
pytest-timeout's signal method cannot stop native code and its thread method kills the whole run. A
`multiprocessing` forkserver gives all three at once: the server imports torch and the engines once and never
touches an accelerator, each cell is a cheap fork of it, and the parent turns the child's fate into a verdict:

- the child's report (Outcome as JSON) when it finishes;
- `timeout` when it runs past the cell timeout (its whole process group is killed);
- `oom` when it ran out of memory (MemoryError / allocator error under the per-cell limit, or SIGKILL from the
  kernel's OOM killer);
- `crash` when it died by any other signal or exited without reporting.
Whatever the cell leaves running (its process group) is killed when it ends.
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

from harness.execute import CellTask
from harness.verdict import Outcome

OUTPUT_TAIL_BYTES = 4000


@functools.cache
def _forkserver():
    # torch.cuda.is_available() through NVML, not the CUDA runtime, in the server and its cells: an import that
    # asks must not initialize CUDA before the fork.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["harness.forkserver_warmup"])
    return ctx


@contextlib.contextmanager
def _without_main_reimport():
    """A forkserver child re-runs the parent's __main__ script before the target (for the `pytest` console script
    that is an import of pytest, about 0.2 s a cell); cells need nothing from it, so hide it while starting one."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) if getattr(main, "__spec__", None) is None else None
    if path is not None:
        del main.__file__
    try:
        yield
    finally:
        if path is not None:
            main.__file__ = path


def _child_main(task: CellTask, result_path: str, log_path: str, memory_limit_mb: int) -> None:
    os.setsid()  # its own process group, so everything it starts can be killed with it
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    if memory_limit_mb and task.cell.device == "cpu":
        vm = _vm_size()
        resource.setrlimit(resource.RLIMIT_AS, (vm + (memory_limit_mb << 20), resource.RLIM_INFINITY))
    from harness.execute import execute_cell

    outcome = execute_cell(task)
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(outcome.as_dict(), f)
    os.replace(tmp, result_path)


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, limit: int = OUTPUT_TAIL_BYTES) -> str | None:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - limit))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    if not text:
        return None
    return (f"[... {size - limit} earlier bytes cut]\n" if size > limit else "") + text


def _prepare_main(task: CellTask) -> None:
    os.setsid()
    from harness.execute import prepare_cell

    try:
        prepare_cell(task)
    except Exception:  # not swallowed: the cell prepares again in its own process and records the error
        pass


def _run_process(ctx, target, args: tuple, name: str, timeout_s: float) -> tuple[int | None, float]:
    """Start `target` in a forked process (its own session), wait up to `timeout_s`, then kill whatever is left of
    its process group. Returns its exit code (None: it was still running) and the seconds it ran."""
    process = ctx.Process(target=target, args=args, name=name)
    started = time.monotonic()
    with _without_main_reimport():
        process.start()
    try:
        process.join(timeout_s)
    except BaseException:  # Ctrl-C / SIGTERM: stop it now, then let the run stop
        _kill_group(process.pid)
        process.join()
        raise
    exitcode = process.exitcode
    _kill_group(process.pid)
    process.join()
    return exitcode, time.monotonic() - started


def _noop() -> None:
    pass


def warm_up() -> float:
    """Start the cell server now (it imports torch and the engines: seconds), so that this cost is not counted in
    the first cell's duration (durations balance shards). Returns the seconds it took."""
    started = time.monotonic()
    _run_process(_forkserver(), _noop, (), "warm-up", 600)
    return time.monotonic() - started


def run_isolated(task: CellTask, *, timeout_s: float, memory_limit_mb: int = 0) -> Outcome:
    """Run `task` in its own process and turn what happened to it into an Outcome.

    The files the cell needs (reference output, checkpoint, pre-quantized file) are made first in a process of
    their own, so the measured process starts clean. If that fails, the cell makes them itself and reports the
    failure as its own outcome."""
    from harness.execute import files_to_prepare

    ctx = _forkserver()
    if files_to_prepare(task):
        _run_process(ctx, _prepare_main, (task,), f"prepare {task.cell.id}", timeout_s)
    with tempfile.TemporaryDirectory(prefix="quantmatrix-cell-") as tmp:
        result, log = Path(tmp, "outcome.json"), Path(tmp, "output.log")
        exitcode, elapsed = _run_process(ctx, _child_main, (task, str(result), str(log), memory_limit_mb),
                                         f"cell {task.cell.id}", timeout_s)
        outcome = _outcome(exitcode, result, exitcode is None, timeout_s, elapsed)
        outcome.output_tail = _tail(log)
    return outcome


def _outcome(exitcode: int, result: Path, timed_out: bool, timeout_s: float, elapsed: float) -> Outcome:
    if timed_out:
        return Outcome("timeout", reason=f"no result after the cell timeout of {timeout_s:g} s; process killed")
    if result.exists():
        return Outcome.from_dict(json.loads(result.read_text()))
    if exitcode < 0:
        sig = signal.Signals(-exitcode)
        if sig == signal.SIGKILL:
            return Outcome("oom", reason=f"killed by SIGKILL after {elapsed:.1f} s without reporting "
                                         "(the kernel's OOM killer, most likely)")
        return Outcome("crash", reason=f"process died by signal {sig.name} ({-exitcode})")
    return Outcome("crash", reason=f"process exited with code {exitcode} before reporting")
