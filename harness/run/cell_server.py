"""Imported once by the cell runner's forkserver (the cell server) so each forked cell does not import these again.

Only imports: no tensor is computed here, so no accelerator context exists before the fork. The engines' packages
are preloaded only by a torch built for the CPU alone: bitsandbytes and SDNQ query the GPU when imported
(`torch.cuda.get_device_capability`), which initializes CUDA, and a CUDA context does not survive a fork ("Cannot
re-initialize CUDA in forked subprocess"). With a GPU build each cell imports them itself.
torch imports several modules lazily on the first use of some ops (sympy through torch.fx's symbolic shapes, on the
first `Module.to_empty`, 0.4 s) and torch._dynamo (through accelerate's hooked forward, 1.6 s), which every
fresh process would pay again and which would inflate the peak RSS of the cells that trigger them.

The server holds no thread but its main one when it forks a cell. A fork copies only the forking thread: a lock
another thread held at that moment stays held forever in the cell, and a thread pool whose worker was alive
believes it still has one. That is how SDNQ's cells deadlocked in full runs: sdnq's import test-compiles a function
with torch.compile; with an empty inductor cache (a fresh machine) the C++ build went to inductor's compile thread
pool (`AsyncCompile.pool()`), so the server held that pool with an idle worker. A cell inherited the pool, its
idle count and its (dead) worker; the cell's first new kernel build was queued to it, no thread was started, and
the cell slept in `future.result()` until the timeout. So after the preload the compile pools are shut down and
forgotten (`release_threads`), tqdm's monitor is off, NNCF's telemetry is declined (engines/nncf_engine.py),
OpenBLAS starts no thread pool, pyarrow's jemalloc no purging thread, and every fork is checked
(`threads_at_fork`): a cell forked from a server with other threads refuses to run and names them.
"""

import os

# OpenBLAS (numpy's and scipy's) starts a thread pool when loaded; one thread each is all a forked cell keeps.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# pyarrow (imported by nvidia-modelopt and auto-round, through datasets) loads its bundled jemalloc, whose
# background purging thread starts with it; Arrow allocates with mimalloc here, so the thread only blocks forks.
os.environ.setdefault("JE_ARROW_MALLOC_CONF", "background_thread:false")

import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

try:  # engines' progress bars (a dependency of sdnq, gguf, nncf and diffusers, not of the harness)
    import tqdm  # noqa: E402

    # tqdm starts a monitor thread with its first progress bar (sdnq makes one on import); it only tunes refresh
    # rates of bars nobody watches here.
    tqdm.tqdm.monitor_interval = 0
except ImportError:
    pass

import accelerate  # noqa: E402, F401  (offload hooks)
import accelerate.hooks  # noqa: E402, F401
import safetensors.torch  # noqa: E402, F401  (checkpoints, references)
import torch  # noqa: E402
import torch._dynamo  # noqa: E402, F401  (accelerate's hooks import it on the first hooked forward)
import torch._refs  # noqa: E402, F401
import torch.fx.experimental.symbolic_shapes  # noqa: E402, F401

import harness.offload  # noqa: E402, F401
import harness.run.execute  # noqa: E402, F401
from harness.devices import accelerator_build  # noqa: E402
from harness.engines.registry import ENGINES  # noqa: E402


def other_threads() -> list[str]:
    """The threads of this process besides the calling one: the Python name where Python knows the thread,
    else the kernel's name for it (a native thread started by a library)."""
    me = threading.get_native_id()
    python = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    try:
        tasks = sorted(Path("/proc/self/task").iterdir(), key=lambda p: int(p.name))
    except OSError:  # no /proc (macOS): the threads Python knows
        return [f"{name!r} (Python thread {tid})" for tid, name in python.items() if tid != me]
    out = []
    for task in tasks:
        tid = int(task.name)
        if tid == me:
            continue
        try:
            comm = (task / "comm").read_text().strip()
        except OSError:  # it ended while we looked
            continue
        out.append(f"{python[tid]!r} (Python thread {tid})" if tid in python else f"{comm!r} (native thread {tid})")
    return out


# What the server held besides its main thread when it forked the current process (set by the fork hook below,
# copied into the child with the rest of memory).
threads_at_fork: list[str] = []


def _before_fork() -> None:
    global threads_at_fork
    threads_at_fork = other_threads()  # a forked cell refuses to run and says so (child.py); nothing printed here:
    # the server's warm-up and preparation forks are no cells


def _cuda_driver_loaded() -> bool:
    """Whether the CUDA driver library is mapped into this process (something initialized CUDA)."""
    try:
        return "libcuda.so" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def import_engines(*, force: bool = False) -> None:
    """The installed engines' packages that the run's cells use, so that no cell pays for their import. Not with
    an accelerator build of torch (some initialize CUDA), unless `force`d: a pool worker (pool.py), which is
    spawned and forks nothing, imports them all."""
    import importlib.util
    import logging

    if accelerator_build() and not force:
        return
    wanted = os.environ.get("QUANTMATRIX_PRELOAD")  # the engines of the run's cells (set by the pytest plugin)
    for name, engine in ENGINES.items():
        if wanted is not None and name not in wanted.split(","):
            continue
        module = engine.import_name or engine.package
        if module is None or importlib.util.find_spec(module) is not None:
            try:
                engine.import_package()
            except Exception as exc:  # the engine's cells will raise it again and record it
                logging.getLogger(__name__).warning("preloading %s failed: %s", name, exc)
    if wanted is None or "diffusers" in wanted.split(","):
        _import_diffusers()
    if not force and (torch.cuda.is_initialized() or _cuda_driver_loaded()):
        # Forked cells could not use CUDA then ("Cannot re-initialize CUDA in forked subprocess").
        logging.getLogger(__name__).warning("an engine's import initialized CUDA in the cell server; CUDA cells "
                                            "will fail until that import is kept out of the preload")


def _import_diffusers() -> None:
    """diffusers' model classes, quantizer integrations, pipeline and hooks (its imports are lazy: each name
    imports its module on first use, seconds in all)."""
    import importlib.util

    if importlib.util.find_spec("diffusers") is None:
        return
    import diffusers
    import diffusers.hooks  # noqa: F401
    import diffusers.quantizers.auto  # noqa: F401

    for name in ("FluxTransformer2DModel", "SD3Transformer2DModel", "UNet2DConditionModel", "DiffusionPipeline",
                 "BitsAndBytesConfig", "QuantoConfig", "GGUFQuantizationConfig", "TorchAoConfig"):
        getattr(diffusers, name)
    import harness.stacks.diffusers  # noqa: F401


def release_threads() -> None:
    """Shut down the thread and process pools that imports left behind, and forget them, so that a forked cell
    makes its own (inductor's compile pools; an engine's import may compile, as sdnq's does)."""
    async_compile = sys.modules.get("torch._inductor.async_compile")
    if async_compile is not None:
        compile_ = async_compile.AsyncCompile
        if compile_.pool.cache_info().currsize:
            compile_.pool().shutdown(wait=True)
            compile_.pool.cache_clear()
        async_compile.shutdown_compile_workers()  # the subprocess pool, if one was started
        compile_._ready_future = None


import_engines()
release_threads()
os.register_at_fork(before=_before_fork)
