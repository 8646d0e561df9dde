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

DEFAULT_GROUP_SIZE = 64


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

        mode, _, group = qtype.partition("-g")
        options = {} if mode.startswith("int8") else {"group_size": int(group or DEFAULT_GROUP_SIZE), "ratio": 1.0}
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode[mode.upper()],
                                     dataset=nncf.Dataset([example_inputs(model, dtype)]), **options)
