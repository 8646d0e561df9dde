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
    lines += ["## Engines", "", "SD.Next today: vladmandic/sdnext@d11a619 (its 2026-04-01 release removed its "
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


# ------------------------------------------------------------------------ the engine table of docs/engines.md

ENGINE_TABLE_START = "<!-- generated from harness/engines/catalog.py and harness/stacks/catalog.py: " \
    "python -m harness.report.markdown docs/engines.md -->"
ENGINE_TABLE_END = "<!-- end of the generated table -->"


def engine_table() -> str:
    """Every engine the catalog offers (test-only ones left out): its package, types, the load modes each stack
    offers it, and whether SD.Next ships it; as llama.cpp's docs/ops.md comes from its test cases."""
    from harness.engines.catalog import CATALOG
    from harness.stacks.catalog import STACK_CATALOG

    stacks = list(STACK_CATALOG.values())
    lines = ["| engine | package | types | " + " | ".join(f"loads: {s.name} stack" for s in stacks)
             + " | SD.Next today |", "|" + " --- |" * (4 + len(stacks))]
    for name, info in CATALOG.items():
        if info.hidden:
            continue
        loads = [_loads(stack, info) for stack in stacks]
        lines.append(f"| `{name}` ({info.title}) | {info.package or '-'} | "
                     + ", ".join(f"`{q}`" for q in info.qtypes) + f" | {' | '.join(loads)} | {info.sdnext} |")
    return "\n".join(lines)


def _loads(stack, info) -> str:
    """The load modes a stack offers an engine, for a denoiser and for a whole pipeline where they differ."""
    from harness.engines.catalog import ALL_LOADS

    def offered(model: str) -> str:
        return ", ".join(load for load in ALL_LOADS if stack.offers(info, load, model) is None) or "none"

    alone, whole = offered("flux-tiny"), offered("flux-tiny-pipe")
    return alone if alone == whole else f"{alone}; pipelines: {whole}"


def with_engine_table(text: str) -> str:
    """`text` (docs/engines.md) with the generated table between its markers replaced by today's."""
    head, _, rest = text.partition(ENGINE_TABLE_START + "\n")
    _, _, tail = rest.partition(ENGINE_TABLE_END)
    return f"{head}{ENGINE_TABLE_START}\n{engine_table()}\n{ENGINE_TABLE_END}{tail}"


if __name__ == "__main__":
    import sys
    from pathlib import Path

    for page in map(Path, sys.argv[1:]):
        page.write_text(with_engine_table(page.read_text(encoding="utf-8")), encoding="utf-8")
