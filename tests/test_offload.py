"""Offload modes run on the real hooks (accelerate's, diffusers' pipeline methods and group offload, SD.Next's
balanced algorithm) and do not change the output."""

import json

import pytest
import torch
from torch import nn

from harness.models.build import build_model, components, make_inputs, run
from harness.offload import SDNEXT_REVISION, BalancedOffload
from harness.settings import Settings
from harness.stacks.diffusers import offload_pipeline
from harness.stacks.direct import offload_module

MODES = ["none", "model", "sequential", "balanced", "group"]


def assert_offload_installed(mode: str, model: nn.Module, after_step) -> None:
    """The hooks `mode` installs are on `model` (an offload that did nothing gives the same output too): for none
    no hook and the weights on the device; for model accelerate's CpuOffload on the model alone; for sequential an
    AlignDevicesHook on every module holding weights and every weight a placeholder on the meta device; for group
    diffusers' group-offloading hook on every Linear (leaf level, the default); for balanced the BalancedOffload's
    own hook on the model, the one whose next_generation runs after each step."""
    hf = {n: type(m._hf_hook).__name__ for n, m in model.named_modules() if hasattr(m, "_hf_hook")}
    grouped = {n for n, m in model.named_modules()
               if "group_offloading" in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})}
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    holders = {n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    devices = {p.device.type for p in model.parameters()}
    assert linears and holders
    if mode == "none":
        assert hf == {} and grouped == set() and devices == {"cpu"}, (hf, grouped, devices)
    elif mode == "model":
        assert hf == {"": "CpuOffload"} and grouped == set(), (hf, grouped)
    elif mode == "sequential":
        assert {n: hf.get(n) for n in holders} == dict.fromkeys(holders, "AlignDevicesHook"), hf
        assert devices == {"meta"}, devices
    elif mode == "group":
        assert hf == {} and linears <= grouped, (hf, sorted(linears - grouped))
    elif mode == "balanced":
        offload = getattr(after_step, "__self__", None)
        assert isinstance(offload, BalancedOffload) and after_step == offload.next_generation, after_step
        assert hf == {"": "OffloadHook"} and model._hf_hook is offload.hook, hf
    else:
        raise AssertionError(f"no check for offload mode {mode!r}")


@pytest.fixture(scope="module")
def reference():
    out = {}
    for name in ("unet-xs", "flux-tiny"):
        model, inputs = build_model(name), make_inputs(name)
        with torch.no_grad():
            out[name] = inputs, run(model, inputs)
    return out


@pytest.mark.parametrize("mode", MODES)
def test_every_offload_mode_gives_the_same_output_on_the_direct_stack(mode, reference):
    inputs, expected = reference["unet-xs"]
    model = build_model("unet-xs")
    after_step = offload_module(model, mode, "cpu", components=components("unet-xs", model)).after_step
    assert_offload_installed(mode, model, after_step)
    with torch.no_grad():
        out = run(model, inputs)
    if mode == "balanced":  # its hook ran when the forward started
        assert after_step.__self__.last_pre == id(model)
    after_step()
    assert torch.equal(out, expected)
    assert_offload_installed(mode, model, after_step)  # and stay installed for the next step


@pytest.mark.parametrize("mode", [m for m in MODES if m != "sequential"])
def test_diffusers_pipeline_offload_gives_the_same_output(mode, reference):
    inputs, expected = reference["flux-tiny"]
    model = build_model("flux-tiny")
    after_step = offload_pipeline(model, mode, "cpu").after_step
    assert_offload_installed(mode, model, after_step)
    for _ in range(2):
        with torch.no_grad():
            out = run(model, inputs)
        if mode == "balanced":
            assert after_step.__self__.last_pre == id(model)
        after_step()
        assert torch.equal(out, expected)
        assert_offload_installed(mode, model, after_step)


def test_diffusers_stack_offload_runs_the_pipelines_own_methods():
    """The pipeline's own enable_model_cpu_offload and enable_group_offload, on every component (a module's
    offload, the direct stack's, would hook the one module it is given)."""
    pipeline = build_model("flux-tiny-pipe")
    offload_pipeline(pipeline, "model", "cpu")
    assert len(pipeline.pipe._all_hooks) == 4  # both text encoders, the transformer, the VAE: chained by the pipe
    grouped = build_model("flux-tiny-pipe")
    offload_pipeline(grouped, "group", "cpu", settings=Settings(group_type="block_level"))
    for name in ("text_encoder", "text_encoder_2", "transformer"):  # the VAE: left out (group_options)
        hooked = [m._diffusers_hook for m in getattr(grouped.pipe, name).modules() if hasattr(m, "_diffusers_hook")]
        assert any("group" in hook for registry in hooked for hook in registry.hooks), name
    model = build_model("flux-tiny")
    offload_pipeline(model, "model", "cpu")
    assert type(model._hf_hook).__name__ == "CpuOffload"  # enable_model_cpu_offload's hook
    grouped = build_model("flux-tiny")
    offload_pipeline(grouped, "group", "cpu", settings=Settings(group_type="block_level"))
    registry = grouped.transformer_blocks[0]._diffusers_hook  # diffusers' own hook registry
    assert any("group_offloading" in name for name in registry.hooks)


def test_model_offload_uses_accelerates_user_hook():
    model = build_model("dit-xs")
    offload_module(model, "model", "cpu")
    assert type(model._hf_hook).__name__ == "CpuOffload"


def test_sequential_offload_keeps_weights_off_device_between_forwards():
    model = build_model("dit-xs")
    offload_module(model, "sequential", "cpu")
    # accelerate's cpu_offload leaves placeholders on the meta device; the weights live in the hooks' map.
    assert model.blocks[0].attn.to_q.weight.device.type == "meta"
    assert type(model.blocks[0].attn.to_q._hf_hook).__name__ == "AlignDevicesHook"


def test_balanced_offload_follows_sdnext_hooking_each_component_after_removing_others(reference):
    inputs, expected = reference["flux-tiny"]
    model = build_model("flux-tiny")
    from accelerate import cpu_offload_with_hook

    cpu_offload_with_hook(model, torch.device("cpu"))  # a hook left by another mode: SD.Next removes it first
    offload = BalancedOffload([model], "cpu", high=0.6, low=0.2)
    assert model._hf_hook is offload.hook  # appended alone: the earlier hook is gone
    assert offload.max_memory["cpu"] > 0 and 0 in offload.max_memory  # accelerate's budget per device
    with torch.no_grad():
        assert torch.equal(run(model, inputs), expected)
    offload.next_generation()
    with torch.no_grad():
        assert torch.equal(run(model, inputs), expected)
    assert offload.notes == []  # nothing had to be dispatched on the CPU: no fallback
    assert "sd_offload.py" in SDNEXT_REVISION


def test_balanced_offload_hooks_every_component_of_a_pipeline():
    model, inputs = build_model("pipe-xs"), make_inputs("pipe-xs")
    parts = components("pipe-xs", model)
    offload = BalancedOffload(parts, "cpu", high=0.6, low=0.2)
    assert len(parts) > 1 and all(p._hf_hook is offload.hook for p in parts)
    with torch.no_grad():
        run(model, inputs)
    assert offload.last_pre == id(parts[-1])  # the last component to start


@pytest.mark.parametrize("gib, low, high, always, never", [
    (None, 0.2, 0.6, (), ()),  # no GPU (a CPU cell): SD.Next's base defaults
    (4, 0.0, 0.6, (), ()),
    (8, 0.0, 0.6, ("T5EncoderModel", "UMT5EncoderModel"), ()),
    (12, 0.0, 0.6, ("T5EncoderModel", "UMT5EncoderModel"), ()),
    (16, 0.2, 0.6, (), ()),
    (24, 0.2, 0.8, ("T5EncoderModel", "UMT5EncoderModel"), ("CLIPTextModel", "CLIPTextModelWithProjection",
                                                             "AutoencoderKL")),
    (141, 0.2, 0.8, ("T5EncoderModel", "UMT5EncoderModel"), ("CLIPTextModel", "CLIPTextModelWithProjection",
                                                              "AutoencoderKL")),
])
def test_balanced_offload_takes_sdnext_defaults_by_device_memory_class(gib, low, high, always, never):
    from harness.offload import balanced_options

    total = None if gib is None else int(gib * 2**30)
    options = balanced_options(Settings(), total)
    assert (options["low"], options["high"], options["always"], options["never"]) == (low, high, always, never)
    mine = balanced_options(Settings(high_watermark=0.5, low_watermark=0.0, offload_never=("AutoencoderKL",)), total)
    assert (mine["low"], mine["high"], mine["always"], mine["never"]) == (0.0, 0.5, always, ("AutoencoderKL",))


@pytest.mark.parametrize(("low", "high", "expected"), [
    (0.2, 0.6, (0.2, 0.6)),  # valid: as given
    (0.3, 1.5, (0.3, 0.75)),  # a high above 1: 0.75 (OffloadHook.__init__)
    (-0.1, 0.5, (0.2, 0.5)),  # a low below 0: 0.2 (validate)
    (1.2, 0.5, (0.2, 0.5)),  # a low above 1: 0.2
    (0.0, 0.05, (0.0, 0.7)),  # a high below 0.1: 0.7
    (0.6, 0.4, (0.4, 0.4)),  # a low above the high: the high
])
def test_balanced_watermarks_are_corrected_as_sdnext_corrects_them(tmp_path, low, high, expected):
    """SD.Next does not refuse a watermark outside 0 <= low <= high <= 1: it corrects it (modules/sd_offload.py
    OffloadHook.__init__ and validate). A matrix may give what a user's SD.Next settings hold; the cell runs with
    SD.Next's correction, and its options say what was given and what SD.Next made of it."""
    from harness.matrix import parse_matrix
    from harness.offload import balanced_options

    text = ('[matrix]\nname = "w"\n[axes]\nengine = ["none"]\nqtype = ["-"]\nload = ["post-load"]\n'
            'offload = ["balanced"]\ndevice = ["cpu"]\nmodel = ["dit-xs"]\ndtype = ["float32"]\nstack = ["direct"]\n'
            f"[offload.balanced]\nlow_watermark = {low}\nhigh_watermark = {high}\n")
    settings = parse_matrix(text, tmp_path / "w.toml").settings
    options = balanced_options(settings, 24 * 2**30)
    assert (options["low"], options["high"]) == expected
    assert ("SD.Next:" in options["memory_class"]) == (expected != (low, high))
    model = build_model("dit-xs")
    installed = offload_module(model, "balanced", "cpu", settings=settings)
    assert f"low {expected[0]:g} high {expected[1]:g}" in installed.options


def test_balanced_offload_over_a_pipeline_moves_its_components_in_turn_and_keeps_its_output(monkeypatch):
    """Watermarks that force moves (low 0: any memory in use is above it): each component that starts sends every
    other one to the CPU first, then is dispatched itself; SD.Next's torch_gc runs after each; the image is the
    float pipeline's, bit for bit."""
    from harness import devices as harness_devices

    model, inputs = build_model("flux-tiny-pipe", 0, torch.bfloat16), make_inputs("flux-tiny-pipe")
    with torch.no_grad():
        expected = run(model, inputs)
    gc_calls = []
    real_gc = harness_devices.torch_gc
    monkeypatch.setattr(harness_devices, "torch_gc", lambda device: gc_calls.append(device) or real_gc(device))
    offload = BalancedOffload(list(model.parts().values()), "cpu", high=0.6, low=0.0, always=("T5EncoderModel",),
                              never=("AutoencoderKL",))
    assert len(gc_calls) == 4  # after each component it applied
    with torch.no_grad():
        output = run(model, inputs)
    assert torch.equal(output["image"], expected["image"]) and offload.notes == []
    moved = [m.split(" ")[0] for m in offload.moves if "memory in use" in m]
    starts = [m.split(" ")[0] for m in offload.moves if "starts" in m]
    # applied largest first, each to the CPU (low watermark 0: any memory in use is above it), the `always` class
    # whatever the memory, the `never` class not at all ...
    assert moved == ["FluxTransformer2DModel", "CLIPTextModel"], offload.moves
    assert [m.split(" ")[0] for m in offload.moves if m.endswith("(always)")] == ["T5EncoderModel"]
    assert not any(m.startswith("AutoencoderKL") and "->" in m for m in offload.moves), offload.moves
    assert all("low watermark 0" in m for m in offload.moves if "memory in use" in m)
    # ... then each component's hook, as it starts in the pipeline's order, applies the offload to the others
    # (on a CPU-only host they are all on the CPU already: a GPU run shows the moves between devices)
    assert starts == ["CLIPTextModel", "T5EncoderModel", "FluxTransformer2DModel", "AutoencoderKL"], offload.moves


@pytest.mark.parametrize(("listed", "sweeps"), [((), True), (("F1",), False), (("sdxl", "wanai"), True)])
def test_a_model_type_not_to_offload_starts_no_sweep(tmp_path, listed, sweeps):
    """SD.Next's models_not_to_offload (sd_offload.py:235, by the pipeline's model type, modeldata.get_model_type:
    FluxPipeline is "f1", matched case-blind): listed, no component that starts sends the others off the device;
    the record's options say so. Through a matrix file and the direct stack's balanced offload of flux-tiny-pipe."""
    from harness.matrix import parse_matrix
    from harness.offload import sdnext_model_type

    text = ('[matrix]\nname = "k"\n[axes]\nengine = ["none"]\nqtype = ["-"]\nload = ["post-load"]\n'
            'offload = ["balanced"]\ndevice = ["cpu"]\nmodel = ["flux-tiny-pipe"]\ndtype = ["bfloat16"]\n'
            'stack = ["direct"]\n' + ("[offload.balanced]\nmodels_not_to_offload = " + json.dumps(list(listed)) + "\n"
                                        if listed else ""))
    settings = parse_matrix(text, tmp_path / "k.toml").settings
    model, inputs = build_model("flux-tiny-pipe", 0, torch.bfloat16), make_inputs("flux-tiny-pipe")
    assert sdnext_model_type(model) == "f1" and sdnext_model_type(build_model("flux-tiny")) is None
    installed = offload_module(model, "balanced", "cpu", settings=settings)
    with torch.no_grad():
        run(model, inputs)
    assert any("starts" in m for m in installed.moves) == sweeps, installed.moves
    assert ("models_not_to_offload" in installed.options) == (not sweeps), installed.options


def test_balanced_offload_goes_on_where_sdnext_swallows_an_error_and_records_it():
    """A component whose weights are still on the meta device: dispatching it raises "Cannot copy out of meta
    tensor"; SD.Next then moves it with move_model, which falls back to to_empty (uninitialised weights) and goes
    on. The cell goes on too, and the note says what the user got."""
    with torch.device("meta"):
        part = nn.Sequential(nn.Linear(64, 64))
    offload = BalancedOffload([part], "cpu", high=0.6, low=0.2)
    part._hf_hook.pre_forward(part)  # what the forward's hook does first
    assert all(p.device.type == "cpu" for p in part.parameters())
    assert any("dispatch of Sequential failed" in n for n in offload.notes), offload.notes
    assert any("to_empty: its weights are uninitialised" in n for n in offload.notes), offload.notes


def test_between_generations_balanced_offload_applies_nothing_and_a_start_spares_itself(monkeypatch):
    """SD.Next's apply between generations returns at once while its hook is cached (sd_offload.py:544): the next
    generation's first component applies the offload to every other one off the CPU, never to itself; a component
    that says offload_never applies it to none. Where the components lie is a GPU's placement, which no device here
    has: reported (the one stand-in), while the hooks and the rules are the real ones."""
    from harness import offload as offload_module_

    text, denoiser, vae = nn.Linear(64, 64), nn.Conv1d(4, 4, 1), nn.Sequential(nn.Linear(64, 64))
    offload = BalancedOffload([text, denoiser, vae], "cpu", high=0.6, low=0.2)
    on_gpu = {id(denoiser), id(vae)}
    monkeypatch.setattr(offload_module_, "_device_of",
                        lambda m: torch.device("cuda" if id(m) in on_gpu else "cpu"))
    applied = []
    monkeypatch.setattr(offload, "apply_to", lambda m: applied.append(type(m).__name__))
    offload.last_pre = id(vae)  # the last generation ended with the VAE
    offload.next_generation()
    assert applied == [] and offload.moves[-1].startswith("generation ends: apply_balanced_offload skips")
    offload.pre_forward(text)  # the next generation's text encoder starts
    assert applied == ["Conv1d", "Sequential"]  # the others off the CPU; not itself
    offload.pre_forward(text)  # again: the same module and class, nothing to do
    assert applied == ["Conv1d", "Sequential"]
    text.offload_never = True
    offload.last_pre = None
    offload.pre_forward(text)  # SD.Next's offload_allowed: a module that says never offloads none of the others
    assert applied == ["Conv1d", "Sequential"]


def test_layerwise_casting_survives_balanced_offload_rehooking_each_component():
    """SD.Next's apply_balanced_offload_to_module removes a component's hooks (recurse=True), re-hooks it, then
    calls apply_layerwise(module) "since hooks were removed" (sd_offload.py:492-493): that function walks the
    component's own constructor parameters, none of them a component, so it re-applies nothing. The casting holds
    anyway: diffusers' layerwise hooks sit on the leaf layers and accelerate removes only its own. Here, with
    watermarks that force every move: after two generations the transformer's Linear weights are still stored in
    fp8 behind diffusers' hook, and the image is the one the cast pipeline gives without offload."""
    model, inputs = build_model("flux-tiny-pipe", 0, torch.bfloat16), make_inputs("flux-tiny-pipe")
    transformer = model.pipe.transformer
    transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)

    def cast() -> set[str]:  # the Linear layers stored in fp8 behind diffusers' casting hook (norms are skipped)
        return {n for n, m in transformer.named_modules() if isinstance(m, nn.Linear) and m.weight.dtype ==
                torch.float8_e4m3fn and "layerwise_casting" in getattr(m, "_diffusers_hook", None).hooks}

    before = cast()
    with torch.no_grad():
        expected = run(model, inputs)
    offload = BalancedOffload(list(model.parts().values()), "cpu", high=0.6, low=0.0, always=(), never=())
    with torch.no_grad():
        run(model, inputs)
        offload.next_generation()
        output = run(model, inputs)
    assert len(before) > 10 and cast() == before
    assert sum("memory in use" in m for m in offload.moves) >= 2  # it did re-hook and move components
    assert torch.equal(output["image"], expected["image"])
