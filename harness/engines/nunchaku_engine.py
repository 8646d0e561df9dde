"""Nunchaku's SVDQuant checkpoints through diffusers' `nunchaku_lite` quantizer: loading only, on CUDA only.

diffusers' NunchakuLiteQuantizer (diffusers 0.42.1 quantizers/nunchaku/nunchaku_quantizer.py:24-52) needs the
`kernels` package (it fetches Nunchaku's kernels from the Hugging Face Hub at run time), a CUDA GPU, not Hopper
(compute capability 9.x), Turing or newer (7.5) for int4 and Blackwell (10.0) for nvfp4. The checkpoints are made by
Nunchaku's own quantizer (deepcompressor, CUDA), which is not on PyPI: the harness cannot write one, so a cell that
passes every check above still has no file to load, and says so.

SD.Next loads Nunchaku models through MIT Han Lab's `nunchaku` package instead (modules/mit_nunchaku.py at
vladmandic/sdnext@058a7f0), which is not on PyPI either: PyPI's `nunchaku` is an unrelated project (piece-wise
linear segmentation). `real_nunchaku` tells them apart by the package's contents, without importing it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import torch

from harness.engines.base import Engine, NotOffered

NO_WRITER = ("no Nunchaku checkpoint can be made here: Nunchaku's quantizer (deepcompressor, CUDA) is not on PyPI, and "
             "diffusers' nunchaku_lite only loads its checkpoints")
# The compute capability each type needs (nunchaku_quantizer.py:44-51); Hopper (9.x) is refused for all
NEEDS = {"svdq-int4": (7, 5), "svdq-nvfp4": (10, 0)}


def real_nunchaku() -> Path | None:
    """The directory of MIT Han Lab's Nunchaku if that is what `nunchaku` is here (its compiled `_C` extension and
    its `models` package), else None (not installed, or PyPI's unrelated project)."""
    spec = importlib.util.find_spec("nunchaku")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    return root if any(root.glob("_C*.so")) or any(root.glob("_C*.pyd")) else None


class NunchakuEngine(Engine):
    name = "nunchaku"

    def version(self) -> str | None:
        try:
            return importlib.metadata.version("kernels")
        except importlib.metadata.PackageNotFoundError:
            return None

    def device_reason(self, qtype: str, device: str) -> str | None:
        kind = device.split(":")[0]
        if kind != "cuda":
            return (f"diffusers' nunchaku_lite loads Nunchaku checkpoints on a CUDA GPU only "
                    f"(nunchaku_quantizer.py:31-33); this cell's device is {device}")
        index = int(device.split(":")[1]) if ":" in device else 0
        capability = torch.cuda.get_device_capability(index)
        if capability[0] == 9:
            return f"diffusers' nunchaku_lite refuses Hopper GPUs (compute capability {capability[0]}.{capability[1]})"
        if capability < NEEDS[qtype]:
            return (f"Nunchaku {qtype} needs compute capability {NEEDS[qtype][0]}.{NEEDS[qtype][1]} or newer; "
                    f"{device} has {capability[0]}.{capability[1]}")
        return None

    def unavailable_reason(self, qtype: str, device: str) -> str | None:
        if importlib.util.find_spec("kernels") is None:
            return ("diffusers' nunchaku_lite needs the 'kernels' package, which is not installed (and it fetches "
                    "Nunchaku's kernels from the Hub at run time: a cell makes no network calls)")
        return None

    def save(self, model, qtype: str, path: Path) -> Path:
        raise NotOffered(NO_WRITER)

    def save_pipeline(self, pipe, qtype: str, path: Path, prompts: list[str]) -> None:
        raise NotOffered(NO_WRITER)
