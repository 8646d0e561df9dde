"""The one small interface every engine implements.

An engine module imports only this module and its own third-party package (lazily, inside methods, so that
listing engines and loading a matrix never import torch extensions). Errors raised by the engine's package are
never caught here: they are what the harness exists to record.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch
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
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            set_submodule(model, name, make(module, name) if with_names else make(module))
    return model


class NotOffered(Exception):
    """The engine does not offer this operation at all (a fact about the engine, not a failure)."""


class Engine:
    name: ClassVar[str]
    #: quant types this engine offers; the baseline has the single type "-".
    qtypes: ClassVar[tuple[str, ...]]
    #: load modes it implements, of "post-load", "on-the-fly", "prequantized".
    loads: ClassVar[tuple[str, ...]] = ("post-load",)
    #: the distribution whose import and version decide availability (None: needs nothing beyond torch).
    package: ClassVar[str | None] = None
    import_name: ClassVar[str | None] = None
    #: test-only engines are left out of a matrix's "*".
    hidden: ClassVar[bool] = False

    def version(self) -> str | None:
        if self.package is None:
            return torch.__version__
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return None

    def import_package(self) -> None:
        """Import the engine's package (the cell server preloads it; a cell imports it before memory is tracked).
        An engine whose import starts threads or phones home says here how to keep it from doing so."""
        if self.package is not None:
            importlib.import_module(self.import_name or self.package)

    def unavailable_reason(self, qtype: str, device: str) -> str | None:
        """Why this engine cannot run `qtype` on `device` here, or None when it can."""
        if self.package is not None and importlib.util.find_spec(self.import_name or self.package) is None:
            return f"engine package {self.package!r} is not installed"
        return None

    # -- post-load: quantize a float model that sits in memory (on the CPU).
    def quantize(self, model: nn.Module, qtype: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        raise NotOffered(f"{self.name} does not quantize after loading")

    # -- on-the-fly: quantize one float layer as it arrives from the checkpoint.
    def quantize_layer(self, layer: nn.Linear, qtype: str, *, dtype: torch.dtype,
                       device: torch.device) -> nn.Module:
        raise NotOffered(f"{self.name} does not quantize while loading")

    # -- prequantized: the engine's own file format.
    def save(self, model: nn.Module, qtype: str, path: Path) -> Path:
        raise NotOffered(f"{self.name} has no file format of its own")

    def load(self, path: Path, skeleton: nn.Module, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        raise NotOffered(f"{self.name} has no file format of its own")

    def recognise(self, path: Path) -> str | None:
        """The quant type stored in `path` if this engine wrote it (judged from contents), else None."""
        return None

    #: suffix of the files `save` writes.
    file_suffix: ClassVar[str] = ".safetensors"
