"""The report's plots (matplotlib, SVG), one figure per machine and device, from result records only:

1. memory saved against latency cost, per engine and type (no offload): storage-only engines sit right of 1x
   latency, compute-optimized ones at or left of it;
2. peak memory per offload mode, as a ratio to the baseline in the same mode;
3. output error (SQNR) against bits per weight.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from harness.report import data as report_data  # noqa: E402

MARKERS = "o^sDvP*Xh<>"


def write_all(latest: pd.DataFrame, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    ran = latest[latest["verdict"].isin(report_data.RAN) & (latest["engine"] != "none")]
    paths = []
    for i, ((machine, versions, device), rows) in enumerate(ran.groupby(["machine", "versions", "device"], sort=True)):
        name = re.sub(r"[^a-z0-9]+", "-", f"{machine}-{device}".lower()).strip("-")
        path = out_dir / f"{i:02d}-{name}.svg"
        _figure(rows, f"{machine}, {device}\n{versions}", path)
        paths.append(path)
    return paths


def _figure(rows: pd.DataFrame, title: str, path: Path) -> None:
    with matplotlib.rc_context({"text.parse_math": False}):  # "$" in a record's text is text, not mathtext
        _draw(rows, title, path)


def _draw(rows: pd.DataFrame, title: str, path: Path) -> None:
    engines = sorted(rows["engine"].unique())
    style = {e: (f"C{i % 10}", MARKERS[i % len(MARKERS)]) for i, e in enumerate(engines)}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    fig.suptitle(title)

    ax = axes[0]
    flat = rows[(rows["offload"] == "none")].dropna(subset=["latency_ratio", "bytes_ratio"])
    for engine, g in flat.groupby("engine"):
        color, marker = style[engine]
        ax.scatter(g["latency_ratio"], 1 - g["bytes_ratio"], c=color, marker=marker, label=engine, alpha=0.8)
        for _, r in g.drop_duplicates("qtype").iterrows():
            ax.annotate(r["qtype"], (r["latency_ratio"], 1 - r["bytes_ratio"]), fontsize=7, alpha=0.7)
    ax.axvline(1, color="grey", lw=0.8, ls="--")
    ax.set(xscale="log", xlabel="latency / baseline (log; >1 slower)", ylabel="stored size saved (fraction)",
           title="memory saved vs latency cost (no offload)")

    ax = axes[1]
    offloads = report_data.offload_order(rows["offload"])
    for i, engine in enumerate(engines):
        g = rows[(rows["engine"] == engine)].dropna(subset=["mem_ratio"])
        color, marker = style[engine]
        xs = [offloads.index(o) + (i - len(engines) / 2) * 0.06 for o in g["offload"]]
        ax.scatter(xs, g["mem_ratio"], c=color, marker=marker, alpha=0.8, label=engine)
    ax.axhline(1, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(offloads)), offloads)
    ax.set(ylabel="peak memory / baseline in the same mode", title="peak memory per offload mode")

    ax = axes[2]
    err = rows.dropna(subset=["sqnr_db", "bits_per_weight"])
    for engine, g in err.groupby("engine"):
        color, marker = style[engine]
        ax.scatter(g["bits_per_weight"], g["sqnr_db"], c=color, marker=marker, alpha=0.8, label=engine)
    ax.set(xlabel="bits per weight", ylabel="SQNR vs baseline (dB; higher is closer)", title="output error")

    handles, labels = axes[0].get_legend_handles_labels() if len(flat) else axes[1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path, format="svg")
    plt.close(fig)
