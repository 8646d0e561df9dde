"""Offload modes (SD.Next's: none, model, sequential, balanced, group), on the real hooks, applied the way each
stack applies them.

- `diffusers` stack: the model is a component of a minimal `DiffusionPipeline`, and the pipeline's own methods
  install the hooks: `enable_model_cpu_offload`, `enable_sequential_cpu_offload`, `enable_group_offload` (with
  SD.Next's options), `.to(device)` for none.
- `direct` stack (the control): accelerate's functions on the module itself (`cpu_offload_with_hook`, `cpu_offload`:
  what those pipeline methods call inside), and diffusers' `apply_group_offloading` for group.
- `balanced`, both stacks: SD.Next's algorithm (BalancedOffload below).

The harness never works around an engine's incompatibility with an offload mode: whatever is raised is the finding.
`offload_module` and `offload_pipeline` (the stacks call them) return a callable to run after each step (model
offload's "free the model hooks" at the end of a pipeline call; a no-op for the other modes) and a list of notes on
what the mode did that is worth recording.
"""

from __future__ import annotations

import functools
import itertools
import tempfile
from collections.abc import Callable

import torch
from torch import nn

from harness import devices
from harness.matrix import Settings


def offload_module(model: nn.Module, mode: str, device: str, *, components: list[nn.Module] | None = None,
                   settings: Settings | None = None) -> tuple[Callable[[], None], list[str]]:
    """The direct stack's offload: accelerate's functions on the module itself (diffusers' apply_group_offloading
    for group), SD.Next's balanced offload."""
    s = settings or Settings()
    execution = devices.torch_device(device)
    if mode == "balanced":
        return _balanced(model, device, components, s)
    if mode == "none":
        model.to(execution)
    elif mode == "model":
        return _model_offload(model, execution), []
    elif mode == "sequential":
        _sequential_offload(model, execution)
    elif mode == "group":
        from diffusers.hooks import apply_group_offloading

        options = group_options(s, execution)
        options.pop("exclude_modules", None)  # a pipeline's option (its components), not a module's
        apply_group_offloading(model, **options)
    else:
        raise ValueError(f"unknown offload mode {mode!r}")
    return (lambda: None), []


def offload_pipeline(model: nn.Module, mode: str, device: str, *, components: list[nn.Module] | None = None,
                     settings: Settings | None = None) -> tuple[Callable[[], None], list[str]]:
    """The diffusers stack's offload: the model as a pipeline's component, the pipeline's own methods; SD.Next's
    balanced offload."""
    s = settings or Settings()
    execution = devices.torch_device(device)
    if mode == "balanced":
        return _balanced(model, device, components, s)
    pipe = component_pipeline(model)
    if mode == "none":
        pipe.to(execution)
    elif mode == "model":
        pipe.enable_model_cpu_offload(device=execution)
        return pipe.maybe_free_model_hooks, []
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=execution)
    elif mode == "group":
        pipe.enable_group_offload(**group_options(s, execution))
    else:
        raise ValueError(f"unknown offload mode {mode!r}")
    return (lambda: None), []


def _balanced(model: nn.Module, device: str, components: list[nn.Module] | None,
              s: Settings) -> tuple[Callable[[], None], list[str]]:
    offload = BalancedOffload(components or [model], device, s.high_watermark, s.low_watermark)
    return offload.next_generation, offload.notes


def group_options(s: Settings, execution: torch.device) -> dict:
    """SD.Next's group offload options (modules/sd_offload.py, apply_group_offload), from [offload.group]."""
    options = {"onload_device": execution, "offload_device": torch.device("cpu"), "offload_type": s.group_type,
               "num_blocks_per_group": s.group_blocks, "non_blocking": False,
               "use_stream": s.group_stream and execution.type != "cpu",  # streams are an accelerator's
               "record_stream": False, "low_cpu_mem_usage": s.group_low_cpu_mem}
    if s.group_type == "block_level":
        options["exclude_modules"] = ["vae"]
    return options


@functools.cache
def _pipeline_class() -> type:
    from diffusers import DiffusionPipeline

    class ComponentPipeline(DiffusionPipeline):
        """The smallest pipeline: one denoiser component, so that diffusers' own offload methods run on it."""

        model_cpu_offload_seq = "transformer"

        def __init__(self, transformer: nn.Module):
            super().__init__()
            self.register_modules(transformer=transformer)

    return ComponentPipeline


def component_pipeline(model: nn.Module):
    return _pipeline_class()(model)


def _model_offload(model: nn.Module, execution: torch.device) -> Callable[[], None]:
    """diffusers' enable_model_cpu_offload on the module: the whole model moves to the device for its forward."""
    from accelerate import cpu_offload_with_hook

    model.to("cpu")
    _, hook = cpu_offload_with_hook(model, execution)
    return hook.offload


def _sequential_offload(model: nn.Module, execution: torch.device) -> None:
    """diffusers' enable_sequential_cpu_offload on the module: weights live off-device, each submodule's arrive per
    forward."""
    from accelerate import cpu_offload

    model.to("cpu")
    cpu_offload(model, execution_device=execution, offload_buffers=len(model._parameters) > 0)


# SD.Next's no_split_module_classes (modules/sd_offload.py): layers accelerate must not split across devices.
NO_SPLIT = ["Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
            "Embedding", "SDNQLinear", "SDNQConv1d", "SDNQConv2d", "SDNQConv3d", "SDNQConvTranspose1d",
            "SDNQConvTranspose2d", "SDNQConvTranspose3d", "SDNQEmbedding", "WanTransformerBlock"]
SDNEXT_REVISION = "vladmandic/sdnext@058a7f0cf326f39c0135c6257d7b7e61073e51fd (2026-07-23), modules/sd_offload.py"
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


class BalancedOffload:
    """SD.Next's balanced offload, as `modules/sd_offload.py` has it (SDNEXT_REVISION), for the components given
    (a pipeline's components; a denoiser alone is one), with its default options (offload during pre-forward on,
    streams off, no always/never lists):

    - apply (`apply_balanced_offload`): components largest first; each has every accelerate hook removed, goes to
      the CPU when device memory in use is above the low watermark, and gets the offload hook (appended), whose
      execution device is the accelerator;
    - the hook's pre-forward, when a new component starts: every other component not on the CPU is applied again
      (down to the CPU while memory in use is above the low watermark); then, when the component is not on the
      execution device, accelerate's `infer_auto_device_map` under the high watermark (of the device's memory; 90 %
      of RAM for the CPU) and `dispatch_model(..., force_hooks=True)` place it; when dispatching raises, SD.Next logs
      a warning, removes the hooks, moves the whole component to the device and adds its hook again (recorded here
      in `notes`: the cell still runs, as it does for SD.Next's users).

    Between steps (`next_generation`), what happens when the next generation's text encoder starts: its
    pre-forward applies the offload to every component not on the CPU again (hooks removed and added back, down
    to the CPU above the low watermark), so each timed step pays SD.Next's onload.
    """

    def __init__(self, components: list[nn.Module], device: str, high: float, low: float):
        import psutil
        from accelerate.hooks import ModelHook

        self.device, self.low = device, low
        self.execution = devices.torch_device(device)
        self.total = devices.total_memory(device)
        index = self.execution.index if self.execution.index is not None else 0
        self.max_memory = {index: int(self.total * high), "cpu": int(psutil.virtual_memory().total * CPU_WATERMARK)}
        self.components = [c for c in components if any(True for _ in c.parameters())]
        self.offload_dir = tempfile.mkdtemp(prefix="quantmatrix-offload-")
        self.notes: list[str] = []
        self.last_pre: int | None = None
        owner = self

        class OffloadHook(ModelHook):
            def pre_forward(self, module, *args, **kwargs):
                owner.pre_forward(module)
                return args, kwargs

        self.hook = OffloadHook()
        for module in sorted(self.components, key=module_size, reverse=True):
            self.apply_to(module)

    def next_generation(self) -> None:
        for module in self.components:
            if _device_of(module).type != "cpu":
                self.apply_to(module)
        self.last_pre = None

    def apply_to(self, module: nn.Module) -> None:
        """apply_balanced_offload_to_module: hooks off, down to the CPU above the low watermark, offload hook on."""
        from accelerate.hooks import add_hook_to_module, remove_hook_from_module

        device_map = getattr(module, "balanced_offload_device_map", None)
        max_memory = getattr(module, "balanced_offload_max_memory", None)
        remove_hook_from_module(module, recurse=True)
        if devices.memory_in_use(self.device) > self.low * self.total:
            module.to("cpu")
        add_hook_to_module(module, self.hook, append=True)
        module._hf_hook.execution_device = self.execution
        if device_map and max_memory:
            module.balanced_offload_device_map, module.balanced_offload_max_memory = device_map, max_memory

    def pre_forward(self, module: nn.Module) -> None:
        import accelerate
        from accelerate.hooks import add_hook_to_module, remove_hook_from_module

        if self.last_pre != id(module):
            for other in self.components:
                if other is not module and _device_of(other).type != "cpu":
                    self.apply_to(other)
        if not _same_device(_device_of(module), self.execution):
            device_map = getattr(module, "balanced_offload_device_map", None)
            if device_map is None or self.max_memory != getattr(module, "balanced_offload_max_memory", None):
                device_map = accelerate.infer_auto_device_map(module, max_memory=self.max_memory,
                                                              no_split_module_classes=NO_SPLIT, clean_result=False)
            try:
                module = accelerate.dispatch_model(module, main_device=self.execution, device_map=device_map,
                                                   offload_dir=self.offload_dir,
                                                   skip_keys=getattr(module, "_skip_keys", None), force_hooks=True)
            except Exception as exc:  # SD.Next: warn, then move the whole component
                self.notes.append(f"balanced: dispatch of {type(module).__name__} failed ({type(exc).__name__}: "
                                  f"{str(exc)[:300]}); moved whole to {self.execution} as SD.Next does")
                remove_hook_from_module(module, recurse=True)
                module.balanced_offload_device_map = None
                module.to(self.execution)
                add_hook_to_module(module, self.hook, append=True)
            module._hf_hook.execution_device = self.execution
            module.balanced_offload_device_map = device_map
            module.balanced_offload_max_memory = self.max_memory
        self.last_pre = id(module)
