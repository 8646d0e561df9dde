"""Standalone reproduction scripts: `quantmatrix repro CELL_ID --results FILE [-o OUT.py]`.

A cell's record becomes one Python file that imports only torch, diffusers, accelerate and the cell's engine
package (never quantmatrix), builds the same model from the same config and seed, takes the load, quantize and
offload path the harness took for the cell, and runs up to the step that failed (the record's `error.stage`), so
that it ends with the same error: something to attach to an upstream report.

The script is text, made without importing torch, diffusers or the harness's model and engine modules (the report
writes one per failing cell and imports no torch): the model's constructor arguments are inlined from
models/specs.py, and the code that draws its seeded weights and makes its inputs is copied from the source of
models/real.py (read as text, so the weights are the harness's, bit for bit, for the seed); the engines' tables
(bitsandbytes' 4-bit types, quanto's diffusers names, torchao's configs) are read from their modules' source with
`ast.literal_eval`. Each step below says which harness function it mirrors.

What it can write (`unsupported` says why not, before anything is generated): diffusers' model classes that are
built per cell (flux-tiny, sd3-tiny, sdxl-tiny), not whole pipelines nor the harness's imitation models; on the
`direct` stack the engine's own API after load (GGUF's direct path is the harness's own kernels: not an upstream
API); on the `diffusers` stack from_pretrained of the float directory (post-load, then the engine's API; or on the
fly with the engine's diffusers config), the pre-quantized directory `save_pretrained` writes, and GGUF's `.gguf`
file (written with `gguf` as the harness writes it) through `from_single_file`; offload none, model, sequential
and group (group needs the run's matrix: its [offload.group] options are not in the record); layerwise casting.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import re
import textwrap
from collections.abc import Iterable
from pathlib import Path
from textwrap import dedent, indent

from harness.cell import Cell
from harness.engines.catalog import CATALOG, output_floor
from harness.errors import QuantMatrixError, printable
from harness.matrix import Settings
from harness.models.specs import DIFFUSERS_CONFIGS, MODELS, REAL_CLASSES
from harness.results import file_lines, validate_record
from harness.verdict import Stage

HARNESS = Path(__file__).resolve().parent
STAGES = tuple(s.value for s in Stage if s is not Stage.PROCESS)  # a cell's steps, in order
WIDTH = 116  # of the header's prose lines
# What a record whose cell ran, or whose output was not finite, is checked for at the end (against the float model)
CHECKED = ("ok", "drift-works", "drift-claim", "wrong-output")

# The functions and names of models/real.py the script copies, in the order they are defined there
MODEL_CODE = ("model_class", "build_skeleton", "seed_weights", "build_model", "to_dtype")
INPUT_CODE = ("make_inputs", "ADDED_CONDITIONS", "call_kwargs", "run")  # only where a step runs or NNCF traces


class Unsupported(QuantMatrixError):
    """The generator cannot express this cell (yet): the message names the cell and what is missing."""


# ------------------------------------------------------------------------------------------------ records

_ID = re.compile(r'"id": "([^"]*)"')


def find_record(cell_id: str, paths: Iterable[Path | str]) -> dict:
    """The latest record (by its start) of the cell across results files; an older form of its id counts too.
    Records are untrusted input: one that does not validate (results.validate_record: every cell value a known
    value of its axis, every field of its type) is refused, with the line and its problems."""
    try:
        wanted = set(Cell.from_id(cell_id).ids) | {cell_id}
    except (ValueError, TypeError) as exc:
        raise QuantMatrixError(f"not a cell id: {cell_id!r} ({exc})") from None
    found: list[dict] = []
    refused: list[str] = []
    for path in paths:
        records, bad = raw_records(Path(path), wanted)
        found += records
        refused += bad
    if not found:
        if refused:
            raise QuantMatrixError(f"the record of cell {cell_id!r} does not validate, no script written: "
                                   f"{refused[0]}" + (f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""))
        raise QuantMatrixError(f"no record of cell {cell_id!r} in {', '.join(map(str, paths))}")
    return max(found, key=lambda r: r["started"])


def raw_records(path: Path, ids: set[str] | None = None) -> tuple[list[dict], list[str]]:
    """The records of a results file as they are written (every field: the error's stage and frames, the whole
    env), only those of `ids` when given (a line is parsed only when its id is among them: cheap on big files),
    and "file:line: problems" for each of those lines that is not a valid record (results.validate_record). Only
    a valid record is ever returned: a script is written from it."""
    out, refused = [], []
    for number, line in file_lines(path):
        if ids is not None:
            match = _ID.search(line)
            if match is None or match.group(1) not in ids:
                continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            refused.append(f"{path}:{number}: not a JSON record ({exc.msg})")
            continue
        problems = validate_record(record)
        if problems:
            refused.append(f"{path}:{number}: {'; '.join(problems)}")
        else:
            out.append(record)
    return out, refused


def record_cell(record: dict) -> Cell:
    return Cell(**record["cell"])


# ------------------------------------------------------------------------------------------------ scope

def unsupported(cell: Cell, settings: Settings | None = None) -> str | None:
    """Why no script can be written for the cell, or None. Decided from the cell alone (cheap: the report asks it
    of every failing cell)."""
    spec = MODELS.get(cell.model)
    if spec is None:
        return f"model {cell.model!r} is unknown here"
    if spec.pipeline:
        return "whole pipelines (text encoders, tokenizers, VAE) are not written yet; only a model class alone"
    if cell.lora != "-":
        return "a LoRA (harness/treatments/lora.py: its weights, loading, fusing, SDNQ's merge) is not written yet"
    if not spec.real:
        return f"{cell.model} is one of the harness's own imitation models, not a diffusers class"
    if spec.shared_weights:
        return f"{cell.model} is built once per run into a shared directory; only the tiny classes are written"
    if cell.engine not in CATALOG or CATALOG[cell.engine].hidden:
        return f"engine {cell.engine!r} is not an upstream engine"
    if cell.engine in ("autoround", "nunchaku"):
        return f"{cell.engine}'s file is written by its own API on a whole pipeline (or not at all), not written yet"
    if cell.offload == "balanced":
        return "balanced offload is SD.Next's algorithm as the harness implements it (harness/offload.py), not " \
               "an upstream API"
    if cell.offload == "group" and settings is None:
        return "group offload's options are the run's matrix settings ([offload.group]), which a record does not " \
               "carry: pass the matrix with --matrix"
    if cell.offload not in ("none", "model", "sequential", "group"):
        return f"offload mode {cell.offload!r} is not written yet"
    if cell.stack == "direct":
        if cell.cast != "-":
            return "layerwise casting is a diffusers-stack option"
        if cell.engine == "gguf":
            return "GGUF on the direct stack runs the harness's own kernels (harness/engines/gguf_engine.py), not " \
                   "an upstream API"
        if cell.load != "post-load":
            return f"the direct stack's {cell.load} load is the harness's own loader and file layout; only " \
                   "post-load is written for it"
        return None
    if cell.stack != "diffusers":
        return f"stack {cell.stack!r} is not written yet"
    if cell.engine == "gguf" and cell.load != "prequantized":
        return "GGUF after load on the diffusers stack runs the harness's own kernels; only its pre-quantized " \
               ".gguf file is diffusers' own path"
    if cell.load == "on-the-fly" and cell.engine == "nncf":
        return "NNCF has no diffusers quantization config"
    if cell.load == "prequantized" and cell.engine == "nncf":
        return "NNCF has no file format of its own"
    return None


# ------------------------------------------------------------------------------------------------ source copies

@functools.cache
def _module_source(relative: str) -> tuple[str, ast.Module]:
    text = (HARNESS / relative).read_text(encoding="utf-8")
    return text, ast.parse(text)


@functools.cache
def copied_code(relative: str, names: tuple[str, ...], bare: bool = False) -> str:
    """The source text of the top-level functions and assignments `names` of a harness module, in its order;
    `bare`: without the functions' docstrings (the script's comments say where each comes from)."""
    text, tree = _module_source(relative)
    wanted, out = set(names), []
    for node in tree.body:
        name = node.name if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            node.targets[0].id if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) else None
        if name in wanted:
            out.append(_without_docstring(ast.get_source_segment(text, node), node) if bare else
                       ast.get_source_segment(text, node))
            wanted.discard(name)
    if wanted:
        raise RuntimeError(f"harness/{relative} has no {sorted(wanted)}: the repro generator copies them")
    return "\n\n\n".join(out)


def _without_docstring(source: str, node: ast.AST) -> str:
    body = getattr(node, "body", None)
    if not body or len(body) < 2 or not isinstance(body[0], ast.Expr) or not isinstance(body[0].value, ast.Constant) \
            or not isinstance(body[0].value.value, str):
        return source
    lines = source.splitlines()
    first, last = body[0].lineno - node.lineno, body[0].end_lineno - node.lineno
    return "\n".join(lines[:first] + lines[last + 1:])


def module_constant(relative: str, name: str):
    """A literal table of a harness module (e.g. engines/bnb.py FOUR_BIT), read without importing it (torch)."""
    _, tree = _module_source(relative)
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else node.target if isinstance(
            node, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and target.id == name:
            return ast.literal_eval(node.value)
    raise RuntimeError(f"harness/{relative} has no constant {name}: the repro generator reads it")


# ------------------------------------------------------------------------------------------------ the script

DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2")  # compute dtypes, casting dtypes


def _torch_dtype(name: str) -> str:
    if name not in DTYPES:  # records are validated before a script is written: a second guard on what becomes code
        raise Unsupported(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return f"torch.{name}"


def _device(device: str) -> str:
    return "cuda" if device == "rocm" else device  # devices.torch_device


def _lines(text: str, prefix: str = "#   ", width: int = 0) -> str:
    """Record text as comment lines (a message may hold newlines, quotes, anything: each line's control
    characters are escaped, so none can end its comment); `width`: long lines wrapped (prose, not a message, whose
    lines are kept as raised)."""
    out = []
    more = "#" + " " * (len(prefix) - 1)  # a wrapped line's continuation: under the text, not its label again
    for line in str(text or "").splitlines() or [""]:
        line = printable(line)
        pieces = textwrap.wrap(line, width - len(prefix), break_on_hyphens=False) if width else [line]
        for piece in pieces or [""]:
            out.append(((more if out else prefix) + piece).rstrip())
    return "\n".join(out)


def _comments(lines: list[str]) -> str:
    """The header's lines, each checked to be one comment line (record text is escaped where it is written; this
    is the guard that nothing of a record ever becomes code)."""
    for line in lines:
        for piece in line.split("\n"):
            if not piece.startswith("#") or printable(piece) != piece:
                raise RuntimeError(f"repro header line is not one comment line: {piece[:80]!r}")
    return "\n".join(lines)


def _engine_versions(env: dict) -> str:
    return printable(", ".join(f"{k} {v}" for k, v in sorted((env.get("engines") or {}).items()) if v) or "-")


def header(record: dict, cell: Cell, stop: str, settings_note: str) -> str:
    env, err, expect = record.get("env") or {}, record.get("error") or {}, record.get("expect") or {}
    engine = CATALOG[cell.engine]
    needs = ["torch", "diffusers", "accelerate", "safetensors"]
    if engine.package:
        needs.append(engine.package)
    if cell.engine == "gguf":
        needs.append("numpy")
    what = (f"engine {cell.engine}" + ("" if cell.qtype == "-" else f" {cell.qtype}") + f", load {cell.load}, "
            f"offload {cell.offload}, device {cell.device}, model {cell.model} (diffusers' "
            f"{REAL_CLASSES[MODELS[cell.model].kind]}, seeded random weights), dtype {cell.dtype}, stack {cell.stack}"
            + ("" if cell.cast == "-" else f", layerwise casting to {cell.cast}")
            + ("" if cell.compile == "-" else f", {cell.compile} torch.compile"))
    expected = expect.get("kind", "works") + (f" /{expect['pattern']}/" if expect.get("pattern") else "")
    out = [
        f"# Standalone reproduction of the quantmatrix cell {cell.id}",
        _lines("as the harness ran it: " + what + ".", "# ", WIDTH),
        _lines(f"Recorded (run {record.get('run')}, {record.get('started')}, host {env.get('host')}):", "# "),
        _lines(record.get("verdict"), "#   verdict:   "),
        _lines(expected, "#   expected:  "),
    ]
    if expect.get("source"):
        out.append(_lines(expect["source"], "#     ", WIDTH))
    if err.get("type"):
        first, *rest = (err.get("message") or "").split("\n", 1)
        out += [_lines(f"{err.get('stage') or '?'} (of {', '.join(stages(cell))})", "#   stage:     "),
                _lines(f"{err['type']}: {first}", "#   error:     ")]
        if rest and rest[0].strip():
            out.append(_lines(rest[0], "#              "))
        out.append(_lines(err.get("layer") or "?", "#   raised in: "))
        out.append(_lines(f"innermost frames first: {err.get('where') or 'none recorded'}", "#              ",
                          WIDTH))
    elif record.get("note"):
        out.append(_lines(record["note"], "#   note:      ", WIDTH))
    ending = (f"It runs up to the {stop} step, where it should end with the error above."
              if err.get("type") else "It runs the cell's first steps and checks the output against the float "
                                      "model's.")
    out += [
        _lines(f"Versions: python {env.get('python')}, torch {env.get('torch')}, diffusers {env.get('diffusers')}, "
               f"accelerate {env.get('accelerate')}; os {env.get('os')}", "# "),
        _lines(f"engines: {_engine_versions(env)}; device {cell.device}: {env.get('device_name') or '?'}"
               + (f", driver {env['driver']}" if env.get("driver") else ""), "#   "),
        _lines(f"Run it alone: python this_file.py (needs {', '.join(needs)}; its files go to a temporary directory "
               f"it removes; no network). {ending} {settings_note}", "# ", WIDTH),
        "# Written by quantmatrix (`quantmatrix repro`, or its report); it imports nothing of quantmatrix.",
    ]
    return _comments(out)


def _imports(cell: Cell) -> str:
    lines = ["from __future__ import annotations", "", "import math", "import tempfile", "import types",
             "from pathlib import Path", "", "import torch", "from torch import nn", ""]
    lines += ["import accelerate  # noqa: F401 - the model's skeleton and the offload hooks", "import diffusers"]
    engine = cell.engine
    if engine == "bnb":
        lines.append("import bitsandbytes as bnb")
    elif engine == "quanto":
        lines.append("import optimum.quanto")
    elif engine == "gguf":
        lines += ["import gguf", "import numpy as np"]
    elif engine == "sdnq":
        lines.append("import sdnq  # noqa: F401 - registers SDNQ's quantizer with diffusers")
    elif engine == "torchao":
        lines.append("import torchao.quantization as tq")
    elif engine == "modelopt":
        lines += ["import copy", "", "import modelopt.torch.quantization as mtq"]
    elif engine == "nncf":
        lines += ["import os", "",
                  "# quantmatrix imports NNCF with its telemetry declined, as CI does (no network at run time)",
                  'os.environ.setdefault("NNCF_CI", "1")', '_ci = os.environ.get("CI")', 'os.environ["CI"] = "true"',
                  "import nncf  # noqa: E402", "", "if _ci is None:", '    del os.environ["CI"]', "else:",
                  '    os.environ["CI"] = _ci']
    return "\n".join(lines)


def _model_section(cell: Cell, inputs: bool) -> str:
    """The model's shape and the code of models/real.py that builds it; `inputs`: and makes a step's inputs and
    runs it (a script that stops before the first step, but for NNCF's trace, needs neither)."""
    spec = MODELS[cell.model]
    shape = {k: v for k, v in dataclasses.asdict(spec).items() if k != "source"}  # a built-in: no source
    fields = _call("types.SimpleNamespace", shape, len("MODELS = {") + len(repr(cell.model)) + 2)
    config = _call("dict", DIFFUSERS_CONFIGS[cell.model], len("DIFFUSERS_CONFIGS = {") + len(repr(cell.model)) + 2)
    return "\n".join([
        "# ---------------------------------------------------------------- the model (quantmatrix's)",
        "# Its shape (harness/models/specs.py MODELS) and diffusers constructor arguments (DIFFUSERS_CONFIGS).",
        f"REAL_CLASSES = {{{spec.kind!r}: {REAL_CLASSES[spec.kind]!r}}}",
        f"MODELS = {{{cell.model!r}: {fields}}}",
        f"DIFFUSERS_CONFIGS = {{{cell.model!r}: {config}}}",
        "",
        "# Copied from harness/models/real.py: the skeleton, the seeded weights (drawn parameter by parameter in name",
        "# order: bit-identical to the harness's for the seed)"
        + (" and one denoising step's inputs." if inputs else "."),
        "",
        copied_code("models/real.py", MODEL_CODE + (INPUT_CODE if inputs else ()), bare=True),
    ])


def _call(name: str, arguments: dict, column: int) -> str:
    """`name(k=v, ...)` with its arguments wrapped under the parenthesis (a literal of the harness's data)."""
    parts = [f"{k}={v!r}" for k, v in arguments.items()]
    lines, line = [], ""
    for part in parts:
        if line and column + len(name) + 1 + len(line) + len(part) + 2 > 116:
            lines.append(line + ",")
            line = ""
        line += (", " if line else "") + part
    lines.append(line)
    return f"{name}(" + ("\n" + " " * (column + len(name) + 1)).join(lines) + ")"


def _set_submodule() -> str:
    return dedent('''\
        def replace_linears(model: nn.Module, make) -> nn.Module:
            """Every plain nn.Linear of the model replaced by make(layer) (harness/engines/base.py replace_linears)."""
            for name, module in list(model.named_modules()):
                if type(module) is nn.Linear:
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent) if parent else model, child, make(module))
            return model
        ''')


def _quantize_code(cell: Cell) -> tuple[str, str]:
    """(helper definitions, the body of `quantize(model)`) for the engine's own API after load, as
    harness/engines/<engine>.py calls it."""
    engine, qtype = cell.engine, cell.qtype
    if engine == "none":
        return "", "return model  # the unquantized model (harness/engines/none.py)"
    if engine == "bnb":
        if qtype == "int8":
            make = dedent('''\
                q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias is not None,
                                        has_fp16_weights=False, device="meta")
                q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)''')
        else:
            quant_type, double = module_constant("engines/bnb.py", "FOUR_BIT")[qtype]
            make = dedent(f'''\
                q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias is not None, compute_dtype=DTYPE,
                                      quant_type={quant_type!r}, compress_statistics={double!r}, device="meta")
                q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type={quant_type!r},
                                             compress_statistics={double!r})''')
        helper = _set_submodule() + "\n\n" + dedent('''\
            def quantize_layer(layer: nn.Linear) -> nn.Module:
                """harness/engines/bnb.py quantize_layer: bitsandbytes quantizes when the layer moves to the device."""
                weight = layer.weight.data.to("cpu")
                bias = None if layer.bias is None else nn.Parameter(layer.bias.data.to("cpu"), requires_grad=False)
            ''') + indent(make, "    ") + "\n    q.bias = bias\n    return q.to(DEVICE)\n"
        return helper, "return replace_linears(model, quantize_layer)  # harness/engines/bnb.py quantize"
    if engine == "quanto":
        return "", dedent(f'''\
            optimum.quanto.quantize(model, weights=optimum.quanto.{qtype})  # harness/engines/quanto.py quantize
            optimum.quanto.freeze(model)
            return model''')
    if engine == "sdnq":
        options = ", ".join(f"{k}={v!r}" for k, v in module_constant("engines/sdnq.py", "OPTIONS")[qtype].items())
        return "", dedent(f'''\
            from sdnq import sdnq_post_load_quant  # harness/engines/sdnq.py quantize

            return sdnq_post_load_quant(model, torch_dtype=DTYPE, {options})''')
    if engine == "torchao":
        config = module_constant("engines/torchao_engine.py", "CONFIGS")[qtype]
        return "", f"tq.quantize_(model, tq.{config}())  # harness/engines/torchao_engine.py quantize\nreturn model"
    if engine == "nncf":
        mode, _, group = qtype.partition("-g")
        default = module_constant("engines/nncf_engine.py", "DEFAULT_GROUP_SIZE")
        options = "" if mode.startswith("int8") else f", group_size={int(group or default)}, ratio=1.0"
        return "", dedent(f'''\
            # harness/engines/nncf_engine.py quantize: traced with the model's example input (harness/models/build.py
            # example_inputs: make_inputs with seed 0 and batch 1, on the CPU)
            example = call_kwargs(make_inputs(MODEL, dtype=DTYPE, device="cpu"))
            return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.{mode.upper()},
                                         dataset=nncf.Dataset([example]){options})''')
    if engine == "modelopt":
        helper = copied_code("engines/modelopt_engine.py", ("SDNEXT", "WEIGHTS", "quant_config"))
        return helper, dedent('''\
            # harness/engines/modelopt_engine.py quantize: weight-only, max calibration, then real-quantized modules
            mtq.quantize(model, quant_config(QTYPE), forward_loop=None)
            mtq.compress(model)
            return model''')
    raise Unsupported(f"cell {cell.id}: engine {engine} after load is not written yet")


def _config_code(cell: Cell) -> str:
    """The expression of the engine's diffusers quantization config (harness/stacks/diffusers.py INTEGRATIONS)."""
    engine, qtype = cell.engine, cell.qtype
    if engine == "none":
        return "None"
    if engine == "bnb":
        if qtype == "int8":
            return "diffusers.BitsAndBytesConfig(load_in_8bit=True)"
        quant_type, double = module_constant("engines/bnb.py", "FOUR_BIT")[qtype]
        return (f"diffusers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type={quant_type!r}, "
                f"bnb_4bit_use_double_quant={double!r}, bnb_4bit_compute_dtype=DTYPE)")
    if engine == "quanto":
        weights = module_constant("engines/quanto.py", "DIFFUSERS_WEIGHTS")[qtype]
        return f"diffusers.QuantoConfig(weights_dtype={weights!r})"
    if engine == "sdnq":
        options = ", ".join(f"{k}={v!r}" for k, v in module_constant("engines/sdnq.py", "OPTIONS")[qtype].items())
        return f"sdnq.SDNQConfig({options})"
    if engine == "torchao":
        config = module_constant("engines/torchao_engine.py", "CONFIGS")[qtype]
        return f"diffusers.TorchAoConfig(tq.{config}())"
    if engine == "gguf":
        return "diffusers.GGUFQuantizationConfig(compute_dtype=DTYPE)"
    if engine == "modelopt":  # SD.Next's config for the type (modules/model_quant.py:55-67)
        options = ", ".join(f"{k}={v!r}"
                            for k, v in module_constant("engines/modelopt_engine.py", "SDNEXT")[qtype].items())
        return f'diffusers.NVIDIAModelOptConfig(quant_method="modelopt", {options})'
    raise Unsupported(f"cell {cell.id}: engine {engine} has no diffusers config here")


GGUF_WRITER = '''\
def write_gguf(model: nn.Module, path: Path) -> Path:
    """The model as the harness's GGUF engine writes it (harness/engines/gguf_engine.py quantize, then save): every
    plain Linear's weight packed into GGML blocks by `gguf`, every other tensor in float32, under diffusers' names,
    in the order of the quantized model's state dict (a quantized Linear holds its bias before its packed weight)."""
    kind = gguf.GGMLQuantizationType[QTYPE]
    state = model.state_dict()
    linears = {name for name, module in model.named_modules() if type(module) is nn.Linear}
    order = []
    for name in state:
        owner, _, leaf = name.rpartition(".")
        if owner in linears and leaf == "weight" and f"{owner}.bias" in state:
            continue  # after its bias
        order.append(name)
        if owner in linears and leaf == "bias":
            order.append(f"{owner}.weight")
    writer = gguf.GGUFWriter(str(path), "quantmatrix")
    for name in order:
        owner, _, leaf = name.rpartition(".")
        tensor = state[name].detach().float().cpu().numpy()
        if owner in linears and leaf == "weight":
            writer.add_tensor(name, np.ascontiguousarray(gguf.quants.quantize(tensor, kind)), raw_dtype=kind)
        else:
            writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
'''

COMPONENT_PIPELINE = '''\
class ComponentPipeline(diffusers.DiffusionPipeline):
    """The smallest pipeline: the model as its one component, so that diffusers' own offload methods run on it
    (harness/offload.py component_pipeline: what the diffusers stack offloads a model alone with)."""

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.register_modules(transformer=transformer)
'''


def _prepare_and_load(cell: Cell) -> tuple[str, str, str]:
    """(helpers, the body of `prepare(tmp)` returning the source path, the body of `load(source, tmp)`)."""
    cls = "model_class(MODEL)"
    float_dir = dedent('''\
        float_dir = tmp / "float"  # harness/stacks/loading.py make_float_dir: the float32 model, save_pretrained
        build_model(MODEL, SEED, torch.float32).save_pretrained(str(float_dir))''')
    if cell.stack == "direct" and cell.engine == "none":
        load = ("# harness/stacks/loading.py load_post: the float model drawn from its seed (unquantized)\n"
                "return build_model(MODEL, SEED, DTYPE)")
        return "", "return None  # drawn in memory: no file", load
    if cell.stack == "direct":  # post-load only (unsupported says so)
        helper, body = _quantize_code(cell)
        load = ("# harness/stacks/loading.py load_post: the float model drawn from its seed, then the engine's API\n"
                "return quantize(build_model(MODEL, SEED, DTYPE))")
        return _def_quantize(helper, body), "return None  # drawn in memory: no file", load
    if cell.load == "post-load" and cell.engine == "none":
        load = ("# harness/stacks/diffusers.py load_post: from_pretrained of the float directory (the unquantized "
                f"model:\n# no quantization after it)\nreturn {cls}.from_pretrained(str(source), torch_dtype=DTYPE)")
        return "", float_dir + "\nreturn float_dir", load
    if cell.load == "post-load":
        helper, body = _quantize_code(cell)
        load = ("# harness/stacks/diffusers.py load_post: from_pretrained of the float directory, then the engine's "
                f"API\nloaded = {cls}.from_pretrained(str(source), torch_dtype=DTYPE)\nreturn quantize(loaded)")
        return _def_quantize(helper, body), float_dir + "\nreturn float_dir", load
    config = _config_code(cell)
    if cell.load == "on-the-fly":
        load = ("# harness/stacks/diffusers.py load_on_the_fly: diffusers quantizes while loading\n"
                f"return {cls}.from_pretrained(str(source), torch_dtype=DTYPE, quantization_config={config})")
        return "", float_dir + "\nreturn float_dir", load
    if cell.engine == "gguf":
        prepare = float_dir + dedent('''
            # harness/stacks/diffusers.py make_prequantized: the GGUF engine's file of the float model in DTYPE
            return write_gguf(build_model(MODEL, SEED, DTYPE), tmp / "model.gguf")''')
        load = ("# harness/stacks/diffusers.py load_prequantized: the .gguf file through from_single_file, with the "
                "float\n# directory's config\n"
                f"return {cls}.from_single_file(str(source), config=str(tmp / 'float'), torch_dtype=DTYPE,\n"
                f"                                           quantization_config={config})")
        return GGUF_WRITER, prepare, load
    prepare = float_dir + dedent(f'''
        # harness/stacks/diffusers.py make_prequantized: what save_pretrained writes for the model diffusers
        # quantized while loading
        saved = tmp / "prequantized"
        {cls}.from_pretrained(str(float_dir), torch_dtype=DTYPE,
                                   quantization_config={config}).save_pretrained(str(saved))
        return saved''')
    load = ("# harness/stacks/diffusers.py load_prequantized: the saved directory loaded back (its config names the "
            f"engine)\nreturn {cls}.from_pretrained(str(source), torch_dtype=DTYPE)")
    return "", prepare, load


def _def_quantize(helper: str, body: str) -> str:
    out = helper + ("\n\n" if helper else "")
    return out + 'def quantize(model: nn.Module) -> nn.Module:\n    """The engine\'s own API after load."""\n' + \
        indent(body, "    ") + "\n"


def _group_options(cell: Cell, settings: Settings) -> str:
    """harness/offload.py group_options, with the run's [offload.group]."""
    s = settings
    options = (f"onload_device=DEVICE, offload_device=torch.device('cpu'), offload_type={s.group_type!r}, "
               f"num_blocks_per_group={s.group_blocks!r}, non_blocking=False, "
               f"use_stream={bool(s.group_stream and _device(cell.device) != 'cpu')!r}, record_stream=False, "
               f"low_cpu_mem_usage={s.group_low_cpu_mem!r}")
    if cell.stack == "diffusers" and s.group_type == "block_level":
        options += ", exclude_modules=['vae']"
    return options


def _offload_code(cell: Cell, settings: Settings | None) -> tuple[str, str]:
    """(helpers, the body of `offload(model)`, which returns what to call after each step)."""
    mode = cell.offload
    if cell.stack == "direct":
        note = "# harness/offload.py offload_module: accelerate's functions on the module itself\n"
        if mode == "none":
            return "", note + "model.to(DEVICE)\nreturn lambda: None"
        if mode == "model":
            return "", note + ('model.to("cpu")\n_, hook = accelerate.cpu_offload_with_hook(model, DEVICE)\n'
                               "return hook.offload")
        if mode == "sequential":
            return "", note + ('model.to("cpu")\naccelerate.cpu_offload(model, execution_device=DEVICE, '
                               "offload_buffers=len(model._parameters) > 0)\nreturn lambda: None")
        return "", note + ("from diffusers.hooks import apply_group_offloading\n\n"
                           f"apply_group_offloading(model, {_group_options(cell, settings)})\nreturn lambda: None")
    note = ("# harness/offload.py offload_pipeline: the pipeline's own method, the model being its one component\n"
            "pipe = ComponentPipeline(model)\n")
    if mode == "none":
        return COMPONENT_PIPELINE, note + "pipe.to(DEVICE)\nreturn lambda: None"
    if mode == "model":
        return COMPONENT_PIPELINE, note + ("pipe.enable_model_cpu_offload(device=DEVICE)\n"
                                           "return pipe.maybe_free_model_hooks")
    if mode == "sequential":
        return COMPONENT_PIPELINE, note + "pipe.enable_sequential_cpu_offload(device=DEVICE)\nreturn lambda: None"
    return COMPONENT_PIPELINE, note + f"pipe.enable_group_offload({_group_options(cell, settings)})\n" \
                                      "return lambda: None"


CHECK_OUTPUT = '''\
def check_output(output: torch.Tensor, reference: torch.Tensor) -> None:
    """The output against the float model's, as the harness judges it (harness/run/measure.py output_error; the
    type's SQNR floor from harness/engines/catalog.py): not finite, or below the floor, is the finding."""
    if not bool(torch.isfinite(output).all()):
        raise AssertionError("output not finite: NaN or infinity in the output")
    out, ref = output.detach().double().cpu().flatten(), reference.detach().double().cpu().flatten()
    noise, signal = (out - ref).pow(2).sum().item(), ref.pow(2).sum().item()
    sqnr = None if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else float("-inf"))
    print(f"SQNR against the float model: {'exact' if sqnr is None else f'{sqnr:.1f} dB'} (floor: {FLOOR_DB} dB)")
    if sqnr is not None and FLOOR_DB is not None and sqnr < FLOOR_DB:
        raise AssertionError(f"output below its type's floor: SQNR {sqnr:.1f} dB < {FLOOR_DB} dB (the model's output "
                             "is not what it computes)")
'''


def stages(cell: Cell) -> tuple[str, ...]:
    """The steps a cell runs: compile only where it is compiled, lora only with a LoRA."""
    return tuple(s for s in STAGES if (s != "compile" or cell.compile != "-") and (s != "lora" or cell.lora != "-"))


def _stop_stage(record: dict) -> str:
    stage = (record.get("error") or {}).get("stage")
    return stage if stage in STAGES else "forward"


GUARD = "torch._dynamo.config.patch(error_on_recompile=ERROR_ON_RECOMPILE)"


def _compile_code(cell: Cell) -> str:
    """The compile step as harness/treatments/compiling.py applies it: in place, after offload, with the options
    diffusers' quantization tests use in the offload mode (compiling.options, restated here: the script imports
    no harness)."""
    fullgraph = cell.offload != "group"
    call = ("model.compile_repeated_blocks(fullgraph=FULLGRAPH)  # diffusers: each class in _repeated_blocks"
            if cell.compile == "regional" else "model.compile(fullgraph=FULLGRAPH)  # the whole module, in place")
    return (f"FULLGRAPH = {fullgraph!r}  # harness's compile options: fullgraph except with group offload\n"
            f"ERROR_ON_RECOMPILE = {cell.offload == 'none'!r}  # and a recompile an error without offload\n\n\n"
            "def compile_model(model: nn.Module) -> None:\n"
            '    """torch.compile, applied last (stage: compile; the first call below compiles)."""\n'
            f"    {call}\n")


def _main_lines(cast: str, compiled: bool, check: bool, reaches) -> list[str]:
    """The script's main(): inputs, the float model's output where the output is judged, then each stage the cell
    reached, as the harness runs them (harness/run/execute.py)."""
    main = ["def main() -> None:",
            "    torch.manual_seed(SEED)  # harness/run/execute.py prepare_cell"]
    if check or reaches("forward"):
        main.append("    inputs = make_inputs(MODEL, SEED, BATCH, DTYPE, DEVICE)")
    if check:
        main += ["    with torch.no_grad():  # the float model's output (harness/run/execute.py _reference_file)",
                 "        reference = run(build_model(MODEL, SEED, DTYPE).to(DEVICE), inputs)"]
    main += ['    with tempfile.TemporaryDirectory(prefix="quantmatrix-repro-") as name:', "        tmp = Path(name)",
             '        print("prepare", flush=True)', "        source = prepare(tmp)"]
    if reaches("load"):
        main += ['        print("load", flush=True)', "        model = load(source, tmp).eval()" + indent(cast, "    ")]
    if reaches("offload"):
        main += ['        print("offload", flush=True)', "        after_step = offload(model)"]
    if compiled and reaches("compile"):
        main += ['        print("compile", flush=True)', "        compile_model(model)",
                 f"        with {GUARD}, torch.no_grad():  # the first call compiles",
                 "            output = run(model, inputs)", "            after_step()"]
    if reaches("forward"):
        first = [] if compiled else ["            output = run(model, inputs)", "            after_step()"]
        main += ['        print("forward", flush=True)',
                 "        with " + (f"{GUARD}, " if compiled else "") + "torch.no_grad():  # the first step, then the "
                 "warm-up steps (harness/run/execute.py)", *first,
                 "            for _ in range(WARMUP):", "                run(model, inputs)",
                 "                after_step()"]
        if check:
            main.append("        check_output(output, reference)")
    return main


def _constants(cell: Cell, s: Settings, check: bool) -> str:
    floor = output_floor(cell.engine, cell.qtype, cell.cast)
    return "\n".join([
        f"CELL = {cell.id!r}", f"MODEL = {cell.model!r}", f"QTYPE = {cell.qtype!r}", f"SEED = {s.seed!r}",
        f"BATCH = {s.batch!r}", f"WARMUP = {s.warmup!r}  # steps the harness runs after the first, before timing",
        f"DTYPE = {_torch_dtype(cell.dtype)}", f"DEVICE = torch.device({_device(cell.device)!r})",
        *([f"FLOOR_DB = {floor.sqnr_db if floor else None!r}  # the type's SQNR floor"] if check else []),
    ])


def script(record: dict, settings: Settings | None = None, *, settings_from: str = "") -> str:
    """The standalone script of a record's cell (raises Unsupported, naming the cell and what is missing). A record
    is untrusted: one that does not validate gets no script; of one that does, every value becomes a Python
    literal (`repr`) or a known axis value, and every text a comment line."""
    problems = validate_record(record)
    if problems:
        raise Unsupported(f"cell {printable(repr(record.get('id')))}: no standalone script: its record does not "
                          f"validate ({printable('; '.join(problems))})")
    cell = record_cell(record)
    reason = unsupported(cell, settings)
    if (record.get("error") or {}).get("type") == "NotQuantized":  # the harness's own check, after the load
        reason = "its failure is the harness's check of the stored bits (NotQuantized), not written into scripts yet"
    if reason is not None:
        raise Unsupported(f"cell {cell.id}: no standalone script: {reason}")
    s = settings or Settings()
    stop = _stop_stage(record)
    upto = STAGES.index(stop)
    compiled = cell.compile != "-"

    def reaches(stage: str) -> bool:
        return upto >= STAGES.index(stage)
    check = record.get("verdict") in CHECKED or (record.get("error") or {}).get("type") == "NonFiniteOutput"
    settings_note = (f"Seed {s.seed} and batch {s.batch}: " + (f"the settings of {settings_from}." if settings_from
                     else "the harness's default settings (every shipped matrix runs with them; records do not "
                          "carry them)."))
    q_helpers, prepare_body, load_body = _prepare_and_load(cell)
    o_helpers, offload_body = _offload_code(cell, settings)
    cast = "" if cell.cast == "-" else (
        "\n    # as SD.Next applies it, and the harness (harness/run/execute.py): on the loaded model\n"
        f"    model.enable_layerwise_casting(storage_dtype={_torch_dtype(cell.cast)}, compute_dtype=DTYPE)")
    constants = _constants(cell, s, check)
    steps = [
        "def prepare(tmp: Path) -> Path | None:",
        '    """The files the load reads, made as the harness makes them once per run (stage: prepare)."""',
        indent(prepare_body, "    "), "", "",
    ]
    if reaches("load"):
        steps += ["def load(source: Path | None, tmp: Path) -> nn.Module:",
                  '    """Load (and quantize) the model (stage: load)."""', indent(load_body, "    "), "", ""]
    if reaches("offload"):
        steps += ["def offload(model: nn.Module):",
                  '    """Install the offload mode; returns what to call after each step (stage: offload)."""',
                  indent(offload_body, "    "), "", ""]
    main = _main_lines(cast, compiled, check, reaches)
    main.append(f'    print("ran to the end of the {stop} step without an error")')
    helpers = "\n\n\n".join(h.rstrip("\n") for h in (q_helpers, o_helpers if reaches("offload") else "",
                                                    _compile_code(cell) if compiled and reaches("compile") else "",
                                                    CHECK_OUTPUT if check and reaches("forward") else "") if h)
    inputs = reaches("forward") or check or cell.engine == "nncf"  # NNCF traces the model with a step's inputs
    parts = [header(record, cell, stop, settings_note), _imports(cell), constants, _model_section(cell, inputs)]
    parts.append("# ---------------------------------------------------------------- the cell's steps\n" +
                 (helpers + "\n\n\n" if helpers else "") + "\n".join(steps).rstrip("\n"))
    parts += ["\n".join(main), 'if __name__ == "__main__":\n    main()']
    return "\n\n\n".join(p.rstrip("\n") for p in parts) + "\n"


def settings_of(matrix: Path | str | None) -> Settings | None:
    """A matrix file's settings (its seed, batch, [offload.group]); None without one."""
    if matrix is None:
        return None
    from harness.matrix import load_matrix

    return load_matrix(matrix).settings
