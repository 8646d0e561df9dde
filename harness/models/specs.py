"""The built-in models' names and shapes, as data (no torch): what a matrix file may name, and what
`imitation` builds. `xs` is CI-tiny (2-3 M parameters); `l` has realistic layer shapes (`dit-l`: 2.1 B parameters,
Flux's width of 3072).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "dit" | "unet" | "pipe"
    width: int  # hidden size (dit) / base channels (unet)
    depth: int  # blocks (dit) / res blocks per level (unet)
    heads: int
    latent: int = 16  # latent height and width
    channels: int = 4  # latent channels
    context_tokens: int = 16
    context_dim: int = 256
    levels: int = 2  # unet resolution levels


MODELS: dict[str, ModelSpec] = {
    "dit-xs": ModelSpec("dit", width=256, depth=2, heads=4, channels=16),
    "dit-s": ModelSpec("dit", width=512, depth=4, heads=8, latent=32, channels=16),
    "dit-m": ModelSpec("dit", width=1536, depth=8, heads=24, latent=64, channels=16, context_dim=1024,
                       context_tokens=77),
    "dit-l": ModelSpec("dit", width=3072, depth=12, heads=24, latent=64, channels=16, context_dim=4096,
                       context_tokens=256),
    "pipe-xs": ModelSpec("pipe", width=256, depth=2, heads=4, channels=16),
    "unet-xs": ModelSpec("unet", width=64, depth=1, heads=4),
    "unet-s": ModelSpec("unet", width=128, depth=1, heads=4, latent=32),
    "unet-m": ModelSpec("unet", width=320, depth=2, heads=8, latent=64, context_dim=768, context_tokens=77,
                        levels=3),
    "unet-l": ModelSpec("unet", width=320, depth=2, heads=10, latent=128, context_dim=2048, context_tokens=77,
                        levels=3),
}
