"""Devices: discovery without touching accelerators; the CPU tracker sees a real allocation."""

import torch

from harness.devices import CpuTracker, present_devices, torch_device, unavailable_reason
from harness.matrix import DEVICES


def test_cpu_is_present_and_every_absent_device_says_why():
    assert "cpu" in present_devices()
    for device in DEVICES:
        reason = unavailable_reason(device)
        assert (device in present_devices()) == (reason is None)
        if reason:
            assert len(reason) > 10


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
