"""Reports from records: the HTML site in a real browser, merged machines, hostile strings, markdown, compare."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main
from harness.report import data as report_data
from harness.report.compare import compare
from harness.report.html import build
from harness.report.markdown import render

REPO = Path(__file__).resolve().parents[1]
HOSTILE = '<script>alert(1)</script>"\'><img src=x onerror=alert(2)>&amp;{{7*7}} $\\frac{$ </script>'


@pytest.fixture(scope="module")
def cpu_results(tmp_path_factory) -> Path:
    """The default matrix, run for real on this machine (490 cells on both stacks; about eight minutes on two cores)."""
    results = tmp_path_factory.mktemp("cpu") / "default.jsonl"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "matrix", "--results", str(results), "-q",
                           "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert results.exists() and proc.returncode in (0, 1), proc.stdout[-3000:]
    return results


def synthetic_machine(records: list[dict], *, host="gpu-box", speed=0.1) -> list[dict]:
    """The same cells as if measured on another machine: a CUDA device, other figures."""
    out = []
    for r in copy.deepcopy(records):
        r["run"] = "20261126-000000-" + host
        r["cell"]["device"] = "cuda"
        r["id"] = r["id"].replace("/cpu/", "/cuda/")
        r["env"].update(host=host, cpu=None, device_name="Synthetic GPU 80GB", driver="999.1")
        if r.get("metrics"):
            latency = r["metrics"]["latency_ms"]
            r["metrics"]["latency_ms"] = {k: v * speed if k != "n" else v for k, v in latency.items()}
            r["metrics"]["mem_kind"] = "vram"
        out.append(r)
    return out


def write(path: Path, records: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def records_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def browser():
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        exe = None
    if exe is None:
        if os.environ.get("QUANTMATRIX_REQUIRE_BROWSER", "0") not in ("", "0"):
            pytest.fail("no chromium or playwright, but QUANTMATRIX_REQUIRE_BROWSER is set (.ci/run installs both)")
        pytest.skip("needs Debian's chromium and playwright (.ci/run installs them)")
    return sync_playwright, exe


def open_report(index: Path, tmp_path: Path, visit):
    sync_playwright, exe = browser()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = b.new_page(viewport={"width": 1400, "height": 1000})
        errors, dialogs, requests = [], [], []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(index.as_uri())
        page.wait_for_load_state("load")
        result = visit(page)
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        b.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert not [u for u in requests if not u.startswith("file://")], requests  # nothing from the network
    return result, errors, dialogs


def test_report_of_two_machines_in_a_real_browser(cpu_results, tmp_path):
    cpu = records_of(cpu_results)
    gpu = write(tmp_path / "gpu.jsonl", synthetic_machine(cpu))
    records = report_data.load([cpu_results, gpu])
    index = build(records, tmp_path / "site")
    latest = records.latest()

    def visit(page):
        counts = {}
        for grid in page.query_selector_all("table.grid"):
            key = (grid.get_attribute("data-machine"), grid.get_attribute("data-device"))
            counts[key] = len(grid.query_selector_all("td.cell"))
        page.click("table.grid[data-device=cuda] td.cell")
        detail = page.inner_text("#detail")
        page.click("#cells-table th:nth-child(9)")  # sort by latency ratio
        return counts, detail

    (counts, detail), errors, dialogs = open_report(index, tmp_path, visit)
    assert errors == [] and dialogs == []
    expected = latest.groupby(["machine", "device"]).size()
    cpu_machine = latest[latest["device"] == "cpu"]["machine"].iloc[0]
    assert counts[(cpu_machine, "cpu")] == expected[(cpu_machine, "cpu")] == len(cpu)
    gpu_machine = "gpu-box · Synthetic GPU 80GB"
    assert counts[(gpu_machine, "cuda")] == len(cpu)  # side by side: one grid per machine and device
    assert "verdict" in detail and "run" in detail
    import pandas as pd

    assert len(pd.read_csv(tmp_path / "site" / "cells.csv")) == 2 * len(cpu)
    assert list((tmp_path / "site" / "plots").glob("*.svg"))


def hostile(record: dict, verdict: str) -> dict:
    """`record` with a hostile string in every string field: cell, run, notes, errors, environment, claims."""
    from harness.cell import Cell

    evil = copy.deepcopy(record)
    evil["cell"] = {k: f"{HOSTILE}{k}" for k in evil["cell"]}
    evil["id"] = Cell(**evil["cell"]).id
    evil.update(verdict=verdict, run=HOSTILE, note=HOSTILE, reason=HOSTILE, output_tail=HOSTILE, started=HOSTILE)
    evil["expect"] = {"kind": "error", "pattern": HOSTILE, "source": HOSTILE, "reason": HOSTILE}
    evil["env"] = {k: HOSTILE for k in ("host", "os", "python", "torch", "triton", "cpu", "device_name", "driver")}
    evil["env"]["engines"] = {HOSTILE: HOSTILE}
    evil["claims"] = [{"claim": HOSTILE, "status": HOSTILE, "detail": HOSTILE}]
    if verdict == "drift-error":
        evil.update(metrics=None, error={"type": HOSTILE, "message": HOSTILE, "where": HOSTILE, "stage": HOSTILE})
    else:
        evil["metrics"]["mem_kind"] = HOSTILE
    return evil


def test_hostile_strings_show_as_text_and_never_run(cpu_results, tmp_path):
    cpu = records_of(cpu_results)
    measured = next(r for r in cpu if r["verdict"] == "ok" and r["cell"]["engine"] != "none")
    path = write(tmp_path / "evil.jsonl", [hostile(measured, "drift-error"), hostile(measured, "drift-claim")])
    records = report_data.load([path])
    assert records.skipped == [] and len(records.frame) == 2
    index = build(records, tmp_path / "site")  # the plots too: "$" would be mathtext to matplotlib
    html = index.read_text()
    assert "<script>alert(1)" not in html and "<img src=x" not in html
    assert html.count("<script") == 1  # the page's own
    assert "$\\frac{$" in render(records)  # markdown: text, escaped for tables

    def visit(page):
        page.click("table.grid td.cell")
        envs = page.eval_on_selector_all("table.env", "es => es.map(e => e.innerText).join()")
        return page.inner_text("#detail"), page.inner_text("#drift-table"), envs, \
            page.evaluate("document.querySelectorAll('img[src=x], script').length")

    (detail, drift, environment, injected), errors, dialogs = open_report(index, tmp_path, visit)
    assert dialogs == [] and errors == []
    assert injected == 1  # only the page's own script, no injected image or script
    for shown in (detail, drift, environment):  # shown as text
        assert "<script>alert(1)</script>" in shown


def test_bad_lines_and_unknown_schema_are_skipped_and_counted(cpu_results, tmp_path):
    cpu = records_of(cpu_results)[:3]
    future = dict(cpu[0], schema=99)
    path = write(tmp_path / "partial.jsonl", cpu + [future], tail='{"schema": 1, "run": "cut sho')
    records = report_data.load([path])
    assert len(records.frame) == 3 and len(records.skipped) == 2
    html = build(records, tmp_path / "site").read_text()
    assert "2 records skipped" in html and "schema is 99" in html


def test_markdown_table_has_measured_figures_and_documented_errors(cpu_results):
    text = render(report_data.load([cpu_results]))
    assert "| engine | type | load | offload none |" in text
    assert "b/w" in text and "x time" in text
    assert "## Documented errors that still hold" in text and "InvalidGroupSizeError" in text  # default.toml's rule


def test_compare_flags_exactly_the_cell_made_slower(cpu_results, tmp_path, capsys):
    old = records_of(cpu_results)
    new = copy.deepcopy(old)
    for r in new:
        r["run"] = "tonight"
        if r.get("metrics"):  # a uniformly slower night is no regression: ratios to each run's own baseline
            r["metrics"]["latency_ms"]["median"] *= 1.7
    target = next(r for r in new if r["verdict"] == "ok" and r["cell"]["engine"] == "gguf")
    target["metrics"]["latency_ms"]["median"] *= 3
    a, b = write(tmp_path / "old.jsonl", old), write(tmp_path / "new.jsonl", new)
    changes = compare(report_data.load([a]), report_data.load([b]))
    assert [(c.kind, c.id) for c in changes.items] == [("slower", target["id"])]
    assert main(["compare", str(a), str(b)]) == 1
    assert "slower: 1" in capsys.readouterr().out
    assert main(["compare", str(a), str(a)]) == 0
    html = build(report_data.load([b]), tmp_path / "site", previous=report_data.load([a])).read_text()
    assert "Changes since the previous runs (1, 1 regressions)" in html and target["id"] in html


def test_compare_lists_broken_fixed_and_drifted_cells(cpu_results, tmp_path):
    old = records_of(cpu_results)
    new = copy.deepcopy(old)
    ok = [r for r in new if r["verdict"] == "ok" and r["cell"]["engine"] != "none"]
    ok[0].update(verdict="crash", metrics=None, reason="process died by signal SIGSEGV (11)")
    ok[1].update(verdict="drift-works", note="documented to fail, but it worked")
    a, b = write(tmp_path / "old.jsonl", old), write(tmp_path / "new.jsonl", new)
    forward = compare(report_data.load([a]), report_data.load([b]))
    assert {(c.kind, c.id) for c in forward.items} == {("newly broken", ok[0]["id"]), ("newly drifted", ok[1]["id"])}
    backward = compare(report_data.load([b]), report_data.load([a]))
    assert ("newly fixed", ok[0]["id"]) in {(c.kind, c.id) for c in backward.items} and not backward.regressed


def test_a_cell_broken_only_on_the_diffusers_stack_is_blamed_on_the_integration(cpu_results, tmp_path):
    records = records_of(cpu_results)
    by_id = {r["id"]: r for r in records}
    target = next(r for r in records if r["cell"]["stack"] == "diffusers" and r["verdict"] == "ok"
                  and by_id.get(r["id"].replace("/diffusers", "/direct"), {}).get("verdict") == "ok")
    target.update(verdict="fail", metrics=None, reason="KeyError during load",
                  error={"type": "KeyError", "message": "None", "where": "", "stage": "load",
                         "origin": "diffusers.quantizers.gguf.utils", "layer": "diffusers.quantizers.gguf"})
    both = [r for r in records if r["verdict"] == "fail" and r["cell"]["stack"] == "diffusers"
            and by_id.get(r["id"].replace("/diffusers", "/direct"), {}).get("verdict") == "fail"]
    frame = report_data.load([write(tmp_path / "r.jsonl", records)]).latest()
    blamed = set(frame[frame["integration_broke"]]["id"])
    assert target["id"] in blamed
    assert not blamed & {r["id"] for r in both}  # failing on the direct stack too: the engine's (or accelerate's)
    html = build(report_data.load([tmp_path / "r.jsonl"]), tmp_path / "site").read_text()
    section = html[html.index('id="integration"'):html.index('id="grids"')]
    assert target["id"] in section and "diffusers.quantizers.gguf" in section and "KeyError: None" in section
