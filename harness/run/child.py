"""What runs inside a cell's process, whichever runner started it (the fork server's child or a warm pool
worker): its own session and output, the memory cap, the stacks signal, the thread-free check, the cell, and its
outcome written whole. Both runners import this module; it imports neither.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import resource
import select
import signal
import sys
import threading
import time
from pathlib import Path

from harness.run.execute import CellTask
from harness.verdict import ErrorInfo, Outcome, Stage, Status


@contextlib.contextmanager
def without_main_reimport():
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


def child_main(task: CellTask, result_path: str, log_path: str, memory_limit_mb: int,
                stacks_path: str | None = None, run_pid: int | None = None) -> None:
    global _stacks_file
    with contextlib.suppress(PermissionError):  # a pool worker leads its own session already
        os.setsid()  # its own process group, so everything it starts can be killed with it
    if run_pid is not None:
        die_with(run_pid)
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
            "HarnessError", f"the cell server held other threads than its main one when it forked cell "
            f"{task.cell.id} (" + ", ".join(server.threads_at_fork) + "); a forked cell inherits whatever they held, "
            "so it was not run", "", Stage.PROCESS), reason="the cell server was not thread-free at the fork")
        print(f"quantmatrix: cell {task.cell.id} not run: the cell server held other threads when it forked it "
              f"({', '.join(server.threads_at_fork)})", file=sys.stderr, flush=True)
    else:
        outcome = execute_cell(task)
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(outcome.as_dict(), f)
    os.replace(tmp, result_path)


def die_with(run_pid: int) -> None:
    """End this cell's process group when the run's process ends, however it ends (SIGKILL included: no handler
    of the run's can do it). A cell leads its own session, so nothing else would stop it, and while it lives it
    holds the fork server's liveness pipe (multiprocessing passes it as the parent sentinel), so the server would
    outlive the run too. A pidfd (Linux 5.3) is readable once the process has exited; a daemon thread waits on it.
    The cell's own threads are its business: only the cell server must fork thread-free."""
    try:
        pidfd = os.pidfd_open(run_pid)
    except ProcessLookupError:  # the run ended before this cell started
        os.killpg(0, signal.SIGKILL)
    except (AttributeError, OSError):  # no pidfd here (not Linux, an old kernel): watch the parent pid instead
        threading.Thread(target=_poll_parent, args=(os.getppid(),), daemon=True, name="die-with-run").start()
        return
    threading.Thread(target=_wait_pidfd, args=(pidfd,), daemon=True, name="die-with-run").start()


def _wait_pidfd(pidfd: int) -> None:
    select.select([pidfd], [], [])
    os.killpg(0, signal.SIGKILL)


def _poll_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.killpg(0, signal.SIGKILL)


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
