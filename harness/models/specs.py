"""The built-in models' names and shapes, as data (no torch): what a matrix file may name, and what `imitation`
(the harness's own DiT/UNet modules) and `real` (diffusers' model classes) build. Imitations: `xs` is CI-tiny (2-3 M
parameters); `l` has realistic layer shapes (`dit-l`: 2.1 B parameters, Flux's width of 3072). Real classes:
`*-tiny` in the spirit of diffusers' own model tests, but every Linear has at least 64 input features (so group
sizes of 32 and 64 apply); `flux-dev` and `sdxl` are the real shapes, with the inputs of a 1024x1024 image.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # imitations: "dit" | "unet" | "pipe"; diffusers' classes: "flux" | "sd3" | "sdxl"
    width: int  # hidden size (dit) / base channels (unet)
    depth: int  # blocks (dit) / res blocks per level (unet)
    heads: int
    latent: int = 16  # latent height and width
    channels: int = 4  # latent channels
    context_tokens: int = 16
    context_dim: int = 256
    levels: int = 2  # unet resolution levels
    pooled_dim: int = 0  # pooled text embedding (real classes)
    # Too big to draw per cell (flux-dev: 11.9 B weights): built once per run, in the cell's dtype, into a
    # diffusers model directory that every cell of the run loads (stacks.loading.float_model).
    shared_weights: bool = False

    @property
    def real(self) -> bool:
        """A diffusers model class (runs on both stacks), not one of the harness's own imitations."""
        return self.kind in REAL_CLASSES


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

    # diffusers' classes, seeded random weights (configs in DIFFUSERS_CONFIGS)
    "flux-tiny": ModelSpec("flux", width=128, depth=2, heads=4, latent=16, channels=16, context_tokens=16,
                           context_dim=128, pooled_dim=128),
    "sd3-tiny": ModelSpec("sd3", width=128, depth=2, heads=4, latent=16, channels=16, context_tokens=16,
                          context_dim=128, pooled_dim=128),
    "sdxl-tiny": ModelSpec("sdxl", width=64, depth=1, heads=2, latent=16, channels=4, context_tokens=16,
                           context_dim=64, pooled_dim=64),
    "flux-dev": ModelSpec("flux", width=3072, depth=19, heads=24, latent=128, channels=16, context_tokens=512,
                          context_dim=4096, pooled_dim=768, shared_weights=True),
    "sdxl": ModelSpec("sdxl", width=320, depth=2, heads=10, latent=128, channels=4, context_tokens=77,
                      context_dim=2048, pooled_dim=1280, shared_weights=True),
}

REAL_CLASSES = {"flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel", "sdxl": "UNet2DConditionModel"}

# Constructor arguments of the real classes. flux-dev: the class defaults are Flux's (19 double, 38 single blocks,
# 24 heads of 128), plus Flux-dev's guidance embedding; sdxl: SDXL-base's UNet config.
DIFFUSERS_CONFIGS: dict[str, dict] = {
    "flux-tiny": dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
                      num_attention_heads=4, joint_attention_dim=128, pooled_projection_dim=128,
                      guidance_embeds=False, axes_dims_rope=(8, 12, 12)),
    "sd3-tiny": dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=32,
                     num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=128,
                     pooled_projection_dim=128, out_channels=16, pos_embed_max_size=16),
    "sdxl-tiny": dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128),
                      layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=32,
                      transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=256,
                      cross_attention_dim=64, norm_num_groups=32),
    "flux-dev": dict(guidance_embeds=True),
    "sdxl": dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                 layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, transformer_layers_per_block=(1, 2, 10),
                 projection_class_embeddings_input_dim=2816, cross_attention_dim=2048),
}
