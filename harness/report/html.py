"""The HTML report: a static site built from result records only (no server, no network, no CDN).

    quantmatrix report RESULTS... -o reports/<name>/ [--previous OLD_RESULTS...]

writes index.html (compatibility grids per machine and device, drift first, plots, environments, a sortable
table of every cell), cells.csv (the data) and plots/*.svg. Every string from a record goes through Jinja2's
autoescaping (text and attributes) or `tojson` (the one data island read by the page's script), and the script
writes record text with textContent only, so an error message can never become markup.
"""

from __future__ import annotations

import re
from pathlib import Path

import jinja2
import pandas as pd

from harness.report import data as report_data
from harness.report import plots as report_plots

# verdict -> (symbol, short label, css class): colour *and* symbol, for grey print and colour-blind readers
VERDICTS = {
    "ok": ("✓", "ok", "ok"),
    "documented-error": ("⊘", "fails as documented", "doc"),
    "drift-works": ("⚠", "drift: works now", "drift"),
    "drift-error": ("⚠", "drift: other error", "drift"),
    "drift-claim": ("⚠", "drift: claim does not hold", "drift"),
    "fail": ("✗", "fails", "fail"),
    "crash": ("✗", "crashed", "fail"),
    "timeout": ("⧗", "timed out", "fail"),
    "hang": ("✗", "hung (no CPU progress)", "fail"),
    "oom": ("✗", "out of memory", "fail"),
    "interrupted": ("…", "interrupted", "na"),
    "unavailable": ("–", "unavailable here", "na"),
}


def _num(value, fmt: str) -> str:
    return format(value, fmt) if report_data.finite(value) else ""


def _mib(value) -> str:
    return f"{value / 2**20:.1f} MiB" if report_data.finite(value) else ""


def figures(row: pd.Series) -> list[tuple[str, str]]:
    """The figures of one cell, as (label, text) pairs, for its hover and detail panel."""
    pattern = row["pattern"] if isinstance(row["pattern"], str) else None
    out = [("verdict", row["verdict"]), ("expected", row["expect"] + (f" /{pattern}/" if pattern else "")),
           ("note", row["note"])]
    if row["source"]:
        out.append(("documented in", row["source"]))
    if row["verdict"] in report_data.RAN:
        out += [
            ("stored", f"{_mib(row['param_bytes'])} ({_num(row['bytes_ratio'], '.2f')}x baseline), "
                       f"{_num(row['bits_per_weight'], '.2f')} bits/weight"),
            ("peak memory", f"{_mib(row['own_mem_bytes'])} above start ({row['mem_kind']}), "
                            f"{_num(row['mem_ratio'], '.2f')}x baseline"),
            ("latency", f"{_num(row['latency_ms'], '.2f')} ms median (p10 {_num(row['latency_p10_ms'], '.2f')}, "
                        f"p90 {_num(row['latency_p90_ms'], '.2f')}), {_num(row['latency_ratio'], '.2f')}x baseline"),
            ("output error", f"SQNR {_num(row['sqnr_db'], '.1f') or 'exact'} dB, cosine {_num(row['cosine'], '.5f')}"),
        ]
        if row["claims"]:
            out.append(("claims", row["claims"]))
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
    versions = f"torch {row['torch']}, {row['engine']} {row['engine_version'] or '-'}"
    if row["stack"] == "diffusers" or row["offload"] == "group":
        versions += f", diffusers {row['diffusers'] or '-'}"
    out.append(("versions", versions + f", accelerate {row['accelerate'] or '-'}"))
    out.append(("run", f"{row['run']} ({row['started']})"))
    return out


def _short(row: pd.Series) -> str:
    """What the grid cell shows beside the symbol."""
    if row["verdict"] in report_data.RAN:
        bits = _num(row["bits_per_weight"], ".1f")
        lat = _num(row["latency_ratio"], ".1f")
        return f"{bits}b" + (f" {lat}x" if lat else "")
    return ""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def grids(latest: pd.DataFrame) -> list[dict]:
    """One grid per machine and device: rows model/dtype, engine-qtype, load; columns the offload modes; one cell
    per record. Devices a machine lacks (all its cells 'device ...: absent') are listed, not drawn."""
    out = []
    several = latest.groupby("machine")["versions"].nunique()
    for (machine, versions, device), rows in latest.groupby(["machine", "versions", "device"], sort=True):
        if report_data.all_device_absent(rows):
            continue
        names = rows["device_name"].dropna()
        offloads = report_data.offload_order(rows["offload"])
        body = []
        for (model, dtype), group in rows.groupby(["model", "dtype"], sort=True):
            lines = []
            for (engine, qtype, load, stack, cast), cells in group.groupby(
                    ["engine", "qtype", "load", "stack", "cast"], sort=False):
                by_offload = {r["offload"]: r for _, r in cells.iterrows()}
                how = f"{load} · {stack}" + ("" if cast == "-" else f" + {cast} casting")
                lines.append({"label": engine if qtype == "-" else f"{engine} {qtype}", "load": how,
                              "cells": [_grid_cell(by_offload.get(o)) for o in offloads]})
            lines.sort(key=lambda line: (line["label"] != "none", line["label"], line["load"]))
            body.append({"model": model, "dtype": dtype, "lines": lines})
        out.append({"machine": machine, "device": device, "device_name": names.iloc[0] if len(names) else device,
                    "versions": versions if several[machine] > 1 else None,
                    "id": _slug(f"{machine}-{versions}-{device}"), "offloads": offloads, "groups": body,
                    "count": len(rows)})
    return out


def _grid_cell(row: pd.Series | None) -> dict | None:
    if row is None:
        return None
    symbol, label, css = VERDICTS.get(row["verdict"], ("?", row["verdict"], "na"))
    return {"symbol": symbol, "label": label, "css": css, "short": _short(row), "verdict": row["verdict"],
            "id": row["id"], "figures": figures(row)}


def environments(frame: pd.DataFrame) -> list[dict]:
    out = []
    for machine, rows in frame.groupby("machine", sort=True):
        last = rows.sort_values("started").iloc[-1]
        devices = rows.dropna(subset=["device_name"]).drop_duplicates("device")
        out.append({
            "machine": machine, "host": last["host"], "os": last["os"], "python": last["python"],
            "torch": last["torch"], "triton": last["triton"] or "absent", "engines": last["engines"],
            "stack": f"diffusers {last['diffusers'] or 'absent'}, accelerate {last['accelerate'] or 'absent'}",
            "devices": [(r["device"], r["device_name"], r["driver"] or "") for _, r in devices.iterrows()],
            "runs": sorted(rows["run"].unique()), "first": rows["started"].min(), "last": rows["started"].max(),
            "records": len(rows),
        })
    return out


TABLE_COLUMNS = [("machine", "machine"), ("id", "cell"), ("verdict", "verdict"), ("bits_per_weight", "bits/w"),
                 ("bytes_ratio", "size x"), ("own_mem_bytes", "peak mem B"), ("mem_ratio", "mem x"),
                 ("latency_ms", "latency ms"), ("latency_ratio", "latency x"), ("sqnr_db", "SQNR dB"),
                 ("error_message", "error")]


def _cell_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if report_data.finite(value) else ""
    return "" if value is None else str(value)


def build(records: report_data.Records, out_dir: Path, *, previous: report_data.Records | None = None,
          title: str = "quantmatrix report") -> Path:
    """Write the site into `out_dir`; returns index.html's path."""
    from harness.report import compare as compare_mod

    out_dir.mkdir(parents=True, exist_ok=True)
    latest = records.latest()
    drift = latest[latest["verdict"].isin(report_data.DRIFT)]
    broke = latest[latest["integration_broke"]]
    plots = report_plots.write_all(latest, out_dir / "plots")
    csv = out_dir / "cells.csv"
    records.frame.drop(columns=["output_tail", "stacks"]).to_csv(csv, index=False)
    changes = compare_mod.compare(previous, records) if previous is not None else None
    env = jinja2.Environment(loader=jinja2.PackageLoader("harness.report", "templates"),
                             autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
                             undefined=jinja2.StrictUndefined)
    table = [[_cell_value(r[c]) for c, _ in TABLE_COLUMNS] for _, r in latest.iterrows()]
    html = env.get_template("report.html.j2").render(
        title=title, files=records.files, skipped=records.skipped, n_records=len(records.frame),
        grids=grids(latest), drift=[_grid_cell(r) | {"machine": r["machine"]} for _, r in drift.iterrows()],
        integration=[_grid_cell(r) | {"machine": r["machine"], "layer": r["error_layer"],
                                      "error": f"{r['error_type']}: {r['error_message']}" if r["error_type"]
                                      else r["reason"]} for _, r in broke.iterrows()],
        verdicts=VERDICTS, plots=[p.relative_to(out_dir).as_posix() for p in plots],
        environments=environments(records.frame), columns=[label for _, label in TABLE_COLUMNS], table=table,
        csv=csv.name, changes=changes,
        absent=_absent(latest))
    index = out_dir / "index.html"
    index.write_text(html, encoding="utf-8")
    return index


def _absent(latest: pd.DataFrame) -> list[tuple[str, str, int]]:
    out = []
    for (machine, device), rows in latest.groupby(["machine", "device"], sort=True):
        if report_data.all_device_absent(rows):
            out.append((machine, device, len(rows)))
    return out
