"""Whole diffusers pipelines (FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline) built in code:
transformers' text encoders and diffusers' denoiser and VAE from the configs of `specs.PIPELINES`, seeded weights,
word-level tokenizers made with the `tokenizers` library. Nothing comes from a hub.

A cell sees a pipeline as one `PipelineModel` module: its components are its children (so stored bytes cover
the whole pipeline), calling it runs the pipeline's own `__call__` with a fixed prompt and generator, and returns
the final latents and the decoded image. It times the call's phases (text encoding, denoising, VAE decode) as
it goes.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable

import torch
from torch import nn

from harness.models.real import seed_weights, to_dtype
from harness.models.specs import MODELS, PIPELINES, REAL_CLASSES, component_names

PROMPT = "a photo of an astronaut riding a horse on the moon"
_WORDS = PROMPT.split()
SPECIAL = ("<s>", "<pad>", "</s>", "<unk>")  # CLIP's bos/pad/eos ids 0/1/2 (T5 pads with 0 and ends with 1)


# A Qwen pipeline's prompt as a chat (Z-Image applies the tokenizer's template; Qwen-Image writes its own)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tokenizer(max_length: int, vocab: int = 1000, chat: bool = False):
    """A word-level tokenizer (whitespace split, unknown words to <unk>), padded to `max_length`; `chat`: words and
    punctuation apart (a Qwen prompt template is dozens of tokens, as with Qwen's own tokenizer) and a chat
    template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {w: i for i, w in enumerate(SPECIAL)}
    for w in _WORDS:
        words.setdefault(w, len(words))
    words.update({f"w{i}": i for i in range(len(words), vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]) \
        if chat else pre_tokenizers.WhitespaceSplit()
    made = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    if chat:
        made.chat_template = CHAT_TEMPLATE
    return made


def _components(name: str, empty: bool) -> dict:
    import diffusers
    import transformers

    spec = PIPELINES[name]
    parts: dict = {}
    # Empty: every tensor on the meta device (accelerate's init_empty_weights would untie T5's shared embedding)
    with torch.device("meta") if empty else contextlib.nullcontext():
        for attr, (cls, config) in spec.text_encoders.items():
            config_cls = getattr(transformers, cls.replace("ModelWithProjection", "Config").replace(
                "ForConditionalGeneration", "Config").replace("EncoderModel", "Config").replace("Model", "Config"))
            parts[attr] = getattr(transformers, cls)(config_cls(**config))
        parts[spec.denoiser] = getattr(diffusers, REAL_CLASSES[MODELS[name].kind])(**spec.denoiser_config)
        parts["vae"] = getattr(diffusers, spec.vae_class)(**spec.vae)
    for attr, length in spec.tokenizers.items():
        parts[attr] = tokenizer(length, spec.vocab, spec.chat)
    parts["scheduler"] = getattr(diffusers, spec.scheduler)(**spec.scheduler_config)
    return parts


def pipeline_class(name: str) -> type:
    import diffusers

    return getattr(diffusers, PIPELINES[name].pipeline)


def assemble(name: str, parts: dict):
    cls = pipeline_class(name)
    accepted = inspect.signature(cls.__init__).parameters
    optional = {k: None for k in ("image_encoder", "feature_extractor") if k in accepted}
    return cls(**parts, **optional)


def build_pipeline(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The float pipeline on the CPU, bit-identical for a seed: each module component seeded on its own."""
    parts = _components(name, empty=False)
    for i, (attr, part) in enumerate(sorted(parts.items())):
        if isinstance(part, nn.Module):
            parts[attr] = to_dtype(seed_weights(part, seed * 1000 + i), dtype).eval()
    return assemble(name, parts)


def build_skeleton_pipeline(name: str, dtype: torch.dtype = torch.float32):
    """The pipeline with its components' parameters on the meta device (a real configuration's size, for free)."""
    parts = _components(name, empty=True)
    for attr, part in parts.items():
        if isinstance(part, nn.Module):
            parts[attr] = to_dtype(part, dtype).eval()
    return assemble(name, parts)


def make_inputs(name: str, seed: int = 0, batch: int = 1, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> dict:
    """The generation a cell runs: a fixed prompt, the spec's size and steps, a seed for its generator."""
    return {"prompt": [PROMPT] * batch, "seed": seed, **PIPELINES[name].call}


def module_components(pipe) -> dict[str, nn.Module]:
    """The pipeline's components that are modules (what offload moves), in its offload order."""
    order = [c for c in pipe.model_cpu_offload_seq.split("->")]
    found = {k: v for k, v in pipe.components.items() if isinstance(v, nn.Module)}
    return {k: found[k] for k in sorted(found, key=lambda k: order.index(k) if k in order else len(order))}


class PipelineModel(nn.Module):
    """A pipeline as the harness's cell sees a model: components as children, a call that generates."""

    def __init__(self, pipe, name: str):
        super().__init__()
        self.pipe, self.name = pipe, name
        self.spec = PIPELINES[name]
        pipe.set_progress_bar_config(disable=True)
        for attr, module in module_components(pipe).items():
            self.add_module(attr, module)
        self.phase_mark: Callable[[str | None], None] = lambda phase: None
        self.phases: dict[str, float] = {}

    def save_pretrained(self, path: str) -> None:
        self.pipe.save_pretrained(path)

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipe, self.spec.denoiser)

    def parts(self) -> dict[str, nn.Module]:
        return module_components(self.pipe)

    def forward(self, prompt, seed: int, **call) -> dict[str, torch.Tensor]:
        """One generation: the pipeline's own call; the last step's latents and the decoded image ([0, 1]), or a
        video's frames."""
        latents: dict[str, torch.Tensor] = {}
        steps = call["num_inference_steps"]

        def on_step_end(pipe, i, t, kwargs):
            if i == steps - 1:
                latents["latents"] = kwargs["latents"].detach().clone()
            return kwargs

        started: dict[str, float] = {}

        def mark(phase: str | None) -> None:
            now = time.perf_counter()
            if started:
                (last, t0), = started.items()
                self.phases[last] = (now - t0) * 1e3
                started.clear()
            self.phase_mark(phase)
            if phase is not None:
                started[phase] = time.perf_counter()

        def pre_denoise(module, args, kwargs):
            if "encode" in started:
                mark("denoise")

        vae = self.pipe.vae
        decode = vae.decode

        def timed_decode(*args, **kwargs):
            mark("decode")
            return decode(*args, **kwargs)

        self.phases = {}
        handle = self.denoiser.register_forward_pre_hook(pre_denoise, with_kwargs=True)
        vae.decode = timed_decode
        try:
            generator = torch.Generator("cpu").manual_seed(seed)
            mark("encode")
            made = self.pipe(prompt=prompt, generator=generator, output_type="pt", callback_on_step_end=on_step_end,
                             callback_on_step_end_tensor_inputs=["latents"], **call)
            # a video pipeline's output has frames (B x F x C x H x W), an image pipeline's images
            image = made.frames if hasattr(made, "frames") else made.images
            mark(None)
        finally:
            handle.remove()
            del vae.decode
        return {"latents": latents["latents"], "image": image}


def quantize_components(pipe, name: str, components: str, quantize: Callable[[str, nn.Module], nn.Module]) -> None:
    """Replace each component the `components` value names by `quantize(attr, module)`."""
    for attr in component_names(name)[components]:
        setattr(pipe, attr, quantize(attr, getattr(pipe, attr)))


def capture_inputs(pipe, name: str, seed: int = 0) -> dict[str, dict]:
    """Each module component's keyword arguments in a real call of the pipeline (its first forward), for engines
    that trace a component with an example input (NNCF)."""
    captured: dict[str, dict] = {}
    handles = []
    for attr, module in module_components(pipe).items():
        def hook(module, args, kwargs, attr=attr):
            if attr not in captured:
                names = list(inspect.signature(module.forward).parameters)
                captured[attr] = {**dict(zip(names, args, strict=False)), **kwargs}
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            PipelineModel(pipe, name)(**make_inputs(name, seed))
    finally:
        for h in handles:
            h.remove()
    return captured


def load_pipeline(name: str, path, dtype: torch.dtype, **kwargs) -> PipelineModel:
    """A pipeline directory (what `save_pretrained` wrote) loaded back with the pipeline's `from_pretrained`, from
    safetensors only: a pickled weights file (`*.bin`, `*.pt`) beside them is never read, so never unpickled."""
    return PipelineModel(pipeline_class(name).from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True,
                                                              **kwargs), name)
