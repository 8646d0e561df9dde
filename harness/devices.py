"""Devices: which ones this host has, and one memory tracker per kind behind one interface.

Discovery never initializes an accelerator (no CUDA context in the parent), so cell processes forked later can.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import subprocess
from pathlib import Path

import torch

from harness.cell import AXES


def unavailable_reason(device: str) -> str | None:
    """Why `device` cannot run here, or None when it can."""
    hip = getattr(torch.version, "hip", None)
    if device == "cpu":
        return None
    if device in ("cuda", "rocm"):
        if device == "cuda" and hip:
            return "this torch is a ROCm/HIP build; its GPUs are the 'rocm' device"
        if device == "rocm" and not hip:
            cuda = f" (it is CUDA {torch.version.cuda})" if torch.version.cuda else ""
            return "this torch is not a ROCm/HIP build" + cuda
        if not torch.cuda.is_available():
            return f"no {'AMD' if hip else 'NVIDIA'} GPU visible to torch"
        return None
    if device == "xpu":
        if not hasattr(torch, "xpu") or not torch.xpu.is_available():
            return "no Intel XPU visible to torch"
        return None
    if device == "mps":
        if not torch.backends.mps.is_available():
            return "no Apple MPS device (macOS on Apple silicon) visible to torch"
        return None
    return f"unknown device {device!r}"


def present_devices() -> tuple[str, ...]:
    return tuple(d for d in AXES["device"].known() if unavailable_reason(d) is None)


def accelerator_build() -> bool:
    """Whether this torch can drive an accelerator (CUDA, ROCm, MPS, XPU); answered from the build, without
    touching a driver. Such a build's cells cannot be forked from a server that imported the engines."""
    return bool(torch.version.cuda or getattr(torch.version, "hip", None) or torch.backends.mps.is_built()
                or (hasattr(torch, "xpu") and torch.xpu._is_compiled()))


def torch_device(device: str) -> torch.device:
    """The torch device of a matrix device (ROCm GPUs are 'cuda' to torch)."""
    return torch.device("cuda" if device == "rocm" else device)


def synchronize(device: str) -> None:
    if device in ("cuda", "rocm"):
        torch.cuda.synchronize()
    elif device == "xpu":
        torch.xpu.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def total_memory(device: str) -> int:
    """Bytes of memory of the device (host RAM for the CPU)."""
    if device in ("cuda", "rocm"):
        return torch.cuda.get_device_properties(0).total_memory
    if device == "xpu":
        return torch.xpu.get_device_properties(0).total_memory
    import psutil

    return psutil.virtual_memory().total


def device_info(device: str) -> dict[str, str | None]:
    """Name and driver of the device; only call in a cell's process (it may initialize the accelerator)."""
    if device in ("cuda", "rocm"):
        driver = torch.version.hip if device == "rocm" else _nvidia_driver()
        return {"device_name": torch.cuda.get_device_name(0), "driver": driver}
    if device == "xpu":
        props = torch.xpu.get_device_properties(0)
        return {"device_name": props.name, "driver": getattr(props, "driver_version", None)}
    if device == "mps":
        return {"device_name": f"Apple {platform.machine()} (MPS)", "driver": platform.mac_ver()[0]}
    return {"device_name": cpu_name(), "driver": None, "threads": torch.get_num_threads()}


def is_oom(exc: BaseException) -> bool:
    """Whether an exception means the device (or the host) ran out of memory."""
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


@functools.cache
def cuda_capability() -> str | None:
    """The NVIDIA GPU's compute capability ("9.0"), read through nvidia-smi (once per process) so that CUDA stays
    uninitialized here; None without an NVIDIA GPU. Rules may be limited by it (e.g. bitsandbytes types that need
    Turing, 7.5)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = out.stdout.strip().splitlines()[:1]
    return first[0].strip() if out.returncode == 0 and first else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


# ------------------------------------------------------------------------------------------- trackers

class MemoryTracker:
    """Peak memory of one cell: `reset()` before the measured work, `peak()` after it."""

    kind = "rss"

    def reset(self) -> None: ...

    def sample(self) -> None:
        """Called between steps; trackers without a native peak keep a running maximum."""

    def peak(self) -> int: ...

    def current(self) -> int: ...

    def reset_peak(self) -> None:
        """Start a new peak from now (a pipeline's next phase), without the reset's cache emptying."""
        self.reset()


def _return_freed_pages() -> None:
    """Hand the pages of freed tensors back to the system (glibc's malloc_trim; elsewhere a no-op): glibc keeps
    freed heap pages resident, so without it a quantized model's peak would include its float weights' freed
    pages, and a cell the previous cell's."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, loaded once; None where there is none (musl, macOS)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class CpuTracker(MemoryTracker):
    """High-water RSS of this process (Linux VmHWM, reset through /proc/self/clear_refs), each reset after freed
    pages are returned: the tensors' resident memory (weights and transients) and the process's growth, not the
    allocator's cache."""

    kind = "rss-trimmed"

    def __init__(self) -> None:
        self._max = 0
        self._native = Path("/proc/self/clear_refs").exists()

    def reset(self) -> None:
        _return_freed_pages()
        if self._native:
            Path("/proc/self/clear_refs").write_text("5")
        self._max = self.current()

    def sample(self) -> None:
        self._max = max(self._max, self.current())

    def peak(self) -> int:
        return self._status("VmHWM") if self._native else max(self._max, self.current())

    def current(self) -> int:
        if self._native:
            return self._status("VmRSS")
        import psutil

        return psutil.Process().memory_info().rss

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} missing from /proc/self/status")


class AllocatorTracker(MemoryTracker):
    """The caching allocator's peak statistics: `torch.cuda` (CUDA and ROCm builds alike) or `torch.xpu`."""

    kind = "vram"

    def __init__(self, backend) -> None:
        self.backend = backend

    def reset(self) -> None:
        self.backend.synchronize()
        self.backend.empty_cache()
        self.backend.reset_peak_memory_stats()

    def peak(self) -> int:
        self.backend.synchronize()
        return self.backend.max_memory_allocated()

    def reset_peak(self) -> None:
        self.backend.reset_peak_memory_stats()

    def current(self) -> int:
        return self.backend.memory_allocated()


class MpsTracker(MemoryTracker):
    """MPS has no peak statistic: the maximum of the allocated memory sampled between steps."""

    kind = "vram"

    def reset(self) -> None:
        torch.mps.synchronize()
        torch.mps.empty_cache()
        self._max = self.current()

    def sample(self) -> None:
        self._max = max(self._max, self.current())

    def peak(self) -> int:
        self.sample()
        return self._max

    def current(self) -> int:
        return torch.mps.current_allocated_memory()

    def reset_peak(self) -> None:
        self._max = self.current()


def memory_tracker(device: str) -> MemoryTracker:
    if device in ("cuda", "rocm"):
        return AllocatorTracker(torch.cuda)
    if device == "xpu":
        return AllocatorTracker(torch.xpu)
    return MpsTracker() if device == "mps" else CpuTracker()


def memory_in_use(device: str) -> int:
    """Bytes in use on the device now, as SD.Next's balanced offload reads them (what it compares with its
    watermarks): total - free from `mem_get_info` (every process's use, not only this one's allocations);
    used RAM for the CPU."""
    if device == "cpu":
        import psutil

        vm = psutil.virtual_memory()
        return vm.total - vm.available
    backend = torch.xpu if device == "xpu" else torch.cuda if device in ("cuda", "rocm") else None
    if backend is not None and hasattr(backend, "mem_get_info"):
        free, total = backend.mem_get_info()
        return total - free
    return memory_tracker(device).current()


def torch_gc(device: str) -> None:
    """SD.Next's devices.torch_gc(fast=True, force=True) (modules/devices.py:203-260 at sdnext@d11a619): no
    Python gc (fast), the accelerator synchronized and its cache emptied."""
    if device in ("cuda", "rocm"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
    elif device == "xpu":
        torch.xpu.synchronize()
        torch.xpu.empty_cache()
    elif device == "mps":
        torch.mps.empty_cache()





# ------------------------------------------------------------------------- one worker per accelerator

# The variable that restricts a process to some devices, per device kind.
VISIBILITY_VARIABLES = {"cuda": "CUDA_VISIBLE_DEVICES", "rocm": "HIP_VISIBLE_DEVICES", "xpu": "ZE_AFFINITY_MASK"}


def visible_accelerators() -> tuple[str | None, list[str]]:
    """The accelerator kind of this host and the ids of its visible devices, found without initializing any
    (NVML through nvidia-smi for NVIDIA; torch's SMI-based count for ROCm; the XPU runtime's count)."""
    import os

    hip = getattr(torch.version, "hip", None)
    kind = "rocm" if hip else "cuda" if torch.version.cuda else "xpu" if hasattr(torch, "xpu") and \
        torch.xpu._is_compiled() else None
    if kind is None:
        return None, []
    preset = os.environ.get(VISIBILITY_VARIABLES[kind])
    if preset:
        return kind, [d.strip() for d in preset.split(",") if d.strip()]
    if kind == "cuda":
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
            count = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0
        except (OSError, subprocess.TimeoutExpired):
            count = 0
    elif kind == "rocm":
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        count = torch.cuda.device_count()
    else:
        count = torch.xpu.device_count()
    return kind, [str(i) for i in range(count)]


def pin_worker(worker: int, kind: str | None, ids: list[str]) -> dict[str, str]:
    """The environment that gives worker number `worker` one device of its own (round robin over `ids`), so that
    its peak-memory figures are that device's alone. Empty without accelerators."""
    if kind is None or not ids:
        return {}
    return {VISIBILITY_VARIABLES[kind]: ids[worker % len(ids)]}
