"""The diffusers stack: diffusers' quantizer integrations load the real model classes, store what their formats imply,
and what diffusers raises is recorded with the layer that raised it."""

import json
import math

import pytest
import torch
from torch import nn

from harness.cell import Cell
from harness.errors import QuantMatrixError
from harness.models.build import build_skeleton
from harness.run.execute import CellTask, execute_cell, layer_of
from harness.settings import Settings
from harness.stacks import diffusers as diffusers_stack
from harness.stacks import loading

FAST = Settings(warmup=0, min_steps=1, min_time_s=0.0)


def cell(engine, qtype, load="post-load", offload="none", stack="diffusers", model="flux-tiny", cast="-"):
    return Cell(engine, qtype, load, offload, "cpu", model, "float32", stack, cast)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("work")


def run(c: Cell, workdir):
    return execute_cell(CellTask(c, FAST, workdir))


# What each format stores per Linear layer of `o` outputs and `i` inputs: bits per weight, per output row, per group
# of `group` weights (scales, zero points, shifts), and per layer (quanto's activation scales).
FORMATS = {
    ("quanto", "qint8"): dict(weight=8, row=32, layer=64),
    ("quanto", "qint4"): dict(weight=4, group=64, group_size=128, layer=64),
    ("torchao", "int8_weight_only"): dict(weight=8, row=32 + 8),
    ("torchao", "float8_weight_only"): dict(weight=8, row=32),
    ("sdnq", "int8"): dict(weight=8, row=32),
    ("sdnq", "uint4"): dict(weight=4, group=64, group_size=64),
    ("gguf", "Q8_0"): dict(weight=34 * 8 / 32),
    ("gguf", "Q4_0"): dict(weight=18 * 8 / 32),
}


def implied_bits_per_weight(engine: str, qtype: str, quantized: set[str]) -> float:
    """The format's bits per weight over the flux-tiny layers the engine quantized (the layers it leaves in float,
    as SDNQ keeps small and embedding layers, are not counted)."""
    f = FORMATS[engine, qtype]
    bits = weights = 0
    for name, layer in build_skeleton("flux-tiny").named_modules():
        if not isinstance(layer, nn.Linear) or name not in quantized:
            continue
        o, i = layer.out_features, layer.in_features
        weights += o * i
        bits += f["weight"] * o * i + f.get("row", 0) * o + f.get("layer", 0)
        if "group" in f:
            bits += f["group"] * o * math.ceil(i / f["group_size"])
    return bits / weights


def quantized_layers(engine: str, qtype: str, load: str, workdir) -> set[str]:
    """The Linear layers the engine quantized when diffusers loaded the model this way."""
    src = loading.float_dir(workdir, "flux-tiny", 0)
    from harness.engines.registry import ENGINES

    if load == "on-the-fly":
        model = diffusers_stack.load_on_the_fly(ENGINES[engine], qtype, "flux-tiny", src, torch.float32).model
    else:
        path = diffusers_stack.prequantized(workdir, ENGINES[engine], qtype, "flux-tiny", torch.float32, 0)
        model = diffusers_stack.load_prequantized(ENGINES[engine], qtype, "flux-tiny", path, src, torch.float32).model
    return {n for n, m in model.named_modules() if "Linear" in type(m).__name__ and not is_float_linear(m)}


def _block_linears() -> set[str]:
    from harness.models import real

    return {n for n, m in real.build_skeleton("flux-tiny").named_modules()
            if isinstance(m, nn.Linear) and n.startswith(("transformer_blocks.", "single_transformer_blocks."))
            and ".norm" not in n}  # adaLN's modulation: SDNQ keeps it float (SD.Next's defaults)


BLOCK_LINEARS = _block_linears()  # flux-tiny's attention and MLP Linears, from its skeleton (not a loader)


def is_float_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear and type(m.weight.data) is torch.Tensor and m.weight.dtype == torch.float32


# diffusers reads GGUF only from a .gguf file: the prequantized load
@pytest.mark.parametrize("engine,qtype,load", [(e, q, load) for e, q in sorted(FORMATS)
                                              for load in ("on-the-fly", "prequantized")
                                              if not (e == "gguf" and load == "on-the-fly")])
def test_each_backend_stores_the_bits_per_weight_its_format_implies(engine, qtype, load, workdir):
    outcome = run(cell(engine, qtype, load), workdir)
    assert outcome.status == "ran", outcome.error
    quantized = quantized_layers(engine, qtype, load, workdir)
    # every attention and MLP Linear of the transformer's blocks is quantized (the integrations keep embeddings,
    # norms and the output projection in float): a too broad modules_to_not_convert leaves some out
    assert BLOCK_LINEARS <= quantized, sorted(BLOCK_LINEARS - quantized)
    implied = implied_bits_per_weight(engine, qtype, quantized)
    assert outcome.metrics["bits_per_weight"] == pytest.approx(implied, rel=0.01)
    assert outcome.metrics["quantized_layers"] == {"Linear": len(quantized)}
    assert outcome.metrics["output_sha256"]


def test_quanto_through_diffusers_records_diffusers_deprecation(workdir):
    outcome = run(cell("quanto", "qint8", "on-the-fly"), workdir)
    assert outcome.status == "ran"
    assert any(w.startswith("FutureWarning: `QuantoConfig` is deprecated") for w in outcome.warnings), outcome.warnings


@pytest.mark.skipif(torch.cuda.is_available(), reason="diffusers' bitsandbytes quantizer refuses only a GPU-less host")
def test_an_error_raised_inside_diffusers_is_recorded_with_its_origin(workdir):
    outcome = run(cell("bnb", "nf4", "on-the-fly"), workdir)
    assert outcome.status == "error"
    assert outcome.error.type == "RuntimeError" and "No GPU found" in outcome.error.message
    assert outcome.error.layer == "diffusers.quantizers.bitsandbytes"
    assert outcome.error.origin.startswith("diffusers.quantizers.bitsandbytes.")
    # the same engine on its own API, on the same model: the integration, not bitsandbytes, refused
    control = run(cell("bnb", "nf4", "on-the-fly", stack="direct"), workdir)
    assert control.status == "ran"


def test_the_layer_is_the_innermost_frame_of_a_stack_package():
    assert layer_of(["harness.run.execute", "accelerate.hooks", "torch.nn.modules.module", "torch.nn.functional"]) \
        == "accelerate.hooks"
    assert layer_of(["harness.run.execute", "diffusers.quantizers.gguf.utils"]) == "diffusers.quantizers.gguf"
    assert layer_of(["harness.run.execute", "optimum.quanto.tensor.weights.qbytes"]) == "optimum.quanto"
    assert layer_of(["harness.run.execute", "harness.engines.gguf_engine", "torch.functional"]) \
        == "harness.engines.gguf_engine"
    assert layer_of(["torch.nn.functional"]) == "torch"


def test_nncf_has_no_diffusers_integration_and_says_so(workdir):
    outcome = run(cell("nncf", "int8_sym", "on-the-fly"), workdir)
    assert outcome.status == "unavailable" and outcome.absence == "not-offered"
    assert "NNCF has no quantizer integration in diffusers" in outcome.reason


def test_post_load_on_diffusers_applies_the_engine_to_the_loaded_class(workdir):
    outcome = run(cell("nncf", "int8_sym"), workdir)  # SD.Next's "post" mode: NNCF's own API on the diffusers model
    assert outcome.status == "ran", outcome.error
    assert outcome.metrics["bits_per_weight"] < 9
    assert outcome.metrics["quantized_layers"]["Linear"] >= len(BLOCK_LINEARS)  # every block's, not one of them


@pytest.mark.parametrize("stack", ["direct", "diffusers"])
@pytest.mark.parametrize("offload", ["group", "balanced"])
def test_group_and_sdnext_balanced_offload_keep_the_float_output_bit_identical(offload, stack, workdir,
                                                                                 monkeypatch):
    from harness.stacks import diffusers as diffusers_stack
    from harness.stacks import direct as direct_stack
    from tests.test_offload import assert_offload_installed

    plain = run(cell("none", "-", offload="none", stack=stack), workdir)
    installed = []  # (mode, model, after step) of each offload the stack applied: the hooks are checked below
    offloads, function = (direct_stack, "offload_module") if stack == "direct" else (diffusers_stack,
                                                                                      "offload_pipeline")
    real = getattr(offloads, function)

    def recording(model, mode, device, **kwargs):
        result = real(model, mode, device, **kwargs)
        installed.append((mode, model, result.after_step))
        return result

    monkeypatch.setattr(offloads, function, recording)
    offloaded = run(cell("none", "-", offload=offload, stack=stack), workdir)
    assert offloaded.status == "ran", offloaded.error
    # the stack offloaded the cell through its own module; then the float model without offload it is timed beside
    assert [mode for mode, _, _ in installed] == [offload, "none"]
    assert_offload_installed(*installed[0])  # the mode's hooks were really on the model that ran
    assert offloaded.metrics["max_abs_error"] == 0.0
    assert offloaded.metrics["output_sha256"] == plain.metrics["output_sha256"]


def test_layerwise_casting_stores_linear_weights_in_fp8(workdir):
    cast = run(cell("none", "-", cast="float8_e4m3fn"), workdir)
    plain = run(cell("none", "-"), workdir)
    assert cast.status == "ran", cast.error
    assert cast.metrics["param_bytes"] < 0.5 * plain.metrics["param_bytes"]
    assert 0 < cast.metrics["max_abs_error"]


def test_a_saved_model_directory_is_recognised_from_its_quantization_config(workdir):
    from harness.engines.registry import ENGINES

    path = diffusers_stack.prequantized(workdir, ENGINES["sdnq"], "int8", "flux-tiny", torch.float32, 0)
    assert diffusers_stack.detect_saved(path) == ("sdnq", "int8")
    assert diffusers_stack.detect_saved(loading.float_dir(workdir, "flux-tiny", 0)) == ("none", "-")


def test_a_malformed_quantization_config_names_the_file_and_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "mystery"}}))
    with pytest.raises(QuantMatrixError, match=r"config\.json.*field 'quantization_config'.*'mystery'"):
        diffusers_stack.detect_saved(tmp_path)


def test_a_model_with_shared_weights_is_drawn_once_per_run_and_loaded_by_every_cell(tmp_path, monkeypatch):
    """flux-dev's 11.9 B weights are not drawn per cell: the first cell's preparation writes them, in the cell's
    dtype, into the run's float directory, and every cell (both stacks, the reference) loads that. Shown on
    flux-tiny marked as shared: after the directory exists, drawing weights raises, and the cells still run."""
    import dataclasses

    from harness.models import build
    from harness.models.specs import MODELS
    from harness.stacks import loading

    monkeypatch.setitem(MODELS, "flux-tiny", dataclasses.replace(MODELS["flux-tiny"], shared_weights=True))
    bf16 = Settings(warmup=0, min_steps=1, min_time_s=0.0)
    cells = [Cell(engine, qtype, "post-load", "none", "cpu", "flux-tiny", "bfloat16", stack)
             for engine, qtype, stack in [("none", "-", "direct"), ("quanto", "qint8", "direct"),
                                          ("none", "-", "diffusers"), ("gguf", "Q8_0", "diffusers")]]
    cells[3] = cells[3].replace(load="prequantized")
    drawn = []
    real_build = build.build_model
    monkeypatch.setattr(build, "build_model", lambda *a, **k: (drawn.append(a), real_build(*a, **k))[1])
    monkeypatch.setattr(loading, "build_model", build.build_model)
    directory = loading.float_dir(tmp_path, "flux-tiny", 0, torch.bfloat16)
    assert directory.name == "flux-tiny-seed0-bfloat16" and len(drawn) == 1
    config = json.loads((directory / "config.json").read_text())
    assert config["_class_name"] == "FluxTransformer2DModel"
    stored = {t.dtype for t in loading.float_model(tmp_path, "flux-tiny", 0, torch.bfloat16).parameters()}
    assert stored == {torch.bfloat16}
    outcomes = [execute_cell(CellTask(c, bf16, tmp_path)) for c in cells]
    assert [o.status for o in outcomes] == ["ran"] * 4, [o.error for o in outcomes]
    assert len(drawn) == 1  # drawn once, for the directory; every cell and the reference loaded it
    assert outcomes[0].metrics["max_abs_error"] == 0  # the direct baseline is the reference, bit for bit
    assert outcomes[2].metrics["max_abs_error"] == 0  # and so is the diffusers one: the same weights


def test_cells_of_two_dtypes_in_one_run_never_read_each_others_float_checkpoint(tmp_path):
    """The on-the-fly checkpoint of a model drawn from its seed is float32 whatever dtype the first cell to need it
    has: a bfloat16 cell first, then the float32 baseline still loads the reference's weights bit for bit."""
    from safetensors import safe_open

    quick = Settings(warmup=0, min_steps=1, min_time_s=0.0)
    first, second = (Cell("none", "-", "on-the-fly", "none", "cpu", "dit-xs", dtype) for dtype in ("bfloat16",
                                                                                                  "float32"))
    outcomes = [execute_cell(CellTask(c, quick, tmp_path)) for c in (first, second)]
    assert [o.status for o in outcomes] == ["ran", "ran"], [o.error for o in outcomes]
    assert outcomes[1].metrics["max_abs_error"] == 0
    (checkpoint,) = (tmp_path / "checkpoints").glob("*.safetensors")
    with safe_open(str(checkpoint), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def _config_pairs():
    from harness.engines.registry import ENGINES

    return [(e, q) for e, integration in diffusers_stack.INTEGRATIONS.items() if e != "none"
            and integration.writer == "diffusers" for q in sorted(ENGINES[e].qtypes)]


@pytest.mark.parametrize(("engine", "qtype"), _config_pairs())
def test_a_repro_scripts_config_is_the_one_the_stack_builds(engine, qtype):
    """Each engine's diffusers config is written twice, as the builder the stack calls (INTEGRATIONS) and as the
    text a repro script holds (REPRO["configs"]): the text, run, must give the same config."""
    from harness import repro

    load = "prequantized" if diffusers_stack.INTEGRATIONS[engine].single_file else "on-the-fly"
    c = Cell(engine, qtype, load, "none", "cpu", "flux-tiny", "bfloat16", "diffusers")
    fragment_engine, fragment_stack, _, _ = repro._fragments(c, None)
    text = repro._names(c, None, fragment_engine, fragment_stack)["config"]
    namespace = {"DTYPE": torch.bfloat16}
    exec("import diffusers\nimport torch\n" + fragment_engine.get("imports", ""), namespace)  # noqa: S102
    written = eval(text, namespace)  # noqa: S307 (the harness's own fragment)
    built = diffusers_stack.INTEGRATIONS[engine].config(qtype, torch.bfloat16)
    assert type(written) is type(built)
    assert written.to_dict() == built.to_dict(), text


@pytest.mark.parametrize(("offload", "returned"), [("none", "cuda"), ("model", "cuda"), ("sequential", "cpu"),
                                                   ("balanced", "cpu"), ("group", "cpu")])
def test_sdnq_quantizes_on_the_device_and_returns_where_sdnext_leaves_it(offload, returned, workdir):
    """SD.Next's SDNQ devices by offload mode (model_quant.py get_sdnq_devices, its defaults): quantized on the
    execution device, left there without offload or with model offload, else returned to the CPU. Through
    diffusers (a pipeline's config for a CUDA cell, built here without a GPU) and after loading on the CPU (the
    model's SDNQConfig says where it was placed)."""
    from harness.engines.registry import ENGINES

    config = diffusers_stack.pipeline_quantization_config(ENGINES["sdnq"], "int8", "flux-tiny-pipe", "denoiser+te",
                                                          torch.bfloat16, offload, torch.device("cuda"))
    for attr in ("transformer", "text_encoder_2"):
        placed = config.quant_mapping[attr]
        assert (placed.quantization_device, placed.return_device) == (torch.device("cuda"), torch.device(returned))
    unplaced = diffusers_stack.quantization_config(ENGINES["sdnq"], "int8", torch.bfloat16)  # a file's, no cell's
    assert (unplaced.quantization_device, unplaced.return_device) == (None, None)
    source = loading.float_dir(workdir, "flux-tiny", 0, torch.float32)
    model = diffusers_stack.load_post(ENGINES["sdnq"], "int8", "flux-tiny", source, torch.float32,
                                      torch.device("cpu"), offload).model
    placed = model.quantization_config
    assert placed.return_device == torch.device("cpu") == placed.quantization_device
