"""The `diffusers` stack's three load modes, on diffusers' own code (the path SD.Next and diffusers users take):

- on-the-fly: `from_pretrained(float_dir, quantization_config=<the engine's diffusers config>)`, from a float
  checkpoint written with `save_pretrained`;
- prequantized: the backend's serialized form loaded back with `from_pretrained` (engine and type detected from the
  saved `quantization_config`), and GGUF as a `.gguf` file (written with `gguf`, diffusers' tensor names) through
  `from_single_file(path, config=float_dir, quantization_config=GGUFQuantizationConfig(...))`;
- post-load: the float model loaded with `from_pretrained`, then the engine's own API, as SD.Next's "post" mode.

What diffusers refuses or deprecates is the finding: nothing here works around it. Files are made once per run in
the run's work directory (see loading.shared_file).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from harness.engines.base import Engine, NotOffered
from harness.engines.registry import ENGINES
from harness.errors import QuantMatrixError
from harness.models.build import build_model
from harness.models.real import model_class
from harness.models.specs import MODELS
from harness.run.loading import Loaded, check_name, detect, shared_file


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def stored_dtype(model: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of a model's float directory and checkpoint: float32, or the cell's own for a model with shared
    weights (flux-dev in float32 would be 48 GB on disk)."""
    return dtype if MODELS[model].shared_weights else torch.float32


def float_dir_path(workdir: Path, model: str, seed: int, dtype: torch.dtype = torch.float32) -> Path:
    stored = stored_dtype(model, dtype)
    return workdir / "diffusers" / (f"{model}-seed{seed}" + ("" if stored == torch.float32
                                                             else f"-{_dtype_name(stored)}"))


def float_dir(workdir: Path, model: str, seed: int, dtype: torch.dtype = torch.float32) -> Path:
    """The float model as `save_pretrained` writes it (config.json and safetensors), in float32 (or, for a model
    with shared weights, in `dtype`), made once per run."""
    return shared_file(float_dir_path(workdir, model, seed, dtype),
                       lambda tmp: build_model(model, seed, stored_dtype(model, dtype)).save_pretrained(str(tmp)))


def float_model(workdir: Path, model: str, seed: int, dtype: torch.dtype) -> nn.Module:
    """The float model on the CPU: drawn from its seed, or, for a model with shared weights, loaded from the run's
    float directory (drawing 11.9 B weights per cell would cost the cell more than its work)."""
    if not MODELS[model].shared_weights:
        return build_model(model, seed, dtype)
    loaded = model_class(model).from_pretrained(str(float_dir(workdir, model, seed, dtype)), torch_dtype=dtype)
    loaded._quantmatrix_name = model
    return loaded


def prequantized_path(workdir: Path, engine: Engine, qtype: str, model: str, dtype: torch.dtype, seed: int) -> Path:
    stem = f"{model}-{_dtype_name(dtype)}-seed{seed}-{engine.name}" + ("" if qtype == "-" else f"-{qtype}")
    return workdir / "diffusers-prequantized" / (stem + (".gguf" if engine.name == "gguf" else ""))


def prequantized(workdir: Path, engine: Engine, qtype: str, model: str, dtype: torch.dtype, seed: int) -> Path:
    """The engine's serialized form of the model: what `save_pretrained` writes for a model diffusers quantized on
    the fly, or for GGUF a .gguf file of the engine's packed weights under diffusers' tensor names."""
    source = float_dir(workdir, model, seed, dtype)

    def make(tmp: Path) -> None:
        if engine.name == "gguf":
            quantized = engine.quantize(float_model(workdir, model, seed, dtype), qtype, dtype=dtype,
                                        device=torch.device("cpu"))
            engine.save(quantized, qtype, tmp)
            return
        loaded = model_class(model).from_pretrained(str(source), torch_dtype=dtype,
                                                    quantization_config=engine.diffusers_config(qtype, dtype=dtype))
        try:
            loaded.save_pretrained(str(tmp))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    return shared_file(prequantized_path(workdir, engine, qtype, model, dtype, seed), make)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def load_on_the_fly(engine: Engine, qtype: str, model: str, source: Path, dtype: torch.dtype) -> Loaded:
    """Quantized by diffusers while loading: load and quantize are one call, so its time is all `load_s`."""
    if engine.name == "gguf":
        raise NotOffered("diffusers has no way to quantize to GGUF while loading (GGUFQuantizationConfig reads "
                         "pre-quantized .gguf files); GGUF on the diffusers stack is the prequantized load mode")
    config = engine.diffusers_config(qtype, dtype=dtype)
    t0 = time.perf_counter()
    loaded = model_class(model).from_pretrained(str(source), torch_dtype=dtype, quantization_config=config)
    return Loaded(loaded, time.perf_counter() - t0, None, _size(source))


def load_post(engine: Engine, qtype: str, model: str, source: Path, dtype: torch.dtype,
              device: torch.device) -> Loaded:
    t0 = time.perf_counter()
    loaded = model_class(model).from_pretrained(str(source), torch_dtype=dtype)
    loaded._quantmatrix_name = model  # for engines that trace it with the model's example input (NNCF)
    t1 = time.perf_counter()
    quantized = engine.quantize(loaded, qtype, dtype=dtype, device=device)
    return Loaded(quantized, t1 - t0, time.perf_counter() - t1)


def detect_saved(path: Path) -> tuple[str, str]:
    """(engine, qtype) of a diffusers model directory, from the `quantization_config` its config.json holds; a
    .gguf file by its contents."""
    if path.is_file():
        return detect(path)
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QuantMatrixError(f"not a diffusers model directory: {exc}", path=config_file) from None
    quant = config.get("quantization_config")
    if quant is None:
        return "none", "-"
    if not isinstance(quant, dict):
        raise QuantMatrixError(f"field 'quantization_config' is {type(quant).__name__}; expected a table",
                               path=config_file)
    for engine in ENGINES.values():
        qtype = engine.diffusers_type(quant)
        if qtype is not None:
            return engine.name, qtype
    raise QuantMatrixError(f"field 'quantization_config': no engine recognises quant_method "
                           f"{quant.get('quant_method')!r} with these settings", path=config_file)


def load_prequantized(engine: Engine, qtype: str, model: str, path: Path, float_source: Path,
                      dtype: torch.dtype) -> Loaded:
    found = detect_saved(path)
    if found != (engine.name, qtype):
        raise QuantMatrixError(f"contents say engine {found[0]!r} type {found[1]!r}; expected {engine.name!r} "
                               f"type {qtype!r}", path=path)
    cls = model_class(model)
    t0 = time.perf_counter()
    if engine.name == "gguf":
        loaded = cls.from_single_file(str(path), config=str(float_source), torch_dtype=dtype,
                                      quantization_config=engine.diffusers_config(qtype, dtype=dtype))
    else:
        loaded = cls.from_pretrained(str(path), torch_dtype=dtype)
    hint, detail = check_name(path, found)
    return Loaded(loaded, time.perf_counter() - t0, 0.0, _size(path), hint, detail)
