"""The page as it should read, and a unified diff against it: what a wiki maintainer reviews and pastes.

From the page's text as the project keeps it (`[document] page`) and the wiki patch's judgement of each statement
(docpatch.assess), records only:

- the engines the tool no longer ships (`[document] removed`): their sections and their statements go, replaced by
  one note naming the release that removed them;
- SDNQ, the engine it ships, leads the engines with a section written from its records (its types by offload mode
  on SD.Next's path);
- a statement that broke or drifted is replaced by its suggested sentence, marked as measured; one that holds, or
  that no record can test, stays as written.

The diff applies to the kept page (`patch -p1` from the checkout), the edited page is pasted over the wiki's.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.cell import AXES
from harness.matrix import Document
from harness.report.docpatch import CELL_LEGEND, Patch, support_tables
from harness.report.statements import Finding

MEASURED = " *(measured by quantmatrix)*"


@dataclass
class WikiPage:
    text: str  # the edited page
    diff: str  # unified diff from the kept page to it


def edit(document: Document, patch: Patch) -> WikiPage:
    """The edited page and its diff (docpatch.assess's patch: its judgements, and the records SDNQ's section is
    drawn from)."""
    newest, failed = patch.newest, patch.failed
    original = document.page.read_text(encoding="utf-8")
    lines = _without_project_note(original).splitlines()
    removed_titles = [AXES["engine"].describe((e,)) for e in document.removed]
    lines = _drop_sections(lines, removed_titles)
    names = _engine_words(document.removed)
    for judged in patch.judged:
        if judged.engines and set(judged.engines) <= set(document.removed) and names.search(judged.statement):
            lines = _drop_statement(lines, judged.statement)  # a statement of a removed engine, naming it
        elif judged.suggestion and judged.finding in (Finding.BROKE, Finding.DRIFTED):
            sentence = re.sub(r" \((the table gives each combination|see the table)\)", "", judged.suggestion)
            lines = _replace_statement(lines, judged.statement, sentence + MEASURED)
    lines = _engines_preamble(lines, document, removed_titles, newest, failed)
    text = "\n".join(_squeeze(lines)).rstrip("\n") + "\n"
    name = _diff_name(document.page)
    diff = "".join(difflib.unified_diff(original.splitlines(keepends=True), text.splitlines(keepends=True),
                                        fromfile=f"a/{name}", tofile=f"b/{name}"))
    return WikiPage(text, diff)


def _diff_name(page: Path) -> str:
    """The page's path in the diff's headers: from the folder the command runs in where the page is below it (so
    `patch -p1` applies it there), else its name (`patch FILE < DIFF` applies it anywhere)."""
    try:
        return page.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return page.name


def _engine_words(engines: tuple[str, ...]) -> re.Pattern:
    """The words a page names an engine by: its name, its title and each part of it ("Quanto"), "BnB"."""
    words = set()
    for name in engines:
        words |= {name, *re.split(r"[-\s]+", AXES["engine"].describe((name,)))}
    words |= {"BnB"} if "bnb" in engines else set()
    return re.compile(r"\b(" + "|".join(sorted(map(re.escape, words), key=len, reverse=True)) + r")\b", re.I)


def _without_project_note(text: str) -> str:
    """The page without the project's own leading <!-- --> note (it is not the wiki's)."""
    return re.sub(r"\A<!--.*?-->\s*", "", text, flags=re.S)


def _heading(line: str) -> tuple[int, str] | None:
    found = re.match(r"^(#+)\s+(.*?)\s*$", line)
    return (len(found.group(1)), found.group(2)) if found else None


def _drop_sections(lines: list[str], titles: list[str]) -> list[str]:
    """Remove each section (its heading to the next heading of its level or above) titled as a removed engine."""
    out, skipping = [], None
    for line in lines:
        heading = _heading(line)
        if skipping is not None and heading and heading[0] <= skipping:
            skipping = None
        if skipping is None and heading and heading[1] in titles:
            skipping = heading[0]
        if skipping is None:
            out.append(line)
    return out


def _block(lines: list[str], statement: str) -> tuple[int, int] | None:
    """The lines of the bullet (or paragraph) holding a statement: its first line where the statement's first
    words are, and the indented lines that continue it."""
    start = statement.split(":")[0].strip()[:60]
    for i, line in enumerate(lines):
        if start and start in line:
            end = i + 1
            while end < len(lines) and lines[end].startswith("  ") and not lines[end].lstrip().startswith("- "):
                end += 1
            return i, end
    return None


def _drop_statement(lines: list[str], statement: str) -> list[str]:
    found = _block(lines, statement)
    return lines if found is None else lines[:found[0]] + lines[found[1]:]


def _replace_statement(lines: list[str], statement: str, sentence: str) -> list[str]:
    found = _block(lines, statement)
    if found is None:  # the statement as the rules quote it is not in the page's words: left as it is
        return lines
    first = lines[found[0]]
    lead = re.match(r"^\s*(?:[-*]\s+)?", first).group(0)
    return lines[:found[0]] + [lead + sentence] + lines[found[1]:]


def _engines_preamble(lines: list[str], document: Document, removed_titles: list[str], newest: pd.DataFrame,
                      failed: dict | None) -> list[str]:
    """Under "Quantization Engines": the note on the removed engines, then SDNQ's section from its records, first
    of the engines' sections."""
    at = next((i for i, line in enumerate(lines) if (_heading(line) or (0, ""))[1] == "Quantization Engines"), None)
    if at is None:
        at = len(lines)
        lines = lines + ["", "## Quantization Engines"]
    first = next((i for i in range(at + 1, len(lines)) if _heading(lines[i])), len(lines))
    listed = ", ".join(removed_titles[:-1]) + " and " + removed_titles[-1] if len(removed_titles) > 1 \
        else "".join(removed_titles)
    note = [] if not removed_titles else [
        "", f"> SD.Next's {document.removed_in} release removed {listed}"
        + (f" ({document.removed_note})" if document.removed_note else "") + "."]
    sdnq = newest[(newest["engine"] == "sdnq") & (newest["path"] == "sdnext")] if len(newest) else newest
    table = support_tables(sdnq, row_axis="qtype", unit="cell_id", failed=failed, legend=CELL_LEGEND) \
        if len(sdnq) else []
    section = ["", "### SDNQ", "",
               "SDNQ is SD.Next's quantization engine: on the fly during load, right after load, or pre-quantized."]
    if table:
        section += ["", "Its types by offload mode as measured on SD.Next's path (the diffusers stack on whole "
                    "pipelines)" + MEASURED + ":", "", *("#" + line if line.startswith("###") else line
                                                         for line in table)]
    else:
        section += ["", "Not measured on SD.Next's path yet."]
    return lines[:at + 1] + note + lines[at + 1:first] + section + [""] + lines[first:]


def _squeeze(lines: list[str]) -> list[str]:
    """No run of more than one blank line (a removed section leaves its neighbours' blanks)."""
    out: list[str] = []
    for line in lines:
        if line.strip() or (out and out[-1].strip()):
            out.append(line.rstrip() if not line.strip() else line)
    return out


def write(page: WikiPage, folder: Path, document: Document) -> tuple[Path, Path]:
    """The edited page and its diff, as `folder/<page>.md` and `folder/<page>.diff`."""
    folder.mkdir(parents=True, exist_ok=True)
    text, diff = folder / document.page.name, folder / f"{document.page.stem}.diff"
    text.write_text(page.text, encoding="utf-8")
    diff.write_text(page.diff, encoding="utf-8")
    return text, diff
