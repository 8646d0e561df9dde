"""The three load modes, the files they need, and detecting a pre-quantized file's engine from its contents.

- post-load: build the float model (or load it from the run's file, for a model with shared weights), then the
  engine quantizes it.
- on-the-fly: the model is created empty (meta device) and filled layer by layer from a float safetensors
  checkpoint, each Linear quantized as it arrives, so the whole float model never sits in memory.
- prequantized: a file the engine wrote earlier in its own format; engine and type are detected from the file.

Files are written once per run into the run's work directory and shared by every cell that needs them.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from harness.devices import is_oom
from harness.engines.base import Engine, set_submodule
from harness.engines.containers import check_container
from harness.engines.registry import ENGINES
from harness.errors import QuantMatrixError
from harness.models.build import build_model, build_skeleton
from harness.models.specs import MODELS


@dataclass
class Loaded:
    model: nn.Module
    load_s: float
    quantize_s: float | None  # None: quantized inside the load call (diffusers), not timed apart
    disk_bytes: int | None = None
    name_hint: str | None = None  # pre-quantized files: "agrees" | "disagrees" | "no hint" (see check_name)
    name_hint_detail: str | None = None


def shared_file(path: Path, make: Callable[[Path], object]) -> Path:
    """`path`, made by `make(tmp)` once: concurrent cells wait on a lock; the file appears whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return path
    with open(path.with_suffix(path.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            make(tmp)
            os.replace(tmp, path)
    return path


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def stored_dtype(model: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of a model's float directory and checkpoint: float32, or the cell's own for a model with shared
    weights (flux-dev in float32 would be 48 GB on disk)."""
    return dtype if MODELS[model].shared_weights else torch.float32


def float_dir_path(workdir: Path, model: str, seed: int, dtype: torch.dtype = torch.float32) -> Path:
    source = MODELS[model].source
    if source and Path(source).is_dir():  # the user's diffusers directory, read where it lies
        return Path(source)
    stored = stored_dtype(model, dtype)
    return workdir / "diffusers" / (f"{model}-seed{seed}" + ("" if stored == torch.float32
                                                             else f"-{_dtype_name(stored)}"))


def make_float_dir(model: str, seed: int, dtype: torch.dtype) -> Callable[[Path], object]:
    return lambda tmp: build_model(model, seed, stored_dtype(model, dtype)).save_pretrained(str(tmp))


def float_dir(workdir: Path, model: str, seed: int, dtype: torch.dtype = torch.float32) -> Path:
    """A diffusers model class's float model as `save_pretrained` writes it (config.json and safetensors), in
    float32 (or, for a model with shared weights, in `dtype`), made once per run."""
    return shared_file(float_dir_path(workdir, model, seed, dtype), make_float_dir(model, seed, dtype))


def float_model(workdir: Path, model: str, seed: int, dtype: torch.dtype) -> nn.Module:
    """The float model on the CPU: drawn from its seed, or, for a model with shared weights, loaded from the run's
    float directory (drawing 11.9 B weights per cell would cost the cell more than its work)."""
    if not MODELS[model].shared_weights:
        return build_model(model, seed, dtype)
    if MODELS[model].pipeline:
        from harness.models.pipelines import load_pipeline

        return load_pipeline(model, float_dir(workdir, model, seed, dtype), dtype)
    from harness.models.real import model_class

    loaded = model_class(model).from_pretrained(str(float_dir(workdir, model, seed, dtype)), torch_dtype=dtype,
                                                use_safetensors=True)
    loaded._quantmatrix_name = model
    return loaded


def float_checkpoint_path(workdir: Path, model: str, seed: int, dtype: torch.dtype = torch.float32) -> Path:
    stored = "" if dtype == torch.float32 else "-" + str(dtype).removeprefix("torch.")
    return workdir / "checkpoints" / f"{model}-seed{seed}{stored}.safetensors"


def make_float_checkpoint(float_model: Callable[[], nn.Module]) -> Callable[[Path], object]:
    """The float weights as one safetensors file, stored in `dtype` (what `float_model()` gives): one file per
    dtype (float_checkpoint_path), so cells of two dtypes in one run never read each other's."""
    return lambda tmp: ENGINES["none"].save(float_model(), "-", tmp)


def prequantized_path(workdir: Path, engine: Engine, qtype: str, model: str, dtype: torch.dtype, seed: int) -> Path:
    dname = str(dtype).removeprefix("torch.")
    stem = f"{model}-{dname}-seed{seed}-{engine.name}" + ("" if qtype == "-" else f"-{qtype}")
    return workdir / "prequantized" / (stem + engine.file_suffix)


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
              device: torch.device) -> Loaded:
    """`float_model()` (drawn from its seed, or loaded from the run's shared file), then the engine quantizes it."""
    t0 = time.perf_counter()
    float_model = float_model()
    t1 = time.perf_counter()
    quantized = engine.quantize(float_model, qtype, dtype=dtype, device=device)
    return Loaded(quantized, t1 - t0, time.perf_counter() - t1)


def load_post_pipeline(engine: Engine, qtype: str, model: str, components: str,
                       float_model: Callable[[], nn.Module], dtype: torch.dtype, device: torch.device,
                       seed: int = 0) -> Loaded:
    """The float pipeline (`float_model()`, a PipelineModel), then the engine's own API on each component the
    `components` value names; for an engine that traces (NNCF), each with the inputs it got in a real call."""
    from harness.engines.catalog import CATALOG, text_encoder_type
    from harness.models.pipelines import PipelineModel, capture_inputs, quantize_components
    from harness.models.specs import PIPELINES

    t0 = time.perf_counter()
    pipe = float_model().pipe
    examples = capture_inputs(pipe, model, seed) if CATALOG[engine.name].traces else {}  # not quantizing: load
    t1 = time.perf_counter()

    def quantize(attr: str, module: nn.Module) -> nn.Module:
        if attr in examples:
            module._quantmatrix_example = examples[attr]
        own = qtype if attr == PIPELINES[model].denoiser else text_encoder_type(engine.name, qtype)
        return engine.quantize(module, own, dtype=dtype, device=device)

    quantize_components(pipe, model, components, quantize)
    return Loaded(PipelineModel(pipe, model), t1 - t0, time.perf_counter() - t1)


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


# ------------------------------------------------------------------------------------------ detection

# The conventional names of pre-quantized files (the seed, "Quantization Engines"): hints, never trusted; detection
# reads the contents, and check_name reports a file whose name says otherwise. (glob, engine, type prefix or None)
NAME_HINTS = (
    ("*nf4.safetensors", "bnb", "nf4"),
    ("*fp8.safetensors", "bnb", None),
    ("*qint.safetensors", "quanto", None),
    ("*qint[248].safetensors", "quanto", "qint"),
    ("*.gguf", "gguf", None),
)


def name_hint(path: Path | str) -> tuple[str, str | None, str] | None:
    """(engine, type prefix, glob) that the file's name suggests by convention, or None."""
    import fnmatch

    name = Path(path).name.lower()
    for glob, engine, qtype in NAME_HINTS:
        if fnmatch.fnmatchcase(name, glob):
            return engine, qtype, glob
    return None


def check_name(path: Path | str, found: tuple[str, str]) -> tuple[str, str]:
    """Whether the file's conventional name agrees with the (engine, qtype) detected from its contents:
    ("agrees" | "disagrees" | "no hint", explanation)."""
    hint = name_hint(path)
    if hint is None:
        return "no hint", f"{Path(path).name!r} follows none of the conventional names"
    engine, qtype, glob = hint
    said = engine + (f" {qtype}" if qtype else "")
    if engine == found[0] and (qtype is None or found[1].startswith(qtype)):
        return "agrees", f"name {glob!r} suggests {said}; contents say {found[0]} {found[1]}"
    return "disagrees", f"name {glob!r} suggests {said}, but the contents say {found[0]} {found[1]}"


def detect(path: Path | str) -> tuple[str, str]:
    """(engine, qtype) of a model file, judged from its contents; file names are not trusted."""
    path = Path(path)
    check_container(path)
    failures = []
    for engine in ENGINES.values():
        try:
            qtype = engine.recognise(path)
        except Exception as exc:  # a reader that chokes on a foreign file has not recognised it
            failures.append(f"{engine.name}: {type(exc).__name__}: {exc}")
            continue
        if qtype is not None:
            return engine.name, qtype
    raise QuantMatrixError("no engine recognises this file's contents; expected a file written by one of "
                           f"{[e for e in ENGINES if not ENGINES[e].hidden]}"
                           + (f" (readers failed: {'; '.join(failures)})" if failures else ""), path=path)
