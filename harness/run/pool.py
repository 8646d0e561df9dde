"""A warm pool of cell processes, for torch builds that drive an accelerator.

With such a build the cell server (cell_server.py) cannot preload the engines: bitsandbytes and SDNQ ask the GPU
for its capability when imported, and a CUDA context does not survive a fork. So each forked cell imported its
engine itself and compiled its kernels again: on the H200 run in results/reference/, seconds per cell. The pool
keeps one fresh process per cell (isolation stays: each worker runs exactly one cell and exits) but has the next
one ready before it is needed: `spawn`ed interpreters (no fork, so a CUDA context of their own is safe) that import
torch, diffusers, accelerate and every installed engine, then wait for their cell. Taking a worker starts its
replacement, which imports while the cell runs (QUANTMATRIX_POOL_REFILL=during, the default on hosts with 8 or
more cores), or once the cell has finished (=after, the default below 8 cores: there an import beside the measured
cell competes for its cores, and a 0.14 s CPU cell measured 2.4 s on this 2-core host). A worker touches the
device only through what the engines' own imports do (bitsandbytes' and SDNQ's capability query creates the CUDA
context); peak VRAM is read from the allocator, which does not count that context.

Compile caches are shared by every cell of a run (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR under the run's work
directory, unless set already), so a kernel compiled by one cell is loaded, not compiled, by the next.

Which runner a run uses: QUANTMATRIX_CELL_RUNNER=auto (default: the pool with an accelerator build of torch, the
fork server with a CPU build, where it is faster), pool, or fork. The isolation guarantees (timeout and hang with
the threads' stacks, OOM, crash, output cap, orphans killed, interrupt) come from the same code for both runners
(isolation.py), and tests/test_isolation.py runs its fault cells through both.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import threading
from collections import deque
from pathlib import Path

from harness.run import child

RUNNERS = ("auto", "pool", "fork")
READY = "ready"
READY_TIMEOUT_S = 600.0  # how long a worker may take to import everything (not counted in its cell's timeout)


def runner_kind() -> str:
    """'pool' or 'fork': QUANTMATRIX_CELL_RUNNER, 'auto' deciding by the torch build (read from its version
    attributes: no driver is touched)."""
    wanted = os.environ.get("QUANTMATRIX_CELL_RUNNER", "auto")
    if wanted not in RUNNERS:
        raise ValueError(f"QUANTMATRIX_CELL_RUNNER={wanted!r}; expected one of {list(RUNNERS)}")
    if wanted != "auto":
        return wanted
    from harness.devices import accelerator_build

    return "pool" if accelerator_build() else "fork"


def share_compile_caches(workdir: Path) -> None:
    """Point inductor's and triton's caches at the run's work directory (unless the user chose them), for every
    cell process started after this."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(workdir / "compile-cache" / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(workdir / "compile-cache" / "triton"))


def _worker_main(conn, log_path: str) -> None:
    """A pool worker: its own session, the imports, 'ready', then one cell (child.child_main) and exit."""
    os.setsid()
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    import harness.run.cell_server as server  # torch, accelerate, diffusers, the harness; engines on CPU builds

    server.import_engines(force=True)  # with an accelerator build too: no fork follows in this process
    server.release_threads()
    conn.send(READY)
    try:
        args = conn.recv()
    except EOFError:  # the pool was closed: no cell for this worker
        return
    child.child_main(*args)
    # Leave as a forked cell does, without the interpreter's teardown: finalizing torch and every engine took
    # 1.7 s per cell here. The outcome is written (and renamed into place) already.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class WarmPool:
    """Spawned, pre-imported cell processes; `take()` hands out a ready one and starts its replacement."""

    def __init__(self, size: int = 1, log_dir: Path | None = None, refill: str = "during"):
        if refill not in ("during", "after"):
            raise ValueError(f"QUANTMATRIX_POOL_REFILL={refill!r}; expected 'during' or 'after'")
        self.size = max(1, size)
        self.refill = refill
        self.ctx = multiprocessing.get_context("spawn")
        self.log_dir = Path(log_dir or os.environ.get("TMPDIR", "/tmp"))
        self.waiting: deque = deque()
        self.lock = threading.Lock()
        self.started = 0

    def _spawn(self):
        parent, end = self.ctx.Pipe()
        self.started += 1
        log = self.log_dir / f"quantmatrix-worker-{os.getpid()}-{self.started}.log"
        process = self.ctx.Process(target=_worker_main, args=(end, str(log)), name="quantmatrix pool worker")
        with child.without_main_reimport():
            process.start()
        end.close()
        return process, parent, log

    def fill(self) -> None:
        with self.lock:
            while len(self.waiting) < self.size:
                self.waiting.append(self._spawn())

    def take(self, timeout_s: float):
        """A worker that has finished importing: (process, connection, log path). Raises RuntimeError with the
        worker's output when it died importing or did not get ready within `timeout_s`."""
        with self.lock:
            if not self.waiting:
                self.waiting.append(self._spawn())
            process, conn, log = self.waiting.popleft()
            if self.refill == "during":
                self.waiting.append(self._spawn())  # imports while this one's cell runs
        ready = False
        with contextlib.suppress(EOFError, OSError):
            ready = conn.poll(timeout_s) and conn.recv() == READY
        if not ready:
            _stop(process)
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"a pool worker did not get ready (exit code {process.exitcode}): {tail}")
        return process, conn, log

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> bool:
        """Block until the next worker to be taken has finished importing (for benchmarks of the handover)."""
        self.fill()
        with self.lock:
            conn = self.waiting[0][1]
        return conn.poll(timeout_s)

    def close(self) -> None:
        with self.lock:
            while self.waiting:
                process, conn, log = self.waiting.popleft()
                conn.close()  # it leaves when it reads EOF
                _stop(process)
                with contextlib.suppress(OSError):
                    log.unlink()


def _stop(process) -> None:
    if process.is_alive():
        child.kill_group(process.pid)
        process.kill()
    process.join(5)


_pool: WarmPool | None = None


def pool() -> WarmPool:
    """This process's pool (made and filled on first use; closed at exit)."""
    global _pool
    if _pool is None:
        import atexit

        _pool = WarmPool(int(os.environ.get("QUANTMATRIX_POOL_SIZE", "1")),
                         refill=os.environ.get("QUANTMATRIX_POOL_REFILL",
                                               "during" if (os.cpu_count() or 1) >= 8 else "after"))
        _pool.fill()
        atexit.register(_pool.close)
    return _pool


def close() -> None:
    """Close this process's warm pool now (its waiting workers exit); the next isolated cell starts a new one."""
    global _pool
    if _pool is not None:
        _pool.close()
    _pool = None
