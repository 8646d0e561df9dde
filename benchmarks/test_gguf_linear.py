"""The storage-only cost the seed warns about: a GGUF linear (packed blocks dequantized every forward) against a
plain float linear of the same shape, on the CPU. Each benchmark also checks what it timed computed the layer."""

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
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
        out = benchmark(plain, x)
        assert torch.equal(out, F.linear(x, plain.weight, plain.bias))


@pytest.mark.parametrize("qtype, min_sqnr_db", [("Q8_0", 40.0), ("Q4_0", 18.0)])
def test_gguf_linear(benchmark, layers, qtype, min_sqnr_db):
    plain, packed, x = layers
    layer = packed[qtype]
    with torch.no_grad():
        out = benchmark(layer, x)
        # the reference: the gguf package's own dequantization of the stored blocks, then a float linear
        weight = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(
            layer.weight.numpy(), gguf.GGMLQuantizationType[qtype]))).reshape(SHAPE[1], SHAPE[0])
        torch.testing.assert_close(out, F.linear(x, weight, layer.bias), rtol=1e-5, atol=1e-5)
        # and the blocks hold the float layer's weights, to within the type's precision
        exact = plain(x)
        sqnr = 10 * torch.log10(exact.pow(2).mean() / (out - exact).pow(2).mean())
        assert sqnr > min_sqnr_db, f"{qtype}: SQNR {sqnr:.1f} dB"
