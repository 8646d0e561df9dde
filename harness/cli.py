"""The `quantmatrix` command.

    quantmatrix run [pytest options]      run the matrix (same as `pytest -m matrix` in a checkout)
    quantmatrix list [--matrix FILE]      print the cells a matrix expands to, with their expectations
    quantmatrix validate FILE...          check matrix files; exit 2 with a clear message on the first mistake
    quantmatrix detect FILE...            print the engine and quant type found in model files' contents

Mistakes in input exit with status 2 and one message naming the file, the key and what was expected.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.errors import QuantMatrixError

CHECKOUT = Path(__file__).resolve().parents[1]


def _run(args: argparse.Namespace, rest: list[str]) -> int:
    import pytest

    generic = CHECKOUT / "tests" / "test_matrix.py"
    if not generic.exists():
        print("quantmatrix run: needs the quantmatrix checkout (tests/test_matrix.py); "
              "install it with `pip install -e .` from a clone", file=sys.stderr)
        return 2
    return int(pytest.main(["-m", "matrix", "--rootdir", str(CHECKOUT), "-c", str(CHECKOUT / "pyproject.toml"),
                            str(generic), *rest]))


def _list(args: argparse.Namespace, rest: list[str]) -> int:
    from harness.matrix import load_matrix

    matrix = load_matrix(args.matrix)
    for cell in matrix.cells:
        expect = matrix.expectation(cell)
        print(f"{cell.id:<60} {expect.kind}" + (f"  /{expect.pattern}/" if expect.pattern else ""))
    print(f"{len(matrix.cells)} cells", file=sys.stderr)
    return 0


def _validate(args: argparse.Namespace, rest: list[str]) -> int:
    from harness.matrix import load_matrix

    for path in args.files:
        matrix = load_matrix(path)
        print(f"{path}: ok, {len(matrix.cells)} cells, {len(matrix.rules)} rules")
    return 0


def _detect(args: argparse.Namespace, rest: list[str]) -> int:
    from harness.loading import detect

    for path in args.files:
        engine, qtype = detect(path)
        print(f"{path}: engine={engine} qtype={qtype}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantmatrix", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the matrix through pytest (extra options go to pytest)",
                   add_help=False).set_defaults(func=_run)
    p = sub.add_parser("list", help="print the cells of a matrix")
    p.add_argument("--matrix", default=str(CHECKOUT / "matrices" / "default.toml"))
    p.set_defaults(func=_list)
    p = sub.add_parser("validate", help="check matrix files")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_validate)
    p = sub.add_parser("detect", help="detect the engine and type of model files from their contents")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_detect)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args, rest)
    except QuantMatrixError as exc:
        print(f"quantmatrix: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
