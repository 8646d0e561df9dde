"""What each stack offers, as data, decided before anything runs (like OpInfo's `supports_*` flags): which model
kinds it loads, which engines and load modes, whether it casts layerwise, which packages it is made of and which
stack is its control. No torch and no engine is imported here: the matrix expands with it, the report words and
groups with it. Each stack's code is one module (`implementation`) that takes its entry from this table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from harness.engines.catalog import ALL_LOADS, CATALOG, EngineInfo
from harness.models.specs import MODELS


@dataclass(frozen=True)
class StackInfo:
    name: str
    implementation: str  # "module:Class" of its Stack subclass
    phrase: str  # how the wiki patch says it: "through diffusers"
    control: str | None = None  # the stack whose result on the same combination tells which layer broke
    packages: tuple[str, ...] = ()  # what it is made of: a cell of the stack needs them installed
    real_models_only: bool = False  # loads diffusers' model classes only (not the harness's imitations)
    casts: bool = False  # offers layerwise casting (the `cast` axis)
    sdnext: bool = False  # SD.Next's own path (on a whole pipeline): a record on it speaks for SD.Next's users
    # The load modes the stack offers per engine beyond post-load (which is always the engine's own API on the
    # loaded model); None: the engine's own load modes. An engine left out offers post-load only.
    loads: Mapping[str, tuple[str, ...]] | None = None
    why_not: Mapping[str, str] = field(default_factory=dict)  # "engine" or "engine/load" -> why it is not offered
    quantizes_in_load: tuple[str, ...] = ()  # load modes whose quantization happens inside the load call (untimed)
    # Whole pipelines: the load modes the stack offers for them, and the engines whose text-encoder integration
    # (transformers' quantizer configs) it passes in a load that quantizes (on-the-fly).
    pipeline_loads: tuple[str, ...] = ("post-load",)
    text_encoder_engines: tuple[str, ...] = ()
    why_not_pipeline: str = ""

    def accepts(self, model: str, cast: str) -> bool:
        """Whether a matrix naming this stack has the combination at all (a real model class, a casting)."""
        return (MODELS[model].real or not self.real_models_only) and (cast == "-" or self.casts)

    def offers(self, engine: EngineInfo, load: str, model: str | None = None,
               components: str = "denoiser") -> str | None:
        """None when the stack runs this engine in this load mode (for this model and components), else why not
        (the cell is `unavailable`)."""
        spec = MODELS.get(model) if model else None
        reason = self._offers(engine, load)
        if reason is not None or spec is None or not spec.pipeline:
            return reason
        if load not in self.pipeline_loads:
            return f"the {self.name} stack loads whole pipelines {' or '.join(self.pipeline_loads)} only" + \
                (f" ({self.why_not_pipeline})" if self.why_not_pipeline else "")
        if load != "post-load" and components != "denoiser" and engine.name not in self.text_encoder_engines:
            return (f"transformers has no quantizer integration for engine {engine.name} that quantizes a text "
                    f"encoder {LOAD_PHRASES.get(load, load)} (its configs: "
                    f"{', '.join(e for e in self.text_encoder_engines if e != 'none')})")
        return None

    def _offers(self, engine: EngineInfo, load: str) -> str | None:
        if self.loads is None or load == "post-load":  # the engine's own API
            return None if load in engine.loads else f"engine {engine.name} does not offer the {load} load mode"
        if load in self.loads.get(engine.name, ()):
            return None
        return self.why_not.get(f"{engine.name}/{load}") or self.why_not.get(engine.name) or \
            f"the {self.name} stack has no {load} load for engine {engine.name}"


LOAD_PHRASES = {"on-the-fly": "while loading", "prequantized": "from a pre-quantized file"}

STACK_CATALOG: dict[str, StackInfo] = {s.name: s for s in (
    StackInfo("direct", "harness.stacks.direct:DirectStack", "through the engine's own API",
              why_not_pipeline="the engine's API per component on the float pipeline; on-the-fly and pre-quantized "
                               "files are single components on this stack"),
    StackInfo("diffusers", "harness.stacks.diffusers:DiffusersStack", "through diffusers", control="direct",
              packages=("diffusers",), real_models_only=True, casts=True, sdnext=True,
              # diffusers' quantizer integrations (diffusers.quantizers): from_pretrained(quantization_config=...)
              loads={"none": ALL_LOADS, "bnb": ALL_LOADS, "quanto": ALL_LOADS, "sdnq": ALL_LOADS,
                     "torchao": ALL_LOADS, "gguf": ("prequantized",), "modelopt": ("on-the-fly", "prequantized"),
                     "autoround": ("prequantized",), "nunchaku": ("prequantized",)},
              why_not={"gguf/on-the-fly": "diffusers has no way to quantize to GGUF while loading "
                                          "(GGUFQuantizationConfig reads pre-quantized .gguf files); GGUF on the "
                                          "diffusers stack is the prequantized load mode",
                       "autoround/on-the-fly": "diffusers' AutoRoundQuantizer loads pre-quantized checkpoints only "
                                               "(its validate_environment refuses to quantize)",
                       "nunchaku/on-the-fly": "diffusers' nunchaku_lite loads pre-quantized Nunchaku checkpoints only",
                       "nncf": "NNCF has no quantizer integration in diffusers (no NNCF config among diffusers' "
                               "quantization backends); run it on the direct stack"},
              quantizes_in_load=("on-the-fly",),  # from_pretrained(quantization_config=...)
              # PipelineQuantizationConfig(quant_mapping=...) in the pipeline's from_pretrained; its text encoders
              # through transformers' BitsAndBytesConfig, QuantoConfig, TorchAoConfig, and sdnq's SDNQConfig
              # (sdnq registers it in transformers' AUTO_QUANTIZER_MAPPING)
              # a pre-quantized pipeline: the directory the pipeline's save_pretrained writes (its text encoders
              # quantized as on the fly) or the engine's own API writes (AutoRound: the denoiser only)
              pipeline_loads=ALL_LOADS,
              text_encoder_engines=("none", "bnb", "quanto", "sdnq", "torchao")),
)}
STACK_NAMES = tuple(STACK_CATALOG)
STACK_PHRASES = {name: s.phrase for name, s in STACK_CATALOG.items()}


def integration_stack(name: str) -> bool:
    """Whether the stack is an integration with a control beside it (a report draws it as such)."""
    stack = STACK_CATALOG.get(name)
    return stack is not None and stack.control is not None


def packages_needed(cell) -> tuple[str, ...]:
    """The packages besides torch and the engine's that a cell runs on: its stack's, diffusers for a diffusers
    model class or group offload (diffusers' hooks), peft for a LoRA (diffusers' LoRA layers are peft's). Decided
    here only."""
    stack, spec = STACK_CATALOG.get(cell.stack), MODELS.get(cell.model)
    needed = list(stack.packages if stack else ())
    if (spec is not None and spec.real) or cell.offload == "group":
        needed.append("diffusers")
    if spec is not None and spec.pipeline:  # text encoders and tokenizers
        needed += ["transformers", "tokenizers"]
    if getattr(cell, "lora", "-") != "-":
        needed.append("peft")
    return tuple(dict.fromkeys(needed))


def not_offered(cell) -> str | None:
    """Why the cell's stack does not offer its engine in its load mode (for its model and components), or None
    (decided before it runs)."""
    return STACK_CATALOG[cell.stack].offers(CATALOG[cell.engine], cell.load, cell.model, cell.components)
