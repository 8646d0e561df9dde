"""The `direct` stack, the control: the engine's own API on the module, offloaded by accelerate's functions on the
module (a pipeline: on each component it quantizes, and each component). Its three load modes:

- post-load: the float model (drawn from its seed, or read from the run's float directory), then the engine
  quantizes it;
- on-the-fly: the model is created empty (meta device) and filled layer by layer from a float safetensors
  checkpoint, each Linear quantized as it arrives, so the whole float model never sits in memory;
- prequantized: a file the engine wrote earlier in its own format; engine and type are detected from the file.
"""

from __future__ import annotations

import functools
import json
import struct
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from harness import devices, offload
from harness.devices import is_oom
from harness.engines.base import Engine, set_submodule
from harness.engines.containers import check_container
from harness.engines.registry import ENGINES
from harness.errors import QuantMatrixError
from harness.models.build import build_model, build_skeleton
from harness.models.specs import MODELS
from harness.settings import Settings
from harness.stacks import loading
from harness.stacks.base import SharedFile, Stack
from harness.stacks.loading import Loaded, check_name, detect, prequantized_stem, shared_file

# This stack in a standalone repro script (harness/repro.py reads it as text, without importing this module): the
# float model drawn in memory and the engine's statements after load (`{quantize}`), then accelerate's functions
# on the module per offload mode (offload_module below): the statements, and the one after each step.
REPRO = {
    "prepare": {"post-load": ""},
    "load": {"post-load": "model = build_model()  # the float model (stacks/direct.py load_post)\n{quantize}"},
    "why_not": "the direct stack's on-the-fly and pre-quantized loads are the harness's own loader and file layout; "
               "only post-load is written for it",
    "offload": {"none": ("model.to(DEVICE)", ""),
                "model": ('model.to("cpu")\n_, hook = accelerate.cpu_offload_with_hook(model, DEVICE)',
                          "hook.offload()"),
                "sequential": ('model.to("cpu")\naccelerate.cpu_offload(model, execution_device=DEVICE, '
                               "offload_buffers=len(model._parameters) > 0)", ""),
                "group": ("from diffusers.hooks import apply_group_offloading\n\n"
                          "apply_group_offloading(model, {group})", "")},
    "why_not_offload": "balanced offload is SD.Next's algorithm as the harness implements it (harness/offload.py), "
                       "not an upstream API",
}


class DirectStack(Stack):
    name = "direct"

    def files(self, task) -> list[SharedFile]:
        cell, seed = task.cell, task.settings.seed
        dtype = getattr(torch, cell.dtype)
        out = []
        if MODELS[cell.model].shared_weights:  # its float model is loaded from the run's directory
            out.append(SharedFile(loading.float_dir_path(task.workdir, cell.model, seed, dtype),
                                  loading.make_float_dir(cell.model, seed, dtype), source=False))
        if cell.load == "on-the-fly":
            stored = loading.stored_dtype(cell.model, dtype)
            out.append(SharedFile(float_checkpoint_path(task.workdir, cell.model, seed, stored),
                                  make_float_checkpoint(float_model(task, stored))))
        elif cell.load == "prequantized":
            engine = ENGINES[cell.engine]
            out.append(SharedFile(prequantized_path(task.workdir, engine, cell.qtype, cell.model, dtype, seed),
                                  make_prequantized(engine, cell.qtype, cell.model, dtype, seed,
                                                            float_model(task, dtype))))
        return out

    def load(self, task, engine: Engine, source: Path | None) -> Loaded:
        cell = task.cell
        dtype, device = getattr(torch, cell.dtype), devices.torch_device(cell.device)
        if cell.load == "post-load" and MODELS[cell.model].pipeline:
            return loading.load_post_pipeline(engine, cell.qtype, cell.model, cell.components,
                                              float_model(task, dtype), dtype, device, task.settings.seed,
                                              cell.offload)
        if cell.load == "post-load":
            return load_post(engine, cell.qtype, float_model(task, dtype), dtype, device, cell.offload)
        if cell.load == "on-the-fly":
            return load_on_the_fly(engine, cell.qtype, cell.model, source, dtype, device)
        return load_prequantized(engine, cell.qtype, cell.model, source, dtype, device)

    def offload(self, model, mode, device, *, components, settings):
        return offload_module(model, mode, device, components=components, settings=settings)


def float_model(task, dtype: torch.dtype):
    """The cell's float model in `dtype`, when called: drawn from its seed, or loaded from the run's float directory
    for a model with shared weights (loading.float_model)."""
    return functools.partial(loading.float_model, task.workdir, task.cell.model, task.settings.seed, dtype)


def offload_module(model: nn.Module, mode: str, device: str, *, components: list[nn.Module] | None = None,
                   settings: Settings | None = None) -> offload.Installed:
    """The direct stack's offload: accelerate's functions on the module itself (diffusers' apply_group_offloading
    for group), on each component of a pipeline in turn; SD.Next's balanced offload."""
    s = settings or Settings()
    execution = devices.torch_device(device)
    if mode == "balanced":
        return offload.balanced(model, device, components, s)
    if mode == "none":
        model.to(execution)
        return offload.Installed()
    parts = offload.pipeline_parts(model)  # a model alone is its one part
    return _offload_parts(list(parts.values()) if parts is not None else [model], mode, execution, s)


def _offload_parts(parts: list[nn.Module], mode: str, execution: torch.device, s: Settings) -> offload.Installed:
    """A pipeline's components (or a model alone) through accelerate's functions, as the pipeline methods call
    them: model offload chains one hook per component in the pipeline's offload order (each moves the one before
    off the device: diffusers' enable_model_cpu_offload), sequential and group offload hook each component."""
    if mode == "model":
        from accelerate import cpu_offload_with_hook

        hooks, hook = [], None
        for part in parts:
            part.to("cpu")
            _, hook = cpu_offload_with_hook(part, execution, prev_module_hook=hook)
            hooks.append(hook)
        return offload.Installed(lambda: [h.offload() for h in hooks] and None)
    for part in parts:
        if mode == "sequential":
            _sequential_offload(part, execution)
        elif mode == "group":
            _group_offload(part, execution, s)
        else:
            raise ValueError(f"unknown offload mode {mode!r}")
    return offload.Installed()


def _group_offload(model: nn.Module, execution: torch.device, s: Settings) -> None:
    from diffusers.hooks import apply_group_offloading

    options = offload.group_options(s, execution)
    options.pop("exclude_modules", None)  # a pipeline's option (its components), not a module's
    apply_group_offloading(model, **options)


def _sequential_offload(model: nn.Module, execution: torch.device) -> None:
    """diffusers' enable_sequential_cpu_offload on the module: weights live off-device, each submodule's arrive per
    forward."""
    from accelerate import cpu_offload

    model.to("cpu")
    cpu_offload(model, execution_device=execution, offload_buffers=len(model._parameters) > 0)


# ------------------------------------------------------------------------------------------ loading

def float_checkpoint_path(workdir: Path, model: str, seed: int, dtype: torch.dtype = torch.float32) -> Path:
    stored = "" if dtype == torch.float32 else "-" + str(dtype).removeprefix("torch.")
    return workdir / "checkpoints" / f"{model}-seed{seed}{stored}.safetensors"


def make_float_checkpoint(float_model: Callable[[], nn.Module]) -> Callable[[Path], object]:
    """The float weights as one safetensors file, stored in `dtype` (what `float_model()` gives): one file per
    dtype (float_checkpoint_path), so cells of two dtypes in one run never read each other's."""
    return lambda tmp: ENGINES["none"].save(float_model(), "-", tmp)


def prequantized_path(workdir: Path, engine: Engine, qtype: str, model: str, dtype: torch.dtype, seed: int) -> Path:
    return workdir / "prequantized" / (prequantized_stem(engine, qtype, model, dtype, seed) + engine.file_suffix)


def make_prequantized(engine: Engine, qtype: str, model: str, dtype: torch.dtype, seed: int,
                      float_model: Callable[[], nn.Module] | None = None) -> Callable[[Path], object]:
    def make(tmp: Path) -> None:
        source = float_model() if float_model else build_model(model, seed, dtype)
        quantized = engine.quantize(source, qtype, dtype=dtype, device=torch.device("cpu"))
        engine.save(quantized, qtype, tmp)

    return make


def prequantized_file(workdir: Path, engine: Engine, qtype: str, model: str, dtype: torch.dtype,
                      seed: int, float_model: Callable[[], nn.Module] | None = None) -> Path:
    return shared_file(prequantized_path(workdir, engine, qtype, model, dtype, seed),
                       make_prequantized(engine, qtype, model, dtype, seed, float_model))


def load_post(engine: Engine, qtype: str, float_model: Callable[[], nn.Module], dtype: torch.dtype,
              device: torch.device, offload: str = "none") -> Loaded:
    """`float_model()` (drawn from its seed, or loaded from the run's shared file), then the engine quantizes it."""
    t0 = time.perf_counter()
    float_model = float_model()
    t1 = time.perf_counter()
    quantized = engine.quantize_for(float_model, qtype, dtype=dtype, device=device, offload=offload)
    return Loaded(quantized, t1 - t0, time.perf_counter() - t1)


def load_on_the_fly(engine: Engine, qtype: str, model: str, checkpoint: Path, dtype: torch.dtype,
                    device: torch.device) -> Loaded:
    """Fill an empty model module by module from `checkpoint`; each Linear goes through the engine on arrival."""
    t0 = time.perf_counter()
    quantize_s = 0.0
    skeleton = build_skeleton(model, dtype)
    with StreamingReader(checkpoint) as reader:
        # Names, not modules: a list of modules would keep every float layer alive after it was replaced.
        for module_name in [name for name, _ in skeleton.named_modules()]:
            module = skeleton.get_submodule(module_name)
            own = [n for n, t in [*module._parameters.items(), *module._buffers.items()] if t is not None]
            if not own:
                continue
            prefix = f"{module_name}." if module_name else ""
            for n in own:
                value = reader.tensor(prefix + n).to(dtype)
                if n in module._parameters:
                    module._parameters[n] = nn.Parameter(value, requires_grad=False)
                else:
                    module._buffers[n] = value
            if isinstance(module, nn.Linear):
                t = time.perf_counter()
                replacement = engine.quantize_layer(module, qtype, dtype=dtype, device=device)
                quantize_s += time.perf_counter() - t
                if replacement is not module:
                    set_submodule(skeleton, module_name, replacement)
            del module
    return Loaded(skeleton, time.perf_counter() - t0 - quantize_s, quantize_s, checkpoint.stat().st_size)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class StreamingReader:
    """Reads one tensor of a safetensors file at a time with plain reads. safetensors' own reader maps the whole
    file, and mapped pages count in the process's RSS: on-the-fly loading would look as if the float model sat in
    memory."""

    def __init__(self, path: Path):
        self.path = path
        check_container(path)
        self.file = open(path, "rb")
        (n,) = struct.unpack("<Q", self.file.read(8))
        self.header = json.loads(self.file.read(n))
        self.data_start = 8 + n

    def tensor(self, key: str) -> torch.Tensor:
        entry = self.header.get(key)
        if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
            raise QuantMatrixError(f"tensor {key!r} missing or of an unknown type; expected a float checkpoint of "
                                   "the model", path=self.path)
        start, end = entry["data_offsets"]
        self.file.seek(self.data_start + start)
        raw = bytearray(self.file.read(end - start))
        if len(raw) != end - start:
            raise QuantMatrixError(f"tensor {key!r} is cut short (truncated file)", path=self.path)
        return torch.frombuffer(raw, dtype=_DTYPES[entry["dtype"]]).reshape(entry["shape"]) if raw else \
            torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])

    def __enter__(self) -> StreamingReader:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def load_prequantized(engine: Engine, qtype: str, model: str, path: Path, dtype: torch.dtype,
                      device: torch.device) -> Loaded:
    t0 = time.perf_counter()
    found = detect(path)
    if found != (engine.name, qtype):
        raise QuantMatrixError(f"contents say engine {found[0]!r} type {found[1]!r}; expected {engine.name!r} "
                               f"type {qtype!r}", path=path)
    try:
        loaded = engine.load(path, build_skeleton(model, dtype), dtype=dtype, device=device)
    except Exception as exc:
        if str(path) in str(exc) or is_oom(exc):  # already names the file, or out of memory
            raise
        # A library's bare assert or KeyError on a corrupt file becomes an error that says which file and where
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        raise QuantMatrixError(f"{engine.name} could not load it as {qtype}: {type(exc).__name__}: "
                               f"{exc or '(no message)'} (in {Path(frame.filename).name}:{frame.lineno} "
                               f"{frame.name}); the file is corrupt or not what its contents claim",
                               path=path) from exc
    hint, detail = check_name(path, found)
    return Loaded(loaded, time.perf_counter() - t0, 0.0, path.stat().st_size, hint, detail)
