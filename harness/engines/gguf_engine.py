"""GGUF: storage-only quantization. Linear weights are kept as GGML's packed blocks (written and read with the
`gguf` package) and dequantized on the fly, in torch, on the execution device, for every forward.

`gguf` quantizes Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 (those are the types offered); files made elsewhere may also hold the
K-quants Q4_K, Q5_K and Q6_K, which `dequantize` reads too. Each kernel here matches `gguf.quants.dequantize`
exactly (tests/test_gguf.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.engines.base import Engine, replace_linears
from harness.errors import QuantMatrixError

BLOCK = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
         "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}  # (weights, bytes) per block


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 from pairs of bytes (..., 2) -> (..., 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Low nibbles then high nibbles of each byte row: GGML's order within a 32-weight block."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _high_bits(qh: torch.Tensor, n: int) -> torch.Tensor:
    """Bit i of a little-endian 4-byte field, for i < n, as (..., n) 0/1."""
    bits = qh.to(torch.int32)
    word = bits[..., 0] | (bits[..., 1] << 8) | (bits[..., 2] << 16) | (bits[..., 3] << 24)
    return (word[..., None] >> torch.arange(n, device=qh.device, dtype=torch.int32)) & 1


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes of a Q4_K/Q5_K super-block."""
    s = scales.to(torch.int32)
    lo = s[..., 0:4] & 63, s[..., 4:8] & 63
    hi_sc = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    hi_m = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return torch.cat([lo[0], hi_sc], -1).float(), torch.cat([lo[1], hi_m], -1).float()


def dequantize(packed: torch.Tensor, qtype: str, shape: tuple[int, int]) -> torch.Tensor:
    """Float32 weights of `shape` from GGML blocks (`packed`: uint8, any shape with whole blocks per row)."""
    n, size = BLOCK[qtype]
    b = packed.reshape(-1, size)
    if qtype == "Q8_0":
        w = _f16(b[:, :2]) * b[:, 2:].view(torch.int8).float()
    elif qtype in ("Q4_0", "Q4_1"):
        off = 2 if qtype == "Q4_0" else 4
        q = _nibbles(b[:, off:]).float()
        w = _f16(b[:, :2]) * (q - 8) if qtype == "Q4_0" else _f16(b[:, :2]) * q + _f16(b[:, 2:4])
    elif qtype in ("Q5_0", "Q5_1"):
        off = 2 if qtype == "Q5_0" else 4
        q = (_nibbles(b[:, off + 4:]) | (_high_bits(b[:, off:off + 4], 32).to(torch.uint8) << 4)).float()
        w = _f16(b[:, :2]) * (q - 16) if qtype == "Q5_0" else _f16(b[:, :2]) * q + _f16(b[:, 2:4])
    elif qtype in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, m = _scale_min_k4(b[:, 4:16])
        qs = b[:, 16 + (32 if qtype == "Q5_K" else 0):].reshape(-1, 4, 32)
        q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)  # sub-blocks 2i (low), 2i+1 (high)
        if qtype == "Q5_K":
            qh = b[:, 16:48]  # bit j of qh[l] is the fifth bit of weight l of sub-block j
            bits = (qh[:, None, :] >> torch.arange(8, device=b.device, dtype=torch.uint8)[None, :, None]) & 1
            q = q | (bits << 4)
        w = (d * sc)[..., None] * q.float() - (dmin * m)[..., None]
    elif qtype == "Q6_K":
        ql, qh = b[:, :128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 32)
        sc = b[:, 192:208].view(torch.int8).float().reshape(-1, 2, 8)
        d = _f16(b[:, 208:210])
        lo = torch.cat([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4], dim=-1)
        hi = torch.cat([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=-1)
        q = ((lo | (hi << 4)).to(torch.int32) - 32).float().reshape(-1, 2, 8, 16)
        w = d[:, :, None, None] * sc[..., None] * q
    else:
        raise ValueError(f"no torch kernel for GGML type {qtype}")
    return w.reshape(shape)


class GGUFLinear(nn.Module):
    """A Linear whose weight stays packed in GGML blocks and is dequantized for every forward."""

    def __init__(self, packed: torch.Tensor, qtype: str, in_features: int, out_features: int,
                 bias: torch.Tensor | None):
        super().__init__()
        self.qtype, self.in_features, self.out_features = qtype, in_features, out_features
        self.register_buffer("weight", packed)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize(self.weight, self.qtype, (self.out_features, self.in_features)).to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, qtype={self.qtype}"


# Top-level names of the components that are not the UNet/transformer, in the checkpoint layouts in use
# (diffusers, original SD/SDXL single files, ComfyUI's all-in-one files, and the built-in `pipe-*` models).
OTHER_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoders", "cond_stage_model", "conditioner", "vae",
                    "first_stage_model")


class GGUFContentsError(QuantMatrixError):
    """A GGUF file whose tensors cannot be loaded as the model (the message names the file)."""

    def __init__(self, path: Path, message: str):
        super().__init__(message, path=path)


def check_denoiser_only(path: Path, tensors: dict) -> None:
    """The seed: "only supported component in gguf binary format is UNET/Transformer; you cannot load all-in-one
    single-file GGUF model". A file with text encoder or VAE tensors is refused before anything is read."""
    found: dict[str, int] = {}
    for name in tensors:
        top = name.split(".", 1)[0]
        if top in OTHER_COMPONENTS:
            found[top] = found.get(top, 0) + 1
    if found:
        parts = ", ".join(f"{k}: {n} tensors" for k, n in sorted(found.items()))
        raise GGUFContentsError(path, f"all-in-one GGUF file: it holds other components than the UNet/transformer "
                                      f"({parts}); only the UNet/transformer can be loaded from GGUF. Load the "
                                      "transformer from a GGUF file and the other components separately")


# This engine in a standalone repro script (harness/repro.py reads it as text, without importing this module):
# GGUF after load is this module's own kernels, not an upstream API, so a script writes only the file `save`
# writes (`write_file`: the float model quantized layer by layer, as `quantize` then `save` do) for diffusers'
# from_single_file to read; `{qtype}` is filled with the type.
REPRO = {
    "imports": "import gguf\nimport numpy as np",
    "needs": ("numpy",),
    "why_not": {"post-load": "GGUF after load runs the harness's own kernels (harness/engines/gguf_engine.py), not an "
                             "upstream API; only its .gguf file, read by diffusers, is written",
                "on-the-fly": "GGUF while loading is the harness's own kernels too, not an upstream API"},
    "helpers": """\
def write_gguf(model: nn.Module, path: Path) -> Path:  # harness/engines/gguf_engine.py quantize, then save
    kind, state = gguf.GGMLQuantizationType.{qtype}, model.state_dict()
    linears = {{name for name, module in model.named_modules() if type(module) is nn.Linear}}
    order = []  # the quantized model's state dict: a quantized Linear holds its bias before its packed weight
    for name in state:
        owner, _, leaf = name.rpartition(".")
        if not (owner in linears and leaf == "weight" and f"{{owner}}.bias" in state):
            order += [name, f"{{owner}}.weight"] if owner in linears and leaf == "bias" else [name]
    writer = gguf.GGUFWriter(str(path), "quantmatrix")
    for name in order:
        tensor = state[name].detach().float().cpu().numpy()
        if name.rpartition(".")[0] in linears and name.endswith(".weight"):
            writer.add_tensor(name, np.ascontiguousarray(gguf.quants.quantize(tensor, kind)), raw_dtype=kind)
        else:
            writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path""",
    "write_file": "write_gguf(build_model(), tmp / 'model.gguf')",
}


def write_file(path: Path, arch: str, tensors: Iterable[tuple[str, np.ndarray, object]]) -> Path:
    """A .gguf file of (name, array, GGML type or None for a plain array) tensors under an architecture name."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    for name, array, raw_dtype in tensors:
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class GGUFEngine(Engine):
    name = "gguf"

    def quantize(self, model: nn.Module, qtype: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        return replace_linears(model, lambda layer: self.quantize_layer(layer, qtype, dtype=dtype, device=device))

    def quantize_layer(self, layer: nn.Linear, qtype: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        import gguf

        ggml = gguf.GGMLQuantizationType[qtype]
        weight = layer.weight.detach().float().cpu().numpy()
        packed = torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(weight, ggml)))
        bias = None if layer.bias is None else layer.bias.detach().cpu()
        return GGUFLinear(packed, qtype, layer.in_features, layer.out_features, bias)

    def save(self, model: nn.Module, qtype: str, path: Path) -> Path:
        import gguf

        def tensors():
            for name, tensor in model.state_dict().items():
                module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
                if isinstance(module, GGUFLinear) and name.endswith(".weight"):
                    yield name, tensor.numpy(), gguf.GGMLQuantizationType[module.qtype]
                else:
                    yield name, tensor.detach().float().cpu().numpy(), None

        return write_file(path, "quantmatrix", tensors())

    def load(self, path: Path, skeleton: nn.Module, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        import gguf

        reader = gguf.GGUFReader(str(path))
        tensors = {t.name: t for t in reader.tensors}
        check_denoiser_only(path, tensors)
        state = {}
        for name, t in tensors.items():
            kind = gguf.GGMLQuantizationType(t.tensor_type).name
            if kind in BLOCK:
                continue
            shape = tuple(int(s) for s in reversed(t.shape))
            state[name] = torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(shape).to(dtype)
        used = set()

        def rebuild(layer: nn.Linear, name: str) -> nn.Module:
            t = tensors.get(f"{name}.weight")
            if t is None:
                raise GGUFContentsError(path, f"no tensor {name}.weight for the model's layer {name}")
            kind = gguf.GGMLQuantizationType(t.tensor_type).name
            if kind not in BLOCK:  # stored in float: an ordinary Linear
                return nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            if layer.bias is not None and f"{name}.bias" not in state:
                raise GGUFContentsError(path, f"the file does not fit the model: no tensor {name}.bias")
            used.update((t.name, f"{name}.bias"))
            packed = torch.from_numpy(np.array(t.data, dtype=np.uint8))
            return GGUFLinear(packed, kind, layer.in_features, layer.out_features, state.pop(f"{name}.bias", None))

        model = replace_linears(skeleton, rebuild, with_names=True)
        _, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
        unused = sorted((set(tensors) - used - set(state)) | set(unexpected))  # `used` may name absent biases
        if missing or unused:
            raise GGUFContentsError(path, f"the file does not fit the model: {len(missing)} model tensors missing "
                                          f"{missing[:3]}, {len(unused)} file tensors unused {unused[:3]}")
        return model

    def recognise(self, path: Path) -> str | None:
        """A GGUF file's type is the GGML type of its quantized 2-D tensors (the most common one)."""
        import gguf

        if path.suffix != ".gguf":
            return None
        reader = gguf.GGUFReader(str(path))
        kinds = [gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors if len(t.shape) == 2]
        quantized = [k for k in kinds if k in BLOCK]
        return max(set(quantized), key=quantized.count) if quantized else None
