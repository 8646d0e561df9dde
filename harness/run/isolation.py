"""The isolated cell runner: each cell in its own process, forked from a server that has imported torch (or, with
an accelerator build of torch, a pre-imported process from the warm pool: pool.py).

Why not pytest-forked or pytest-xdist's crash handling: pytest-forked forks the pytest process itself (which may
have run torch ops, so its OpenMP pool and any accelerator context would be inherited broken) and has no timeout
or memory verdicts; xdist restarts a crashed worker but reports a generic failure and has no per-test timeout;
pytest-timeout's signal method cannot stop native code and its thread method kills the whole run. A
`multiprocessing` forkserver gives all three at once: the server (cell_server.py) imports torch once, and, with a
CPU build of torch, the engines that three or more of the run's cells use; it never touches an accelerator and
holds no thread but its main one when it forks; each cell is a cheap fork of it, and the parent turns the child's
fate into a verdict:

- the child's report (Outcome as JSON) when it finishes;
- `hang` when it runs past the cell timeout without using the CPU at the end (a deadlock: asleep in a lock or a
  wait), `timeout` when it was still computing; either way every thread's Python stack (faulthandler, on SIGUSR1)
  and the CPU time it used go into the record before its whole process group is killed;
- `oom` when it ran out of memory (MemoryError / allocator error under the per-cell limit, or SIGKILL from the
  kernel's OOM killer);
- `crash` when it died by any other signal or exited without reporting.
Whatever the cell leaves running (its process group) is killed when it ends.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import json
import multiprocessing
import os
import resource
import signal
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import psutil

from harness.run.execute import CellTask
from harness.verdict import ErrorInfo, Outcome, Stage, Status

OUTPUT_TAIL_BYTES = 4000
STACKS_BYTES = 32000  # every thread's stack of a killed cell (faulthandler caps each at 100 frames)


@functools.cache
def _forkserver():
    # torch.cuda.is_available() through NVML, not the CUDA runtime, in the server and its cells: an import that
    # asks must not initialize CUDA before the fork.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["harness.run.cell_server"])
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


# A cell that overruns its timeout is asked for every thread's Python stack with this signal before it is killed.
STACKS_SIGNAL = signal.SIGUSR1
_stacks_file = None  # kept open for faulthandler for the life of the cell's process


def _child_main(task: CellTask, result_path: str, log_path: str, memory_limit_mb: int,
                stacks_path: str | None = None) -> None:
    global _stacks_file
    with contextlib.suppress(PermissionError):  # a pool worker leads its own session already
        os.setsid()  # its own process group, so everything it starts can be killed with it
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    if stacks_path is not None:  # faulthandler writes from its C signal handler: it works in a deadlocked process
        _stacks_file = open(stacks_path, "w")
        faulthandler.register(STACKS_SIGNAL, file=_stacks_file, all_threads=True)
    if memory_limit_mb and task.cell.device == "cpu":
        vm = _vm_size()
        resource.setrlimit(resource.RLIMIT_AS, (vm + (memory_limit_mb << 20), resource.RLIM_INFINITY))
    from harness.run.execute import execute_cell

    server = sys.modules.get("harness.run.cell_server")
    if server is not None and server.threads_at_fork:
        # What those threads held (a lock, a pool's worker) is held forever here: the cell could deadlock.
        outcome = Outcome(Status.ERROR, error=ErrorInfo(
            "HarnessError", "the cell server held other threads than its main one when it forked this cell ("
            + ", ".join(server.threads_at_fork) + "); a forked cell inherits whatever they held, so it was not run",
            "", Stage.PROCESS), reason="the cell server was not thread-free at the fork")
    else:
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
    from harness.engines.base import IMPORT_LOG, output_to
    from harness.run.execute import prepare_cell

    try:
        with output_to(IMPORT_LOG):  # what the libraries print here the cell prints (and records) again
            prepare_cell(task)
    except Exception:  # not swallowed: the cell prepares again in its own process and records the error
        pass


# A process that overran its timeout and used less than this share of one core over the last HANG_WINDOW_S
# seconds was asleep, not computing: a hang.
HANG_CPU_SHARE = 0.02
HANG_WINDOW_S = 10.0
_POLL_S = 0.5


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process `pid` and everything it started (its threads included)."""
    try:
        root = psutil.Process(pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total
    except psutil.Error:
        return None


@dataclass
class Overrun:
    """What the runner saw of a process it killed at the timeout."""

    cpu_s: float | None  # CPU time used in all
    window_s: float  # the last seconds before the timeout looked at for progress
    window_cpu_s: float | None  # CPU time used in them
    stacks: str | None  # every thread's Python stack (faulthandler), most recent call first

    @property
    def hung(self) -> bool:
        return self.window_cpu_s is not None and self.window_cpu_s < HANG_CPU_SHARE * self.window_s

    def as_dict(self) -> dict:
        return {"cpu_s": self.cpu_s, "window_s": round(self.window_s, 2), "window_cpu_s": self.window_cpu_s,
                "hung": self.hung, "stacks": self.stacks}


def _join_watching_cpu(process, timeout_s: float) -> deque:
    """Join `process` for up to `timeout_s`, sampling its CPU time: (time, cpu seconds) over the last window
    (HANG_WINDOW_S, or the second half of a shorter timeout)."""
    samples: deque = deque()
    window = min(HANG_WINDOW_S, timeout_s / 2)
    deadline = time.monotonic() + timeout_s
    while True:
        now = time.monotonic()
        cpu = _cpu_seconds(process.pid)
        if cpu is not None:
            samples.append((now, cpu))
            while len(samples) > 2 and now - samples[1][0] >= window:
                samples.popleft()
        if now >= deadline:
            return samples
        process.join(min(_POLL_S, deadline - now))
        if process.exitcode is not None:
            return samples


def _overrun(process, samples: deque, stacks_path: Path | None, cpu_before: float = 0.0) -> Overrun:
    """Ask the overrunning process for its threads' stacks, then describe what it was doing."""
    stacks = None
    if stacks_path is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, STACKS_SIGNAL)
            deadline = time.monotonic() + 3.0
            size = -1
            while time.monotonic() < deadline:  # until the dump stops growing
                time.sleep(0.1)
                now = stacks_path.stat().st_size if stacks_path.exists() else 0
                if now and now == size:
                    break
                size = now
        stacks = _tail(stacks_path, STACKS_BYTES)
    first, last = (samples[0], samples[-1]) if samples else ((0.0, None), (0.0, None))
    window_cpu = None if last[1] is None or first[1] is None else round(last[1] - first[1], 3)
    return Overrun(None if last[1] is None else round(last[1] - cpu_before, 3), last[0] - first[0], window_cpu,
                   stacks)


def _run_process(ctx, target, args: tuple, name: str, timeout_s: float,
                 stacks_path: Path | None = None) -> tuple[int | None, float, Overrun | None]:
    """Start `target` in a forked process (its own session), wait up to `timeout_s`, then kill whatever is left of
    its process group. Returns its exit code (None: it was still running), the seconds it ran, and, when it
    overran, what it was doing (stacks from `stacks_path`, where the process registered faulthandler)."""
    process = ctx.Process(target=target, args=args, name=name)
    started = time.monotonic()
    with _without_main_reimport():
        process.start()
    return _watch(process, started, timeout_s, stacks_path)


def _watch(process, started: float, timeout_s: float, stacks_path: Path | None,
           cpu_before: float = 0.0) -> tuple[int | None, float, Overrun | None]:
    """Wait for a started cell process (forked, or a pool worker given its cell) as _run_process describes;
    `cpu_before`: the CPU time it had used before its cell (a pool worker's imports), not counted as the cell's."""
    overrun = None
    try:
        samples = _join_watching_cpu(process, timeout_s - (time.monotonic() - started))
        if process.exitcode is None:
            overrun = _overrun(process, samples, stacks_path, cpu_before)
    except BaseException:  # Ctrl-C / SIGTERM: stop it now, then let the run stop
        _kill_group(process.pid)
        process.join()
        raise
    exitcode = process.exitcode
    _kill_group(process.pid)
    process.join()
    return exitcode, time.monotonic() - started, overrun


def _noop() -> None:
    pass


def warm_up() -> float:
    """Start the cell server now (it imports torch and the engines: seconds), so that this cost is not counted in
    the first cell's duration (durations balance shards). Returns the seconds it took."""
    from harness.run import pool

    started = time.monotonic()
    _run_process(_forkserver(), _noop, (), "warm-up", 600)
    if pool.runner_kind() == "pool":
        pool.pool()  # its first worker starts importing now
    return time.monotonic() - started


def run_isolated(task: CellTask, *, timeout_s: float, memory_limit_mb: int = 0) -> Outcome:
    """Run `task` in its own process and turn what happened to it into an Outcome.

    The files the cell needs (reference output, checkpoint, pre-quantized file) are made first in a process of
    their own, so the measured process starts clean. If that fails, the cell makes them itself and reports the
    failure as its own outcome."""
    from harness.run import pool
    from harness.run.execute import files_to_prepare

    ctx = _forkserver()
    pool.share_compile_caches(task.workdir)
    if files_to_prepare(task):
        _run_process(ctx, _prepare_main, (task,), f"prepare {task.cell.id}", timeout_s)
    with tempfile.TemporaryDirectory(prefix="quantmatrix-cell-") as tmp:
        result, log, stacks = Path(tmp, "outcome.json"), Path(tmp, "output.log"), Path(tmp, "stacks.txt")
        args = (task, str(result), str(log), memory_limit_mb, str(stacks))
        if pool.runner_kind() == "pool":
            try:
                process, conn, _ = pool.pool().take(pool.READY_TIMEOUT_S)  # imports are not the cell's time
            except RuntimeError as exc:
                return Outcome(Status.CRASH, error=ErrorInfo("HarnessError", str(exc), "", Stage.PROCESS),
                               reason="the pool worker for this cell died while importing")
            cpu_before, started = _cpu_seconds(process.pid) or 0.0, time.monotonic()
            conn.send(args)
            conn.close()
            exitcode, elapsed, overrun = _watch(process, started, timeout_s, stacks, cpu_before)
            pool.pool().fill()  # refill="after": the next worker starts importing now
        else:
            exitcode, elapsed, overrun = _run_process(ctx, _child_main, args, f"cell {task.cell.id}", timeout_s,
                                                      stacks_path=stacks)
        outcome = _outcome(exitcode, result, overrun, timeout_s, elapsed)
        outcome.output_tail = _tail(log)
    return outcome


def _outcome(exitcode: int, result: Path, overrun: Overrun | None, timeout_s: float, elapsed: float) -> Outcome:
    if overrun is not None:
        return _overrun_outcome(overrun, timeout_s)
    if result.exists():
        return Outcome.from_dict(json.loads(result.read_text()))
    if exitcode < 0:
        sig = signal.Signals(-exitcode)
        if sig == signal.SIGKILL:
            return Outcome(Status.OOM, reason=f"killed by SIGKILL after {elapsed:.1f} s without reporting "
                                         "(the kernel's OOM killer, most likely)")
        return Outcome(Status.CRASH, reason=f"process died by signal {sig.name} ({-exitcode})")
    return Outcome(Status.CRASH, reason=f"process exited with code {exitcode} before reporting")


def _overrun_outcome(overrun: Overrun, timeout_s: float) -> Outcome:
    cpu = "?" if overrun.cpu_s is None else f"{overrun.cpu_s:.1f}"
    window = "?" if overrun.window_cpu_s is None else f"{overrun.window_cpu_s:.2f}"
    if overrun.hung:
        status, kind = Status.HANG, "Hang"
        reason = (f"no result after the cell timeout of {timeout_s:g} s, and no CPU progress in its last "
                  f"{overrun.window_s:.0f} s ({window} CPU s; {cpu} CPU s in all): asleep, a deadlock; killed")
    else:
        status, kind = Status.TIMEOUT, "Timeout"
        reason = (f"no result after the cell timeout of {timeout_s:g} s, still computing ({window} CPU s in its "
                  f"last {overrun.window_s:.0f} s; {cpu} CPU s in all); killed")
    return Outcome(status, error=ErrorInfo(kind, reason, _innermost_frames(overrun.stacks), Stage.PROCESS),
                   reason=reason, process=overrun.as_dict())


def _innermost_frames(stacks: str | None, frames: int = 4) -> str:
    """The innermost frames of the thread that received the signal (the main thread, where the cell runs; the
    first listed when faulthandler marks none), joined like ErrorInfo.where."""
    if not stacks:
        return "(no stack: the process did not answer the stack request)"
    lines = [line.strip() for line in stacks.splitlines()]
    current = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), 0)
    out = []
    for line in lines[current + 1:]:
        if line.startswith("File "):
            out.append(line.removeprefix("File ").replace('"', ""))
            if len(out) == frames:
                break
        elif out and not line:
            break
    return " <- ".join(out)
