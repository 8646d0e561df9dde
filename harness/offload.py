"""Offload, what both stacks share: SD.Next's balanced offload (BalancedOffload below: its algorithm, on both
stacks), its options and group offload's (SD.Next's), and what installing a mode leaves (`Installed`). Each
stack installs the other modes its own way, in its module: the direct stack (the control) with accelerate's
functions on the module itself (stacks/direct.py offload_module), the diffusers stack with the pipeline's own
methods, the model a component of a minimal `DiffusionPipeline` (stacks/diffusers.py offload_pipeline).

The harness never works around an engine's incompatibility with an offload mode: whatever is raised is the finding.
`Installed` is a call to make after each generation, notes on what the mode did that is worth recording, and
balanced offload's moves. A pipeline (models.pipelines.PipelineModel) is offloaded component by component.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from harness import devices
from harness.settings import Settings


@dataclass
class Installed:
    """What installing an offload mode leaves: the call to make after each generation (model offload's "free the
    model hooks"; a no-op for the other modes), notes worth recording (errors SD.Next swallows and goes on
    after), and the moves balanced offload made, in turn."""

    after_step: Callable[[], None] = lambda: None
    notes: list[str] = field(default_factory=list)
    moves: list[str] = field(default_factory=list)
    options: str = ""  # the options it ran with (balanced: watermarks and class lists, and where they came from)


def pipeline_parts(model: nn.Module) -> dict[str, nn.Module] | None:
    """A pipeline's module components (models.pipelines.PipelineModel), or None for a model alone."""
    parts = getattr(model, "parts", None)
    return parts() if callable(parts) else None


# SD.Next's model type of a pipeline, from its class name (modules/modeldata.py get_model_type at SDNEXT_REVISION,
# lines 16-140: the first name part that matches, in its order; the families built here, and the ones before them
# in that order that would match first)
SDNEXT_MODEL_TYPES = (("StableDiffusion3", "sd3"), ("StableDiffusionXL", "sdxl"), ("StableDiffusion", "sd"),
                      ("ZetaChroma", "zetachroma"), ("Chroma", "chroma"), ("Flux2", "f2"), ("UltraFlux", "ultraflux"),
                      ("Flux", "f1"), ("ZImage", "zimage"), ("Qwen", "qwen"), ("Wan", "wanai"))


def sdnext_model_type(model: nn.Module) -> str | None:
    """SD.Next's `shared.sd_model_type` for a pipeline (models.pipelines.PipelineModel); None for a model alone
    (the one-component pipeline is the harness's, not a type of SD.Next's)."""
    pipe = getattr(model, "pipe", None)
    name = type(pipe).__name__ if pipe is not None else ""
    return next((kind for part, kind in SDNEXT_MODEL_TYPES if part in name), None)


def balanced(model: nn.Module, device: str, components: list[nn.Module] | None, s: Settings) -> Installed:
    parts = pipeline_parts(model)
    kind = sdnext_model_type(model)
    offload = BalancedOffload(components or (list(parts.values()) if parts else [model]), device,
                              **balanced_options(s, None if device == "cpu" else devices.total_memory(device)),
                              kept=kind is not None and kind in {t.lower() for t in s.models_not_to_offload},
                              model_type=kind)
    return Installed(offload.next_generation, offload.notes, offload.moves, offload.options)


def sdnext_balanced_defaults(total_bytes: int | None) -> dict:
    """SD.Next's balanced offload options for a GPU of this much memory (modules/shared_defaults.py:5-33 at
    SDNEXT_REVISION, without --lowvram/--medvram): rounded GiB <= 4: low watermark 0; <= 12: low 0 and T5/UMT5
    always offloaded; >= 24: high 0.8, T5/UMT5 always, CLIP and the VAE never; otherwise, and without a GPU
    (None: a CPU cell), low 0.2, high 0.6, no lists."""
    t5 = ("T5EncoderModel", "UMT5EncoderModel")
    if not total_bytes:
        return dict(low=0.2, high=0.6, always=(), never=(), memory_class="no GPU")
    gib = round(total_bytes / 2**30)
    if gib <= 4:
        return dict(low=0.0, high=0.6, always=(), never=(), memory_class="<= 4 GB")
    if gib <= 12:
        return dict(low=0.0, high=0.6, always=t5, never=(), memory_class="<= 12 GB")
    if gib >= 24:
        return dict(low=0.2, high=0.8, always=t5, never=("CLIPTextModel", "CLIPTextModelWithProjection",
                                                         "AutoencoderKL"), memory_class=">= 24 GB")
    return dict(low=0.2, high=0.6, always=(), never=(), memory_class="13-23 GB")


def sdnext_watermarks(low: float, high: float) -> tuple[float, float, list[str]]:
    """The watermarks as SD.Next corrects them before balanced offload starts (modules/sd_offload.py at
    SDNEXT_REVISION: OffloadHook.__init__, lines 187-190, a high above 1 becomes 0.75; OffloadHook.validate, lines
    210-220, a low outside 0-1 becomes 0.2, a high below 0.1 or above 1 becomes 0.7, a low above the high becomes
    the high), and what was changed, in SD.Next's words."""
    changed = []
    if high > 1:
        high = 0.75
        changed.append("high above 1 set to 0.75")
    if low < 0 or low > 1:
        low = 0.2
        changed.append("watermark low invalid value, set to 0.2")
    if high < 0.1 or high > 1:
        high = 0.7
        changed.append("watermark high invalid value, set to 0.7")
    if low > high:
        low = high
        changed.append(f"watermark low reset to the high, {high:g}")
    return low, high, changed


def balanced_options(s: Settings, total_bytes: int | None) -> dict:
    """[offload.balanced] over SD.Next's defaults for the device's memory class (None: no GPU), its watermarks
    corrected as SD.Next corrects them (sdnext_watermarks: the correction is in the record's options)."""
    options = sdnext_balanced_defaults(total_bytes)
    if s.high_watermark is not None:
        low, high, changed = sdnext_watermarks(s.low_watermark, s.high_watermark)
        options.update(high=high, low=low, memory_class="[offload.balanced]" + (
            f" (given low {s.low_watermark:g} high {s.high_watermark:g}; SD.Next: {'; '.join(changed)})"
            if changed else ""))
    if s.offload_always is not None:
        options["always"] = s.offload_always
    if s.offload_never is not None:
        options["never"] = s.offload_never
    return options


def group_options(s: Settings, execution: torch.device) -> dict:
    """SD.Next's group offload options (modules/sd_offload.py, apply_group_offload), from [offload.group]."""
    options = {"onload_device": execution, "offload_device": torch.device("cpu"), "offload_type": s.group_type,
               "num_blocks_per_group": s.group_blocks, "non_blocking": False,
               "use_stream": s.group_stream and execution.type != "cpu",  # streams are an accelerator's
               "record_stream": False, "low_cpu_mem_usage": s.group_low_cpu_mem}
    if s.group_type == "block_level":
        options["exclude_modules"] = ["vae"]
    return options


# SD.Next's no_split_module_classes (modules/sd_offload.py): layers accelerate must not split across devices.
NO_SPLIT = ["Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
            "Embedding", "SDNQLinear", "SDNQConv1d", "SDNQConv2d", "SDNQConv3d", "SDNQConvTranspose1d",
            "SDNQConvTranspose2d", "SDNQConvTranspose3d", "SDNQEmbedding", "WanTransformerBlock"]
SDNEXT_REVISION = "vladmandic/sdnext@d11a619a643e6dbce0e0bf3cd0a56cfdf0588140 (2026-07-24), modules/sd_offload.py"
CPU_WATERMARK = 0.9  # diffusers_offload_max_cpu_memory's default


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _same_device(a: torch.device, b: torch.device) -> bool:
    """SD.Next's devices.same_device: cuda and cuda:0 are one device."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def module_size(module: nn.Module) -> int:
    """Bytes of a component's parameters and buffers as SD.Next's get_module_size counts them (each tensor once, its
    elements times their size): the order in which balanced offload places components, largest first."""
    tensors = set(itertools.chain(module.parameters(recurse=True), module.buffers(recurse=True)))
    return sum(t.numel() * t.element_size() for t in tensors)


def _never_offloads(module: nn.Module) -> bool:
    """SD.Next's OffloadHook.offload_allowed for the module itself (its model-type list: BalancedOffload.kept)."""
    return hasattr(module, "offload_never") or any(hasattr(n, "offload_never") for n in getattr(module, "nets", ()))


class BalancedOffload:
    """SD.Next's balanced offload, as `modules/sd_offload.py` has it (SDNEXT_REVISION), for the components given
    (a pipeline's components; a denoiser alone is one), with its default options (offload during pre-forward on,
    streams off) and its watermarks and always/never lists (class names) by the device's memory class
    (sdnext_balanced_defaults; [offload.balanced] overrides them):

    - apply (`apply_balanced_offload`): components largest first; each has every accelerate hook removed, goes to
      the CPU when its class is in `always`, or, unless in `never`, when device memory in use (total - free, as
      SD.Next's torch_gc reads mem_get_info) is above the low watermark; gets the offload hook (appended), whose
      execution device is the accelerator; then `torch_gc` (SD.Next's fast one: no Python gc, the accelerator's
      cache emptied);
    - the hook's pre-forward, when a new component starts: every other component not on the CPU and not in
      `never` is applied again; then, when the component is not on the execution device, accelerate's
      `infer_auto_device_map` under the high watermark (of the device's memory; 90 % of RAM for the CPU) and
      `dispatch_model(..., force_hooks=True)` place it.

    Errors SD.Next swallows, the cell swallows too and records in `notes` (what the user then gets is judged by
    the output): a hook that cannot be removed or added, a move to the CPU that raises, and a dispatch that raises
    (SD.Next then moves the whole component with `move_model`, which, on "Cannot copy out of meta tensor", moves
    module by module and falls back to `to_empty`: weights left uninitialised). Every move is recorded in
    `moves`, in turn: "T5EncoderModel cpu -> cpu (always)" (on a CPU-only host a move to the CPU is SD.Next's
    decision with nothing to move).

    Between steps (`next_generation`) nothing, as in SD.Next (its apply is skipped while the hook is cached): the
    next generation's text encoder starts, and its pre-forward applies the offload to every other component not
    on the CPU, so each timed step pays SD.Next's onload. Not modelled: `evict_aux` (SD.Next's auxiliary models,
    which a cell has none of).

    `kept`: the pipeline's model type is in SD.Next's `models_not_to_offload` (offload_allowed, sd_offload.py:235):
    no component sweeps the others off the device when it starts (the move to the device still happens).
    """

    MAX_MOVES = 64  # recorded per cell (each generation repeats them)

    def __init__(self, components: list[nn.Module], device: str, high: float, low: float,
                 always: tuple[str, ...] = (), never: tuple[str, ...] = (), memory_class: str = "",
                 kept: bool = False, model_type: str | None = None):
        import psutil
        from accelerate.hooks import ModelHook

        self.device, self.low, self.high = device, low, high
        self.always, self.never = set(always), set(never)
        self.execution = devices.torch_device(device)
        self.total = devices.total_memory(device)
        index = self.execution.index if self.execution.index is not None else 0
        self.max_memory = {index: int(self.total * high), "cpu": int(psutil.virtual_memory().total * CPU_WATERMARK)}
        self.components = [c for c in components if any(True for _ in c.parameters())]
        self.offload_dir = tempfile.mkdtemp(prefix="quantmatrix-offload-")
        self.notes: list[str] = []
        self.moves: list[str] = []
        self.kept = kept
        self.options = (f"balanced: {memory_class} watermarks low {low:g} high {high:g}, always "
                        f"{sorted(self.always) or '-'}, never {sorted(self.never) or '-'}"
                        + (f"; model type {model_type} in models_not_to_offload: no sweep" if kept else ""))
        self.last_pre: int | None = None
        self.last_cls: str | None = None
        owner = self

        class OffloadHook(ModelHook):
            def pre_forward(self, module, *args, **kwargs):
                owner.pre_forward(module)
                return args, kwargs

        self.hook = OffloadHook()
        for module in sorted(self.components, key=module_size, reverse=True):
            self.apply_to(module)

    def _move(self, module: nn.Module, device: torch.device, why: str) -> None:
        if len(self.moves) < self.MAX_MOVES:
            self.moves.append(f"{type(module).__name__} {_device_of(module)} -> {device} ({why})")

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def next_generation(self) -> None:
        """Between generations SD.Next's processing calls apply_balanced_offload (processing_args.py:205,
        processing_diffusers.py:98 and 470), which returns at once while its hook is cached and offload during
        pre-forward is on (sd_offload.py:544, "op=apply skip"): nothing is re-applied, and the hook keeps the last
        module that started, so the next generation's first component applies the offload to every other one, not
        to itself."""
        if len(self.moves) < self.MAX_MOVES:
            self.moves.append("generation ends: apply_balanced_offload skips (hook cached, offload during pre-forward)")

    def apply_to(self, module: nn.Module) -> None:
        """apply_balanced_offload_to_module: hooks off, to the CPU by the move rule, offload hook on, torch_gc.
        SD.Next then re-applies layerwise casting (sd_offload.py:492-493, apply_layerwise(module)), which walks the
        component's own constructor parameters, none of them a component: nothing is re-applied, and nothing needs
        to be (diffusers' casting hooks are on the leaf layers; accelerate removes only its own: tested)."""
        from accelerate.hooks import add_hook_to_module, remove_hook_from_module

        name = type(module).__name__
        device_map = getattr(module, "balanced_offload_device_map", None)
        max_memory = getattr(module, "balanced_offload_max_memory", None)
        try:
            remove_hook_from_module(module, recurse=True)
        except Exception as exc:  # SD.Next: log.warning('Offload remove hook ...') and go on
            self._note(f"balanced: removing the hooks of {name} raised {type(exc).__name__}: {str(exc)[:200]}; "
                       "SD.Next warns and goes on")
        try:
            used = devices.memory_in_use(self.device) / self.total
            # SD.Next's move_module_to_cpu: never, then always, then the low watermark
            why = None if name in self.never else "always" if name in self.always else \
                f"memory in use {used:.2f} > low watermark {self.low:g}" if used > self.low else None
            if why is not None:
                self._move(module, torch.device("cpu"), why)
                module.to("cpu")
        except Exception as exc:  # SD.Next: gc on OOM, silence on bitsandbytes, log.error otherwise; goes on
            if "bitsandbytes" not in str(exc):
                self._note(f"balanced: moving {name} to the CPU raised {type(exc).__name__}: {str(exc)[:200]}; "
                           "SD.Next logs it and goes on")
        try:
            add_hook_to_module(module, self.hook, append=True)
        except Exception as exc:
            self._note(f"balanced: adding the offload hook to {name} raised {type(exc).__name__}: "
                       f"{str(exc)[:200]}; SD.Next warns and goes on")
        module._hf_hook.execution_device = self.execution
        if device_map and max_memory:
            module.balanced_offload_device_map, module.balanced_offload_max_memory = device_map, max_memory
        devices.torch_gc(self.device)

    def pre_forward(self, module: nn.Module) -> None:
        import accelerate
        from accelerate.hooks import add_hook_to_module, remove_hook_from_module

        # a new module, or a class other than the last one that offloaded (sd_offload.py:242), unless the module
        # says never (offload_allowed: an `offload_never` attribute) or the model type is not to offload (`kept`)
        started = self.last_pre != id(module) or type(module).__name__ != self.last_cls
        if started and not _never_offloads(module) and not self.kept:
            self.last_cls = type(module).__name__
            others = [o for o in self.components if o is not module and type(o).__name__ not in self.never]
            away = [o for o in others if _device_of(o).type != "cpu"]
            if len(self.moves) < self.MAX_MOVES:
                self.moves.append(f"{type(module).__name__} starts: {len(away)} other component(s) off the CPU "
                                  "to apply the offload to")
            for other in away:
                self.apply_to(other)
        if not _same_device(_device_of(module), self.execution):
            device_map = getattr(module, "balanced_offload_device_map", None)
            if device_map is None or self.max_memory != getattr(module, "balanced_offload_max_memory", None):
                device_map = accelerate.infer_auto_device_map(module, max_memory=self.max_memory,
                                                              no_split_module_classes=NO_SPLIT, clean_result=False)
            self._move(module, self.execution, "pre-forward dispatch")
            try:
                module = accelerate.dispatch_model(module, main_device=self.execution, device_map=device_map,
                                                   offload_dir=self.offload_dir,
                                                   skip_keys=getattr(module, "_skip_keys", None), force_hooks=True)
            except Exception as exc:  # SD.Next: warn, then move the whole component (sd_models.move_model)
                self._note(f"balanced: dispatch of {type(module).__name__} failed ({type(exc).__name__}: "
                           f"{str(exc)[:300]}); moved whole to {self.execution} as SD.Next does")
                remove_hook_from_module(module, recurse=True)
                module.balanced_offload_device_map = None
                self.move_model(module)
                add_hook_to_module(module, self.hook, append=True)
            module._hf_hook.execution_device = self.execution
            module.balanced_offload_device_map = device_map
            module.balanced_offload_max_memory = self.max_memory
        self.last_pre = id(module)

    def move_model(self, module: nn.Module) -> None:
        """SD.Next's sd_models.move_model(module, device, force=True) (modules/sd_models.py:269-302): on a meta
        tensor, module by module, falling back to `to_empty` (uninitialised weights); some errors ignored; any
        other error logged as a warning."""
        try:
            try:
                module.to(self.execution)
            except Exception as exc:
                text = str(exc)
                if "Cannot copy out of meta tensor" in text or "must be Tensor, not NoneType" in text:
                    for sub in module.modules():
                        try:
                            sub.to(self.execution)
                        except Exception as inner:
                            if "Cannot copy out of meta tensor" in str(inner):
                                sub.to_empty(device=self.execution)
                                self._note(f"balanced: {type(sub).__name__} of {type(module).__name__} held meta "
                                           "tensors; SD.Next's move_model used to_empty: its weights are "
                                           "uninitialised")
                elif not any(k in text for k in ("enable_sequential_cpu_offload", "Params4bit", "Params8bit",
                                                 "already been set to the correct devices",
                                                 "Casting a quantized model to")):
                    raise
                else:
                    self._note(f"balanced: moving {type(module).__name__} raised {type(exc).__name__}: "
                               f"{text[:200]}; SD.Next's move_model ignores it")
        except Exception as exc:
            self._note(f"balanced: move_model of {type(module).__name__} raised {type(exc).__name__}: "
                       f"{str(exc)[:200]}; SD.Next logs a warning and goes on")
        devices.torch_gc(self.device)
