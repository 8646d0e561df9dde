"""Result records: schema, whole-line appends from concurrent writers, torn lines skipped."""

import json
import multiprocessing

import pytest

from harness.cell import Cell
from harness.matrix import Expectation
from harness.results import ResultsWriter, environment, environment_key, make_record, read_records, validate_record
from harness.verdict import ErrorInfo, Outcome, Verdict

CELL = Cell("none", "-", "post-load", "none", "cpu", "dit-xs", "float32")
METRICS = {"param_bytes": 10, "disk_bytes": 10, "bits_per_weight": 32.0, "peak_mem_bytes": 5, "mem_base_bytes": 1,
           "mem_kind": "rss", "latency_ms": {"median": 1.0, "p10": 0.9, "p90": 1.2, "n": 5, "warmup": 2},
           "quantize_s": 0.0, "load_s": 0.1, "sqnr_db": None, "cosine": 1.0, "max_abs_error": 0.0}


def record(i=0, verdict=Verdict.OK, outcome=None):
    outcome = outcome or Outcome("ran", metrics=dict(METRICS))
    return make_record(f"run{i}", CELL, Expectation(), verdict, "n", outcome, environment({"none": "x"}),
                       "2026-01-01T00:00:00+00:00", 1.0)


def test_a_complete_record_validates_and_a_broken_one_does_not():
    assert validate_record(record()) == []
    bad = record()
    bad["metrics"]["cosine"] = None
    assert validate_record(bad) == ["metrics.cosine is null"]
    assert validate_record({**record(), "schema": 99}) == ["schema is 99, expected 1"]
    assert validate_record({**record(), "cell": {**CELL.as_dict(), "engine": ["none"]}}) == [
        "cell: expected an object of strings (engine, qtype, load, offload, device, model, dtype, ...)"]
    assert validate_record({**record(), "cell": {**CELL.as_dict(), "colour": "red"}})[0].startswith(
        "cell.colour: no such axis")
    assert validate_record({**record(), "id": "none/x"}) == [f"id 'none/x' does not match cell {CELL.id!r}"]
    failed = record(verdict=Verdict.FAIL, outcome=Outcome("error", error=ErrorInfo("E", "m")))
    assert validate_record(failed) == []


@pytest.mark.parametrize("field, value, problem", [
    ("dtype", "float32; __import__('os').system('touch x')", "cell.dtype: \"float32; __import__('os').system"),
    ("engine", "bnbx", "cell.engine: 'bnbx' is not a known engine"),
    # a model name no matrix could give (a user's own model, [models.NAME], is a plain lowercase name)
    ("model", "flux;import os", "cell.model: 'flux;import os' is not a known model"),
    ("model", "Flux-9000", "cell.model: 'Flux-9000' is not a known model"),
    ("qtype", "nf4", "cell.qtype: 'nf4' is not a type of engine 'none'"),  # a type of another engine
])
def test_a_cell_value_its_axis_does_not_know_is_refused(field, value, problem):
    """Records are untrusted input: a cell value must be a value of its axis, a type one of its engine's."""
    bad = record()
    bad["cell"][field] = value
    bad["id"] = Cell(**bad["cell"]).id  # the id made to match, as a crafted record would
    problems = validate_record(bad)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


@pytest.mark.parametrize("change, problem", [
    ({"error": "boom"}, "error: expected an object or null, got str"),
    ({"env": "linux"}, "env: expected an object, got str"),
    ({"expect": ["works"]}, "expect: expected an object, got list"),
    ({"claims": ["x"]}, "claims[0]: expected an object with a string claim and status"),
    ({"started": 12345}, "started: expected a string, got int"),
    ({"run": None}, "run: expected a string, got NoneType"),
    ({"note": ["n"]}, "note: expected a string or null, got list"),
    ({"warnings": [1]}, "warnings: expected a list of strings"),
    ({"error": {"type": "E", "message": {"m": 1}}}, "error.message: expected a string or null, got dict"),
    ({"env": {"torch": "t", "python": "p", "host": "h", "engines": "none"}},
     "env.engines: expected an object of version strings"),
    ({"metrics": {**METRICS, "latency_ms": [1.0]}}, "metrics.latency_ms: expected an object, got list"),
])
def test_a_field_of_another_type_is_named(change, problem):
    """Each wrongly typed field is one named problem (before, each ended `report`, `compare`, `repro` in a
    traceback)."""
    assert problem in validate_record({**record(), **change})


@pytest.mark.parametrize("change, problem", [
    ({"bits_per_weight": -21.428}, "metrics.bits_per_weight is -21.428, expected above 0"),  # the old Conv2d bug
    ({"bits_per_weight": 33.0}, "metrics.bits_per_weight is 33.0, expected at most 32"),  # above float32's width
    ({"param_bytes": -4}, "metrics.param_bytes is -4, expected at least 0"),
    ({"latency_ms": {"median": float("nan"), "p10": 0.9, "p90": 1.2, "n": 5}},
     "metrics.latency_ms.median is nan, expected a finite number"),
    ({"cosine": 1.5}, "metrics.cosine is 1.5, expected at most 1"),
    ({"sqnr_db": float("inf")}, "metrics.sqnr_db is inf, expected a finite number"),
    ({"components": {"unet": {"bits_per_weight": -3.0, "bytes": 10}}},
     "metrics.components.unet.bits_per_weight is -3.0, expected above 0"),
    ({"latency_vs_float": {"ratio": 2.0, "lo": 2.5, "hi": 3.0, "n": 5, "float_ms": 1.0}},
     "metrics.latency_vs_float: ratio 2.0 outside its interval 2.5-3.0"),
])
def test_validate_record_rejects_impossible_figures(change, problem):
    """What was read back from a file as written (json keeps NaN and infinity): each impossible figure named."""
    bad = json.loads(json.dumps(record()))
    bad["metrics"].update(change)
    assert validate_record(bad) == [problem]


def test_a_record_with_an_impossible_figure_is_a_harness_failure_and_is_not_written():
    from harness.run.session import HarnessFailure, publishable

    bad = record()
    bad["metrics"]["bits_per_weight"] = -21.428
    with pytest.raises(HarnessFailure, match=r"harness failure, record not written: metrics.bits_per_weight is -21"):
        publishable(bad)
    good = record()
    assert publishable(good) is good


def test_a_session_writes_no_record_of_an_impossible_figure(tmp_path, monkeypatch):
    """Through the run's own MatrixRun: a cell whose process reports an impossible figure (bits per weight above its
    dtype's width) fails as a harness failure, and its results file stays empty."""
    from harness.matrix import Matrix
    from harness.run.session import HarnessFailure, MatrixRun
    from harness.settings import Settings

    session = object.__new__(MatrixRun)  # the run's own class without pytest's config: its state set here
    session.id, session.results = "run-x", tmp_path / "r.jsonl"
    session.writer = ResultsWriter(session.results)
    session.matrix = Matrix(tmp_path / "m.toml", "m", (CELL,), (), Settings())
    session.env, session.versions, session.measured, session.done = environment({"none": "x"}), {}, {}, {}
    monkeypatch.setattr(session, "_execute", lambda cell: Outcome("ran", metrics={**METRICS, "bits_per_weight": 64.0}))
    with pytest.raises(HarnessFailure, match="bits_per_weight is 64"):
        session.run(CELL)
    assert not session.results.exists() or session.results.read_text() == ""


def test_no_committed_record_holds_an_impossible_figure():
    from conftest import REFERENCE

    for path in sorted(REFERENCE.glob("*.jsonl*")):
        records, skipped = read_records(path)
        assert not skipped, path
        for r in records:
            assert validate_record(r) == [], (path.name, r["id"])


def test_only_a_load_that_quantizes_inside_diffusers_may_leave_quantize_s_null():
    untimed = Outcome("ran", metrics={**METRICS, "quantize_s": None})
    assert validate_record(record(outcome=untimed)) == ["metrics.quantize_s is null"]  # direct post-load times it
    inside = Cell("none", "-", "on-the-fly", "none", "cpu", "flux-tiny", "float32", stack="diffusers")
    r = make_record("run", inside, Expectation(), Verdict.OK, "n", untimed, environment({"none": "x"}),
                    "2026-01-01T00:00:00+00:00", 1.0)
    assert validate_record(r) == []


def test_a_resumed_run_continues_only_with_the_same_versions_of_the_stack():
    env = environment({"none": "x"})
    assert environment_key(env) == environment_key(dict(env, device_name="another GPU"))  # per cell, not per run
    for key, other in (("diffusers", "0.1.0"), ("accelerate", "0.1.0"), ("torch", "1.0"), ("cuda_capability", "7.0")):
        assert environment_key(env) != environment_key(dict(env, **{key: other})), key


def test_non_finite_numbers_become_null():
    r = record(outcome=Outcome("ran", metrics={**METRICS, "cosine": float("nan")}))
    assert r["metrics"]["cosine"] is None
    json.dumps(r, allow_nan=False)


def _write_many(path, worker):
    writer = ResultsWriter(path)
    for i in range(50):
        rec = record(worker * 1000 + i)
        rec["note"] = "x" * 20_000  # lines well over the pipe/page size
        writer.append(rec)


def test_concurrent_writers_never_interleave(tmp_path):
    path = tmp_path / "r.jsonl"
    procs = [multiprocessing.get_context("spawn").Process(target=_write_many, args=(path, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    records, skipped = read_records(path)
    assert skipped == [] and len(records) == 200
    assert len({r["run"] for r in records}) == 200


def test_a_torn_last_line_is_skipped_and_mended_by_the_next_append(tmp_path):
    path = tmp_path / "r.jsonl"
    writer = ResultsWriter(path)
    writer.append(record(1))
    with open(path, "a") as f:
        f.write(json.dumps(record(2))[:57])  # a writer died mid-line
    records, skipped = read_records(path)
    assert [r["run"] for r in records] == ["run1"] and len(skipped) == 1 and ":2:" in skipped[0]
    writer.append(record(3))
    records, skipped = read_records(path)
    assert [r["run"] for r in records] == ["run1", "run3"] and len(skipped) == 1
