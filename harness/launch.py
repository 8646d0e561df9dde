"""Where a matrix run starts: the checkout, and pytest's arguments for a run from any folder (`quantmatrix run`,
`quantmatrix check`). Imports nothing of the harness."""

from __future__ import annotations

from pathlib import Path

from harness.errors import QuantMatrixError

CHECKOUT = Path(__file__).resolve().parents[1]


def matrix_pytest_args(rest: list[str]) -> list[str]:
    """pytest's arguments for a matrix run from anywhere: the checkout's generic cell test and its configuration."""
    generic = CHECKOUT / "tests" / "test_matrix.py"
    if not generic.exists():
        raise QuantMatrixError("needs the quantmatrix checkout (tests/test_matrix.py); install it with "
                               "`pip install -e .` from a clone", path=generic)
    return ["-m", "matrix", "--rootdir", str(CHECKOUT), "-c", str(CHECKOUT / "pyproject.toml"), str(generic), *rest]
