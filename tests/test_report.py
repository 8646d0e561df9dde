"""Reports from records: the HTML site in a real browser, merged machines, hostile strings, markdown, compare."""

import copy
import dataclasses
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import lines_of
from harness.cell import AXES, Cell
from harness.cli import main
from harness.matrix import load_matrix
from harness.report import data as report_data
from harness.report import docpatch, statements, wikipage
from harness.report import overview as report_overview
from harness.report.compare import compare
from harness.report.html import VERDICTS, build
from harness.report.markdown import render

REPO = Path(__file__).resolve().parents[1]
SDNEXT = REPO / "matrices" / "sdnext.toml"
REFERENCE = sorted((REPO / "results" / "reference").glob("h200-*.jsonl"))  # fixed records of one GPU host
HOSTILE = '<script>alert(1)</script>"\'><img src=x onerror=alert(2)>&amp;{{7*7}} $\\frac{$ </script>'


@pytest.fixture
def cpu_results(reference_records) -> Path:
    """This host's default matrix: the committed reference records (891 cells on both stacks, measured by
    `pytest -m matrix` here; conftest.py). tests/test_end_to_end.py checks that a fresh run still gives records
    of the same shape."""
    return reference_records


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


def slow_down(record: dict, factor: float) -> None:
    """The record as if the cell's steps took `factor` times as long beside the same float model."""
    paired = record["metrics"]["latency_vs_float"]
    for key in ("ratio", "lo", "hi"):
        paired[key] *= factor
    record["metrics"]["latency_ms"] = {k: v * factor if k != "n" else v
                                       for k, v in record["metrics"]["latency_ms"].items()}


def records_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in lines_of(path)]


def element(html: str, tag: str, id_: str) -> str:
    """The inner HTML of the page's element <tag id="id_"> (not nested in one of its own tag)."""
    import re

    found = re.search(rf'<{tag}\b[^>]*\bid="{id_}"[^>]*>(.*?)</{tag}>', html, re.S)
    assert found, f"no <{tag} id={id_!r}> in the page"
    return found.group(1)


def text_of(fragment: str) -> str:
    import html as html_mod
    import re

    return html_mod.unescape(re.sub(r"<[^>]+>", "", fragment)).strip()


def table_rows(html: str, id_: str) -> list[list[str]]:
    """The text of each body cell of the table <table id="id_">, row by row."""
    import re

    body = element(html, "table", id_).split("<tbody>", 1)[1]
    return [[text_of(td) for td in re.findall(r"<td\b[^>]*>(.*?)</td>", tr, re.S)]
            for tr in re.findall(r"<tr\b[^>]*>(.*?)</tr>", body, re.S)]


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


def artifacts(tmp_path: Path) -> Path:
    """Where screenshots go: $QUANTMATRIX_ARTIFACTS (.ci/run sets it to test-artifacts/), else the test's tmp."""
    where = Path(os.environ.get("QUANTMATRIX_ARTIFACTS") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    return where


def open_report(index: Path, tmp_path: Path, visit, *, min_shot: int = 10_000):
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
        shot = artifacts(tmp_path) / f"{os.environ.get('PYTEST_CURRENT_TEST', 'report').split(':')[-1].split()[0]}.png"
        # the first screens (the overview, the drift blocks): a whole page of two machines' 891 cells each takes
        # chromium longer to paint than playwright's 30 s
        page.screenshot(path=str(shot), full_page=True, clip={"x": 0, "y": 0, "width": 1400, "height": 5000})
        b.close()
    assert shot.stat().st_size > min_shot
    assert not [u for u in requests if not u.startswith("file://")], requests  # nothing from the network
    return result, errors, dialogs


def test_report_of_two_machines_in_a_real_browser(cpu_results, tmp_path):
    cpu = records_of(cpu_results)
    gpu = write(tmp_path / "gpu.jsonl", synthetic_machine(cpu))
    records = report_data.load([cpu_results, gpu])
    index = build(records, tmp_path / "site")
    latest = records.latest()

    def visit(page):
        counts: dict = {}
        for machine, device, n in page.eval_on_selector_all(  # one round trip for every grid
                "table.grid", "gs => gs.map(g => [g.dataset.machine, g.dataset.device, "
                "g.querySelectorAll('td.cell').length])"):
            counts[(machine, device)] = counts.get((machine, device), 0) + n
        clicked = page.query_selector("table.grid[data-device=cuda] td.cell")
        title = clicked.get_attribute("title")
        clicked.click()
        shown = page.is_visible("#detail")
        detail = page.eval_on_selector_all("#detail-list dt",
                                           "dts => dts.map(dt => [dt.textContent, dt.nextElementSibling.textContent])")
        return counts, (title, shown, detail)

    (counts, (title, shown, detail)), errors, dialogs = open_report(index.with_name("grids.html"), tmp_path, visit)
    assert errors == [] and dialogs == []
    expected = latest.groupby(["machine", "device"]).size()
    cpu_machine = latest[latest["device"] == "cpu"]["machine"].iloc[0]
    assert counts[(cpu_machine, "cpu")] == expected[(cpu_machine, "cpu")] == len(cpu)
    gpu_machine = "gpu-box · Synthetic GPU 80GB"
    assert counts[(gpu_machine, "cuda")] == len(cpu)  # side by side: one grid per machine and device
    # the detail panel shows the clicked cell's own figures: its verdict and run, the GPU machine's
    clicked = {r["id"]: r for r in records_of(gpu)}[title.split(": ", 1)[0]]
    figures = dict(detail)
    assert shown and len(figures) == len(detail) and list(figures)[0] == "verdict", detail
    assert figures["verdict"] == clicked["verdict"], (clicked["id"], detail)
    assert figures["run"].startswith(f"{clicked['run']} ("), (clicked["id"], detail)
    import pandas as pd

    table = pd.read_csv(tmp_path / "site" / "cells.csv")
    assert len(table) == 2 * len(cpu)
    measured = {r["id"]: r["metrics"]["param_bytes"] for r in records_of(gpu)
                if (r["metrics"] or {}).get("param_bytes")}
    stored = dict(zip(table["id"], table["param_bytes"], strict=True))
    assert measured and all(stored[i] == b for i, b in measured.items())  # byte counts whole, not rounded
    assert table["latency_ms"].dropna().map(lambda v: len(repr(v).strip("0.-").replace(".", "")) <= 6).all()
    assert list((tmp_path / "site" / "plots").glob("*.svg"))


def hostile(record: dict, verdict: str, offload: str) -> dict:
    """`record` with a hostile string in every free-text field: run, notes, errors, environment, claims (its cell
    in another offload mode: a cell's values must be its axes' known values, or the record is refused)."""
    from harness.cell import Cell

    evil = copy.deepcopy(record)
    evil["cell"] = {**evil["cell"], "offload": offload}
    evil["id"] = Cell(**evil["cell"]).id
    evil.update(verdict=verdict, run=HOSTILE, note=HOSTILE, reason=HOSTILE, output_tail=HOSTILE, started=HOSTILE)
    evil["expect"] = {"kind": "error", "pattern": HOSTILE, "source": HOSTILE, "reason": HOSTILE}
    evil["env"] = {k: HOSTILE for k in ("host", "os", "python", "torch", "triton", "cpu", "device_name", "driver")}
    evil["env"]["engines"] = {HOSTILE: HOSTILE}
    evil["claims"] = [{"claim": HOSTILE, "status": HOSTILE, "detail": HOSTILE}]
    if verdict == "drift-error":
        evil.update(metrics=None, error={"type": HOSTILE, "message": HOSTILE, "where": HOSTILE, "layer": HOSTILE,
                                         "stage": "load"})
    else:
        evil["metrics"]["mem_kind"] = HOSTILE
    return evil


def test_hostile_strings_show_as_text_and_never_run(cpu_results, tmp_path):
    cpu = records_of(cpu_results)
    measured = next(r for r in cpu if r["verdict"] == "ok" and r["cell"]["engine"] != "none")
    evil = [hostile(measured, "drift-error", "model"), hostile(measured, "drift-claim", "group"),
            hostile(measured, "drift-error", "sequential")]
    evil[0]["expect"]["statement"] = HOSTILE
    evil[2]["expect"]["source"] = f"diffusers#1: {HOSTILE}"  # an upstream report
    crafted = copy.deepcopy(evil[0])  # hostile cell values: refused, and the refusal shown as text
    crafted["cell"] = {k: f"{HOSTILE}{k}" for k in crafted["cell"]}
    # a real cell a rule of the seed's page matches, with a hostile error: into the wiki patch
    failing = copy.deepcopy(next(r for r in cpu if r["cell"]["engine"] == "bnb" and r["cell"]["qtype"] == "nf4"
                                 and r["cell"]["offload"] == "sequential" and r.get("error")))
    failing["error"]["message"] = HOSTILE
    path = write(tmp_path / "evil.jsonl", [*evil, failing, crafted])
    records = report_data.load([path])
    assert len(records.skipped) == 1 and "cell.engine: " in records.skipped[0] and len(records.frame) == 4
    index = build(records, tmp_path / "site", rules=load_matrix(SDNEXT))  # the plots too: "$" is mathtext
    html = index.read_text()
    assert "<script>alert(1)" not in html and "<img src=x" not in html
    assert html.count("<script") == 2 and '<script src="cells.js"></script>' in html  # the page's own two
    details = (tmp_path / "site" / "cells.js").read_text()  # record text there is inside JSON strings only
    assert details.count("\n") == 3 and details.startswith("window.QM_TEXT = [")
    assert "<script>alert(1)</script>" in details
    assert "$\\frac{$" in render(records)  # markdown: text, escaped for tables

    def click(page):
        page.click("table.grid td.cell")
        return page.inner_text("#detail"), page.evaluate("document.querySelectorAll('img[src=x], script').length")

    (detail, scripts), errors, dialogs = open_report(index.with_name("grids.html"), tmp_path, click)
    assert dialogs == [] and errors == [] and scripts == 2 and "<script>alert(1)</script>" in detail

    def visit(page):
        envs = page.eval_on_selector_all("table.env", "es => es.map(e => e.innerText).join()")
        page.eval_on_selector_all("details", "ds => ds.forEach(d => d.open = true)")
        parts = [page.inner_text(f"#{part}") for part in ("overview", "drift", "upstream")]
        return parts, envs, page.inner_text("#skipped"), \
            page.evaluate("document.querySelectorAll('img[src=x], script').length")

    (parts, environment, skipped, injected), errors, dialogs = open_report(index, tmp_path, visit)
    assert dialogs == [] and errors == []
    assert injected == 2  # only the page's own scripts, no injected image or script
    for shown in (detail, environment, *parts[1:], skipped):  # shown as text
        assert "<script>alert(1)</script>" in shown
    assert "<script>alert(1)</script>" in (tmp_path / "site" / "doc-patch.md").read_text()  # the judgement's text


def test_bad_lines_and_unknown_schema_are_skipped_and_counted(cpu_results, tmp_path):
    cpu = records_of(cpu_results)[:3]
    future = dict(cpu[0], schema=99)
    path = write(tmp_path / "partial.jsonl", cpu + [future], tail='{"schema": 1, "run": "cut sho')
    records = report_data.load([path])
    assert len(records.frame) == 3 and len(records.skipped) == 2
    html = build(records, tmp_path / "site").read_text()
    assert "2 records skipped" in html and "schema is 99" in html


def markdown_cells(text: str) -> dict[tuple, str]:
    """(table heading, engine, type, how it ran, offload) -> the cell's text, from every table of the markdown."""
    cells, heading, columns = {}, None, []
    for line in text.splitlines():
        if line.startswith("## "):
            heading, columns = line[3:], []
        elif line.startswith("| engine | type | run |"):
            columns = [c.strip() for c in line.strip("|").split("|")]
        elif line.startswith("| ") and columns:
            values = [c.strip() for c in line.strip("|").split("|")]
            engine, qtype, how = values[:3]
            for column, value in zip(columns[3:], values[3:], strict=True):
                key = heading, engine, qtype, how, column.removeprefix("offload ")
                assert key not in cells, f"{key} shown twice"
                cells[key] = value
    return cells


def test_markdown_table_has_measured_figures_and_documented_errors(cpu_results):
    records = report_data.load([cpu_results])
    text = render(records)
    assert "| engine | type | run | offload none |" in text
    cells = markdown_cells(text)
    latest = records.latest()
    # cells that ran, each on its own line per stack: their own figures (both stacks of one combination too)
    ran = latest[(latest["verdict"] == "ok") & (latest["cast"] == "-")]
    checked = 0
    for engine in ("none", "bnb", "gguf", "quanto"):
        for stack in ("direct", "diffusers"):
            r = ran[(ran["engine"] == engine) & (ran["stack"] == stack) & ran["latency_ratio"].notna()].iloc[0]
            cell = cells[f"{r['machine']}: {r['device']}, {r['model']}, {r['dtype']}", engine, r["qtype"],
                         f"{r['load']} · {stack}", r["offload"]]
            assert cell.startswith("✓ ") and f"{r['bits_per_weight']:.1f} b/w" in cell, (r["id"], cell)
            assert f"{r['latency_ratio']:.2f}x time" in cell, (r["id"], cell)
            checked += 1
    assert checked == 8
    held = text.split("## Documented errors that still hold\n", 1)[1].split("\n## ", 1)[0]
    assert "InvalidGroupSizeError" in held  # default.toml's rule, in its section


def test_compare_flags_exactly_the_cell_made_slower(cpu_results, tmp_path, capsys):
    old = records_of(cpu_results)
    new = copy.deepcopy(old)
    for r in new:
        r["run"] = "tonight"
        if r.get("metrics"):  # a slower night is no regression: compare reads the cells' pairs with their float model
            r["metrics"]["latency_ms"]["median"] *= 1.7
    target = next(r for r in new if r["verdict"] == "ok" and r["cell"]["engine"] == "gguf"  # an interval narrow
                  and "ratio" in r["metrics"]["latency_vs_float"]  # enough that 3x its time lies wholly above it,
                  # even by the factor asked of cells timed beside other load (the other test worker's)
                  and r["metrics"]["latency_vs_float"]["lo"] * 3 > 2.1 * r["metrics"]["latency_vs_float"]["hi"])
    slow_down(target, 3)
    a, b = write(tmp_path / "old.jsonl", old), write(tmp_path / "new.jsonl", new)
    changes = compare(report_data.load([a]), report_data.load([b]))
    assert [(c.kind, c.id) for c in changes.items] == [("slower", target["id"])]
    assert main(["compare", str(a), str(b)]) == 1
    assert "slower: 1" in capsys.readouterr().out
    assert main(["compare", str(a), str(a)]) == 0
    html = build(report_data.load([b]), tmp_path / "site", previous=report_data.load([a])).read_text()
    assert "Changes since the previous runs (1, 1 regressions)" in html and target["id"] in html


def test_compare_asks_more_of_a_latency_change_timed_while_its_threads_waited_for_a_cpu(cpu_results, tmp_path):
    """A cell 1.5x slower is flagged where both runs timed it with threads that did not wait for a CPU, and not where
    they waited a third of the time in one run (load alone moved a ratio 1.29x); 2.5x is flagged either way, saying
    which run waited and the factor asked (the threshold's where that is higher)."""
    old = records_of(cpu_results)
    for r in old:
        if r.get("metrics"):
            r["metrics"]["host_load"]["cpu_wait"] = 0.01
    target = next(r for r in old if r["verdict"] == "ok" and "ratio" in (r["metrics"].get("latency_vs_float") or {})
                  and r["metrics"]["latency_vs_float"]["lo"] * 1.5 > 1.3 * r["metrics"]["latency_vs_float"]["hi"])
    flagged = {}
    for factor, wait, threshold in ((1.5, 0.01, 0.25), (1.5, 0.33, 0.25), (2.5, 0.33, 0.25), (3.5, 0.33, 1.5)):
        new = copy.deepcopy(old)
        mine = next(r for r in new if r["id"] == target["id"])
        slow_down(mine, factor)
        mine["metrics"]["host_load"]["cpu_wait"] = wait
        a, b = write(tmp_path / "old.jsonl", old), write(tmp_path / f"new-{factor}-{wait}.jsonl", new)
        changes = compare(report_data.load([a]), report_data.load([b]), threshold=threshold)
        flagged[factor, wait] = [(c.id, c.new) for c in changes.items]
    assert [i for i, _ in flagged[1.5, 0.01]] == [target["id"]] and "waited" not in flagged[1.5, 0.01][0][1]
    assert flagged[1.5, 0.33] == []
    assert [i for i, _ in flagged[2.5, 0.33]] == [target["id"]], flagged
    assert "its threads waited for a CPU in the new run: flagged beyond 2x" in flagged[2.5, 0.33][0][1]
    assert "flagged beyond 2.5x" in flagged[3.5, 0.33][0][1]


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
    # what the records already hold: broken on the diffusers stack only (quanto qint4 under diffusers' model
    # offload of the bf16 Flux pipeline: 'TinyGemmWeightQBitsTensor' object has no attribute '_scale')
    found = {r["id"] for r in records if r["verdict"] == "fail" and r["cell"]["stack"] == "diffusers"
             and by_id.get(r["id"].replace("/diffusers", "/direct"), {}).get("verdict") == "ok"} - {target["id"]}
    frame = report_data.load([write(tmp_path / "r.jsonl", records)]).latest()
    blamed = set(frame[frame["integration_broke"]]["id"])
    assert both and blamed == found | {target["id"]}  # broken here, working on the direct stack
    assert not blamed & {r["id"] for r in both}  # failing on the direct stack too: the engine's (or accelerate's)
    html = build(report_data.load([tmp_path / "r.jsonl"]), tmp_path / "site").read_text()
    assert text_of(element(html, "h2", "integration")) == f"Broken by diffusers' integration ({len(blamed)})"
    rows = {row[1]: row for row in table_rows(html, "integration-table")}
    assert set(rows) == blamed
    assert rows[target["id"]][1:] == [target["id"], "✗fail", "diffusers.quantizers.gguf", "KeyError: None"]


def drifted(records: list[dict]) -> tuple[list[dict], dict]:
    """`records` with one documented error turned into a drift: the same statement now fails differently."""
    out = copy.deepcopy(records)
    target = next(r for r in out if r["verdict"] == "documented-error" and r["expect"].get("source"))
    target.update(verdict="drift-error", note="documented /x/, but raised ValueError: new text",
                  error={"type": "ValueError", "message": "new text", "where": "", "stage": "load",
                         "origin": "accelerate.hooks", "layer": "accelerate.hooks"})
    return out, target


def test_overview_drift_blocks_and_doc_patch_in_a_real_browser(cpu_results, tmp_path):
    records_list, target = drifted(records_of(cpu_results))
    path = write(tmp_path / "r.jsonl", records_list)
    records = report_data.load([path])
    index = build(records, tmp_path / "site", rules=load_matrix(SDNEXT))
    latest = records.latest()

    def visit(page):
        counts = {c.get_attribute("data-verdict"): int(c.inner_text())
                  for c in page.query_selector_all("#verdict-counts td")}
        first_screen = page.evaluate("document.querySelector('#verdict-counts').getBoundingClientRect().bottom")
        overview = page.query_selector_all("table.overview")
        link = page.get_attribute("table.overview td a", "href")
        block = next(b for b in page.query_selector_all("#drift details.statement")
                     if b.get_attribute("data-source") == target["expect"]["source"])
        block.query_selector("details.cells summary").click()
        shown = block.inner_text()
        patch = page.inner_text("#doc-patch-text")
        page_counts = {c.get_attribute("data-finding"): int(c.inner_text())
                       for c in page.query_selector_all("#page-counts td")}
        page_bottom = page.evaluate("document.querySelector('#page-counts').getBoundingClientRect().bottom")
        types = [(c.get_attribute("data-types"), c.get_attribute("class"), c.inner_text())
                 for c in page.query_selector_all("table.overview td[data-types]")]
        return (counts, first_screen, len(overview), link, shown, patch, page_counts, page_bottom, types)

    (counts, bottom, tables, link, shown, patch, page_counts, page_bottom, types), errors, dialogs = \
        open_report(index, tmp_path, visit)
    target_exists = link.startswith("grids.html#") and f'id="{link.split("#")[1]}"' in \
        index.with_name("grids.html").read_text()
    assert errors == [] and dialogs == []
    # the first screen answers for the page the rules state: its headline counts are the patch's
    assert page_bottom < 1000
    reasons = (tmp_path / "site" / "doc-patch.md").read_text()  # each statement's judgement
    headline = next(line for line in reasons.splitlines() if line.startswith("Statements checked: "))
    assert headline == "Statements checked: " + ", ".join(
        f"{page_counts[f]} {w}" for f, w in [("broke", "broke"), ("drifted", "drifted"), ("holds", "holds"),
                                              ("unchecked", "not measured")]) + "."
    assert sum(page_counts.values()) == len([r for r in load_matrix(SDNEXT).rules if r.expect.source])
    # overview entries count the types that work, and colour by that, the worst verdict apart
    assert types and all(int(k) <= int(n) for k, n in (t.split("/") for t, _, _ in types))
    some = [(t, css, text) for t, css, text in types if css == "some"]
    assert some and all(text.startswith(t + " ✓") for t, _, text in some)
    none_work = [text for t, css, text in types if t.startswith("0/")]
    assert none_work and not any("✓" in text for text in none_work)  # no check mark beside a zero
    assert counts == {v: int((latest["verdict"] == v).sum()) for v in counts}  # every verdict counted, zeros too
    assert set(counts) >= {"fail", "timeout", "ok", "unavailable"} and list(counts)[:5] == [
        "crash", "oom", "hang", "timeout", "fail"]  # failures and timeouts first
    assert bottom > 1000  # below the first screen's coverage, the page's counts and the answer table
    assert tables == latest[~latest["device_absent"]].groupby(["device_class", "stack"]).ngroups and target_exists
    assert target["id"] in shown and "ValueError: new text" in shown and "accelerate.hooks" in shown
    assert shown.count("ValueError: new text") == 1  # each distinct error once
    assert "> BitsAndBytes nf4 quantization is not compatible with sequential offload" in reasons
    # the preview is the page as it should read, SDNQ's section first among the engines
    assert patch.strip() == (tmp_path / "site" / "wiki" / "sdnext-wiki-quantization.md").read_text().strip()
    assert "### SDNQ" in patch and "Statements checked" not in patch


def test_every_verdict_symbol_renders_with_the_desktop_fonts(tmp_path):
    """No symbol is drawn as the missing-glyph box with the fonts installed (Debian's DejaVu, as a desktop has)."""
    page_html = tmp_path / "symbols.html"
    page_html.write_text('<meta charset="utf-8"><canvas id="c" width="40" height="40"></canvas>')

    def visit(page):
        return page.evaluate("""(symbols) => {
            const c = document.getElementById('c'), x = c.getContext('2d');
            const draw = (s) => { x.clearRect(0, 0, 40, 40); x.font = '28px "DejaVu Sans", sans-serif';
                                  x.fillText(s, 4, 32); return Array.from(x.getImageData(0, 0, 40, 40).data).join(); };
            const tofu = [draw('\\u0378'), draw('\\uFFFF')];  // unassigned code points: the missing-glyph box
            return symbols.map((s) => [s, tofu.includes(draw(s))]);
        }""", sorted({sym for sym, _, _ in VERDICTS.values()} | {"⧗"}))

    result, errors, _ = open_report(page_html, tmp_path, visit, min_shot=0)
    assert errors == []
    assert [s for s, missing in result if missing] == ["⧗"]  # the check can fail: U+29D7 is in no DejaVu font


def test_doc_patch_from_fixed_records_states_each_statement_outcome(tmp_path, capsys):
    """The committed H200 records against the seed's rules: what each statement's block says."""
    matrix = load_matrix(SDNEXT)
    text = docpatch.render(matrix, report_data.load(REFERENCE))
    blocks = {line.split("(", 1)[1].split("): ", 1)[0]: line for line in text.splitlines() if line.startswith("- **")}
    outcome = {source: line.split("**")[1] for source, line in blocks.items()}
    assert outcome["seed: GGUF limitations (model offload)"] == "⚠ drifted"  # works now
    assert outcome["seed: Errors (quanto qint + balanced offload)"] == "⚠ drifted"
    assert outcome["seed: Errors (bnb nf4 + sequential offload)"] == "⚠ drifted"  # fails, differently
    assert "Cannot copy out of meta tensor" in text.split("nf4 + sequential offload)")[1].split("\n>")[0]
    gguf = "seed: GGUF (storage-only: smaller, slower; not platform dependent)"
    assert outcome[gguf] == "– not measured"  # a statement of speed, and these records are from before pairing
    assert "could not be judged: no paired latency against the float model" in blocks[gguf]
    assert outcome["seed: Optimum-Quanto limitations (torch 2.4)"] == "– not measured"
    assert "applies only with torch <2.4" in blocks["seed: Optimum-Quanto limitations (torch 2.4)"]
    assert "needs a xpu device" in blocks["seed: Optimum-Quanto limitations (Intel Arc/IPEX)"]
    assert len(blocks) == len([r for r in matrix.rules if r.expect.source])  # every statement, checked or not
    sections = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    # the page's sections in its order, between the generated support table and the SDNQ section it lacks
    assert sections == ["Compatibility (measured)", *matrix.document.sections,
                        "SDNQ (measured; the page has no section for it)"]
    assert "Suggested: GGUF with model offload works on cuda (control path only)." in text  # dit-xs, direct
    # `--doc-patch` prints the page as it should read (the report's wiki/ has it and its diff), at most three times
    # the page's length
    assert main(["report", *map(str, REFERENCE), "--doc-patch", "-o", str(tmp_path / "patch.md")]) == 0
    pasted = (tmp_path / "patch.md").read_text()
    assert pasted == wikipage.edit(matrix.document, docpatch.assess(matrix, report_data.load(REFERENCE))).text
    assert len(pasted) <= 3 * len(matrix.document.page.read_text()) and pasted.startswith("# ")


def test_the_patch_says_only_what_its_evidence_can_show():
    """Claims within the evidence: a statement about an offload mode is never judged by a CPU cell (its offload
    moved nothing), and a device whose cells never took SD.Next's path is said to be on the control path only."""
    matrix = load_matrix(SDNEXT)
    records = report_data.load(sorted((REPO / "results" / "reference").glob("*.jsonl*")))
    assert set(records.frame["path"]) == {"sdnext", "control"}
    assert not records.frame[records.frame["device"] == "cpu"]["offload_moved"].fillna(False).any()
    patch = docpatch.assess(matrix, records)
    lines = patch.text.splitlines()
    offload_rules = {r.expect.source for r in matrix.rules if any(o != "none" for o in r.match.get("offload", ()))}
    blocks = [line for line in lines if line.startswith("- **") and line.split("(", 1)[1].split("): ")[0]
              in offload_rules]
    assert len(blocks) >= 5
    for block in blocks:  # measured on cuda only, or not measured with what is missing
        checked = block.split("): ", 1)[1]
        assert " on cpu " not in checked and "cpu (" not in checked.split("Measured with")[0], block
        assert "not measured" not in block or "cell(s) left out: on the CPU the offload's hooks run" in block \
            or "no record" in block or "needs" in block, block
    assert not re.search(r"/tmp/|/home/|/root/|site-packages|\.venv|/work/", patch.text)  # no local path
    cuda = [s for s in lines if "Suggested: " in s and "cuda" in s]
    assert cuda and all("cuda (control path only)" in s for s in cuda)  # no reference CUDA cell is a pipeline


def test_doc_patch_of_every_reference_record_can_be_pasted():
    """`report results/reference/*.jsonl* --doc-patch`: one sentence of at most 200 characters per suggestion, no
    error text cut, the compatibility table and the note on removed engines, and no statement judged by a failure
    the float model shares."""
    matrix = load_matrix(SDNEXT)
    records = report_data.load(sorted((REPO / "results" / "reference").glob("*.jsonl*")))
    text = docpatch.render(matrix, records)
    suggestions = [line.split("Suggested: ", 1)[1] for line in text.splitlines() if "Suggested: " in line]
    assert suggestions and all(len(s) <= 200 and s.count(". ") == 0 and s.endswith(".") for s in suggestions)
    assert "…" not in text and not re.search(r"expected one of:\s*(\||$)", text, re.M)  # no text cut off
    # sentences that parse and count cells: no device list matched by the rule beside the devices measured, no
    # "- compile" for an axis at its omitted value, no "other outcome(s)" counting kinds
    assert not any(re.search(r" on \w+ or \w+.*, on ", s) for s in suggestions), suggestions
    assert "- compile" not in text and "a - LoRA" not in text and "other outcome" not in text
    assert "| BitsAndBytes | " in text and "### cpu, through diffusers" in text  # engine x offload per stack
    assert "release removed BitsAndBytes, Optimum-Quanto, torchao and NNCF" in text
    # the float model fails on the CPU under diffusers' sequential offload (accelerate's cpu:0, a TypeError), and
    # so do the quantized cells there: that failure is the offload's, so no statement is judged by it
    newest = docpatch.judged(matrix, records)
    failed = docpatch.failures(newest)
    base = newest[(newest["engine"] == "none") & (newest["offload"] == "sequential") & (newest["stack"] == "diffusers")
                  & (newest["device"] == "cpu")]
    assert len(base) and set(base["error_type"]) == {"TypeError"}
    unjudged = [dataclasses.replace(rule, judges={}, judged_claims=()) for rule in matrix.rules]
    for index, rule in enumerate(unjudged):  # with every rule judging every cell it decides, even so
        result = docpatch.check(rule, index, newest, failed, matrix)
        assert not any("invalid combination of arguments" in row for row in result.table), rule.expect.source
    post_load = next(i for i, r in enumerate(matrix.rules) if "post-load quantization" in (r.expect.source or ""))
    lines = " ".join(docpatch.check(unjudged[post_load], post_load, newest, failed, matrix).lines)
    assert re.search(r"\d+ cell\(s\) left out: the float model fails the same way", lines)
    # a statement of speed judged by its latency claim only: no failing cell decides it
    speed = next(i for i, r in enumerate(matrix.rules) if r.judged_claims == ("not-slower",))
    assert "fails with" not in " ".join(docpatch.check(matrix.rules[speed], speed, newest, failed, matrix).table)


def test_upstream_report_no_longer_reproducing_since_a_version_set(cpu_results, tmp_path):
    base = next(r for r in records_of(cpu_results) if r["verdict"] == "ok" and r["cell"]["engine"] == "gguf")
    source = "diffusers#14691: GGUF + enable_sequential_cpu_offload raises KeyError: None"
    nights = []
    for night, (diffusers, verdict) in enumerate([("0.42.1", "documented-error"), ("0.42.1", "documented-error"),
                                                  ("0.43.0", "drift-works"), ("0.44.0", "drift-works")]):
        r = copy.deepcopy(base)
        r.update(run=f"night{night}", started=f"2026-11-2{night}T00:00:00+00:00", verdict=verdict)
        r["env"]["diffusers"] = diffusers
        r["expect"] = {"kind": "error", "pattern": "KeyError", "source": source}
        if verdict == "documented-error":
            r.update(metrics=None, error={"type": "KeyError", "message": "None", "where": "", "stage": "forward"})
        nights.append(r)
    reports = statements.upstream(report_data.load([write(tmp_path / "n.jsonl", nights)]).frame)
    assert len(reports) == 1 and reports[0].references == ["diffusers#14691"]
    assert reports[0].status == "no longer reproduces" and reports[0].seen
    assert "diffusers 0.43.0" in reports[0].since  # the first version set without it, not the newest
    still = statements.upstream(report_data.load([write(tmp_path / "m.jsonl", nights[:2])]).frame)
    assert still[0].status == "still reproduces" and still[0].since is None
    html = build(report_data.load([tmp_path / "n.jsonl"]), tmp_path / "site").read_text()
    section = html[html.index('id="upstream"'):html.index('id="integration"')]
    assert "diffusers#14691" in section and "candidate to close" in section


def test_compare_flags_an_offload_mode_made_slower_by_its_baseline(cpu_results, tmp_path):
    old = records_of(cpu_results)
    new = copy.deepcopy(old)
    for r in new:
        r["run"] = "tonight"
    target = next(r for r in new if r["cell"]["engine"] == "none" and r["cell"]["offload"] == "model"
                  and r["verdict"] == "ok" and r["cell"]["load"] == "post-load")
    # e.g. an accelerate release makes model offload 3x slower: the baseline's pair with the float model without
    # offload shows it
    assert target["metrics"]["latency_vs_float"]["against"] == target["id"].replace("/model/", "/none/")
    slow_down(target, 3)
    a, b = write(tmp_path / "old.jsonl", old), write(tmp_path / "new.jsonl", new)
    changes = compare(report_data.load([a]), report_data.load([b]))
    assert [(c.kind, c.id) for c in changes.items] == [("slower", target["id"])]
    assert "above the old interval" in changes.items[0].new
    assert main(["compare", str(a), str(b)]) == 1


def test_peak_memory_must_order_by_offload_mode_as_diffusers_tests_expect(cpu_results, tmp_path):
    from harness.report.overview import memory_order

    base = next(r for r in records_of(cpu_results) if r["verdict"] == "ok" and r["cell"]["engine"] == "none")
    cells = []
    for offload, peak in [("none", 8), ("model", 6), ("group", 3), ("balanced", 4), ("sequential", 1)]:
        r = copy.deepcopy(base)
        r["cell"].update(offload=offload, device="cuda")
        r["id"] = r["id"].replace("/cpu/", "/cuda/").replace(f"/{base['cell']['offload']}/", f"/{offload}/")
        r["metrics"].update(peak_mem_bytes=peak * 2**30, mem_base_bytes=0)
        cells.append(r)
    [held] = memory_order(report_data.load([write(tmp_path / "a.jsonl", cells)]).latest())
    assert held.broken == [] and set(held.peaks) == {"none", "model", "group", "balanced", "sequential"}
    assert held.device == "cuda" and held.cell.startswith("none · ")  # the combination names its engine
    html = build(report_data.load([tmp_path / "a.jsonl"]), tmp_path / "held").read_text()
    heading = "Peak memory by offload mode: {} of 1 combinations order as diffusers' tests expect"
    assert text_of(element(html, "h3", "memory-order")) == heading.format(1) and 'id="memory-order-broken"' not in html
    cells[4]["metrics"]["peak_mem_bytes"] = 7 * 2**30  # sequential above model, group and balanced
    [broken] = memory_order(report_data.load([write(tmp_path / "b.jsonl", cells)]).latest())
    assert broken.broken == ["sequential (7.00 GiB) above model (6.00 GiB)",
                             "sequential (7.00 GiB) above group (3.00 GiB)",
                             "sequential (7.00 GiB) above balanced (4.00 GiB)"]
    html = build(report_data.load([tmp_path / "b.jsonl"]), tmp_path / "site").read_text()
    assert text_of(element(html, "h3", "memory-order")) == heading.format(0)
    [item] = [text_of(li) for li in element(html, "ul", "memory-order-broken").split("<li>")[1:]]
    assert item == f"{broken.cell} on {broken.device} ({broken.machine}): " + "; ".join(broken.broken)


def test_the_same_records_build_the_same_site(tmp_path):
    """A committed example changes only when its records do (no timestamps in the page or the plots)."""
    a, b = (build(report_data.load(REFERENCE), tmp_path / name) for name in ("a", "b"))  # read twice: no cache shared
    assert a.read_text() == b.read_text()
    plots = sorted(p.name for p in (tmp_path / "a" / "plots").glob("*.svg"))
    assert plots and all((tmp_path / "a" / "plots" / p).read_bytes() == (tmp_path / "b" / "plots" / p).read_bytes()
                         for p in plots)


def test_the_fault_engines_test_cells_reach_no_count(tmp_path):
    """The committed H200 fault cell (a hang, on purpose) is shown under its machine in a section of its own, and
    counted nowhere: not in the verdict counts, the overview, the answer table or the engine table."""
    fault = REPO / "results" / "reference" / "h200-fault-hang.jsonl"
    records = report_data.load([fault, *REFERENCE, REPO / "results" / "reference" / "cpu-default.jsonl.gz"])
    # its run never named its GPU (the cell hung first): it is the H200 box's, not the Intel CPU host's
    assert set(records.frame[records.frame["engine"] == "fault"]["machine"]) == {"vm · NVIDIA H200"}
    index = build(records, tmp_path / "site")
    html = index.read_text()
    counts = element(html, "table", "verdict-counts")
    assert re.search(r'data-verdict="hang">0<', counts), counts
    assert "fault" not in element(html, "table", "answer-table")
    grids = index.with_name("grids.html").read_text()
    test_only = grids[grids.index('<section id="test-only">'):]  # in a section of its own, after every grid
    assert "fault-hang/post-load/none/cuda/dit-xs/float32" in test_only
    assert "fault-hang" not in grids[:grids.index('<section id="test-only">')]
    assert not re.search(r"\bnan\b", html)  # a field a record lacks is "-" or "absent", never pandas' NaN


def test_memory_is_a_cost_only_where_the_weights_dominate_the_peak():
    """A toy model's peak is activations and the process (flux-tiny's 4 MB of weights under a 74 MiB RSS peak):
    its memory ratios are left out; where the weights hold most of the float model's peak (dit-mem on a CPU,
    dit-l on the H200) they are shown, and what stays resident after loading is what the format stores."""
    frame = report_data.load(sorted((REPO / "results" / "reference").glob("*.jsonl*"))).frame
    ran = frame[frame["verdict"].isin(report_data.RAN) & (frame["engine"] != "none")]
    cpu = ran[ran["device"] == "cpu"]
    toy = cpu[cpu["model"] != "dit-mem"]
    assert toy["mem_ratio"].isna().all()
    assert (toy["weights_share"].dropna() < report_data.WEIGHTS_DOMINATE).all()
    for large in (cpu[cpu["model"] == "dit-mem"], ran[(ran["model"] == "dit-l") & (ran["offload"] == "none")]):
        assert len(large) > 1 and large["mem_ratio"].notna().all()
        assert (large["weights_share"] >= report_data.WEIGHTS_DOMINATE).all()
        assert large["mem_ratio"].median() < 1  # quantized: less than the float model's peak
    # on the CPU (glibc's freed pages returned before each reset), what stays resident after loading is the stored
    # weights and little else, for all but an engine that keeps more than it stores (said in its row)
    mem = cpu[cpu["model"] == "dit-mem"]
    close = (mem["resident_mem_bytes"] - mem["param_bytes"]).abs() < 0.5 * mem["param_bytes"]
    assert close.sum() >= len(mem) - 1, mem[~close][["id", "resident_mem_bytes", "param_bytes"]]
    default = report_data.load([REPO / "results" / "reference" / "cpu-default.jsonl.gz"])
    table = render(default)
    sections = re.split(r"^## ", table, flags=re.M)
    machine = default.frame.loc[default.frame["model"] == "dit-mem", "machine"].unique()
    assert [sec.split("\n", 1)[0] for sec in sections if "x mem" in sec] == [f"{machine[0]}: cpu, dit-mem, bfloat16"]


def test_the_wiki_page_as_it_should_read_and_a_diff_that_applies(tmp_path):
    """`report --wiki DIR`: the page the rules state, edited from the records (removed engines out, SDNQ first,
    each broken or drifted statement replaced by its measured sentence), and a diff that applies to the kept page;
    no local path, no CUDA claim beyond the path its cells took, at most three times the page's length."""
    page = REPO / "docs" / "sdnext-wiki-quantization.md"
    references = sorted((REPO / "results" / "reference").glob("*.jsonl*"))
    assert main(["report", *map(str, references), "--wiki", str(tmp_path / "wiki")]) == 0
    edited = (tmp_path / "wiki" / page.name).read_text()
    diff = tmp_path / "wiki" / f"{page.stem}.diff"
    applied = subprocess.run(["git", "apply", "--check", "--verbose", str(diff)], cwd=REPO, capture_output=True,
                             text=True)
    assert applied.returncode == 0, applied.stderr
    if shutil.which("patch"):  # and what it makes of the kept page is the edited page
        out = tmp_path / "patched.md"
        subprocess.run(["patch", "-s", "-o", str(out), str(page), str(diff)], check=True)
        assert out.read_text() == edited
    assert len(edited) <= 3 * len(page.read_text())
    assert not re.search(r"/tmp/|/home/|/root/|site-packages|\.venv|/work/", edited + diff.read_text())
    headings = [line for line in edited.splitlines() if line.startswith("#")]
    assert not {"### BitsAndBytes", "### Optimum-Quanto", "### NNCF"} & set(headings)
    assert "release removed BitsAndBytes, Optimum-Quanto, torchao and NNCF" in edited
    engines = headings[headings.index("## Quantization Engines") + 1:]
    assert [h for h in engines if h.startswith("### ")][0] == "### SDNQ"
    assert "Quanto qint quantization is not compatible" not in edited  # a removed engine's statement, gone
    assert "compute-optimization" in edited  # a statement naming no removed engine stays
    measured = [line for line in edited.splitlines() if "*(measured by quantmatrix)*" in line]
    assert measured and all("cuda" not in line or "cuda (control path only)" in line for line in measured)
    untouched = "`gguf` does not provide native GPU kernels which means that `gguf` is purely a *storage optimization*"
    assert untouched in edited  # a statement no rule changed, as written
    site = build(report_data.load(references), tmp_path / "site", rules=load_matrix(SDNEXT))
    assert f'href="wiki/{page.name}"' in site.read_text() and (tmp_path / "site" / "wiki" / diff.name).is_file()


def test_the_first_screen_answers_and_the_tables_filter_to_one_engine_in_a_browser(tmp_path):
    """The committed example's page stays under 500 KB (grids on grids.html, per-cell detail and the table's rows
    in cells.js); its first screen (1400 x 1000) says what was measured, and its first table answers "SDNQ uint4
    with balanced offload on CUDA" with its figures or "not measured"; the answer table and the table of every cell
    filter to one engine."""
    references = sorted((REPO / "results" / "reference").glob("*.jsonl*"))
    records = report_data.load(references)
    index = build(records, tmp_path / "site", rules=load_matrix(SDNEXT))
    assert index.stat().st_size < 500_000
    latest = records.latest()

    def visit(page):
        coverage = page.inner_text("#coverage"), page.eval_on_selector("#not-measured",
                                                                       "e => e.getBoundingClientRect().bottom")
        table_top = page.eval_on_selector("#answer-table", "e => e.getBoundingClientRect().top")
        page.select_option("#answer-offload", "balanced")
        page.select_option("#answer-engine", "sdnq")
        answers = page.eval_on_selector_all(
            "#answer-table tbody:not([hidden]) tr:not([hidden])",
            "rs => rs.map(r => [r.dataset.engine, r.dataset.qtype, ...Array.from(r.cells).slice(2).map("
            "c => [c.dataset.class, c.dataset.verdict, c.textContent])])")
        total = page.eval_on_selector_all("#cells-table tbody tr", "rs => rs.length")
        page.select_option("#cells-filters select[data-column='0']", "sdnq")
        page.select_option("#cells-filters select[data-column='2']", "balanced")
        rows = page.eval_on_selector_all("#cells-table tbody tr:not([hidden])",
                                         "rs => rs.map(r => [r.cells[0].textContent, r.cells[2].textContent])")
        return coverage, table_top, answers, total, rows, page.inner_text("#cells-shown")

    ((covered, bottom), top, answers, total, rows, said), errors, _ = open_report(index, tmp_path, visit)
    assert errors == [] and total == len(latest)
    # the first screen says what was measured and what not: SD.Next's path on CUDA was not
    assert bottom < 1000 and top < 1000 and "cuda through SD.Next's path (the diffusers stack on a whole pipeline)" \
        in covered
    assert re.search(r"cuda\s+1\s+\d+\s+dit-l \(2\.1 B\)", covered), covered  # machines, cells, scale
    sdnq = latest[(latest["engine"] == "sdnq") & (latest["offload"] == "balanced") & ~latest["device_absent"]]
    assert {(e, q) for e, q, *_ in answers} == {("sdnq", q) for q in sdnq["qtype"]}
    uint4 = {c: (verdict, text) for c, verdict, text in next(a for a in answers if a[1] == "uint4")[2:]}
    assert uint4["cuda"] == ("not measured", "not measured")  # no CUDA record of it: said, not guessed
    ran = sdnq[(sdnq["qtype"] == "uint4") & (sdnq["device"] == "cpu") & (sdnq["verdict"] != "unavailable")]
    right = ran["verdict"].isin(report_overview.RIGHT).sum()
    assert uint4["cpu"][1].startswith(f"{'✓' if right == len(ran) else '⚠'}{right}/{len(ran)}")
    assert "nothing moved" in uint4["cpu"][1]  # a CPU's offload moved nothing: its evidence says so
    wanted = latest[(latest["engine"] == "sdnq") & (latest["offload"] == "balanced")]
    drawn = min(len(wanted), 200)  # the page draws at most 200 rows at once and says so
    assert len(rows) == drawn > 0 and set(map(tuple, rows)) == {("sdnq", "balanced")}
    assert said == f"{len(wanted)} of {len(latest)} cells shown." + (
        " The first 200 are drawn: filter to see the others." if len(wanted) > 200 else "")


def test_no_statement_is_judged_by_a_treatment_it_does_not_name():
    """A statement about an engine (NNCF "works on any platform") is judged by its own cells, never by what
    compile, a LoRA, layerwise casting or quantized text encoders do to them: those cells are left out, and said
    to be; the table's errors are one line each."""
    matrix = load_matrix(SDNEXT)
    records = report_data.load(sorted((REPO / "results" / "reference").glob("*.jsonl*")))
    newest = docpatch.judged(matrix, records)
    failed = docpatch.failures(newest)
    nncf = next(i for i, r in enumerate(matrix.rules) if r.expect.source == "seed: NNCF (storage-only, works on any "
                                                                                 "platform)")
    mine = newest[newest["rule"] == nncf]
    treated = mine[(mine["compile"] != "-") | (mine["lora"] != "-") | (mine["cast"] != "-")
                   | (mine["components"] != "denoiser")]
    assert len(treated) > 0  # the records hold NNCF cells with compile and a LoRA
    result = docpatch.check(matrix.rules[nncf], nncf, newest, failed, matrix)
    assert f"{len(treated)} cell(s) left out: they add what the statement does not name" in " ".join(result.lines)
    for index, rule in enumerate(matrix.rules):
        named = set(rule.match) | set(rule.judges)
        table = docpatch.check(rule, index, newest, failed, matrix).table or []
        for row in table[2:]:
            combination, happened = row.split(" | ")[1], row.split(" | ")[3]
            for axis, word in (("compile", "compile"), ("lora", "LoRA"), ("cast", "layerwise casting")):
                assert axis in named or word not in combination, (rule.expect.source, row)
            assert "\n" not in happened and "Explanation:" not in happened, row  # the error's first line only


def test_a_statement_of_loading_is_not_judged_by_a_type_wrong_however_loaded():
    """"Pre-quantized type is auto-determined" speaks of loading: a type whose output is wrong loaded post-load
    too (quanto qint2 on the toy models) is left out, and said to be; a wrong output only when pre-quantized
    would still judge it."""
    matrix = load_matrix(SDNEXT)
    records = report_data.load(sorted((REPO / "results" / "reference").glob("*.jsonl*")))
    newest = docpatch.judged(matrix, records)
    failed = docpatch.failures(newest)
    index = next(i for i, r in enumerate(matrix.rules) if r.match.get("load") == ("prequantized",)
                 and "engine" not in r.match)
    rule = matrix.rules[index]
    mine = newest[(newest["rule"] == index) & (newest["offload"] == "none")]
    wrong = [r for r in report_data.row_dicts(mine, (*AXES.names, "machine", "cell_id", "recorded_verdict"))
             if r["recorded_verdict"] == "wrong-output" and rule.untreated(SimpleNamespace(**r))]
    assert wrong and all(docpatch.wrong_in_every_load(r, failed) for r in wrong)
    text = " ".join(docpatch.check(rule, index, newest, failed, matrix).lines)
    assert f"{len(wrong)} cell(s) left out: their type runs to a wrong output however it is loaded" in text
    assert "wrong output" not in text.split("left out")[0]
    # its twins loaded otherwise made right: the wrong output is the load's, and judges the statement
    for r in wrong:
        for load in ("post-load", "on-the-fly"):
            twin = Cell(**{k: r[k] for k in AXES.names}).replace(load=load).id
            failed[(r["machine"], twin)] = failed[("*", twin)] = ""
    assert not any(docpatch.wrong_in_every_load(r, failed) for r in wrong)
    assert "run to a wrong output" in " ".join(docpatch.check(rule, index, newest, failed, matrix).lines)
