"""The `quantmatrix` command.

    quantmatrix run [pytest options]      run the matrix (same as `pytest -m matrix` in a checkout)
    quantmatrix list [FILE]               print the cells a matrix expands to here, with their expected outcome
    quantmatrix validate FILE...          check matrix files; exit 2 with a clear message on the first mistake
    quantmatrix check MODEL [--memory 8GiB]   what works for a model on this machine, in what memory and time
    quantmatrix detect FILE...            print the engine and quant type found in model files' contents
                                          (exit 1 when a file's conventional name says otherwise, 2 when a
                                          file cannot be read: each file is reported)
    quantmatrix report RESULTS... -o DIR  the HTML report (index.html, grids.html, cells.csv, plots/) from records
    quantmatrix report RESULTS... --markdown [-o FILE]   the compatibility table as markdown
    quantmatrix report RESULTS... --doc-patch [--rules FILE] [-o FILE]   the page the rules state, as it should read
    quantmatrix report RESULTS... --upstream DIR   one markdown draft per failure no cited report covers
    quantmatrix report RESULTS... --wiki DIR   the page the rules state, edited from the records, and its diff
    quantmatrix compare OLD NEW           cells newly broken/fixed/drifted, latency and memory regressions;
                                          exit 1 when something regressed
    quantmatrix repro CELL_ID --results FILE [--matrix FILE] [-o OUT.py]   a standalone script (torch, diffusers,
                                          accelerate and the engine only) that reproduces the cell's record

Mistakes in input exit with status 2 and one message naming the file, the key and what was expected.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from harness.errors import QuantMatrixError, positive, printable
from harness.launch import CHECKOUT, matrix_pytest_args


def _run(args: argparse.Namespace, rest: list[str]) -> int:
    import pytest

    if "-h" in rest or "--help" in rest:  # the harness's own options first, not at line 450 of pytest's help
        print(run_help())
        return 0
    return int(pytest.main(matrix_pytest_args(rest)))


def run_help() -> str:
    """`quantmatrix run --help`: the run's options, one per axis from the axis registry."""
    from harness.cell import AXES

    axes = "".join(f"  --{a.name + ' NAME[,NAME]':<23}only cells with this {a.help}\n" for a in AXES if a.option)
    return RUN_HELP.format(axes=axes)


RUN_HELP = """usage: quantmatrix run [options] [pytest options]

Runs the matrix through pytest (the same as `pytest -m matrix`); one test per cell, one record per cell.

options:
  --matrix FILE            matrix file (default matrices/default.toml)
{axes}                           (each repeatable, comma-separated)
  --results FILE           append records here (default results/<timestamp>.jsonl)
  --resume FILE            skip the cells FILE already records with this environment
  --drift fail|warn        whether documentation drift fails the run (default fail)
  --cell-timeout S         per-cell timeout (default: the matrix's settings.cell_timeout_s)
  --max-cells N            refuse a matrix that expands to more cells (default 100,000)
  --memory-limit MB        per-cell memory cap for CPU cells
  -k EXPR                  cells by id, e.g. -k 'nf4 and sequential'
  -n N                     N pytest-xdist workers (one device each on a GPU box)
  --splits N --group I     run shard I of N (pytest-split)

Every other option goes to pytest (`pytest --help` lists them)."""


def _list(args: argparse.Namespace, rest: list[str]) -> int:
    from harness.devices import present_devices
    from harness.matrix import load_matrix
    from harness.run.session import host_environment

    here = present_devices()
    matrix = load_matrix(args.file, present_devices=here, max_cells=args.max_cells)
    cells = [c for c in matrix.cells if args.all_devices or c.device in here]
    versions = host_environment()[1]  # a rule on versions this host does not have does not decide here
    width = max([len(c.id) for c in cells] + [4])
    print(f"{'cell':<{width}}  expected here (documented outcome, not a result)")
    for cell in cells:
        expect = matrix.expectation(cell, versions)
        print(f"{cell.id:<{width}}  {expect.kind}" + (f" /{expect.pattern}/" if expect.pattern else "")
              + (f" ({expect.reason})" if expect.reason else ""))
    other = len(matrix.cells) - len(cells)
    print(f"{len(cells)} cells" + ("" if args.all_devices else f" on this host ({', '.join(here)})")
          + (f"; {other} more on devices it lacks (--all-devices lists them)" if other else ""), file=sys.stderr)
    return 0


def _validate(args: argparse.Namespace, rest: list[str]) -> int:
    from harness.matrix import load_matrix

    for path in args.files:
        matrix = load_matrix(path, max_cells=args.max_cells)
        print(f"{path}: ok, {len(matrix.cells)} cells, {len(matrix.rules)} rules")
    return 0


def _check(args: argparse.Namespace, rest: list[str]) -> int:
    from harness import check

    budget = check.memory_size(args.memory) if args.memory else None
    return check.run(args.model, device=args.device, budget=budget,
                     results=Path(args.results) if args.results else None, workers=args.workers)


def _detect(args: argparse.Namespace, rest: list[str]) -> int:
    from harness.engines.base import IMPORT_LOG, output_to
    from harness.stacks.loading import check_name, detect

    disagree = unreadable = 0
    for path in args.files:  # each file reported, a bad one as one line: the others still are
        try:
            with output_to(IMPORT_LOG):  # what the engines print when imported is not for this terminal
                engine, qtype = detect(path)
                hint, detail = check_name(path, (engine, qtype))
        except QuantMatrixError as exc:
            print(f"quantmatrix: error: {printable(exc)}", file=sys.stderr)
            unreadable += 1
            continue
        print(printable(f"{path}: engine={engine} qtype={qtype}")
              + (f"  (name {hint}: {printable(detail)})" if hint != "no hint" else ""))
        disagree += hint == "disagrees"
    return 2 if unreadable else 1 if disagree else 0


def _emit(text: str, output: str | None, what: str, inputs: list[Path] = ()) -> int:
    """Write `text` to the file `output`, or to stdout."""
    if output:
        write_file(Path(output), text + "\n", inputs)
        print(f"{what}: {output}")
    else:
        print(text)
    return 0


def _not_an_input(path: Path, inputs: list[Path]) -> None:
    """An output is never one of the command's input files (`report r.jsonl --markdown -o r.jsonl`)."""
    for given in inputs:
        if path.exists() and given.exists() and os.path.samefile(path, given):
            raise QuantMatrixError(f"is an input of this command ({given}); an output never writes over one",
                                   path=path)


def write_file(path: Path, text: str, inputs: list[Path] = ()) -> None:
    """Write an output file: one line naming it for each problem (an input, a folder, a missing folder, no
    permission), never a traceback."""
    _not_an_input(path, inputs)
    if path.is_dir():
        raise QuantMatrixError("is a folder; expected a file to write", path=path)
    if not path.parent.is_dir():
        raise QuantMatrixError(f"cannot write: no folder {str(path.parent)!r}", path=path)
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise QuantMatrixError(f"cannot write: {exc.strerror}", path=path) from None


def _output_folder(path: Path, inputs: list[Path]) -> Path:
    """A folder the command writes into: made if missing; one line if it is a file, under a file or not
    writable. What the command writes there never overwrites an input."""
    _not_an_input(path, inputs)
    if path.exists() and not path.is_dir():
        raise QuantMatrixError("is a file; expected a folder to write the report into", path=path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QuantMatrixError(f"cannot make the folder: {exc.strerror}", path=path) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise QuantMatrixError("cannot write into the folder: permission denied", path=path)
    for given in inputs:  # e.g. `report cells.csv`-named records into the folder that gets cells.csv
        if given.resolve().parent == path.resolve() and given.name in WRITTEN_NAMES:
            raise QuantMatrixError(f"holds the input {given.name}, which the report writes; choose another folder",
                                   path=path)
    return path


# what the report writes at its folder's top
WRITTEN_NAMES = ("index.html", "grids.html", "cells.js", "cells.csv", "doc-patch.md")


def _report(args: argparse.Namespace, rest: list[str]) -> int:
    from harness.matrix import load_matrix
    from harness.report import data as report_data

    records = report_data.load(args.results)
    inputs = [*args.results, *(args.previous or ())]
    rules = load_matrix(args.rules) if args.rules else None
    if rules is not None:
        inputs.append(Path(args.rules))
    if args.doc_patch:
        from harness.report import docpatch

        if rules is None or rules.document is None:
            print(f"quantmatrix report: --doc-patch needs a rules file with a [document] table; "
                  f"{args.rules or 'none given'} has none", file=sys.stderr)
            return 2
        if rules.document.page is None:  # no page kept to edit: the judgement of each statement
            return _emit(docpatch.render(rules, records), args.output, "doc patch", inputs)
        from harness.report import wikipage

        edited = wikipage.edit(rules.document, docpatch.assess(rules, records)).text
        return _emit(edited.rstrip("\n"), args.output, "doc patch", inputs)
    if args.wiki:
        from harness.report import docpatch, wikipage

        if rules is None or rules.document is None or rules.document.page is None:
            print(f"quantmatrix report: --wiki needs a rules file whose [document] names its page; "
                  f"{args.rules or 'none given'} has none", file=sys.stderr)
            return 2
        folder = _output_folder(Path(args.wiki), inputs)
        page = wikipage.edit(rules.document, docpatch.assess(rules, records))
        for path in _writing(wikipage.write, page, folder, rules.document):
            print(f"wiki: {path}")
        return 0
    if args.upstream:
        from harness.report import upstream

        folder = _output_folder(Path(args.upstream), inputs)
        print(upstream.summary(_writing(upstream.write_drafts, records, folder), folder))
        return 0
    if args.markdown:
        from harness.report.markdown import render

        return _emit(render(records), args.output, "markdown", inputs)
    from harness.report.html import build

    previous = report_data.load(args.previous) if args.previous else None
    folder = _output_folder(Path(args.output or CHECKOUT / "reports" / "latest"), inputs)
    index = _writing(build, records, folder, previous=previous, rules=rules, repro_limit=args.repro_limit)
    print(f"report: {index} ({len(records.frame)} records, {len(records.skipped)} skipped)"
          + ("" if len(records.frame) else ": no valid record"))
    return 0


def _writing(write, *args, **kwargs):
    """Run a writer of files; an OSError (a disk full, a file made read-only meanwhile) is one line naming it."""
    try:
        return write(*args, **kwargs)
    except OSError as exc:
        raise QuantMatrixError(f"cannot write: {exc.strerror}", path=exc.filename) from None


def _repro(args: argparse.Namespace, rest: list[str]) -> int:
    from harness import repro

    record = repro.find_record(args.cell, args.results)
    text = repro.script(record, repro.settings_of(args.matrix), settings_from=args.matrix or "")
    if args.output:
        write_file(Path(args.output), text, [*args.results, *([Path(args.matrix)] if args.matrix else [])])
        print(printable(f"repro of {record['id']} ({record['verdict']}, run {record['run']}): {args.output}"),
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _compare(args: argparse.Namespace, rest: list[str]) -> int:
    from harness.report import data as report_data
    from harness.report.compare import compare, render

    changes = compare(report_data.load([args.old]), report_data.load([args.new]), threshold=args.threshold)
    print(render(changes))
    return 1 if changes.regressed else 0


def _existing(path: str) -> Path:
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"no results file {path!r}")
    return Path(path)


def _max_cells(parser: argparse.ArgumentParser) -> None:
    from harness.matrix import MAX_CELLS

    parser.add_argument("--max-cells", type=positive(int), default=MAX_CELLS, metavar="N",
                        help=f"refuse a matrix that expands to more cells (default {MAX_CELLS:,})")


def _report_parser(sub) -> None:
    """`quantmatrix report`'s options."""
    p = sub.add_parser("report", help="build the HTML report (or --markdown) from results files")
    p.add_argument("results", nargs="+", type=_existing)
    p.add_argument("-o", "--output", help="directory of the HTML report (default reports/latest), or the markdown "
                                          "file (default: stdout)")
    p.add_argument("--markdown", action="store_true", help="write the compatibility table as markdown")
    p.add_argument("--previous", nargs="+", type=_existing, metavar="RESULTS",
                   help="earlier results: add a section of what changed since")
    p.add_argument("--upstream", metavar="DIR",
                   help="write one markdown draft of an upstream report per failure that no rule citing a report "
                        "covers (identical failures across cells: one draft), with its standalone reproduction")
    p.add_argument("--doc-patch", action="store_true",
                   help="the page the rules file's [document] names, edited from the records (markdown to paste); "
                        "without a kept page, the judgement of each of its statements")
    p.add_argument("--wiki", metavar="DIR",
                   help="write the page the rules state as it should read (DIR/<page>.md) and its unified diff "
                        "against the page as received (DIR/<page>.diff)")
    p.add_argument("--repro-limit", type=positive(int), metavar="N",
                   help="write at most N repro scripts: findings before documented errors, then the failures of "
                        "most cells (the others' panels give the `quantmatrix repro` command); default: every one")
    sdnext = CHECKOUT / "matrices" / "sdnext.toml"
    p.add_argument("--rules", default=str(sdnext) if sdnext.exists() else None, metavar="MATRIX",
                   help="matrix file whose rules state a page, for --doc-patch and the report's wiki patch "
                        "(default matrices/sdnext.toml; '' for none)")
    p.set_defaults(func=_report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantmatrix", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the matrix through pytest (extra options go to pytest)",
                   add_help=False).set_defaults(func=_run)
    p = sub.add_parser("list", help="print the cells a matrix expands to on this host, with their expected outcome")
    p.add_argument("file", nargs="?", default=str(CHECKOUT / "matrices" / "default.toml"),
                   help="matrix file (default matrices/default.toml)")
    p.add_argument("--all-devices", action="store_true", help="list the cells of devices this host lacks too")
    _max_cells(p)
    p.set_defaults(func=_list)
    p = sub.add_parser("validate", help="check matrix files")
    p.add_argument("files", nargs="+")
    _max_cells(p)
    p.set_defaults(func=_validate)
    p = sub.add_parser("check", help="which engine, type and offload mode work for a model on this machine, in "
                                      "what memory and time")
    p.add_argument("model", help="a built-in model (e.g. flux-tiny-pipe)")
    p.add_argument("--memory", metavar="SIZE", help="the memory you have (e.g. 8GiB): which combinations fit, and "
                                                    "the best that does")
    p.add_argument("--device", help="the device to check on (default: this host's accelerator, else the CPU)")
    p.add_argument("--results", metavar="FILE", help="append records here (default results/check-MODEL.jsonl)")
    p.add_argument("-n", dest="workers", type=int, default=0, help="pytest-xdist workers (default: none)")
    p.set_defaults(func=_check)
    p = sub.add_parser("detect", help="detect the engine and type of model files from their contents")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_detect)
    _report_parser(sub)
    p = sub.add_parser("compare", help="changes between two sets of results; exit 1 when something regressed")
    p.add_argument("old", type=_existing)
    p.add_argument("new", type=_existing)
    p.add_argument("--threshold", type=float, default=0.25,
                   help="latency/memory ratio growth counted as a regression (default 0.25 = 25%%)")
    p.set_defaults(func=_compare)
    p = sub.add_parser("repro", help="write a standalone script that reproduces a cell's record (stdout without -o)")
    p.add_argument("cell", metavar="CELL_ID")
    p.add_argument("--results", action="append", required=True, type=_existing, metavar="FILE",
                   help="results file holding the cell's record (repeatable; the latest record is used)")
    p.add_argument("--matrix", metavar="FILE", help="the matrix file the run used: its seed, batch and "
                                                     "[offload.group] (default: the harness's default settings)")
    p.add_argument("-o", "--output", metavar="OUT.py", help="write the script here (default: stdout)")
    p.set_defaults(func=_repro)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        status = args.func(args, rest)
        sys.stdout.flush()  # here, not at exit: a reader gone by then would still cost a traceback
        return status
    except QuantMatrixError as exc:
        print(f"quantmatrix: error: {printable(exc)}", file=sys.stderr)  # one line, whatever a file held
        return 2
    except BrokenPipeError:  # `quantmatrix list ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0


if __name__ == "__main__":
    sys.exit(main())
