"""The one generic test every matrix cell runs (parametrized by harness.run.plugin; select with -m matrix)."""

import pytest

from harness.run.session import check_cell


@pytest.mark.matrix
def test_cell(cell, matrix_run, request):
    failure = check_cell(matrix_run, cell, request)
    if failure:
        pytest.fail(failure, pytrace=False)
