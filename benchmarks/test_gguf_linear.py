"""The storage-only cost the seed warns about: a GGUF linear (packed blocks dequantized every forward) against a
plain float linear of the same shape, on the CPU."""

import pytest
import torch
from torch import nn

from harness.engines.gguf_engine import GGUFEngine

SHAPE, TOKENS = (1024, 1024), 256


@pytest.fixture(scope="module")
def layers():
    torch.manual_seed(0)
    plain = nn.Linear(*SHAPE)
    packed = {q: GGUFEngine().quantize_layer(plain, q, dtype=torch.float32, device=torch.device("cpu"))
              for q in ("Q8_0", "Q4_0")}
    return plain, packed, torch.randn(TOKENS, SHAPE[0])


def test_float_linear(benchmark, layers):
    plain, _, x = layers
    with torch.no_grad():
        assert benchmark(plain, x).shape == (TOKENS, SHAPE[1])


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gguf_linear(benchmark, layers, qtype):
    _, packed, x = layers
    with torch.no_grad():
        assert benchmark(packed[qtype], x).shape == (TOKENS, SHAPE[1])
