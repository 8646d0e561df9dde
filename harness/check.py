"""`quantmatrix check MODEL`: the user's question on the user's machine. For a built-in model or a diffusers
directory on disk, on this host's device, a curated matrix (each installed engine's SD.Next-style 8-bit and 4-bit
types on the path SD.Next takes, the offload modes this device can use), run as any matrix is (records written per
cell, progress as it goes), then one table: works or why not, peak memory, latency against the float model, output
error; with `--memory SIZE`, which combinations fit and the best that does.

    quantmatrix check flux-tiny-pipe [--memory 8GiB] [--device cuda] [--results FILE] [-n 2]
    quantmatrix check /data/FLUX.1-dev       # a diffusers pipeline (or model) directory of your own

Records go to `results/check-MODEL.jsonl` (appended: the newest record of each cell is shown).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from harness.errors import QuantMatrixError
from harness.report import data as report_data
from harness.report.overview import RIGHT

# One 8-bit and one 4-bit type per engine (SDNQ's as SD.Next offers them), and the float model: what a user
# choosing an engine compares. A type an engine lacks is not a cell of it.
TYPES = ("-", "int8", "uint4", "nf4", "qint8", "qint4", "Q8_0", "Q4_0", "int8_sym", "int4_sym", "int8_weight_only")
OFFLOADS = ("none", "model", "sequential", "balanced", "group")


def model_source(model: str) -> tuple[str, str]:
    """(the check's model name, its [models] table): a built-in name as it is; a path on disk (a diffusers pipeline
    or model directory) a model of its own, named after its folder (models/sources.py), registered here."""
    from harness.models import sources
    from harness.models.specs import MODELS

    path = Path(model).expanduser()
    if model in MODELS or not path.exists():
        return model, ""
    name = re.sub(r"[^a-z0-9_-]+", "-", path.stem.lower()).strip("-_")[:40] or "model"
    name = f"{name}-local" if name in MODELS and name not in sources.SOURCES else name
    table = f"[models.{name}]\npath = {json.dumps(str(path.resolve()))}\n\n"
    sources.register(sources.from_table(name, {"path": str(path.resolve())}, Path.cwd() / "check.toml"))
    return name, table


def curated_matrix(model: str, device: str) -> str:
    """The matrix file of a check: every engine and its TYPES, quantized right after load (SD.Next's "post"), in
    bf16, through diffusers where the model is one of its classes (the path SD.Next takes), else the engines' own
    API; without offload on a CPU (there an offload moves nothing: its hooks run, no memory is saved), in each
    offload mode on an accelerator. `model`: a built-in name or a path on disk."""
    from harness.models.specs import MODELS

    model, table = model_source(model)
    if model not in MODELS:
        from harness.errors import did_you_mean

        raise QuantMatrixError(f"unknown model {model!r}{did_you_mean(model, list(MODELS))}; expected a built-in "
                               "model or the path of a diffusers pipeline or model directory")
    stack = "diffusers" if MODELS[model].real else "direct"
    offloads = ("none",) if device == "cpu" else OFFLOADS
    return table + (f'[matrix]\nname = "check-{model}"\ndescription = "quantmatrix check {model} on {device}"\n\n'
                    f'[axes]\nengine = ["*"]\nqtype = {list(TYPES)!r}\nload = ["post-load"]\n'
                    f'offload = {list(offloads)!r}\ndevice = [{device!r}]\nmodel = [{model!r}]\n'
                    f'dtype = ["bfloat16"]\nstack = [{stack!r}]\n').replace("'", '"')


def memory_size(text: str) -> int:
    """"8GiB", "512MiB", "8G", "1.5GB" (binary units either way, as GPU memory is sold) or bytes."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.I)
    if not found or float(found[1]) <= 0:
        raise QuantMatrixError(f"--memory {text!r}: expected a size such as 8GiB, 512MiB or 12G")
    return int(float(found[1]) * 1024 ** "BKMGT".index((found[2] or "B").upper()))


def table(records: report_data.Records, budget: int | None = None) -> pd.DataFrame:
    """One row per cell of the check (its newest record): engine, type, offload, what happened, the generation's
    peak memory above the cell's start, memory and latency against the float model, the output's error; with a
    budget, whether the peak fits in it."""
    latest = records.latest()
    rows = pd.DataFrame({
        "engine": latest["engine"], "type": latest["qtype"], "offload": latest["offload"],
        "verdict": latest["verdict"],
        "why": latest["error_type"].where(latest["error_type"] != "", latest["reason"]).str.slice(0, 60),
        "peak_mib": latest["run_mem_bytes"] / 2**20, "mem_x": latest["mem_ratio"],
        "time_x": latest["latency_ratio"],
        "error_db": latest["psnr_db"].where(latest["psnr_db"].map(report_data.finite), latest["sqnr_db"]),
        "ssim": latest["ssim"],
    })
    rows["right"] = rows["verdict"].isin(RIGHT)
    if budget is not None:
        rows["fits"] = rows["right"] & (latest["run_mem_bytes"] <= budget)
    return rows.sort_values(["engine", "type", "offload"], key=lambda c: c.map(_order)).reset_index(drop=True)


def _order(value: str) -> tuple[bool, str]:
    return value != "none", value


def recommend(rows: pd.DataFrame, budget: int | None) -> str:
    """What to use: with no budget, nothing is recommended (each row says what it costs); with one, the float
    model where it fits (it is the reference), else the right-running combination with the least output error
    among those that fit (ties: the faster)."""
    if budget is None:
        return "Give --memory SIZE for a recommendation."
    fitting = rows[rows["fits"]]
    size = _mib(budget)
    if fitting.empty:
        smallest = rows[rows["right"]].sort_values("peak_mib").head(1)
        return (f"Nothing measured fits in {size}" + (
            f"; the smallest peak: {_name(smallest.iloc[0])}, {smallest.iloc[0]['peak_mib']:.0f} MiB."
            if len(smallest) else "."))
    float_model = fitting[fitting["engine"] == "none"]
    if len(float_model):
        return f"The float model fits in {size} ({float_model.iloc[0]['peak_mib']:.0f} MiB at its peak): no " \
               "quantization needed."
    ranked = fitting.assign(_err=-fitting["error_db"].fillna(math.inf)).sort_values(["_err", "time_x"])
    best = ranked.iloc[0]
    return (f"In {size}: {_name(best)} ({best['peak_mib']:.0f} MiB at its peak, output error "
            f"{_db(best['error_db'])}, {_x(best['time_x'])} the float model's time).")


def _name(row) -> str:
    return f"{row['engine']} {row['type']}" + ("" if row["offload"] == "none" else f" with {row['offload']} offload")


def _mib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _db(v) -> str:
    return f"{v:.1f} dB" if report_data.finite(v) else "exact"


def _x(v) -> str:
    return f"{v:.2f}x" if report_data.finite(v) else "-"


def render(rows: pd.DataFrame, device: str, model: str) -> str:
    """The check's table as text, then what the figures can and cannot say here."""
    head = ["engine", "type", "offload", "result", "peak MiB", "mem x", "time x", "error dB", "SSIM"] + \
        (["fits"] if "fits" in rows else [])
    lines = []
    for _, r in rows.iterrows():
        result = "works" if r["right"] else f"{r['verdict']}: {r['why']}" if r["why"] else r["verdict"]
        cells = [r["engine"], r["type"], r["offload"], result,
                 f"{r['peak_mib']:.0f}" if report_data.finite(r["peak_mib"]) else "-",
                 _x(r["mem_x"]), _x(r["time_x"]),
                 (f"{r['error_db']:.1f}" if report_data.finite(r["error_db"]) else "exact") if r["right"] else "-",
                 f"{r['ssim']:.4f}" if r["right"] and report_data.finite(r["ssim"]) else "-"]
        if "fits" in rows:
            cells.append("yes" if r["fits"] else "no")
        lines.append(cells)
    widths = [max(len(str(c)) for c in column) for column in zip(head, *lines, strict=True)]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [head, *lines]]
    notes = [f"{model} on {device}: peak memory is the generation's, above the cell's start; mem x only where "
             "the weights dominate the float model's peak; time x against the float model timed beside it; error "
             "dB is the image's PSNR (a pipeline) or the output's SQNR against the float model's (higher is "
             "closer); SSIM the image's structural similarity (1: the same; a pipeline only; LPIPS is not "
             "measured: its network is a download)."]
    if not rows["mem_x"].map(report_data.finite).any():
        notes.append(f"{model}'s weights are under half of its float model's peak: these peaks are this model's "
                     "activations and the process, not what a checkpoint of real size needs.")
    if device == "cpu":
        notes.append("On a CPU no offload mode is checked: its hooks run but nothing moves between devices, so it "
                     "saves no memory here.")
    return "\n".join(out + [""] + notes)


def run(model: str, *, device: str | None = None, budget: int | None = None, results: Path | None = None,
        workers: int = 0) -> int:
    """Run the check's matrix (its output streams to the terminal), then print its table and recommendation."""
    from harness.devices import present_devices

    present = present_devices()
    device = device or next((d for d in ("cuda", "rocm", "xpu", "mps") if d in present), "cpu")
    if device not in present:
        raise QuantMatrixError(f"--device {device!r}: not present here; expected one of {list(present)}")
    text = curated_matrix(model, device)
    model = model_source(model)[0]
    results = (results or Path("results") / f"check-{model}.jsonl").resolve()  # the run's folder is the checkout
    results.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quantmatrix-check-") as tmp:
        matrix = Path(tmp) / "check.toml"
        matrix.write_text(text, encoding="utf-8")
        from harness.launch import CHECKOUT, matrix_pytest_args

        options = ["--matrix", str(matrix), "--results", str(results), "--drift", "warn", "-p", "no:cacheprovider",
                   "-q", *(["-n", str(workers)] if workers else [])]
        # its own process: the cells' output streams to the terminal, this one stays free of torch's state
        subprocess.run([sys.executable, "-m", "pytest", *matrix_pytest_args(options)], cwd=CHECKOUT, check=False)
    if not results.exists():
        raise QuantMatrixError("the check's run wrote no record", path=results)
    rows = table(report_data.load([results]), budget)
    print(f"\nrecords: {results} (quantmatrix report {results} -o DIR builds their report)")
    print(render(rows, device, model))
    print(recommend(rows, budget))
    return 0
