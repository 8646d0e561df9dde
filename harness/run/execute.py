"""Run one cell in this process: build or load the model, quantize, offload, measure. Returns an Outcome.

Errors raised by an engine, by accelerate or by torch are data: they end up in the Outcome with the stage they
happened in. This module runs inside the cell's isolated process (see isolation.py).
"""

from __future__ import annotations

import importlib.util
import re
import statistics
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from harness import devices, treatments
from harness.cell import Cell
from harness.engines.base import NotOffered
from harness.engines.catalog import CATALOG
from harness.engines.registry import ENGINES
from harness.models.build import build_skeleton, components, make_inputs, run
from harness.models.pipelines import PipelineModel
from harness.models.sources import register_all
from harness.models.specs import MODELS, component_names
from harness.results import absent_device_reason
from harness.run import measure
from harness.settings import Settings
from harness.stacks import loading
from harness.stacks.base import SharedFile
from harness.stacks.catalog import not_offered, packages_needed
from harness.stacks.registry import stack_of
from harness.verdict import Absence, ErrorInfo, Outcome, Stage, Status


@dataclass(frozen=True)
class CellTask:
    cell: Cell
    settings: Settings
    workdir: Path  # shared by the run's cells: reference outputs, checkpoints, pre-quantized files


def unavailable(cell: Cell) -> Outcome | None:
    """The harness's own knowledge that the cell cannot run on this host, or None (cheap: no accelerator is
    initialized, no file is made). Only this and an engine's NotOffered make a cell unavailable."""
    reason = devices.unavailable_reason(cell.device)
    if reason:
        return Outcome.unavailable(Absence.DEVICE, absent_device_reason(cell.device, reason))
    reason = not_offered(cell) or treatments.not_offered(cell) or \
        ENGINES[cell.engine].device_reason(cell.qtype, cell.device)
    if reason:
        return Outcome.unavailable(Absence.NOT_OFFERED, reason)
    for package in packages_needed(cell):
        if importlib.util.find_spec(package) is None:
            return Outcome.unavailable(Absence.PACKAGE, f"package {package!r} is not installed (the {cell.stack} "
                                                        f"stack, diffusers' model classes, group offload or the "
                                                        f"LoRA run on it)")
    reason = ENGINES[cell.engine].unavailable_reason(cell.qtype, cell.device)
    return None if reason is None else Outcome.unavailable(Absence.PACKAGE, reason)


# How many components of a module name say which layer raised, for the packages a stack is made of (the engines'
# depths are catalog data): diffusers.quantizers.gguf, accelerate.hooks, optimum.quanto, harness.engines.gguf_engine.
STACK_LAYER_DEPTH = {"diffusers": 3, "accelerate": 2, "transformers": 2, "harness": 3}
LAYER_DEPTH = {**STACK_LAYER_DEPTH, **{e.module: e.layer_depth for e in CATALOG.values() if e.module}}


def layer_of(modules: list[str]) -> str:
    """The layer that raised, from the module names of a traceback's frames, outermost first: the innermost frame
    in one of the stack's packages (torch and the standard library are where errors surface, not whose they
    are); the innermost frame's package when no such frame exists."""
    for module in reversed(modules):
        top = module.split(".")[0]
        if top in LAYER_DEPTH:
            return ".".join(module.split(".")[:LAYER_DEPTH[top]])
    return modules[-1].split(".")[0] if modules else ""


def compiler_layer(exc: BaseException) -> str:
    """torch.compile's layer that raised, from the exception's class: dynamo (tracing: a graph break under
    fullgraph, a recompile), inductor (building the graph: dynamo reports it as BackendCompilerFailed); "" for
    any other error."""
    module = type(exc).__module__
    if module.startswith("torch._inductor") or type(exc).__name__ == "BackendCompilerFailed":
        return "torch._inductor"
    return "torch._dynamo" if module.startswith("torch._dynamo") else ""


def user_code(message: str) -> str:
    """The module of the innermost frame outside torch of the code dynamo was tracing ("from user code:" in its
    messages; torch's own frames, Tensor methods and Module.__call__, are the plumbing): where a compile error's
    cause lies (an engine's tensor subclass or torch-function mode, a hook), as a module name."""
    _, found, rest = message.partition("from user code:")
    files = re.findall(r'File "([^"]+)\.py"', rest) if found else []
    outside = [f for f in files if not re.search(r"(?:site|dist)-packages/torch/", f)]
    if not files:
        return ""
    path = (outside or files)[-1]
    inside = re.search(r"(?:site|dist)-packages/(.+)$", path) or re.search(r"/(harness/.+)$", path)
    return (inside.group(1) if inside else Path(path).name).replace("/", ".")


def error_info(exc: BaseException, stage: Stage) -> ErrorInfo:
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    modules, tb = [], exc.__traceback__
    while tb is not None:
        modules.append(tb.tb_frame.f_globals.get("__name__", "?"))
        tb = tb.tb_next
    compiler = compiler_layer(exc)
    if compiler:  # dynamo's frames are where it surfaces; the traced code it names is where it comes from
        return ErrorInfo(type(exc).__name__, str(exc), where, stage, user_code(str(exc)) or modules[-1], compiler)
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


def reference_path(task: CellTask, plain: bool = False) -> Path:
    """The float model's output file for the cell (`plain`: without what its treatments add to it)."""
    cell, s = task.cell, task.settings
    added = "" if plain else treatments.reference_suffix(cell)
    return (task.workdir / "references"
            / f"{cell.model}-{cell.dtype}-{cell.device}-seed{s.seed}-b{s.batch}{added}.safetensors")


def _reference_file(task: CellTask, inputs: dict[str, torch.Tensor] | None, plain: bool) -> SharedFile:
    """The unquantized model's output for this model, dtype, device and seed (with what the cell's treatments add
    to it, a LoRA unfused, unless `plain`), computed once per run."""
    cell, s = task.cell, task.settings

    def make(tmp: Path) -> None:
        from safetensors.torch import save_file

        model = loading.float_model(task.workdir, cell.model, s.seed, getattr(torch, cell.dtype))
        if not plain:
            treatments.on_reference(model, cell, s.seed)
        model = model.to(devices.torch_device(cell.device))
        with torch.no_grad():
            output = run(model, inputs)
        outputs = output if isinstance(output, dict) else {"output": output}
        save_file({k: v.cpu().contiguous() for k, v in outputs.items()}, str(tmp))

    return SharedFile(reference_path(task, plain), make, source=False)


def shared_files(task: CellTask, inputs: dict[str, torch.Tensor] | None = None) -> list[SharedFile]:
    """Every shared file the cell needs: its stack's (float model, checkpoint, pre-quantized file), then the float
    model's reference output (with what the cell's treatments add, a LoRA; the plain one before). The one place
    their keys are worked out."""
    plain = [_reference_file(task, inputs, True)] if reference_path(task) != reference_path(task, True) else []
    return [*stack_of(task.cell).files(task), *plain, _reference_file(task, inputs, False)]


def files_to_prepare(task: CellTask) -> list[Path]:
    """The shared files this cell needs that do not exist yet."""
    return [f.path for f in shared_files(task) if not f.path.exists()]


def prepare_cell(task: CellTask) -> tuple[dict, torch.Tensor | dict[str, torch.Tensor], Path | None]:
    """The cell's inputs, reference output and source file (float checkpoint or pre-quantized file), made once
    per run. The runner calls this in a process of its own first, so that building the float model for them
    leaves nothing behind (freed heap, imports) in the process whose memory is measured."""
    cell, s = task.cell, task.settings
    register_all(s.models)  # the matrix's models from disk, in this process too
    dtype, device = getattr(torch, cell.dtype), devices.torch_device(cell.device)
    torch.manual_seed(s.seed)
    inputs = make_inputs(cell.model, s.seed, s.batch, dtype, device)
    *files, reference = shared_files(task, inputs)
    return inputs, _read_reference(loading.shared_file(reference.path, reference.make)), _source(files)


def _read_reference(path: Path) -> torch.Tensor | dict[str, torch.Tensor]:
    """A reference output file: the model's output tensor, or a pipeline's outputs by name."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    return saved.get("output", saved)


def _source(files: list[SharedFile]) -> Path | None:
    """Make the stack's shared files (once per run); the path of the one the cell loads."""
    source = None
    for file in files:
        path = loading.shared_file(file.path, file.make)
        source = path if file.source else source
    return source


class _Progress:
    """How far a cell got (the stage an error is reported in) and the device it ran on."""

    def __init__(self) -> None:
        self.stage = Stage.PREPARE
        self.device: dict = {}

    def set_stage(self, stage: Stage) -> None:
        self.stage = stage


def execute_cell(task: CellTask) -> Outcome:
    """Run the cell and turn what happened into an Outcome: measured, unavailable, or the error and its stage."""
    register_all(task.settings.models)  # the matrix's models from disk, in this process too
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
    if not metrics["output_finite"]:  # it ran, but what it made is not an image: a failure, its figures kept
        return Outcome(Status.ERROR, metrics=metrics, error=ErrorInfo(
            "NonFiniteOutput", "output not finite: NaN or infinity in " + ("the latents or the image" if
                                                                          "psnr_db" in metrics else "the output"),
            "", Stage.FORWARD), reason="output not finite", device=progress.device, warnings=raised)
    unquantized = not_quantized(task.cell, metrics)
    if unquantized:  # it ran, but the engine stored no weight quantized: not the cell it claims to be
        return Outcome(Status.ERROR, metrics=metrics, error=ErrorInfo("NotQuantized", unquantized, "", Stage.LOAD),
                       reason="not quantized", device=progress.device, warnings=raised)
    return Outcome(Status.RAN, metrics=metrics, device=progress.device, warnings=raised)


def not_quantized(cell: Cell, metrics: dict) -> str | None:
    """Why a quantizing engine's cell holds its weights as floats of its own dtype (a load that silently dropped
    the quantization), or None."""
    bits, width = metrics.get("bits_per_weight"), torch.finfo(getattr(torch, cell.dtype)).bits
    if cell.engine == "none" or CATALOG[cell.engine].hidden or bits is None or bits < width - 0.01:
        return None
    return (f"no weight is stored quantized: {bits:.2f} bits per weight, the {cell.dtype} model's own (engine "
            f"{cell.engine} type {cell.qtype})")


def _measure(task: CellTask, progress: _Progress) -> dict:
    """Load (and quantize), count storage, offload, run and time the steps; the figures of the record."""
    cell, s = task.cell, task.settings
    engine, stack = ENGINES[cell.engine], stack_of(cell)
    dtype = getattr(torch, cell.dtype)
    progress.device = devices.device_info(cell.device)
    inputs, reference, source = prepare_cell(task)
    skeleton = build_skeleton(cell.model, dtype)
    engine.import_package()  # before memory is tracked (a no-op when the cell server preloaded it)
    tracker = devices.memory_tracker(cell.device)
    tracker.reset()
    mem_base = tracker.current()

    progress.stage = Stage.LOAD
    loaded = stack.load(task, engine, source)
    model = loaded.model.eval()
    context, stage = treatments.Context(s.seed, lambda: skeleton), progress.set_stage
    done = treatments.apply(model, cell, context, treatments.AT_LOAD, stage)
    tracker.sample()
    # Storage is counted before offload: offload hooks replace weights with placeholders.
    param_bytes, parts, bpw, kinds = _storage(model, skeleton, cell)

    done += treatments.apply(model, cell, context, treatments.BEFORE_OFFLOAD, stage)
    progress.stage = Stage.OFFLOAD
    installed = stack.offload(model, cell.offload, cell.device, components=components(cell.model, model),
                              settings=s)
    done += treatments.apply(model, cell, context, treatments.AFTER_OFFLOAD, stage)
    progress.stage = next((t.stage for t, _ in done if t.first_call), Stage.FORWARD)
    load_peak = tracker.peak()
    tracker.reset_peak()  # the generation's own peak: loading's transients (a float copy being quantized) apart
    resident = tracker.current()  # what stays after loading: the run peak less this is the steps' transients
    steps = _run_steps(task, model, inputs, reference, installed.after_step, tracker,
                       _FloatReference(task, measure.stored_bytes(skeleton)), done, progress)
    run_peak = max([steps.peak, *(p["peak_mem_bytes"] for p in steps.phases.values())])
    _judged(task, done, reference, steps)
    metrics = {
        "param_bytes": param_bytes,
        "disk_bytes": loaded.disk_bytes if loaded.disk_bytes is not None else param_bytes,
        "disk_is_file": loaded.disk_bytes is not None,
        "bits_per_weight": bpw,
        "quantized_layers": kinds,
        **_memory(load_peak, run_peak, resident, mem_base, tracker.kind),
        "latency_ms": steps.latency.as_dict(),
        _FloatReference.key(cell): steps.paired,
        "host_load": steps.host_load,
        "quantize_s": loaded.quantize_s,
        "load_s": loaded.load_s,
        **steps.figures,
        "output_sha256": measure.digest_all(steps.output),
        "output_finite": measure.finite(steps.output),
        # the float model's weights: a checkpoint from the user's disk, or drawn from the seed (the catalog's
        # output floors are calibrated on those: a checkpoint's output is judged by the same floors)
        "weights": "checkpoint" if MODELS[cell.model].source else "seeded",
    }
    if parts is not None:
        metrics["components"], metrics["phases"] = parts, steps.phases
    metrics |= {t.metric: applied.figures() for t, applied in done if t.metric}
    return metrics | _offload_figures(installed) | ({} if loaded.name_hint is None else {
        "name_hint": loaded.name_hint, "name_hint_detail": loaded.name_hint_detail})


def _memory(load_peak: int, run_peak: int, resident: int, base: int, kind: str) -> dict:
    """The cell's memory: its peak, loading's and the generation's apart, what stays resident after loading, and
    what was in use at its start (every figure absolute: the report subtracts the start)."""
    return {"peak_mem_bytes": max(load_peak, run_peak), "load_peak_mem_bytes": load_peak,
            "run_peak_mem_bytes": run_peak, "resident_mem_bytes": resident, "mem_base_bytes": base, "mem_kind": kind}


def _storage(model, skeleton, cell: Cell) -> tuple[int, dict | None, float | None, dict]:
    """Bytes stored, a pipeline's components (None for a denoiser alone), bits per weight over what the engine
    quantized, and the quantized layers by kind."""
    param_bytes = measure.stored_bytes(model)
    if isinstance(model, PipelineModel):
        named = component_names(cell.model)[cell.components]
        parts = measure.component_storage(model.parts(), skeleton.parts(), () if cell.engine == "none" else named)
        counted = [parts[name] for name in named]
        return param_bytes, parts, measure.bits_of(counted), measure.kinds_of(counted)
    stored = measure.storage(model, measure.float_layout(skeleton))
    return param_bytes, None, stored.bits_per_weight, stored.quantized_layers


def _judged(task: CellTask, done: treatments.Done, reference, steps: _Steps) -> None:
    """Each treatment that judges its own effect (a LoRA: the output nearer the float model with it than without)
    against the float model's plain output (made by prepare_cell)."""
    judges = [applied.judge for _, applied in done if applied.judge is not None]
    if judges:
        plain = _read_reference(reference_path(task, plain=True))
        against_plain, reference_against_plain = (measure.output_figures(o, plain) for o in (steps.output, reference))
        for judge in judges:
            judge(steps.figures, against_plain, reference_against_plain)


def _offload_figures(installed) -> dict:
    """What the offload recorded: its notes, its moves (repeats counted), the options it ran with."""
    out = {}
    if installed.notes:
        out["offload_notes"] = installed.notes
    if installed.moves:
        out["offload_moves"] = measure.runs_counted(installed.moves)
    if installed.options:
        out["offload_options"] = installed.options
    return out


def float_reference(cell: Cell) -> Cell | None:
    """The cell a cell's steps are timed beside: where a treatment names one, that (a compiled cell: itself
    uncompiled, what compiling buys: metrics.latency_vs_uncompiled); else its baseline (the unquantized model in
    the same stack, load and offload mode: what quantizing costs); for a baseline in an offload mode, the same
    float model without offload (what the offload mode costs); None for the float model without offload itself."""
    beside = treatments.timed_beside(cell)
    if beside is not None:
        return beside[0]
    if cell.baseline != cell:
        return cell.baseline
    return cell.replace(offload="none") if cell.offload != "none" else None


class _FloatReference:
    """The cell's float reference for paired timing (float_reference), loaded and offloaded in this process after
    the cell's memory was measured. `start()` returns (model, after_step), or None with `why` set: the cell is the
    float model, the reference would not fit in memory beside the cell, or it failed (its error is that cell's own
    finding, not this one's)."""

    MARGIN = 1.5  # room for the reference's activations beside its weights

    def __init__(self, task: CellTask, float_bytes: int):
        self.task, self.float_bytes, self.why = task, float_bytes, ""
        self.cell = float_reference(task.cell)

    @staticmethod
    def key(cell: Cell) -> str:
        """The metric the paired ratio is recorded as: a treatment's where it names the cell (a compiled cell's is
        to itself uncompiled), else to the float model."""
        beside = treatments.timed_beside(cell)
        return "latency_vs_float" if beside is None else beside[1]

    def start(self):
        task, base = self.task, self.cell
        if base is None:
            self.why = "the cell is the float model itself, without offload"
            return None
        where = task.cell.device if task.cell.offload == "none" else "cpu"  # offloaded weights live in RAM
        free = _free_memory(where, task.settings.memory_limit_mb)
        if self.float_bytes * self.MARGIN > free:
            self.why = (f"the float model ({self.float_bytes / 2**30:.2f} GiB) does not fit beside the cell in the "
                        f"{where} memory left ({free / 2**30:.2f} GiB)")
            return None
        btask = CellTask(base, task.settings, task.workdir)
        stack = stack_of(base)
        try:
            with warnings.catch_warnings():  # the reference's warnings are the baseline cell's, not this one's
                warnings.simplefilter("ignore")
                model = stack.load(btask, ENGINES[base.engine], _source(stack.files(btask))).model.eval()
                context = treatments.Context(task.settings.seed,
                                             lambda: build_skeleton(base.model, getattr(torch, base.dtype)))
                for when in (treatments.AT_LOAD, treatments.BEFORE_OFFLOAD):
                    treatments.apply(model, base, context, when)
                installed = stack.offload(model, base.offload, base.device,
                                          components=components(base.model, model), settings=task.settings)
                treatments.apply(model, base, context, treatments.AFTER_OFFLOAD)
        except Exception as exc:  # noqa: BLE001 - the baseline cell records it as its own finding
            self.why = f"the float reference failed: {type(exc).__name__}: {str(exc)[:200]}"
            return None
        return model, installed.after_step


def _free_memory(device: str, memory_limit_mb: int) -> int:
    """Bytes the device has free now; on the CPU under the per-cell address-space cap, what the cap leaves too."""
    free = devices.total_memory(device) - devices.memory_in_use(device)
    if device == "cpu" and memory_limit_mb:
        import resource

        import psutil

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit != resource.RLIM_INFINITY:
            free = min(free, limit - psutil.Process().memory_info().vms)
    return free


@dataclass
class _Steps:
    output: torch.Tensor | dict[str, torch.Tensor]
    figures: dict
    latency: measure.Latency
    paired: dict  # PairedRatio's figures, or {"unpaired": why}
    host_load: dict
    peak: int  # the cell's peak memory up to its timed steps (before the float reference is loaded)
    phases: dict


def _timed(task: CellTask, step, after_step, inputs: dict, float_reference: _FloatReference) -> tuple:
    """The cell's timed steps, paired with its float reference's where that can run beside it (its warm-up steps
    first); alone otherwise. (latency, the paired ratio's figures or why there are none.)"""
    cell, s = task.cell, task.settings
    timing = dict(warmup=s.warmup, min_steps=s.min_steps, max_steps=s.max_steps, min_time_s=s.min_time_s)
    started = float_reference.start()
    paired: dict = {"unpaired": float_reference.why}
    if started is not None:
        float_model, float_after = started
        try:
            for _ in range(s.warmup):
                run(float_model, inputs)
                float_after()
            latency, ratio = measure.time_paired(step, lambda: run(float_model, inputs), cell.device,
                                                 after_step=after_step, after_reference=float_after, **timing)
            return latency, {**ratio.as_dict(), "against": float_reference.cell.id}
        except Exception as exc:  # noqa: BLE001 - the baseline cell's finding; time the cell alone
            paired = {"unpaired": f"the float reference failed: {type(exc).__name__}: {str(exc)[:200]}"}
        finally:
            del float_model
    latency = measure.time_steps(step, cell.device, after_step=after_step, **{**timing, "warmup": 0})
    return measure.Latency(latency.median, latency.p10, latency.p90, latency.n, s.warmup), paired


def _run_steps(task: CellTask, model, inputs: dict, reference, after_step, tracker,
               float_reference: _FloatReference, done: treatments.Done, progress: _Progress) -> _Steps:
    """The first step's (generation's) output and its error against the float model's, the warm-up steps, then
    the timed steps, paired with the float reference's where it can run beside the cell. A pipeline's first
    generation is also measured per phase (latency and peak memory); its timed generations give each phase's
    median latency. Every call runs in the applied treatments' `call` (a compiled model's first compiles it, timed;
    every later one is checked to have run compiled)."""
    s = task.settings
    pipeline = isinstance(model, PipelineModel)
    phase_peaks: dict[str, int] = {}
    if pipeline:
        model.phase_mark = _PhasePeaks(tracker, phase_peaks)
    timed: list[dict[str, float]] = []

    def calling():
        return treatments.calls(done)

    def step() -> None:
        with calling():
            run(model, inputs)
        tracker.sample()
        if pipeline:
            timed.append(dict(model.phases))

    with torch.no_grad():
        with calling():
            output = run(model, inputs)
        progress.stage = Stage.FORWARD
        after_step()
        tracker.sample()
        figures = measure.output_figures(output, reference)
        if pipeline:
            model.phase_mark = lambda phase: None
        for _ in range(s.warmup):
            step()
            after_step()
        peak = tracker.peak()
        with measure.HostLoad() as load:
            latency, paired = _timed(task, step, after_step, inputs, float_reference)
    phases = {}
    if pipeline:
        steps = inputs["num_inference_steps"]
        timed = timed[s.warmup:] or timed
        for name, p in phase_peaks.items():
            median = statistics.median(t[name] for t in timed if name in t)
            phases[name] = {"latency_ms": median, "peak_mem_bytes": p}
            if name == "denoise":
                phases[name]["per_step_ms"] = median / steps
    return _Steps(output, figures, latency, paired, load.figures, peak, phases)


class _PhasePeaks:
    """At each phase boundary of a pipeline's generation: the ended phase's peak memory, then a new peak."""

    def __init__(self, tracker, into: dict[str, int]):
        self.tracker, self.into, self.current = tracker, into, None

    def __call__(self, phase: str | None) -> None:
        if self.current is not None:
            self.into[self.current] = self.tracker.peak()
        self.tracker.reset_peak()
        self.current = phase
