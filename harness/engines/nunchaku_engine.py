"""Nunchaku's SVDQuant checkpoints through diffusers' `nunchaku_lite` quantizer: loading only, on CUDA only.

diffusers' NunchakuLiteQuantizer (diffusers 0.42.1 quantizers/nunchaku/nunchaku_quantizer.py:24-52) needs the
`kernels` package (it fetches Nunchaku's kernels from the Hugging Face Hub at run time), a CUDA GPU, not Hopper
(compute capability 9.x), Turing or newer (7.5) for int4 and Blackwell (10.0) for nvfp4. The checkpoints are made by
Nunchaku's own quantizer (deepcompressor, CUDA), which is not on PyPI: the harness cannot write one, so a cell that
passes every check above still has no file to load, and says so.

SD.Next loads Nunchaku models through MIT Han Lab's `nunchaku` package instead (modules/mit_nunchaku.py at
vladmandic/sdnext@d11a619), which is not on PyPI either: PyPI's `nunchaku` is an unrelated project (piece-wise
linear segmentation). `real_nunchaku` tells them apart by the package's contents, without importing it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from harness.engines.base import Engine, NotOffered

NO_WRITER = ("no Nunchaku checkpoint can be made here: Nunchaku's quantizer (deepcompressor, CUDA) is not on PyPI, and "
             "diffusers' nunchaku_lite only loads its checkpoints")
# The compute capability each type needs (nunchaku_quantizer.py:49-52); Hopper (9.x) is refused for all
NEEDS = {"svdq-int4": (7, 5), "svdq-nvfp4": (10, 0)}


def real_nunchaku() -> Path | None:
    """The directory of MIT Han Lab's Nunchaku if that is what `nunchaku` is here (its compiled `_C` extension and
    its `models` package), else None (not installed, or PyPI's unrelated project)."""
    spec = importlib.util.find_spec("nunchaku")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    return root if any(root.glob("_C*.so")) or any(root.glob("_C*.pyd")) else None


# Not in standalone repro scripts (harness/repro.py): no checkpoint can be made here (NO_WRITER)
REPRO = {"why_not": "a Nunchaku checkpoint cannot be made here (its quantizer is CUDA-only and not on PyPI)"}


class NunchakuEngine(Engine):
    name = "nunchaku"

    def device_reason(self, qtype: str, device: str) -> str | None:
        from harness.devices import cuda_capability

        if device.split(":")[0] != "cuda":
            return (f"diffusers' nunchaku_lite loads Nunchaku checkpoints on a CUDA GPU only "
                    f"(nunchaku_quantizer.py:32-34), not on {device}")
        found = cuda_capability()  # through nvidia-smi: CUDA stays uninitialized here
        if found is None:
            return None  # no NVIDIA GPU: the device itself is absent, which the harness says first
        capability = tuple(int(part) for part in found.split("."))
        if capability[0] == 9:
            return f"diffusers' nunchaku_lite refuses Hopper GPUs (nunchaku_quantizer.py:38-39); {device} is {found}"
        if capability < NEEDS[qtype]:
            return (f"Nunchaku {qtype} needs compute capability {NEEDS[qtype][0]}.{NEEDS[qtype][1]} or newer "
                    f"(nunchaku_quantizer.py:49-52); {device} is {found}")
        return None

    def unavailable_reason(self, qtype: str, device: str) -> str | None:
        if importlib.util.find_spec("kernels") is None:
            return ("diffusers' nunchaku_lite needs the 'kernels' package, which is not installed (and it fetches "
                    "Nunchaku's kernels from the Hub at run time: a cell makes no network calls)")
        return None

    def save(self, model, qtype: str, path: Path) -> Path:
        raise NotOffered(NO_WRITER + _installed_note())

    def save_pipeline(self, pipe, qtype: str, path: Path, prompts: list[str]) -> None:
        raise NotOffered(NO_WRITER + _installed_note())


def _installed_note() -> str:
    """What the `nunchaku` installed here is, if any (MIT Han Lab's would make a checkpoint possible elsewhere)."""
    if importlib.util.find_spec("nunchaku") is None:
        return ""
    return ("; the 'nunchaku' installed here is MIT Han Lab's" if real_nunchaku() else
            "; the 'nunchaku' installed here is PyPI's unrelated project, not MIT Han Lab's")
