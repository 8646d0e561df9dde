"""The `diffusers` stack: diffusers' model classes through its quantizer integrations, offloaded by a pipeline's own
methods (the path SD.Next and diffusers users take). Its three load modes:

- on-the-fly: `from_pretrained(float_dir, quantization_config=<the engine's diffusers config>)`, from a float
  checkpoint written with `save_pretrained`;
- prequantized: the backend's serialized form loaded back with `from_pretrained` (engine and type detected from the
  saved `quantization_config`), and GGUF as a `.gguf` file (written with `gguf`, diffusers' tensor names) through
  `from_single_file(path, config=float_dir, quantization_config=GGUFQuantizationConfig(...))`;
- post-load: the float model loaded with `from_pretrained`, then the engine's own API, as SD.Next's "post" mode.

A whole pipeline loads with the pipeline's `from_pretrained`: on the fly with a `PipelineQuantizationConfig`
(transformers' config classes for its text encoders), post-load with the engine's API per component, or from a
pre-quantized pipeline directory (what `save_pretrained` wrote after an on-the-fly load, or the engine's own API).

Each engine's integration (its config class, how a saved config names its type) is a row of INTEGRATIONS here,
not a method of the engine. What diffusers refuses or deprecates is the finding: nothing here works around it.
Files are made once per run in the run's work directory (see loading.shared_file).
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from harness import devices, offload
from harness.engines.base import Engine, NotOffered
from harness.engines.catalog import text_encoder_type
from harness.engines.registry import ENGINES
from harness.errors import QuantMatrixError
from harness.models.pipelines import load_pipeline
from harness.models.real import model_class
from harness.models.specs import MODELS, PIPELINES, component_names
from harness.settings import Settings
from harness.stacks import loading
from harness.stacks.base import SharedFile, Stack
from harness.stacks.loading import Loaded, check_name, detect, float_dir, float_model, shared_file


def _bnb_options(qtype: str, dtype: torch.dtype) -> dict:
    """The arguments of a BitsAndBytesConfig (diffusers' and transformers' take the same)."""
    from harness.engines.bnb import FOUR_BIT

    if qtype == "int8":
        return {"load_in_8bit": True}
    quant_type, double = FOUR_BIT[qtype]
    return {"load_in_4bit": True, "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double,
            "bnb_4bit_compute_dtype": dtype}


def _bnb_config(qtype: str, dtype: torch.dtype) -> object:
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(**_bnb_options(qtype, dtype))


def _bnb_type(config: dict) -> str | None:
    if config.get("load_in_8bit"):
        return "int8"
    return config.get("bnb_4bit_quant_type", "fp4") + ("-dq" if config.get("bnb_4bit_use_double_quant") else "")


def _bnb_te_config(qtype: str, dtype: torch.dtype) -> object:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**_bnb_options(qtype, dtype))


def _quanto_te_config(qtype: str, dtype: torch.dtype) -> object:
    from transformers import QuantoConfig

    from harness.engines.quanto import DIFFUSERS_WEIGHTS

    return QuantoConfig(weights=DIFFUSERS_WEIGHTS[qtype])


def _torchao_te_config(qtype: str, dtype: torch.dtype) -> object:
    import torchao.quantization as tq
    from transformers import TorchAoConfig

    from harness.engines.torchao_engine import CONFIGS

    return TorchAoConfig(getattr(tq, CONFIGS[qtype])())


def _quanto_config(qtype: str, dtype: torch.dtype) -> object:
    from diffusers import QuantoConfig

    from harness.engines.quanto import DIFFUSERS_WEIGHTS

    return QuantoConfig(weights_dtype=DIFFUSERS_WEIGHTS[qtype])


def _quanto_type(config: dict) -> str | None:
    from harness.engines.quanto import DIFFUSERS_WEIGHTS

    return {v: k for k, v in DIFFUSERS_WEIGHTS.items()}.get(config.get("weights_dtype"))


def _sdnq_config(qtype: str, dtype: torch.dtype) -> object:
    from sdnq import SDNQConfig

    from harness.engines.sdnq import OPTIONS

    return SDNQConfig(**OPTIONS[qtype])


def _sdnq_placed(config, offload: str, device: torch.device):
    """SDNQ's quantization and return devices by offload mode, as SD.Next sets them in its "pre" mode too."""
    from harness.engines.sdnq import sdnext_devices

    for key, value in sdnext_devices(offload, device).items():
        setattr(config, key, value)
    return config


def _sdnq_type(config: dict) -> str | None:
    from harness.engines.sdnq import qtype_of

    return qtype_of(config)


def _torchao_config(qtype: str, dtype: torch.dtype) -> object:
    import torchao.quantization as tq
    from diffusers import TorchAoConfig

    from harness.engines.torchao_engine import CONFIGS

    return TorchAoConfig(getattr(tq, CONFIGS[qtype])())


def _torchao_type(config: dict) -> str | None:
    """diffusers serializes a torchao config object as {"default": {"_type": "<ConfigClass>", ...}}."""
    from harness.engines.torchao_engine import CONFIGS

    quant = config.get("quant_type")
    name = quant.get("default", {}).get("_type") if isinstance(quant, dict) else quant
    return {v: k for k, v in CONFIGS.items()}.get(name)


def _gguf_config(qtype: str, dtype: torch.dtype) -> object:
    """diffusers reads GGUF only from a .gguf file (`from_single_file`), the pre-quantized load mode."""
    from diffusers import GGUFQuantizationConfig

    return GGUFQuantizationConfig(compute_dtype=dtype)


def _modelopt_config(qtype: str, dtype: torch.dtype) -> object:
    """NVIDIAModelOptConfig(**config) with SD.Next's config for the type, as SD.Next builds it."""
    import copy

    from diffusers import NVIDIAModelOptConfig

    from harness.engines.modelopt_engine import SDNEXT

    return NVIDIAModelOptConfig(quant_method="modelopt", **copy.deepcopy(SDNEXT[qtype]))


def _modelopt_type(config: dict) -> str | None:
    from harness.engines.modelopt_engine import SDNEXT

    return {v["quant_type"]: k for k, v in SDNEXT.items()}.get(config.get("quant_type"))


def _autoround_type(config: dict) -> str | None:
    """auto-round's quantization_config names bits, not its scheme: W{bits}A16 for symmetric integer weights."""
    if config.get("data_type", "int") == "int" and config.get("sym", True) and (config.get("act_bits") or 16) >= 16:
        return {4: "W4A16", 8: "W8A16"}.get(config.get("bits"))
    return None


def _loads_only(what: str) -> Callable[[str, torch.dtype], object]:
    def config(qtype: str, dtype: torch.dtype) -> object:
        raise NotOffered(f"diffusers' {what} quantizer loads pre-quantized checkpoints only")

    return config


@dataclass(frozen=True)
class Integration:
    """One engine's quantizer integration in diffusers."""

    config: Callable[[str, torch.dtype], object]  # (qtype, compute dtype) -> the quantization_config to pass
    quant_method: str | None = None  # what a saved config.json's quantization_config names it
    saved_type: Callable[[dict], str | None] = lambda config: None  # that config -> its qtype
    single_file: bool = False  # pre-quantized as the engine's own file, read with from_single_file (GGUF)
    # A text encoder's quantization_config: transformers' config class (sdnq's one class serves both libraries);
    # None: transformers has none for the engine (stacks.catalog: text_encoder_engines)
    te_config: Callable[[str, torch.dtype], object] | None = None
    # Who writes the pre-quantized form: "diffusers" (save_pretrained after quantizing while loading) or "engine"
    # (the engine's own API: engine.save, or save_pipeline for a whole pipeline), for a backend diffusers only loads
    writer: str = "diffusers"
    # (config, offload mode, device) -> the config placed for a cell's run; None: where the model lies
    placed: Callable[[object, str, torch.device], object] | None = None


INTEGRATIONS: dict[str, Integration] = {
    "none": Integration(lambda qtype, dtype: None, te_config=lambda qtype, dtype: None),  # the float model
    "bnb": Integration(_bnb_config, "bitsandbytes", _bnb_type, te_config=_bnb_te_config),
    "quanto": Integration(_quanto_config, "quanto", _quanto_type, te_config=_quanto_te_config),
    "sdnq": Integration(_sdnq_config, "sdnq", _sdnq_type, te_config=_sdnq_config, placed=_sdnq_placed),
    "torchao": Integration(_torchao_config, "torchao", _torchao_type, te_config=_torchao_te_config),
    "gguf": Integration(_gguf_config, single_file=True),
    "modelopt": Integration(_modelopt_config, "modelopt", _modelopt_type),
    "autoround": Integration(_loads_only("AutoRound"), "auto-round", _autoround_type, writer="engine"),
    "nunchaku": Integration(_loads_only("nunchaku_lite"), "nunchaku_lite", writer="engine"),
}


# This stack in a standalone repro script (harness/repro.py reads it as text, without importing this module): per
# load mode the files it prepares and the statements that load `model` (as `files` and `load` below), per offload
# mode the statements that install it and the one to run after each step (offload_pipeline below),
# and each engine's quantization config (INTEGRATIONS' `config`); `{cls}` is the model's diffusers class,
# `{config}` the engine's config, `{quantize}` its statements after load, `{write_file}` its own file's writer.
_FLOAT_DIR = ('float_dir = tmp / "float"  # the float32 model as save_pretrained writes it (loading.make_float_dir)\n'
              "build_model(torch.float32).save_pretrained(str(float_dir))")
REPRO = {
    "needs": ("safetensors",),
    "prepare": {"*": _FLOAT_DIR,
                "prequantized": _FLOAT_DIR + "\n"
                "saved = tmp / \"prequantized\"  # what save_pretrained writes of the model quantized while loading\n"
                "{cls}.from_pretrained(\n"
                "    str(float_dir), torch_dtype=DTYPE, quantization_config={config}).save_pretrained(str(saved))",
                "prequantized+file": _FLOAT_DIR + "\nsaved = {write_file}  # the engine's file of the float model"},
    "load": {"post-load": "model = {cls}.from_pretrained(str(float_dir), torch_dtype=DTYPE)\n{quantize}",
             "on-the-fly": "model = {cls}.from_pretrained(\n"
                           "    str(float_dir), torch_dtype=DTYPE, quantization_config={config})",
             "prequantized": "model = {cls}.from_pretrained(str(saved), torch_dtype=DTYPE)",
             "prequantized+file": "model = {cls}.from_single_file(\n"
                                  "    str(saved), config=str(float_dir), torch_dtype=DTYPE,\n"
                                  "    quantization_config={config})"},
    "offload_copy": ("ComponentPipeline",),  # as _pipeline_class below makes it
    "offload": {"none": ("pipe = ComponentPipeline(model)\npipe.to(DEVICE)", ""),
                "model": ("pipe = ComponentPipeline(model)\npipe.enable_model_cpu_offload(device=DEVICE)",
                          "pipe.maybe_free_model_hooks()"),
                "sequential": ("pipe = ComponentPipeline(model)\n"
                               "pipe.enable_sequential_cpu_offload(device=DEVICE)", ""),
                "group": ("pipe = ComponentPipeline(model)\npipe.enable_group_offload({group_pipeline})", "")},
    "why_not_offload": "balanced offload is SD.Next's algorithm as the harness implements it (harness/offload.py), "
                       "not an upstream API",
    "configs": {"none": "None",
                "bnb": {"int8": "diffusers.BitsAndBytesConfig(load_in_8bit=True)",
                        "*": "diffusers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type={FOUR_BIT[0]!r}, "
                             "bnb_4bit_use_double_quant={FOUR_BIT[1]!r}, bnb_4bit_compute_dtype=DTYPE)"},
                "quanto": "diffusers.QuantoConfig(weights_dtype={DIFFUSERS_WEIGHTS!r})",
                "sdnq": "sdnq.SDNQConfig({OPTIONS:kw})",
                "torchao": "diffusers.TorchAoConfig(tq.{CONFIGS}())",
                "gguf": "diffusers.GGUFQuantizationConfig(compute_dtype=DTYPE)",
                "modelopt": 'diffusers.NVIDIAModelOptConfig(quant_method="modelopt", {SDNEXT:kw})'},
}


def quantization_config(engine: Engine, qtype: str, dtype: torch.dtype, offload: str | None = None,
                        device: torch.device | None = None) -> object:
    """The engine's diffusers config for the type; for a cell (its offload mode and device given), placed as the
    integration places it (SDNQ's devices, as SD.Next sets them)."""
    config = INTEGRATIONS[engine.name].config(qtype, dtype)
    placed = INTEGRATIONS[engine.name].placed
    return placed(config, offload, device) if placed and offload is not None and config is not None else config


def prequantized_path(workdir: Path, engine: Engine, qtype: str, model: str, dtype: torch.dtype, seed: int) -> Path:
    stem = loading.prequantized_stem(engine, qtype, model, dtype, seed)
    single = INTEGRATIONS[engine.name].single_file
    return workdir / "diffusers-prequantized" / (stem + (engine.file_suffix if single else ""))


def make_prequantized(workdir: Path, engine: Engine, qtype: str, model: str, dtype: torch.dtype,
                      seed: int) -> Callable[[Path], None]:
    """How the engine's serialized form of the model is written: what `save_pretrained` writes for a model diffusers
    quantized on the fly, or for a single-file format (GGUF) the engine's own file under diffusers' tensor names."""

    def make(tmp: Path) -> None:
        if INTEGRATIONS[engine.name].writer == "engine":
            engine.save(float_model(workdir, model, seed, dtype), qtype, tmp)
            return
        if INTEGRATIONS[engine.name].single_file:
            quantized = engine.quantize(float_model(workdir, model, seed, dtype), qtype, dtype=dtype,
                                        device=torch.device("cpu"))
            engine.save(quantized, qtype, tmp)
            return
        source = float_dir(workdir, model, seed, dtype)
        loaded = model_class(model).from_pretrained(str(source), torch_dtype=dtype, use_safetensors=True,
                                                    quantization_config=quantization_config(engine, qtype, dtype))
        try:
            loaded.save_pretrained(str(tmp))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    return make


def prequantized(workdir: Path, engine: Engine, qtype: str, model: str, dtype: torch.dtype, seed: int) -> Path:
    return shared_file(prequantized_path(workdir, engine, qtype, model, dtype, seed),
                       make_prequantized(workdir, engine, qtype, model, dtype, seed))


def prequantized_pipeline_path(workdir: Path, engine: Engine, qtype: str, model: str, components: str,
                               dtype: torch.dtype, seed: int) -> Path:
    stem = prequantized_path(workdir, engine, qtype, model, dtype, seed).name
    return workdir / "diffusers-prequantized" / f"{stem}-{components}"


def make_prequantized_pipeline(workdir: Path, engine: Engine, qtype: str, model: str, components: str,
                               dtype: torch.dtype, seed: int) -> Callable[[Path], None]:
    """A pre-quantized pipeline directory, laid out as SD.Next's reference models are (diffusers' pipeline layout,
    each quantized component's config.json naming its quantization_config): what the pipeline's save_pretrained
    writes after quantizing while loading (a PipelineQuantizationConfig), or the engine's own API's (AutoRound)."""
    from harness.models.pipelines import PROMPT

    def make(tmp: Path) -> None:
        source = float_dir(workdir, model, seed, dtype)
        if INTEGRATIONS[engine.name].single_file:
            raise NotOffered(f"a {engine.name} file holds one model: no pipeline directory is written for it")
        try:
            if INTEGRATIONS[engine.name].writer == "engine":
                engine.save_pipeline(load_pipeline(model, source, dtype).pipe, qtype, tmp, [PROMPT])
                return
            config = pipeline_quantization_config(engine, qtype, model, components, dtype)
            load_pipeline(model, source, dtype, **({"quantization_config": config} if config else {})
                          ).save_pretrained(str(tmp))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    return make


def check_saved_pipeline(path: Path, engine: Engine, qtype: str, model: str, components: str) -> None:
    """Each component the cell quantizes must say, in its saved config, that it holds this engine's type (a text
    encoder saved without its quantization would otherwise load as a float one, unnoticed): the denoiser the
    cell's, a text encoder the one SD.Next's defaults give it (catalog: text_encoder_types)."""
    denoiser = PIPELINES[model].denoiser
    for attr in component_names(model)[components] if engine.name != "none" else [denoiser]:
        found, own = detect_saved(path / attr), qtype if attr == denoiser else text_encoder_type(engine.name, qtype)
        if found != (engine.name, own):
            raise QuantMatrixError(f"the {attr}'s config says engine {found[0]!r} type {found[1]!r}; expected "
                                   f"{engine.name!r} type {own!r}", path=path / attr)


class DiffusersStack(Stack):
    name = "diffusers"

    def files(self, task) -> list[SharedFile]:
        cell, seed = task.cell, task.settings.seed
        dtype = getattr(torch, cell.dtype)
        prequantized = cell.load == "prequantized"
        out = [SharedFile(loading.float_dir_path(task.workdir, cell.model, seed, dtype),
                          loading.make_float_dir(cell.model, seed, dtype), source=not prequantized)]
        if prequantized and MODELS[cell.model].pipeline:
            engine = ENGINES[cell.engine]
            out.append(SharedFile(prequantized_pipeline_path(task.workdir, engine, cell.qtype, cell.model,
                                                             cell.components, dtype, seed),
                                  make_prequantized_pipeline(task.workdir, engine, cell.qtype, cell.model,
                                                             cell.components, dtype, seed)))
        elif prequantized:
            engine = ENGINES[cell.engine]
            out.append(SharedFile(prequantized_path(task.workdir, engine, cell.qtype, cell.model, dtype, seed),
                                  make_prequantized(task.workdir, engine, cell.qtype, cell.model, dtype, seed)))
        return out

    def load(self, task, engine: Engine, source: Path | None) -> Loaded:
        cell, seed = task.cell, task.settings.seed
        dtype, device = getattr(torch, cell.dtype), devices.torch_device(cell.device)
        if MODELS[cell.model].pipeline:
            return load_pipeline_cell(engine, cell, source, dtype, device, seed)
        if cell.load == "post-load":
            return load_post(engine, cell.qtype, cell.model, source, dtype, device, cell.offload)
        if cell.load == "on-the-fly":
            return load_on_the_fly(engine, cell.qtype, cell.model, source, dtype, cell.offload, device)
        return load_prequantized(engine, cell.qtype, cell.model, source,
                                 float_dir(task.workdir, cell.model, seed, dtype), dtype)

    def offload(self, model, mode, device, *, components, settings):
        return offload_pipeline(model, mode, device, components=components, settings=settings)


def pipeline_quantization_config(engine: Engine, qtype: str, model: str, components: str, dtype: torch.dtype,
                                 offload: str | None = None, device: torch.device | None = None):
    """diffusers' PipelineQuantizationConfig(quant_mapping=...): the denoiser's diffusers config, each text
    encoder's transformers config (None for the unquantized pipeline); for a cell, each placed as the integration
    places it."""
    from diffusers.quantizers import PipelineQuantizationConfig

    integration = INTEGRATIONS[engine.name]
    denoiser = PIPELINES[model].denoiser
    te_qtype = text_encoder_type(engine.name, qtype)  # as SD.Next's defaults give a text encoder
    mapping = {attr: integration.config(qtype, dtype) if attr == denoiser else integration.te_config(te_qtype, dtype)
               for attr in component_names(model)[components]}
    placed = integration.placed if offload is not None else None
    mapping = {k: placed(v, offload, device) if placed else v for k, v in mapping.items() if v is not None}
    return PipelineQuantizationConfig(quant_mapping=mapping) if mapping else None


def load_pipeline_cell(engine: Engine, cell, source: Path, dtype: torch.dtype, device: torch.device,
                       seed: int = 0) -> Loaded:
    """A whole pipeline from its float directory: post-load (the pipeline's from_pretrained, then the engine's
    own API on each component the cell quantizes), or on the fly (from_pretrained with a
    PipelineQuantizationConfig: quantized inside the load call)."""
    if cell.load == "post-load":
        return loading.load_post_pipeline(engine, cell.qtype, cell.model, cell.components,
                                          lambda: load_pipeline(cell.model, source, dtype), dtype, device, seed,
                                          cell.offload)
    if cell.load == "prequantized":  # the pipeline's from_pretrained reads each component's quantization_config
        check_saved_pipeline(source, engine, cell.qtype, cell.model, cell.components)
        t0 = time.perf_counter()
        loaded = load_pipeline(cell.model, source, dtype)
        return Loaded(loaded, time.perf_counter() - t0, 0.0, _size(source))
    config = pipeline_quantization_config(engine, cell.qtype, cell.model, cell.components, dtype, cell.offload,
                                          device)
    t0 = time.perf_counter()
    loaded = load_pipeline(cell.model, source, dtype, **({"quantization_config": config} if config else {}))
    return Loaded(loaded, time.perf_counter() - t0, None, _size(source))


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def load_on_the_fly(engine: Engine, qtype: str, model: str, source: Path, dtype: torch.dtype,
                    offload: str = "none", device: torch.device | None = None) -> Loaded:
    """Quantized by diffusers while loading: load and quantize are one call, so its time is all `load_s`."""
    config = quantization_config(engine, qtype, dtype, offload, device)
    t0 = time.perf_counter()
    loaded = model_class(model).from_pretrained(str(source), torch_dtype=dtype, quantization_config=config,
                                                use_safetensors=True)
    return Loaded(loaded, time.perf_counter() - t0, None, _size(source))


def load_post(engine: Engine, qtype: str, model: str, source: Path, dtype: torch.dtype,
              device: torch.device, offload: str = "none") -> Loaded:
    t0 = time.perf_counter()
    loaded = model_class(model).from_pretrained(str(source), torch_dtype=dtype, use_safetensors=True)
    loaded._quantmatrix_name = model  # for engines that trace it with the model's example input (NNCF)
    t1 = time.perf_counter()
    quantized = engine.quantize_for(loaded, qtype, dtype=dtype, device=device, offload=offload)
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
    for name, integration in INTEGRATIONS.items():
        if integration.quant_method is not None and quant.get("quant_method") == integration.quant_method:
            qtype = integration.saved_type(quant)
            if qtype in ENGINES[name].qtypes:
                return name, qtype
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
    if INTEGRATIONS[engine.name].single_file:
        loaded = cls.from_single_file(str(path), config=str(float_source), torch_dtype=dtype,
                                      quantization_config=quantization_config(engine, qtype, dtype))
    else:
        loaded = cls.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True)
    hint, detail = check_name(path, found)
    return Loaded(loaded, time.perf_counter() - t0, 0.0, _size(path), hint, detail)


def offload_pipeline(model: nn.Module, mode: str, device: str, *, components: list[nn.Module] | None = None,
                     settings: Settings | None = None) -> offload.Installed:
    """The diffusers stack's offload: the pipeline's own methods (a model alone as the one component of a
    minimal pipeline); SD.Next's balanced offload."""
    s = settings or Settings()
    execution = devices.torch_device(device)
    if mode == "balanced":
        return offload.balanced(model, device, components, s)
    pipe = getattr(model, "pipe", None) or component_pipeline(model)
    if mode == "none":
        pipe.to(execution)
    elif mode == "model":
        pipe.enable_model_cpu_offload(device=execution)
        # A real pipeline's call ends with maybe_free_model_hooks itself; the one-component pipeline is not called
        return offload.Installed() if getattr(model, "pipe", None) else offload.Installed(pipe.maybe_free_model_hooks)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=execution)
    elif mode == "group":
        pipe.enable_group_offload(**offload.group_options(s, execution))
    else:
        raise ValueError(f"unknown offload mode {mode!r}")
    return offload.Installed()


@functools.cache
def _pipeline_class() -> type:
    import diffusers

    class ComponentPipeline(diffusers.DiffusionPipeline):
        """The smallest pipeline: one denoiser component, so that diffusers' own offload methods run on it."""

        model_cpu_offload_seq = "transformer"

        def __init__(self, transformer: nn.Module):
            super().__init__()
            self.register_modules(transformer=transformer)

    return ComponentPipeline


def component_pipeline(model: nn.Module):
    return _pipeline_class()(model)
