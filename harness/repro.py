"""Standalone reproduction scripts: `quantmatrix repro CELL_ID --results FILE [-o OUT.py]`.

A cell's record becomes one short Python file that imports only torch, diffusers, accelerate and the cell's engine
package (never quantmatrix), builds the same model from the same config and seed, takes the load, quantize and
offload path the harness took for the cell, and runs up to the step that failed (the record's `error.stage`), so
that it ends with the same error: something to attach to an upstream report.

This module is the skeleton only (the header, the model, the stages in order, main). What each part of the harness
does in a script is a fragment beside its code, a literal `REPRO` table of the module it mirrors: each engine's
imports and its statements after load (harness/engines/<engine>.py), each stack's files, load and offload
statements (harness/stacks/<stack>.py; the diffusers stack's holds each engine's quantization config), each
treatment's statements (harness/treatments/<treatment>.py). They are read as text (`ast.literal_eval`), with the
engines' tables they name and the functions copied from models/real.py, so a script is made without importing
torch (the report writes one per failing cell and imports no torch), and the weights and inputs are the harness's,
bit for bit, for the seed. A cell whose parts have no fragment gets none: `unsupported` says which part, before
anything is written. A script holds only what its cell uses: the model kind's input function, the branch of its
engine's type, the stages it reaches.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path

from harness.cell import AXES, Cell
from harness.engines.catalog import CATALOG, output_floor
from harness.errors import QuantMatrixError, printable
from harness.models.specs import DIFFUSERS_CONFIGS, MODELS, REAL_CLASSES
from harness.results import file_lines, parse_record, validate_record
from harness.settings import Settings
from harness.stacks.catalog import STACK_CATALOG
from harness.stacks.catalog import not_offered as stack_not_offered
from harness.verdict import Stage

HARNESS = Path(__file__).resolve().parent
STAGES = tuple(s.value for s in Stage if s is not Stage.PROCESS)  # a cell's steps, in order
WIDTH = 116  # of the header's prose lines
# What a record whose cell ran, or whose output was not finite, is checked for at the end (against the float model)
CHECKED = ("ok", "drift-works", "drift-claim", "wrong-output")
REAL = "harness.models.real"


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
            record, problems = parse_record(line)
        except json.JSONDecodeError as exc:
            refused.append(f"{path}:{number}: not a JSON record ({exc.msg})")
            continue
        if problems:
            refused.append(f"{path}:{number}: {'; '.join(problems)}")
        else:
            out.append(record)
    return out, refused


def record_cell(record: dict) -> Cell:
    return Cell(**record["cell"])


# ------------------------------------------------------------------------------------------------ source copies

@functools.cache
def _module_source(module: str) -> tuple[str, ast.Module]:
    """The text of a module (dotted name) and its parse, found on sys.path without importing it or its package
    (the treatments' package imports torch; the report imports none)."""
    relative = Path(*module.split(".")).with_suffix(".py")
    bases = [HARNESS.parent, *(Path(base or ".") for base in sys.path)]  # the harness's own, wherever it runs from
    path = next((base / relative for base in bases if (base / relative).is_file()), None)
    if path is None:
        raise Unsupported(f"module {module} is not found: no fragment to read")
    text = path.read_text(encoding="utf-8")
    return text, ast.parse(text)


def copied_code(module: str, names: tuple[str, ...], bare: bool = True) -> str:
    """The source text of the top-level functions and assignments `names` of a module, in its order; `bare`:
    without the functions' docstrings (the script's comments say where each comes from)."""
    text, tree = _module_source(module)
    wanted, out = set(names), []
    for node in tree.body:
        name = node.name if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            node.targets[0].id if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) else None
        if name in wanted:
            out.append(_without_docstring(ast.get_source_segment(text, node), node) if bare else
                       ast.get_source_segment(text, node))
            wanted.discard(name)
    for node in ast.walk(tree):  # a class or function defined inside a function (made on first use there)
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in wanted and node not in tree.body:
            source = textwrap.dedent(ast.get_source_segment(text, node, padded=True))
            out.append(_without_docstring(source, node) if bare else source)
            wanted.discard(node.name)
    if wanted:
        raise RuntimeError(f"{module} has no {sorted(wanted)}: the repro generator copies them")
    return "\n\n\n".join(out)


def _without_docstring(source: str, node: ast.AST) -> str:
    body = getattr(node, "body", None)
    if not body or len(body) < 2 or not isinstance(body[0], ast.Expr) or not isinstance(body[0].value, ast.Constant) \
            or not isinstance(body[0].value.value, str):
        return source
    lines = source.splitlines()
    first, last = body[0].lineno - node.lineno, body[0].end_lineno - node.lineno
    if last + 1 < len(lines) and not lines[last + 1].strip():  # and the blank line after it
        last += 1
    return "\n".join(lines[:first] + lines[last + 1:])


_MISSING = object()


def module_constant(module: str, name: str, default=_MISSING):
    """A literal table of a module (e.g. harness.engines.bnb FOUR_BIT, or its REPRO fragment), read without
    importing it (torch): its value where it is a literal, or a name bound to one earlier in the module."""
    _, tree = _module_source(module)
    literals: dict[str, ast.AST] = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else node.target if isinstance(
            node, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and node.value is not None:
            literals[target.id] = node.value
    if name not in literals:
        if default is _MISSING:
            raise RuntimeError(f"{module} has no constant {name}: the repro generator reads it")
        return default
    return _literal(literals[name], literals)


def _literal(node: ast.AST, names: dict[str, ast.AST]):
    """ast.literal_eval, where a name bound to a literal earlier in the module and `+` of strings count too."""
    if isinstance(node, ast.Name) and node.id in names:
        return _literal(names[node.id], names)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _literal(node.left, names) + _literal(node.right, names)
    if isinstance(node, ast.Dict):
        return {_literal(k, names): _literal(v, names) for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_literal(e, names) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    return ast.literal_eval(node)


# ------------------------------------------------------------------------------------------------ fragments

class _Value:
    """A table's value in a fragment's `{NAME}`: `{NAME[0]!r}` indexes it, `{NAME:kw}` writes a mapping as keyword
    arguments, `{NAME:,kw}` each preceded by a comma."""

    def __init__(self, value):
        self.value = value

    def __getitem__(self, key):
        return _Value(self.value[key])

    def __repr__(self) -> str:
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        if spec in ("kw", ",kw"):
            parts = [f"{k}={v!r}" for k, v in self.value.items()]
            return "".join(", " + p for p in parts) if spec == ",kw" else ", ".join(parts)
        return format(self.value, spec)


def _pick(fragment, key: str):
    """A fragment's entry for `key` (a type, a load or offload mode), its "*" entry, or None; a plain value is
    everyone's."""
    if isinstance(fragment, dict):
        return fragment.get(key, fragment.get("*"))
    return fragment


def _fill(template: str | None, names: dict, what: str) -> str:
    if template is None:
        raise Unsupported(f"no fragment for {what}")
    try:
        return template.format_map(names)
    except KeyError as exc:
        raise Unsupported(f"{what} needs {exc.args[0]!r}, which no fragment gives") from None


def _module_of(implementation: str) -> str:
    return implementation.partition(":")[0]


@functools.cache
def _treatments() -> dict[str, dict]:
    """Each treatment module's fragment by its axis (harness/treatments/*.py, read as text)."""
    out = {}
    for path in sorted((HARNESS / "treatments").glob("*.py")):
        if path.stem not in ("__init__", "base"):
            fragment = module_constant(f"harness.treatments.{path.stem}", "REPRO", None)
            if fragment is not None:
                out[fragment["axis"]] = fragment
    return out


def _model_reason(cell: Cell) -> str | None:
    spec = MODELS.get(cell.model)
    if spec is None:
        return (f"model {cell.model!r} is unknown here (a model of a matrix's [models] table: pass that matrix with "
                "--matrix)")
    if spec.pipeline:
        return "whole pipelines (text encoders, tokenizers, VAE) are not written yet; only a model class"
    if not spec.real:
        return f"{cell.model} is one of the harness's own imitation models, not a diffusers class"
    if spec.shared_weights:
        return (f"{cell.model} is built once per run into a shared directory (a released shape, or a [models] "
                "class); only the built-in tiny classes are written")
    if cell.engine not in CATALOG or cell.stack not in STACK_CATALOG:
        return f"engine {cell.engine!r} or stack {cell.stack!r} is unknown here"
    reason = stack_not_offered(cell) or (None if STACK_CATALOG[cell.stack].accepts(cell.model, cell.cast) else
                                         f"the {cell.stack} stack does not offer the cell's model or casting")
    return f"the cell is not offered: {reason}" if reason else None


def _fragments(cell: Cell, settings: Settings | None) -> tuple[dict, dict, str, tuple[str, str]]:
    """The cell's engine fragment, stack fragment, the stack's load key and offload pair (raises Unsupported)."""
    reason = _model_reason(cell)
    if reason:
        raise Unsupported(reason)
    for axis in AXES:
        value = getattr(cell, axis.name)
        if axis.treatment and value != axis.default:
            why = (_treatments().get(axis.name) or {"why_not": f"{axis.name} {value} has no fragment"}).get("why_not")
            if why:
                raise Unsupported(why)
    where = _module_of(CATALOG[cell.engine].implementation)
    engine = module_constant(where, "REPRO", None)
    if engine is None:
        raise Unsupported(f"engine {cell.engine} has no fragment (REPRO in {where})")
    why = _pick(engine.get("why_not"), cell.load)
    if why:
        raise Unsupported(why)
    stack = module_constant(_module_of(STACK_CATALOG[cell.stack].implementation), "REPRO")
    load = f"{cell.load}+file" if "write_file" in engine and f"{cell.load}+file" in stack["load"] else cell.load
    if load not in stack["load"]:
        raise Unsupported(stack.get("why_not") or f"the {cell.stack} stack's {cell.load} load has no fragment")
    offload = stack["offload"].get(cell.offload)
    if offload is None:
        raise Unsupported(stack.get("why_not_offload") or f"offload {cell.offload} has no fragment")
    if "{group" in offload[0] and settings is None:
        raise Unsupported("group offload's options are the run's matrix settings ([offload.group]), which a record "
                          "does not carry: pass the matrix with --matrix")
    return engine, stack, load, offload


def _names(cell: Cell, settings: Settings | None, engine: dict, stack: dict) -> dict:
    """What a fragment's `{name}` is filled with for the cell."""
    module = _module_of(CATALOG[cell.engine].implementation)
    tables = {n: _Value(module_constant(module, n).get(cell.qtype)) for n in engine.get("tables", ())}
    example = "make_inputs(0, 1, 'cpu')"  # harness/models/build.py example_inputs: seed 0, batch 1, the CPU
    names = {"qtype": cell.qtype, "cast": cell.cast, "offload": cell.offload, "example": _kwargs(cell, example),
             "cls": f"diffusers.{REAL_CLASSES[MODELS[cell.model].kind]}", **tables, **_group_names(cell, settings)}
    names |= {name: _pick(by_mode, cell.offload) for name, by_mode in engine.get("by_offload", {}).items()}
    config = _pick(stack.get("configs", {}).get(cell.engine), cell.qtype)
    if config is not None:
        names["config"] = _fill(config, names, f"engine {cell.engine}'s config on the {cell.stack} stack")
    names["quantize"] = _fill(_pick(engine.get("quantize"), cell.qtype), names, f"engine {cell.engine} after load") \
        if cell.load == "post-load" else ""
    if "write_file" in engine:
        names["write_file"] = _fill(engine["write_file"], names, "its file")
    return names


@functools.cache
def _parts(cell: Cell, settings: Settings | None) -> dict:
    """The fragments of the cell's engine, stack and treatments, filled for the cell (raises Unsupported)."""
    engine, stack, load, offload = _fragments(cell, settings)
    names, where = _names(cell, settings, engine, stack), f"the {cell.stack} stack's {cell.load} load"
    info, treatments = CATALOG[cell.engine], _treatments()
    return {
        "module": _module_of(STACK_CATALOG[cell.stack].implementation), "imports": engine.get("imports", ""),
        "needs": (*STACK_CATALOG[cell.stack].packages, *stack.get("needs", ()),
                  *((info.package,) if info.package else ()), *engine.get("needs", ())),
        "helpers": _fill(_pick(engine["helpers"], cell.qtype), names, "its helpers") if "helpers" in engine else "",
        "values": _values(_module_of(info.implementation), engine.get("values", {}), cell.qtype),
        "copies": copied_code(_module_of(info.implementation), tuple(engine["copy"])) if "copy" in engine else "",
        "prepare": _fill(_pick(stack.get("prepare"), load), names, where),
        "load": _fill(stack["load"][load], names, where),
        "treat_load": [_fill(t["load"], names, axis) for axis, t in treatments.items()
                       if "load" in t and getattr(cell, axis) != AXES[axis].default],
        "offload": tuple(_fill(o, names, f"offload {cell.offload}") for o in offload),
        "offload_helpers": copied_code(_module_of(STACK_CATALOG[cell.stack].implementation),
                                       tuple(stack["offload_copy"])) if "offload_copy" in stack else "",
        "compile": treatments.get("compile") if cell.compile != AXES["compile"].default else None,
    }


def _values(module: str, values: dict, qtype: str) -> str:
    """`NAME = value` for each of the fragment's `values`: what a function of the engine's module returns for the
    type (its own code, copied and run here: pure Python over the module's tables, never a record's text)."""
    out = []
    for name, (function, needs) in values.items():
        namespace: dict = {}
        exec(compile("import copy\n" + copied_code(module, tuple(needs)), module, "exec"), namespace)  # noqa: S102
        out.append(f"{name} = {namespace[function](qtype)!r}  # {module.replace('.', '/')}.py {function}({qtype!r})")
    return "\n".join(out)


def _group_names(cell: Cell, settings: Settings | None) -> dict:
    """harness/offload.py group_options with the run's [offload.group]: for a module, and for a pipeline (SD.Next
    leaves its VAE out of block-level groups)."""
    if settings is None:
        return {}
    s = settings
    options = (f"onload_device=DEVICE, offload_device=torch.device('cpu'), offload_type={s.group_type!r}, "
               f"num_blocks_per_group={s.group_blocks!r}, non_blocking=False, "
               f"use_stream={bool(s.group_stream and _device(cell.device) != 'cpu')!r}, record_stream=False, "
               f"low_cpu_mem_usage={s.group_low_cpu_mem!r}")
    return {"group": options, "group_pipeline": options + (", exclude_modules=['vae']"
                                                           if s.group_type == "block_level" else "")}


def unsupported(cell: Cell, settings: Settings | None = None) -> str | None:
    """Why no script can be written for the cell, or None. Decided from the cell and the fragments alone (cheap:
    the report asks it of every failing cell)."""
    try:
        _parts(cell, settings)
    except Unsupported as exc:
        return str(exc)
    return None


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


def header(record: dict, cell: Cell, stop: str, settings_note: str, needs: tuple[str, ...], seeded: bool) -> str:
    env, err, expect = record.get("env") or {}, record.get("error") or {}, record.get("expect") or {}
    expected = expect.get("kind", "works") + (f" /{expect['pattern']}/" if expect.get("pattern") else "")
    weights = "the harness's seeded random weights" if seeded else "its own initial weights"
    out = [_lines(f"Reproduces the quantmatrix cell {cell.id} (diffusers' {REAL_CLASSES[MODELS[cell.model].kind]}, "
                  f"{weights}), recorded in run {record.get('run')} ({record.get('started')}, host "
                  f"{env.get('host')}):", "# ", WIDTH),
           _lines(f"{record.get('verdict')} (expected: {expected})", "#   verdict:   ")]
    if err.get("type"):
        first, *rest = (err.get("message") or "").split("\n", 1)  # its first line: the record holds the rest
        out += [_lines(f"{err.get('stage') or '?'} (of {', '.join(stages(cell))})", "#   stage:     "),
                _lines(f"{err['type']}: {first}" + (" ..." if rest and rest[0].strip() else ""), "#   error:     "),
                _lines(err.get("layer") or "?", "#   raised in: ")]
    elif record.get("note"):  # its first two lines: the report holds the rest
        note = _lines(record["note"], "#   note:      ", WIDTH).split("\n")
        out.append("\n".join(note[:2]) + (" ..." if len(note) > 2 else ""))
    package = CATALOG[cell.engine].package
    engine = f", {package} {(env.get('engines') or {}).get(cell.engine)}" if package else ""
    ending = (f"It should end with the error above, in its {stop} step." if err.get("type") else
              "It runs the first steps and checks the output against the float model's.")
    out += [
        _lines(f"Versions: python {env.get('python')}, torch {env.get('torch')}, diffusers {env.get('diffusers')}, "
               f"accelerate {env.get('accelerate')}{engine}; {cell.device}: {env.get('device_name') or '?'}"
               + (f", driver {env['driver']}" if env.get("driver") else ""), "# ", WIDTH),
        _lines(f"Run: python this_file.py (needs {', '.join(dict.fromkeys(needs))}; no network; temporary files). "
               f"{ending} {settings_note}", "# ", WIDTH),
    ]
    return _comments(out)


def stages(cell: Cell) -> tuple[str, ...]:
    """The steps a cell runs: compile only where it is compiled, lora only with a LoRA."""
    return tuple(s for s in STAGES if (s != "compile" or cell.compile != "-") and (s != "lora" or cell.lora != "-"))


def _stop_stage(record: dict) -> str:
    stage = (record.get("error") or {}).get("stage")
    return stage if stage in STAGES else "forward"


def _model_code(cell: Cell, inputs: bool, seeded: bool) -> str:
    """The model: its constructor arguments and the code of models/real.py that draws its weights (and makes a
    step's inputs, with the model kind's function only) for the seed, copied so both are the harness's to the bit.
    Not `seeded` (a script that ends in an error and judges no output): the class's own initialization under the
    seed, as a minimal report has it; the slow tests run each such script to its recorded error."""
    spec = MODELS[cell.model]
    config = ", ".join(f"{k}={v!r}" for k, v in DIFFUSERS_CONFIGS[cell.model].items())
    code = [f"# diffusers' constructor arguments (harness/models/specs.py DIFFUSERS_CONFIGS[{cell.model!r}])",
            "\n".join(textwrap.wrap(f"CONFIG = dict({config})", WIDTH, subsequent_indent=" " * 14,
                                    break_long_words=False, break_on_hyphens=False))]
    function = copied_code(REAL, (f"{spec.kind}_inputs",)) if inputs else ""
    if inputs:
        used = sorted(set(re.findall(r"\bspec\.(\w+)", function)))
        code.append("SHAPE = types.SimpleNamespace(" + ", ".join(f"{k}={getattr(spec, k)!r}" for k in used) + ")")
    cast = cell.dtype != "float32"
    copied = (("seed_weights",) if seeded else ()) + (("to_dtype", "_constructed_dtypes") if cast else ())
    if copied:
        code += ["", "", "# harness/models/real.py, copied: " + " and ".join(
            (["the weights drawn in name order from the seed"] if seeded else [])
            + (["the dtype as from_pretrained leaves it"] if cast else [])), copied_code(REAL, copied)]
    cls = f"diffusers.{REAL_CLASSES[spec.kind]}(**CONFIG)"
    made = "seed_weights(model, SEED)" if seeded else cls
    made = f"to_dtype({made}, dtype)" if cast else made if seeded else f"{cls}.to(dtype)"
    code += ["", "", "def build_model(dtype: torch.dtype = DTYPE) -> nn.Module:  # real.build_model"
             + ("" if seeded else "; the class's own weights"),
             *(["    with accelerate.init_empty_weights():", f"        model = {cls}"] if seeded else []),
             f"    return {made}.eval()"]
    if not inputs:
        return "\n".join(code)
    code += ["", "", "# harness/models/real.py, copied: a step's inputs", function, "", "",
             "def make_inputs(seed: int, batch: int, device) -> dict:  # real.make_inputs",
             f"    inputs = {spec.kind}_inputs(SHAPE, batch, torch.Generator().manual_seed(seed + 1), CONFIG)",
             '    return {k: (v if k == "timestep" else v.to(DTYPE)).to(device) for k, v in inputs.items()}', "", ""]
    if _nested(cell):
        code += [copied_code(REAL, ("ADDED_CONDITIONS", "call_kwargs"))]
    return "\n".join(code).rstrip("\n")


def _nested(cell: Cell) -> bool:
    """Whether the model kind's inputs hold added conditions its forward takes nested (real.call_kwargs)."""
    return any(f'"{name}"' in copied_code(REAL, (f"{MODELS[cell.model].kind}_inputs",))
               for name in module_constant(REAL, "ADDED_CONDITIONS"))


def _kwargs(cell: Cell, inputs: str = "inputs") -> str:
    """The forward's keyword arguments from a step's inputs (real.call_kwargs)."""
    return f"call_kwargs({inputs})" if _nested(cell) else inputs


def _call(cell: Cell) -> str:
    """A step of the model on `inputs` (real.run)."""
    return f"model(**{_kwargs(cell)}, return_dict=False)[0]"


CHECK_OUTPUT = '''\
def check_output(output: torch.Tensor, reference: torch.Tensor) -> None:  # harness/run/measure.py output_error
    assert bool(torch.isfinite(output).all()), "output not finite: NaN or infinity in the output"
    out, ref = output.detach().double().cpu().flatten(), reference.detach().double().cpu().flatten()
    noise, signal = (out - ref).pow(2).sum().item(), ref.pow(2).sum().item()
    sqnr = None if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else float("-inf")
    print(f"SQNR against the float model: {'exact' if sqnr is None else f'{sqnr:.1f} dB'} (floor: {FLOOR_DB} dB)")
    assert sqnr is None or FLOOR_DB is None or sqnr >= FLOOR_DB, \\
        f"output below its type's floor: SQNR {sqnr:.1f} dB < {FLOOR_DB} dB (the output is not the model's)"'''


def _imports(parts: dict, code: str) -> str:
    """The import lines the code uses: a line whose names `code` never reads is left out (the standard library's
    group first, then torch's and diffusers', then the engine's)."""
    used = {n.id for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Name)}

    def wanted(line: str) -> bool:
        bound = re.fullmatch(r"(?:from \S+ )?import (?:\S+ as )?([\w.]+)", line.strip())
        return bound is None or bound.group(1).split(".")[0] in used

    groups = [["import math", "import tempfile", "import types", "from pathlib import Path"],
              ["import accelerate", "import diffusers", "import torch", "from torch import nn"],
              parts["imports"].splitlines() if parts["imports"] else []]
    return "\n\n".join("\n".join(kept) for group in groups if (kept := [line for line in group if wanted(line)]))


def _constants(cell: Cell, s: Settings, check: bool, compiled: dict | None) -> str:
    floor = output_floor(cell.engine, cell.qtype, cell.cast)
    out = [f"DTYPE, DEVICE = {_torch_dtype(cell.dtype)}, torch.device({_device(cell.device)!r})",
           f"SEED, BATCH, WARMUP = {s.seed!r}, {s.batch!r}, {s.warmup!r}  # WARMUP: steps after the first, untimed"]
    if check:
        out.append(f"FLOOR_DB = {floor.sqnr_db if floor else None!r}  # the type's SQNR floor "
                   "(harness/engines/catalog.py)")
    if compiled:
        out.append(_pick(compiled["constants"], cell.offload))
    return "\n".join(out)


def _main(parts: dict, cell: Cell, check: bool, reaches, steps: bool) -> list[str]:
    """main(): inputs, the float model's output where the output is judged, then each stage the cell reached, as
    the harness runs them (harness/run/execute.py); `steps`: it calls the model (a forward, or compile's first call)."""
    stack = parts["module"].replace(".", "/") + ".py"
    body = [f"# prepare: the files the load reads, made as the harness makes them ({stack} files)",
            *parts["prepare"].splitlines()] if parts["prepare"] else []
    if reaches("load"):
        body += [f"# load ({stack} load)", *parts["load"].splitlines(),
                 "model.eval()  # as the harness leaves it (harness/run/execute.py)"]
        body += [line for t in parts["treat_load"] for line in t.splitlines()]
    after = parts["offload"][1]
    if reaches("offload"):
        body += [f"# offload ({stack} offload)", *parts["offload"][0].splitlines()]
    call = _call(cell)
    step = [f"    output = {call}", *(["    " + after] if after else [])]
    warm = ["    for _ in range(WARMUP):", f"        {call}", *(["        " + after] if after else [])]
    compiled = parts["compile"]
    guard = f"{compiled['call']}, " if compiled else ""
    if compiled and reaches("compile"):
        body += ["# compile (harness/treatments/compiling.py), after the offload: its first call compiles",
                 _pick(compiled["apply"], cell.compile), f"with {guard}torch.no_grad():", *step]
    if reaches("forward"):
        if not (compiled or check):  # no output is judged: the first step and the warm-up steps alike
            step, warm = [], [warm[0].replace("range(WARMUP)", "range(1 + WARMUP)"), *warm[1:]]
        body += ["# forward: the first step, then the warm-up steps", f"with {guard}torch.no_grad():",
                 *([] if compiled else step), *warm]
        if check:
            body.append("check_output(output, reference)")
    head = ["def main() -> None:", "    torch.manual_seed(SEED)  # as the harness seeds a cell"]
    if check or steps:
        head.append("    inputs = make_inputs(SEED, BATCH, DEVICE)")
    if check:
        head += ["    with torch.no_grad():  # the float model's output, which the cell's is judged against",
                 f"        reference = {_call(cell).replace('model(', 'build_model().to(DEVICE)(', 1)}"]
    if parts["prepare"]:
        head += ['    with tempfile.TemporaryDirectory(prefix="quantmatrix-repro-") as name:',
                 "        tmp = Path(name)"]
        return head + [("        " + line).rstrip() for line in body]
    return head + [("    " + line).rstrip() for line in body]


def _wrap(line: str, width: int = WIDTH, inside: bool = False) -> list[str]:
    """A long line of code broken after commas inside brackets (`inside`: the line continues an open bracket;
    never inside a string or a comment), the rest indented one level deeper than the line."""
    cuts, depth, quote, i = [], int(inside), "", 0
    while i < len(line):
        c = line[i]
        if quote:
            i += 2 if c == "\\" else 1
            quote = "" if c == quote else quote
            continue
        if c in "'\"":
            quote = c
        elif c == "#":
            break
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth > 0 and line[i + 1:i + 2] == " ":
            cuts.append(i + 1)
        i += 1
    pad = " " * (len(line) - len(line.lstrip()) + 4)
    out, start = [], 0
    while len(line) - start + (len(pad) if out else 0) > width:
        fits = [c for c in cuts if c > start and c - start + (len(pad) if out else 0) <= width]
        if not fits:
            break
        out.append((pad + line[start:fits[-1]].strip()) if out else line[:fits[-1]].rstrip())
        start = fits[-1]
    return out + [(pad if out else "") + line[start:].strip()] if out else [line]


def _wrapped(lines: list[str]) -> str:
    out: list[str] = []
    for line in lines:
        out += _wrap(line, inside=bool(out) and out[-1].rstrip().endswith(("(", ",")))
    return "\n".join(out)


def script(record: dict, settings: Settings | None = None, *, settings_from: str = "") -> str:
    """The standalone script of a record's cell (raises Unsupported, naming the cell and what is missing). A record
    is untrusted: one that does not validate gets no script; of one that does, every value becomes a Python
    literal (`repr`) or a known axis value, and every text a comment line."""
    problems = validate_record(record)
    if problems:
        raise Unsupported(f"cell {printable(repr(record.get('id')))}: no standalone script: its record does not "
                          f"validate ({printable('; '.join(problems))})")
    cell = record_cell(record)
    if (record.get("error") or {}).get("type") == "NotQuantized":  # the harness's own check, after the load
        raise Unsupported(f"cell {cell.id}: no standalone script: its failure is the harness's check of the stored "
                          "bits (NotQuantized), not written into scripts yet")
    try:
        parts = _parts(cell, settings)
    except Unsupported as exc:
        raise Unsupported(f"cell {cell.id}: no standalone script: {exc}") from None
    s = settings or Settings()
    stop = _stop_stage(record)

    def reaches(stage: str) -> bool:
        return STAGES.index(stop) >= STAGES.index(stage)
    check = record.get("verdict") in CHECKED or (record.get("error") or {}).get("type") == "NonFiniteOutput"
    traces = CATALOG[cell.engine].traces and reaches("load") and cell.load == "post-load"
    steps = reaches("forward") or (parts["compile"] is not None and reaches("compile"))  # the compile step calls
    inputs = steps or check or traces
    note = f"Seed {s.seed}, batch {s.batch}: " + (f"the settings of {settings_from}." if settings_from else
                                                  "the harness's defaults.")
    helpers = [_wrapped(parts["values"].splitlines()) if parts["values"] and reaches("load") else "",
               parts["copies"] if reaches("load") else "",
               parts["helpers"] if reaches("prepare") else "",
               parts["offload_helpers"] if reaches("offload") else "", CHECK_OUTPUT if check and reaches("forward")
               else ""]
    code = [_constants(cell, s, check, parts["compile"] if reaches("compile") else None),
            _model_code(cell, inputs, seeded=check), *[h for h in helpers if h],
            _wrapped(_main(parts, cell, check, reaches, steps)
                     + [f'    print("ran to the end of the {stop} step without an error")']),
            'if __name__ == "__main__":\n    main()']
    body = "\n\n\n".join(t.strip("\n") for t in code) + "\n"
    return (header(record, cell, stop, note, ("torch", "diffusers", "accelerate", *parts["needs"]), check) + "\n"
            + _imports(parts, body) + "\n\n" + body)


def settings_of(matrix: Path | str | None) -> Settings | None:
    """A matrix file's settings (its seed, batch, [offload.group]); None without one."""
    if matrix is None:
        return None
    from harness.matrix import load_matrix

    return load_matrix(matrix).settings
