"""Real engines: stored bits agree with each format's arithmetic, files round-trip through detection, 8-bit types
stay closer to the baseline than 4-bit ones, and corrupt files give our error."""

import copy
import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import require_engines
from harness.engines.catalog import CATALOG
from harness.engines.registry import ENGINES
from harness.errors import QuantMatrixError
from harness.models.imitation import build_model, build_skeleton, make_inputs
from harness.run.measure import bits_per_weight, float_layout, output_error, quantized_layers
from harness.stacks import direct, loading

CPU = torch.device("cpu")


def unavailable(engine: str, qtype: str = "-") -> str | None:
    return ENGINES[engine].unavailable_reason(qtype, "cpu")


def need(engine: str, qtype: str = "-") -> None:
    """Skip the test when the engine cannot run `qtype` here; with QUANTMATRIX_REQUIRE_ENGINES=1 (CI) fail it: a
    broken install must not pass as skips."""
    reason = unavailable(engine, qtype)
    if reason is None:
        return
    if require_engines():
        pytest.fail(f"{engine} {qtype}: {reason}, but QUANTMATRIX_REQUIRE_ENGINES is set")
    pytest.skip(reason)


def linear_shapes(name: str) -> list[tuple[int, int]]:
    return [(m.out_features, m.in_features) for m in build_skeleton(name).modules() if isinstance(m, nn.Linear)]


# Each format's arithmetic, from the engines' catalog: (engine, qtype) whose bits per Linear weight are fixed.
FIXED_BITS = [(engine, qtype) for engine, info in CATALOG.items() for qtype in info.bits]


@functools.cache
def float_model(name: str) -> nn.Module:
    return build_model(name)


def quantized(engine: str, qtype: str, name: str) -> nn.Module:
    return ENGINES[engine].quantize(copy.deepcopy(float_model(name)), qtype, dtype=torch.float32, device=CPU)


def test_the_catalog_states_the_arithmetic_of_the_fixed_formats():
    assert {e for e, _ in FIXED_BITS} >= {"bnb", "quanto", "gguf", "nncf"}
    assert all(qtype in CATALOG[engine].qtypes for engine, qtype in FIXED_BITS)


@pytest.mark.parametrize("engine, qtype", FIXED_BITS)
def test_stored_bits_agree_with_the_formats_arithmetic(engine, qtype):
    need(engine, qtype)
    model = quantized(engine, qtype, "dit-s")
    layout = float_layout(build_skeleton("dit-s"))
    measured = bits_per_weight(model, layout)
    # over the layers it quantized (SDNQ leaves the small embedders and adaLN layers in float: 25 of 30)
    names = set(quantized_layers(model, layout))
    shapes = [(m.out_features, m.in_features) for n, m in build_skeleton("dit-s").named_modules()
              if isinstance(m, nn.Linear) and n in names]
    assert len(shapes) >= len(linear_shapes("dit-s")) * 0.8
    assert measured == pytest.approx(CATALOG[engine].bits[qtype].of(shapes), rel=0.01)


ORDERED = [("bnb", ["int8", "nf4"]), ("quanto", ["qint8", "qint4", "qint2"]), ("gguf", ["Q8_0", "Q5_1", "Q4_0"]),
           ("nncf", ["int8_sym", "int4_sym"]), ("sdnq", ["int8", "int4"]),
           ("torchao", ["int8_weight_only", "float8_weight_only"])]


@pytest.mark.parametrize("name", ["dit-xs", "unet-xs"])
@pytest.mark.parametrize("engine, qtypes", ORDERED, ids=[e for e, _ in ORDERED])
def test_more_bits_stay_closer_to_the_baseline(engine, qtypes, name):
    for q in qtypes:
        need(engine, q)
    inputs = make_inputs(name)
    with torch.no_grad():
        reference = float_model(name)(**inputs)
        sqnr = [output_error(quantized(engine, q, name).eval()(**inputs), reference).sqnr_db for q in qtypes]
    # strictly: two types that tie store the same thing
    assert all(sqnr[i] > sqnr[i + 1] for i in range(len(sqnr) - 1)), dict(zip(qtypes, sqnr, strict=True))


def written_files():
    for engine in ENGINES.values():
        if "prequantized" in engine.loads and not engine.hidden:
            yield from ((engine.name, q) for q in engine.qtypes)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("files")


@pytest.mark.parametrize("engine, qtype", list(written_files()))
def test_every_file_the_harness_writes_is_detected_as_what_wrote_it(engine, qtype, workdir):
    need(engine, qtype)
    path = direct.prequantized_file(workdir, ENGINES[engine], qtype, "dit-xs", torch.float32, 0)
    assert loading.detect(path) == (engine, qtype)


@pytest.fixture(scope="module")
def sample_files(workdir):
    files = [direct.prequantized_file(workdir, ENGINES["none"], "-", "dit-xs", torch.float32, 0)]
    for engine, qtype in (("bnb", "nf4"), ("gguf", "Q4_0")):
        reason = unavailable(engine, qtype)
        if reason is not None and require_engines():  # not silently fuzzing fewer formats in CI
            pytest.fail(f"{engine} {qtype}: {reason}, but QUANTMATRIX_REQUIRE_ENGINES is set")
        if reason is None:
            files.append(direct.prequantized_file(workdir, ENGINES[engine], qtype, "dit-xs", torch.float32, 0))
    return [(p.suffix, p.read_bytes(), loading.detect(p)) for p in files]


@given(data=st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
def test_corrupt_or_truncated_files_give_our_error_and_never_crash(sample_files, tmp_path, data):
    suffix, blob, original = data.draw(st.sampled_from(sample_files))
    cut = data.draw(st.integers(0, len(blob) - 1))
    mutated = bytearray(blob[:cut] if data.draw(st.booleans()) else blob)
    for _ in range(data.draw(st.integers(0, 8))):
        where = data.draw(st.integers(0, max(0, min(len(mutated), 4096) - 1)))  # headers live near the start
        if mutated:
            mutated[where] = data.draw(st.integers(0, 255))
    path = tmp_path / f"mutated{suffix}"
    path.write_bytes(bytes(mutated))
    try:
        found = loading.detect(path)
    except QuantMatrixError as exc:  # refused: with our error, naming the file
        assert str(path) in str(exc)
        assert mutated != blob, "an intact file was refused"
        return
    # read: as what some engine writes, and as what wrote it when nothing was changed
    engine, qtype = found
    assert qtype in ENGINES[engine].qtypes
    if mutated == blob:
        assert found == original


def test_on_the_fly_peak_memory_stays_below_post_load(tmp_path):
    """The float model never sits in memory while loading on the fly (bnb nf4, dit-s: 80 MB of float weights)."""
    need("bnb", "nf4")
    from harness.cell import Cell
    from harness.run.execute import CellTask
    from harness.run.isolation import run_isolated
    from harness.settings import Settings

    quick = Settings(warmup=0, min_steps=1, min_time_s=0.0)
    peaks = {}
    for load in ("post-load", "on-the-fly"):  # reference and checkpoint are made in a process of their own
        cell = Cell("bnb", "nf4", load, "none", "cpu", "dit-s", "float32")
        outcome = run_isolated(CellTask(cell, quick, tmp_path), timeout_s=300)
        assert outcome.status == "ran", outcome.error
        peaks[load] = outcome.metrics["peak_mem_bytes"] - outcome.metrics["mem_base_bytes"]
    float_bytes = 4 * sum(p.numel() for p in build_skeleton("dit-s").parameters())
    # What stays above the quantized model's size on the fly is allocator retention around per-layer
    # quantization (measured: 30-56 MB saved of 77 MB across bnb and gguf types); a quarter is a clear margin.
    assert peaks["on-the-fly"] < peaks["post-load"] - float_bytes // 4, peaks


def test_each_sdnq_option_is_told_apart_by_its_saved_config():
    """SD.Next's SDNQ options (harness/engines/sdnq.py OPTIONS) survive SDNQConfig's to_dict(): a pre-quantized
    file or directory names its type, SVD rank and all, and the diffusers stack's config is SD.Next's."""
    need("sdnq", "int8")
    from sdnq import SDNQConfig

    from harness.engines.sdnq import OPTIONS, qtype_of
    from harness.stacks.diffusers import INTEGRATIONS

    assert set(OPTIONS) == set(CATALOG["sdnq"].qtypes)
    for qtype, options in OPTIONS.items():
        saved = SDNQConfig(**options).to_dict()
        assert qtype_of(saved) == qtype and INTEGRATIONS["sdnq"].saved_type(saved) == qtype
        config = INTEGRATIONS["sdnq"].config(qtype, torch.bfloat16)
        assert {k: getattr(config, k) for k in options} == options
    assert qtype_of(SDNQConfig(weights_dtype="uint4", use_svd=True, svd_rank=64).to_dict()) is None  # not ours
