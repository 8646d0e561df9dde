"""Run one cell in this process: build or load the model, quantize, offload, measure. Returns an Outcome.

Errors raised by an engine, by accelerate or by torch are data: they end up in the Outcome with the stage they
happened in. This module runs inside the cell's isolated process (see isolation.py).
"""

from __future__ import annotations

import functools
import importlib.util
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from harness import devices
from harness.cell import Cell
from harness.engines.base import Engine, NotOffered
from harness.engines.registry import ENGINES
from harness.matrix import Settings
from harness.models.build import build_skeleton, components, make_inputs, run
from harness.models.specs import MODELS
from harness.offload import apply_offload
from harness.results import absent_device_reason
from harness.run import diffusers_stack, loading, measure
from harness.verdict import Absence, ErrorInfo, Outcome, Stage, Status


@dataclass(frozen=True)
class CellTask:
    cell: Cell
    settings: Settings
    workdir: Path  # shared by the run's cells: reference outputs, checkpoints, pre-quantized files


def unavailable(cell: Cell) -> Outcome | None:
    """The harness's own knowledge that the cell cannot run on this host, or None (cheap: no accelerator is
    initialized). Only this and an engine's NotOffered make a cell unavailable."""
    reason = devices.unavailable_reason(cell.device)
    if reason:
        return Outcome.unavailable(Absence.DEVICE, absent_device_reason(cell.device, reason))
    engine = ENGINES[cell.engine]
    if cell.stack == "direct" and cell.load not in engine.loads:
        return Outcome.unavailable(Absence.NOT_OFFERED, f"engine {engine.name} does not offer the {cell.load} "
                                                        "load mode")
    if (cell.stack == "diffusers" or cell.offload == "group") and importlib.util.find_spec("diffusers") is None:
        return Outcome.unavailable(Absence.PACKAGE, "package 'diffusers' is not installed (the diffusers stack "
                                                    "and group offload run on it)")
    reason = engine.unavailable_reason(cell.qtype, cell.device)
    return None if reason is None else Outcome.unavailable(Absence.PACKAGE, reason)


# The packages a stack is made of, and how many components of a module name say which layer of it raised:
# diffusers.quantizers.gguf, accelerate.hooks, optimum.quanto, bitsandbytes, harness.engines.gguf_engine.
LAYER_DEPTH = {"diffusers": 3, "accelerate": 2, "optimum": 2, "transformers": 2, "harness": 3, "bitsandbytes": 1,
               "gguf": 1, "nncf": 1, "sdnq": 1, "torchao": 1}


def layer_of(modules: list[str]) -> str:
    """The layer that raised, from the module names of a traceback's frames, outermost first: the innermost frame
    in one of the stack's packages (torch and the standard library are where errors surface, not whose they
    are); the innermost frame's package when no such frame exists."""
    for module in reversed(modules):
        top = module.split(".")[0]
        if top in LAYER_DEPTH:
            return ".".join(module.split(".")[:LAYER_DEPTH[top]])
    return modules[-1].split(".")[0] if modules else ""


def error_info(exc: BaseException, stage: Stage) -> ErrorInfo:
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    modules, tb = [], exc.__traceback__
    while tb is not None:
        modules.append(tb.tb_frame.f_globals.get("__name__", "?"))
        tb = tb.tb_next
    return ErrorInfo(type(exc).__name__, str(exc), where, stage, modules[-1] if modules else "", layer_of(modules))


@contextmanager
def recorded_warnings(into: list[str], limit: int = 10) -> Iterator[None]:
    """Collect the distinct warnings raised inside (diffusers' deprecations are findings): "Category: message"."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                text = f"{w.category.__name__}: {str(w.message)[:300]}"
                if text not in into and len(into) < limit:
                    into.append(text)


def reference_path(task: CellTask) -> Path:
    cell, s = task.cell, task.settings
    return task.workdir / "references" / f"{cell.model}-{cell.dtype}-{cell.device}-seed{s.seed}-b{s.batch}.safetensors"


def reference_output(task: CellTask, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The unquantized model's output for this model, dtype, device and seed, computed once per run."""
    from safetensors.torch import load_file, save_file

    cell, s = task.cell, task.settings

    def make(tmp: Path) -> None:
        model = diffusers_stack.float_model(task.workdir, cell.model, s.seed, getattr(torch, cell.dtype))
        model = model.to(devices.torch_device(cell.device))
        with torch.no_grad():
            save_file({"output": run(model, inputs).cpu().contiguous()}, str(tmp))

    return load_file(str(loading.shared_file(reference_path(task), make)))["output"]


def _float_model(task: CellTask, dtype: torch.dtype) -> Callable[[], nn.Module]:
    """The cell's float model in `dtype`, when called: drawn from its seed, or loaded from the run's float directory
    for a model with shared weights (diffusers_stack.float_model)."""
    return functools.partial(diffusers_stack.float_model, task.workdir, task.cell.model, task.settings.seed, dtype)


def files_to_prepare(task: CellTask) -> list[Path]:
    """The shared files this cell needs that do not exist yet."""
    cell, s = task.cell, task.settings
    dtype = getattr(torch, cell.dtype)
    needed = [reference_path(task)]
    if cell.stack == "diffusers" or MODELS[cell.model].shared_weights:  # the float model's shared directory
        needed.append(diffusers_stack.float_dir_path(task.workdir, cell.model, s.seed, dtype))
    if cell.stack == "diffusers":
        if cell.load == "prequantized":
            needed.append(diffusers_stack.prequantized_path(task.workdir, ENGINES[cell.engine], cell.qtype,
                                                            cell.model, dtype, s.seed))
    elif cell.load == "on-the-fly":
        needed.append(loading.float_checkpoint_path(task.workdir, cell.model, s.seed,
                                                    diffusers_stack.stored_dtype(cell.model, dtype)))
    elif cell.load == "prequantized":
        needed.append(loading.prequantized_path(task.workdir, ENGINES[cell.engine], cell.qtype, cell.model,
                                                getattr(torch, cell.dtype), s.seed))
    return [p for p in needed if not p.exists()]


def prepare_cell(task: CellTask) -> tuple[dict[str, torch.Tensor], torch.Tensor, Path | None]:
    """The cell's inputs, reference output and source file (float checkpoint or pre-quantized file), made once
    per run. The runner calls this in a process of its own first, so that building the float model for them
    leaves nothing behind (freed heap, imports) in the process whose memory is measured."""
    cell, s = task.cell, task.settings
    dtype, device = getattr(torch, cell.dtype), devices.torch_device(cell.device)
    torch.manual_seed(s.seed)
    inputs = make_inputs(cell.model, s.seed, s.batch, dtype, device)
    reference = reference_output(task, inputs)
    source = None
    if cell.stack == "diffusers":
        source = diffusers_stack.float_dir(task.workdir, cell.model, s.seed, dtype)
        if cell.load == "prequantized":
            source = diffusers_stack.prequantized(task.workdir, ENGINES[cell.engine], cell.qtype, cell.model, dtype,
                                                  s.seed)
    elif cell.load == "on-the-fly":
        stored = diffusers_stack.stored_dtype(cell.model, dtype)
        source = loading.float_checkpoint(task.workdir, cell.model, s.seed, stored, _float_model(task, stored))
    elif cell.load == "prequantized":
        source = loading.prequantized_file(task.workdir, ENGINES[cell.engine], cell.qtype, cell.model, dtype, s.seed,
                                           _float_model(task, dtype))
    return inputs, reference, source


class _Progress:
    """How far a cell got (the stage an error is reported in) and the device it ran on."""

    def __init__(self) -> None:
        self.stage = Stage.PREPARE
        self.device: dict = {}


def execute_cell(task: CellTask) -> Outcome:
    """Run the cell and turn what happened into an Outcome: measured, unavailable, or the error and its stage."""
    absent = unavailable(task.cell)
    if absent is not None:
        return absent
    progress = _Progress()
    raised: list[str] = []
    try:
        with recorded_warnings(raised):
            metrics = _measure(task, progress)
    except NotOffered as exc:  # a fact about the engine, declared by the harness's own engine module
        return Outcome.unavailable(Absence.NOT_OFFERED, str(exc))
    except Exception as exc:  # engine, diffusers, accelerate and torch errors are the findings
        status = Status.OOM if devices.is_oom(exc) else Status.ERROR
        return Outcome(status, error=error_info(exc, progress.stage),
                       reason=f"{type(exc).__name__} during {progress.stage}", device=progress.device,
                       warnings=raised)
    return Outcome(Status.RAN, metrics=metrics, device=progress.device, warnings=raised)


def _measure(task: CellTask, progress: _Progress) -> dict:
    """Load (and quantize), count storage, offload, run and time the steps; the figures of the record."""
    cell, s = task.cell, task.settings
    engine = ENGINES[cell.engine]
    dtype = getattr(torch, cell.dtype)
    progress.device = devices.device_info(cell.device)
    inputs, reference, source = prepare_cell(task)
    layout = measure.float_layout(build_skeleton(cell.model, dtype))
    engine.import_package()  # before memory is tracked (a no-op when the cell server preloaded it)
    tracker = devices.memory_tracker(cell.device)
    tracker.reset()
    mem_base = tracker.current()

    progress.stage = Stage.LOAD
    loaded = _load(task, engine, source)
    model = loaded.model.eval()
    if cell.cast != "-":  # as SD.Next applies it: on the loaded (quantized) model
        model.enable_layerwise_casting(storage_dtype=getattr(torch, cell.cast), compute_dtype=dtype)
    tracker.sample()
    # Storage is counted before offload: offload hooks replace weights with placeholders.
    param_bytes, bpw = measure.stored_bytes(model), measure.bits_per_weight(model, layout)

    progress.stage = Stage.OFFLOAD
    after_step, offload_notes = apply_offload(model, cell.offload, cell.device, stack=cell.stack,
                                              components=components(cell.model, model), settings=s)
    progress.stage = Stage.FORWARD
    output, error, latency = _run_steps(task, model, inputs, reference, after_step, tracker)
    metrics = {
        "param_bytes": param_bytes,
        "disk_bytes": loaded.disk_bytes if loaded.disk_bytes is not None else param_bytes,
        "disk_is_file": loaded.disk_bytes is not None,
        "bits_per_weight": bpw,
        "peak_mem_bytes": tracker.peak(),
        "mem_base_bytes": mem_base,
        "mem_kind": tracker.kind,
        "latency_ms": latency.as_dict(),
        "quantize_s": loaded.quantize_s,
        "load_s": loaded.load_s,
        **error.as_dict(),
        "output_sha256": measure.digest(output),
    }
    if offload_notes:
        metrics["offload_notes"] = offload_notes
    if loaded.name_hint is not None:
        metrics["name_hint"], metrics["name_hint_detail"] = loaded.name_hint, loaded.name_hint_detail
    return metrics


def _load(task: CellTask, engine: Engine, source: Path | None) -> loading.Loaded:
    cell, s = task.cell, task.settings
    dtype, device = getattr(torch, cell.dtype), devices.torch_device(cell.device)
    if cell.stack == "diffusers":
        if cell.load == "post-load":
            return diffusers_stack.load_post(engine, cell.qtype, cell.model, source, dtype, device)
        if cell.load == "on-the-fly":
            return diffusers_stack.load_on_the_fly(engine, cell.qtype, cell.model, source, dtype)
        return diffusers_stack.load_prequantized(engine, cell.qtype, cell.model, source,
                                                 diffusers_stack.float_dir(task.workdir, cell.model, s.seed, dtype),
                                                 dtype)
    if cell.load == "post-load":
        return loading.load_post(engine, cell.qtype, _float_model(task, dtype), dtype, device)
    if cell.load == "on-the-fly":
        return loading.load_on_the_fly(engine, cell.qtype, cell.model, source, dtype, device)
    return loading.load_prequantized(engine, cell.qtype, cell.model, source, dtype, device)


def _run_steps(task: CellTask, model, inputs: dict, reference: torch.Tensor, after_step, tracker):
    """The first step's output and its error against the float model's, then the timed steps."""
    cell, s = task.cell, task.settings
    with torch.no_grad():
        output = run(model, inputs)
        after_step()
        tracker.sample()
        error = measure.output_error(output, reference)

        def step() -> None:
            run(model, inputs)
            tracker.sample()

        latency = measure.time_steps(step, cell.device, warmup=s.warmup, min_steps=s.min_steps,
                                     max_steps=s.max_steps, min_time_s=s.min_time_s, after_step=after_step)
    return output, error, latency
