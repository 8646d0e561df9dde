"""Models read from the user's disk: the `[models.NAME]` tables of a matrix file.

    [models.my-flux]
    path = "/data/FLUX.1-dev"           # a diffusers pipeline directory (model_index.json)
    call = { height = 512, width = 512, num_inference_steps = 4 }   # optional: the generation a cell runs

    [models.my-unet]
    path = "unet"                       # a model directory (config.json): a Flux, SD3 or SDXL denoiser

    [models.my-file]
    path = "flux1-dev.safetensors"      # one file, original or diffusers keys ...
    config = "FLUX.1-dev/transformer"   # ... and the directory of its architecture's config.json

    [models.my-shape]
    class = "FluxTransformer2DModel"    # a diffusers class at a shape of one's own, seeded random weights ...
    config = { num_layers = 1, num_single_layers = 2, attention_head_dim = 32, num_attention_heads = 4,
               joint_attention_dim = 128, pooled_projection_dim = 128, axes_dims_rope = [8, 12, 12] }
                                        # ... its arguments over the class's defaults, or a directory with
                                        # its config.json

Relative paths are read from the matrix file's folder. What kind of model it is (pipeline or denoiser), its
classes and components are read from the files' JSON configs when the matrix is loaded (no torch, no weights):
a missing or unreadable file is one line naming it. The weights are read when a cell needs them, with
`use_safetensors=True` (a pickled weights file is never read), and nothing is fetched: the run is offline.

Such a model joins the built-in ones (`specs.MODELS`) under its name and runs on every axis as they do: its float
model is the checkpoint itself in the cell's dtype, loaded by the stacks as a model with shared weights (a
directory is read where it lies; a single file is converted once per run into the run's directory). A `class`
model has no checkpoint: its weights are drawn from the run's seed as the built-in models' are, once per run into
the run's directory (its records say `weights: seeded`); alone, a denoiser runs only where its inputs are made here
(Flux's, SD3's and SDXL's classes).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from harness.cell import AXES
from harness.errors import QuantMatrixError
from harness.models import specs

# A user model's name becomes part of cell ids, file names and pages: letters, digits, ".", "_" and "-" only
NAME = AXES["model"].named
KEYS = ("path", "class", "config", "call")
CONFIG_BYTES = 4 << 20  # a model's JSON config is kilobytes; anything bigger is not one
ALONE = ("flux", "sd3", "sdxl")  # the kinds a denoiser alone may be: real.make_inputs makes their inputs
SMALL_CALL = dict(num_inference_steps=2)  # a cell's generation: two steps, at 32 latent pixels a side
# The arguments a denoiser's input shapes are read from, as each class defaults them (a `class` model's config names
# only what it changes; tests check these against diffusers' signatures). SDXL's UNet has no default added
# embedding: a UNet alone needs projection_class_embeddings_input_dim and addition_time_embed_dim given.
CLASS_DEFAULTS = {
    "FluxTransformer2DModel": dict(in_channels=64, num_layers=19, attention_head_dim=128, num_attention_heads=24,
                                   joint_attention_dim=4096, pooled_projection_dim=768),
    "SD3Transformer2DModel": dict(in_channels=16, num_layers=18, attention_head_dim=64, num_attention_heads=18,
                                  joint_attention_dim=4096, pooled_projection_dim=2048),
    "UNet2DConditionModel": dict(in_channels=4, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                                 cross_attention_dim=1280, attention_head_dim=8),
}
# Each class's constructor arguments, all of them (a `class` config naming another is a typo; tested against the
# signatures like CLASS_DEFAULTS)
CLASS_PARAMETERS = {
    "FluxTransformer2DModel": (
        "patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers", "attention_head_dim",
        "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "axes_dims_rope"),
    "SD3Transformer2DModel": (
        "sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
        "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
        "pos_embed_max_size", "dual_attention_layers", "qk_norm"),
    "UNet2DConditionModel": (
        "sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
        "down_block_types", "mid_block_type", "up_block_types", "only_cross_attention", "block_out_channels",
        "layers_per_block", "downsample_padding", "mid_block_scale_factor", "dropout", "act_fn", "norm_num_groups",
        "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "reverse_transformer_layers_per_block",
        "encoder_hid_dim", "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads",
        "dual_cross_attention", "use_linear_projection", "class_embed_type", "addition_embed_type",
        "addition_time_embed_dim", "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
        "resnet_skip_time_act", "resnet_out_scale_factor", "time_embedding_type", "time_embedding_dim",
        "time_embedding_act_fn", "timestep_post_act", "time_cond_proj_dim", "conv_in_kernel", "conv_out_kernel",
        "projection_class_embeddings_input_dim", "attention_type", "class_embeddings_concat",
        "mid_block_only_cross_attention", "cross_attention_norm", "addition_embed_type_num_heads"),
}
FLUX_ROPE = (16, 56, 56)  # FluxTransformer2DModel's default axes_dims_rope: they split a head's dimensions


@dataclass(frozen=True)
class Source:
    """A `[models.NAME]` table, resolved: where its files are (plain data: it travels to each cell's process)."""

    name: str
    path: str  # a pipeline or model directory, or a single .safetensors file ("" for a class)
    config: str = ""  # the single file's or the class's architecture: a directory with config.json
    cls: str = ""  # a diffusers class drawn with seeded weights, not read from disk
    arguments: str = ""  # the class's arguments given inline, as JSON (the record stays plain, hashable data)
    call: tuple[tuple[str, object], ...] = ()  # the pipeline call's arguments, over the defaults
    matrix: str = ""  # the matrix file that names it (for messages)

    @property
    def single_file(self) -> bool:
        return not Path(self.path).is_dir()


def _fail(source: Source, message: str) -> QuantMatrixError:
    return QuantMatrixError(message, path=Path(source.matrix or "<matrix>"), key=f"models.{source.name}")


def read_json(source: Source, path: Path, what: str) -> dict:
    """A config file as a dict, or one line naming the file and what was expected."""
    try:
        if not path.is_file():
            raise _fail(source, f"{path}: not found; expected {what}")
        if path.stat().st_size > CONFIG_BYTES:
            raise _fail(source, f"{path}: {path.stat().st_size} bytes; expected {what} (a JSON config)")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(source, f"{path}: unreadable ({exc}); expected {what}") from None
    if not isinstance(data, dict):
        raise _fail(source, f"{path}: a JSON {type(data).__name__}; expected {what} (a JSON object)")
    return data


def from_table(name: str, table: object, matrix: Path) -> Source:
    """A `[models.NAME]` table checked and resolved against the matrix file's folder."""
    where = Source(name, "", matrix=str(matrix))
    if not re.fullmatch(NAME, name):
        raise _fail(where, f"name {name!r}: expected lowercase letters, digits, '.', '_' and '-' (at most 48)")
    if name in specs.MODELS and name not in SOURCES:
        raise _fail(where, f"{name!r} is a built-in model; expected a name of your own")
    if not isinstance(table, dict) or not isinstance(table.get("path", table.get("class")), str) or (
            "path" in table and "class" in table):
        raise _fail(where, "expected a table with path = \"a pipeline or model directory, or a .safetensors file\" "
                           "or class = \"a diffusers model class\" (one of the two)")
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise _fail(where, f"unknown key {unknown[0]!r}; expected one of {list(KEYS)}")
    call = table.get("call", {})
    if not isinstance(call, dict) or not all(isinstance(v, (int, float, str)) for v in call.values()):
        raise _fail(where, "call: expected a table of numbers and strings (the pipeline call's arguments)")
    config = table.get("config", "")
    inline = "class" in table and isinstance(config, dict)
    if not isinstance(config, str) and not inline:
        raise _fail(where, "config: expected a directory holding config.json" + (
            ", or a table of the class's arguments" if "class" in table else ""))
    if "class" in table and not config:
        raise _fail(where, "a class needs config = { its arguments } or \"a directory with its config.json\"")
    if "class" in table and "call" in table:
        raise _fail(where, "call: a class model is a denoiser alone, run one step at a time; a call is a pipeline's")
    try:
        arguments = json.dumps(config, sort_keys=True, allow_nan=False) if inline else ""
    except (TypeError, ValueError) as exc:
        raise _fail(where, f"config: {exc}; expected numbers, strings, booleans and lists") from None

    def resolve(p: str) -> str:
        return str((matrix.parent / Path(p).expanduser()).resolve()) if p else ""

    return Source(name, resolve(table.get("path", "")), config="" if inline else resolve(config),
                  cls=table.get("class", ""), arguments=arguments,
                  call=tuple(sorted(call.items())), matrix=str(matrix))


def register(source: Source) -> specs.ModelSpec:
    """Read the source's configs and add it to specs.MODELS (and DIFFUSERS_CONFIGS, PIPELINES, REAL_CLASSES) under
    its name; the same source again is a no-op. Raises a one-line QuantMatrixError for a file that is not there or
    not what it should be."""
    known = SOURCES.get(source.name)
    if known is not None:
        if known != source:
            raise _fail(source, f"named twice, as {known.path or known.cls} and {source.path or source.cls}; "
                                "expected one model per name")
        return specs.MODELS[source.name]
    path = Path(source.path)
    if source.cls:
        spec = _register_class(source)
    elif path.is_dir() and (path / "model_index.json").exists():
        spec = _register_pipeline(source, path)
    elif path.is_dir():
        config = read_json(source, path / "config.json", "a diffusers pipeline directory (model_index.json) or "
                                                         "model directory (config.json)")
        _float_only(source, path / "config.json", config)
        spec = _register_denoiser(source, config)
        _weights(source, path)
    elif path.suffix == ".safetensors" and path.is_file():
        if not source.config:
            raise _fail(source, f"{path}: a single file needs config = \"a directory with its architecture's "
                                "config.json\"")
        spec = _register_denoiser(source, read_json(source, Path(source.config) / "config.json",
                                                    "the single file's model config (config.json)"))
    elif path.exists():
        raise _fail(source, f"{path}: expected a diffusers directory or a .safetensors file (a .gguf, a .ckpt or a "
                            "pickle is not read as a model here)")
    else:
        raise _fail(source, f"{path}: not found; expected a diffusers directory or a .safetensors file")
    SOURCES[source.name] = source
    return spec


def register_all(sources: tuple[Source, ...]) -> None:
    for source in sources:
        register(source)


SOURCES: dict[str, Source] = {}


def _float_only(source: Source, path: Path, config: dict) -> None:
    """A model source is the float model every cell is judged against: a pre-quantized checkpoint (diffusers' or
    transformers' `quantization_config`, as SD.Next's SDNQ reference models have) cannot be one."""
    if "quantization_config" in config:
        method = (config["quantization_config"] or {}).get("quant_method", "?") if isinstance(
            config["quantization_config"], dict) else "?"
        raise _fail(source, f"{path}: pre-quantized ({method}); expected a float checkpoint (a pre-quantized one as a "
                            "source of its own is not supported yet: `quantmatrix detect` names its engine and type)")


def _weights(source: Source, directory: Path) -> None:
    if not any(directory.glob("*.safetensors")):
        raise _fail(source, f"{directory}: no *.safetensors weights; expected what save_pretrained writes (a "
                            "pickled *.bin is never read)")


def _kind(denoiser_class: str) -> str:
    """The spec kind of a denoiser class: a built-in kind where the class is one; else the class's own name."""
    kind = next((k for k, cls in specs.REAL_CLASSES.items() if cls == denoiser_class), None)
    if kind is None:
        kind = denoiser_class
        specs.REAL_CLASSES[kind] = denoiser_class
    return kind


def _register_class(source: Source) -> specs.ModelSpec:
    """A diffusers class at the shape its arguments give, seeded weights (no checkpoint): a denoiser alone."""
    if source.cls not in CLASS_PARAMETERS:
        close = difflib.get_close_matches(source.cls, CLASS_PARAMETERS, 1)
        raise _fail(source, f"a model of class {source.cls!r}: alone, only {', '.join(CLASS_PARAMETERS)} run (their "
                            "inputs are made here)" + (f"; did you mean {close[0]!r}?" if close else ""))
    path = Path(source.config) / "config.json"
    config = json.loads(source.arguments) if source.arguments else read_json(
        source, path, "the class's config (config.json)")
    named = config.get("_class_name", source.cls)
    if named != source.cls:
        raise _fail(source, f"config names class {named!r}; expected {source.cls!r}, the table's class")
    if not source.arguments:
        _float_only(source, path, config)
    _check_arguments(source, {k: v for k, v in config.items() if not k.startswith("_")})
    spec = _register_denoiser(source, {**CLASS_DEFAULTS[source.cls], **config, "_class_name": source.cls})
    specs.MODELS[source.name] = spec = replace(spec, source="")  # drawn from the seed, once per run
    return spec


def _check_arguments(source: Source, arguments: dict) -> None:
    """A class's arguments as the class takes them: known names, whole shapes, Flux's rotary axes summing to a
    head's dimensions (else the first step fails in apply_rotary_emb, the float model's too)."""
    known = CLASS_PARAMETERS[source.cls]
    for key, value in arguments.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, 1)
            raise _fail(source, f"config: {source.cls} takes no argument {key!r}" + (
                f"; did you mean {close[0]!r}?" if close else f"; expected one of {list(known)}"))
        whole = all(type(v) is int and v >= 1 for v in (value if isinstance(value, list) else [value]))
        if key in CLASS_DEFAULTS[source.cls] and not whole:
            raise _fail(source, f"config: {key} is {value!r}; expected a whole number of at least 1"
                                + (" (or a list of them)" if isinstance(value, list) else ""))
    if source.cls == "FluxTransformer2DModel":
        head = arguments.get("attention_head_dim", CLASS_DEFAULTS[source.cls]["attention_head_dim"])
        axes = arguments.get("axes_dims_rope", FLUX_ROPE)
        if isinstance(axes, (list, tuple)) and all(type(a) is int for a in axes) and sum(axes) != head:
            raise _fail(source, f"config: axes_dims_rope {list(axes)} sums to {sum(axes)}; expected attention_head_dim "
                                f"({head}): Flux's rotary embedding splits each head's dimensions among its axes")


def _register_denoiser(source: Source, config: dict) -> specs.ModelSpec:
    """A denoiser alone: its inputs are made as the built-in classes' are (real.make_inputs), so the class must be
    Flux's, SD3's or SDXL's; the input shapes are read from its config."""
    cls = config.get("_class_name")
    alone = {specs.REAL_CLASSES[k]: k for k in ALONE}
    kind = alone.get(cls)
    if kind is None:
        raise _fail(source, f"a model of class {cls!r}: alone, only {', '.join(alone)} run (their inputs are made "
                            "here); expected one of them, or its pipeline's directory")
    arguments = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        spec = _denoiser_spec(kind, arguments, source.path)
    except KeyError as exc:
        raise _fail(source, f"config of class {cls}: {exc.args[0]!r} missing; expected diffusers' config of the "
                            "class") from None
    except (TypeError, ValueError) as exc:
        raise _fail(source, f"config of class {cls}: a shape that is not a number ({exc}); expected diffusers' "
                            "config of the class") from None
    specs.DIFFUSERS_CONFIGS[source.name] = arguments
    specs.MODELS[source.name] = spec
    return spec


def _denoiser_spec(kind: str, c: dict, path: str) -> specs.ModelSpec:
    common = dict(latent=16, context_tokens=16, shared_weights=True, source=path)
    if kind == "flux":
        return specs.ModelSpec("flux", width=int(c["num_attention_heads"]) * int(c["attention_head_dim"]),
                               depth=int(c["num_layers"]), heads=int(c["num_attention_heads"]),
                               channels=int(c["in_channels"]) // 4, context_dim=int(c["joint_attention_dim"]),
                               pooled_dim=int(c["pooled_projection_dim"]), **common)
    if kind == "sd3":
        return specs.ModelSpec("sd3", width=int(c["num_attention_heads"]) * int(c["attention_head_dim"]),
                               depth=int(c["num_layers"]), heads=int(c["num_attention_heads"]),
                               channels=int(c["in_channels"]), context_dim=int(c["joint_attention_dim"]),
                               pooled_dim=int(c["pooled_projection_dim"]), **common)
    heads = c.get("attention_head_dim", 8)
    return specs.ModelSpec("sdxl", width=int(c["block_out_channels"][0]), depth=int(c["layers_per_block"]),
                           heads=int(heads[0] if isinstance(heads, list) else heads), channels=int(c["in_channels"]),
                           context_dim=int(c["cross_attention_dim"]),
                           pooled_dim=int(c["projection_class_embeddings_input_dim"])
                           - 6 * int(c["addition_time_embed_dim"]), **common)


def _register_pipeline(source: Source, path: Path) -> specs.ModelSpec:
    index = read_json(source, path / "model_index.json", "a diffusers pipeline's model_index.json")
    parts = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
             and all(isinstance(x, str) for x in v)}
    denoiser = next((a for a in ("transformer", "unet") if a in parts), None)
    if denoiser is None or "vae" not in parts:
        raise _fail(source, f"{path / 'model_index.json'}: no transformer or unet, or no vae; expected a diffusers "
                            "text-to-image pipeline")
    configs = {a: read_json(source, path / a / "config.json", f"the {a}'s config.json")
               for a, (library, _) in parts.items() if library in ("diffusers", "transformers")
               and not a.startswith(("scheduler", "tokenizer"))}
    for attr, config in configs.items():
        _float_only(source, path / attr / "config.json", config)
        _weights(source, path / attr)
    pipeline_class = str(index.get("_class_name"))
    denoiser_class = parts[denoiser][1]
    kind = _kind(denoiser_class)
    encoders = {a: (parts[a][1], _arguments(configs[a])) for a in sorted(configs) if a.startswith("text_encoder")}
    tokenizers = {a: _max_length(source, path / a) for a in sorted(parts) if a.startswith("tokenizer")}
    template = next((p for p in specs.PIPELINES.values() if p.pipeline == pipeline_class), None)
    vae = _arguments(configs["vae"])
    scale = 2 ** (len(vae.get("block_out_channels", (0,))) - 1)
    call = {**SMALL_CALL, "height": 32 * scale, "width": 32 * scale}
    if template is not None:  # the built-in pipeline of the class: its call's other arguments (Wan's frames)
        call.update({k: v for k, v in template.call.items() if k not in ("height", "width")})
        if "max_sequence_length" in template.call:
            call["max_sequence_length"] = min([*tokenizers.values(), template.call["max_sequence_length"]])
    call.update(dict(source.call))
    specs.PIPELINES[source.name] = specs.PipelineSpec(
        pipeline_class, denoiser, _arguments(configs[denoiser]), encoders, tokenizers, vae, parts["scheduler"][1]
        if "scheduler" in parts else "", template.quantized_te if template else tuple(encoders), call)
    spec = specs.ModelSpec(kind, width=0, depth=0, heads=0, pipeline=True, shared_weights=True, source=str(path))
    specs.MODELS[source.name] = spec
    return spec


def _arguments(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _max_length(source: Source, directory: Path) -> int:
    config = directory / "tokenizer_config.json"
    length = read_json(source, config, "a tokenizer's config").get("model_max_length", 77) if config.exists() else 77
    return int(length) if isinstance(length, (int, float)) and 0 < length < 1 << 20 else 77


# ------------------------------------------------------------------------------------------------ weights (torch)

def load_float(name: str, dtype):
    """The float model from the user's files on the CPU, in `dtype`: a pipeline as a PipelineModel."""
    from harness.models import pipelines, real

    source = SOURCES[name]
    if specs.MODELS[name].pipeline:
        return pipelines.load_pipeline(name, source.path, dtype)
    cls = real.model_class(name)
    if source.single_file:  # original or diffusers keys; the architecture from the config directory
        model = cls.from_single_file(source.path, config=source.config, torch_dtype=dtype)
    else:
        model = cls.from_pretrained(source.path, torch_dtype=dtype, use_safetensors=True)
    model = model.eval()  # in `dtype` as from_pretrained casts (a class's keep-in-fp32 modules stay float32)
    model._quantmatrix_name = name
    return model


def skeleton_pipeline(name: str, dtype):
    """The pipeline with its modules on the meta device, made from the directory's configs (tokenizers and the
    scheduler read as they are: they hold no weights)."""
    import diffusers
    import torch
    import transformers
    from torch import nn

    from harness.models import pipelines, real

    source, spec = SOURCES[name], specs.PIPELINES[name]
    index = json.loads((Path(source.path) / "model_index.json").read_text(encoding="utf-8"))
    parts: dict = {}
    for attr, (library, cls_name) in ((a, v) for a, v in index.items() if not a.startswith("_")
                                      and isinstance(v, list) and len(v) == 2 and v[0]):
        sub = str(Path(source.path) / attr)
        cls = getattr(transformers if library == "transformers" else diffusers, cls_name)
        if attr in spec.text_encoders:
            with torch.device("meta"):
                parts[attr] = cls._from_config(transformers.AutoConfig.from_pretrained(sub))
        elif isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin):
            with torch.device("meta"):
                parts[attr] = cls.from_config(cls.load_config(sub))
        else:
            parts[attr] = cls.from_pretrained(sub)
        if isinstance(parts[attr], nn.Module):
            parts[attr] = real.to_dtype(parts[attr], dtype).eval()
    return pipelines.assemble(name, parts)
