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
import functools
import json
import multiprocessing
import os
import signal
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import psutil

from harness.run import child, pool
from harness.run.execute import CellTask
from harness.verdict import ErrorInfo, Outcome, Stage, Status

OUTPUT_TAIL_BYTES = 4000
RAN_TAIL_BYTES = 1000  # a cell that ran: its warnings are recorded apart, the log's last lines are enough
STACKS_BYTES = 32000  # every thread's stack of a killed cell (faulthandler caps each at 100 frames)


@functools.cache
def _forkserver():
    # torch.cuda.is_available() through NVML, not the CUDA runtime, in the server and its cells: an import that
    # asks must not initialize CUDA before the fork.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["harness.run.cell_server"])
    return ctx


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


def _prepare_main(task: CellTask, run_pid: int | None = None) -> None:
    os.setsid()
    if run_pid is not None:
        child.die_with(run_pid)  # a preparation leads its own session too: it ends with the run, however it ends
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
            os.kill(process.pid, child.STACKS_SIGNAL)
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
    with child.without_main_reimport():
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
        child.kill_group(process.pid)
        if process.is_alive():  # interrupted before the cell's setsid: it leads no group of its own yet
            with contextlib.suppress(OSError):
                process.kill()
        process.join()
        raise
    exitcode = process.exitcode
    child.kill_group(process.pid)
    process.join()
    return exitcode, time.monotonic() - started, overrun


def _noop() -> None:
    pass


class ForkRunner:
    """Each cell a fork of the thread-free cell server (CPU builds of torch: milliseconds a cell)."""

    name = "fork"

    def warm_up(self) -> None:
        _run_process(_forkserver(), _noop, (), "warm-up", 600)

    def run(self, task: CellTask, args: tuple, timeout_s: float, stacks: Path):
        return _run_process(_forkserver(), child.child_main, args, f"cell {task.cell.id}", timeout_s,
                            stacks_path=stacks)


class PoolRunner:
    """Each cell in a spawned, pre-imported warm pool worker (accelerator builds: pool.py)."""

    name = "pool"

    def warm_up(self) -> None:
        _run_process(_forkserver(), _noop, (), "warm-up", 600)  # files are still prepared by forks
        pool.pool()  # its first worker starts importing now

    def run(self, task: CellTask, args: tuple, timeout_s: float, stacks: Path):
        process, conn, _ = pool.pool().take(pool.READY_TIMEOUT_S)  # imports are not the cell's time
        cpu_before, started = _cpu_seconds(process.pid) or 0.0, time.monotonic()
        conn.send(args)
        conn.close()
        try:
            return _watch(process, started, timeout_s, stacks, cpu_before)
        finally:
            pool.pool().fill()  # refill="after": the next worker starts importing now


RUNNERS = {r.name: r for r in (ForkRunner(), PoolRunner())}


def runner() -> ForkRunner | PoolRunner:
    """The runner QUANTMATRIX_CELL_RUNNER names ('auto': by the torch build, pool.runner_kind)."""
    return RUNNERS[pool.runner_kind()]


def warm_up() -> float:
    """Start the cell server now (it imports torch and the engines: seconds), so that this cost is not counted in
    the first cell's duration (durations balance shards). Returns the seconds it took."""
    started = time.monotonic()
    runner().warm_up()
    return time.monotonic() - started


def run_isolated(task: CellTask, *, timeout_s: float, memory_limit_mb: int = 0) -> Outcome:
    """Run `task` in its own process and turn what happened to it into an Outcome.

    The files the cell needs (reference output, checkpoint, pre-quantized file) are made first in a process of
    their own, so the measured process starts clean. If that fails, the cell makes them itself and reports the
    failure as its own outcome."""
    from harness.run.execute import files_to_prepare

    pool.share_compile_caches(task.workdir)
    if files_to_prepare(task):
        _run_process(_forkserver(), _prepare_main, (task, os.getpid()), f"prepare {task.cell.id}", timeout_s)
    with tempfile.TemporaryDirectory(prefix="quantmatrix-cell-") as tmp:
        result, log, stacks = Path(tmp, "outcome.json"), Path(tmp, "output.log"), Path(tmp, "stacks.txt")
        args = (task, str(result), str(log), memory_limit_mb, str(stacks), os.getpid())  # the run: dies with it
        try:
            exitcode, elapsed, overrun = runner().run(task, args, timeout_s, stacks)
        except RuntimeError as exc:  # a pool worker died importing
            return Outcome(Status.CRASH, error=ErrorInfo("HarnessError", str(exc), "", Stage.PROCESS),
                           reason="the pool worker for this cell died while importing")
        outcome = _outcome(exitcode, result, overrun, timeout_s, elapsed)
        outcome.output_tail = _tail(log, RAN_TAIL_BYTES if outcome.status is Status.RAN else OUTPUT_TAIL_BYTES)
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
