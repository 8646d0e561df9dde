"""Intel's AutoRound (`auto-round`): weight-only integer schemes (W4A16: 4-bit codes, groups of 128, symmetric).
diffusers only loads AutoRound checkpoints (its AutoRoundQuantizer refuses to quantize: quantizers/autoround/
autoround_quantizer.py validate_environment), so the file is made with auto-round's own API, here its RTN mode
(`iters=0`: rounding to nearest, no tuning) on the float pipeline, which writes a whole pipeline directory with
the denoiser quantized. A bare model object takes auto-round's language-model path, which needs a tokenizer
(auto_round/context/model.py:269): the engine does not offer it. Calibration generations run even in RTN mode, on
auto-round's default dataset downloaded from the Hub unless given a local one: the cell gives it a local prompt
file.
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

from torch import nn

from harness.engines.base import Engine, NotOffered, output_to

# Not in standalone repro scripts (harness/repro.py): its checkpoint is written by its own API on a whole pipeline
REPRO = {"why_not": "AutoRound's checkpoint is written by its own API on a whole pipeline, not written into scripts"}


class AutoRoundEngine(Engine):
    name = "autoround"

    def save(self, model: nn.Module, qtype: str, path: Path) -> Path:
        raise NotOffered("auto-round quantizes a diffusion model as a whole pipeline (a DiffusionPipeline or its "
                         "directory); a bare model takes its language-model path, which needs a tokenizer "
                         "(auto_round/context/model.py:269)")

    def save_pipeline(self, pipe, qtype: str, path: Path, prompts: list[str]) -> None:
        from auto_round import AutoRound

        with tempfile.TemporaryDirectory() as tmp:
            dataset = Path(tmp, "prompts.tsv")  # auto-round's local dataset: an id and a caption per row
            with open(dataset, "w", newline="") as f:
                writer = csv.writer(f, delimiter="\t")
                writer.writerow(["id", "caption"])
                writer.writerows(enumerate(prompts))
            with output_to(Path(tmp, "auto-round.log")):  # its progress bars and logs
                AutoRound(pipe, scheme=qtype, iters=0, alg_configs="rtn", dataset=str(dataset),
                          nsamples=len(prompts), device_map="cpu").quantize_and_save(str(path), format="auto_round")
