"""The boundaries the layout promises, checked: reports and matrix validation need no torch, no engine and no
runner; the cell's vocabulary imports nothing of the harness; an engine module imports no other engine."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import lines_of

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "harness"
ENGINE_PACKAGES = ("bitsandbytes", "optimum", "gguf", "nncf", "sdnq", "torchao", "modelopt", "auto_round", "datasets",
                   "diffusers", "accelerate")

# Makes `import torch` (and the engines) fail in the child, as in an install without them.
BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch",) + {engines!r}:
            raise ImportError(f"{{name}} is not installed here (blocked by the test)")
        return None
sys.meta_path.insert(0, Block())
"""


def run_python(code: str, *, block: bool) -> subprocess.CompletedProcess:
    prelude = BLOCK.format(engines=ENGINE_PACKAGES) if block else ""
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_report_and_compare_run_in_a_fresh_interpreter_without_torch_engines_or_runner(tmp_path):
    # every fifth record of each reference (what is built is compared with what this process builds from them)
    records = []
    for path in sorted((REPO / "results" / "reference").glob("*.jsonl*")):
        subset = tmp_path / path.name.removesuffix(".gz")
        subset.write_text("".join(line + "\n" for line in lines_of(path)[::5]))
        records.append(str(subset))
    code = f"""
import sys
from harness.cli import main
assert main(["report", *{records!r}, "-o", {str(tmp_path / "site")!r}]) == 0
assert main(["report", *{records!r}, "--markdown", "-o", {str(tmp_path / "table.md")!r}]) == 0
assert main(["report", *{records!r}, "--doc-patch", "-o", {str(tmp_path / "patch.md")!r}]) == 0
assert main(["compare", {records[0]!r}, {records[0]!r}]) == 0
assert main(["validate", "matrices/default.toml", "matrices/sdnext.toml"]) == 0
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch",) + {ENGINE_PACKAGES!r}
                or m.startswith(("harness.run", "harness.engines.registry", "harness.models.imitation",
                                 "harness.models.build", "harness.models.real", "diffusers")))
print("LOADED", loaded)
"""
    for block in (False, True):  # as installed here, and with torch and the engines unimportable
        proc = run_python(code, block=block)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "LOADED []" in proc.stdout, proc.stdout
    # what it built without torch is what this process builds with it: the same pages, cells and table
    from harness.cli import main

    assert main(["report", *records, "-o", str(tmp_path / "here")]) == 0
    assert main(["report", *records, "--markdown", "-o", str(tmp_path / "here.md")]) == 0
    assert main(["report", *records, "--doc-patch", "-o", str(tmp_path / "here-patch.md")]) == 0
    for name in ("index.html", "grids.html", "cells.js", "cells.csv"):
        assert (tmp_path / "site" / name).read_bytes() == (tmp_path / "here" / name).read_bytes(), name
    assert (tmp_path / "table.md").read_text() == (tmp_path / "here.md").read_text()
    assert (tmp_path / "patch.md").read_text() == (tmp_path / "here-patch.md").read_text()
    assert 'class="cell ' in (tmp_path / "site" / "grids.html").read_text()  # grids with cells in them
    assert (tmp_path / "patch.md").read_text().count("measured by quantmatrix") > 0  # statements judged


def imports_of(path: Path) -> set[str]:
    """The harness modules a file imports (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harness"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("harness"))
    return out


def test_the_cell_vocabulary_is_a_leaf():
    assert imports_of(HARNESS / "cell.py") == set()


def test_the_report_package_imports_no_runner_no_engine_and_no_model():
    for path in (HARNESS / "report").glob("*.py"):  # the engines' catalog and the models' specs are data (no
        # torch): the floors, and which models are whole pipelines (the path a record's evidence is on)
        bad = {m for m in imports_of(path) if m.startswith(("harness.run", "harness.engines", "harness.models",
                                                             "harness.devices", "harness.offload"))
               and not m.startswith(("harness.engines.catalog", "harness.models.specs"))}
        assert not bad, f"{path.name} imports {bad}"


def test_an_engine_module_imports_no_other_engine():
    engines = {p.stem for p in (HARNESS / "engines").glob("*.py")} - {"__init__", "base", "catalog", "registry",
                                                                         "containers"}
    for name in engines:
        others = {f"harness.engines.{e}" for e in engines - {name}}
        assert not imports_of(HARNESS / "engines" / f"{name}.py") & others, name


def test_devices_and_the_matrix_model_do_not_import_each_other():
    assert not {m for m in imports_of(HARNESS / "devices.py") if m.startswith("harness.matrix")}
    assert not {m for m in imports_of(HARNESS / "matrix.py") if m.startswith("harness.devices")}


def test_the_parts_a_cell_is_built_from_do_not_import_the_runner():
    # the runner (harness.run) composes engines, models, offload modes and devices; none of them reaches back
    parts = [HARNESS / "offload.py", HARNESS / "devices.py", *(HARNESS / "engines").glob("*.py"),
             *(HARNESS / "models").glob("*.py")]
    for path in parts:
        assert not {m for m in imports_of(path) if m.startswith("harness.run")}, path.name


def module_of(path: Path) -> str:
    parts = path.relative_to(HARNESS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycle_among_the_harness_modules():
    """Imports at any level, inside functions too: a lazy import that closes a cycle is a cycle all the same
    (isolation and pool imported each other so)."""
    modules = {module_of(p): p for p in HARNESS.rglob("*.py")}
    graph = {m: {i for i in imports_of(p) if i in modules and i != m} for m, p in modules.items()}

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*path, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [c for m in sorted(modules) if (c := cycle_from(m))]
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles[:5])


def test_no_function_in_the_harness_is_over_60_lines():
    """A function a reader takes in at once: the long ones were split (#37)."""
    long = []
    for path in sorted((REPO / "harness").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} "
                            f"({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
