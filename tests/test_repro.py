"""Standalone reproductions (`quantmatrix repro`), the report's links to them, and the upstream drafts
(`quantmatrix report --upstream`). The fast tests generate text only (no model is built); the slow ones run the
scripts alone and check they end with the recorded error, and that their weights are the harness's."""

import ast
import contextlib
import io
import json
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

from conftest import lines_of
from harness import repro
from harness.cell import Cell
from harness.cli import main
from harness.report import data as report_data
from harness.report import upstream as report_upstream
from harness.settings import Settings

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "results" / "reference"
UPSTREAM = REFERENCE / "cpu-upstream.jsonl.gz"
DEFAULT = REFERENCE / "cpu-default.jsonl.gz"
GGUF_SEQUENTIAL = "gguf-Q8_0/prequantized/sequential/cpu/flux-tiny/float32/diffusers"  # diffusers#14691
CPU0_FLOAT = "none/post-load/sequential/cpu/flux-tiny/float32/diffusers"  # the cpu:0 finding, on the float model
MUST_SHOW = [(GGUF_SEQUENTIAL, UPSTREAM), (CPU0_FLOAT, DEFAULT)]
# What a generated script may import: the standard library it uses, torch, diffusers, accelerate, the engines
ALLOWED = {"__future__", "math", "os", "tempfile", "types", "pathlib", "torch", "diffusers", "accelerate", "numpy",
           "bitsandbytes", "optimum", "gguf", "nncf", "sdnq", "torchao"}


def imported(text: str | ast.Module) -> set[str]:
    """The top-level modules a script imports, anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(text) if isinstance(text, str) else text):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out.add((node.module or "").split(".")[0])
    return out


def record_of(cell_id: str, path: Path) -> dict:
    return repro.find_record(cell_id, [path])


@pytest.mark.parametrize(("cell_id", "results"), MUST_SHOW)
def test_repro_script_imports_no_harness_and_states_versions_and_error(cell_id, results, tmp_path, capsys):
    out = tmp_path / "repro_script.py"
    assert main(["repro", cell_id, "--results", str(results), "-o", str(out)]) == 0
    text = out.read_text()
    modules = imported(text)
    assert "harness" not in modules and modules <= ALLOWED, modules
    record = record_of(cell_id, results)
    env, err = record["env"], record["error"]
    header = text.split("\nimport ", 1)[0]
    assert all(line.startswith("#") for line in header.splitlines())
    package = {"gguf": "gguf", "none": None}[record["cell"]["engine"]]
    for version in (f"python {env['python']}", f"torch {env['torch']}", f"diffusers {env['diffusers']}",
                    f"accelerate {env['accelerate']}",
                    *([f"{package} {env['engines'][record['cell']['engine']]}"] if package else [])):
        assert version in header.replace("\n# ", " "), version
    assert f"{err['type']}: {err['message'].splitlines()[0]}" in header
    assert f"raised in: {err['layer']}" in header and f"stage:     {err['stage']}" in header
    assert "python this_file.py" in header
    # the model: its constructor arguments inlined; an error judges no output, so the class's own initial weights
    assert "CONFIG = dict(patch_size=1, " in text and "diffusers.FluxTransformer2DModel(**CONFIG)" in text
    assert "its own initial weights" in header and "seed_weights" not in text and "import math" not in text
    # a script that judges the output draws the harness's weights: its own seed_weights, run on flux-tiny's
    # skeleton, draws them to the bit
    import math

    import torch
    from torch import nn

    from harness.models import real

    judged = repro.script(_record(Cell("quanto", "qint8", "post-load", "none", "cpu", "flux-tiny", "float32",
                                       "direct"), stage=None, verdict="wrong-output"))
    assert "the harness's seeded random weights" in judged
    copied = next(n for n in ast.parse(judged).body if isinstance(n, ast.FunctionDef) and n.name == "seed_weights")
    namespace = {"torch": torch, "nn": nn, "math": math}
    exec(compile(ast.Module([copied], []), "<script>", "exec"), namespace)  # noqa: S102 - the generated script
    ours = namespace["seed_weights"](real.build_skeleton("flux-tiny", torch.float32), 0).state_dict()
    theirs = real.build_model("flux-tiny").state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # stdout without -o: the same script
    assert main(["repro", cell_id, "--results", str(results)]) == 0
    assert capsys.readouterr().out == text


def test_the_gguf_script_writes_the_file_and_loads_it_through_from_single_file():
    text = repro.script(record_of(GGUF_SEQUENTIAL, UPSTREAM))
    assert "gguf.GGUFWriter(" in text and "gguf.quants.quantize(" in text and "GGMLQuantizationType.Q8_0" in text
    assert ".from_single_file(\n" in text and "str(saved), config=str(float_dir), torch_dtype=DTYPE" in text
    assert "quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=DTYPE)" in text
    main_body = text.split("def main() -> None:", 1)[1]
    assert "pipe.enable_sequential_cpu_offload(device=DEVICE)" in main_body
    assert "model(**inputs" not in main_body and "def make_inputs" not in text  # it stops at the offload


def test_repro_of_a_cell_it_cannot_express_exits_2_with_one_line(capsys):
    pipe = "none/post-load/sequential/cpu/flux-tiny-pipe/bfloat16/diffusers"
    assert main(["repro", pipe, "--results", str(DEFAULT)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and pipe in err and "pipelines" in err and "Traceback" not in err
    assert main(["repro", "none/post-load/none/cpu/flux-tiny/float32/nowhere", "--results", str(DEFAULT)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no record" in err


def _record(cell: Cell, *, stage: str | None = "forward", verdict: str = "fail") -> dict:
    error = None if stage is None else {"type": "RuntimeError", "message": 'it """broke"""\n  \\ here', "layer": "x",
                                        "stage": stage, "where": "a.py:1 f"}
    metrics = {"param_bytes": 1, "disk_bytes": 1, "bits_per_weight": 8.0, "peak_mem_bytes": 1, "mem_base_bytes": 0,
               "mem_kind": "rss", "latency_ms": {"median": 1.0, "p10": 1.0, "p90": 1.0, "n": 3}, "quantize_s": 0.1,
               "load_s": 0.1, "sqnr_db": 3.0, "cosine": 0.5, "max_abs_error": 1.0}
    return {"schema": 1, "run": "r", "id": cell.id, "cell": cell.as_dict(), "verdict": verdict, "error": error,
            "expect": {"kind": "works"}, "env": {"torch": "t", "python": "p", "host": "h", "engines": {}},
            "started": "s", "duration_s": 1.0, "metrics": metrics if verdict == "wrong-output" else None}


STAGES_BEFORE = ("prepare", "load", "offload")


def _expressible_cells() -> list[Cell]:
    cells = []
    for stack in ("direct", "diffusers"):
        for engine, qtype in (("none", "-"), ("bnb", "nf4"), ("bnb", "int8"), ("quanto", "qint8"), ("sdnq", "int8"),
                              ("torchao", "int8_weight_only"), ("nncf", "int4_sym-g128"), ("gguf", "Q8_0")):
            for load in ("post-load", "on-the-fly", "prequantized"):
                for offload in ("none", "model", "sequential", "group"):
                    casting = "float8_e4m3fn" if offload == "none" else "-"
                    for model, cast in (("flux-tiny", "-"), ("sdxl-tiny", casting)):
                        cell = Cell(engine, qtype, load, offload, "cuda", model, "bfloat16", stack, cast)
                        if repro.unsupported(cell, Settings()) is None:
                            cells.append(cell)
    return cells + [c.replace(compile=mode) for c in cells for mode in ("regional", "full")
                    if c.model == "flux-tiny" and c.engine in ("none", "gguf") and c.load != "on-the-fly"]


def test_every_path_the_generator_offers_is_valid_python_without_the_harness():
    cells = _expressible_cells()
    assert len(cells) > 60  # both stacks, every engine it writes, every load and offload it writes
    for i, cell in enumerate(cells):  # each cell up to one of the stages, in turn
        stages = [s for s in repro.STAGES if s != "compile" or cell.compile != "-"]
        text = repro.script(_record(cell, stage=stages[i % len(stages)]), Settings(), settings_from="m.toml")
        tree = ast.parse(text)
        compile(tree, cell.id, "exec")
        assert imported(tree) <= ALLOWED, cell.id
    checked = repro.script(_record(cells[-1], stage=None, verdict="wrong-output"), Settings())
    assert "check_output(output, reference)" in checked and "FLOOR_DB = " in checked  # a wrong output is checked
    group = repro.script(_record(Cell("none", "-", "post-load", "group", "cpu", "flux-tiny", "float32", "diffusers")),
                         Settings(group_type="block_level", group_blocks=2), settings_from="m.toml")
    assert "offload_type='block_level', num_blocks_per_group=2" in group and "exclude_modules=['vae']" in group
    assert "the settings of m.toml" in group
    # a compiled cell compiles after offload, with diffusers' tests' options, and compiles (fails) on its first call
    compiled = repro.script(_record(Cell("none", "-", "post-load", "model", "cpu", "flux-tiny", "float32", "diffusers",
                                         compile="regional"), stage="compile"))
    assert "FULLGRAPH, ERROR_ON_RECOMPILE = True, False" in compiled
    main_body = compiled.split("def main() -> None:", 1)[1]
    assert main_body.index("enable_model_cpu_offload") < main_body.index("model.compile_repeated_blocks(") < \
        main_body.index("output = model(**inputs") and "# forward" not in main_body
    assert "model.compile_repeated_blocks(fullgraph=FULLGRAPH)" in compiled


def test_the_compile_fragment_states_the_options_the_harness_compiles_with():
    from harness.treatments import compiling

    fragment = repro.module_constant("harness.treatments.compiling", "REPRO")["constants"]
    for offload in ("none", "model", "sequential", "group", "balanced"):
        names: dict = {}
        exec(repro._pick(fragment, offload), {}, names)  # noqa: S102 - the fragment's one assignment
        assert {"fullgraph": names["FULLGRAPH"], "error_on_recompile": names["ERROR_ON_RECOMPILE"]} == \
            compiling.options(offload), offload


@pytest.mark.parametrize("offload", ["none", "model", "sequential", "group"])
def test_the_sdnq_fragment_places_the_model_as_the_harness_does(offload):
    """SDNQ after loading, as SD.Next places it: the script's return device is the harness's for the offload mode
    (sdnq.sdnext_devices), evaluated from the script's own expression."""
    import torch

    from harness.engines import sdnq

    text = repro.script(_record(Cell("sdnq", "int8", "post-load", offload, "cpu", "flux-tiny", "float32",
                                     "diffusers")), Settings())
    expression = re.search(r"return_device=(DEVICE|torch\.device\('cpu'\))\)\n", text).group(1)  # the cell's own
    cuda = torch.device("cuda")
    assert eval(expression, {"DEVICE": cuda, "torch": torch}) == sdnq.sdnext_devices(offload, cuda)["return_device"]
    assert "quantization_device=DEVICE" in text


def test_what_the_generator_cannot_express_it_says_before_writing_anything():
    said = {cell_id: repro.unsupported(Cell.from_id(cell_id)) for cell_id in (
        "none/post-load/none/cpu/dit-s/float32/direct",
        "none/post-load/none/cpu/flux-tiny-pipe/bfloat16/diffusers",
        "gguf-Q8_0/post-load/none/cpu/flux-tiny/float32/direct",
        "bnb-nf4/post-load/balanced/cpu/flux-tiny/float32/diffusers",
        "none/post-load/group/cpu/flux-tiny/float32/diffusers",
        "bnb-nf4/prequantized/none/cpu/flux-tiny/float32/direct")}
    assert all(said.values()), said
    assert "imitation" in said["none/post-load/none/cpu/dit-s/float32/direct"]
    assert "--matrix" in said["none/post-load/group/cpu/flux-tiny/float32/diffusers"]
    with pytest.raises(repro.Unsupported, match="balanced"):
        repro.script(_record(Cell.from_id("bnb-nf4/post-load/balanced/cpu/flux-tiny/float32/diffusers")))


# ------------------------------------------------------------------------------------------ untrusted records

# Text that would end a comment line (newlines, a carriage return, Unicode's separators), a string literal (every
# quote) or reorder a line on screen (a bidi override), around a call that would run
PAYLOAD = "x\n__import__('os').system('touch PWNED')\r\x0b\x0c\x1c\x85\u2028\u202e\"\"\"'''#"


def _crafted(tmp_path: Path) -> tuple[str, Path]:
    """The probe of issue 36: a real failing record whose cell.dtype carries code, its id made to match."""
    record = json.loads(next(line for line in lines_of(UPSTREAM) if GGUF_SEQUENTIAL in line))
    record["cell"]["dtype"] = "float32; __import__('os').system('touch PWNED')"
    record["id"] = Cell(**record["cell"]).id
    (tmp_path / "inj.jsonl").write_text(json.dumps(record) + "\n")
    return record["id"], tmp_path / "inj.jsonl"


def test_a_crafted_cell_value_gets_no_script_from_repro_or_the_report(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cell_id, results = _crafted(tmp_path)
    assert main(["repro", cell_id, "--results", str(results), "-o", "r.py"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not validate" in err and "cell.dtype" in err and "Traceback" not in err
    assert not (tmp_path / "r.py").exists()
    assert main(["report", str(results), "-o", "site", "--rules", ""]) == 0
    assert "1 skipped" in capsys.readouterr().out  # the report names the bad line, and writes no script of it
    assert not list((tmp_path / "site").rglob("*.py")) and not (tmp_path / "PWNED").exists()


def _code_tokens(text: str) -> list[tuple[int, str]]:
    """The script's tokens that are code: comments and the text inside string literals left out."""
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    return [(t.type, "<string>" if t.type == tokenize.STRING else t.string)
            for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type not in skip]


def _text_fields(value, path=()):
    """The path of every string in a record, but for its cell and id (which must be known axis values)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if path or key not in ("cell", "id", "verdict", "schema"):
                yield from _text_fields(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _text_fields(item, (*path, i))
    elif isinstance(value, str):
        yield path


def test_no_text_of_a_record_becomes_code_in_its_script():
    """Every string of a valid record (its run, start, host, versions, error, rule...) set to text that would end
    a comment or a string: the script's code is the same, token for token; the text only ever lands in comments
    and string literals."""
    record = record_of(GGUF_SEQUENTIAL, UPSTREAM)
    code = _code_tokens(repro.script(record))
    paths = list(_text_fields(record))
    assert len(paths) > 20
    for path in paths:
        crafted = json.loads(json.dumps(record))
        *parents, leaf = path
        target = crafted
        for key in parents:
            target = target[key]
        target[leaf] = PAYLOAD
        try:
            text = repro.script(crafted, settings_from=PAYLOAD)
        except repro.Unsupported as exc:  # refused: one line
            assert "\n" not in str(exc), path
            continue
        assert _code_tokens(text) == code, path
        compile(text, "repro", "exec")
        assert "\u2028" not in text and "\u202e" not in text and "\r" not in text, path


# ------------------------------------------------------------------------------------------ the report

def test_the_report_writes_and_links_a_script_for_each_failing_cell(tmp_path):
    lines = [line for line in lines_of(UPSTREAM) if line.strip()]
    some = [line for line in lines if '"flux-tiny"' in line and ('"sequential"' in line or '"balanced"' in line)
            and '"bnb"' in line or GGUF_SEQUENTIAL in line]  # failing cells, some it cannot express, some working
    (tmp_path / "r.jsonl").write_text("\n".join(some) + "\n")
    assert main(["report", str(tmp_path / "r.jsonl"), "-o", str(tmp_path / "site"), "--rules", ""]) == 0
    details = (tmp_path / "site" / "cells.js").read_text()  # each cell's figures, its script's path among them
    scripts = sorted((tmp_path / "site" / "repro").glob("*.py"))
    gguf = [p for p in scripts if p.name.startswith("gguf-q8-0-prequantized-sequential-cpu-flux-tiny-float32-diff")]
    assert len(gguf) == 1 and f'repro/{gguf[0].name}' in details
    assert "harness" not in imported(gguf[0].read_text())
    assert "no standalone script: balanced offload" in details  # a failing cell it cannot express says why
    failing = {json.loads(line)["id"] for line in some if json.loads(line)["verdict"] not in ("ok", "unavailable")}
    assert 1 < len(scripts) < len(failing)
    assert 'key === "reproduce"' in (tmp_path / "site" / "grids.html").read_text()  # the panel makes it a link
    manifest = (tmp_path / "site" / "repro" / report_upstream.MANIFEST).read_text().split()
    assert manifest == [p.name for p in scripts]  # each script it wrote, once (however many cells link it)
    # a second build into the same directory leaves no stale script of its own behind, and never touches a file
    # it did not write (its manifest names what it wrote)
    folder = tmp_path / "site" / "repro"
    (folder / "stale-00000000.py").write_text("")
    manifest = folder / report_upstream.MANIFEST
    manifest.write_text(manifest.read_text() + "stale-00000000.py\n../../outside.py\n")
    (tmp_path / "outside.py").write_text("mine")
    (folder / "my-own.py").write_text("mine")
    loaded = report_data.load([tmp_path / "r.jsonl"])
    written = report_upstream.write_scripts(loaded.latest(), tmp_path / "site", loaded.files)
    assert sorted(folder.glob("*.py")) == sorted([*scripts, folder / "my-own.py"])
    assert (tmp_path / "outside.py").read_text() == "mine" == (folder / "my-own.py").read_text()
    assert {s.path for s in written.values() if s.path} == {f"repro/{p.name}" for p in scripts}
    # one script per failure: the cells that share one share its error and raising layer, and its engine or, where
    # engines differ, a float model that fails the same way
    latest = loaded.latest().set_index(["machine", "versions", "id"])
    by_script: dict[str, list] = {}
    for key, script in written.items():
        if script.path:
            by_script.setdefault(script.path, []).append(key)
    assert any(len(keys) > 1 for keys in by_script.values())
    errors = {i: e for (_, _, i), e in latest["error_type"].items()}
    for keys in by_script.values():
        assert len({(latest.loc[k, "error_type"], latest.loc[k, "error_layer"]) for k in keys}) == 1
        if len({latest.loc[k, "engine"] for k in keys}) > 1:
            assert all(latest.loc[k, "engine"] == "none" or errors.get(latest.loc[k, "baseline_id"])
                       == latest.loc[k, "error_type"] for k in keys)


def test_a_repro_limit_keeps_the_findings_of_most_cells_and_names_the_command_for_the_rest(tmp_path):
    """--repro-limit N: at most N scripts, findings before documented errors and, among them, the failures of
    most cells; every other failing cell's panel gives the command that writes its script."""
    loaded = report_data.load([UPSTREAM])
    every = report_upstream.write_scripts(loaded.latest(), tmp_path / "all", loaded.files)
    limited = report_upstream.write_scripts(loaded.latest(), tmp_path / "two", loaded.files, limit=2)
    paths = {s.path for s in every.values() if s.path}
    kept = {s.path for s in limited.values() if s.path}
    assert len(paths) > 2 and len(kept) <= 2 and kept <= paths
    assert sorted(p.name for p in (tmp_path / "two" / "repro").glob("*.py")) == sorted(p[6:] for p in kept)
    latest = loaded.latest().set_index(["machine", "versions", "id"])
    cells = {p: [k for k, s in every.items() if s.path == p] for p in paths}
    worth = {p: (latest.loc[keys[0], "verdict"] == "documented-error", -len(keys)) for p, keys in cells.items()}
    assert max(worth[p] for p in kept) <= min(worth[p] for p in paths - kept)
    for key, script in limited.items():
        if every[key].path and every[key].path not in kept:
            assert script.path is None and "`quantmatrix repro " in script.why_not


# ------------------------------------------------------------------------------------------ upstream drafts

CPU0_DRAFT = "accelerate-typeerror-new-received-an-invalid-combination-of-arguments-146fc907.md"


@pytest.fixture(scope="module")
def drafted(tmp_path_factory) -> tuple[Path, str]:
    """`quantmatrix report cpu-default cpu-upstream --upstream DIR` (the reference records of this host)."""
    out, said = tmp_path_factory.mktemp("drafts"), io.StringIO()
    with contextlib.redirect_stdout(said):
        assert main(["report", str(DEFAULT), str(UPSTREAM), "--upstream", str(out)]) == 0
    return out, said.getvalue()


def test_upstream_drafts_group_identical_failures_and_skip_reported_ones(drafted):
    out, said = drafted
    assert "already reported (diffusers#14691): 1 cells" in said and "already reported (diffusers#10526)" in said
    drafts = {p.name: p.read_text() for p in out.glob("*.md")}
    assert CPU0_DRAFT in drafts, sorted(drafts)
    assert not any("KeyError: None" in text.split("## Reproduction")[0] for text in drafts.values())
    assert not any("WeightQBytesTensor.__new__() missing 6" in text.split("## Reproduction")[0]
                   for text in drafts.values())
    cpu0 = drafts[CPU0_DRAFT]
    assert "(https://github.com/huggingface/accelerate/issues/new)" in cpu0 and "`accelerate.utils`" in cpu0
    for section in ("## Environment", "## Reproduction", "## Expected", "## Actual", "## Affected cells"):
        assert section in cpu0
    # one draft for the cells of both files that raised it; the float model's cell is the reproduction
    assert f"| `{CPU0_FLOAT}` |" in cpu0
    assert "| `bnb-int8/post-load/sequential/cpu/flux-tiny/float32/diffusers` |" in cpu0
    assert f"for the cell `{CPU0_FLOAT}`" in cpu0
    script = cpu0.split("```python\n", 1)[1].split("\n```", 1)[0]
    assert "harness" not in imported(script) and "enable_sequential_cpu_offload(device=DEVICE)" in script
    assert "`none/post-load/sequential/cpu/flux-tiny/float32/direct` (ok)" in cpu0  # the control that works
    assert "torch 2.13.0+cpu, diffusers 0.42.1, accelerate 1.16.0" in cpu0


def test_the_committed_cpu0_draft_is_what_the_command_generates(drafted):
    committed = REPO / "reports" / "upstream" / CPU0_DRAFT
    assert committed.read_text() == (drafted[0] / CPU0_DRAFT).read_text(), \
        "regenerate it: quantmatrix report results/reference/cpu-default.jsonl.gz " \
        "results/reference/cpu-upstream.jsonl.gz --upstream DIR, and copy DIR/" + CPU0_DRAFT + " to reports/upstream/"


# ------------------------------------------------------------------------------------------ slow: run them

def last_error(stderr: str, error_type: str) -> str:
    """The traceback's last exception of this type, "Type: message", to the end (a message may span lines)."""
    found = list(re.finditer(rf"^(?:[\w.]+\.)?{re.escape(error_type)}: ", stderr, re.MULTILINE))
    return stderr[found[-1].start():].strip() if found else stderr.strip().splitlines()[-1:][0] if stderr else ""


@pytest.mark.slow
@pytest.mark.parametrize(("cell_id", "results"), MUST_SHOW)
def test_the_script_run_alone_raises_the_recorded_error(cell_id, results, tmp_path):
    record = record_of(cell_id, results)
    script = tmp_path / "repro_script.py"
    script.write_text(repro.script(record))
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, str(script)], cwd=empty, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, proc.stdout[-2000:]
    err = record["error"]
    name, _, message = last_error(proc.stderr, err["type"]).partition(": ")
    assert name.rsplit(".", 1)[-1] == err["type"] and message.strip() == err["message"].strip(), proc.stderr[-3000:]
    assert list(empty.iterdir()) == []  # its files went under a temporary directory


@pytest.mark.slow
@pytest.mark.parametrize("model", ["flux-tiny", "sd3-tiny", "sdxl-tiny"])
def test_the_script_builds_the_harness_model_bit_for_bit(model):
    import torch

    from harness.models.build import build_model, make_inputs

    cell = Cell("none", "-", "post-load", "none", "cpu", model, "float32", "diffusers")
    text = repro.script(_record(cell, stage=None, verdict="wrong-output"))  # it judges the output: seeded weights
    namespace: dict = {"__name__": "repro"}
    exec(compile(text, "repro", "exec"), namespace)
    ours, theirs = namespace["build_model"]().state_dict(), build_model(model, 0).state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    inputs, expected = namespace["make_inputs"](0, 1, "cpu"), make_inputs(model, 0)
    assert list(inputs) == list(expected)
    assert all(torch.equal(inputs[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_the_script_of_a_wrong_output_ends_below_its_floor(tmp_path):
    """A cell that ran but whose output is not the model's (bnb nf4 on sdxl-tiny in float32): the script compares
    with the float model and fails on the type's floor, as the harness judged it."""
    record = record_of("bnb-nf4/post-load/none/cpu/sdxl-tiny/float32/direct", DEFAULT)
    assert record["verdict"] == "wrong-output"
    script = tmp_path / "repro_script.py"
    script.write_text(repro.script(record))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "AssertionError: output below its type's floor" in proc.stderr, proc.stderr[-2000:]
    assert f"SQNR {record['metrics']['sqnr_db']:.1f} dB" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_each_committed_example_script_alone_still_raises_its_recorded_error(tmp_path):
    """reports/example/repro/: at most 10 scripts of at most 100 lines (#37 asks 80: a post-load cell through
    diffusers' pipeline offload holds the inputs' copied code, the engine's layer code and the one-component
    pipeline), each run alone ending as its record did (its error, or its output below the type's floor)."""
    scripts = sorted((REPO / "reports" / "example" / "repro").glob("*.py"))
    assert 0 < len(scripts) <= 10
    for script in scripts:
        text = script.read_text()
        assert len(text.splitlines()) <= 100, script.name
        cell_id = re.search(r"^# Reproduces the quantmatrix cell (\S+)", text, re.M).group(1)
        record = repro.find_record(cell_id, sorted(REFERENCE.glob("*.jsonl*")))
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode != 0, (script.name, proc.stdout[-2000:])
        err = record["error"]
        if err is None:  # a wrong output: below its floor, as recorded
            assert f"SQNR {record['metrics']['sqnr_db']:.1f} dB" in proc.stdout + proc.stderr, proc.stderr[-2000:]
            continue
        name, _, message = last_error(proc.stderr, err["type"]).partition(": ")
        assert name.rsplit(".", 1)[-1] == err["type"], (script.name, proc.stderr[-3000:])
        assert message.strip().splitlines()[0] == err["message"].strip().splitlines()[0], (script.name, message)

