"""Layerwise casting (the `cast` axis), as SD.Next applies it: on the loaded (quantized) model, a pipeline's
denoiser, with diffusers' `enable_layerwise_casting`: weights stored in the cast dtype, computed in the model's."""

from __future__ import annotations

import torch

from harness.treatments.base import Applied, Context, Treatment, denoiser
from harness.verdict import Stage

# In a standalone repro script (harness/repro.py reads it as text): after the load, as `apply` below
REPRO = {"axis": "cast", "load": "model.enable_layerwise_casting(storage_dtype=torch.{cast}, compute_dtype=DTYPE)"}


class Casting(Treatment):
    axis, order, stage = "cast", 0, Stage.LOAD

    def apply(self, model, cell, context: Context) -> Applied | None:
        denoiser(model).enable_layerwise_casting(storage_dtype=getattr(torch, cell.cast),
                                                 compute_dtype=getattr(torch, cell.dtype))
        return Applied()


TREATMENT = Casting()
