"""A LoRA on top of quantization (the `lora` and `lora_fuse` axes), applied to the loaded (quantized) denoiser
before offload and compile, as users load one.

- The LoRA is made offline per model: seeded A and B for every attention projection of the denoiser (`to_q`,
  `to_k`, `to_v`, `to_out.0`: what diffusers' LoRA trainers target), in diffusers' naming
  (`transformer.<module>.lora_A.weight`, `unet.` for a UNet), rank 4 (`r4`) or 16 (`r16`), no alpha keys (scale 1).
  B is drawn large enough that the LoRA changes the float model's output far beyond 8-bit quantization's error
  (`metrics.lora.effect_sqnr_db`), so that a LoRA the engine dropped cannot pass for one it applied.
- `unfused`: diffusers' `load_lora_adapter` on the model (what `pipe.load_lora_weights` calls for the denoiser);
  peft wraps each target layer, whatever the engine made of it. `fused`: then `fuse_lora` and `unload_lora`, as
  diffusers' docs fuse (peft merges the delta into the base layer's weight). `merged`: SD.Next's path for SDNQ
  (vladmandic/sdnext@d11a619 modules/lora/lora_apply.py:150-206, network_add_weights): dequantize the layer's
  weight in float32, add the delta, requantize with the layer's own SDNQ options (sdnq_quantize_layer).
- The float reference is the float model with the same LoRA, unfused. A cell whose output is nearer the float model
  without the LoRA than with it has lost the LoRA: `LoraNotApplied` fails it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from harness.cell import AXES
from harness.treatments.base import BEFORE_OFFLOAD, Applied, Context, Treatment, denoiser
from harness.verdict import Stage

RANKS = {"r4": 4, "r16": 16}
FUSES = AXES["lora_fuse"].known()
ADAPTER = "quantmatrix"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
B_SCALE = 2.0  # B ~ N(0, (B_SCALE / sqrt(r))^2), A ~ N(0, 1 / in): the delta's entries ~ B_SCALE / sqrt(in)


# Not in standalone repro scripts yet (harness/repro.py reads this as text)
REPRO = {"axis": "lora", "why_not": "a LoRA (its weights, loading, fusing, SDNQ's merge) is not written into scripts"}


class LoraNotApplied(RuntimeError):
    """The cell's output is nearer the float model without the LoRA than with it: the LoRA was lost."""


def not_offered(cell) -> str | None:
    """Why the cell's LoRA does not exist for it, or None (decided before it runs)."""
    from harness.models.specs import MODELS

    if cell.lora == "-":
        return None if cell.lora_fuse == AXES["lora_fuse"].default else "a lora_fuse mode without a LoRA"
    if not MODELS[cell.model].real:
        return (f"a LoRA is loaded with diffusers' load_lora_adapter (PeftAdapterMixin); {cell.model} is one of the "
                f"harness's own modules, not a diffusers model")
    if cell.lora_fuse == "merged" and cell.engine != "sdnq":
        return "the merged path is SD.Next's for SDNQ layers (dequantize, add the delta, requantize)"
    return None


def prefix(module: nn.Module) -> str:
    return "unet" if "UNet" in type(module).__name__ else "transformer"


def targets(module: nn.Module) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of each layer the LoRA adapts, from the float model's modules."""
    out = []
    for name, m in module.named_modules():
        if any(name == t or name.endswith("." + t) for t in TARGETS) and getattr(m, "weight", None) is not None:
            weight = m.weight
            out.append((name, weight.shape[1], weight.shape[0]))
    return out


def state_dict(module: nn.Module, lora: str, seed: int) -> dict[str, torch.Tensor]:
    """The LoRA's weights in diffusers' naming, drawn from the seed, float32 on the CPU. `module` is the float
    denoiser (its layer names and shapes)."""
    rank = RANKS[lora]
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    head = prefix(module)
    out = {}
    for name, fan_in, fan_out in targets(module):
        out[f"{head}.{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) / math.sqrt(fan_in)
        out[f"{head}.{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * (
            B_SCALE / math.sqrt(rank))
    return out


def apply(module: nn.Module, weights: dict[str, torch.Tensor], fuse: str) -> dict:
    """Put the LoRA on the (quantized) denoiser in the fuse mode; what it did, for the record."""
    if fuse == "merged":
        return {"layers": _merge_sdnq(module, weights)}
    module.load_lora_adapter(dict(weights), prefix=prefix(module), adapter_name=ADAPTER)
    layers = len(lora_layers(module))
    if fuse == "fused":
        module.fuse_lora(adapter_names=[ADAPTER])
        module.unload_lora()
    return {"layers": layers}


def lora_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def devices(module: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Where the LoRA's layers (unfused) and the layers it adapts hold their weights, after the steps:
    diffusers#10914's silent move to the CPU shows here."""
    lora, base = set(), set()
    head = prefix(module) + "."
    for key in (k for k in weights if k.endswith(".lora_A.weight")):
        layer = module.get_submodule(key[len(head):-len(".lora_A.weight")])
        if hasattr(layer, "lora_A"):
            lora.update(str(p.device) for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()])
            layer = layer.get_base_layer()
        weight = getattr(layer, "weight", None)
        if weight is not None:
            base.add(str(weight.device))
    return {"lora_devices": sorted(lora), "base_devices": sorted(base)}


def _merge_sdnq(module: nn.Module, weights: dict[str, torch.Tensor]) -> int:
    """SD.Next's network_add_weights for an SDNQ layer: the weight dequantized in float32 plus the delta, then
    sdnq_quantize_layer with the options the layer's dequantizer holds (SD.Next's SDNQConfig, svd_steps at its
    default). Returns how many layers it merged."""
    from sdnq import SDNQConfig, sdnq_quantize_layer
    from sdnq.utils import get_sdnq_params

    head = prefix(module) + "."
    merged = 0
    for key in [k for k in weights if k.endswith(".lora_A.weight")]:
        name = key[len(head):-len(".lora_A.weight")]
        layer = module.get_submodule(name)
        dq = getattr(layer, "sdnq_dequantizer", None)
        if dq is None:
            raise TypeError(f"{name} is a {type(layer).__name__}, not an SDNQ layer: nothing to merge into")
        params = get_sdnq_params(layer)
        use_svd = params.get("svd_up") is not None
        dequantize_fp32 = params["scale"].dtype == torch.float32
        weight = dq(**params, skip_quantized_matmul=dq.use_quantized_matmul, dtype=torch.float32)
        delta = weights[f"{head}{name}.lora_B.weight"] @ weights[key]
        plain = layer.dequantize()  # back to its nn.Linear, the sdnq attributes removed
        plain.weight = nn.Parameter((weight + delta.to(weight.device)).to(dq.result_dtype), requires_grad=False)
        config = SDNQConfig(weights_dtype=dq.weights_dtype, quantized_matmul_dtype=dq.quantized_matmul_dtype,
                            group_size=dq.group_size, hadamard_group_size=dq.hadamard_group_size,
                            svd_rank=dq.svd_rank, use_quantized_matmul=dq.use_quantized_matmul,
                            use_quantized_matmul_conv=dq.use_quantized_matmul, use_svd=use_svd,
                            use_hadamard=dq.use_hadamard, dequantize_fp32=dequantize_fp32, quant_conv=True,
                            non_blocking=False)
        requantized = sdnq_quantize_layer(plain, config, torch_dtype=dq.result_dtype)[0]
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, requantized)
        merged += 1
    return merged


def check(figures: dict, without: dict) -> None:
    """LoraNotApplied when the output is nearer the float model without the LoRA than with it (SQNR)."""
    with_db, without_db = figures.get("sqnr_db"), without.get("sqnr_db")
    if with_db is None or without_db is None:  # an exact match has no SQNR: nearer than anything
        if with_db is None:
            return
        raise LoraNotApplied(f"the output equals the float model's without the LoRA (SQNR against the float model "
                             f"with it {with_db:.1f} dB): the LoRA was lost")
    if without_db >= with_db:
        raise LoraNotApplied(f"the output is nearer the float model without the LoRA (SQNR {without_db:.1f} dB) "
                             f"than with it ({with_db:.1f} dB): the LoRA was lost")


class Lora(Treatment):
    """The LoRA on the loaded model's denoiser, before offload and compile; the float reference carries it too
    (unfused): the output a user expects. Judged after the steps: nearer the float model with it than without."""

    axis, order, stage, metric, when = "lora", 1, Stage.LORA, "lora", BEFORE_OFFLOAD

    def not_offered(self, cell) -> str | None:
        return not_offered(cell)

    def apply(self, model: nn.Module, cell, context: Context) -> Applied | None:
        weights = state_dict(denoiser(context.skeleton), cell.lora, context.seed)
        figures = {"rank": RANKS[cell.lora], "fuse": cell.lora_fuse,
                   **apply(denoiser(model), weights, cell.lora_fuse)}

        def judge(against_reference: dict, against_plain: dict, reference_against_plain: dict) -> dict:
            check(against_reference, against_plain)
            figures.update(devices(denoiser(model), weights), effect_sqnr_db=reference_against_plain["sqnr_db"],
                           sqnr_without_lora_db=against_plain["sqnr_db"])
            return figures

        return Applied(figures=lambda: figures, judge=judge)

    def reference_suffix(self, cell) -> str:
        return f"-lora-{cell.lora}" if self.present(cell) else ""

    def on_reference(self, model: nn.Module, cell, seed: int) -> None:
        if self.present(cell):
            module = denoiser(model)
            apply(module, state_dict(module, cell.lora, seed), "unfused")


TREATMENT = Lora()
