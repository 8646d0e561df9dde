"""Measurements of one cell: stored bytes, bits per weight, step latency and output error."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from harness import devices


def tensor_bytes(t: torch.Tensor, seen: set[tuple[int, int]] | None = None) -> int:
    """Bytes a tensor really stores: the inner tensors of a subclass (quanto, torchao) rather than its logical
    shape; shared storages counted once."""
    seen = set() if seen is None else seen
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and type(t) is not nn.Parameter:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n), seen) for n in names)
    if t.device.type == "meta":
        return t.numel() * t.element_size()
    key = (t.untyped_storage().data_ptr(), t.storage_offset())
    if key in seen and t.numel():
        return 0
    seen.add(key)
    return t.numel() * t.element_size()


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def stored_bytes(model: nn.Module) -> int:
    """Bytes of everything the model's state dict stores."""
    seen: set = set()
    return sum(tensor_bytes(t, seen) for t in _state_tensors(model).values())


@dataclass(frozen=True)
class FloatLayout:
    """What the float model stores, from its skeleton: the elements of its nn.Linear weights (the layers every
    engine targets) and the bytes of everything else (norms, convs, embeddings, biases)."""

    linear_weights: int
    other_bytes: int


def float_layout(skeleton: nn.Module) -> FloatLayout:
    """Tied parameters (T5's shared embedding, under two names in the state dict) count once, as stored_bytes
    counts a storage once."""
    linear_weights = {f"{name}.weight" for name, m in skeleton.named_modules() if isinstance(m, nn.Linear)}
    state = skeleton.state_dict(keep_vars=True)
    seen: set[int] = set()
    unique = {}
    for k, t in state.items():
        if id(t) not in seen:
            seen.add(id(t))
            unique[k] = t
    return FloatLayout(sum(unique[k].numel() for k in linear_weights if k in unique),
                       sum(t.numel() * t.element_size() for k, t in unique.items() if k not in linear_weights))


def bits_per_weight(model: nn.Module, layout: FloatLayout) -> float:
    """8 x (bytes the quantized model stores - bytes of its float remainder) / Linear weight elements.

    Subtracting the untouched remainder rather than picking the Linear layers' own keys counts a weight's scales
    wherever an engine keeps them (NNCF stores them under hook modules, not under the layer)."""
    return 8 * (stored_bytes(model) - layout.other_bytes) / layout.linear_weights


@dataclass(frozen=True)
class Latency:
    median: float
    p10: float
    p90: float
    n: int
    warmup: int

    def as_dict(self) -> dict[str, float | int]:
        return vars(self).copy()


def time_steps(step: Callable[[], object], device: str, *, warmup: int, min_steps: int, max_steps: int,
               min_time_s: float, after_step: Callable[[], None] = lambda: None) -> Latency:
    """Warm-up steps, then timed steps until both `min_steps` and `min_time_s` are reached (at most `max_steps`);
    the device is synchronized around each timed step. Milliseconds."""
    for _ in range(warmup):
        step()
        after_step()
    devices.synchronize(device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_steps and (len(times) < min_steps or time.perf_counter() - started < min_time_s):
        devices.synchronize(device)
        t0 = time.perf_counter()
        step()
        devices.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
        after_step()
    if len(times) == 1:
        return Latency(times[0], times[0], times[0], 1, warmup)
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return Latency(statistics.median(times), deciles[0], deciles[-1], len(times), warmup)


@dataclass(frozen=True)
class OutputError:
    sqnr_db: float | None  # None when the output is bit-identical to the reference (infinite SQNR)
    cosine: float
    max_abs_error: float

    def as_dict(self) -> dict[str, float | None]:
        return vars(self).copy()


def digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes: equal digests mean bit-identical outputs across runs and machines."""
    import hashlib

    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def output_error(output: torch.Tensor, reference: torch.Tensor) -> OutputError:
    out, ref = output.detach().double().cpu().flatten(), reference.detach().double().cpu().flatten()
    noise = (out - ref).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    sqnr = None if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else float("-inf"))
    cosine = torch.nn.functional.cosine_similarity(out, ref, dim=0).item()
    return OutputError(sqnr, cosine, (out - ref).abs().max().item())


def _tensors(output: torch.Tensor | dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [output[k] for k in sorted(output)] if isinstance(output, dict) else [output]


def finite(output: torch.Tensor | dict[str, torch.Tensor]) -> bool:
    """Whether every value of the output (a pipeline's latents and image) is finite."""
    return all(bool(torch.isfinite(t).all()) for t in _tensors(output))


def psnr_db(image: torch.Tensor, reference: torch.Tensor) -> float | None:
    """PSNR of an image in [0, 1] against the reference image; None when they are identical (infinite)."""
    mse = (image.detach().double().cpu() - reference.detach().double().cpu()).pow(2).mean().item()
    return None if mse == 0 else 10 * math.log10(1 / mse)


def output_figures(output: torch.Tensor | dict[str, torch.Tensor],
                   reference: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, float | None]:
    """The output's error against the float model's: SQNR, cosine and max error of the output (a pipeline's
    final latents), and for a pipeline the decoded image's PSNR."""
    if not isinstance(output, dict):
        return output_error(output, reference).as_dict()
    return {**output_error(output["latents"], reference["latents"]).as_dict(),
            "psnr_db": psnr_db(output["image"], reference["image"])}


def digest_all(output: torch.Tensor | dict[str, torch.Tensor]) -> str:
    import hashlib

    return hashlib.sha256("".join(digest(t) for t in _tensors(output)).encode()).hexdigest() \
        if isinstance(output, dict) else digest(output)


def component_storage(parts: dict[str, nn.Module], skeletons: dict[str, nn.Module],
                      quantized: tuple[str, ...]) -> dict[str, dict]:
    """Per component of a pipeline: bytes stored, bits per Linear weight (as bits_per_weight counts them), whether
    the cell quantized it, and its float layout (to total the quantized ones: bits_of)."""
    out = {}
    for name, part in parts.items():
        layout = float_layout(skeletons[name])
        stored = stored_bytes(part)
        out[name] = {"bytes": stored, "quantized": name in quantized,
                     "bits_per_weight": 8 * (stored - layout.other_bytes) / layout.linear_weights
                     if layout.linear_weights else None,
                     "linear_weights": layout.linear_weights, "other_bytes": layout.other_bytes}
    return out


def bits_of(parts: list[dict]) -> float | None:
    """Bits per Linear weight over several components (component_storage's entries)."""
    weights = sum(p["linear_weights"] for p in parts)
    return 8 * sum(p["bytes"] - p["other_bytes"] for p in parts) / weights if weights else None
