"""Imported once by the cell runner's forkserver so each forked cell does not import these again.

Only imports: no tensor is computed here, so no thread pool or accelerator context exists before the fork. The
engines' packages are preloaded only by a torch built for the CPU alone: bitsandbytes and SDNQ query the GPU when
imported (`torch.cuda.get_device_capability`), which initializes CUDA, and a CUDA context does not survive a fork
("Cannot re-initialize CUDA in forked subprocess"). With a GPU build each cell imports them itself.
torch imports several modules lazily on the first use of some ops (sympy through torch.fx's symbolic shapes, on the
first `Module.to_empty`, 0.4 s) and torch._dynamo (through accelerate's hooked forward, 1.6 s), which every
fresh process would pay again and which would inflate the peak RSS of the cells that trigger them.
"""

from pathlib import Path

import accelerate  # noqa: F401  (offload hooks)
import accelerate.hooks  # noqa: F401
import safetensors.torch  # noqa: F401  (checkpoints, references)
import torch
import torch._dynamo  # noqa: F401  (accelerate's hooks import it on the first hooked forward)
import torch._refs  # noqa: F401
import torch.fx.experimental.symbolic_shapes  # noqa: F401

import harness.execute  # noqa: F401
import harness.offload  # noqa: F401
from harness.engines import ENGINES  # noqa: E402


def _accelerator_build() -> bool:
    """Whether this torch can drive an accelerator; answered from the build, without touching a driver."""
    return bool(torch.version.cuda or getattr(torch.version, "hip", None) or torch.backends.mps.is_built()
                or (hasattr(torch, "xpu") and torch.xpu._is_compiled()))


def _cuda_driver_loaded() -> bool:
    """Whether the CUDA driver library is mapped into this process (something initialized CUDA)."""
    try:
        return "libcuda.so" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _import_engines() -> None:
    """The installed engines' packages, so that no cell pays for their import (seconds each)."""
    import importlib
    import importlib.util
    import logging

    if _accelerator_build():
        return
    import os

    wanted = os.environ.get("QUANTMATRIX_PRELOAD")  # the engines of the run's cells (set by the pytest plugin)
    for name, engine in ENGINES.items():
        if wanted is not None and name not in wanted.split(","):
            continue
        name = engine.import_name or engine.package
        if name and importlib.util.find_spec(name) is not None:
            try:
                importlib.import_module(name)
            except Exception as exc:  # the engine's cells will raise it again and record it
                logging.getLogger(__name__).warning("preloading %s failed: %s", name, exc)
    if torch.cuda.is_initialized() or _cuda_driver_loaded():
        # Forked cells could not use CUDA then ("Cannot re-initialize CUDA in forked subprocess").
        logging.getLogger(__name__).warning("an engine's import initialized CUDA in the cell server; CUDA cells "
                                            "will fail until that import is kept out of the preload")


_import_engines()
