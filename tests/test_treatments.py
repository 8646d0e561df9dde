"""Treatments behind one interface (harness/treatments/): the registry finds each module's TREATMENT on its axis, and
the run applies a treatment it has never seen, in its stage, around each call, with its figures in the record and
its own judgement, with no other file changed."""

import pkgutil

import pytest

from harness import treatments
from harness.cell import AXES, Cell
from harness.run.execute import CellTask, execute_cell, float_reference
from harness.settings import Settings
from harness.verdict import Stage, Status

FAST = Settings(warmup=0, min_steps=1, min_time_s=0.0)


def test_each_module_registers_one_treatment_on_a_treatment_axis_in_order():
    modules = {m.name for m in pkgutil.iter_modules(treatments.__path__)} - {"base"}
    assert len(treatments.TREATMENTS) == len(modules) == 3
    assert [t.axis for t in treatments.TREATMENTS] == ["cast", "lora", "compile"]  # compile last, as users do
    assert all(AXES[t.axis].treatment for t in treatments.TREATMENTS)
    assert [t.when for t in treatments.TREATMENTS] == [treatments.AT_LOAD, treatments.BEFORE_OFFLOAD,
                                                       treatments.AFTER_OFFLOAD]
    compiled = Cell("none", "-", "post-load", "none", "cpu", "flux-tiny", "float32", "diffusers", compile="full")
    assert treatments.timed_beside(compiled) == (compiled.replace(compile="-"), "latency_vs_uncompiled")
    assert float_reference(compiled) == compiled.replace(compile="-")
    assert treatments.reference_suffix(compiled.replace(lora="r4")) == "-lora-r4"


class Probe(treatments.Treatment):
    """A test-only treatment: counts the calls it wraps, judges the output, and can fail in its own stage."""

    axis, order, stage, when, metric = "compile", 5, Stage.LORA, treatments.BEFORE_OFFLOAD, "probe"

    def __init__(self, fail: bool = False):
        self.fail, self.seen = fail, []

    def present(self, cell) -> bool:
        return True

    def apply(self, model, cell, context):
        if self.fail:
            raise RuntimeError("the probe refused the model")
        figures = {"calls": 0, "parameters": sum(p.numel() for p in context.skeleton.parameters())}

        class Count:
            def __enter__(self):
                figures["calls"] += 1

            def __exit__(self, *exc):
                return False

        def judge(against_reference, against_plain, reference_against_plain):
            self.seen.append((against_reference, against_plain))

        return treatments.Applied(figures=lambda: figures, call=Count, judge=judge)


@pytest.mark.parametrize("fail", [False, True])
def test_a_new_treatment_runs_in_its_stage_with_its_figures_in_the_record(tmp_path, monkeypatch, fail):
    probe = Probe(fail)
    monkeypatch.setattr(treatments, "TREATMENTS", (*treatments.TREATMENTS, probe))
    cell = Cell("none", "-", "post-load", "none", "cpu", "flux-tiny", "float32", "direct")
    outcome = execute_cell(CellTask(cell, FAST, tmp_path))
    if fail:  # its error is recorded in its own stage
        assert outcome.status is Status.ERROR and outcome.error.stage == Stage.LORA
        assert "the probe refused the model" in outcome.error.message
        return
    assert outcome.status is Status.RAN, outcome.error
    figures = outcome.metrics["probe"]
    assert figures["parameters"] > 0
    assert figures["calls"] == 1 + FAST.warmup + outcome.metrics["latency_ms"]["n"]  # every call of the model
    # judged once, against the float model (the output's figures in the record) and its plain output
    assert len(probe.seen) == 1 and probe.seen[0][0]["cosine"] == outcome.metrics["cosine"]


def test_casting_reaches_no_text_encoder_as_in_sdnext():
    """SD.Next's layerwise "TE" option casts a non-CLIP text encoder only where its class has diffusers'
    enable_layerwise_casting (vladmandic/sdnext@d11a619 modules/model_quant.py:338-340, a hasattr guard); no
    transformers text encoder of the built-in pipelines has it, so SD.Next casts the denoiser alone, as the cast
    axis does. Should transformers add the method, this fails: the axis would then have to cast them too."""
    import transformers

    from harness.models.specs import PIPELINES

    classes = {cls for spec in PIPELINES.values() for cls, _ in spec.text_encoders.values()}
    assert {"T5EncoderModel", "UMT5EncoderModel", "Qwen3Model", "Gemma2Model"} <= classes
    assert [c for c in sorted(classes) if hasattr(getattr(transformers, c), "enable_layerwise_casting")] == []
