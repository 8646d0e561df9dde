"""torch.compile on top of quantization, casting and offload (the `compile` axis), applied last, as users do.

- `regional`: diffusers' `ModelMixin.compile_repeated_blocks(fullgraph=...)`: each block class the model declares
  in `_repeated_blocks` is compiled in place (diffusers' modeling_utils.py; it raises ValueError without them).
- `full`: the whole denoiser, `module.compile(fullgraph=...)`: `torch.compile` of the module's call, in place, so
  that the offload hooks and the pipeline keep holding the same module (what `pipe.transformer.compile()` in
  diffusers' docs does; `torch.compile(module)` would return a wrapper the pipeline does not call).

As diffusers' quantization tests compile (`options`): `fullgraph=True`, so a graph break is an error, and
`error_on_recompile`, so a recompile is one too, where those tests do. On a CPU inductor builds C++; its caches are
the run's (run/pool.py).

`Watch` records what compiling did (the record's `compile`: the first call's seconds, the graphs dynamo built,
graph breaks, recompiles) and checks that compiled code ran: a forward pre-hook on each compiled module notes
whether the module ran inside a compiled graph (`torch.compiler.is_compiling()`: dynamo traces the hook and
replays its side effect on every compiled call) or eagerly. A module that ran eagerly after compiling (the blocks
accelerate#4253 silently runs uncompiled) fails the cell: `CompiledCodeNotRun`.
"""

from __future__ import annotations

import contextlib
import functools
import time

import torch
from torch import nn

from harness.cell import AXES
from harness.treatments.base import AFTER_OFFLOAD, Applied, Context, Treatment, denoiser
from harness.verdict import Stage

MODES = AXES["compile"].known()


class CompiledCodeNotRun(RuntimeError):
    """A module compiled for the cell ran eagerly: compiling silently did nothing for it."""


@functools.cache
def _repeated_blocks(model: str) -> tuple[str, ...] | None:
    """The block classes diffusers' class for the model declares for regional compilation; None for the harness's
    own imitation modules (not diffusers models)."""
    from harness.models.specs import MODELS, REAL_CLASSES

    spec = MODELS[model]
    if not spec.real:
        return None
    import diffusers

    return tuple(getattr(getattr(diffusers, REAL_CLASSES[spec.kind]), "_repeated_blocks", ()) or ())


def not_offered(cell) -> str | None:
    """Why the cell's compile mode does not exist for its model, or None (decided before it runs)."""
    if cell.compile != "regional":
        return None
    blocks = _repeated_blocks(cell.model)
    if blocks is None:
        return (f"regional compilation is diffusers' ModelMixin.compile_repeated_blocks; {cell.model} is one of the "
                f"harness's own modules, not a diffusers model")
    if not blocks:
        from harness.models.specs import MODELS, REAL_CLASSES

        return (f"diffusers' {REAL_CLASSES[MODELS[cell.model].kind]} declares no _repeated_blocks: "
                f"compile_repeated_blocks raises ValueError for it")
    return None


def _targets(module: nn.Module, mode: str) -> list[nn.Module]:
    if mode == "full":
        return [module]
    names = set(getattr(module, "_repeated_blocks", ()) or ())
    return [m for m in module.modules() if type(m).__name__ in names]


def _counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}


class Watch:
    """A compiled model's record. Each call of the cell's own model runs in `call()`: the first compiles (it is
    timed), every one is checked to have run compiled (CompiledCodeNotRun), and a recompile raises where
    diffusers' tests make it an error. Dynamo's counters are read around these calls only, so the graphs that
    other code builds between them (the uncompiled reference the cell is timed beside: SDNQ's own compiled
    dequantize, its quantize on load) are neither counted nor guarded. `figures()` after the steps.

    The hooks count compiled calls in a tensor (dynamo puts the increment in the graph: a Python counter's value
    would be a guard, and every call a recompile) and note eager calls in a set (dead code once traced)."""

    def __init__(self, mode: str, targets: list[nn.Module], options: dict):
        self.mode, self.targets, self.options = mode, targets, options
        self.compiled_calls = torch.zeros((), dtype=torch.int64)
        self.eager: set[str] = set()
        self.handles = [t.register_forward_pre_hook(self._hook) for t in targets]
        self.first_s: float | None = None
        self.graphs = self.graph_breaks = self.recompiles = 0

    def _hook(self, module, args) -> None:
        if torch.compiler.is_compiling():
            self.compiled_calls.add_(1)
        else:
            self.eager.add(type(module).__name__)

    @contextlib.contextmanager
    def call(self):
        """Around one call of the cell's model."""
        guard = (torch._dynamo.config.patch(error_on_recompile=True) if self.options["error_on_recompile"]
                 else contextlib.nullcontext())
        before, started = _counts(), time.perf_counter()
        with guard:
            yield
        after = _counts()
        built = after["graphs"] - before["graphs"]
        self.graph_breaks += after["graph_breaks"] - before["graph_breaks"]
        if self.first_s is None:
            self.first_s, self.graphs = time.perf_counter() - started, built
        else:
            self.recompiles += built
        self.check()

    def check(self) -> None:
        if self.eager:
            raise CompiledCodeNotRun(
                f"{self.mode} compile: {', '.join(sorted(self.eager))} ran eagerly after compiling (compiled code "
                f"did not run); dynamo built {self.graphs + self.recompiles} graphs, compiled calls "
                f"{int(self.compiled_calls)}")

    def figures(self) -> dict:
        return {"mode": self.mode, **self.options, "first_call_s": self.first_s, "modules": len(self.targets),
                "compiled_calls": int(self.compiled_calls), "graphs": self.graphs,
                "graph_breaks": self.graph_breaks, "recompiles": self.recompiles}


def options(offload: str) -> dict:
    """How diffusers' quantization tests compile in each offload mode (tests/quantization/test_torch_compile_utils.py
    at v0.42: QuantCompileTests): fullgraph, and a recompile an error, without offload; fullgraph with model
    offload; neither with group offload (its onload hooks are torch.compiler.disable'd: a graph break by design).
    The harness compiles so in every mode (sequential and balanced: as model offload)."""
    return {"fullgraph": offload != "group", "error_on_recompile": offload == "none"}


def apply(model: nn.Module, mode: str, offload: str) -> Watch | None:
    """Compile the model's denoiser in the mode (after quantization, casting and offload were applied), with
    diffusers' tests' options for the offload mode; None for "-". The compile itself happens on the first call,
    which the Watch times."""
    if mode == "-":
        return None
    module, fullgraph = denoiser(model), options(offload)["fullgraph"]
    watch = Watch(mode, _targets(module, mode), options(offload))
    if mode == "regional":
        module.compile_repeated_blocks(fullgraph=fullgraph)
    elif mode == "full":
        module.compile(fullgraph=fullgraph)
    else:
        raise ValueError(f"unknown compile mode {mode!r}; expected one of {MODES}")
    return watch


# In a standalone repro script (harness/repro.py reads it as text): `options` per offload mode as constants
# (tests/test_repro.py checks they agree), the call per mode (as `apply`), and what each call runs under.
REPRO = {"axis": "compile",
         "constants": {"none": "FULLGRAPH, ERROR_ON_RECOMPILE = True, True  # diffusers' tests' compile options",
                       "group": "FULLGRAPH, ERROR_ON_RECOMPILE = False, False  # diffusers' tests' compile options",
                       "*": "FULLGRAPH, ERROR_ON_RECOMPILE = True, False  # diffusers' tests' compile options"},
         "apply": {"regional": "model.compile_repeated_blocks(fullgraph=FULLGRAPH)  # each class in _repeated_blocks",
                   "full": "model.compile(fullgraph=FULLGRAPH)  # the whole module, in place"},
         "call": "torch._dynamo.config.patch(error_on_recompile=ERROR_ON_RECOMPILE)"}


class Compiling(Treatment):
    """torch.compile of the denoiser, after the offload; its first call compiles (the record's compile stage).
    Timed beside the same cell uncompiled: what compiling buys."""

    axis, order, stage, metric, when = "compile", 2, Stage.COMPILE, "compile", AFTER_OFFLOAD
    first_call, paired_metric = True, "latency_vs_uncompiled"

    def not_offered(self, cell) -> str | None:
        return not_offered(cell)

    def apply(self, model: nn.Module, cell, context: Context) -> Applied | None:
        watch = apply(model, cell.compile, cell.offload)
        return None if watch is None else Applied(figures=watch.figures, call=watch.call)

    def timed_beside(self, cell):
        return cell.replace(compile="-") if self.present(cell) else None


TREATMENT = Compiling()
