"""The interface every stack implements: the shared files a cell's load needs, loading (and quantizing) the
model, and offloading it. What a stack offers is data in catalog.py (decided before a cell runs); a subclass names
its entry (`name = "direct"`) and gets it as `info`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from harness.stacks.catalog import STACK_CATALOG, StackInfo

if TYPE_CHECKING:
    from torch import nn

    from harness.engines.base import Engine
    from harness.offload import Installed
    from harness.settings import Settings
    from harness.stacks.loading import Loaded


@dataclass(frozen=True)
class SharedFile:
    """A file of the run's work directory that cells share: where it is, how it is made (`make(tmp)` writes it),
    and whether it is the cell's source (what its load reads) or only needed to make one."""

    path: Path
    make: Callable[[Path], object]
    source: bool = True


class Stack:
    name: ClassVar[str]
    info: ClassVar[StackInfo]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.info = STACK_CATALOG[cls.name]

    def files(self, task) -> list[SharedFile]:
        """The shared files the cell's load needs, in the order they are made (keys worked out here only)."""
        raise NotImplementedError

    def load(self, task, engine: Engine, source: Path | None) -> Loaded:
        """The cell's model, loaded (and quantized) from `source` (its source file, None: drawn in memory)."""
        raise NotImplementedError

    def offload(self, model: nn.Module, mode: str, device: str, *, components: list[nn.Module],
                settings: Settings) -> Installed:
        """Install the offload mode's hooks as this stack's users do (offload.Installed: what to run after each
        generation, notes, balanced offload's moves)."""
        raise NotImplementedError
