"""NNCF weight compression on torch models (no OpenVINO needed for the torch path): int8 per channel, int4 in
groups of 64, or of 128 with the `-g128` types (NNCF keeps its default of backing up the first embedding-like
layer in int8). Storage-only on torch. NNCF has no file format of its own for torch models.

NNCF traces the model, so it needs one example input: the built-in model's own.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from harness.engines.base import Engine
from harness.models.build import example_inputs

# Each type's compression mode and options (int4 in groups of 64, NNCF's default, or of 128)
COMPRESS = {"int8_sym": ("INT8_SYM", {}), "int8_asym": ("INT8_ASYM", {}),
            "int4_sym": ("INT4_SYM", {"group_size": 64, "ratio": 1.0}),
            "int4_asym": ("INT4_ASYM", {"group_size": 64, "ratio": 1.0}),
            "int4_sym-g128": ("INT4_SYM", {"group_size": 128, "ratio": 1.0}),
            "int4_asym-g128": ("INT4_ASYM", {"group_size": 128, "ratio": 1.0})}


# This engine in a standalone repro script: its fragment (harness/repro.py says how it is read and filled)
REPRO = {
    "imports": """\
import os  # noqa: I001 - NNCF imported with its telemetry declined, as CI does (no network at run time)
os.environ.setdefault("NNCF_CI", "1")
_ci, os.environ["CI"] = os.environ.get("CI"), "true"
import nncf  # noqa: E402
os.environ.pop("CI") if _ci is None else os.environ.update(CI=_ci)""",
    "tables": ("COMPRESS",),
    # traced with the model's example input (harness/models/build.py example_inputs: seed 0, batch 1, the CPU)
    "quantize": "model = nncf.compress_weights(\n"
                "    model, mode=nncf.CompressWeightsMode.{COMPRESS[0]}, dataset=nncf.Dataset([{example}])"
                "{COMPRESS[1]:,kw})",
}


class NNCFEngine(Engine):
    name = "nncf"

    def import_package(self) -> None:
        """NNCF's import constructs OpenVINO's telemetry, which, with no consent file in the user's home, sends
        events from a thread pool of its own (its thread then outlives the import: a forked cell would inherit
        it dead) and later tracks every `compress_weights` call over the network. Declined here as CI does:
        `CI=true` makes openvino_telemetry decline consent while nncf constructs it, `NNCF_CI` makes nncf use
        its stub. No network at run time."""
        os.environ.setdefault("NNCF_CI", "1")
        ci = os.environ.get("CI")
        os.environ["CI"] = "true"
        try:
            super().import_package()
        finally:
            if ci is None:
                del os.environ["CI"]
            else:
                os.environ["CI"] = ci

    def quantize(self, model: nn.Module, qtype: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        import nncf

        mode, options = COMPRESS[qtype]
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode[mode],
                                     dataset=nncf.Dataset([example_inputs(model, dtype)]), **options)
