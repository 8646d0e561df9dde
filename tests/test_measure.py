"""Measurements: bytes really stored, bits per weight, latency statistics and output error."""


import pytest
import torch
from torch import nn

from harness.models.imitation import build_model, build_skeleton
from harness.run.measure import (
    bits_per_weight,
    digest,
    float_layout,
    output_error,
    stored_bytes,
    tensor_bytes,
    time_steps,
)


@pytest.mark.parametrize("dtype, bits", [(torch.float32, 32.0), (torch.bfloat16, 16.0), (torch.float16, 16.0)])
def test_bits_per_weight_of_a_float_model_is_its_dtype_width(dtype, bits):
    model = build_model("dit-xs", dtype=dtype)
    assert bits_per_weight(model, float_layout(build_skeleton("dit-xs", dtype))) == bits


def test_stored_bytes_counts_every_state_tensor_once():
    model = build_model("unet-xs")
    expected = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert stored_bytes(model) == expected
    shared = nn.Module()
    shared.a = nn.Linear(64, 64, bias=False)
    shared.b = nn.Linear(64, 64, bias=False)
    shared.b.weight = shared.a.weight
    assert stored_bytes(shared) == 64 * 64 * 4


def test_tensor_bytes_reads_the_inner_tensors_of_a_subclass():
    from torch.testing._internal.two_tensor import TwoTensor  # a real wrapper subclass shipped with torch

    a, b = torch.zeros(16, dtype=torch.float32), torch.zeros(16, dtype=torch.float32)
    assert tensor_bytes(TwoTensor(a, b)) == 2 * 16 * 4


def test_output_error_against_noise_of_known_power():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(200_000, generator=gen, dtype=torch.float64)
    noisy = ref + 0.01 * torch.randn(200_000, generator=gen, dtype=torch.float64)  # signal/noise power 1e4: 40 dB
    err = output_error(noisy, ref)
    assert err.sqnr_db == pytest.approx(40.0, abs=0.2)
    assert 0.9999 < err.cosine < 1.0
    exact = output_error(ref, ref)
    assert exact.sqnr_db is None and exact.max_abs_error == 0 and exact.cosine == pytest.approx(1.0)


def test_latency_does_warmup_then_enough_timed_steps():
    calls = []
    lat = time_steps(lambda: calls.append(1), "cpu", warmup=3, min_steps=7, max_steps=50, min_time_s=0.0)
    assert lat.n == 7 and len(calls) == 10 and lat.warmup == 3
    assert lat.p10 <= lat.median <= lat.p90
    capped = time_steps(lambda: None, "cpu", warmup=0, min_steps=1, max_steps=4, min_time_s=10.0)
    assert capped.n == 4


def test_digest_tells_bit_identical_from_nearly_identical():
    t = torch.randn(100)
    assert digest(t) == digest(t.clone())
    assert digest(t) != digest(t + 1e-7 * t.abs().max())
