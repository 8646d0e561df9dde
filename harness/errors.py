"""The one exception type for mistakes a user can fix (a bad matrix file, a bad option, an unreadable file)."""

from __future__ import annotations

import difflib
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
