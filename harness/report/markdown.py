"""The compatibility table as markdown, for a wiki page like the seed: one table per machine and device, measured
figures in the cells, then the documented errors that still hold and the documentation that drifted."""

from __future__ import annotations

import pandas as pd

from harness.report import data as report_data
from harness.report import overview as report_overview
from harness.report.html import VERDICTS


def _cell(row: pd.Series | None) -> str:
    if row is None:
        return ""
    symbol, label, _ = VERDICTS.get(row["verdict"], ("?", row["verdict"], ""))
    if row["verdict"] in report_data.RAN:
        parts = [f"{row['bits_per_weight']:.1f} b/w"]
        if report_data.finite(row["latency_ratio"]):
            parts.append(f"{row['latency_ratio']:.2f}x time")
        if report_data.finite(row["mem_ratio"]):
            parts.append(f"{row['mem_ratio']:.2f}x mem")
        text = ", ".join(parts)
        return f"{symbol} {text}" + (" (drift)" if row["verdict"] in report_data.DRIFT else "")
    return f"{symbol} {label}"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(records: report_data.Records) -> str:
    latest = records.latest()
    lines = ["# Quantization compatibility (measured by quantmatrix)", "",
             "Cells: ✓ works, ⊘ fails as documented, ⚠ documentation drift, ✗ fails, ≠ runs with a wrong output, "
             "– unavailable. Figures: bits "
             "per weight, latency and peak memory as multiples of the unquantized baseline in the same mode.", ""]
    for (machine, versions, device), rows in latest.groupby(["machine", "versions", "device"], sort=True):
        if report_data.all_device_absent(rows):
            continue
        offloads = report_data.offload_order(rows["offload"])
        for (model, dtype), group in rows.groupby(["model", "dtype"], sort=True):
            lines += [f"## {machine}: {device}, {model}, {dtype}", "", f"Versions: {versions}.", "",
                      "| engine | type | run | " + " | ".join(f"offload {o}" for o in offloads) + " |",
                      "|---|---|---|" + "---|" * len(offloads)]
            axes = report_data.line_axes()
            for values, cells in group.groupby(axes, sort=True):
                line = dict(zip(axes, values, strict=True))
                by = {r["offload"]: r for _, r in cells.iterrows()}
                lines.append(f"| {line['engine']} | {line['qtype']} | {report_data.how_run(line)} | "
                             + " | ".join(_cell(by.get(o)) for o in offloads) + " |")
            lines.append("")
    lines += ["## Engines", "", "SD.Next today: vladmandic/sdnext@058a7f0 (its 2026-04-01 release removed its "
              "bitsandbytes, optimum-quanto, torchao and NNCF loaders).", "",
              "| engine | SD.Next today | ran to a right output | unavailable, and why |", "|---|---|---|---|"]
    for e in report_overview.engines(latest):
        ran = "; ".join(f"{m} {d}: {right} of {n}" for m, d, right, n in e.ran) or "no cell ran"
        why = "; ".join(f"{n}: {_escape(reason[:160])}" for reason, n in e.unavailable[:2])
        lines.append(f"| {e.engine} ({_escape(e.title)}) | {e.sdnext} | {ran} | {why} |")
    lines.append("")
    held = latest[latest["verdict"] == "documented-error"]
    if len(held):
        lines += ["## Documented errors that still hold", ""]
        for (source, etype, message), g in held.groupby(["source", "error_type", "error_message"], sort=True):
            where = ", ".join(sorted(g["id"]))
            lines.append(f"- {_escape(source or 'rule')}: `{_escape(etype)}: {_escape(message[:200])}` ({where})")
        lines.append("")
    drift = latest[latest["verdict"].isin(report_data.DRIFT)]
    if len(drift):
        lines += ["## Documentation drift", ""]
        for _, r in drift.sort_values("id").iterrows():
            lines.append(f"- `{r['id']}` on {_escape(r['machine'])}: {_escape(r['note'][:300])}")
        lines.append("")
    return "\n".join(lines)
