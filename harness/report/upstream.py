"""Reproductions and upstream drafts, from result records only (text: no torch, no engine, no model is imported).

- `write_scripts`: the standalone script (harness/repro.py) of each failing, drifting or erroring cell a report
  shows, under the report's `repro/`, for its detail panel; why not, for a cell the generator cannot express.
- `drafts` / `write_drafts` (`quantmatrix report RESULTS... --upstream DIR`): one markdown draft per failure that
  no rule citing an upstream report covers, ready to file with the repository of the layer that raised. Identical
  failures (the same error type, message and raising layer) across cells are one draft listing the cells; a
  failure whose records include one judged by a rule that cites a report (`owner/repo#N` or `repo#N` in its
  source) is already reported, and gets none.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from harness import repro
from harness.cell import AXES, BASELINE, Cell
from harness.report import data as report_data
from harness.report.statements import REFERENCE

REPRO_DIR = "repro"
MANIFEST = "written-by-quantmatrix.txt"  # the scripts a build wrote: the only files a later build removes
# Verdicts whose cell a report links a script for: failing and drifting ones, and those that failed as a rule
# documents (an error the harness measured is a finding to report as much as one nobody documented)
SCRIPTED = (*report_data.BROKEN, *report_data.DRIFT, "documented-error")
# The repository of each layer a record names as having raised (error.layer's top-level package)
REPOSITORIES = {
    "accelerate": "huggingface/accelerate",
    "diffusers": "huggingface/diffusers",
    "transformers": "huggingface/transformers",
    "bitsandbytes": "bitsandbytes-foundation/bitsandbytes",
    "optimum": "huggingface/optimum-quanto",  # optimum.quanto: the only optimum layer a cell runs
    "nncf": "openvinotoolkit/nncf",
    "sdnq": "Disty0/sdnq",
    "torchao": "pytorch/ao",
    "gguf": "ggml-org/llama.cpp",  # gguf-py lives there
    "torch": "pytorch/pytorch",
}


def cites_report(source: str) -> bool:
    """Whether a rule's source cites an upstream report: `owner/repo#N` or `repo#N` anywhere in it."""
    return bool(REFERENCE.search(source or ""))


def repository(layer: str) -> str | None:
    return REPOSITORIES.get((layer or "").split(".")[0])


def _slug(text: str, limit: int = 80) -> str:
    return (re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x")[:limit].strip("-")


def _digest(*parts: str) -> str:
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:8]


def _cell(row: dict) -> Cell | None:
    try:
        return Cell(**{a: row[a] for a in AXES.names})
    except TypeError:  # an axis value this version cannot read
        return None


def _raw(files: Iterable[str], wanted: dict[tuple[str, str, str], object]) -> dict[tuple[str, str, str], dict]:
    """The records as written (every field: the error's stage and frames, the whole env) of the rows keyed
    (run, id, started), read from the results files again: the report's table keeps only what it shows."""
    ids = {key[1] for key in wanted}
    found: dict[tuple[str, str, str], dict] = {}
    if not ids:
        return found
    for path in files:
        for record in repro.raw_records(Path(path), ids)[0]:  # only valid records: a script is made of them
            key = (record.get("run") or "", record.get("id") or "", record.get("started") or "")
            if key in wanted:
                found[key] = record
    return found


# ------------------------------------------------------------------------------------------ report scripts

@dataclass(frozen=True)
class Script:
    """A cell's reproduction in a report: the script's path relative to the report's directory, or why none."""

    path: str | None
    why_not: str = ""
    cell: str = ""  # the cell the script runs: another cell of the same failure, where it is not this one's own


# What makes two cells one failure, with one script for both: the error, the layer that raised it and the engine
# (a wrong output: its engine). A quantized cell that fails as its float model does in the same offload mode (the
# offload's or the stack's failure, not the engine's) is the float model's failure. Its script is the float model's
# cell, or the direct stack's (the engine's own API: the shortest way to the error), else the first in id order.
FAILURE = ("error_type", "error_layer", "engine")


def _failure(row: dict, failed: dict[tuple[str, str], str]) -> tuple[str, ...]:
    """The cell's failure: the float model's where it fails so too (docpatch.shared_with_baseline)."""
    from harness.report.docpatch import shared_with_baseline

    return (row["error_type"], row["error_layer"], "none" if shared_with_baseline(row, failed) else row["engine"])


def write_scripts(latest: pd.DataFrame, out_dir: Path, files: Iterable[str],
                  limit: int | None = None) -> dict[tuple[str, str, str], Script]:
    """Write a standalone script for each failure (FAILURE) among the cells of `latest` that failed, drifted or
    raised into `out_dir/repro/`; returns, per (machine, versions, id), the path of its failure's script or why
    there is none. With a `limit`, at most that many: findings before documented errors, then the failures of
    most cells. Scripts an earlier build of the same directory wrote (its manifest names them) are removed first;
    no other file is touched."""
    folder = out_dir / REPRO_DIR
    manifest = folder / MANIFEST
    if manifest.is_file():
        for name in manifest.read_text(encoding="utf-8").splitlines():
            if re.fullmatch(r"[a-z0-9-]+\.py", name):  # a name this function writes, in this folder only
                (folder / name).unlink(missing_ok=True)
        manifest.unlink()
    if latest.empty:
        return {}
    rows = latest[latest["verdict"].isin(SCRIPTED) | (latest["error_type"] != "")]
    rows = rows[rows["verdict"] != "unavailable"]
    out: dict[tuple[str, str, str], Script] = {}
    wanted: dict[tuple[str, str, str], tuple[str, str, str]] = {}
    same: dict[tuple, list[tuple[str, str, str]]] = {}  # one failure -> its cells, the first scripted for all
    documented: dict[tuple[str, str, str], bool] = {}  # a failure's first cell -> whether a rule documents it
    from harness.report.docpatch import failures

    rows = rows.assign(recorded_verdict=rows["verdict"], _float=rows["engine"] != BASELINE,
                       _control=rows["stack"] != AXES["stack"].control).sort_values(["_float", "_control", "id"])
    failed = failures(latest.assign(recorded_verdict=latest["verdict"]))
    for row in report_data.row_dicts(rows, ("machine", "versions", "id", "run", "started", "cell_id", "baseline_id",
                                            "recorded_verdict", "error_type", "error_layer", *AXES.names)):
        key = (row["machine"], row["versions"], row["id"])
        cell = _cell(row)
        why = "its cell cannot be read here" if cell is None else repro.unsupported(cell)
        if why:
            out[key] = Script(None, why)
            continue
        failure = _failure(row, failed)
        if failure not in same:
            wanted[(row["run"], row["id"], row["started"])] = key
            documented[key] = row["recorded_verdict"] == "documented-error"
        same.setdefault(failure, []).append(key)
    # in order: findings before documented errors, then the failures of more cells; past the limit, none
    rank = {keys[0]: (documented[keys[0]], -len(keys), keys[0][2]) for keys in same.values()}
    raw = {key: record for raw_key, record in _raw(files, wanted).items() for key in [wanted[raw_key]]}
    for key in sorted(raw, key=rank.__getitem__):
        written = sum(1 for s in out.values() if s.path)
        out[key] = _script(raw[key], key, out_dir) if limit is None or written < limit else Script(
            None, f"past this report's {limit} scripts (findings first, then the failures of most cells): "
                  f"`quantmatrix repro {key[2]}` writes it")
    for key in wanted.values():
        out.setdefault(key, Script(None, "its record was not found in the results files"))
    for first, *others in same.values():  # each cell of a failure links the script of its first cell
        for key in others:
            out[key] = out[first]
    written = sorted({s.path.split("/", 1)[1] for s in out.values() if s.path})  # once, however many cells link it
    if written:
        manifest.write_text("\n".join(written) + "\n", encoding="utf-8")
    return out


def _script(record: dict, key: tuple[str, str, str], out_dir: Path) -> Script:
    """The failure's script written into out_dir/repro/, or why none can be."""
    try:
        text = repro.script(record)
    except repro.Unsupported as exc:
        return Script(None, str(exc).split(": no standalone script: ", 1)[-1])
    name = f"{REPRO_DIR}/{_slug(key[2], 100)}-{_digest(*key)}.py"
    (out_dir / REPRO_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / name).write_text(text, encoding="utf-8")
    return Script(name, cell=key[2])


# ------------------------------------------------------------------------------------------ upstream drafts

@dataclass
class Draft:
    """One failure (an error type, message and raising layer) across the cells that raised it."""

    error_type: str
    message: str
    layer: str
    rows: list[dict]  # the latest record of each affected cell (report rows), cells in id order
    records: dict[tuple[str, str, str], dict] = field(default_factory=dict)  # raw records by (run, id, started)
    # (machine, versions, cell id) of a control, baseline or unoffloaded cell -> its latest row
    controls: dict[tuple[str, str, str], dict] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    @property
    def repository(self) -> str | None:
        return repository(self.layer)

    @property
    def name(self) -> str:
        """The draft's file name: repository, error and the start of its message, and a digest of all three."""
        repo = (self.repository or "unknown").split("/")[-1]
        words = "-".join(_slug(w) for w in self.message.split()[:7] if _slug(w) != "x")
        while len(words) > 50 and "-" in words:  # whole words only
            words = words.rsplit("-", 1)[0]
        digest = _digest(self.error_type, self.message, self.layer)
        return f"{_slug(repo)}-{_slug(self.error_type)}-{words or 'x'}-{digest}.md"

    def raw(self, row: dict) -> dict | None:
        return self.records.get((row["run"], row["id"], row["started"]))

    def reproduction(self) -> tuple[dict | None, str | None, str]:
        """(the row whose script reproduces the failure, its script, why none): the simplest cell the generator
        can express, the unquantized model first (the failure is then not the engine's)."""
        reasons: list[str] = []

        def rank(row: dict):
            cell = _cell(row)
            return (cell is None or repro.unsupported(cell) is not None, row["engine"] != "none",
                    row["load"] != "post-load", row["cast"] != "-", row["id"])

        for row in sorted(self.rows, key=rank):
            cell, record = _cell(row), self.raw(row)
            why = "its cell cannot be read here" if cell is None else repro.unsupported(cell)
            if why is None and record is None:
                why = "its record was not found in the results files"
            if why is None:
                try:
                    return row, repro.script(record), ""
                except repro.Unsupported as exc:  # e.g. a failure the generator does not write, a bad record
                    why = str(exc).split(": no standalone script: ", 1)[-1]
            reasons.append(f"{row['id']}: {why}")
        return None, None, "; ".join(dict.fromkeys(r.split(": ", 1)[1] for r in reasons))

    def title(self, where: str = "") -> str:
        frame = (where or self.where()).split(" <- ", 1)[0]
        function = frame.split(" ", 1)[1] if " " in frame else ""
        first = _first_line(self.message).rstrip(":") or "(no message)"
        conditions = _conditions([c for c in map(_cell, self.rows) if c is not None])
        return (f"{self.error_type}" + (f" in `{function}`" if function else "") + f": {_shorten(first, 110)}"
                + (f" ({conditions})" if conditions else ""))

    def where(self) -> str:
        for row in self.rows:
            record = self.raw(row)
            if record and (record.get("error") or {}).get("where"):
                return record["error"]["where"]
        return ""

    def render(self) -> str:
        row, script, why_not = self.reproduction()
        chosen = self.raw(row) if row is not None else self.raw(self.rows[0])
        err = (chosen or {}).get("error") or {}
        stage, where = err.get("stage") or "?", err.get("where") or self.where()
        repo = self.repository
        out = [f"<!-- Draft of an upstream report, generated by `quantmatrix report RESULTS... --upstream DIR` from "
               f"the records of {', '.join(Path(f).name for f in self.files)}: regenerate it rather than edit it. -->",
               "",
               f"# {self.title(where)}", ""]
        out += [f"**To file with:** [{repo}](https://github.com/{repo}/issues/new), the repository of the layer "
                f"that raised: `{self.layer}`" + (f" (`{where.split(' <- ', 1)[0]}`)." if where else "."), ""]
        cells = [c for c in map(_cell, self.rows) if c is not None]
        stages = sorted({s for s in (((self.raw(r) or {}).get("error") or {}).get("stage") for r in self.rows) if s},
                        key=lambda s: repro.STAGES.index(s) if s in repro.STAGES else len(repro.STAGES))
        conditions = _conditions(cells, long=True)
        n = len(self.rows)
        out += ["## Summary", "",
                f"{n} cell{'s' if n != 1 else ''} of a compatibility matrix of quantization engines and offload modes "
                f"(quantmatrix) raise `{self.error_type}` from `{self.layer}`"
                + (f", in the {' and '.join(stages)} step{'s' if len(stages) > 1 else ''}" if stages else "")
                + (f": {conditions}" if conditions else "") + ". Each cell is one of diffusers' model classes or "
                "pipelines with seeded random weights, loaded, quantized and offloaded as diffusers users do (or, on "
                "the `direct` stack, by the engine's and accelerate's own functions); the cells are listed below.", ""]
        out += ["## Environment", ""]
        for _, count, env in self._environments():
            out += [f"- {count} cell{'s' if count != 1 else ''}: python {env.get('python')}, torch {env.get('torch')}, "
                    f"diffusers {env.get('diffusers')}, accelerate {env.get('accelerate')}; engines: "
                    f"{', '.join(f'{k} {v}' for k, v in sorted((env.get('engines') or {}).items()) if v) or '-'}; "
                    f"{env.get('os')}; device: {env.get('device_name') or '?'}"]
        out += ["", "## Reproduction", ""]
        if script is not None:
            out += [f"A standalone script (it imports only torch, diffusers, accelerate and the cell's engine "
                    f"package) for the cell `{row['id']}`: it builds the model from its config with the same seeded "
                    f"weights, takes the same load, quantize and offload path, and runs up to the {stage} step, "
                    "where it ends with the error below. Save it as `repro.py` and run `python repro.py` (it writes "
                    "only under a temporary directory).", "", *_fenced(script, "python"), ""]
        else:
            out += [f"No standalone script yet: the generator cannot express these cells ({why_not}). quantmatrix "
                    "reproduces them: `quantmatrix run --matrix <the run's matrix>` with the cells' axes as filters "
                    "(`--engine`, `--offload`, `--model`, ...).", ""]
        out += ["## Expected", "", self._expected(row or self.rows[0]), "", "## Actual", "",
                f"The {stage} step raises, in `{self.layer}`:", "", *_fenced(f"{self.error_type}: {self.message}"),
                ""]
        if where:
            out += [f"Innermost frames first: `{where}`.", ""]
        notes = sorted({r["source"] for r in self.rows if r["source"]})
        if notes:
            out += ["## What the matrix notes about it", ""]
            out += [f"- {n}" for n in notes] + [""]
        out += [f"## Affected cells ({len(self.rows)})", "", "| cell | verdict | stage | machine | run |",
                "| --- | --- | --- | --- | --- |"]
        for r in self.rows:
            raw = self.raw(r)
            out.append(f"| `{r['id']}` | {r['verdict']} | {((raw or {}).get('error') or {}).get('stage') or '?'} | "
                       f"{_cell_text(r['machine'])} | {_cell_text(r['run'])} |")
        out += ["", "Cell ids read `engine[-type]/load/offload/device/model/dtype/stack[+cast]`; the `diffusers` "
                "stack is diffusers' own integrations and offload methods, `direct` the engine's own API and "
                "accelerate's functions on the module."]
        return "\n".join(out) + "\n"

    def _environments(self) -> list[tuple[str, int, dict]]:
        seen: dict[str, list] = {}
        for r in self.rows:
            raw = self.raw(r) or {}
            entry = seen.setdefault(r["versions"], [0, raw.get("env") or {}])
            entry[0] += 1
        return [(v, n, env) for v, (n, env) in seen.items()]

    def _expected(self, row: dict) -> str:
        """What should have happened, with the cells of the same records that show it can."""
        stage = ((self.raw(row) or {}).get("error") or {}).get("stage") or ""
        step = {"prepare": "writing the model's files", "load": "the load", "offload": "installing the offload hooks",
                "compile": "compiling (torch.compile, then the first call)",
                "forward": "the forward pass"}.get(stage, "the step")
        text = f"{step[0].upper()}{step[1:]} completes and the model runs, as it does in these cells of the same run:"
        shown = []
        for label, cell_id in (("the same combination on the direct stack (the engine's and accelerate's own "
                                "functions on the module)", row["control_id"]),
                               ("the unquantized model in the same modes", row["baseline_id"]),
                               ("the same cell without offload", _without_offload(row))):
            other = self.controls.get((row["machine"], row["versions"], cell_id))
            if cell_id and cell_id != row["id"] and other is not None and other["verdict"] in report_data.PASSED + (
                    "drift-works", "drift-claim", "wrong-output"):
                shown.append(f"- {label}: `{cell_id}` ({other['verdict']})")
        if not shown:
            return f"{step[0].upper()}{step[1:]} completes and the model runs (no cell of these records shows a " \
                   "working variant)."
        return text + "\n" + "\n".join(shown)


def _without_offload(row: dict) -> str:
    cell = _cell(row)
    return "" if cell is None or cell.offload == "none" else cell.replace(offload="none").id


def _fenced(text: str, language: str = "") -> list[str]:
    """A markdown code block of `text`, its fence longer than any run of backticks inside (a message may hold one)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + language, text.rstrip("\n"), fence]


def _cell_text(text: str) -> str:
    return str(text).replace("|", "\\|")


def _first_line(text: str) -> str:
    return (text or "").strip().split("\n", 1)[0]


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def _conditions(cells: list[Cell], long: bool = False) -> str:
    """The axes every affected cell shares, in words: "sequential offload, cpu, diffusers stack"."""
    if not cells:
        return ""
    shared = {a: {getattr(c, a) for c in cells} for a in ("engine", "offload", "device", "stack", "load")}
    words = []
    if len(shared["engine"]) == 1:
        words.append(f"engine {next(iter(shared['engine']))}")
    elif long:
        words.append(f"{len(shared['engine'])} engines ({', '.join(sorted(shared['engine']))})")
    if len(shared["load"]) == 1 and long:
        words.append(f"{next(iter(shared['load']))} load")
    if len(shared["offload"]) == 1:
        mode = next(iter(shared["offload"]))
        words.append("no offload" if mode == "none" else f"{mode} offload")
    if len(shared["device"]) == 1:
        words.append(f"on {next(iter(shared['device']))}")
    if len(shared["stack"]) == 1:
        words.append(f"{next(iter(shared['stack']))} stack")
    return ", ".join(words)


@dataclass
class Drafts:
    drafts: list[Draft]
    covered: dict[str, int]  # cited report(s) -> cells whose failure they cover
    not_drafted: dict[str, int]  # why a failure has no draft -> cells


def drafts(records: report_data.Records) -> Drafts:
    """The failures of the latest records that no rule citing a report covers, grouped into drafts."""
    latest = records.latest()
    if latest.empty:
        return Drafts([], {}, {})
    frame = records.frame
    failing = latest[(latest["error_type"] != "") & latest["verdict"].isin(SCRIPTED)]
    key = ["error_type", "error_message", "error_layer"]
    cited = frame[(frame["error_type"] != "") & frame["source"].map(cites_report)]
    reported: dict[tuple, str] = {}
    for t, m, layer, source in zip(cited["error_type"], cited["error_message"], cited["error_layer"],
                                   cited["source"], strict=True):
        reported.setdefault((t, m, layer), ", ".join(REFERENCE.findall(source.split(":", 1)[0]) or
                                                     REFERENCE.findall(source)))
    out, covered, not_drafted = [], {}, {}
    columns = list(dict.fromkeys(("machine", "versions", "id", "run", "started", "verdict", "source", "control_id",
                                  "baseline_id", *AXES.names, *key)))
    groups: dict[tuple, list[dict]] = {}
    for row in report_data.row_dicts(failing, columns):
        groups.setdefault(tuple(row[k] for k in key), []).append(row)
    for (t, m, layer), rows in groups.items():
        if (t, m, layer) in reported:
            covered[reported[(t, m, layer)]] = covered.get(reported[(t, m, layer)], 0) + len(rows)
        elif not layer:
            why = "the records do not name the layer that raised (written before error.layer)"
            not_drafted[why] = not_drafted.get(why, 0) + len(rows)
        elif repository(layer) is None:
            why = f"raised in {layer.split('.')[0]}, which has no upstream repository here"
            not_drafted[why] = not_drafted.get(why, 0) + len(rows)
        else:
            out.append(Draft(t, m, layer, sorted(rows, key=lambda r: (r["id"], r["machine"]))))
    if out:
        wanted = {(r["run"], r["id"], r["started"]): None for d in out for r in d.rows}
        raw = _raw(records.files, wanted)
        ids = {i for d in out for r in d.rows for i in (r["control_id"], r["baseline_id"], _without_offload(r))}
        others = {(r["machine"], r["versions"], r["cell_id"]): r for r in report_data.row_dicts(
            latest[latest["cell_id"].isin(ids)], ("machine", "versions", "cell_id", "verdict"))}
        for d in out:
            d.records = {k: raw[k] for k in ((r["run"], r["id"], r["started"]) for r in d.rows) if k in raw}
            d.controls = others
            d.files = list(records.files)
    out.sort(key=lambda d: (-len(d.rows), d.name))
    return Drafts(out, covered, not_drafted)


def write_drafts(records: report_data.Records, out_dir: Path) -> Drafts:
    """Write each draft as `out_dir/<name>.md`; returns what was written, covered and left out."""
    found = drafts(records)
    out_dir.mkdir(parents=True, exist_ok=True)
    for draft in found.drafts:
        (out_dir / draft.name).write_text(draft.render(), encoding="utf-8")
    return found


def summary(found: Drafts, out_dir: Path) -> str:
    lines = [f"upstream drafts: {len(found.drafts)} in {out_dir}"]
    lines += [f"  {d.name}: {len(d.rows)} cells, to {d.repository}" for d in found.drafts]
    lines += [f"  already reported ({refs}): {n} cells" for refs, n in sorted(found.covered.items())]
    lines += [f"  not drafted, {why}: {n} cells" for why, n in sorted(found.not_drafted.items())]
    return "\n".join(lines)
