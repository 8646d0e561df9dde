"""Treatments: what is added on top of a quantized model (layerwise casting, a LoRA, torch.compile), each one module
of this package and its axis in harness/cell.py (an `Axis` whose `treatment` is true).

A treatment module defines `TREATMENT`, a `Treatment` (base.py): what it does not offer (decided before a cell
runs), the stage it runs in and when (with the load, before or after the offload), `apply(model, cell, context)`
-> `Applied` (its figures for the record, its hooks into the cell's steps), what it adds to the float model whose
output judges the cell, and the cell a treated cell is timed beside. The run (run/execute.py) applies them in
`TREATMENTS`' order, the float reference it is timed beside too. A new treatment is a module here and its axis.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Callable

from harness.treatments.base import AFTER_OFFLOAD, AT_LOAD, BEFORE_OFFLOAD, Applied, Context, Treatment, denoiser


def _registered() -> tuple[Treatment, ...]:
    found = [importlib.import_module(f"{__name__}.{m.name}").TREATMENT
             for m in pkgutil.iter_modules(__path__) if m.name != "base"]
    return tuple(sorted(found, key=lambda t: t.order))


TREATMENTS: tuple[Treatment, ...] = _registered()
Done = list[tuple[Treatment, Applied]]


def not_offered(cell) -> str | None:
    """Why one of the cell's treatments does not exist for it, or None."""
    return next((why for t in TREATMENTS if (why := t.not_offered(cell))), None)


def apply(model, cell, context: Context, when: str, on_stage: Callable | None = None) -> Done:
    """Apply the cell's treatments that apply `when` (AT_LOAD, BEFORE_OFFLOAD, AFTER_OFFLOAD), in order; each one's
    stage is announced first (`on_stage(stage)`: the record says where an error happened)."""
    done = []
    for t in TREATMENTS:
        if t.when == when and t.present(cell):
            if on_stage is not None:
                on_stage(t.stage)
            applied = t.apply(model, cell, context)
            if applied is not None:
                done.append((t, applied))
    return done


@contextlib.contextmanager
def calls(done: Done):
    """Around one call of the cell's model: every applied treatment's `call`."""
    with contextlib.ExitStack() as stack:
        for _, applied in done:
            stack.enter_context(applied.call())
        yield


def reference_suffix(cell) -> str:
    """The reference output's file-name part for what the cell's treatments add to the float model ("": none)."""
    return "".join(t.reference_suffix(cell) for t in TREATMENTS)


def on_reference(model, cell, seed: int) -> None:
    """Add to the float model that makes the reference output what the cell's treatments put in it."""
    for t in TREATMENTS:
        t.on_reference(model, cell, seed)


def timed_beside(cell):
    """(the cell a treated cell is timed beside, the metric its ratio is recorded as), or None: its treatments
    leave the choice to the run (its baseline)."""
    return next(((beside, t.paired_metric) for t in TREATMENTS if (beside := t.timed_beside(cell)) is not None),
                None)


__all__ = ["AFTER_OFFLOAD", "AT_LOAD", "BEFORE_OFFLOAD", "TREATMENTS", "Applied", "Context", "Treatment", "apply",
           "calls", "denoiser", "not_offered", "on_reference", "reference_suffix", "timed_beside"]
