"""The compile axis (harness/treatments/compiling.py): real torch.compile on small modules (dynamo with its
`eager` backend, so no C++ build), the Watch that checks compiled code ran, and how a compiler error is
attributed. The compiled matrix cells (inductor on flux-tiny) are the slow tier's."""

import pytest
import torch
from torch import nn

from conftest import lines_of
from harness.cell import Cell
from harness.run.execute import error_info, float_reference, unavailable
from harness.treatments import compiling
from harness.verdict import Stage


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.linear(x))


class Net(nn.Module):
    _repeated_blocks = ("Block",)  # as diffusers' models declare them

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile(net: nn.Module, mode: str, **options) -> compiling.Watch:
    targets = compiling._targets(net, mode)
    watch = compiling.Watch(mode, targets, {"fullgraph": True, "error_on_recompile": True})
    for module in targets:
        module.compile(backend="eager", fullgraph=True, **options)
    return watch


@pytest.mark.parametrize(("mode", "modules"), [("regional", 2), ("full", 1)])
def test_the_watch_counts_compiled_calls_and_dynamo_graphs(mode, modules):
    net, x = Net(), torch.randn(2, 8)
    watch = _compile(net, mode)
    with torch.no_grad():
        for _ in range(4):
            with watch.call():
                net(x)
    figures = watch.figures()
    assert figures["modules"] == modules and figures["compiled_calls"] == 4 * modules
    assert figures["graphs"] >= 1 and figures["graph_breaks"] == 0 and figures["recompiles"] == 0
    assert figures["first_call_s"] > 0 and figures["fullgraph"] is True


def test_a_compiled_module_that_runs_eagerly_fails_the_cell():
    """accelerate#4253's symptom: compiled blocks silently run uncompiled. Here dynamo is told to run eagerly
    (torch.compiler.set_stance), which skips the compiled code as a hook that calls around it would."""
    net, x = Net(), torch.randn(2, 8)
    watch = _compile(net, "regional")
    with torch.no_grad():
        with watch.call():
            net(x)
        with pytest.raises(compiling.CompiledCodeNotRun, match="Block ran eagerly after compiling"):
            with watch.call(), torch.compiler.set_stance("force_eager"):
                net(x)


def test_a_recompile_is_an_error_where_diffusers_tests_make_it_one_and_only_in_the_cells_calls():
    net = Net()
    watch = _compile(net, "full", dynamic=False)
    with torch.no_grad():
        with watch.call():
            net(torch.randn(2, 8))
        net(torch.randn(5, 8))  # outside the cell's calls (the uncompiled reference's own compiles): not guarded
        with pytest.raises(torch._dynamo.exc.RecompileError), watch.call():
            net(torch.randn(3, 8))  # a new batch size: a recompile
    allowed = compiling.Watch("full", [], compiling.options("group"))  # with group offload it is allowed
    with allowed.call(), torch.no_grad():
        net(torch.randn(4, 8))
    with allowed.call(), torch.no_grad():
        net(torch.randn(6, 8))
    assert allowed.figures()["recompiles"] >= 1  # counted, not raised


def test_options_follow_diffusers_quant_compile_tests():
    assert compiling.options("none") == {"fullgraph": True, "error_on_recompile": True}
    assert compiling.options("model") == {"fullgraph": True, "error_on_recompile": False}
    assert compiling.options("group") == {"fullgraph": False, "error_on_recompile": False}


def _graph_break(x):
    torch._dynamo.graph_break()
    return x + 1


def test_a_graph_break_under_fullgraph_names_dynamo_and_the_traced_code():
    compiled = torch.compile(_graph_break, backend="eager", fullgraph=True)
    with pytest.raises(Exception) as caught:
        compiled(torch.ones(2))
    info = error_info(caught.value, Stage.COMPILE)
    assert info.layer == "torch._dynamo" and info.stage == Stage.COMPILE
    assert info.origin == "test_compile", info  # the module of the code dynamo traced, not dynamo's frames


def test_regional_compile_is_offered_only_where_diffusers_declares_repeated_blocks():
    def cell(model, mode):
        return Cell("none", "-", "post-load", "none", "cpu", model, "float32", "diffusers", compile=mode)

    assert compiling.not_offered(cell("flux-tiny", "regional")) is None
    assert compiling.not_offered(cell("sd3-tiny", "full")) is None
    assert "declares no _repeated_blocks" in compiling.not_offered(cell("sd3-tiny", "regional"))
    absent = unavailable(cell("dit-xs", "regional"))
    assert absent is not None and "not a diffusers model" in absent.reason


def test_a_compiled_cell_is_timed_beside_itself_uncompiled():
    cell = Cell("gguf", "Q8_0", "prequantized", "group", "cpu", "flux-tiny", "float32", "diffusers", compile="full")
    assert cell.id.endswith("/diffusers+full") and Cell.from_id(cell.id) == cell
    assert float_reference(cell) == cell.replace(compile="-")


def test_the_report_shows_a_compiled_cells_figures(reference_records, tmp_path):
    import json

    from harness.report import data as report_data
    from harness.report.html import figures

    ok = next(json.loads(line) for line in lines_of(reference_records)
              if '"verdict": "ok"' in line and '"flux-tiny"' in line and '"diffusers"' in line)
    ok["cell"]["compile"] = "regional"
    ok["id"] = Cell(**ok["cell"]).id
    ok["metrics"].pop("latency_vs_float", None)
    ok["metrics"]["latency_vs_uncompiled"] = {"ratio": 0.8, "lo": 0.7, "hi": 0.9, "n": 5, "float_ms": 10.0}
    ok["metrics"]["compile"] = {"mode": "regional", "fullgraph": True, "error_on_recompile": True,
                                "first_call_s": 7.5, "modules": 4, "compiled_calls": 40, "graphs": 3,
                                "graph_breaks": 0, "recompiles": 0}
    path = tmp_path / "compiled.jsonl"
    path.write_text(json.dumps(ok) + "\n")
    loaded = report_data.load([path])
    assert loaded.skipped == []
    shown = dict(figures(loaded.frame.iloc[0]))
    assert shown["compile"] == ("first call 7.5 s (tracing and building), 3 graphs, 0 graph breaks, 0 recompiles; "
                                "steps 0.80x the same cell uncompiled, timed beside it (90% interval 0.70-0.90)")
    assert "timed beside itself uncompiled" in shown["latency"]  # not a ratio to a float model it was not timed by
