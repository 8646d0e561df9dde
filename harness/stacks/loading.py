"""What both stacks' loads share: the float model (drawn from its seed, or read from the run's float directory for
a model with shared weights), a whole pipeline quantized after loading, the run's shared files, and detecting a
pre-quantized file's engine from its contents (never from its name). Each stack's own load modes are in its module.

Files are written once per run into the run's work directory and shared by every cell that needs them.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from harness.engines.base import Engine
from harness.engines.containers import check_container
from harness.engines.registry import ENGINES
from harness.errors import QuantMatrixError
from harness.models.build import build_model
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


def prequantized_stem(engine: Engine, qtype: str, model: str, dtype: torch.dtype, seed: int) -> str:
    """The name both stacks give a pre-quantized file or directory of the model in `dtype` for the engine's type."""
    return f"{model}-{_dtype_name(dtype)}-seed{seed}-{engine.name}" + ("" if qtype == "-" else f"-{qtype}")


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


def load_post_pipeline(engine: Engine, qtype: str, model: str, components: str,
                       float_model: Callable[[], nn.Module], dtype: torch.dtype, device: torch.device,
                       seed: int = 0, offload: str = "none") -> Loaded:
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
        return engine.quantize_for(module, own, dtype=dtype, device=device, offload=offload)

    quantize_components(pipe, model, components, quantize)
    return Loaded(PipelineModel(pipe, model), t1 - t0, time.perf_counter() - t1)


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
