"""The interface every treatment offers (see the package's docstring)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from harness.verdict import Stage


def denoiser(model: nn.Module) -> nn.Module:
    """The module a treatment acts on: a pipeline's denoiser (`pipe.transformer`), else the model itself."""
    return getattr(model, "denoiser", model)


@dataclass
class Context:
    """What a treatment may read beside the model and the cell: the run's seed, and the float model's skeleton
    (layers named as the loaded model's; built once, on demand)."""

    seed: int
    build_skeleton: Callable[[], nn.Module]
    _skeleton: nn.Module | None = field(default=None, repr=False)

    @property
    def skeleton(self) -> nn.Module:
        if self._skeleton is None:
            self._skeleton = self.build_skeleton()
        return self._skeleton


@dataclass
class Applied:
    """What a treatment did to one model. `figures()` after the steps: the record's `metrics[metric]`. `call`:
    a context around each call of the cell's model (compile's checks). `judge(output, figures, plain)`: more
    figures from the cell's output against the float model's without any treatment (`plain`), raising where the
    treatment was lost (a LoRA the engine dropped)."""

    figures: Callable[[], dict] = dict
    call: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    judge: Callable[[Any, dict, Any], dict] | None = None


# When a treatment applies: with the load (its effect on storage is counted: casting), after it and before the
# offload's hooks (a LoRA), or after the offload (torch.compile, as users compile last).
AT_LOAD, BEFORE_OFFLOAD, AFTER_OFFLOAD = "at load", "before offload", "after offload"


class Treatment:
    """One treatment: its axis, its order among the others, its stage, and what it does. Subclasses override
    `not_offered` and `apply`; the rest has defaults (nothing added to the float reference, timed beside the
    baseline)."""

    axis: str = ""  # its axis in harness/cell.py
    order: int = 0  # applied in this order: casting, then the LoRA, then (after the offload) compile
    stage: Stage = Stage.LOAD  # the record's stage while it applies
    when: str = AT_LOAD  # AT_LOAD, BEFORE_OFFLOAD or AFTER_OFFLOAD
    first_call: bool = False  # its work happens in the model's first call (torch.compile): that call is its stage
    metric: str | None = None  # where its figures go in the record's metrics (None: it records none)
    paired_metric: str = ""  # where the ratio goes when timed_beside() names a cell

    def present(self, cell) -> bool:
        """Whether the cell has any of it (its axis off its default)."""
        from harness.cell import AXES

        return getattr(cell, self.axis) != AXES[self.axis].default

    def not_offered(self, cell) -> str | None:
        """Why the cell's value of it does not exist for the cell, or None (decided before it runs)."""
        return None

    def apply(self, model: nn.Module, cell, context: Context) -> Applied | None:
        """Apply it to the loaded model as users do (called only for a cell that has it: present()); None where it
        records nothing."""
        raise NotImplementedError

    def reference_suffix(self, cell) -> str:
        """What the float model whose output judges the cell carries of it, as a file-name part ("" for nothing:
        the cell is judged against the plain float model's output)."""
        return ""

    def on_reference(self, model: nn.Module, cell, seed: int) -> None:
        """Add to that float model what reference_suffix() names (a LoRA: the output a user expects)."""

    def timed_beside(self, cell):
        """The cell a treated cell is timed beside instead of its baseline (compile: itself uncompiled), or None."""
        return None
