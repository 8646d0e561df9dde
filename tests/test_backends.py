"""diffusers' newer backends (TensorRT Model Optimizer, AutoRound, Nunchaku) and the pre-quantized pipeline
directory: each runs where its package and device allow, and says exactly why not where they do not."""

import json

import pytest
import torch

from harness.cell import Cell
from harness.engines import nunchaku_engine
from harness.engines.modelopt_engine import SDNEXT, WEIGHTS
from harness.engines.registry import ENGINES
from harness.errors import QuantMatrixError
from harness.run.execute import CellTask, execute_cell, not_quantized, unavailable
from harness.settings import Settings
from harness.stacks import diffusers as diffusers_stack
from harness.stacks import loading
from harness.verdict import Absence
from tests.test_engines import need

FAST = Settings(warmup=0, min_steps=1, min_time_s=0.0)


def cell(engine, qtype, load="post-load", stack="diffusers", model="flux-tiny", dtype="float32",
         components="denoiser"):
    return Cell(engine, qtype, load, "none", "cpu", model, dtype, stack, components=components)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("work")


def test_nunchaku_off_cuda_is_not_offered_on_that_device_before_anything_is_made():
    outcome = unavailable(cell("nunchaku", "svdq-int4", "prequantized", model="flux-tiny-pipe", dtype="bfloat16"))
    assert outcome is not None and outcome.absence is Absence.NOT_OFFERED
    assert outcome.reason.startswith("diffusers' nunchaku_lite loads Nunchaku checkpoints on a CUDA GPU only")
    assert outcome.reason.endswith("not on cpu")
    # a load mode it lacks is said first, as for any engine
    assert "does not offer the post-load" in unavailable(cell("nunchaku", "svdq-int4")).reason


@pytest.mark.parametrize("capability, qtype, refused", [
    ("9.0", "svdq-int4", "refuses Hopper GPUs"), ("8.6", "svdq-nvfp4", "needs compute capability 10.0"),
    ("7.0", "svdq-int4", "needs compute capability 7.5"), ("8.6", "svdq-int4", None), ("10.0", "svdq-nvfp4", None)])
def test_nunchaku_on_cuda_follows_diffusers_capability_checks(capability, qtype, refused, monkeypatch):
    """The capability is read through nvidia-smi (CUDA stays uninitialized); here it is given."""
    from harness import devices

    monkeypatch.setattr(devices, "cuda_capability", lambda: capability)
    reason = ENGINES["nunchaku"].device_reason(qtype, "cuda:0")
    assert (reason is None) if refused is None else (refused in reason and capability in reason)


def test_pypis_unrelated_nunchaku_is_not_taken_for_mit_han_labs(tmp_path, monkeypatch):
    """Recognised by its contents (the compiled `_C` extension), not its name, and without importing it."""
    import importlib

    package = tmp_path / "nunchaku"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")  # PyPI's segmentation package
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert nunchaku_engine.real_nunchaku() is None
    (package / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    assert nunchaku_engine.real_nunchaku() == package


def test_the_engines_modelopt_config_is_the_one_diffusers_builds_from_sdnexts():
    """The direct stack's control (modelopt's own API) quantizes the weights as SD.Next's NVIDIAModelOptConfig
    does: the same weight quantizer for each type."""
    need("modelopt", "int8")
    for qtype, options in SDNEXT.items():
        config = diffusers_stack.quantization_config(ENGINES["modelopt"], qtype, torch.bfloat16)
        assert config.quant_type == options["quant_type"]
        weight = dict(config.modelopt_config["quant_cfg"]["*weight_quantizer"])
        assert weight.pop("fake_quant") is False and weight == WEIGHTS[qtype], qtype


@pytest.mark.parametrize("stack", ["direct", "diffusers"])
def test_modelopt_quantizes_after_load_with_its_own_api(stack, workdir):
    need("modelopt", "int8")
    outcome = execute_cell(CellTask(cell("modelopt", "int8", stack=stack), FAST, workdir))
    assert outcome.status == "ran", outcome.error
    assert outcome.metrics["bits_per_weight"] == pytest.approx(8.0, rel=0.01)
    assert outcome.metrics["sqnr_db"] > 20


def test_a_quantizing_cell_that_stores_float_weights_is_not_quantized():
    bf16 = cell("sdnq", "int8", model="flux-tiny-pipe", dtype="bfloat16")
    assert "16.00 bits per weight, the bfloat16 model's own" in not_quantized(bf16, {"bits_per_weight": 16.0})
    assert not_quantized(bf16, {"bits_per_weight": 8.2}) is None
    assert not_quantized(cell("none", "-"), {"bits_per_weight": 32.0}) is None  # the float model is float
    assert not_quantized(cell("sdnq", "int8"), {"bits_per_weight": 16.0}) is None  # under float32's 32 bits


def test_a_prequantized_pipeline_directory_is_laid_out_as_sdnexts_reference_models(workdir):
    """The transformer and the T5 encoder quantized, each component's config.json naming its quantization_config
    (as Disty0/FLUX.1-dev-SDNQ-uint4-svd-r32 is), loaded back with the pipeline's from_pretrained."""
    need("sdnq", "int8")
    c = cell("sdnq", "int8", "prequantized", model="flux-tiny-pipe", dtype="bfloat16", components="denoiser+te")
    path = loading.shared_file(
        diffusers_stack.prequantized_pipeline_path(workdir, ENGINES["sdnq"], "int8", c.model, c.components,
                                                   torch.bfloat16, 0),
        diffusers_stack.make_prequantized_pipeline(workdir, ENGINES["sdnq"], "int8", c.model, c.components,
                                                   torch.bfloat16, 0))
    assert (path / "model_index.json").is_file()
    for component in ("transformer", "text_encoder_2"):
        config = json.loads((path / component / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "sdnq", component
    assert "quantization_config" not in json.loads((path / "text_encoder" / "config.json").read_text())
    diffusers_stack.check_saved_pipeline(path, ENGINES["sdnq"], "int8", c.model, c.components)  # raises otherwise
    wrong = r"'s config says engine 'sdnq' type 'int8'; expected 'sdnq' type 'uint4'"
    with pytest.raises(QuantMatrixError, match=wrong):
        diffusers_stack.check_saved_pipeline(path, ENGINES["sdnq"], "uint4", c.model, c.components)
    outcome = execute_cell(CellTask(c, FAST, workdir))
    assert outcome.status == "ran", outcome.error
    assert 8 <= outcome.metrics["bits_per_weight"] < 9 and outcome.metrics["psnr_db"] > 20


def test_autoround_has_no_load_of_its_own_in_diffusers_and_says_so(workdir):
    outcome = unavailable(cell("autoround", "W4A16", "on-the-fly"))
    assert outcome.absence is Absence.NOT_OFFERED and "loads pre-quantized checkpoints only" in outcome.reason
    assert "does not offer the post-load" in unavailable(cell("autoround", "W4A16", stack="direct")).reason
    need("autoround", "W4A16")
    bare = execute_cell(CellTask(cell("autoround", "W4A16", "prequantized"), FAST, workdir))  # not a pipeline
    assert bare.absence is Absence.NOT_OFFERED and "quantizes a diffusion model as a whole pipeline" in bare.reason


@pytest.mark.slow
def test_autoround_writes_a_pipeline_directory_with_its_own_api(workdir):
    """auto-round's RTN on the float pipeline, calibrated on a local prompt file (no Hub download): a directory
    whose transformer carries auto-round's quantization_config, recognised as its scheme."""
    need("autoround", "W4A16")
    path = loading.shared_file(
        diffusers_stack.prequantized_pipeline_path(workdir, ENGINES["autoround"], "W4A16", "flux-tiny-pipe",
                                                   "denoiser", torch.bfloat16, 0),
        diffusers_stack.make_prequantized_pipeline(workdir, ENGINES["autoround"], "W4A16", "flux-tiny-pipe",
                                                   "denoiser", torch.bfloat16, 0))
    config = json.loads((path / "transformer" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "auto-round" and config["bits"] == 4 and config["group_size"] == 128
    assert diffusers_stack.detect_saved(path / "transformer") == ("autoround", "W4A16")
