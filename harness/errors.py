"""The one exception type for mistakes a user can fix (a bad matrix file, a bad option, an unreadable file)."""

from __future__ import annotations

import argparse
import difflib
import math
from collections.abc import Iterable
from pathlib import Path


class QuantMatrixError(Exception):
    """A user-facing error: the message names the file, the key and what was expected."""

    def __init__(self, message: str, *, path: Path | str | None = None, key: str | None = None,
                 line: int | None = None):
        self.path, self.key, self.line = path, key, line
        where = str(path) if path is not None else ""
        if line is not None:
            where += f":{line}"
        if key:
            where += f" [{key}]" if where else f"[{key}]"
        super().__init__(f"{where}: {message}" if where else message)


def did_you_mean(value: str, valid: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the nearest valid name, or '' when nothing is near."""
    close = difflib.get_close_matches(str(value), list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


# C0 and C1 controls but the tab, Unicode's line and paragraph separators and its bidirectional overrides (which
# reorder how a line of code reads on screen: "Trojan Source", CVE-2021-42574)
_CONTROL = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
            for c in (*range(0x09), *range(0x0a, 0x20), *range(0x7f, 0xa0), 0x2028, 0x2029, 0x200e, 0x200f,
                      *range(0x202a, 0x202f), *range(0x2066, 0x206a))}


def printable(text: object) -> str:
    """`text` for one terminal or comment line: control characters (newlines, carriage returns, ANSI escapes,
    Unicode line separators) written as escapes, so that text from a record can neither start a line of its own
    nor move the cursor."""
    return str(text).translate(_CONTROL)


def positive(kind: type, *, zero: bool = False):
    """An option's type: a finite number above 0 (or 0 too): a NaN or zero timeout would never time a cell out."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"expected a finite number {'>=' if zero else '>'} 0, got {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse
