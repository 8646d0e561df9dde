"""The built-in models' names and shapes, as data (no torch): what a matrix file may name, and what `imitation`
(the harness's own DiT/UNet modules) and `real` (diffusers' model classes) build. Imitations: `xs` is CI-tiny (2-3 M
parameters); `l` has realistic layer shapes (`dit-l`: 2.1 B parameters, Flux's width of 3072). Real classes:
`*-tiny` in the spirit of diffusers' own model tests, but every Linear has at least 64 input features (so group
sizes of 32 and 64 apply); `flux-dev` and `sdxl` are the real shapes, with the inputs of a 1024x1024 image.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    pipeline: bool = False  # a whole diffusers pipeline (PIPELINES has its components), not a denoiser alone
    source: str = ""  # read from the user's disk (models/sources.py: a matrix's [models.NAME]), not built here

    @property
    def real(self) -> bool:
        """A diffusers model class or pipeline (runs on both stacks), not one of the harness's own imitations."""
        return self.kind in REAL_CLASSES


MODELS: dict[str, ModelSpec] = {
    "dit-xs": ModelSpec("dit", width=256, depth=2, heads=4, channels=16),
    "dit-s": ModelSpec("dit", width=512, depth=4, heads=8, latent=32, channels=16),
    "dit-m": ModelSpec("dit", width=1536, depth=8, heads=24, latent=64, channels=16, context_dim=1024,
                       context_tokens=77),
    # dit-m's width on a CPU's budget: 179 M parameters (358 MB in bf16) and 64 image tokens, so the weights
    # dominate a step's peak and a memory figure speaks of the format (a 70 ms step on 2 cores)
    "dit-mem": ModelSpec("dit", width=1536, depth=4, heads=24, latent=16, channels=16, context_dim=1024),
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

    # Whole pipelines (PIPELINES): text encoders, denoiser, VAE, scheduler and tokenizers made in code
    "flux-tiny-pipe": ModelSpec("flux", width=128, depth=2, heads=4, latent=16, channels=16, pipeline=True),
    "sd3-tiny-pipe": ModelSpec("sd3", width=128, depth=2, heads=4, latent=16, channels=16, pipeline=True),
    "sdxl-tiny-pipe": ModelSpec("sdxl", width=64, depth=1, heads=2, latent=16, channels=4, pipeline=True),
    # The families people run now (FAMILIES below): Wan 2.x text-to-video, Chroma, Qwen-Image, Z-Image,
    # Lumina 2, Sana, HunyuanVideo
    "wan-tiny-pipe": ModelSpec("wan", width=128, depth=2, heads=4, latent=4, channels=16, pipeline=True),
    "chroma-tiny-pipe": ModelSpec("chroma", width=128, depth=2, heads=4, latent=16, channels=16, pipeline=True),
    "qwenimage-tiny-pipe": ModelSpec("qwenimage", width=128, depth=2, heads=4, latent=8, channels=16,
                                     pipeline=True),
    "zimage-tiny-pipe": ModelSpec("zimage", width=192, depth=2, heads=6, latent=16, channels=16, pipeline=True),
    "lumina2-tiny-pipe": ModelSpec("lumina2", width=128, depth=2, heads=4, latent=16, channels=16, pipeline=True),
    "sana-tiny-pipe": ModelSpec("sana", width=128, depth=2, heads=4, latent=16, channels=16, pipeline=True),
    "hunyuanvideo-tiny-pipe": ModelSpec("hunyuanvideo", width=128, depth=2, heads=4, latent=8, channels=16,
                                        pipeline=True),
    # Real configurations (Flux-dev with CLIP-L and T5-XXL; SDXL-base with CLIP-L and OpenCLIP bigG), for GPU
    # boxes: their float pipeline is written once per run and loaded by every cell.
    "flux-dev-pipe": ModelSpec("flux", width=3072, depth=19, heads=24, latent=128, channels=16, pipeline=True,
                               shared_weights=True),
    "sdxl-pipe": ModelSpec("sdxl", width=320, depth=2, heads=10, latent=128, channels=4, pipeline=True,
                           shared_weights=True),
    # The newer families' releases (RELEASED below), for GPU boxes
    "wan-14b-pipe": ModelSpec("wan", width=5120, depth=40, heads=40, latent=60, channels=16, pipeline=True,
                              shared_weights=True),
    "chroma-hd-pipe": ModelSpec("chroma", width=3072, depth=19, heads=24, latent=128, channels=16, pipeline=True,
                                shared_weights=True),
    "qwenimage-pipe": ModelSpec("qwenimage", width=3072, depth=60, heads=24, latent=166, channels=16,
                                pipeline=True, shared_weights=True),
    "zimage-turbo-pipe": ModelSpec("zimage", width=3840, depth=30, heads=30, latent=128, channels=16,
                                   pipeline=True, shared_weights=True),
    "hunyuanvideo-13b-pipe": ModelSpec("hunyuanvideo", width=3072, depth=60, heads=24, latent=90, channels=16,
                                       pipeline=True, shared_weights=True),
}

REAL_CLASSES = {"flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel", "sdxl": "UNet2DConditionModel",
                # the newer families, as whole pipelines only (their denoisers' inputs are not made alone)
                "wan": "WanTransformer3DModel", "chroma": "ChromaTransformer2DModel",
                "qwenimage": "QwenImageTransformer2DModel", "zimage": "ZImageTransformer2DModel",
                "lumina2": "Lumina2Transformer2DModel", "sana": "SanaTransformer2DModel",
                "hunyuanvideo": "HunyuanVideoTransformer3DModel"}

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


# ------------------------------------------------------------------------------------------------ pipelines

@dataclass(frozen=True)
class PipelineSpec:
    """A diffusers pipeline as data: its class, its components' classes and constructor arguments, the
    components SD.Next's "TE" option quantizes, and the generation a cell runs (a fixed prompt, size, steps)."""

    pipeline: str  # diffusers class
    denoiser: str  # the component attribute: "transformer" | "unet"
    denoiser_config: dict  # REAL_CLASSES[kind] arguments
    text_encoders: dict  # attribute -> (transformers class, config arguments)
    tokenizers: dict  # attribute -> max length (made in code with `tokenizers`: a word-level vocabulary)
    vae: dict  # AutoencoderKL arguments
    scheduler: str  # diffusers class, default arguments
    # What SD.Next quantizes with "TE" in its quantization module list (vladmandic/sdnext@d11a619,
    # pipelines/model_flux.py:53 and model_sd3.py:23: only T5 goes through generic.load_text_encoder, whose
    # get_dit_args(module='TE') creates the SDNQConfig (modules/model_quant.py:99), the CLIPs load with
    # allow_quant=False; SDXL loads through the generic loader with allow_post_quant (sd_models.py:890) and
    # post-quantizes text_encoder and text_encoder_2 (sd_models_utils.py:251-266)).
    quantized_te: tuple[str, ...]
    call: dict  # the pipeline call's arguments besides prompt and generator
    vocab: int = 1000
    vae_class: str = "AutoencoderKL"
    scheduler_config: dict = field(default_factory=dict)
    chat: bool = False  # a Qwen tokenizer: words and punctuation apart, with a chat template (Qwen-Image, Z-Image)


def _clip(hidden: int, *, projection: int = 0, layers: int = 2, heads: int = 2, vocab: int = 1000,
          positions: int = 32, intermediate: int | None = None) -> tuple[str, dict]:
    config = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=positions,
                  bos_token_id=0, eos_token_id=2, pad_token_id=1)
    if projection:
        return "CLIPTextModelWithProjection", {**config, "projection_dim": projection}
    return "CLIPTextModel", config


def _t5(d_model: int, *, layers: int = 2, heads: int = 4, d_kv: int = 32, d_ff: int | None = None,
        vocab: int = 1000, umt5: bool = False) -> tuple[str, dict]:
    return "UMT5EncoderModel" if umt5 else "T5EncoderModel", dict(
        vocab_size=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff or 2 * d_model, num_layers=layers, num_heads=heads,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0)


def _qwen(hidden: int, *, layers: int = 2, heads: int = 2, vocab: int = 1000, vl: bool = False,
          intermediate: int | None = None, kv_heads: int | None = None, head_dim: int | None = None,
          vision: dict | None = None, tied: bool = False) -> tuple[str, dict]:
    """Qwen3's language model (Z-Image's text encoder), or Qwen2.5-VL with a vision tower (Qwen-Image's: the
    pipeline runs its language model on the prompt; the ids of its vision tokens are in the vocabulary, never in a
    prompt). Tiny by default; the released configurations name every size."""
    head_dim = head_dim or hidden // heads
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                max_position_embeddings=256, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                tie_word_embeddings=tied)
    if not vl:
        return "Qwen3Model", {**text, "head_dim": head_dim}
    unit = head_dim // 16  # mrope's three sections split half of a head's dimensions: 2 : 3 : 3
    return "Qwen2_5_VLForConditionalGeneration", dict(
        text_config={**text, "rope_scaling": {"mrope_section": [2 * unit, 3 * unit, 3 * unit],
                                              "rope_type": "default", "type": "default"}},
        vision_config=vision or dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2,
                                     out_hidden_size=hidden),
        vocab_size=vocab, hidden_size=hidden, image_token_id=vocab - 5, video_token_id=vocab - 4,
        vision_start_token_id=vocab - 3, vision_end_token_id=vocab - 2, vision_token_id=vocab - 1,
        tie_word_embeddings=tied)


def _gemma(hidden: int, *, layers: int = 2, heads: int = 2, vocab: int = 1000) -> tuple[str, dict]:
    """Gemma 2's language model: Lumina 2's and Sana's text encoder (transformers' Gemma2Model)."""
    return "Gemma2Model", dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                               head_dim=hidden // heads, query_pre_attn_scalar=hidden // heads, sliding_window=64,
                               max_position_embeddings=256, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _llama(hidden: int, *, layers: int = 3, heads: int = 2, vocab: int = 1000, intermediate: int | None = None,
           kv_heads: int | None = None, positions: int = 256) -> tuple[str, dict]:
    """Llama's language model: HunyuanVideo's text encoder (transformers' LlamaModel; its pipeline reads the hidden
    states two layers before the last, so three layers at least)."""
    return "LlamaModel", dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                              num_hidden_layers=layers, num_attention_heads=heads,
                              num_key_value_heads=kv_heads or heads, max_position_embeddings=positions,
                              bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _vae(latent_channels: int, blocks: tuple[int, ...] = (32, 64), **extra) -> dict:
    n = len(blocks)
    return dict(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=blocks,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                layers_per_block=1, norm_num_groups=32, sample_size=32, force_upcast=False, **extra)


_TINY_CALL = dict(height=32, width=32, num_inference_steps=2)
_SDXL_TINY_UNET = {**DIFFUSERS_CONFIGS["sdxl-tiny"], "cross_attention_dim": 128}  # two 64-wide CLIPs, joined

PIPELINES: dict[str, PipelineSpec] = {
    "flux-tiny-pipe": PipelineSpec(
        "FluxPipeline", "transformer", DIFFUSERS_CONFIGS["flux-tiny"],
        {"text_encoder": _clip(128, heads=4), "text_encoder_2": _t5(128)},
        {"tokenizer": 16, "tokenizer_2": 16}, _vae(16, shift_factor=0.1159, scaling_factor=0.3611),
        "FlowMatchEulerDiscreteScheduler", ("text_encoder_2",), {**_TINY_CALL, "max_sequence_length": 16}),
    "sd3-tiny-pipe": PipelineSpec(
        "StableDiffusion3Pipeline", "transformer", DIFFUSERS_CONFIGS["sd3-tiny"],
        {"text_encoder": _clip(64, projection=64), "text_encoder_2": _clip(64, projection=64),
         "text_encoder_3": _t5(128)},
        {"tokenizer": 16, "tokenizer_2": 16, "tokenizer_3": 16}, _vae(16, shift_factor=0.0609, scaling_factor=1.5305),
        "FlowMatchEulerDiscreteScheduler", ("text_encoder_3",), {**_TINY_CALL, "max_sequence_length": 16}),
    "sdxl-tiny-pipe": PipelineSpec(
        "StableDiffusionXLPipeline", "unet", _SDXL_TINY_UNET,
        {"text_encoder": _clip(64), "text_encoder_2": _clip(64, projection=64)},
        {"tokenizer": 16, "tokenizer_2": 16}, _vae(4, scaling_factor=0.13025), "EulerDiscreteScheduler",
        ("text_encoder", "text_encoder_2"), _TINY_CALL),
    "flux-dev-pipe": PipelineSpec(
        "FluxPipeline", "transformer", DIFFUSERS_CONFIGS["flux-dev"],
        {"text_encoder": _clip(768, layers=12, heads=12, vocab=49408, positions=77, intermediate=3072),
         "text_encoder_2": _t5(4096, layers=24, heads=64, d_kv=64, d_ff=10240, vocab=32128)},
        {"tokenizer": 77, "tokenizer_2": 512},
        _vae(16, (128, 256, 512, 512), shift_factor=0.1159, scaling_factor=0.3611) | {"layers_per_block": 2,
                                                                                     "sample_size": 1024},
        "FlowMatchEulerDiscreteScheduler", ("text_encoder_2",),
        dict(height=1024, width=1024, num_inference_steps=4, max_sequence_length=512), vocab=49408),
    "sdxl-pipe": PipelineSpec(
        "StableDiffusionXLPipeline", "unet", DIFFUSERS_CONFIGS["sdxl"],
        {"text_encoder": _clip(768, layers=12, heads=12, vocab=49408, positions=77, intermediate=3072),
         "text_encoder_2": _clip(1280, projection=1280, layers=32, heads=20, vocab=49408, positions=77,
                                 intermediate=5120)},
        {"tokenizer": 77, "tokenizer_2": 77},
        _vae(4, (128, 256, 512, 512), scaling_factor=0.13025) | {"layers_per_block": 2, "sample_size": 1024},
        "EulerDiscreteScheduler", ("text_encoder", "text_encoder_2"),
        dict(height=1024, width=1024, num_inference_steps=4), vocab=49408),
}

# The families people run now, at tiny shapes (every Linear at least 64 wide, the blocks' at least 128 x 128:
# SDNQ leaves layers under 16,384 elements unquantized, sdnq quantizer.py minimum_allowed_numel), each with the
# text encoder its release uses, which SD.Next quantizes with "TE" (vladmandic/sdnext@d11a619: model_wanai.py:11
# get_dit_args(module='TE'); model_chroma.py:19, model_qwen.py:70 and model_z_image.py:49 through
# generic.load_text_encoder; Z-Image's is Qwen3ForCausalLM there, diffusers' Qwen3Model here; model_lumina.py:47
# load_lumina2 likewise, model_sana.py:21 init_quants with check_quant('TE'); HunyuanVideo 1.0 T2V's LlamaModel
# through modules/video_models/video_load.py:75-77 get_dit_args(module='TE'), models_def.py:105-111, its CLIP not).
# Wan: UMT5, its causal video VAE, the UniPC flow scheduler its release ships (diffusers#13488 lives there), 5
# frames; Qwen-Image: Qwen2.5-VL's language model and its own VAE; Z-Image: Qwen3 and a chat-template prompt;
# Lumina 2 and Sana: Gemma 2; HunyuanVideo: Llama and CLIP, its causal 3D VAE, 5 frames.
# HunyuanVideo's prompt template (its pipeline's default) and where its system part ends: the pipeline crops that
# many tokens off the Llama states, 95 with Llama 3's tokenizer; 57 with the word-level one made here (tested)
HUNYUAN_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: 1. The "
    "main content and theme of the video.2. The color, shape, size, texture, quantity, text, and spatial "
    "relationships of the objects.3. Actions, events, behaviors temporal relationships, physical movement changes "
    "of the objects.4. background environment, light, style and atmosphere.5. camera angles, movements, and "
    "transitions used in the video:<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>")
HUNYUAN_CROP = 57
_WAN_VAE = dict(base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                temperal_downsample=[False, True, True])
FAMILIES: dict[str, PipelineSpec] = {
    "wan-tiny-pipe": PipelineSpec(
        "WanPipeline", "transformer",
        dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
             text_dim=128, freq_dim=256, ffn_dim=256, num_layers=2, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        {"text_encoder": _t5(128, umt5=True)}, {"tokenizer": 16}, _WAN_VAE, "UniPCMultistepScheduler",
        ("text_encoder",), dict(height=32, width=32, num_frames=5, num_inference_steps=2, max_sequence_length=16),
        vae_class="AutoencoderKLWan",
        scheduler_config=dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)),
    "chroma-tiny-pipe": PipelineSpec(
        "ChromaPipeline", "transformer",
        dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
             num_attention_heads=4, joint_attention_dim=128, axes_dims_rope=(8, 12, 12), approximator_hidden_dim=64,
             approximator_layers=1, approximator_num_channels=64),
        {"text_encoder": _t5(128)}, {"tokenizer": 16}, _vae(16, shift_factor=0.1159, scaling_factor=0.3611),
        "FlowMatchEulerDiscreteScheduler", ("text_encoder",), {**_TINY_CALL, "max_sequence_length": 16}),
    "qwenimage-tiny-pipe": PipelineSpec(
        "QwenImagePipeline", "transformer",
        dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
             num_attention_heads=4, joint_attention_dim=64, guidance_embeds=False, axes_dims_rope=(8, 12, 12)),
        {"text_encoder": _qwen(64, vl=True)}, {"tokenizer": 128},
        dict(base_dim=32, z_dim=16, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
             latents_mean=[0.0] * 16, latents_std=[1.0] * 16),
        "FlowMatchEulerDiscreteScheduler", ("text_encoder",), {**_TINY_CALL, "max_sequence_length": 16},
        vae_class="AutoencoderKLQwenImage", chat=True),
    "zimage-tiny-pipe": PipelineSpec(
        "ZImagePipeline", "transformer",
        dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=192, n_layers=2, n_refiner_layers=1,
             n_heads=6, n_kv_heads=6, norm_eps=1e-5, qk_norm=True, cap_feat_dim=64, rope_theta=256.0,
             t_scale=1000.0, axes_dims=[16, 8, 8], axes_lens=[256, 32, 32]),
        {"text_encoder": _qwen(64)}, {"tokenizer": 16}, _vae(16, shift_factor=0.1159, scaling_factor=0.3611),
        "FlowMatchEulerDiscreteScheduler", ("text_encoder",), {**_TINY_CALL, "max_sequence_length": 16}, chat=True),
    # Lumina 2: Gemma 2, Flux's kind of VAE; its pipeline fixes the latent scale at 8 (128 pixels: 16 latent ones,
    # which this two-level VAE decodes to 32)
    "lumina2-tiny-pipe": PipelineSpec(
        "Lumina2Pipeline", "transformer",
        dict(sample_size=16, patch_size=2, in_channels=16, hidden_size=128, num_layers=2, num_refiner_layers=1,
             num_attention_heads=4, num_kv_heads=2, multiple_of=16, norm_eps=1e-5, axes_dim_rope=(8, 12, 12),
             axes_lens=(300, 64, 64), cap_feat_dim=64),
        {"text_encoder": _gemma(64)}, {"tokenizer": 16}, _vae(16, shift_factor=0.1159, scaling_factor=0.3611),
        "FlowMatchEulerDiscreteScheduler", ("text_encoder",),
        {**_TINY_CALL, "height": 128, "width": 128, "max_sequence_length": 16}),
    # Sana: Gemma 2, its deep-compression autoencoder (AutoencoderDC); the call's size as given, not binned to
    # Sana's aspect-ratio table
    "sana-tiny-pipe": PipelineSpec(
        "SanaPipeline", "transformer",
        dict(in_channels=16, out_channels=16, num_attention_heads=4, attention_head_dim=32, num_layers=2,
             num_cross_attention_heads=4, cross_attention_head_dim=32, cross_attention_dim=128, caption_channels=64,
             mlp_ratio=2.5, sample_size=16, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6),
        {"text_encoder": _gemma(64)}, {"tokenizer": 16},
        dict(in_channels=3, latent_channels=16, attention_head_dim=8, encoder_block_types=("ResBlock",
             "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
             encoder_block_out_channels=(32, 64), decoder_block_out_channels=(32, 64),
             encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), (5,)),
             decoder_qkv_multiscales=((), (5,)), upsample_block_type="interpolate", downsample_block_type="Conv",
             decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407),
        "FlowMatchEulerDiscreteScheduler", ("text_encoder",),
        {**_TINY_CALL, "max_sequence_length": 16, "use_resolution_binning": False}, vae_class="AutoencoderDC"),
    # HunyuanVideo 1.0: Llama (the template above) and CLIP (77 tokens, the pipeline's fixed length), guidance
    # embedded as released; its VAE at three levels (4x in space and time: 5 frames are 2 latent ones)
    "hunyuanvideo-tiny-pipe": PipelineSpec(
        "HunyuanVideoPipeline", "transformer",
        dict(in_channels=16, out_channels=16, num_attention_heads=4, attention_head_dim=32, num_layers=1,
             num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
             text_embed_dim=64, pooled_projection_dim=64, rope_axes_dim=(8, 12, 12)),
        {"text_encoder": _llama(64), "text_encoder_2": _clip(64, heads=2, positions=77)},
        {"tokenizer": 128, "tokenizer_2": 77},
        dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 64), layers_per_block=1,
             down_block_types=("HunyuanVideoDownBlock3D",) * 3, up_block_types=("HunyuanVideoUpBlock3D",) * 3,
             norm_num_groups=32, spatial_compression_ratio=4, temporal_compression_ratio=4),
        "FlowMatchEulerDiscreteScheduler", ("text_encoder",),
        dict(height=32, width=32, num_frames=5, num_inference_steps=2, max_sequence_length=16,
             prompt_template={"template": HUNYUAN_TEMPLATE, "crop_start": HUNYUAN_CROP}),
        vae_class="AutoencoderKLHunyuanVideo"),
}
PIPELINES.update(FAMILIES)

# The same families at their released shapes, for GPU boxes (never drawn here: their parameter counts are checked
# on the meta device against the published sizes). Configurations as the diffusers repositories hold them:
# Wan2.1-T2V-14B (diffusers scripts/convert_wan_to_diffusers.py; UMT5-XXL's encoder; AutoencoderKLWan's defaults),
# Chroma1-HD (Flux's VAE, T5-XXL), Qwen-Image (Qwen2.5-VL-7B-Instruct; AutoencoderKLQwenImage's defaults) and
# Z-Image-Turbo (Qwen3-4B; Flux's VAE; axes_lens as released, not the class default); HunyuanVideo 1.0 (the
# transformer's and AutoencoderKLHunyuanVideo's defaults; llava-llama-3-8b's language model, CLIP-L; the prompt
# template cropped for the tokenizer made here, as the tiny pipeline's).
_T5_XXL = _t5(4096, layers=24, heads=64, d_kv=64, d_ff=10240, vocab=32128)
_FLUX_VAE = _vae(16, (128, 256, 512, 512), shift_factor=0.1159, scaling_factor=0.3611) | {"layers_per_block": 2,
                                                                                         "sample_size": 1024}
_VIDEO_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                  temperal_downsample=[False, True, True])
_RELEASED_CALL = dict(height=1024, width=1024, num_inference_steps=4, max_sequence_length=512)
RELEASED: dict[str, PipelineSpec] = {
    "wan-14b-pipe": PipelineSpec(
        "WanPipeline", "transformer",
        dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
             text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", eps=1e-6),
        {"text_encoder": _t5(4096, layers=24, heads=64, d_kv=64, d_ff=10240, vocab=256384, umt5=True)},
        {"tokenizer": 512}, _VIDEO_VAE, "UniPCMultistepScheduler", ("text_encoder",),
        dict(height=480, width=832, num_frames=81, num_inference_steps=4, max_sequence_length=512),
        vae_class="AutoencoderKLWan",
        scheduler_config=dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)),
    "chroma-hd-pipe": PipelineSpec(
        "ChromaPipeline", "transformer",
        dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56),
             approximator_num_channels=64, approximator_hidden_dim=5120, approximator_layers=5),
        {"text_encoder": _T5_XXL}, {"tokenizer": 512}, _FLUX_VAE, "FlowMatchEulerDiscreteScheduler",
        ("text_encoder",), _RELEASED_CALL),
    "qwenimage-pipe": PipelineSpec(
        "QwenImagePipeline", "transformer",
        dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
        {"text_encoder": _qwen(3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064, vl=True,
                               vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                           out_hidden_size=3584))},
        {"tokenizer": 1024}, _VIDEO_VAE, "FlowMatchEulerDiscreteScheduler", ("text_encoder",),
        {**_RELEASED_CALL, "height": 1328, "width": 1328}, vae_class="AutoencoderKLQwenImage", chat=True),
    "zimage-turbo-pipe": PipelineSpec(
        "ZImagePipeline", "transformer",
        dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
             n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
             t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512]),
        {"text_encoder": _qwen(2560, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=9728,
                               vocab=151936, tied=True)},
        {"tokenizer": 512}, _FLUX_VAE, "FlowMatchEulerDiscreteScheduler", ("text_encoder",), _RELEASED_CALL,
        chat=True),
    "hunyuanvideo-13b-pipe": PipelineSpec(
        "HunyuanVideoPipeline", "transformer", {},
        {"text_encoder": _llama(4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128320,
                                         positions=8192),
         "text_encoder_2": _clip(
            768, layers=12, heads=12, vocab=49408, positions=77, intermediate=3072)},
        {"tokenizer": 256 + HUNYUAN_CROP, "tokenizer_2": 77}, {}, "FlowMatchEulerDiscreteScheduler", ("text_encoder",),
        dict(height=720, width=1280, num_frames=129, num_inference_steps=4, max_sequence_length=256,
             prompt_template={"template": HUNYUAN_TEMPLATE, "crop_start": HUNYUAN_CROP}),
        vae_class="AutoencoderKLHunyuanVideo"),
}
PIPELINES.update(RELEASED)

# The `components` axis: which of a model's components a cell quantizes.
COMPONENT_VALUES = ("denoiser", "denoiser+te", "te")


def component_names(model: str) -> dict[str, tuple[str, ...]]:
    """What each `components` value quantizes in a model, as component attributes (a denoiser alone is the
    component "denoiser"; it has no text encoder)."""
    pipe = PIPELINES.get(model)
    if pipe is None:
        return {"denoiser": ("denoiser",)}
    return {"denoiser": (pipe.denoiser,), "denoiser+te": (*pipe.quantized_te, pipe.denoiser),
            "te": pipe.quantized_te}
