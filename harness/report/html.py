"""The HTML report: a static site built from result records only (no server, no network, no CDN).

    quantmatrix report RESULTS... -o reports/<name>/ [--previous OLD_RESULTS...] [--rules MATRIX]

writes index.html (first what the records cover and the answer table: engine and type by device class, one offload
mode at a time; then verdict counts, engines by offload mode, the plots users choose by; drift by statement, the
upstream bug reports, the integration's breakages, the wiki patch's preview, environments, a sortable table of the
cells), grids.html (a compatibility grid per machine and device, each cell's figures a click away; the fault
engine's test cells apart), cells.js (those figures and the table's rows), doc-patch.md (when the rules file
states a page), cells.csv (the cells shown) and plots/*.svg. Every string from a record goes through Jinja2's
autoescaping (text and attributes) or `tojson` (the one data island read by the page's script), and the script
writes record text with textContent only, so an error message can never become markup.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from types import SimpleNamespace

import jinja2
import pandas as pd

from harness.cell import AXES, BASELINE
from harness.matrix import Matrix
from harness.report import data as report_data
from harness.report import overview as report_overview
from harness.report import plots as report_plots
from harness.report import statements as report_statements
from harness.report import upstream as report_upstream
from harness.report.statements import Finding
from harness.stacks.catalog import packages_needed

# verdict -> (symbol, short label, css class): colour *and* symbol, for grey print and colour-blind readers; every
# symbol is in DejaVu Sans, the default font of Debian and Ubuntu desktops (tests/test_report.py checks in chromium)
VERDICTS = {
    "ok": ("✓", "ok", "ok"),
    "documented-error": ("⊘", "fails as documented", "doc"),
    "drift-works": ("↗", "drift: works now", "drift"),  # three drifts, three symbols
    "drift-error": ("↯", "drift: other error", "drift"),
    "drift-claim": ("≉", "drift: claim does not hold", "drift"),
    "fail": ("✗", "fails", "fail"),
    "wrong-output": ("≠", "runs, wrong output", "fail"),
    "crash": ("✗", "crashed", "fail"),
    "timeout": ("◷", "timed out", "fail"),
    "hang": ("✗", "hung (no CPU progress)", "fail"),
    "oom": ("✗", "out of memory", "fail"),
    "interrupted": ("…", "interrupted", "na"),
    "unavailable": ("–", "unavailable here", "na"),
}


def _num(value, fmt: str) -> str:
    return format(value, fmt) if report_data.finite(value) else ""


def _paired(row) -> str:
    """The cell's latency against its float model: the paired ratio and its interval, or why there is none."""
    if row["latency_pairing"] == "paired":
        return (f"{_num(row['latency_paired'], '.2f')}x its float model timed beside it (90% interval "
                f"{_num(row['latency_lo'], '.2f')}-{_num(row['latency_hi'], '.2f')}, {row['latency_pairs']:.0f} pairs)")
    if row["latency_pairing"] == "unpaired":
        return f"not paired: {row['latency_unpaired']}"
    return f"{_num(row['latency_ratio'], '.2f')}x baseline (timed apart: a record from before pairing)"


def _mib(value) -> str:
    return f"{value / 2**20:.1f} MiB" if report_data.finite(value) else ""


def _above(row) -> str:
    """Why a quantized cell's generation peak exceeds its float model's: more stays resident than it stores, or
    the steps' transients (weights dequantized for each forward) outgrow what the format saves."""
    finite = report_data.finite
    if not (finite(row["mem_ratio"]) and row["mem_ratio"] > 1 and finite(row["resident_mem_bytes"])):
        return ""
    kept = row["resident_mem_bytes"] - row["param_bytes"]
    if kept > 0.25 * row["param_bytes"]:
        return f"; above it: {_mib(kept)} resident beyond the {_mib(row['param_bytes'])} it stores"
    return (f"; above it: {_mib(row['run_mem_bytes'] - row['resident_mem_bytes'])} of the steps' transients (the "
            "weights dequantized for each forward) beside its resident weights")


def _measured(row) -> list[tuple[str, str]]:
    """The figures of a cell that ran: storage, memory, latency, output error, and its treatments' figures."""
    out = [
        ("stored", f"{_mib(row['param_bytes'])} ({_num(row['bytes_ratio'], '.2f')}x baseline), "
                   f"{_num(row['bits_per_weight'], '.2f')} bits/weight"),
        ("peak memory", f"{_mib(row['run_mem_bytes'])} above start generating"
                        + (f" ({_mib(row['resident_mem_bytes'])} resident after loading, the rest the steps' "
                           "transients)" if report_data.finite(row["resident_mem_bytes"]) else "")
                        + f", {_mib(row['own_mem_bytes'])} with loading ({row['mem_kind']}); "
                        + (f"{_num(row['mem_ratio'], '.2f')}x baseline" if report_data.finite(row['mem_ratio'])
                           else "no ratio: the weights are under half the float model's peak")
                        + _above(row)),
        ("latency", f"{_num(row['latency_ms'], '.2f')} ms median (p10 {_num(row['latency_p10_ms'], '.2f')}, "
                    f"p90 {_num(row['latency_p90_ms'], '.2f')}), " + _paired(row)),
        ("output error", ("of a checkpoint's weights (floors calibrated on seeded ones): "
                          if row["weights"] == "checkpoint" else "")
                         + f"SQNR {_num(row['sqnr_db'], '.1f') or 'exact'} dB, cosine {_num(row['cosine'], '.5f')}"
                         + (f", image PSNR {_num(row['psnr_db'], '.1f') or 'exact'} dB"
                            if report_data.finite(row["psnr_db"]) or row["phases"] else "")
                         + (f", SSIM {_num(row['ssim'], '.4f')}" if report_data.finite(row["ssim"]) else "")
                         + (f", MS-SSIM {_num(row['ms_ssim'], '.4f')}" if report_data.finite(row["ms_ssim"]) else "")
                         + (f"; video: worst frame {_num(row['frames_min_psnr_db'], '.1f')} dB, motion (frame "
                            f"differences) {_num(row['temporal_psnr_db'], '.1f')} dB"
                            if report_data.finite(row["frames_min_psnr_db"]) else "")),
    ]
    if report_data.finite(row["compile_first_s"]):
        out.append(("compile", f"first call {_num(row['compile_first_s'], '.1f')} s (tracing and building), "
                               f"{row['compile_graphs']:.0f} graphs, "
                               f"{row['compile_graph_breaks']:.0f} graph breaks, "
                               f"{row['compile_recompiles']:.0f} recompiles; steps "
                               f"{_num(row['vs_uncompiled'], '.2f')}x the same cell uncompiled, timed beside it "
                               f"(90% interval {_num(row['vs_uncompiled_lo'], '.2f')}-"
                               f"{_num(row['vs_uncompiled_hi'], '.2f')})"))
    if report_data.finite(row["lora_effect_db"]):
        out.append(("LoRA", f"{row['lora_layers']:.0f} layers; it moves the float model's output to SQNR "
                            f"{_num(row['lora_effect_db'], '.1f')} dB; this output against the float model "
                            f"without it: {_num(row['lora_without_db'], '.1f') or 'exact'} dB; weights on "
                            f"{_or(row['lora_devices'], 'none left (merged)')}, base layers on "
                            f"{_or(row['lora_base_devices'], '?')}"))
    if row["phases"]:  # a pipeline: its generation's phases and the components it quantized
        out.append(("phases", row["phases"]))
        out.append(("quantized", row["quantized_components"] or "nothing"))
    if row["claims"]:
        out.append(("claims", row["claims"]))
    return out


def figures(row, script: report_upstream.Script | None = None) -> list[tuple[str, str]]:
    """The figures of one cell, as (label, text) pairs, for its hover and detail panel; `script`: its standalone
    reproduction (a failing, drifting or erroring cell), linked from the panel, or why it has none."""
    pattern = row["pattern"] if isinstance(row["pattern"], str) else None
    out = [("verdict", row["verdict"]), ("expected", row["expect"] + (f" /{pattern}/" if pattern else "")),
           ("note", row["note"])]
    if row["source"]:
        out.append(("documented in", row["source"]))
    if row["verdict"] in report_data.RAN:
        out += _measured(row)
    if row["error_type"]:
        out.append(("error", f"{row['error_type']}: {row['error_message']}"))
        if row["error_layer"]:
            out.append(("raised in", row["error_layer"]))
    if row["integration_broke"]:
        out.append(("which layer broke", "diffusers' integration: the same combination works on the direct stack "
                                         "(the engine's own API) in this run"))
    if row["warnings"]:
        out.append(("warnings", row["warnings"]))
    elif row["reason"]:
        out.append(("reason", row["reason"]))
    if row["stacks"]:  # a cell killed at its timeout: what every thread was doing
        out.append(("threads' stacks at the timeout", row["stacks"]))
    found = row["engine_version"]  # NaN for the baseline (no engine package)
    versions = f"torch {row['torch']}" + ("" if row["engine"] == BASELINE else
                                          f", {row['engine']} {found if isinstance(found, str) and found else '-'}")
    if "diffusers" in packages_needed(SimpleNamespace(**{a: row[a] for a in AXES.names})):
        versions += f", diffusers {_or(row['diffusers'], '-')}"
    out.append(("versions", versions + f", accelerate {_or(row['accelerate'], '-')}"))
    out.append(("run", f"{row['run']} ({row['started']})"))
    if script is not None:
        out.append(("reproduce", script.path or f"no standalone script: {script.why_not}"))
        if script.path and script.cell != row["id"]:
            out.append(("the script runs", f"{script.cell}: the same failure (error, raising layer and engine, "
                                           "or the float model's where it fails so too)"))
    return out


def _short(row) -> str:
    """What the grid cell shows beside the symbol: figures of a cell that ran, the error type (or the reason's
    first words) of one that did not."""
    if row["verdict"] in report_data.RAN:
        bits = _num(row["bits_per_weight"], ".1f")
        lat = _num(row["latency_ratio"], ".1f")
        return f"{bits}b" + (f" {lat}x" if lat else "")
    if row["verdict"] in ("unavailable", "interrupted"):
        return ""
    if row["error_type"]:
        return row["error_type"][:28]
    words = (row["reason"] or row["verdict"]).split()
    return " ".join(words[:3])[:28]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def grid_anchor(machine: str, versions: str, device: str, prefix: str = "grid-") -> str:
    """The id of the detail grid of one machine, version set and device (on grids.html)."""
    return prefix + _slug(f"{machine}-{versions}-{device}")


def grids(latest: pd.DataFrame, scripts: dict | None = None, prefix: str = "grid-") -> list[dict]:
    """One grid per machine and device: rows model/dtype, engine-qtype, load; columns the offload modes; one cell
    per record. Devices a machine lacks (all its cells 'device ...: absent') are listed, not drawn. `scripts`:
    the cells' reproductions by (machine, versions, id) (upstream.write_scripts); `prefix`: of the grids' ids."""
    out = []
    several = latest.groupby("machine")["versions"].nunique()
    for (machine, versions, device), rows in latest.groupby(["machine", "versions", "device"], sort=True):
        if report_data.all_device_absent(rows):
            continue
        names = rows["device_name"].dropna()
        offloads = report_data.offload_order(rows["offload"])
        # plain dicts: reading a field of a pandas row costs microseconds, and a 10,000-record site reads 400,000
        tree: dict[tuple, dict[tuple, dict]] = {}
        line_axes = report_data.line_axes()
        for row in report_data.row_dicts(rows, rows.columns):
            line = tree.setdefault((row["model"], row["dtype"]), {}).setdefault(
                tuple(row[a] for a in line_axes), {})
            line[row["offload"]] = row
        body = []
        for (model, dtype) in sorted(tree):
            lines = []
            for values, by_offload in tree[(model, dtype)].items():
                line = dict(zip(line_axes, values, strict=True))
                engine, qtype, how = line["engine"], line["qtype"], report_data.how_run(line)
                lines.append({"label": engine if qtype == "-" else f"{engine} {qtype}", "load": how,
                              "cells": [_grid_cell(by_offload.get(o), scripts) for o in offloads]})
            lines.sort(key=lambda line: (line["label"] != "none", line["label"], line["load"]))
            body.append({"model": model, "dtype": dtype, "lines": lines})
        out.append({"machine": machine, "device": device, "device_name": names.iloc[0] if len(names) else device,
                    "versions": versions if several[machine] > 1 else None,
                    "id": grid_anchor(machine, versions, device, prefix), "offloads": offloads, "groups": body,
                    "count": len(rows)})
    return out


DETAILS = "cells.js"  # each grid cell's figures, beside the pages: a script sets window.QM_* (file:// too)


def _details_beside(grid_list: list[dict], table: list[list[str]], out_dir: Path) -> list[dict]:
    """Move every grid cell's figures, and the rows of the table of every cell, out of the pages into DETAILS:
    inline, they were 1.5 and 0.45 MB of the committed example's 2.5 MB page. Every distinct text is written once
    (QM_TEXT; figures and rows hold its index: warnings, versions and notes repeat over hundreds of cells), the
    figures in the order of the grid cells' `data-key`. JSON is JavaScript; record text stays in strings, and the
    pages' scripts set it as text only."""
    texts: dict[str, int] = {}

    def index(text: str) -> int:
        return texts.setdefault(text, len(texts))

    figures: list[list[list[int]]] = []
    for grid in grid_list:
        for group in grid["groups"]:
            for line in group["lines"]:
                for cell in filter(None, line["cells"]):
                    cell["key"] = len(figures)
                    figures.append([[index(label), index(text)] for label, text in cell.pop("figures")])
    rows = [[index(value) for value in row] for row in table]

    def js(value) -> str:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))

    (out_dir / DETAILS).write_text(f"window.QM_TEXT = {js(list(texts))};\nwindow.QM_FIGURES = {js(figures)};\n"
                                   f"window.QM_ROWS = {js(rows)};\n", encoding="utf-8")
    return grid_list


def _grid_cell(row, scripts: dict | None = None) -> dict | None:
    if row is None:
        return None
    symbol, label, css = VERDICTS.get(row["verdict"], ("?", row["verdict"], "na"))
    script = (scripts or {}).get((row["machine"], row["versions"], row["id"]))
    return {"symbol": symbol, "label": label, "css": css, "short": _short(row), "verdict": row["verdict"],
            "id": row["id"], "figures": figures(row, script)}


def environments(frame: pd.DataFrame) -> list[dict]:
    out = []
    frame = frame[["machine", "started", "host", "os", "python", "torch", "triton", "engines", "diffusers",
                   "accelerate", "device", "device_name", "driver", "id", "run"]]  # sorting every column cost 0.1 s
    lasts = frame.sort_values("started").drop_duplicates("machine", keep="last").set_index("machine")
    devices = frame.dropna(subset=["device_name"]).drop_duplicates(["machine", "device"])
    spans = frame.groupby("machine").agg(first=("started", "min"), last=("started", "max"), records=("id", "size"),
                                         runs=("run", lambda runs: sorted(set(runs))))
    for machine in sorted(lasts.index):
        last, span = lasts.loc[machine], spans.loc[machine]
        mine = devices[devices["machine"] == machine]
        out.append({
            "machine": machine, "host": last["host"], "os": last["os"], "python": last["python"],
            "torch": last["torch"], "triton": _or(last["triton"], "absent"), "engines": last["engines"],
            "stack": f"diffusers {_or(last['diffusers'], 'absent')}, accelerate {_or(last['accelerate'], 'absent')}",
            "devices": [(d, _or(n, "?"), _or(r, "")) for d, n, r in zip(mine["device"], mine["device_name"],
                                                                        mine["driver"], strict=True)],
            "runs": span["runs"], "first": span["first"], "last": span["last"], "records": int(span["records"]),
        })
    return out



# cells.csv: the cells shown (the newest record of each), their identity, verdict, figures and environment (not the
# long texts: output tails, threads'
# stacks, warnings; they are in the records)
def csv_columns() -> list[str]:
    return ["machine", "run", "id", *AXES.names, *CSV_FIGURES]


CSV_FIGURES = ["verdict", "note", "reason", "error_type", "error_message",
               "error_layer", "expect", "source",
               "claims", "param_bytes", "disk_bytes", "bits_per_weight", "peak_mem_bytes", "own_mem_bytes",
               "run_mem_bytes", "resident_mem_bytes",
               "mem_kind", "weights", "latency_ms", "latency_p10_ms", "latency_p90_ms", "sqnr_db", "cosine", "psnr_db",
               "ssim", "ms_ssim", "frames_min_psnr_db", "temporal_psnr_db", "quantize_s",
               "load_s", "bytes_ratio", "mem_ratio", "latency_ratio", "mem_vs_none", "latency_vs_none",
               "integration_broke", "host", "device_name", "versions", "started", "duration_s"]

# What a spreadsheet reads as a formula at the start of a cell (OWASP's CSV injection): such text is prefixed with
# a quote. The axes' values and ids are known values (records that carry others are refused) and stay as they are.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


# Figures to six significant digits (no measurement here has more); byte counts as whole numbers
CSV_FLOAT = "%.6g"


def csv_table(latest: pd.DataFrame) -> pd.DataFrame:
    """cells.csv's rows: the columns above, byte counts as integers, every text spreadsheet-safe."""
    table = latest[csv_columns()].copy()
    for column in [c for c in table.columns if c.endswith("_bytes")]:
        table[column] = pd.to_numeric(table[column], errors="coerce").round().astype("Int64")
    return spreadsheet_safe(table)


def spreadsheet_safe(table: pd.DataFrame) -> pd.DataFrame:
    """`table` with every text that a spreadsheet would run as a formula neutralised (a leading `'`)."""
    out = table.copy()
    for column in out.columns.difference(["id", *AXES.names]):
        out[column] = out[column].map(lambda v: "'" + v if isinstance(v, str) and v.startswith(FORMULA_START) else v)
    return out


# The page's table of every cell: its rows are in DETAILS (built by the page's script), the first FILTERED columns
# with a filter each, as pytest-html has
FILTERED = ("engine", "qtype", "offload", "device", "stack", "verdict")
TABLE_COLUMNS = [("engine", "engine"), ("qtype", "type"), ("offload", "offload"), ("device", "device"),
                 ("stack", "stack"), ("verdict", "verdict"), ("machine", "machine"), ("id", "cell"),
                 ("bits_per_weight", "bits/w"),
                 ("bytes_ratio", "size x"), ("own_mem_bytes", "peak mem B"), ("mem_ratio", "mem x"),
                 ("latency_ms", "latency ms"), ("latency_ratio", "latency x"), ("sqnr_db", "SQNR dB"),
                 ("error_message", "error")]


def _or(value, default: str) -> str:
    """A text field of a row, or `default` where the record had none (None, or pandas' NaN: never shown as "nan")."""
    return default if value is None or (isinstance(value, float) and value != value) or value == "" else str(value)


def _cell_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if report_data.finite(value) else ""
    return "" if value is None else str(value)


def build(records: report_data.Records, out_dir: Path, *, previous: report_data.Records | None = None,
          rules: Matrix | None = None, title: str = "quantmatrix report", repro_limit: int | None = None) -> Path:
    """Write the site into `out_dir`; returns index.html's path. `rules`: a matrix file whose [document] the
    records check (e.g. matrices/sdnext.toml): its wiki patch is written beside (doc-patch.md) and previewed.
    `repro_limit`: at most that many repro scripts (upstream.write_scripts)."""
    from harness.report import compare as compare_mod

    out_dir.mkdir(parents=True, exist_ok=True)
    env = _environment()
    latest = records.latest()
    broke = latest[latest["integration_broke"]]
    plots = report_plots.write_all(latest, out_dir / "plots")
    scripts = report_upstream.write_scripts(latest, out_dir, records.files, repro_limit)  # repro/*.py, in the panel
    csv = out_dir / "cells.csv"
    csv_table(latest).to_csv(csv, index=False, float_format=CSV_FLOAT)
    changes = compare_mod.compare(previous, records) if previous is not None else None
    patch, wiki, preview = _page_files(rules, records, out_dir)
    said = report_statements.statements(latest)
    if rules is not None:  # records written before rules quoted their statement: the rules file has it
        quoted = {r.expect.source: r.expect.statement for r in rules.rules if r.expect.statement}
        for statement in said:
            statement.text = statement.text or quoted.get(statement.source, "")
    counted = latest[~latest["test_only"]]  # the fault engine's test cells never reach a count (their grid shows them)
    table = [[_cell_value(v) for v in row] for row in latest[[c for c, _ in TABLE_COLUMNS]].itertuples(index=False)]
    # every cell in a grid of grids.html, beside the overview; the fault engine's test cells in a section of their own
    grid_list, test_grids = (grids(latest[latest["test_only"] == only], scripts, prefix) for only, prefix in
                             ((False, "grid-"), (True, "test-grid-")))
    _details_beside(grid_list + test_grids, table, out_dir)
    (out_dir / "grids.html").write_text(env.get_template("grids.html.j2").render(
        title=title, grids=grid_list, test_grids=test_grids, verdicts=VERDICTS), encoding="utf-8")
    html = env.get_template("report.html.j2").render(
        title=title, files=records.files, skipped=records.skipped, n_records=len(records.frame),
        coverage=report_overview.coverage(counted),
        counts=[(v, n, *VERDICTS.get(v, ("?", v, "na"))) for v, n in report_overview.counts(counted)],
        overview=_overview(counted, plots, out_dir), engines=report_overview.engines(counted),
        memory_order=report_overview.memory_order(latest[latest["device"] != "cpu"]),  # on a CPU nothing moves
        answers=report_overview.answers(counted, grid_anchor), grids=grid_list, test_grids=test_grids,
        filtered=len(FILTERED),
        drifted=[s for s in said if s.finding in (Finding.DRIFTED, Finding.BROKE)],
        held=[s for s in said if s.finding not in (Finding.DRIFTED, Finding.BROKE)],
        upstream=report_statements.upstream(records.frame),
        integration=[_grid_cell(r, scripts) | {"machine": r["machine"], "layer": r["error_layer"],
                                      "error": f"{r['error_type']}: {r['error_message']}" if r["error_type"]
                                      else r["reason"]} for _, r in broke.iterrows()],
        verdicts=VERDICTS,
        environments=environments(records.frame), columns=[label for _, label in TABLE_COLUMNS],
        csv=csv.name, changes=changes, patch=patch, preview=preview, page=_page(rules, patch), wiki=wiki,
        absent=_absent(latest),
        integration_documented=int(latest["integration_documented"].sum()))
    index = out_dir / "index.html"
    index.write_text(html, encoding="utf-8")
    return index


def _page_files(rules: Matrix | None, records: report_data.Records, out_dir: Path):
    """The judgement of the page the rules state (doc-patch.md), the page as it should read and its diff (wiki/),
    and the text the site previews: (patch, the wiki files' relative paths, preview), or (None, [], None)."""
    from harness.report import docpatch

    if rules is None or rules.document is None:
        return None, [], None
    patch = docpatch.assess(rules, records)
    (out_dir / "doc-patch.md").write_text(patch.text + "\n", encoding="utf-8")
    if rules.document.page is None:
        return patch, [], patch.text
    from harness.report import wikipage

    edited = wikipage.edit(rules.document, patch)
    written = wikipage.write(edited, out_dir / "wiki", rules.document)
    return patch, [p.relative_to(out_dir).as_posix() for p in written], edited.text


@functools.cache
def _environment() -> jinja2.Environment:
    """One Jinja2 environment per process: it keeps the template compiled (0.2 s a build otherwise)."""
    return jinja2.Environment(loader=jinja2.PackageLoader("harness.report", "templates"),
                              autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
                              undefined=jinja2.StrictUndefined)


PAGE_FINDINGS = ((Finding.BROKE, "✗", "broke", "fail"), (Finding.DRIFTED, "⚠", "drifted", "drift"),
                 (Finding.HOLDS, "✓", "hold", "ok"), (Finding.UNCHECKED, "–", "not measured", "na"))


def _page(rules: Matrix | None, patch) -> dict | None:
    """The first screen's answer: how the statements of the page the rules state came out, worst first."""
    if patch is None or rules is None or rules.document is None:
        return None
    worst = [j for j in patch.judged if j.finding in (Finding.BROKE, Finding.DRIFTED)]
    return {"title": rules.document.title, "url": rules.document.url, "file": rules.path.name,
            "counts": [(f.value, patch.tally.get(f, 0), sym, label, css) for f, sym, label, css in PAGE_FINDINGS],
            "worst": sorted(worst, key=lambda j: j.finding is not Finding.BROKE), "total": len(patch.judged)}


def _overview(latest: pd.DataFrame, plots: dict, out_dir: Path) -> list[dict]:
    """Per device class: its overview tables (one per stack) and the plots of its machines' devices beside them."""
    groups: dict[str, dict] = {}
    for table in report_overview.tables(latest, grid_anchor):
        group = groups.setdefault(table.device, {"machine": table.machine, "device": table.device, "tables": [],
                                                 "plots": []})
        group["tables"].append(table)
    named = latest.dropna(subset=["device_name"]).drop_duplicates(["machine", "device"])
    for device, device_class, name in zip(named["device"], named["device_class"], named["device_name"], strict=True):
        path = plots.get(report_plots.device_model({"device": device, "device_name": name}))
        if device_class in groups and path is not None:
            relative = path.relative_to(out_dir).as_posix()
            if relative not in groups[device_class]["plots"]:
                groups[device_class]["plots"].append(relative)
    return list(groups.values())


def _absent(latest: pd.DataFrame) -> list[tuple[str, str, int]]:
    out = []
    for (machine, device), rows in latest.groupby(["machine", "device"], sort=True):
        if report_data.all_device_absent(rows):
            out.append((machine, device, len(rows)))
    return out
