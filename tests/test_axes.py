"""The axis registry: an axis declared once reaches the cell's id (and older ids), matrix files, the run's options,
`quantmatrix run --help`, the report's columns, its grids and cells.csv, with nothing else changed."""

import csv
import json

import pytest
from _pytest.config.argparsing import Parser

from conftest import lines_of
from harness.cell import AXES, Axis, Cell
from harness.cli import run_help
from harness.matrix import parse_matrix
from harness.report import data as report_data
from harness.report.html import build
from harness.run import plugin


@pytest.fixture
def flavour():
    axis = AXES.register(Axis("flavour", ("-", "sweet", "sour"), "flavour (a test's dummy axis)", default="-",
                              join="+", omit="-", phrase="{} flavour"))
    try:
        yield axis
    finally:
        AXES.unregister("flavour")


def test_every_axis_reads_back_from_its_id_and_older_ids_take_the_defaults():
    cell = Cell("bnb", "nf4-dq", "post-load", "none", "cpu", "flux-tiny", "float32", "diffusers", "float8_e4m3fn")
    assert cell.id == "bnb-nf4-dq/post-load/none/cpu/flux-tiny/float32/diffusers+float8_e4m3fn"
    assert Cell.from_id(cell.id) == cell
    old = Cell.from_id("none/post-load/none/cpu/dit-xs/float32")  # written before the stack axis
    assert (old.stack, old.cast) == ("direct", "-") and old.ids[-1] == "none/post-load/none/cpu/dit-xs/float32"
    assert cell.baseline.id == "none/post-load/none/cpu/flux-tiny/float32/diffusers"
    assert cell.control.stack == "direct"
    with pytest.raises(TypeError, match="no axis 'colour'"):
        Cell("none", "-", "post-load", "none", "cpu", "dit-xs", "float32", colour="red")


def test_a_registered_axis_reaches_the_id_the_matrix_and_the_options(flavour):
    cell = Cell("none", "-", "post-load", "none", "cpu", "dit-xs", "float32", flavour="sweet")
    assert cell.id == "none/post-load/none/cpu/dit-xs/float32/direct+sweet" and Cell.from_id(cell.id) == cell
    assert Cell.from_id("none/post-load/none/cpu/dit-xs/float32/direct").flavour == "-"
    assert cell.replace(stack="diffusers").id.endswith("/diffusers+sweet")
    text = """
[axes]
engine = ["none"]
qtype = ["-"]
load = ["post-load"]
offload = ["none"]
device = ["cpu"]
model = ["dit-xs"]
dtype = ["float32"]
"""
    assert {c.flavour for c in parse_matrix(text).cells} == {"-"}  # left out of a file: its default
    both = parse_matrix(text + 'flavour = ["-", "sweet"]\n').cells
    assert {c.flavour for c in both} == {"-", "sweet"}
    from harness.errors import QuantMatrixError

    with pytest.raises(QuantMatrixError, match="unknown flavour 'salty'"):
        parse_matrix(text + 'flavour = ["salty"]\n')
    parser = Parser(_ispytest=True)
    plugin.pytest_addoption(parser)
    options = {name for o in parser.getgroup("quantmatrix").options for name in o.names()}
    assert "--flavour" in options and "--stack" in options
    assert "--flavour NAME[,NAME]" in run_help() and "flavour (a test's dummy axis)" in run_help()


def test_a_registered_axis_reaches_the_report_columns_grids_and_cells_csv(flavour, reference_records, tmp_path):
    records = [json.loads(line) for line in lines_of(reference_records)[:40]]
    sweet = json.loads(json.dumps(next(r for r in records if r["verdict"] == "ok" and r["cell"]["engine"] != "none")))
    sweet["cell"]["flavour"] = "sweet"
    sweet["id"] = Cell(**sweet["cell"]).id
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*records, sweet]))
    loaded = report_data.load([path])
    assert loaded.skipped == []
    assert "flavour" in loaded.frame.columns and set(loaded.frame["flavour"]) == {"-", "sweet"}
    index = build(loaded, tmp_path / "site")
    with open(tmp_path / "site" / "cells.csv") as f:
        rows = list(csv.DictReader(f))
    assert "flavour" in rows[0] and [r["id"] for r in rows if r["flavour"] == "sweet"] == [sweet["id"]]
    assert "sweet flavour" in index.with_name("grids.html").read_text()  # the grid line says how the cell was run
