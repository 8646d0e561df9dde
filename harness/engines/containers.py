"""Untrusted model files: the safetensors and GGUF containers checked before any library reads them.

Model files come from anywhere. Before safetensors' or gguf's readers see a file, its header is walked here with
plain reads and every count, length, type and offset is checked against the file's size, so that a truncated or
hostile file gets one clear error naming the file, in time and memory bounded by the header's size (never by what
the header claims). Nothing is unpickled, ever.
"""

from __future__ import annotations

import json
import stat
import struct
from pathlib import Path

from harness.errors import QuantMatrixError

MAX_HEADER = 100 << 20  # bytes of a safetensors JSON header
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 16
MAX_STRING = 1 << 20  # bytes of one GGUF string (a tokenizer's vocabulary is an array of short strings)
MAX_ARRAY = 1 << 24  # items of one GGUF metadata array
# Strings in all of a GGUF's metadata arrays: gguf's reader builds an object per item (about 17 us each here, 4.4 s
# for 262,144), so 4 M of them ran past 120 s. A tokenizer's vocabulary and merges (Qwen2.5: 152 k + 151 k) fit.
MAX_STRING_ITEMS = 1 << 19
MAX_DIMS = 4

SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1,
                      "F6_E2M3": 1, "F6_E3M2": 1}


def check_container(path: Path) -> str:
    """The container format of `path` ("safetensors" or "gguf"), after checking its header against its size."""
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read forever; a device never ends
            raise QuantMatrixError(f"not a regular file ({_file_kind(info.st_mode)}); expected a model file",
                                   path=path)
        size = info.st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if head[:4] == b"GGUF":
                _check_gguf(path, f, size)
                return "gguf"
            _check_safetensors(path, f, head, size)
            return "safetensors"
    except OSError as exc:
        raise QuantMatrixError(f"cannot read file: {exc.strerror}", path=path) from None


def _file_kind(mode: int) -> str:
    return next((name for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                                         (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                                         (stat.S_ISBLK, "a block device")) if test(mode)), "not a plain file")


def _check_safetensors(path: Path, f, head: bytes, size: int) -> None:
    def bad(message: str) -> QuantMatrixError:
        return QuantMatrixError(message, path=path)

    if len(head) < 8:
        raise bad(f"file is {size} bytes, too short for any model format")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > size:
        raise bad(f"safetensors header length {n} runs past the end of the {size}-byte file (truncated or not a "
                  "safetensors file)")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"corrupt safetensors header: {exc}") from None
    except RecursionError:
        raise bad("corrupt safetensors header: nested too deeply") from None
    if not isinstance(header, dict):
        raise bad("corrupt safetensors header: not a JSON object")
    if len(header) > MAX_TENSORS:
        raise bad(f"safetensors header lists {len(header)} tensors; expected at most {MAX_TENSORS}")
    data = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise bad("safetensors __metadata__ must map strings to strings")
            continue
        where = f"tensor {name[:80]!r}"
        if not isinstance(entry, dict):
            raise bad(f"{where}: expected an object with dtype, shape and data_offsets")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise bad(f"{where}: unknown dtype {str(dtype)[:20]!r}; expected one of {sorted(SAFETENSORS_DTYPES)}")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(type(d) is int and d >= 0 for d in shape)):
            raise bad(f"{where}: shape must be a list of at most 8 non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise bad(f"{where}: data_offsets must be two ordered non-negative integers")
        if offsets[1] > data:
            raise bad(f"{where}: data ends at byte {8 + n + offsets[1]}, past the end of the {size}-byte file "
                      "(truncated)")
        count = 1
        for d in shape:
            count *= d
        itemsize = SAFETENSORS_DTYPES[dtype]
        if dtype not in ("F4", "F6_E2M3", "F6_E3M2") and count * itemsize != offsets[1] - offsets[0]:
            raise bad(f"{where}: shape {shape[:8]} of {dtype} needs {count * itemsize} bytes, data_offsets give "
                      f"{offsets[1] - offsets[0]}")


class _Reader:
    """Bounded reads of a GGUF header: every length is checked against the bytes left before it is read."""

    def __init__(self, path: Path, f, size: int):
        self.path, self.f, self.size, self.pos = path, f, size, 0
        self.items = 0  # strings (or nested values) read in metadata arrays so far

    def bad(self, message: str) -> QuantMatrixError:
        return QuantMatrixError(f"GGUF header at byte {self.pos}: {message}", path=self.path)

    def read(self, n: int) -> bytes:
        if n > self.size - self.pos:
            raise self.bad(f"needs {n} more bytes but the {self.size}-byte file ends (truncated or corrupt)")
        data = self.f.read(n)
        self.pos += n
        return data

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        n = self.unpack("Q")
        if n > MAX_STRING:
            raise self.bad(f"string of {n} bytes; expected at most {MAX_STRING}")
        return self.read(n).decode("utf-8", errors="replace")


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def _skip_value(r: _Reader, kind: int, depth: int = 0) -> object:
    if kind in _SCALARS:
        return r.unpack(_SCALARS[kind])
    if kind == _STRING:
        return r.string()
    if kind == _ARRAY and depth == 0:
        item, n = r.unpack("I"), r.unpack("Q")
        if n > MAX_ARRAY:
            raise r.bad(f"metadata array of {n} items; expected at most {MAX_ARRAY}")
        if item in _SCALARS:  # a fixed-size item: skip the lot, after checking it fits
            r.read(n * struct.calcsize("<" + _SCALARS[item]))
        else:
            r.items += n
            if r.items > MAX_STRING_ITEMS:
                raise r.bad(f"metadata arrays of at least {r.items} strings; expected at most {MAX_STRING_ITEMS}")
            for _ in range(n):
                _skip_value(r, item, depth + 1)
        return None
    raise r.bad(f"unknown metadata value type {kind}")


def _check_gguf(path: Path, f, size: int) -> None:
    import gguf

    f.seek(0)
    r = _Reader(path, f, size)
    r.read(4)
    version = r.unpack("I")
    if version not in (2, 3):
        raise r.bad(f"GGUF version {version}; expected 2 or 3")
    n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise r.bad(f"{n_tensors} tensors and {n_kv} metadata entries; expected at most {MAX_TENSORS} and {MAX_KV}")
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = r.string()
        value = _skip_value(r, r.unpack("I"))
        if key == "general.alignment":
            if not isinstance(value, int) or value <= 0 or value & (value - 1) or value > 1 << 16:
                raise r.bad(f"general.alignment {value!r}; expected a power of two up to 65536")
            alignment = value
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.unpack("I")
        if n_dims > MAX_DIMS:
            raise r.bad(f"tensor {name[:80]!r} has {n_dims} dimensions; expected at most {MAX_DIMS}")
        dims = [r.unpack("Q") for _ in range(n_dims)]
        kind, offset = r.unpack("I"), r.unpack("Q")
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise r.bad(f"tensor {name[:80]!r} has unknown GGML type {kind}") from None
        count = 1
        for d in dims:
            count *= d
        if dims and dims[0] % block:
            raise r.bad(f"tensor {name[:80]!r}: rows of {dims[0]} are not whole blocks of {block}")
        tensors.append((name, offset, count // block * type_size))
    start = -(-r.pos // alignment) * alignment
    for name, offset, nbytes in tensors:
        if start + offset + nbytes > size:
            raise QuantMatrixError(f"GGUF tensor {name[:80]!r}: data at bytes "
                                   f"{start + offset}..{start + offset + nbytes} "
                                   f"runs past the end of the {size}-byte file (truncated)", path=path)
