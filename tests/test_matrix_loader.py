"""The matrix loader: valid documents expand to the right cells; every mistake is our error, naming the key."""

import copy
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.cell import AXES, Cell
from harness.engines.registry import ENGINES
from harness.errors import QuantMatrixError
from harness.matrix import parse_matrix
from harness.models.specs import MODELS
from tests.tomlgen import dumps

FAULTS = ENGINES["fault"].qtypes


def subset(values):
    return st.lists(st.sampled_from(values), min_size=1, max_size=len(values), unique=True)


@st.composite
def valid_documents(draw):
    engines = draw(subset(["none", "fault"]))
    faults = draw(subset(FAULTS)) if "fault" in engines else []
    axes = {"engine": engines, "qtype": faults or ["-"], "load": draw(subset(AXES["load"].known())),
            "offload": draw(subset(AXES["offload"].known())), "device": draw(subset(AXES["device"].known())),
            "model": draw(subset(list(MODELS))), "dtype": draw(subset(AXES["dtype"].known()))}
    others = 1
    for axis in ("load", "offload", "device", "model", "dtype"):
        others *= len(axes[axis])
    expected = (("none" in engines) + len(faults)) * others
    doc = {"matrix": {"name": "generated"}, "axes": axes}
    if len(axes["offload"]) > 1 and draw(st.booleans()):
        doc["exclude"] = [{"offload": axes["offload"][0]}]
        expected = expected // len(axes["offload"]) * (len(axes["offload"]) - 1)
    return doc, expected


@given(valid_documents())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_valid_documents_expand_to_the_right_number_of_unique_cells(case):
    doc, expected = case
    matrix = parse_matrix(dumps(doc), "gen.toml")
    assert len(matrix.cells) == expected
    assert len({c.id for c in matrix.cells}) == expected
    assert all(Cell.from_id(c.id) == c for c in matrix.cells)


BASE = {"axes": {"engine": ["none"], "qtype": ["*"], "load": ["post-load"], "offload": ["none", "model"],
                 "device": ["cpu"], "model": ["dit-xs"], "dtype": ["float32"]}}


def _set(path, value):
    def mutate(doc):
        *parents, last = path
        target = doc
        for p in parents:
            target = target.setdefault(p, {})
        target[last] = value
        return doc
    return mutate


def _drop(axis):
    def mutate(doc):
        del doc["axes"][axis]
        return doc
    return mutate


# (mutation, the key the error must name)
MISTAKES = [
    (_set(["axez"], {"x": 1}), "axez"),
    (_set(["axes", "engines"], ["none"]), "axes.engines"),
    (_set(["axes", "engine"], ["bitsandbytez"]), "axes.engine"),
    (_set(["axes", "qtype"], ["nf5"]), "axes.qtype"),
    (_set(["axes", "offload"], ["sequentail"]), "axes.offload"),
    (_set(["axes", "device"], ["tpu"]), "axes.device"),
    (_set(["axes", "model"], ["dit-xxl"]), "axes.model"),
    (_set(["axes", "dtype"], ["float8"]), "axes.dtype"),
    (_set(["axes", "load"], ["lazy"]), "axes.load"),
    (_set(["axes", "offload"], ["none", "none"]), "axes.offload"),
    (_set(["axes", "offload"], []), "axes.offload"),
    (_set(["axes", "offload"], 3), "axes.offload"),
    (_set(["axes", "device"], [True]), "axes.device"),
    (_drop("dtype"), "axes.dtype"),
    (_set(["settings", "cell_timeout_s"], "soon"), "settings.cell_timeout_s"),
    (_set(["settings", "warmpu"], 2), "settings.warmpu"),
    (_set(["offload", "balanced", "high_watermark"], 0.1), "offload.balanced"),
    (_set(["rule"], [{"match": {"engine": "none"}, "expect": "error", "pattern": "([unclosed"}]), "rule[0].pattern"),
    (_set(["rule"], [{"match": {"engine": "none"}, "expect": "maybe"}]), "rule[0].expect"),
    (_set(["rule"], [{"match": {"offload": "balanced"}, "expect": "works"}]), "rule[0].match"),
    (_set(["rule"], [{"match": {"engine": "none"}, "expect": "error"}]), "rule[0].pattern"),
    (_set(["rule"], [{"match": {"engine": "none"}, "expect": "unavailable"}]), "rule[0].reason"),
    (_set(["rule"], [{"match": {"engine": "none"}, "expect": "works", "versions": {"torch": "~~2"}}]),
     "rule[0].versions.torch"),
    (_set(["exclude"], [{"engine": "none"}]), "axes"),
    (_set(["include"], [{"modle": "dit-xs"}]), "include[0].modle"),
    (_set(["rule"], "not a table"), "rule"),
    (_set(["rule"], [{"match": {"engine": "none"}, "expect": "works", "claims": ["smallr"]}]), "rule[0].claims"),
    (_set(["rule"], [{"match": {"engine": "none"}, "expect": "error", "pattern": "x", "claims": ["smaller"]}]),
     "rule[0].claims"),
    (_set(["rule"], [{"match": {"engine": "none"}, "expect": "works", "claims": "slower", "tolerance": 1.5}]),
     "rule[0].tolerance"),
    (_set(["rule"], [{"match": {"engine": "none"}, "expect": "works", "claims": ["slower", "slower"]}]),
     "rule[0].claims"),
    (_set(["axes", "stack"], ["diffuser"]), "axes.stack"),
    (_set(["axes", "cast"], ["fp8"]), "axes.cast"),
    (_set(["offload"], {"group": {"type": "leaf"}}), "offload.group.type"),
    (_set(["offload"], {"group": {"blocks_per_group": 0}}), "offload.group.blocks_per_group"),
    (_set(["offload"], {"group": {"use_stream": "yes"}}), "offload.group.use_stream"),
    (_set(["offload"], {"group": {"streams": True}}), "offload.group.streams"),
    (_set(["rule"], [{"match": {"engine": "none"}, "expect": "works", "section": "Errors"}]), "rule[0].section"),
    (_set(["rule"], [{"match": {"engine": "none"}, "expect": "works", "statement": ["x"]}]), "rule[0].statement"),
    (_set(["document"], {"url": "https://example.org"}), "document.title"),
    (_set(["rule"], [{"match": {"engine": "none"}, "expect": "works", "claims": ["smaller-by:0.5"]}]),
     "rule[0].claims"),
    (_set(["document"], {"title": "Quantization", "sections": ["Errors", "Errors"]}), "document.sections"),
    (_set(["document"], {"title": "Quantization", "pages": 2}), "document.pages"),
    (_set(["document"], {"title": "Quantization", "removed": ["bitsandbytes"], "removed_in": "2026-04-01"}),
     "document.removed"),
    (_set(["document"], {"title": "Quantization", "removed": ["bnb"]}), "document.removed_in"),
    (_set(["rule"], [{"match": {"engine": "none"}, "expect": "works", "claims": ["slower"], "statement": "x",
                      "judges": {"claims": ["smaller"]}}]), "rule[0].judges.claims"),
    (_set(["rule"], [{"match": {"engine": "none"}, "expect": "works", "statement": "x",
                      "judges": {"offload": "sequentail"}}]), "rule[0].judges.offload"),
    (_set(["rule"], [{"match": {"engine": "none"}, "expect": "works", "judges": {"offload": "none"}}]),
     "rule[0].judges"),
]


@given(st.sampled_from(MISTAKES), st.randoms())
@settings(max_examples=200, deadline=None)
def test_every_mistake_raises_our_error_naming_the_key(mistake, rnd):
    mutate, key = mistake
    doc = copy.deepcopy(BASE)
    if rnd.random() < 0.5:
        doc["axes"]["offload"] = ["none", "model", "sequential"]
    doc = mutate(doc)
    with pytest.raises(QuantMatrixError) as err:
        parse_matrix(dumps(doc), "bad.toml")
    assert f"[{key}]" in str(err.value)
    assert "bad.toml" in str(err.value)
    found = re.match(r"bad\.toml:(\d+) \[", str(err.value))  # the line where the mistake is written
    assert found, str(err.value)
    line = dumps(doc).splitlines()[int(found.group(1)) - 1]
    leaf = re.findall(r"[A-Za-z_]+", key)
    assert any(name in line for name in leaf), (str(err.value), line)


@given(st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_arbitrary_text_never_escapes_as_another_exception(text):
    try:
        parse_matrix(text, "fuzz.toml")
    except QuantMatrixError as exc:
        assert "fuzz.toml" in str(exc)


def test_unknown_offload_name_suggests_the_nearest():
    doc = _set(["axes", "offload"], ["sequentail"])(copy.deepcopy(BASE))
    with pytest.raises(QuantMatrixError, match="did you mean 'sequential'"):
        parse_matrix(dumps(doc), "m.toml")


def test_an_unknown_qtype_names_the_types_of_the_engines_given_and_never_the_test_only_engines():
    doc = _set(["axes", "engine"], ["quanto"])(_set(["axes", "qtype"], ["qint5"])(copy.deepcopy(BASE)))
    with pytest.raises(QuantMatrixError) as err:
        parse_matrix(dumps(doc), "m.toml")
    assert "unknown qtype 'qint5' (did you mean 'qint8'?); expected a type of quanto: qint8, qint4, qint2, qfloat8" \
        in str(err.value)
    anyone = _set(["axes", "engine"], ["*"])(doc)
    with pytest.raises(QuantMatrixError) as err:
        parse_matrix(dumps(anyone), "m.toml")
    named = set(re.findall(r"'(\w+)'", str(err.value)))
    assert "nf4" in named and not {"segfault", "orphan", "slow"} & named


def test_toml_syntax_error_names_the_line():
    with pytest.raises(QuantMatrixError, match=r"m\.toml:3: TOML syntax error"):
        parse_matrix('[axes]\nengine = ["none"]\nqtype = [\n', "m.toml")


def test_first_matching_rule_decides_and_versions_limit_it():
    doc = copy.deepcopy(BASE)
    doc["rule"] = [
        {"match": {"offload": "model"}, "expect": "error", "pattern": "boom", "versions": {"torch": "<1.0"}},
        {"match": {"offload": "model"}, "expect": "error", "pattern": "bang", "source": "seed: Errors"},
        {"match": {"engine": "none"}, "expect": "works"},
    ]
    matrix = parse_matrix(dumps(doc), "m.toml")
    model_cell = next(c for c in matrix.cells if c.offload == "model")
    none_cell = next(c for c in matrix.cells if c.offload == "none")
    assert matrix.expectation(model_cell, {"torch": "2.13.0"}).pattern == "bang"
    assert matrix.expectation(model_cell, {"torch": "0.4.1"}).pattern == "boom"
    assert matrix.expectation(none_cell, {"torch": "2.13.0"}).kind == "works"


def test_a_rule_may_name_an_engine_by_its_package_and_an_unknown_name_is_refused():
    """Records note engines by name ("bnb"); a rule naming the distribution ("bitsandbytes") means the same one, and
    a name that is neither (a typo, a package no record notes) would never hold, so it is one clear line instead."""
    doc = copy.deepcopy(BASE)
    doc["rule"] = [{"match": {"offload": "model"}, "expect": "error", "pattern": "boom",
                    "versions": {"bitsandbytes": ">=0.50"}}]
    matrix = parse_matrix(dumps(doc), "m.toml")
    model_cell = next(c for c in matrix.cells if c.offload == "model")
    assert matrix.expectation(model_cell, {"bnb": "0.50.2"}).pattern == "boom"
    assert matrix.expectation(model_cell, {"bnb": "0.45.0"}).kind == "works"
    doc["rule"][0]["versions"] = {"bitsandbites": ">=0.50"}
    with pytest.raises(QuantMatrixError, match=r"m\.toml:\d+ \[rule\[0\]\.versions\.bitsandbites\]: unknown; "
                                               r"expected an engine or its package \(.*bitsandbytes.*\) or one of "
                                               r"torch"):
        parse_matrix(dumps(doc), "m.toml")


def test_star_leaves_out_test_only_engines_and_present_means_this_host():
    doc = copy.deepcopy(BASE)
    doc["axes"].update(engine=["*"], device=["present"])
    matrix = parse_matrix(dumps(doc), "m.toml", present_devices=("cpu", "cuda"))
    assert {c.engine for c in matrix.cells} == {name for name, e in ENGINES.items() if not e.hidden}
    assert "fault" not in {c.engine for c in matrix.cells}
    assert {c.device for c in matrix.cells} == {"cpu", "cuda"}


def test_shipped_matrices_load(tmp_path):
    from pathlib import Path

    from harness.matrix import load_matrix

    for path in sorted(Path(__file__).parents[1].glob("matrices/*.toml")):
        assert load_matrix(path, present_devices=("cpu",)).cells


def test_cells_with_claims_bring_their_baseline_first():
    doc = copy.deepcopy(BASE)
    doc["axes"]["engine"] = ["none", "gguf"]
    doc["axes"]["qtype"] = ["Q8_0"]
    doc["rule"] = [{"match": {"engine": "gguf", "offload": "none"}, "expect": "works", "claims": ["smaller"]}]
    matrix = parse_matrix(dumps(doc), "claims.toml")
    gguf = [c for c in matrix.cells if c.engine == "gguf"]
    ordered = matrix.with_baselines(gguf)  # e.g. `--engine gguf`: the baseline is filtered out, claims need it
    assert [c.id for c in ordered] == ["none/post-load/none/cpu/dit-xs/float32/direct",
                                       "gguf-Q8_0/post-load/model/cpu/dit-xs/float32/direct",
                                       "gguf-Q8_0/post-load/none/cpu/dit-xs/float32/direct"]
    assert matrix.expectation(gguf[1]).claims == ("smaller",) and matrix.expectation(gguf[1]).rule == 0


@given(mistake=st.sampled_from(MISTAKES))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_cli_validate_exits_2_with_one_line_and_no_traceback(mistake, tmp_path_factory):
    """What a user sees: `quantmatrix validate bad.toml` prints one line naming the file, line and key; exit 2."""
    import contextlib
    import io

    from harness.cli import main

    mutate, key = mistake
    path = tmp_path_factory.mktemp("cli") / "bad.toml"
    path.write_text(dumps(mutate(copy.deepcopy(BASE))))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(["validate", str(path)]) == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err.getvalue()
    assert re.match(rf"quantmatrix: error: {re.escape(str(path))}:\d+ \[{re.escape(key)}\]: ", lines[0]), lines[0]


def test_the_diffusers_stack_expands_to_the_real_model_classes_and_casting_to_it():
    doc = copy.deepcopy(BASE)
    doc["axes"].update(model=["dit-xs", "flux-tiny"], stack=["direct", "diffusers"], cast=["-", "float8_e4m3fn"])
    cells = parse_matrix(dumps(doc), "stacks.toml").cells
    assert {(c.model, c.stack, c.cast) for c in cells} == {
        ("dit-xs", "direct", "-"), ("flux-tiny", "direct", "-"), ("flux-tiny", "diffusers", "-"),
        ("flux-tiny", "diffusers", "float8_e4m3fn")}
    without = copy.deepcopy(BASE)  # files from before the stack axis: direct, no casting
    assert {(c.stack, c.cast) for c in parse_matrix(dumps(without), "old.toml").cells} == {("direct", "-")}


def test_a_cell_id_names_its_stack_and_old_ids_read_as_direct():
    cell = Cell("gguf", "Q8_0", "prequantized", "sequential", "cpu", "flux-tiny", "float32", "diffusers",
                "float8_e4m3fn")
    assert cell.id == "gguf-Q8_0/prequantized/sequential/cpu/flux-tiny/float32/diffusers+float8_e4m3fn"
    assert Cell.from_id(cell.id) == cell
    old = Cell.from_id("none/post-load/none/cpu/dit-xs/float32")
    assert (old.stack, old.cast) == ("direct", "-") and old.id == "none/post-load/none/cpu/dit-xs/float32/direct"
    assert cell.baseline.cast == "-" and cell.baseline.stack == "diffusers"  # compared with the uncast float model
    assert cell.control.stack == "direct"


def test_group_offload_settings_are_read_with_sdnext_defaults():
    doc = copy.deepcopy(BASE)
    assert parse_matrix(dumps(doc), "g.toml").settings.group_type == "leaf_level"
    doc["offload"] = {"group": {"type": "block_level", "blocks_per_group": 2, "use_stream": True}}
    s = parse_matrix(dumps(doc), "g.toml").settings
    assert (s.group_type, s.group_blocks, s.group_stream, s.group_low_cpu_mem) == ("block_level", 2, True, False)
