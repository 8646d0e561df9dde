"""Measurements of one cell: stored bytes, bits per weight, step latency and output error."""

from __future__ import annotations

import math
import os
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


# The layer kinds an engine quantizes (their `weight`): Linear everywhere, and convolutions where an engine takes
# them too (quanto and NNCF quantize a UNet's Conv2d layers).
WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _kind(module: nn.Module) -> str:
    return next(k.__name__ for k in WEIGHTED if isinstance(module, k))


@dataclass(frozen=True)
class FloatLayout:
    """What the float model stores, from its skeleton: each Linear and Conv layer's weight (kind, elements, bytes)
    and the bytes of its whole state. Tied parameters (T5's shared embedding, under two names in the state dict)
    count once, as stored_bytes counts a storage once."""

    weights: dict[str, tuple[str, int, int]]  # layer name -> (kind, weight elements, weight bytes)
    total_bytes: int


def float_layout(skeleton: nn.Module) -> FloatLayout:
    state = skeleton.state_dict(keep_vars=True)
    seen: set[int] = set()
    total = 0
    for t in state.values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    weights = {}
    for name, m in skeleton.named_modules():
        w = state.get(f"{name}.weight")
        if isinstance(m, WEIGHTED) and w is not None:
            weights[name] = (_kind(m), w.numel(), w.numel() * w.element_size())
    return FloatLayout(weights, total)


@dataclass(frozen=True)
class Storage:
    """What a (quantized) model stores against its float layout: bytes in all, and bits per weight over the layers
    the engine actually quantized (Linear and Conv alike), with how many of each kind it quantized."""

    bytes: int
    bits_per_weight: float | None
    quantized_layers: dict[str, int]  # kind -> layers
    weights: int  # the weight elements bits_per_weight is over
    rest_bytes: int  # the float bytes of everything else (what is subtracted)

    def as_dict(self) -> dict:
        return vars(self).copy()


def storage(model: nn.Module, layout: FloatLayout) -> Storage:
    """A layer counts as quantized when what it stores under its weight's name (`w.weight`, `w.weight._data`,
    `w.weight.absmax`, ...) differs from its float weight's bytes. Bits per weight: 8 x (bytes the model stores -
    the float bytes of everything but those weights) / their elements, so a weight's scales count wherever an
    engine keeps them (NNCF stores them under hook modules, not under the layer). Where no layer is quantized (the
    float model, an unquantized component), over all Linear and Conv weights: the dtype's width."""
    seen: set = set()
    per_key = {k: tensor_bytes(t, seen) for k, t in _state_tensors(model).items()}
    stored = sum(per_key.values())
    quantized = _quantized(per_key, layout)
    counted = quantized or layout.weights
    weights = sum(n for _, n, _ in counted.values())
    rest = layout.total_bytes - sum(b for _, _, b in counted.values())
    kinds: dict[str, int] = {}
    for kind, _, _ in quantized.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    return Storage(stored, 8 * (stored - rest) / weights if weights else None, kinds, weights, rest)


def _quantized(per_key: dict[str, int], layout: FloatLayout) -> dict[str, tuple[str, int, int]]:
    under: dict[str, int] = {}
    for key, n in per_key.items():
        layer, sep, rest = key.partition(".weight")
        if sep and (not rest or rest[0] in "._"):
            under[layer] = under.get(layer, 0) + n
    return {name: v for name, v in layout.weights.items() if under.get(name, 0) != v[2]}


def quantized_layers(model: nn.Module, layout: FloatLayout) -> list[str]:
    """The names of the layers the engine quantized (as storage() counts them)."""
    seen: set = set()
    return list(_quantized({k: tensor_bytes(t, seen) for k, t in _state_tensors(model).items()}, layout))


def bits_per_weight(model: nn.Module, layout: FloatLayout) -> float | None:
    """Bits per weight over the layers the engine quantized (storage)."""
    return storage(model, layout).bits_per_weight


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
    return _latency(times, warmup)


def median_interval(values: list[float], confidence: float = 0.9) -> tuple[float, float]:
    """A distribution-free interval for the median (order statistics of the binomial): the k-th smallest and k-th
    largest values, k the largest for which P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2. With fewer than 5
    values no k qualifies and the interval is the whole range."""
    xs, n = sorted(values), len(values)
    tail, k, below = (1 - confidence) / 2, 1, 0.0
    while k < n - k + 1:
        below += math.comb(n, k - 1) / 2 ** n  # P(B <= k - 1)
        if below + math.comb(n, k) / 2 ** n > tail:
            break
        k += 1
    return xs[k - 1], xs[n - k]


@dataclass(frozen=True)
class PairedRatio:
    """The cell's step latency over its float reference's (execute.float_reference), timed in pairs (A B A B) in
    the same process on the same inputs: a load that slows both alike cancels in each pair's ratio. `ratio` is the
    median pair ratio, lo-hi its 90% interval (median_interval), `float_ms` the float model's median."""

    ratio: float
    lo: float
    hi: float
    n: int
    float_ms: float

    def as_dict(self) -> dict[str, float | int]:
        return vars(self).copy()


def time_paired(step: Callable[[], object], reference: Callable[[], object], device: str, *, warmup: int,
                min_steps: int, max_steps: int, min_time_s: float, after_step: Callable[[], None] = lambda: None,
                after_reference: Callable[[], None] = lambda: None) -> tuple[Latency, PairedRatio]:
    """Pairs of timed steps, the cell's then the reference's, until both `min_steps` pairs and `min_time_s` are
    reached (at most `max_steps`); `warmup`: the cell's warm-up steps already taken (the reference's are too).
    Milliseconds."""
    def timed(fn: Callable[[], object], after: Callable[[], None]) -> float:
        devices.synchronize(device)
        t0 = time.perf_counter()
        fn()
        devices.synchronize(device)
        ms = (time.perf_counter() - t0) * 1e3
        after()
        return ms

    own: list[float] = []
    ref: list[float] = []
    started = time.perf_counter()
    while len(own) < max_steps and (len(own) < min_steps or time.perf_counter() - started < min_time_s):
        own.append(timed(step, after_step))
        ref.append(timed(reference, after_reference))
    ratios = [a / b for a, b in zip(own, ref, strict=True)]
    lo, hi = median_interval(ratios)
    return _latency(own, warmup), PairedRatio(statistics.median(ratios), lo, hi, len(ratios), statistics.median(ref))


def _latency(times: list[float], warmup: int) -> Latency:
    if len(times) == 1:
        return Latency(times[0], times[0], times[0], 1, warmup)
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return Latency(statistics.median(times), deciles[0], deciles[-1], len(times), warmup)


class HostLoad:
    """The machine's load around the timed steps: the 1-minute load average before and after, the CPUs this
    process may use, the CPU time it got against the wall time, and `cpu_wait`: the time its threads waited on a
    run queue for a CPU, per second of wall time (Linux's schedstat; None where the kernel keeps none). A busy loop
    on one of two cores beside a step's two threads makes them wait about 0.7; another worker on its own core, about
    0. `compare` asks more of a latency change timed while the threads waited."""

    def __enter__(self) -> HostLoad:
        import psutil

        self._process = psutil.Process()
        self._load = os.getloadavg()[0]
        self._cpu = sum(self._process.cpu_times()[:2])
        self._waited = thread_waits()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._wall
        cpu = sum(self._process.cpu_times()[:2]) - self._cpu
        waited, before = thread_waits(), self._waited
        wait = None if waited is None or before is None or wall <= 0 else sum(
            max(0, ns - before.get(tid, 0)) for tid, ns in waited.items()) / 1e9 / wall
        self.figures = {"loadavg_before": round(self._load, 2), "loadavg_after": round(os.getloadavg()[0], 2),
                        "cpus": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
                        "wall_s": round(wall, 4), "cpu_s": round(cpu, 4),
                        "cpu_per_wall": round(cpu / wall, 3) if wall > 0 else None,
                        "cpu_wait": None if wait is None else round(wait, 3)}


def thread_waits() -> dict[str, int] | None:
    """Nanoseconds each of this process's threads has waited on a run queue since it started (the second field of
    /proc/self/task/TID/schedstat); None where the kernel keeps no such statistics. A thread that ends between two
    readings is left out."""
    waits = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat", encoding="ascii") as f:
                waits[tid] = int(f.read().split()[1])
        except FileNotFoundError:  # the thread ended
            continue
        except (OSError, ValueError, IndexError):
            return None
    return waits or None


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


def ssim(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Structural similarity of an image in [0, 1] with the reference image (pytorch-msssim's SSIM: a Gaussian
    window of 11, or the largest odd one the image fits; 1 for identical images)."""
    from pytorch_msssim import ssim as structural

    image, reference = _batched(image, reference)
    window = min(11, min(image.shape[-2:]) - (1 - min(image.shape[-2:]) % 2))
    return float(structural(image, reference, data_range=1.0, size_average=True, win_size=window))


MS_SSIM_MIN_SIDE = 161  # five scales of an 11-pixel window: pytorch-msssim asks for more than (11 - 1) * 2**4 px


def ms_ssim(image: torch.Tensor, reference: torch.Tensor) -> float | str:
    """Multi-scale SSIM (pytorch-msssim's, its five scales and weights), or why it is not measured: an image under
    MS_SSIM_MIN_SIDE pixels a side has no five scales (the tiny pipelines' 32 px images)."""
    from pytorch_msssim import ms_ssim as multiscale

    image, reference = _batched(image, reference)
    side = min(image.shape[-2:])
    if side < MS_SSIM_MIN_SIDE:
        return f"MS-SSIM needs images of at least {MS_SSIM_MIN_SIDE} px a side (five scales); this one has {side}"
    return float(multiscale(image, reference, data_range=1.0, size_average=True, win_size=11))


def _batched(image: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    image, reference = (t.detach().float().cpu() for t in (image, reference))
    return (image[None], reference[None]) if image.dim() == 3 else (image, reference)


# LPIPS compares images through a trained network's features; its weights are a download (AlexNet/VGG), which the
# harness never makes at run time: pipeline records say so instead of a figure.
LPIPS_NOT_MEASURED = ("LPIPS needs a trained network's weights, which the harness never downloads (nor looks for "
                      "on disk yet)")


def output_figures(output: torch.Tensor | dict[str, torch.Tensor],
                   reference: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, float | str | None]:
    """The output's error against the float model's: SQNR, cosine and max error of the output (a pipeline's
    final latents), and for a pipeline the decoded image's PSNR, SSIM and MS-SSIM (where an image has its five
    scales; else why not, as for LPIPS)."""
    if not isinstance(output, dict):
        return output_error(output, reference).as_dict()
    image, ref = output["image"], reference["image"]
    video = image.dim() == 5  # B x F x C x H x W: the frames as images, then the motion between them
    images = (image.flatten(0, 1), ref.flatten(0, 1)) if video else (image, ref)
    multiscale = ms_ssim(*images)
    figures = {**output_error(output["latents"], reference["latents"]).as_dict(), "psnr_db": psnr_db(image, ref),
               "ssim": ssim(*images), "lpips_not_measured": LPIPS_NOT_MEASURED,
               **({"ms_ssim_not_measured": multiscale} if isinstance(multiscale, str) else {"ms_ssim": multiscale})}
    return figures | (video_figures(image, ref) if video else {})


def video_figures(frames: torch.Tensor, reference: torch.Tensor) -> dict[str, float | None]:
    """A video against the float model's: the worst frame's PSNR, and the temporal error: PSNR of the frame-to-frame
    differences (their range is [-1, 1], a peak of 2) against the reference's, which a video whose frames are each
    right but move wrongly fails. None: identical."""
    worst = [psnr_db(frames[:, i], reference[:, i]) for i in range(frames.shape[1])]
    motion, ref_motion = (t.detach().double().cpu().diff(dim=1) for t in (frames, reference))
    mse = (motion - ref_motion).pow(2).mean().item()
    return {"frames_min_psnr_db": min((w for w in worst if w is not None), default=None),
            "temporal_psnr_db": None if mse == 0 else 10 * math.log10(4 / mse)}


def digest_all(output: torch.Tensor | dict[str, torch.Tensor]) -> str:
    import hashlib

    return hashlib.sha256("".join(digest(t) for t in _tensors(output)).encode()).hexdigest() \
        if isinstance(output, dict) else digest(output)


def component_storage(parts: dict[str, nn.Module], skeletons: dict[str, nn.Module],
                      quantized: tuple[str, ...]) -> dict[str, dict]:
    """Per component of a pipeline: its storage (bytes, bits per weight over its quantized layers, their kinds)
    and whether the cell quantized it."""
    return {name: {**storage(part, float_layout(skeletons[name])).as_dict(), "quantized": name in quantized}
            for name, part in parts.items()}


def bits_of(parts: list[dict]) -> float | None:
    """Bits per weight over several components (component_storage's entries)."""
    weights = sum(p["weights"] for p in parts)
    return 8 * sum(p["bytes"] - p["rest_bytes"] for p in parts) / weights if weights else None


def kinds_of(parts: list[dict]) -> dict[str, int]:
    """The quantized layers of several components, by kind."""
    out: dict[str, int] = {}
    for p in parts:
        for kind, n in p["quantized_layers"].items():
            out[kind] = out.get(kind, 0) + n
    return out


def runs_counted(lines: list[str]) -> list[str]:
    """`lines` with each run of one repeated line said once, with its count ("... (x12)"): an offload's notes
    repeat every step."""
    out: list[str] = []
    last, n = None, 0
    for line in [*lines, None]:
        if line == last:
            n += 1
            continue
        if last is not None:
            out.append(last if n == 1 else f"{last} (x{n})")
        last, n = line, 1
    return out
