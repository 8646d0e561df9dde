"""Models from the user's disk (`[models.NAME]` in a matrix): a pipeline directory, a model directory and a single
.safetensors file, written here by save_pretrained / safetensors, named by path and run like the built-in models;
a path that is not a model is one line naming it."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from harness.cell import Cell
from harness.errors import QuantMatrixError
from harness.matrix import parse_matrix
from harness.models import sources, specs
from harness.models.build import build_model, build_skeleton
from harness.run.execute import CellTask, execute_cell
from harness.settings import Settings
from harness.verdict import Status

REPO = Path(__file__).resolve().parents[1]
FAST = Settings(warmup=0, min_steps=1, min_time_s=0.0)
TABLES = '''
[models.my-pipe]
path = "pipe"
[models.my-den]
path = "den"
[models.my-file]
path = "den.safetensors"
config = "den"
'''


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    """What a user has on disk: a Flux pipeline directory, its transformer as a model directory and as one file
    (the built-in tiny Flux's weights, saved)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("models")
    build_model("flux-tiny-pipe").save_pretrained(str(root / "pipe"))
    denoiser = build_model("flux-tiny")
    denoiser.save_pretrained(str(root / "den"))
    save_file({k: v.contiguous() for k, v in denoiser.state_dict().items()}, str(root / "den.safetensors"))
    return root


@pytest.fixture
def registry():
    """The model tables as they were: a registered source is gone after the test."""
    tables = (specs.MODELS, specs.DIFFUSERS_CONFIGS, specs.PIPELINES, specs.REAL_CLASSES, sources.SOURCES)
    saved = [dict(t) for t in tables]
    yield
    for table, old in zip(tables, saved, strict=True):
        table.clear()
        table.update(old)


AXES = '''
[axes]
engine = ["none", "sdnq"]
qtype = ["-", "int8"]
load = ["post-load"]
offload = ["none"]
device = ["cpu"]
model = ["my-pipe", "my-den", "my-file"]
dtype = ["float32"]
stack = ["direct", "diffusers"]
'''


def matrix(disk: Path, body: str, axes: str = AXES):
    return parse_matrix(body + axes, disk / "m.toml")


def test_a_pipeline_a_model_directory_and_a_single_file_become_models_of_the_matrix(disk, registry):
    m = matrix(disk, TABLES)
    assert {c.model for c in m.cells} == {"my-pipe", "my-den", "my-file"} and len(m.cells) == 12
    assert [s.name for s in m.settings.models] == ["my-pipe", "my-den", "my-file"]
    pipe, den, file = (specs.MODELS[n] for n in ("my-pipe", "my-den", "my-file"))
    assert pipe.pipeline and pipe.kind == "flux" and pipe.source == str(disk / "pipe")
    assert not den.pipeline and den.real and (den.channels, den.context_dim, den.pooled_dim) == (16, 128, 128)
    assert specs.PIPELINES["my-pipe"].quantized_te == ("text_encoder_2",)  # SD.Next's "TE" for Flux
    assert specs.PIPELINES["my-pipe"].call["max_sequence_length"] == 16  # the saved tokenizers' length
    # the skeletons from the configs alone have the weights' shapes: the files' parameter counts
    for name, built in (("my-pipe", "flux-tiny-pipe"), ("my-den", "flux-tiny"), ("my-file", "flux-tiny")):
        shapes = {k: tuple(v.shape) for k, v in build_skeleton(name).state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in build_skeleton(built).state_dict().items()}, name


def test_the_float_model_is_the_checkpoint_whatever_the_seed(disk, registry):
    matrix(disk, TABLES)
    want = build_model("flux-tiny", seed=0).state_dict()
    for name in ("my-den", "my-file"):
        got = build_model(name, seed=5, dtype=torch.bfloat16).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k].bfloat16()) for k in want), name


@pytest.mark.parametrize("model, stack", [("my-pipe", "diffusers"), ("my-file", "direct"), ("my-den", "diffusers")])
def test_a_cell_of_a_model_from_disk_runs_and_is_judged(disk, registry, model, stack, tmp_path):
    m = matrix(disk, TABLES)
    settings = replace(FAST, models=m.settings.models)
    outcome = execute_cell(CellTask(Cell("sdnq", "int8", "post-load", "none", "cpu", model, "float32", stack),
                                    settings, tmp_path))
    assert outcome.status is Status.RAN, outcome.error
    metrics = outcome.metrics
    assert metrics["weights"] == "checkpoint" and metrics["output_finite"] and metrics["sqnr_db"] > 30
    assert 8 <= metrics["bits_per_weight"] < 9
    if model == "my-pipe":  # an image, judged as one
        assert metrics["psnr_db"] > 30 and 0.9 < metrics["ssim"] <= 1


@pytest.mark.parametrize("table, said", [
    ('path = "nowhere"', "nowhere: not found; expected a diffusers directory or a .safetensors file"),
    ('path = "empty"', "empty/config.json: not found; expected a diffusers pipeline directory (model_index.json) or "
                       "model directory (config.json)"),
    ('path = "den.safetensors"', "a single file needs config = "),
    ('path = "pickled"', "pickled: no *.safetensors weights; expected what save_pretrained writes"),
    ('path = "pipe/model_index.json"', "model_index.json: expected a diffusers directory or a .safetensors file"),
    ('path = "den"\nweights = 1', "unknown key 'weights'"),
    ('path = "quantized"', "quantized/config.json: pre-quantized (sdnq); expected a float checkpoint"),
    ('path = "vae"', "a model of class 'AutoencoderKL': alone, only FluxTransformer2DModel, SD3Transformer2DModel, "
                     "UNet2DConditionModel run"),
])
def test_a_path_that_is_not_a_model_is_one_line_naming_it(disk, registry, table, said):
    (disk / "empty").mkdir(exist_ok=True)
    (disk / "pickled").mkdir(exist_ok=True)
    (disk / "pickled" / "config.json").write_text((disk / "den" / "config.json").read_text())
    (disk / "pickled" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    (disk / "quantized").mkdir(exist_ok=True)  # as SD.Next's SDNQ reference models are saved: a config that says so
    config = json.loads((disk / "den" / "config.json").read_text())
    (disk / "quantized" / "config.json").write_text(json.dumps({**config, "quantization_config": {
        "quant_method": "sdnq", "weights_dtype": "uint4"}}))
    (disk / "vae").mkdir(exist_ok=True)
    (disk / "vae" / "config.json").write_text((disk / "pipe" / "vae" / "config.json").read_text())
    with pytest.raises(QuantMatrixError) as raised:
        matrix(disk, f"[models.mine]\n{table}\n", '[axes]\nengine = "none"\nqtype = "-"\nload = "post-load"\n'
                     'offload = "none"\ndevice = "cpu"\nmodel = "dit-xs"\ndtype = "float32"\n')
    message = str(raised.value)
    assert said in message and "\n" not in message and "models.mine" in message and "m.toml" in message


def test_a_name_of_ones_own_and_a_record_of_it_read_elsewhere(disk, registry):
    with pytest.raises(QuantMatrixError, match="'flux-tiny' is a built-in model"):
        matrix(disk, '[models.flux-tiny]\npath = "den"\n')
    with pytest.raises(QuantMatrixError, match="expected lowercase letters"):
        matrix(disk, '[models."My Model"]\npath = "den"\n')
    # a record of a user's model validates where the model is not registered (another machine's report); a name
    # that could not be one (a path, a newline) does not
    from harness.cell import unknown_values

    assert unknown_values({"model": "my-pipe"}) == []
    assert unknown_values({"model": "../x"}) and unknown_values({"model": "a\nb"})


@pytest.mark.slow
def test_models_from_disk_run_through_the_whole_harness_on_both_stacks(disk, tmp_path):
    """`quantmatrix run` (cells in their own processes, which register the models again) and `report`: none,
    sdnq and gguf on the three sources and both stacks, every cell ok, pipelines with image figures."""
    (tmp_path / "m.toml").write_text(TABLES.replace('"pipe"', f'"{disk / "pipe"}"').replace(
        '"den"', f'"{disk / "den"}"').replace('"den.safetensors"', f'"{disk / "den.safetensors"}"')
        + AXES.replace('["none", "sdnq"]', '["none", "sdnq", "gguf"]').replace('"int8"]', '"int8", "Q8_0"]'))
    results = tmp_path / "r.jsonl"
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--matrix", str(tmp_path / "m.toml"),
                           "--results", str(results), "-p", "no:randomly"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(records) == 18 and {r["verdict"] for r in records} == {"ok"}
    assert all(r["metrics"]["weights"] == "checkpoint" for r in records)
    images = [r for r in records if r["cell"]["model"] == "my-pipe" and r["cell"]["engine"] != "none"]
    assert len(images) == 4 and all(r["metrics"]["psnr_db"] > 30 and r["metrics"]["ssim"] > 0.9 for r in images)
    site = subprocess.run([sys.executable, "-m", "harness.cli", "report", str(results), "-o", str(tmp_path / "site")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert site.returncode == 0 and "(18 records, 0 skipped)" in site.stdout, site.stderr[-2000:]


def test_check_takes_a_directory_on_disk_as_its_model(disk, registry, monkeypatch):
    """`quantmatrix check /path/to/pipeline`: the curated matrix names the directory as a model of its own."""
    from harness.check import curated_matrix

    monkeypatch.chdir(disk)
    text = curated_matrix(str(disk / "pipe"), "cpu")
    assert text.startswith(f'[models.pipe]\npath = "{disk / "pipe"}"')
    checked = parse_matrix(text, disk / "check.toml")
    assert {c.model for c in checked.cells} == {"pipe"} and {c.stack for c in checked.cells} == {"diffusers"}
    assert {c.engine for c in checked.cells} >= {"none", "sdnq", "gguf"}
    with pytest.raises(QuantMatrixError, match="expected a built-in model or the path of a diffusers"):
        curated_matrix(str(disk / "no-such-dir"), "cpu")


def test_a_video_pipeline_from_disk_generates_frames(tmp_path, registry):
    """A Wan pipeline directory: what kind of output it makes is read from the call's result, not from a spec (a
    directory has none), so its frames are judged as a video."""
    from harness.models.build import make_inputs, run

    build_model("wan-tiny-pipe").save_pretrained(str(tmp_path / "wan"))
    parse_matrix('[models.my-wan]\npath = "wan"\n' + AXES.replace('"my-pipe", "my-den", "my-file"', '"my-wan"'),
                 tmp_path / "m.toml")
    with torch.no_grad():
        out = run(build_model("my-wan"), make_inputs("my-wan"))
    assert out["image"].dim() == 5 and out["image"].shape[1] == 5  # batch x frames x channels x height x width


def _inline(config: dict) -> str:
    """A config as a TOML inline table."""
    def value(v):
        return json.dumps(list(v)) if isinstance(v, (list, tuple)) else json.dumps(v)

    return "{ " + ", ".join(f"{k} = {value(v)}" for k, v in config.items()) + " }"


def test_a_class_at_a_shape_of_ones_own_is_drawn_from_the_seed(disk, registry, tmp_path):
    """`class` + `config` (inline, or a directory's config.json): seeded weights, no checkpoint. At flux-tiny's
    arguments it is flux-tiny, bit for bit; its cells run and are judged, their records saying `weights: seeded`."""
    tiny = specs.DIFFUSERS_CONFIGS["flux-tiny"]
    tables = (f'[models.my-shape]\nclass = "FluxTransformer2DModel"\nconfig = {_inline(tiny)}\n'
              '[models.my-dir-shape]\nclass = "FluxTransformer2DModel"\nconfig = "den"\n')
    axes = AXES.replace('"my-pipe", "my-den", "my-file"', '"my-shape", "my-dir-shape"')
    m = matrix(disk, tables, axes)
    assert len(matrix(disk, tables, axes).cells) == len(m.cells)  # the same file loaded again: the same models
    want = build_model("flux-tiny", seed=3).state_dict()
    for name in ("my-shape", "my-dir-shape"):
        assert specs.MODELS[name].real and not specs.MODELS[name].source and specs.MODELS[name].shared_weights
        got = build_model(name, seed=3).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    settings = replace(FAST, models=m.settings.models)
    for stack in ("direct", "diffusers"):
        outcome = execute_cell(CellTask(Cell("sdnq", "int8", "post-load", "none", "cpu", "my-shape", "float32",
                                             stack), settings, tmp_path))
        assert outcome.status is Status.RAN, outcome.error
        assert outcome.metrics["weights"] == "seeded" and outcome.metrics["sqnr_db"] > 30


def test_a_class_names_only_what_it_changes_from_the_class_defaults():
    """The arguments a denoiser's input shapes come from, where a `class` config leaves them out: diffusers'
    own defaults (read here from the signatures; matrix validation imports no diffusers)."""
    import inspect

    import diffusers

    for cls, defaults in sources.CLASS_DEFAULTS.items():
        signature = inspect.signature(getattr(diffusers, cls).__init__).parameters
        assert {k: signature[k].default for k in defaults} == {k: tuple(v) if isinstance(v, list) else v
                                                               for k, v in defaults.items()}, cls
        assert sources.CLASS_PARAMETERS[cls] == tuple(k for k in signature if k != "self"), cls
    flux = inspect.signature(diffusers.FluxTransformer2DModel.__init__).parameters
    assert flux["axes_dims_rope"].default == sources.FLUX_ROPE


@pytest.mark.parametrize("table, said", [
    ('class = "FluxTransformer2DModel"\npath = "den"', "(one of the two)"),
    ('class = "FluxTransformer2DModel"', "a class needs config = "),
    ('class = "FluxTransformer2DModel"\nconfig = 3', "config: expected a directory holding config.json, or a table"),
    ('class = "SD3Transformer2DModel"\nconfig = "den"', "config names class 'FluxTransformer2DModel'; expected "
                                                         "'SD3Transformer2DModel'"),
    ('class = "WanTransformer3DModel"\nconfig = { num_layers = 1 }', "a model of class 'WanTransformer3DModel': "
                                                                     "alone, only"),
    ('class = "UNet2DConditionModel"\nconfig = { layers_per_block = 1 }', "'projection_class_embeddings_input_dim'"
                                                                           " missing"),
    ('class = "FluxTransformer2DModel"\nconfig = { num_layer = 1 }', "takes no argument 'num_layer'; did you mean "
                                                                     "'num_layers'?"),
    ('class = "FluxTransformer2DModel"\nconfig = { num_layers = 1.5 }', "num_layers is 1.5; expected a whole number"),
    ('class = "FluxTransformer2DModel"\nconfig = { num_layers = -1 }', "num_layers is -1; expected a whole number"),
    ('class = "FluxTransformer2DModel"\nconfig = { attention_head_dim = 64 }', "axes_dims_rope [16, 56, 56] sums to "
                                                                               "128; expected attention_head_dim (64)"),
    ('class = "FluxTransformer2DModel"\nconfig = { num_layers = 1, when = 1979-05-27 }', "config: Object of type "
                                                                                         "date is not JSON"),
    ('class = "FluxTransformer2DModel"\nconfig = "quantized"', "quantized/config.json: pre-quantized (sdnq)"),
    ('class = "FluxTransformer2DModl"\nconfig = "den"', "did you mean 'FluxTransformer2DModel'?"),
    ('class = "FluxTransformer2DModel"\nconfig = "den"\ncall = { height = 64 }', "call: a class model is a "
                                                                                  "denoiser alone"),
])
def test_a_class_that_cannot_be_drawn_is_one_line_naming_it(disk, registry, table, said):
    (disk / "quantized").mkdir(exist_ok=True)
    config = json.loads((disk / "den" / "config.json").read_text())
    (disk / "quantized" / "config.json").write_text(json.dumps({**config, "quantization_config": {
        "quant_method": "sdnq", "weights_dtype": "uint4"}}))
    with pytest.raises(QuantMatrixError) as raised:
        matrix(disk, f"[models.mine]\n{table}\n", '[axes]\nengine = "none"\nqtype = "-"\nload = "post-load"\n'
                     'offload = "none"\ndevice = "cpu"\nmodel = "dit-xs"\ndtype = "float32"\n')
    message = str(raised.value)
    assert said in message and "\n" not in message and "models.mine" in message and "m.toml" in message
