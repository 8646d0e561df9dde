"""The report's plots (matplotlib, SVG), one figure per device model (e.g. "cuda, NVIDIA H200") over every machine
and version set that has it, from result records only (the machines that share a GPU model overlay, so their spread
shows; a figure costs about 0.3 s, so a site of many machines is not drawn machine by machine):

1. memory saved against latency cost, per engine and type, with no offload, at the largest model measured (what
   users choose by): storage-only engines sit right of 1x latency, compute-optimized ones at or left of it; the
   diffusers stack's cells hollow;
2. peak memory per offload mode, as a ratio to the baseline in the same mode;
3. output error (SQNR) against bits per weight.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import pandas as pd  # noqa: E402

from harness.cell import AXES  # noqa: E402
from harness.report import data as report_data  # noqa: E402
from harness.stacks.catalog import integration_stack  # noqa: E402

MARKERS = "o^sDvP*Xh<>"


PLOTTED = ["latency_ratio", "bytes_ratio", "mem_ratio", "sqnr_db", "bits_per_weight", "param_bytes"]


def device_model(row) -> tuple[str, str]:
    """The key of the figure a record is drawn in: its device and the device's name."""
    name = row["device_name"]
    return row["device"], name if isinstance(name, str) and name else row["device"]


def write_all(latest: pd.DataFrame, out_dir: Path) -> dict[tuple[str, str], Path]:
    """One SVG per device model with a measured quantized cell, keyed by device_model()."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ran = latest[latest["verdict"].isin(report_data.RAN) & (latest["engine"] != "none")]
    ran = ran.assign(_name=ran["device_name"].fillna(ran["device"]))
    paths = {}
    for i, ((device, name), rows) in enumerate(ran.groupby(["device", "_name"], sort=True)):
        slug = re.sub(r"[^a-z0-9]+", "-", f"{device}-{name}".lower()).strip("-")
        path = out_dir / f"{i:02d}-{slug}.svg"
        machines, versions = rows["machine"].nunique(), rows["versions"].unique()
        if machines > 1 or len(versions) > 1:  # one point per cell: the median over the machines and versions
            rows = rows.groupby([a for a in AXES.names if a != "device"], as_index=False)[PLOTTED].median()
        title = (f"{device}, {name}: {machines} machine(s)" + (", medians" if machines > 1 else "") + "\n"
                 + (versions[0] if len(versions) == 1 else f"{len(versions)} version sets"))
        _figure(rows, title, path)
        paths[(device, name)] = path
    return paths


# Text stays text in the SVG (the browser draws it, and it can be searched), "$" is not mathtext; fixed margins
# instead of tight_layout, which measured every label twice and took most of a report's build time.
STYLE = {"text.parse_math": False, "svg.fonttype": "none", "svg.hashsalt": "quantmatrix"}


def _figure(rows: pd.DataFrame, title: str, path: Path) -> None:
    with matplotlib.rc_context(STYLE):
        _draw(rows, title, path)


def _draw(rows: pd.DataFrame, title: str, path: Path) -> None:
    engines = sorted(rows["engine"].unique())
    style = {e: (f"C{i % 10}", MARKERS[i % len(MARKERS)]) for i, e in enumerate(engines)}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    fig.suptitle(title)
    fig.subplots_adjust(left=0.05, right=0.99, top=0.80, bottom=0.2, wspace=0.25)  # first: labels are placed by it

    ax = axes[0]
    model = report_data.largest_model(rows)
    flat = rows[(rows["offload"] == "none") & (rows["model"] == model)].dropna(subset=["latency_ratio",
                                                                                        "bytes_ratio"])
    points = []
    for (engine, stack), g in flat.groupby(["engine", "stack"]):
        color, marker = style[engine]
        hollow = integration_stack(stack)  # drawn hollow beside its control
        controls = set(flat[~flat["stack"].map(integration_stack)]["engine"])
        ax.scatter(g["latency_ratio"], 1 - g["bytes_ratio"], marker=marker, alpha=0.8,
                   label=engine if not hollow or engine not in controls
                   else None, facecolors="none" if hollow else color, edgecolors=color)
        if not hollow:  # one label per type, at its control-stack point
            points += [(lat, 1 - b, q) for lat, b, q in g.drop_duplicates("qtype")[["latency_ratio", "bytes_ratio",
                                                                                  "qtype"]].itertuples(index=False)]
    ax.axvline(1, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")  # plain tick labels: with mathtext off, the log formatter's would show as TeX source
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))  # 1x alone says nothing of 3x
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set(xlabel="latency / baseline (log; >1 slower)", ylabel="stored size saved (fraction)",
           title=f"memory saved vs latency cost\n{model}, no offload (hollow: diffusers stack)")
    _label(ax, points)

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
    fig.savefig(path, format="svg", metadata={"Date": None})  # the same records, the same file
    plt.close(fig)


def _label(ax, points: list[tuple[float, float, str]], size: float = 8) -> None:
    """Name each point beside it where the name covers no other name: the nearest free one of four places, and
    none where all four are taken (the grid below names every cell)."""
    ax.autoscale_view()
    scale = ax.figure.dpi / 72
    placed: list[tuple[float, float, float, float]] = []
    for x, y, text in sorted(points, key=lambda p: (p[0], p[1])):
        px, py = ax.transData.transform((x, y))
        width, height = len(text) * size * 0.6 * scale, size * 1.2 * scale
        for dx, dy in ((4, 2), (4, -10), (-4, 2), (-4, -10)):
            left = px + dx * scale - (width if dx < 0 else 0)
            box = (left, py + dy * scale, left + width, py + dy * scale + height)
            if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in placed):
                placed.append(box)
                ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=size, alpha=0.8,
                            ha="left" if dx > 0 else "right")
                break
