"""An engine is its module and its catalog entry; a stack likewise. What else names engines or stacks (the
registry, the layer attribution, the diffusers integrations, the extras, tox's pins, the device wheels) is derived
from the catalogs or checked against them here, and no module outside the stacks compares stack names."""

import configparser
import re
import tomllib
from pathlib import Path

from harness.engines.catalog import CATALOG
from harness.engines.registry import ENGINES
from harness.run.execute import LAYER_DEPTH, layer_of
from harness.stacks.catalog import STACK_CATALOG
from harness.stacks.diffusers import INTEGRATIONS
from harness.stacks.registry import STACKS

REPO = Path(__file__).resolve().parents[1]
PACKAGED = [e for e in CATALOG.values() if e.package]


def requirement_names(lines) -> set[str]:
    return {re.split(r"[<>=!~ \[;]", line.strip(), maxsplit=1)[0].lower() for line in lines
            if line.strip() and not line.strip().startswith("#")}


def test_the_registries_hold_what_the_catalogs_name():
    assert list(ENGINES) == list(CATALOG) and all(ENGINES[n].name == n for n in CATALOG)
    assert list(STACKS) == list(STACK_CATALOG) and all(STACKS[n].info is STACK_CATALOG[n] for n in STACK_CATALOG)


def test_every_engine_package_is_an_extra_a_tox_pin_and_a_device_wheel():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["engines"]
    tox = configparser.ConfigParser()
    tox.read(REPO / "tox.ini")
    pinned = requirement_names(tox["testenv:matrix-current"]["deps"].splitlines())
    wheels = requirement_names((REPO / "scripts" / "device-wheels.txt").read_text().splitlines())
    for engine in PACKAGED:
        assert engine.package in requirement_names(extras), engine.name
        assert engine.package in pinned, engine.name
        assert engine.package in wheels, engine.name


def test_every_engine_has_a_title_and_a_layer_depth_its_errors_are_attributed_with():
    for engine in PACKAGED:
        assert engine.title and LAYER_DEPTH[engine.module] == engine.layer_depth, engine.name
    assert layer_of(["harness.run.execute", "optimum.quanto.tensor.weights", "torch.nn.functional"]) == \
        "optimum.quanto"


def test_the_diffusers_stack_declares_the_integrations_it_implements():
    declared = STACK_CATALOG["diffusers"].loads
    assert set(declared) == set(INTEGRATIONS) and set(INTEGRATIONS) <= set(CATALOG)
    # decided before a cell runs: GGUF has no diffusers on-the-fly load, NNCF no integration at all
    from harness.stacks.catalog import STACK_CATALOG as stacks

    diffusers = stacks["diffusers"]
    assert "GGUFQuantizationConfig reads" in diffusers.offers(CATALOG["gguf"], "on-the-fly")
    assert "no quantizer integration" in diffusers.offers(CATALOG["nncf"], "prequantized")
    assert diffusers.offers(CATALOG["nncf"], "post-load") is None  # the engine's own API on the loaded model
    assert "does not offer" in stacks["direct"].offers(CATALOG["torchao"], "prequantized")


def _comparisons(names) -> re.Pattern:
    """`x == "name"`, `"name" != x` for any of the names."""
    name = "|".join(map(re.escape, names))
    return re.compile(rf"(==|!=)\s*\(?[\"']({name})[\"']|[\"']({name})[\"']\s*(==|!=)")


def test_no_module_outside_the_stacks_compares_stack_names():
    compared = _comparisons(STACK_CATALOG)
    for path in (REPO / "harness").rglob("*.py"):
        if path.is_relative_to(REPO / "harness" / "stacks"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not compared.search(line), f"{path.relative_to(REPO)}:{number}: {line.strip()}"


def test_the_repro_skeleton_names_no_engine_and_no_stack():
    """Standalone scripts are assembled from each engine's, stack's and treatment's own fragment (its REPRO): the
    skeleton compares no engine or stack name, and names none in a string (but diffusers, the package)."""
    text = (REPO / "harness" / "repro.py").read_text()
    assert not _comparisons([*CATALOG, *STACK_CATALOG]).search(text)
    named = [n for n in [*CATALOG, *STACK_CATALOG] if n != "diffusers"]
    quoted = re.compile(rf"[\"']({'|'.join(map(re.escape, named))})[\"']")
    assert not quoted.search(text), quoted.search(text)


def test_a_cell_of_a_diffusers_model_class_needs_diffusers_on_either_stack(monkeypatch):
    """Decided once (stacks.catalog.packages_needed): without diffusers, a real model class on the direct stack is
    unavailable for the missing package too, not a failure."""
    import importlib.util

    from harness.cell import Cell
    from harness.run.execute import unavailable

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    for stack in ("direct", "diffusers"):
        outcome = unavailable(Cell("none", "-", "post-load", "none", "cpu", "flux-tiny", "float32", stack))
        assert outcome is not None and outcome.absence.value == "package-missing" and "'diffusers'" in outcome.reason
    grouped = unavailable(Cell("none", "-", "post-load", "group", "cpu", "dit-xs", "float32"))
    assert grouped is not None and "'diffusers'" in grouped.reason  # group offload is diffusers' hooks
    assert unavailable(Cell("none", "-", "post-load", "none", "cpu", "dit-xs", "float32")) is None


def test_the_engine_table_in_the_docs_is_the_catalogs():
    """docs/engines.md's table is generated from the engines' and stacks' catalogs (`python -m
    harness.report.markdown docs/engines.md` rewrites it), as llama.cpp's docs/ops.md from its test cases."""
    from harness.report.markdown import ENGINE_TABLE_START, engine_table, with_engine_table

    page = (REPO / "docs" / "engines.md").read_text()
    assert ENGINE_TABLE_START in page and with_engine_table(page) == page, \
        "docs/engines.md is stale: run python -m harness.report.markdown docs/engines.md"
    for name, info in CATALOG.items():
        assert (f"| `{name}` " in engine_table()) != info.hidden  # every engine but the test-only ones


def test_the_readme_is_short_and_points_to_docs_that_exist():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    linked = re.findall(r"`(docs/[\w.-]+\.md)`", readme)
    assert linked and all((REPO / path).is_file() for path in linked), linked
    assert {p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md")} - set(linked) \
        == {"docs/sdnext-wiki-quantization.md"}  # every page reachable from the README, the kept wiki page apart
