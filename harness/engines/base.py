"""The one small interface every engine implements.

An engine module imports this module, its own third-party package (lazily, inside methods) and no other engine
(tests/test_layering.py checks it); nncf's also asks the built-in models for an example input to trace with. What
an engine offers is data in catalog.py, so that a matrix file is validated without torch or any engine. Errors
raised by the engine's package are never caught here: they are what the harness exists to record.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from harness.engines.catalog import CATALOG

if TYPE_CHECKING:  # torch is imported where it runs: an engine module named in QUANTMATRIX_ENGINES is read by the
    import torch  # catalog, which the report (no torch) imports
    from torch import nn


def safetensors_contents(path: Path) -> tuple[dict[str, str], list[str]] | None:
    """(metadata, tensor names) of a .safetensors file, for an engine's `recognise`; None for other files."""
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        return None
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}, list(f.keys())


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def replace_linears(model: nn.Module, make: Callable[..., nn.Module], *, with_names: bool = False) -> nn.Module:
    """Replace every plain nn.Linear of `model` by `make(layer)` (or `make(layer, name)`)."""
    from torch import nn

    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            set_submodule(model, name, make(module, name) if with_names else make(module))
    return model


# Where engines' import-time messages go (QUANTMATRIX_IMPORT_LOG to choose another file).
IMPORT_LOG = Path(os.environ.get("QUANTMATRIX_IMPORT_LOG")
                  or Path(tempfile.gettempdir(), f"quantmatrix-imports-{os.getuid()}.log"))


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (the file descriptors: native libraries' output too) to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log):
            os.close(fd)


class NotOffered(Exception):
    """The engine does not offer this operation at all (a fact about the engine, not a failure)."""


class Engine:
    """One engine. A subclass names its catalog entry (`name = "bnb"`) and gets the rest from it."""

    name: ClassVar[str]
    qtypes: ClassVar[tuple[str, ...]]
    loads: ClassVar[tuple[str, ...]]
    package: ClassVar[str | None]
    import_name: ClassVar[str | None]
    hidden: ClassVar[bool]
    file_suffix: ClassVar[str]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        info = CATALOG[cls.name]
        cls.qtypes, cls.loads, cls.package = info.qtypes, info.loads, info.package
        cls.import_name, cls.hidden, cls.file_suffix = info.import_name, info.hidden, info.file_suffix

    def version(self) -> str | None:
        if self.package is None:
            import torch

            return torch.__version__
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return None

    def import_package(self) -> None:
        """Import the engine's package (the cell server preloads it; a cell imports it before memory is tracked).
        What the import prints (warnings about missing kernels, deprecations) goes to IMPORT_LOG, not the user's
        terminal. An engine whose import starts threads or phones home says here how to keep it from doing so."""
        if self.package is not None:
            with output_to(IMPORT_LOG):
                importlib.import_module(self.import_name or self.package)

    def unavailable_reason(self, qtype: str, device: str) -> str | None:
        """Why this engine cannot run `qtype` on `device` here, or None when it can."""
        if self.package is not None and importlib.util.find_spec(self.import_name or self.package) is None:
            return f"engine package {self.package!r} is not installed"
        return None

    def device_reason(self, qtype: str, device: str) -> str | None:
        """Why this engine does not offer `qtype` on this kind of device at all (a CUDA-only loader on a CPU), or
        None. Cheap, and no accelerator is initialized (the harness asks before a cell runs)."""
        return None

    # -- post-load: quantize a float model that sits in memory (on the CPU).
    def quantize(self, model: nn.Module, qtype: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        raise NotOffered(f"{self.name} does not quantize after loading")

    def quantize_for(self, model: nn.Module, qtype: str, *, dtype: torch.dtype, device: torch.device,
                     offload: str) -> nn.Module:
        """quantize() for a cell that runs with `offload`: what the stacks call after loading. An engine whose
        placement depends on the offload mode (SDNQ, as SD.Next places it) overrides it."""
        return self.quantize(model, qtype, dtype=dtype, device=device)

    # -- on-the-fly: quantize one float layer as it arrives from the checkpoint.
    def quantize_layer(self, layer: nn.Linear, qtype: str, *, dtype: torch.dtype,
                       device: torch.device) -> nn.Module:
        raise NotOffered(f"{self.name} does not quantize while loading")

    # -- prequantized: the engine's own file format.
    def save(self, model: nn.Module, qtype: str, path: Path) -> Path:
        raise NotOffered(f"{self.name} has no file format of its own")

    def load(self, path: Path, skeleton: nn.Module, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        raise NotOffered(f"{self.name} has no file format of its own")

    # -- prequantized, a whole pipeline: the engine's own API writes a pipeline directory (diffusers' layout) from
    # the float pipeline; `prompts` for an engine that calibrates on generations. Engines without one have the
    # diffusers stack write it (save_pretrained after quantizing while loading).
    def save_pipeline(self, pipe, qtype: str, path: Path, prompts: list[str]) -> None:
        raise NotOffered(f"{self.name} writes no pipeline directory of its own")

    def recognise(self, path: Path) -> str | None:
        """The quant type stored in `path` if this engine wrote it (judged from contents), else None."""
        return None
