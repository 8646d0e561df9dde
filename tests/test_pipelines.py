"""Whole pipelines: built offline, run through their own __call__, quantized per component on both stacks, with the
output judged; SD.Next's balanced offload over their components; the `components` axis as bad input."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from harness.cell import Cell
from harness.matrix import parse_matrix
from harness.models.build import build_model, build_skeleton, make_inputs, run
from harness.models.specs import MODELS, PIPELINES, component_names
from harness.run.execute import CellTask, execute_cell
from harness.settings import Settings

TINY = ("flux-tiny-pipe", "sd3-tiny-pipe", "sdxl-tiny-pipe")
FAMILIES = ("wan-tiny-pipe", "chroma-tiny-pipe", "qwenimage-tiny-pipe", "zimage-tiny-pipe", "lumina2-tiny-pipe",
            "sana-tiny-pipe", "hunyuanvideo-tiny-pipe")
FAST = Settings(warmup=0, min_steps=1, max_steps=1, min_time_s=0.0)
# Z-Image in bf16 on this CPU: the first generation of a process differs from every later one with the same seed
# (later ones agree, a second model's too); each cell and its reference run in fresh processes, so they agree
FIRST_CALL_DIFFERS = ("zimage-tiny-pipe",)


@pytest.mark.parametrize("name", TINY + FAMILIES)
def test_a_tiny_pipeline_is_built_offline_and_generates_the_same_image_for_a_seed(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing comes from a hub
    model = build_model(name, 0, torch.bfloat16)
    inputs = make_inputs(name)
    with torch.no_grad():
        first, again = run(model, inputs), run(model, inputs)
        if name in FIRST_CALL_DIFFERS:  # the process's first generation may be its first of Z-Image: not compared
            first, again = again, run(model, inputs)
        other = run(model, {**inputs, "seed": 1})
    assert set(first) == {"latents", "image"} and first["image"].shape[-2:] == (32, 32)
    assert all(torch.isfinite(t).all() for t in first.values())
    assert torch.equal(first["latents"], again["latents"]) and torch.equal(first["image"], again["image"])
    assert not torch.equal(first["latents"], other["latents"])  # the generator's seed is what a cell fixes
    assert set(model.phases) == {"encode", "denoise", "decode"} and all(v > 0 for v in model.phases.values())
    # every Linear of a component a cell may quantize has at least 64 inputs (group sizes 32 and 64 apply)
    quantizable = set(component_names(name)["denoiser+te"])
    narrow = [(attr, n) for attr, part in model.parts().items() if attr in quantizable
              for n, m in part.named_modules() if isinstance(m, nn.Linear) and m.in_features < 64]
    assert narrow == []
    from harness.models.pipelines import PROMPT

    for attr in PIPELINES[name].tokenizers:  # made in code: the prompt's words are in its vocabulary
        tokenizer = getattr(model.pipe, attr)
        ids = tokenizer(PROMPT)["input_ids"]
        assert len(ids) == len(PROMPT.split()) and tokenizer.unk_token_id not in ids, ids


def test_the_real_configurations_have_the_published_sizes():
    """flux-dev-pipe and sdxl-pipe on the meta device (never run here): parameter counts of the released models'
    components (CLIP-L, T5-XXL's encoder, Flux-dev's transformer; SDXL-base's UNet and OpenCLIP bigG)."""
    flux = {a: sum(p.numel() for p in m.parameters()) for a, m in build_skeleton("flux-dev-pipe").parts().items()}
    sdxl = {a: sum(p.numel() for p in m.parameters()) for a, m in build_skeleton("sdxl-pipe").parts().items()}
    assert flux["text_encoder"] == 123_060_480 and flux["text_encoder_2"] == 4_762_310_656
    assert flux["transformer"] == 11_901_408_320
    assert sdxl["unet"] == 2_567_463_684 and sdxl["text_encoder_2"] == 694_659_840
    assert sdxl["vae"] == 83_653_863


# The newer families' releases, in the precision their sizes are published: (component, unit, count in units)
PUBLISHED = {
    "wan-14b-pipe": [("transformer", 1e9, 14),  # Wan 2.1: "1.3B and 14B" (diffusers docs, api/pipelines/wan.md)
                     ("text_encoder", 1e8, 57),  # UMT5-XXL's encoder: 11.4 GB in bf16
                     ("vae", 1e6, 127)],  # Wan-VAE: 127 M (the Wan report)
    "chroma-hd-pipe": [("transformer", 1e8, 89),  # "12B -> 8.9B" (the Chroma model card)
                       ("text_encoder", 1, 4_762_310_656)],  # T5-XXL's encoder, as flux-dev-pipe's
    "qwenimage-pipe": [("transformer", 1e9, 20),  # Qwen-Image: a 20B MMDiT
                       ("text_encoder", 1e7, 829)],  # Qwen2.5-VL-7B-Instruct: 8.29 B
    "zimage-turbo-pipe": [("transformer", 1e7, 615),  # Z-Image: 6B (diffusers docs), 6.15 B
                          ("text_encoder", 1e8, 40)],  # Qwen3-4B: 4.0 B
    "hunyuanvideo-13b-pipe": [("transformer", 1e9, 13),  # HunyuanVideo: 13B (its report, arXiv 2412.03603)
                              ("text_encoder", 1e9, 8),  # llava-llama-3-8b: 8B (7.51 B without its lm head)
                              ("text_encoder_2", 1, 123_060_480)],  # CLIP-L's text model, as flux-dev-pipe's
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_newer_families_released_shapes_have_the_published_sizes(name):
    """Wan 2.1 14B, Chroma1-HD, Qwen-Image, Z-Image-Turbo and HunyuanVideo on the meta device (for GPU boxes;
    never run here): each component's parameters, rounded as its size is published."""
    sizes = {a: sum(p.numel() for p in m.parameters()) for a, m in build_skeleton(name).parts().items()}
    assert {(attr, unit, round(sizes[attr] / unit)) for attr, unit, _ in PUBLISHED[name]} == set(PUBLISHED[name])
    assert MODELS[name].shared_weights and MODELS[name].kind == MODELS[name.split("-")[0] + "-tiny-pipe"].kind


def test_the_text_encoders_quantized_are_those_sdnext_te_option_quantizes():
    classes = {name: {attr: cls for attr, (cls, _) in PIPELINES[name].text_encoders.items()} for name in TINY}
    assert [classes["flux-tiny-pipe"][a] for a in component_names("flux-tiny-pipe")["te"]] == ["T5EncoderModel"]
    assert [classes["sd3-tiny-pipe"][a] for a in component_names("sd3-tiny-pipe")["te"]] == ["T5EncoderModel"]
    assert component_names("sdxl-tiny-pipe")["te"] == ("text_encoder", "text_encoder_2")  # both CLIPs, post-load
    assert component_names("flux-tiny") == {"denoiser": ("denoiser",)}


@pytest.mark.parametrize("stack, load", [("direct", "post-load"), ("diffusers", "on-the-fly")])
def test_denoiser_and_te_quantizes_the_text_encoder_too_and_stores_less(stack, load, tmp_path):
    """SDNQ int8 on flux-tiny-pipe: with the text encoder (diffusers: a PipelineQuantizationConfig with sdnq's
    config for T5 through transformers) the T5 is quantized and the pipeline is smaller; outputs above the floor."""
    outcomes = {}
    for components in ("denoiser", "denoiser+te"):
        cell = Cell("sdnq", "int8", load, "none", "cpu", "flux-tiny-pipe", "bfloat16", stack, components=components)
        outcomes[components] = execute_cell(CellTask(cell, FAST, tmp_path))
        assert outcomes[components].status == "ran", outcomes[components].error
    alone, with_te = (outcomes[c].metrics for c in ("denoiser", "denoiser+te"))
    assert with_te["param_bytes"] < alone["param_bytes"]
    assert alone["components"]["text_encoder_2"]["quantized"] is False
    assert with_te["components"]["text_encoder_2"]["quantized"] is True
    assert with_te["components"]["text_encoder_2"]["bits_per_weight"] < 12 < \
        alone["components"]["text_encoder_2"]["bits_per_weight"]
    assert with_te["components"]["text_encoder"]["bits_per_weight"] == 16  # CLIP stays bf16, as SD.Next leaves it
    assert with_te["param_bytes"] == sum(c["bytes"] for c in with_te["components"].values())
    for m in (alone, with_te):
        assert m["sqnr_db"] > 12 and m["psnr_db"] > 20  # the 8-bit floor
        assert 0.9 < m["ssim"] < 1 and m["lpips_not_measured"]  # the image's structure, near the float model's
        assert set(m["phases"]) == {"encode", "denoise", "decode"}
        assert all(p["latency_ms"] > 0 and p["peak_mem_bytes"] > 0 for p in m["phases"].values())


def test_te_alone_leaves_the_denoiser_in_float_and_a_nan_image_fails_with_its_figures_kept(tmp_path):
    te = execute_cell(CellTask(Cell("sdnq", "int8", "post-load", "none", "cpu", "flux-tiny-pipe", "bfloat16",
                                    components="te"), FAST, tmp_path))
    assert te.status == "ran", te.error
    parts = te.metrics["components"]
    assert parts["transformer"]["bits_per_weight"] == 16 and parts["text_encoder_2"]["bits_per_weight"] < 12
    assert te.metrics["bits_per_weight"] == parts["text_encoder_2"]["bits_per_weight"]  # what the cell quantized
    nan = execute_cell(CellTask(Cell("fault", "nan", "post-load", "none", "cpu", "flux-tiny-pipe", "bfloat16"),
                                FAST, tmp_path))
    assert nan.status == "error" and nan.reason == "output not finite"
    assert nan.error.type == "NonFiniteOutput" and "the latents or the image" in nan.error.message
    assert nan.metrics["output_finite"] is False and set(nan.metrics["phases"]) == {"encode", "denoise", "decode"}


def test_what_a_stack_does_not_offer_a_pipeline_is_declared_unavailable_before_it_runs(tmp_path):
    from dataclasses import replace

    from harness.engines.catalog import CATALOG
    from harness.run.execute import unavailable
    from harness.stacks.catalog import STACK_CATALOG

    gguf = Cell("gguf", "Q8_0", "on-the-fly", "none", "cpu", "flux-tiny-pipe", "bfloat16", "diffusers",
                components="te")
    assert unavailable(gguf).absence == "not-offered" and "GGUF" in unavailable(gguf).reason
    prequantized = Cell("sdnq", "int8", "prequantized", "none", "cpu", "flux-tiny-pipe", "bfloat16", "direct")
    assert unavailable(prequantized).absence == "not-offered"
    assert "loads whole pipelines post-load only" in unavailable(prequantized).reason
    # an engine with a diffusers integration but no transformers one: its text encoders are not offered on the fly
    without = replace(STACK_CATALOG["diffusers"], text_encoder_engines=("none",))
    assert without.offers(CATALOG["sdnq"], "on-the-fly", "flux-tiny-pipe", "denoiser") is None
    assert "transformers has no quantizer integration for engine sdnq" in without.offers(
        CATALOG["sdnq"], "on-the-fly", "flux-tiny-pipe", "denoiser+te")


MATRIX = """
[axes]
engine = ["sdnq"]
qtype = ["int8"]
load = ["post-load"]
offload = ["none"]
device = ["cpu"]
model = ["{model}"]
dtype = ["bfloat16"]
components = ["{components}"]
"""


@pytest.mark.parametrize("model, components, says", [
    ("flux-tiny-pipe", "vae", "unknown components 'vae'; expected one of ['denoiser', 'denoiser+te', 'te']"),
    ("flux-tiny", "te", "model 'flux-tiny' has no component 'te' (its components: denoiser = denoiser)"),
])
def test_a_component_value_the_model_lacks_is_one_line_naming_file_field_and_components(model, components, says):
    with pytest.raises(Exception) as raised:
        parse_matrix(MATRIX.format(model=model, components=components), "m.toml")
    text = str(raised.value)
    assert "\n" not in text and text.startswith("m.toml:") and "[axes.components]" in text and says in text, text
    if components == "vae":  # the pipelines' components are named
        assert "flux-tiny-pipe: denoiser = transformer" in text and "te = text_encoder_2" in text


def test_the_baseline_is_a_cell_of_the_default_components_whichever_are_asked_for():
    text = MATRIX.format(model="flux-tiny-pipe", components="denoiser+te").replace('["sdnq"]', '["none", "sdnq"]')
    ids = [c.id for c in parse_matrix(text, "m.toml").cells]
    assert ids == ["none/post-load/none/cpu/flux-tiny-pipe/bfloat16/direct",
                   "sdnq-int8/post-load/none/cpu/flux-tiny-pipe/bfloat16/direct+denoiser+te"]
    assert Cell.from_id(ids[1]).components == "denoiser+te" and Cell.from_id(ids[1]).baseline.id == ids[0]
    # an [[include]] inherits [axes]' components: a model that lacks them narrows, it is no error
    inherited = parse_matrix(text + '[[include]]\nmodel = "flux-tiny"\nengine = "none"\n', "m.toml")
    assert "none/post-load/none/cpu/flux-tiny/bfloat16/direct" in [c.id for c in inherited.cells]


def test_an_int8_matmul_pipelines_text_encoder_gets_no_quantized_matmul_as_in_sdnext():
    """SD.Next quantizes a text encoder with the model's weight type and no quantized matmul unless set
    (sdnq_quantize_matmul_mode_te defaults to "disabled"): during load (diffusers' per-component configs) and after
    it (the engine's API per component) the T5 gets int8 weights without the denoiser's int8 matmul."""
    from harness.engines.registry import ENGINES
    from harness.stacks.diffusers import pipeline_quantization_config
    from harness.stacks.loading import load_post_pipeline

    engine, cpu = ENGINES["sdnq"], torch.device("cpu")
    mapping = pipeline_quantization_config(engine, "int8-matmul", "flux-tiny-pipe", "denoiser+te",
                                           torch.bfloat16).quant_mapping
    assert mapping["transformer"].use_quantized_matmul is True
    assert mapping["text_encoder_2"].use_quantized_matmul is False and mapping["text_encoder_2"].weights_dtype == "int8"
    pipe = load_post_pipeline(engine, "int8-matmul", "flux-tiny-pipe", "denoiser+te",
                              lambda: build_model("flux-tiny-pipe", 0, torch.bfloat16), torch.bfloat16, cpu).model.pipe

    def matmul(module: nn.Module) -> set[bool]:
        return {m.sdnq_dequantizer.use_quantized_matmul for m in module.modules() if hasattr(m, "sdnq_dequantizer")}

    assert matmul(pipe.transformer) == {True} and matmul(pipe.text_encoder_2) == {False}


@pytest.mark.parametrize("name", ["wan-tiny-pipe", "zimage-tiny-pipe", "lumina2-tiny-pipe", "sana-tiny-pipe",
                                  "hunyuanvideo-tiny-pipe"])
def test_a_pipeline_built_here_is_the_same_pipeline_loaded_from_its_files(name, tmp_path):
    """The float reference a cell is judged against is built, the cell's model loaded by from_pretrained: they must
    agree to the bit, dtypes too (Wan keeps its `_keep_in_fp32_modules` in float32 in a bf16 model; Qwen3's rotary
    inv_freq is made by its constructor, never loaded, and keeps float32)."""
    from harness.models.pipelines import load_pipeline

    build_model(name, 0, torch.float32).save_pretrained(str(tmp_path))
    built, loaded = build_model(name, 0, torch.bfloat16), load_pipeline(name, tmp_path, torch.bfloat16)
    for attr, part in built.parts().items():
        mine, theirs = part.state_dict(), loaded.parts()[attr].state_dict()
        assert mine.keys() == theirs.keys(), attr
        assert all(mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]) for k in mine), attr
        assert {n: b.dtype for n, b in part.named_buffers()} == {
            n: b.dtype for n, b in loaded.parts()[attr].named_buffers()}, attr
    assert {p.dtype for p in built.pipe.transformer.parameters()} >= {torch.bfloat16} and (
        name != "wan-tiny-pipe" or torch.float32 in {p.dtype for p in built.pipe.transformer.parameters()})


def test_hunyuanvideo_crops_its_prompt_template_where_the_tokenizer_made_here_ends_its_system_part():
    """HunyuanVideo's pipeline crops a fixed count of tokens (95, Llama 3's count) off the template's system part;
    with the word-level tokenizer made here that part is 57 tokens, so the spec passes the template with 57: the
    prompt's own tokens reach the transformer (with 95 only padding would, and its token refiner gives NaN)."""
    import diffusers

    from harness.models.pipelines import tokenizer
    from harness.models.specs import HUNYUAN_CROP, HUNYUAN_TEMPLATE

    default = inspect.signature(diffusers.HunyuanVideoPipeline.__call__).parameters["prompt_template"].default
    assert HUNYUAN_TEMPLATE == default["template"] and default["crop_start"] == 95
    made = tokenizer(PIPELINES["hunyuanvideo-tiny-pipe"].tokenizers["tokenizer"])
    assert len(made(HUNYUAN_TEMPLATE.split("{}")[0])["input_ids"]) == HUNYUAN_CROP
