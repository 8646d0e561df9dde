"""Built-in models, made in code with seeded random weights (no downloads).

- `dit-*`: a DiT/MMDiT-like transformer (patchified latents + text tokens, attention and MLP blocks with adaptive
  layer norm driven by the timestep), the shape of Flux/SD3 transformers.
- `pipe-*`: a whole pipeline in one module: a text encoder, a `dit` transformer and a VAE decoder, as in an
  all-in-one single-file checkpoint.
- `unet-*`: a UNet-like conv net (res blocks with timestep embedding, self/cross attention, down/up sampling with skip
  connections), the shape of SD/SDXL UNets.

Sizes run from `xs` (CI-tiny) to `l` (realistic layer shapes, for GPU boxes). The same seed gives bit-identical
weights and inputs: weights are drawn in parameter-name order from one `torch.Generator` on the CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from harness.models.specs import MODELS, ModelSpec


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Attention(nn.Module):
    """Multi-head attention; `context` makes it cross-attention."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q = self.to_q(x)
        k, v = self.to_kv(x if context is None else context).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, -1, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


# ------------------------------------------------------------------------------------------------ DiT

class DiTBlock(nn.Module):
    """Joint attention over image and text tokens, then an MLP, both modulated by the conditioning (adaLN-Zero)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(cond)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class DiT(nn.Module):
    def __init__(self, spec: ModelSpec, patch: int = 2):
        super().__init__()
        self.spec, self.patch = spec, patch
        dim = spec.width
        self.x_embedder = nn.Linear(spec.channels * patch * patch, dim)
        self.context_embedder = nn.Linear(spec.context_dim, dim)
        self.t_embedder = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (spec.latent // patch) ** 2, dim))
        self.blocks = nn.ModuleList(DiTBlock(dim, spec.heads) for _ in range(spec.depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_out = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.proj_out = nn.Linear(dim, spec.channels * patch * patch)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        p = self.patch
        tokens = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        x = self.x_embedder(tokens) + self.pos_embed
        n_img = x.shape[1]
        x = torch.cat([x, self.context_embedder(context)], dim=1)
        cond = self.t_embedder(timestep_embedding(timestep, 256).to(x.dtype))
        for block in self.blocks:
            x = block(x, cond)
        shift, scale = self.adaLN_out(cond)[:, None].chunk(2, dim=-1)
        x = self.proj_out(self.norm_out(x[:, :n_img]) * (1 + scale) + shift)
        return x.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


# ----------------------------------------------------------------------------------------------- UNet

class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(32, cin // 4), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(min(32, cout // 4), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SpatialTransformer(nn.Module):
    """Self-attention, cross-attention to the text context, and a feed-forward, on the feature map's pixels."""

    def __init__(self, ch: int, heads: int, context_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(min(32, ch // 4), ch)
        self.proj_in = nn.Linear(ch, ch)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(ch), nn.LayerNorm(ch), nn.LayerNorm(ch)
        self.attn1 = Attention(ch, heads)
        self.attn2 = Attention(ch, heads, context_dim)
        self.ff = nn.Sequential(nn.Linear(ch, 4 * ch), nn.GELU(), nn.Linear(4 * ch, ch))
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c))
        t = t + self.attn1(self.norm1(t))
        t = t + self.attn2(self.norm2(t), context)
        t = t + self.ff(self.norm3(t))
        return x + self.proj_out(t).reshape(b, h, w, c).permute(0, 3, 1, 2)


class UNetLevel(nn.Module):
    def __init__(self, cin: int, cout: int, spec: ModelSpec, temb: int, *, attention: bool, up: bool):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(cin if i == 0 else cout, cout, temb) for i in range(spec.depth))
        self.attn = nn.ModuleList(SpatialTransformer(cout, spec.heads, spec.context_dim) for _ in range(spec.depth)) \
            if attention else None
        self.resample = nn.Conv2d(cout, cout, 3, padding=1, stride=1 if up else 2)
        self.up = up

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for i, res in enumerate(self.res):
            x = res(x, temb)
            if self.attn is not None:
                x = self.attn[i](x, context)
        if self.up:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.resample(x)


class UNet(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        widths = [spec.width * (2 ** i) for i in range(spec.levels)]
        temb = 4 * spec.width
        self.time_embedding = nn.Sequential(nn.Linear(spec.width, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(spec.channels, spec.width, 3, padding=1)
        self.down_blocks = nn.ModuleList(
            UNetLevel(widths[max(i - 1, 0)], w, spec, temb, attention=i > 0, up=False) for i, w in enumerate(widths))
        self.mid_block = ResBlock(widths[-1], widths[-1], temb)
        self.mid_attn = SpatialTransformer(widths[-1], spec.heads, spec.context_dim)
        rev = widths[::-1]
        self.up_blocks = nn.ModuleList(
            UNetLevel(2 * w, rev[min(i + 1, len(rev) - 1)], spec, temb, attention=i < len(rev) - 1, up=True)
            for i, w in enumerate(rev))
        self.norm_out = nn.GroupNorm(min(32, rev[-1] // 4), rev[-1])
        self.conv_out = nn.Conv2d(rev[-1], spec.channels, 3, padding=1)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        temb = self.time_embedding(timestep_embedding(timestep, self.spec.width).to(latents.dtype))
        x = self.conv_in(latents)
        skips = []
        for level in self.down_blocks:
            x = level(x, temb, context)
            skips.append(x)
        x = self.mid_attn(self.mid_block(x, temb), context)
        for level in self.up_blocks:
            x = level(torch.cat([x, skips.pop()], dim=1), temb, context)
        return self.conv_out(F.silu(self.norm_out(x)))


# ------------------------------------------------------------------------------------------- Pipeline

class Pipeline(nn.Module):
    """Text encoder -> transformer -> VAE decoder in one module: the components of an all-in-one checkpoint."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        d = spec.context_dim
        self.text_encoder = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d), nn.LayerNorm(d))
        self.transformer = DiT(spec)
        self.vae = nn.Sequential(nn.Conv2d(spec.channels, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 3, 3, padding=1))

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.vae(self.transformer(latents, timestep, self.text_encoder(context)))


# ------------------------------------------------------------------------------------- build and inputs

def spec_of(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; expected one of {list(MODELS)}") from None


def build_skeleton(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model with no weights (on the meta device): what on-the-fly and prequantized loading fill in."""
    spec = spec_of(name)
    with torch.device("meta"):
        model = {"dit": DiT, "unet": UNet, "pipe": Pipeline}[spec.kind](spec)
    return model.to(dtype).eval()


def build_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model on the CPU with seeded weights, fan-in scaled so activations keep a sane range."""
    model = build_skeleton(name, torch.float32).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            if pname.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif p.dim() == 1:  # norm weights
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
        for buf in model.buffers():
            buf.zero_()
    return model.to(dtype)


def make_inputs(name: str, seed: int = 0, batch: int = 1, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """One denoising step's inputs: noisy latents, a timestep and text-encoder states."""
    spec = spec_of(name)
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = {
        "latents": torch.randn(batch, spec.channels, spec.latent, spec.latent, generator=gen),
        "timestep": torch.randint(0, 1000, (batch,), generator=gen).float(),
        "context": torch.randn(batch, spec.context_tokens, spec.context_dim, generator=gen),
    }
    return {k: (v if k == "timestep" else v.to(dtype)).to(device) for k, v in inputs.items()}


def components(model: nn.Module) -> list[nn.Module]:
    """The units balanced offload moves as a whole (diffusers' pipeline components, scaled down to the model's
    top-level modules; a ModuleList has no forward of its own, so its items are the units)."""
    units: list[nn.Module] = []
    for child in model.children():
        units.extend(child.children() if isinstance(child, nn.ModuleList) else [child])
    return [m for m in units if any(True for _ in m.parameters())]
