"""The pytest plugin: matrix cells as test items, run isolated, judged, recorded.

    pytest -m matrix [--matrix FILE] [--engine E,...] [--device D,...] [--offload O,...] [--results FILE]

Each cell is one parametrization of the generic test in tests/test_matrix.py, with the cell id as its test id,
so `-k 'nf4 and sequential'` selects cells. A record is appended to the results file as each cell ends. Here: the
options, the run's identity, collection, the status letters, the summary and signals; running and recording a
cell is session.py's, the pytest-xdist wiring workers.py's.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from harness.cell import AXES, Cell
from harness.errors import QuantMatrixError, did_you_mean, positive
from harness.matrix import MAX_CELLS, Matrix, load_matrix, select
from harness.run.session import IDS_KEY, MatrixRun, environment
from harness.run.workers import pytest_configure_node  # noqa: F401  (a hook: pluggy finds it here)
from harness.stacks.catalog import packages_needed
from harness.verdict import Verdict

DEFAULT_MATRIX = "matrices/default.toml"
_matrix_key = pytest.StashKey[Matrix]()
_run_key = pytest.StashKey[MatrixRun]()
_nothing_key = pytest.StashKey[str]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("quantmatrix", "quantization compatibility matrix (run with -m matrix)")
    group.addoption("--matrix", default=None, metavar="FILE",
                    help=f"matrix file to expand into cells (default: {DEFAULT_MATRIX})")
    for axis in AXES:
        if axis.option:
            group.addoption(f"--{axis.name}", action="append", default=None, metavar="NAME[,NAME]",
                            help=f"only cells with this {axis.help} (repeatable, comma-separated)")
    group.addoption("--results", default=None, metavar="FILE",
                    help="results file to append records to (default: results/<run>.jsonl, or the --resume file)")
    group.addoption("--resume", default=None, metavar="FILE",
                    help="skip the cells FILE already records with this environment (an interrupted run goes on "
                         "where it stopped, under its run id)")
    group.addoption("--drift", choices=("fail", "warn"), default="fail",
                    help="whether documentation drift fails the cell (default) or only warns")
    group.addoption("--max-cells", type=positive(int), default=MAX_CELLS, metavar="N",
                    help=f"refuse a matrix that expands to more cells (default {MAX_CELLS:,})")
    group.addoption("--cell-timeout", type=positive(float), default=None, metavar="S",
                    help="per-cell timeout in seconds (default: the matrix's settings.cell_timeout_s)")
    group.addoption("--memory-limit", type=positive(int, zero=True), default=None, metavar="MB",
                    help="per-cell memory cap for CPU cells (default: the matrix's settings.memory_limit_mb)")


def _matrix_run_requested(config: pytest.Config) -> bool:
    return "matrix" in (config.option.markexpr or "").replace("not matrix", "") or \
        config.getoption("matrix") is not None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "matrix: a cell of the quantization matrix (select with -m matrix)")
    if _matrix_run_requested(config) and not hasattr(config, "workerinput"):
        _matrix(config)  # a broken matrix file stops the run here: one line, exit status 4 (pytest's usage error)
    worker = getattr(config, "workerinput", None)
    if worker is not None and "quantmatrix_run" in worker:  # a pytest-xdist worker: the controller decided
        os.environ.update(json.loads(worker["quantmatrix_pin"]))  # before anything asks for a device
        config.stash[IDS_KEY] = (worker["quantmatrix_run"], Path(worker["quantmatrix_results"]))
    else:
        config.stash[IDS_KEY] = _run_identity(config)


def _run_identity(config: pytest.Config) -> tuple[str, Path]:
    """The run id and results file: new ones, or those of the run being resumed."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    results = config.getoption("results")
    resume = config.getoption("resume")
    if resume:
        from harness.results import environment_key, read_records

        path = Path(resume)
        if not path.is_file():
            raise pytest.UsageError(f"--resume {resume}: no such results file")
        records, _ = read_records(path)
        key = environment_key(environment(config)[0])
        same = [r for r in records if environment_key(r["env"]) == key]
        if same:
            return same[-1]["run"], Path(results or path)
        return f"{stamp}-{socket.gethostname()}", Path(results or path)
    where = config.invocation_params.dir  # where the user ran pytest, whatever rootdir pytest picked
    return f"{stamp}-{socket.gethostname()}", Path(results or Path(where, "results", f"{stamp}.jsonl"))


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """`pytest -m matrix` selects only the matrix's cells: skip importing the harness's own test modules (they
    import pandas, matplotlib, playwright: seconds before the first cell)."""
    if (config.option.markexpr or "").strip() == "matrix" and collection_path.suffix == ".py" and \
            collection_path.name.startswith("test_") and collection_path.name != "test_matrix.py":
        return True
    return None


def _matrix(config: pytest.Config) -> Matrix:
    if _matrix_key not in config.stash:
        path = Path(config.getoption("matrix") or _default_matrix(config))
        try:
            from harness.devices import present_devices

            matrix = load_matrix(path, present_devices=present_devices(), max_cells=config.getoption("max_cells"))
        except QuantMatrixError as exc:  # "file:line [key]: what is wrong", printed by pytest as one ERROR line
            raise pytest.UsageError(str(exc)) from None
        overrides = {k: v for k, v in (("cell_timeout_s", config.getoption("cell_timeout")),
                                       ("memory_limit_mb", config.getoption("memory_limit"))) if v is not None}
        config.stash[_matrix_key] = replace(matrix, settings=replace(matrix.settings, **overrides))
        _check_filters(config, config.stash[_matrix_key])
    return config.stash[_matrix_key]


def _check_filters(config: pytest.Config, matrix: Matrix) -> None:
    """Each filter value must be a known value of its axis: one line with the nearest name otherwise."""
    for axis in (a for a in AXES if a.option):
        for value in _wanted(config, axis.name) or ():
            if value not in axis.known():
                raise pytest.UsageError(f"--{axis.name} {value}: not a known {axis.help}"
                                        f"{did_you_mean(value, axis.known())}")


def _default_matrix(config: pytest.Config) -> Path:
    """matrices/default.toml of the folder pytest runs in, else of the checkout this package runs from."""
    here = Path(config.invocation_params.dir, DEFAULT_MATRIX)
    return here if here.exists() else Path(__file__).resolve().parents[2] / DEFAULT_MATRIX


def _wanted(config: pytest.Config, axis: str) -> list[str] | None:
    raw = config.getoption(axis)
    return [v for item in raw for v in item.split(",") if v] if raw else None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cell" not in metafunc.fixturenames:
        return
    config = metafunc.config
    matrix = _matrix(config)
    filters = {a.name: _wanted(config, a.name) for a in AXES if a.option}
    cells = matrix.with_baselines(select(matrix.cells, **filters))
    if not cells:  # nothing to run: said once, in the summary (an empty parametrization is no cell)
        asked = " ".join(f"--{k} {','.join(v)}" for k, v in filters.items() if v)
        config.stash[_nothing_key] = f"0 cells: {asked} selects none of the {len(matrix.cells)} cells of {matrix.path}"
        metafunc.parametrize("cell", [], ids=[])
        return
    metafunc.parametrize("cell", cells, ids=[c.id for c in cells])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A filter that selects no cell runs nothing (pytest would otherwise run one empty-parameter-set item)."""
    empty = [i for i in items if "cell" in getattr(getattr(i, "callspec", None), "params", {})
             and not isinstance(i.callspec.params["cell"], Cell)]
    if empty:
        config.hook.pytest_deselected(items=empty)
        items[:] = [i for i in items if i not in empty]


# An engine is preloaded by the cell server when this many of the session's cells use it: its import (seconds)
# is paid once per server instead of once per cell; for fewer cells, preloading in every xdist worker costs more.
PRELOAD_FROM_CELLS = 3


def pytest_collection_finish(session: pytest.Session) -> None:
    """The cell server preloads the engines that enough of this session's cells use (importing all of them takes
    ~10 s; the smoke matrix has one cell each of bnb and quanto), and starts before the first cell."""
    cells = [item.callspec.params["cell"] for item in session.items
             if hasattr(item, "callspec") and "cell" in item.callspec.params]
    engines = Counter(c.engine for c in cells)
    # diffusers, for its stack, its model classes and group offload
    engines["diffusers"] = sum("diffusers" in packages_needed(c) for c in cells)
    if cells:
        os.environ["QUANTMATRIX_PRELOAD"] = ",".join(sorted(e for e, n in engines.items() if n >= PRELOAD_FROM_CELLS))
        if not session.config.option.collectonly:
            from harness.run.pool import share_compile_caches

            share_compile_caches(_workdir(session.config))  # before the cell server and pool start: they inherit it
        if not session.config.pluginmanager.hasplugin("dsession") and not session.config.option.collectonly:
            from harness.run.isolation import warm_up

            warm_up()


@pytest.fixture(scope="session")
def matrix_run(request: pytest.FixtureRequest) -> MatrixRun:
    config = request.config
    if _run_key not in config.stash:
        config.stash[_run_key] = MatrixRun(config, _matrix(config), _workdir(config))
    return config.stash[_run_key]


def _workdir(config: pytest.Config) -> Path:
    """The run's shared files (references, checkpoints, pre-quantized files, compile caches). xdist workers share
    the controller's base temp directory: one set for the run."""
    base = config._tmp_path_factory.getbasetemp()
    workdir = (base.parent if hasattr(config, "workerinput") else base) / "quantmatrix-work"
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


@pytest.hookimpl(tryfirst=True)
def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config):
    verdict = dict(report.user_properties).get("verdict") if report.when == "call" else None
    if verdict is None:
        return None
    letter = {Verdict.OK: ".", Verdict.DOCUMENTED_ERROR: "d", Verdict.UNAVAILABLE: "s"}.get(Verdict(verdict), "F")
    if Verdict(verdict).is_drift and report.passed:
        letter = "w"
    return report.outcome, letter, verdict.upper()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Verdict counts and the per-rule summary, read back from this run's records (also those of xdist workers)."""
    if hasattr(config, "workerinput") or IDS_KEY not in config.stash:
        return
    from harness.results import read_records
    from harness.run.summary import rule_lines, verdict_counts

    if _nothing_key in config.stash:
        terminalreporter.write_line(f"quantmatrix: {config.stash[_nothing_key]}")
    run_id, results = config.stash[IDS_KEY]
    if not results.exists():
        return
    records = [r for r in read_records(results)[0] if r["run"] == run_id]
    if not records:
        return
    tr = terminalreporter
    tr.section("quantmatrix")
    counts = verdict_counts(records)
    for verdict in Verdict:
        if counts[verdict.value]:
            tr.write_line(f"  {verdict.value:<18}{counts[verdict.value]:>6}")
    tr.write_line(f"  {'records':<18}{sum(counts.values()):>6}  (run {run_id})")
    tr.write_line(f"results: {results}")
    matrix = _matrix(config)
    if matrix.rules:
        versions = environment(config)[1]
        tr.section(f"documented behaviour: the rules of {matrix.path.name}", sep="-")
        for line in rule_lines(matrix, versions, records):
            tr.write_line(line)


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_sessionstart(session: pytest.Session) -> None:
    # SIGTERM (CI cancelling a job) stops the run like Ctrl-C: the running cell is recorded as interrupted.
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
