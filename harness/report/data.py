"""Result records as a table (pandas), merged across machines and runs, with figures as ratios to the baseline.

Reports and `compare` read only records, never run models. One row per record; a cell is identified on a machine
by (machine, id), so the same cell from two machines never overwrites the other; within a machine the latest
record of a cell is the one shown. Each figure is also given as a ratio to the baseline cell (the unquantized
model with the same load, offload, device, model and dtype) of the same run, so a faster or slower machine, or
night, compares fairly.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from harness.cell import AXES, Cell
from harness.results import VERSIONED, device_was_absent, read_records, rule_versions
from harness.verdict import WEIGHTS_DOMINATE, Verdict

PASSED = tuple(v.value for v in Verdict if v.passed)
BROKEN = tuple(v.value for v in Verdict if v.broken)
RAN = tuple(v.value for v in Verdict if v.ran)
DRIFT = tuple(v.value for v in Verdict if v.is_drift)


@dataclass
class Records:
    """The records of some results files, one row each, and what could not be read."""

    frame: pd.DataFrame
    skipped: list[str] = field(default_factory=list)  # "file:line: problem"
    files: list[str] = field(default_factory=list)

    _latest: dict[bool, pd.DataFrame] = field(default_factory=dict, init=False, repr=False, compare=False)

    def latest(self, *, per_versions: bool = True) -> pd.DataFrame:
        """The latest record of each cell on each machine (and each set of versions, e.g. tox's version axes).
        Worked out once per Records (the page and its wiki patch both read it); the frame is read, never changed."""
        if self.frame.empty:
            return self.frame
        if per_versions not in self._latest:
            keys = ["machine", "versions", "id"] if per_versions else ["machine", "id"]
            self._latest[per_versions] = self.frame.sort_values("started").drop_duplicates(keys, keep="last")
        return self._latest[per_versions]


def _row(record: dict) -> dict:
    cell, env = record["cell"], record.get("env") or {}
    m = record.get("metrics") or {}
    lat = m.get("latency_ms") or {}
    err = record.get("error") or {}
    peak, base = m.get("peak_mem_bytes"), m.get("mem_base_bytes")
    run_peak = m.get("run_peak_mem_bytes", peak)  # records from before 2026-12-07: the cell's one peak
    return {
        "machine": None, "cpu_name": env.get("cpu"), "run": record["run"], "id": record["id"],
        **AXES.defaults, **cell,  # records from before an axis existed: its default
        **_related_ids(tuple(cell.items())),
        "verdict": record["verdict"], "note": record.get("note") or "", "reason": record.get("reason") or "",
        "error_type": err.get("type") or "", "error_message": err.get("message") or "",
        "error_layer": err.get("layer") or "", "warnings": "\n".join(record.get("warnings") or []),
        "expect": record.get("expect", {}).get("kind", "works"), "pattern": record.get("expect", {}).get("pattern"),
        "source": record.get("expect", {}).get("source") or "",
        "statement": record.get("expect", {}).get("statement") or "",
        "claims": "; ".join(f"{c['claim']}: {c['status']}" for c in record.get("claims") or []),
        "claims_contradicted": "; ".join(f"{c['claim']} ({c.get('detail') or 'contradicted'})"
                                         for c in record.get("claims") or [] if c.get("status") == "contradicted"),
        "param_bytes": m.get("param_bytes"), "disk_bytes": m.get("disk_bytes"),
        "bits_per_weight": m.get("bits_per_weight"),
        "peak_mem_bytes": peak, "own_mem_bytes": None if peak is None else peak - (base or 0),
        "run_mem_bytes": None if run_peak is None else run_peak - (base or 0),
        "resident_mem_bytes": None if m.get("resident_mem_bytes") is None else m["resident_mem_bytes"] - (base or 0),
        "mem_kind": m.get("mem_kind"), "weights": m.get("weights") or "",
        "latency_ms": lat.get("median"), "latency_p10_ms": lat.get("p10"), "latency_p90_ms": lat.get("p90"),
        **_paired(m), **_compiled(m), **_lora(m),
        "sqnr_db": m.get("sqnr_db"), "cosine": m.get("cosine"), "max_abs_error": m.get("max_abs_error"),
        "psnr_db": m.get("psnr_db"), "ssim": m.get("ssim"), "ms_ssim": m.get("ms_ssim"),
        "frames_min_psnr_db": m.get("frames_min_psnr_db"), "temporal_psnr_db": m.get("temporal_psnr_db"),
        "phases": "; ".join(f"{k} {v.get('latency_ms', 0):.1f} ms" for k, v in (m.get("phases") or {}).items()),
        "quantized_layers": ", ".join(f"{k} {v}" for k, v in (m.get("quantized_layers") or {}).items()),
        "quantized_components": ", ".join(f"{k} {v.get('bits_per_weight') or 0:.2f} b/w"
                                          for k, v in (m.get("components") or {}).items() if v.get("quantized")),
        "quantize_s": m.get("quantize_s"), "load_s": m.get("load_s"),
        "mem_base_bytes": base, "name_hint": m.get("name_hint"), "name_hint_detail": m.get("name_hint_detail"),
        "host": env.get("host"), "device_name": env.get("device_name"), "driver": env.get("driver"),
        "cuda_capability": env.get("cuda_capability"),
        "os": env.get("os"), "python": env.get("python"), "torch": env.get("torch"), "triton": env.get("triton"),
        "diffusers": env.get("diffusers"), "accelerate": env.get("accelerate"),
        "engine_version": (env.get("engines") or {}).get(cell["engine"]),
        **_versions_of(env),
        "started": record.get("started") or "", "duration_s": record.get("duration_s"),
        "output_tail": record.get("output_tail") or "",
        "device_absent": device_was_absent(record),
        "cpu_s": (record.get("process") or {}).get("cpu_s"),
        "stacks": (record.get("process") or {}).get("stacks") or "",
    }


def _paired(m: dict) -> dict:
    """The paired latency ratio to the float model (its interval, pairs, or why it was not paired) and the host's
    load while the cell was timed. `latency_pairing`: "paired", "unpaired" or "" (a record from before pairing)."""
    paired, load = m.get("latency_vs_float"), m.get("host_load") or {}
    out = {"latency_pairing": "", "latency_paired": None, "latency_lo": None, "latency_hi": None,
           "latency_pairs": None, "latency_against": "", "latency_unpaired": "",
           "loadavg": load.get("loadavg_after"), "cpu_per_wall": load.get("cpu_per_wall"),
           "cpu_wait": load.get("cpu_wait")}
    if isinstance(paired, dict) and "ratio" in paired:
        out.update(latency_pairing="paired", latency_paired=paired["ratio"], latency_lo=paired.get("lo"),
                   latency_hi=paired.get("hi"), latency_pairs=paired.get("n"),
                   latency_against=paired.get("against") or "")
    elif isinstance(paired, dict):
        out.update(latency_pairing="unpaired", latency_unpaired=paired.get("unpaired") or "")
    elif "latency_vs_uncompiled" in m:  # a compiled cell: timed beside itself uncompiled, not the float model
        out.update(latency_pairing="unpaired",
                   latency_unpaired="a compiled cell is timed beside itself uncompiled (its compile figures)")
    return out


def _compiled(m: dict) -> dict:
    """A compiled cell's figures (metrics.compile, metrics.latency_vs_uncompiled): the first call's seconds (tracing
    and building), dynamo's graphs, graph breaks and recompiles, and the steps' latency as a ratio to the same cell
    uncompiled, timed beside it (below 1: compiling made it faster)."""
    c, vs = m.get("compile") or {}, m.get("latency_vs_uncompiled")
    vs = vs if isinstance(vs, dict) and "ratio" in vs else {}
    return {"compile_first_s": c.get("first_call_s"), "compile_graphs": c.get("graphs"),
            "compile_graph_breaks": c.get("graph_breaks"), "compile_recompiles": c.get("recompiles"),
            "vs_uncompiled": vs.get("ratio"), "vs_uncompiled_lo": vs.get("lo"), "vs_uncompiled_hi": vs.get("hi")}


def _lora(m: dict) -> dict:
    """A LoRA cell's figures (metrics.lora): the layers it adapted, how far the LoRA moves the float model's output
    (SQNR of the float model with it against without it), the output's SQNR against the float model without it
    (the cell's own SQNR is against the float model with it), and where the LoRA's and the base layers' weights
    were after the steps."""
    lo = m.get("lora") or {}
    return {"lora_layers": lo.get("layers"), "lora_effect_db": lo.get("effect_sqnr_db"),
            "lora_without_db": lo.get("sqnr_without_lora_db"),
            "lora_devices": ", ".join(lo.get("lora_devices") or ()) or None,
            "lora_base_devices": ", ".join(lo.get("base_devices") or ()) or None}


def _versions_of(env: dict) -> dict:
    """The record's version columns; worked out once per distinct set of versions (a run's records share one)."""
    key = tuple((env.get("engines") or {}).items()), tuple((k, env[k]) for k in VERSIONED if k in env)
    try:
        return _version_columns(*key)
    except TypeError:  # a version that is not a string (a list in a hand-edited record): unhashable, not cached
        return _version_columns.__wrapped__(*key)


@functools.lru_cache(maxsize=1024)
def _version_columns(engines: tuple, packages: tuple) -> dict:
    env = {**dict(packages), "engines": dict(engines)}
    return {"engines": ", ".join(f"{k} {v}" for k, v in sorted(engines) if v),
            # one dict shared by the rows of a version set: read, never changed
            "package_versions": rule_versions(env),
            "versions": version_set(env)}


def version_set(env: dict) -> str:
    """The versions a record was measured with, as one comparable string: torch, the engines, diffusers and
    accelerate (the stack), in a fixed order."""
    stack = [f"{k} {env[k]}" for k in ("diffusers", "accelerate") if env.get(k)]
    engines = [f"{k} {v}" for k, v in sorted((env.get("engines") or {}).items()) if v]
    return "; ".join([f"torch {env.get('torch')}", *engines, *stack])


@functools.lru_cache(maxsize=4096)
def _related_ids(fields: tuple) -> dict[str, str]:
    """The ids a row joins on, from its cell: its own (today's form, whatever id the record carries), its
    baseline's (same run: the unquantized model in the same modes), the no-offload baseline's, its control's."""
    try:
        cell = Cell(**dict(fields))
    except TypeError:  # a cell this version cannot read (an axis it does not know): joins nothing
        return {"cell_id": "", "baseline_id": "-", "none_id": "-", "control_id": "-"}
    base = cell.baseline
    return {"cell_id": cell.id, "baseline_id": base.id, "none_id": base.replace(offload="none").id,
            "control_id": cell.control.id}


def _example_cell() -> dict[str, str]:
    return {a.name: a.omit or a.default or (a.known() or ("x",))[0] for a in AXES}


def columns() -> list[str]:
    """The table's columns (one per axis among them, from the axis registry)."""
    return list(_row({"run": "", "id": "", "cell": _example_cell(), "verdict": ""}))


# A report's grid is per machine, device and version set, a section per model and dtype, a column per offload mode;
# a line is every other axis's value (engine and type as its label, the rest as how it was run).
GRID_AXES = ("offload", "device", "model", "dtype")


def line_axes() -> list[str]:
    return [a for a in AXES.names if a not in GRID_AXES]


def how_run(line: dict[str, str]) -> str:
    """How a grid line's cells were run, from its axes other than engine and type: "post-load · diffusers +
    float8_e4m3fn layerwise casting" (axes at their default or omitted value left out, but load and stack)."""
    rest = {a: v for a, v in line.items() if a not in ("engine", "qtype", "load", "stack")}
    return " · ".join(line[a] for a in ("load", "stack")) + "".join(
        f" + {AXES[a].phrase.format(v)}" for a, v in rest.items() if v not in (AXES[a].omit, AXES[a].default))


def row_dicts(frame: pd.DataFrame, columns) -> list[dict]:
    """The rows of `frame` as plain dicts of `columns` only: reading a wide frame row by row (iterrows, or to_dict
    of every column) was most of the wiki patch's time at 10,000 records."""
    columns = list(dict.fromkeys(columns))
    return [dict(zip(columns, values, strict=True))
            for values in zip(*(frame[c].tolist() for c in columns), strict=True)]


def finite(value) -> bool:
    """Whether a figure was measured: a finite number (not None, not NaN: pandas' "missing")."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def largest_model(rows: pd.DataFrame | list[dict]) -> str:
    """The model whose baseline stores the most bytes among these cells (the largest measured); rows as a frame
    or as plain dicts (row_dicts)."""
    if isinstance(rows, pd.DataFrame):
        rows = row_dicts(rows, ("param_bytes", "bytes_ratio", "model"))
    sized = [(r["param_bytes"] / r["bytes_ratio"], r["model"]) for r in rows
             if finite(r["param_bytes"]) and finite(r["bytes_ratio"]) and r["bytes_ratio"]]
    return str(max(sized, key=lambda s: s[0])[1]) if sized else str(sorted(r["model"] for r in rows)[-1])


def all_device_absent(rows: pd.DataFrame) -> bool:
    """Whether every record of these rows is of a device absent on its machine (nothing to draw)."""
    return bool(rows["device_absent"].all())


def offload_order(values) -> list[str]:
    """The offload modes present, in the usual order; names this version does not know (newer records) last."""
    present, known = set(values), AXES["offload"].known()
    return [o for o in known if o in present] + sorted(present - set(known))


def load(paths: list[Path | str]) -> Records:
    """Read results files (bad lines and records of another schema are skipped and listed, never fatal)."""
    rows, skipped = [], []
    for path in paths:
        records, bad = read_records(Path(path))
        skipped.extend(bad)
        rows.extend(_row(r) for r in records)
    frame = pd.DataFrame(rows, columns=columns())
    frame["machine"] = machines(frame)
    return Records(with_evidence(with_integration(with_ratios(frame))), skipped, [str(p) for p in paths])


# What a record's evidence can speak to, as columns (issue: claims stay within the evidence):
# - `device_class`: cpu, cuda (with its compute capability where the record notes one), rocm, xpu, mps;
# - `offload_moved`: whether the cell's offload moved weights between devices. The harness offloads to the CPU, so
#   on a CPU cell the execution device is the CPU too: the hooks attach and run, but no weight leaves or enters a
#   device. Such a cell says the hooks work with the engine, not that the offload does (None: no offload);
# - `path`: "sdnext" for what SD.Next runs (the diffusers stack on a whole pipeline), "control" for the engine's
#   own API (direct stack), a bare denoiser or an imitation model;
# - `test_only`: the harness's own fault engine, which never speaks for a statement, a headline or a count.
EVIDENCE = ("device_class", "offload_moved", "path", "test_only")


def with_evidence(frame: pd.DataFrame) -> pd.DataFrame:
    from harness.engines.catalog import CATALOG
    from harness.models.specs import MODELS
    from harness.stacks.catalog import STACK_CATALOG

    capability = frame["cuda_capability"].fillna("").astype(str)
    frame["device_class"] = frame["device"].where((frame["device"] != "cuda") | (capability == ""),
                                                  frame["device"] + " sm_" + capability.str.replace(".", ""))
    moved = (frame["device"] != "cpu").astype(object)
    frame["offload_moved"] = moved.where(frame["offload"] != "none", None)
    pipeline = frame["model"].map(lambda m: bool(getattr(MODELS.get(m), "pipeline", False))).astype(bool)
    sdnext = frame["stack"].map(lambda s: bool(getattr(STACK_CATALOG.get(s), "sdnext", False))).astype(bool)
    frame["path"] = (sdnext & pipeline).map({True: "sdnext", False: "control"})
    frame["test_only"] = frame["engine"].map(lambda e: bool(getattr(CATALOG.get(e), "hidden", False))).astype(bool)
    return frame


def machines(frame: pd.DataFrame) -> pd.Series:
    """Which machine each record comes from. A run happens on one machine; host names alone repeat (e.g. "vm"),
    so the machine is the host with the name of the accelerator the run used most, or with its CPU's name for a
    run of CPU cells only (records from before the CPU was noted: the name of the device it used most). Records
    of a GPU host that do and do not note its CPU name the same machine."""
    if frame.empty:
        return pd.Series(dtype=object)
    first = frame.groupby("run", sort=False)[["host", "cpu_name"]].first()  # first non-null of each

    def most_used(rows: pd.DataFrame) -> pd.Series:
        used = rows.dropna(subset=["device_name"]).groupby(["run", "device_name"], sort=False).size()
        top = used.sort_values(ascending=False).reset_index().drop_duplicates("run")
        return top.set_index("run")["device_name"].reindex(first.index)

    accelerator = most_used(frame[frame["device"] != "cpu"])
    # a run on an accelerator whose cells never named it (each ended before the device was read: a hang) is of the
    # host with the same name, CPU and torch build whose other runs named their accelerator; never of a CPU host
    torch_build = frame.groupby("run", sort=False)["torch"].first()
    named = pd.DataFrame({"host": first["host"], "cpu": first["cpu_name"], "torch": torch_build,
                          "accelerator": accelerator}).dropna()
    known = {(h, c, t): a for h, c, t, a in zip(named["host"], named["cpu"], named["torch"], named["accelerator"],
                                                 strict=True)}
    ran = frame[(frame["device"] != "cpu") & ~frame["device_absent"].astype(bool)]
    on_accelerator = set(ran["run"])
    for run in accelerator.index[accelerator.isna()]:
        if run in on_accelerator:
            device = ran.loc[ran["run"] == run, "device"].iloc[0]
            accelerator[run] = known.get((first.at[run, "host"], first.at[run, "cpu_name"], torch_build[run]),
                                         f"unnamed {device} device")
    what = accelerator.fillna(first["cpu_name"]).fillna(most_used(frame)).fillna("unknown device")
    label = first["host"].fillna("?") + " · " + what
    return frame["run"].map(label)


RATIOS = ("bytes_ratio", "mem_ratio", "latency_ratio", "mem_vs_none", "latency_vs_none")


def with_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """Add each figure's ratio to a baseline cell (the unquantized, uncast model) of the same run, NaN where that
    baseline did not run:

    - `bytes_ratio`, `mem_ratio`: to the baseline in the same load and offload mode (what the quantization costs
      or saves; memory: the generation's peak, `run_mem_bytes`, apart from loading's); `latency_ratio`: the cell's
      paired ratio to that float model (`_paired`), with `latency_lo`, `latency_hi` its interval;
    - `weights_share`: the float model's weights over its own peak without offload; below WEIGHTS_DOMINATE the
      memory ratios are left out (NaN): a toy model's peak is not its weights, and says nothing of the format;
    - `mem_vs_none`, `latency_vs_none`: to the baseline with no offload (same load, device, model, dtype, stack),
      so an offload mode's own cost counts too: a baseline cell in model offload has latency_vs_none 1.4 where
      model offload makes a step 1.4x slower. From paired timings, latency_vs_none is a baseline's own pair (timed
      beside the float model without offload) and, for a quantized cell, its pair times its baseline's.
    """
    if frame.empty:
        for col in RATIOS + ("baseline_latency_ms", "baseline_mem_bytes", "weights_share"):
            frame[col] = pd.Series(dtype=float)
        return frame
    keys = ["run", "machine"]
    base = frame[(frame["cell_id"] == frame["baseline_id"]) & frame["verdict"].isin(RAN)]
    base = base.sort_values("started").drop_duplicates([*keys, "cell_id"], keep="last")
    figures = base[[*keys, "cell_id", "param_bytes", "run_mem_bytes", "latency_ms"]]
    out = frame.merge(figures.rename(columns={"cell_id": "baseline_id", "param_bytes": "_b_bytes",
                                              "run_mem_bytes": "_b_mem", "latency_ms": "_b_lat"}),
                      on=[*keys, "baseline_id"], how="left")
    flat = figures.drop(columns=["param_bytes"])
    out = out.merge(flat.rename(columns={"cell_id": "none_id", "run_mem_bytes": "_n_mem", "latency_ms": "_n_lat"}),
                    on=[*keys, "none_id"], how="left")
    out["bytes_ratio"] = out["param_bytes"] / out["_b_bytes"]
    out["mem_ratio"] = out["run_mem_bytes"] / out["_b_mem"]
    # Latency against the float model is the paired ratio (timed beside it, in the cell's own process) wherever a
    # record has one; a baseline cell is the float model (1, exactly). Records from before pairing keep the ratio
    # of two cells timed apart; a record that could not pair (the float model did not fit) has none.
    # A baseline in an offload mode is timed beside the float model without offload: that pair is its
    # latency_vs_none (the offload mode's own cost), and its latency_ratio is 1, exactly.
    before = out["latency_pairing"] == ""
    paired = out["latency_paired"].astype(float)
    is_base = (out["cell_id"] == out["baseline_id"]) & out["verdict"].isin(RAN)
    out["latency_ratio"] = (out["latency_ms"] / out["_b_lat"]).where(before, paired.where(~is_base, 1.0))
    base_vs_none = paired.where(out["offload"] != "none", 1.0).where(is_base & ~before)
    of_base = out.assign(_v=base_vs_none)[is_base & ~before][[*keys, "cell_id", "_v"]].drop_duplicates(
        [*keys, "cell_id"], keep="last").rename(columns={"cell_id": "baseline_id"})
    out = out.merge(of_base, on=[*keys, "baseline_id"], how="left")  # a quantized cell: its pair x its baseline's
    out["latency_vs_none"] = (out["latency_ms"] / out["_n_lat"]).where(before, out["latency_ratio"] * out["_v"])
    out["mem_vs_none"] = out["run_mem_bytes"] / out["_n_mem"]
    # Memory as a cost only where the weights dominate the float model's peak (no offload): on a toy model the
    # peak is activations, the allocator and the process, and a ratio of two peaks says nothing of the format
    out["weights_share"] = out["_b_bytes"] / out["_n_mem"]
    dominated = out["weights_share"] >= WEIGHTS_DOMINATE
    out["mem_ratio"] = out["mem_ratio"].where(dominated)
    out["mem_vs_none"] = out["mem_vs_none"].where(dominated)
    out["baseline_latency_ms"] = out["_b_lat"]
    out["baseline_mem_bytes"] = out["_b_mem"]
    return out.drop(columns=["_b_bytes", "_b_mem", "_b_lat", "_n_mem", "_n_lat", "_v"])


def with_integration(frame: pd.DataFrame) -> pd.DataFrame:
    """Mark the diffusers-stack cells that broke where the same combination works on the direct stack (its
    control) in the same run: the integration, not the engine, broke them (column `integration_broke`)."""
    frame["integration_broke"] = False
    frame["integration_documented"] = False
    if frame.empty:
        return frame
    keys = ["run", "machine"]
    control = frame[frame["verdict"].isin(PASSED + ("drift-claim",))]
    control = control[[*keys, "cell_id"]].drop_duplicates().rename(columns={"cell_id": "control_id"})
    out = frame.merge(control.assign(_control_works=True), on=[*keys, "control_id"], how="left")
    works = (out["control_id"] != out["cell_id"]) & out["_control_works"].fillna(False).astype(bool)
    out["integration_broke"] = works & out["verdict"].isin(BROKEN)
    # failing on the diffusers stack where the direct stack works, as a rule documents (or differently): the
    # drift section's, counted so the integration's section can say it left them out
    out["integration_documented"] = works & out["verdict"].isin(("documented-error", "drift-error"))
    return out.drop(columns=["_control_works"])
