"""Devices: discovery without touching accelerators; the CPU tracker sees a real allocation."""

import torch

from harness.devices import CpuTracker, present_devices, torch_device, unavailable_reason


def test_present_devices_are_those_torch_can_use_and_discovery_initializes_none():
    hip = getattr(torch.version, "hip", None)
    usable = {"cpu",
              "cuda" if torch.cuda.is_available() and not hip else None,
              "rocm" if torch.cuda.is_available() and hip else None,
              "xpu" if hasattr(torch, "xpu") and torch.xpu.is_available() else None,
              "mps" if torch.backends.mps.is_available() else None} - {None}
    assert set(present_devices()) == usable
    if torch.version.cuda is None and not getattr(torch.version, "hip", None) and not torch.backends.mps.is_built():
        assert tuple(present_devices()) == ("cpu",)  # a CPU build (CI): the CPU alone, whatever torch says
    assert not torch.cuda.is_initialized()  # cells forked later can still use CUDA


def test_an_absent_device_says_what_is_missing():
    if torch.version.cuda is None and not getattr(torch.version, "hip", None):  # a CPU build, as in CI
        assert unavailable_reason("cuda") == "no NVIDIA GPU visible to torch"
        assert unavailable_reason("rocm") == "this torch is not a ROCm/HIP build"
    if not torch.backends.mps.is_available():
        assert "Apple MPS" in unavailable_reason("mps")
    assert unavailable_reason("tpu") == "unknown device 'tpu'"
    assert unavailable_reason("cpu") is None


def test_rocm_is_cuda_to_torch():
    assert torch_device("rocm") == torch.device("cuda")


def test_cpu_tracker_peak_sees_an_allocation_and_reset_forgets_it():
    tracker = CpuTracker()
    tracker.reset()
    base = tracker.current()
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    tracker.sample()
    assert tracker.peak() >= base + (60 << 20)
    del block
    tracker.reset()
    assert tracker.peak() < base + (32 << 20)
