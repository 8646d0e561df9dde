"""The LoRA axes (harness/treatments/lora.py) on the real tiny Flux transformer: the offline LoRA's naming and
seed, diffusers' load_lora_adapter and fuse_lora on it, SD.Next's dequantize-merge-requantize path on a real
SDNQ model, and the check that fails a cell whose LoRA was lost. The matrix's LoRA cells (every engine) are the
slow tier's."""

import pytest
import torch

from conftest import lines_of
from harness.cell import AXES, Cell
from harness.engines.registry import ENGINES
from harness.matrix import lora_fused
from harness.models.build import build_model, make_inputs, run
from harness.run import measure
from harness.run.execute import float_reference, unavailable
from harness.treatments import lora as loras

MODEL = "flux-tiny"


def _lora_cell(engine="none", qtype="-", fuse="unfused", model=MODEL, lora="r4"):
    return Cell(engine, qtype, "post-load", "none", "cpu", model, "float32", "diffusers", lora=lora, lora_fuse=fuse)


def _with_lora(fuse: str, model=None):
    model = model if model is not None else build_model(MODEL, seed=0)
    weights = loras.state_dict(build_model(MODEL, seed=0), "r4", seed=0)
    done = loras.apply(model, weights, fuse)
    return model, done


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(MODEL, seed=0)


@pytest.fixture(scope="module")
def outputs(inputs):
    """The float model's output without and with the LoRA (unfused): the references of a LoRA cell."""
    with torch.no_grad():
        plain = run(build_model(MODEL, seed=0), inputs)
        with_lora = run(_with_lora("unfused")[0], inputs)
    return plain, with_lora


def test_the_lora_is_seeded_in_diffusers_naming_for_every_attention_projection():
    model = build_model(MODEL, seed=0)
    r4, again, r16 = (loras.state_dict(model, rank, seed=0) for rank in ("r4", "r4", "r16"))
    targets = loras.targets(model)
    assert targets and {name.rsplit(".", 1)[-1] for name, _, _ in targets} >= {"to_q", "to_k", "to_v"}
    assert len(r4) == 2 * len(targets)
    for name, fan_in, fan_out in targets:
        assert r4[f"transformer.{name}.lora_A.weight"].shape == (4, fan_in)
        assert r4[f"transformer.{name}.lora_B.weight"].shape == (fan_out, 4)
        assert r16[f"transformer.{name}.lora_A.weight"].shape == (16, fan_in)
    assert all(torch.equal(r4[k], again[k]) for k in r4)
    assert not torch.equal(next(iter(r4.values())), next(iter(loras.state_dict(model, "r4", seed=1).values())))


def test_unfused_and_fused_agree_on_the_float_model_and_the_lora_moves_its_output(inputs, outputs):
    plain, with_lora = outputs
    effect = measure.output_figures(with_lora, plain)["sqnr_db"]
    assert effect < 20  # far beyond 8-bit quantization's error (30-45 dB here): a lost LoRA cannot pass
    fused, done = _with_lora("fused")
    assert done["layers"] == len(loras.targets(build_model(MODEL, seed=0)))
    assert loras.lora_layers(fused) == []  # fuse_lora, then unload_lora: the delta is in the base weights
    with torch.no_grad():
        out = run(fused, inputs)
    assert measure.output_figures(out, with_lora)["sqnr_db"] > 80
    loras.check(measure.output_figures(out, with_lora), measure.output_figures(out, plain))


def test_sdnqs_merge_path_requantizes_each_layer_with_the_lora_in_it(inputs, outputs):
    plain, with_lora = outputs
    engine = ENGINES["sdnq"]
    engine.import_package()
    model = engine.quantize(build_model(MODEL, seed=0), "int8", dtype=torch.float32, device=torch.device("cpu"))
    merged, done = _with_lora("merged", model)
    assert done["layers"] == len(loras.targets(build_model(MODEL, seed=0)))
    for name, _, _ in loras.targets(merged):
        assert hasattr(merged.get_submodule(name), "sdnq_dequantizer"), name  # quantized again, in place
    assert loras.lora_layers(merged) == []
    with torch.no_grad():
        out = run(merged, inputs)
    figures = measure.output_figures(out, with_lora)
    assert figures["sqnr_db"] > 25, figures  # int8's error, not the LoRA's effect
    loras.check(figures, measure.output_figures(out, plain))


def test_a_cell_whose_lora_was_lost_fails(outputs):
    plain, with_lora = outputs
    lost = plain + 1e-3 * torch.randn_like(plain)  # the quantized model's output without its LoRA
    with pytest.raises(loras.LoraNotApplied, match="nearer the float model without the LoRA"):
        loras.check(measure.output_figures(lost, with_lora), measure.output_figures(lost, plain))
    with pytest.raises(loras.LoraNotApplied, match="equals the float model's without the LoRA"):
        loras.check(measure.output_figures(plain, with_lora), measure.output_figures(plain, plain))


def test_where_a_lora_is_offered():
    assert loras.not_offered(_lora_cell()) is None
    assert loras.not_offered(_lora_cell("sdnq", "int8", "merged")) is None
    assert "SD.Next's for SDNQ" in loras.not_offered(_lora_cell("quanto", "qint8", "merged"))
    absent = unavailable(_lora_cell(model="dit-xs"))
    assert absent is not None and "not a diffusers model" in absent.reason
    # a fuse mode without a LoRA is no cell of a matrix
    assert not lora_fused(_lora_cell(lora="-", fuse="fused")) and lora_fused(_lora_cell(lora="-"))


def test_a_lora_cell_is_judged_and_timed_against_the_float_model_with_the_same_lora():
    cell = _lora_cell("sdnq", "int8", "merged")
    assert cell.id.endswith("/diffusers+r4+merged") and Cell.from_id(cell.id) == cell
    assert float_reference(cell) == _lora_cell()  # the float model, the same LoRA, unfused
    assert AXES["lora_fuse"].default == "unfused"


def test_a_lora_cell_needs_peft_and_the_report_shows_its_figures(reference_records, tmp_path):
    import json

    from harness.report import data as report_data
    from harness.report.html import figures
    from harness.stacks.catalog import packages_needed

    assert "peft" in packages_needed(_lora_cell()) and "peft" not in packages_needed(_lora_cell(lora="-"))
    ok = next(json.loads(line) for line in lines_of(reference_records)
              if '"verdict": "ok"' in line and '"flux-tiny"' in line and '"diffusers"' in line)
    ok["cell"] |= {"lora": "r4", "lora_fuse": "unfused"}
    ok["id"] = Cell(**ok["cell"]).id
    ok["metrics"]["lora"] = {"rank": 4, "fuse": "unfused", "layers": 7, "effect_sqnr_db": 6.0,
                             "sqnr_without_lora_db": 6.1, "lora_devices": ["cpu"], "base_devices": ["cpu"]}
    path = tmp_path / "lora.jsonl"
    path.write_text(json.dumps(ok) + "\n")
    loaded = report_data.load([path])
    assert loaded.skipped == []
    shown = dict(figures(loaded.frame.iloc[0]))
    assert shown["LoRA"] == ("7 layers; it moves the float model's output to SQNR 6.0 dB; this output against the "
                             "float model without it: 6.1 dB; weights on cpu, base layers on cpu")
