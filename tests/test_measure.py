"""Measurements: bytes really stored, bits per weight, latency statistics and output error."""


import pytest
import torch
from torch import nn

from harness.models.imitation import build_model, build_skeleton
from harness.run.measure import (
    bits_per_weight,
    digest,
    float_layout,
    median_interval,
    ms_ssim,
    output_error,
    output_figures,
    psnr_db,
    ssim,
    storage,
    stored_bytes,
    tensor_bytes,
    time_paired,
    time_steps,
)


@pytest.mark.parametrize("dtype, bits", [(torch.float32, 32.0), (torch.bfloat16, 16.0), (torch.float16, 16.0)])
def test_bits_per_weight_of_a_float_model_is_its_dtype_width(dtype, bits):
    model = build_model("dit-xs", dtype=dtype)
    assert bits_per_weight(model, float_layout(build_skeleton("dit-xs", dtype))) == bits


def test_bits_per_weight_counts_the_conv_layers_an_engine_quantizes():
    """optimum-quanto quantizes a UNet's Conv2d layers too: counting them as untouched float remainder once gave
    sdxl-tiny -21.4 bits per weight. Over the layers quantized, Linear and Conv alike, qint8 stores 8 bits and its
    scales."""
    pytest.importorskip("optimum.quanto")
    from harness.engines.registry import ENGINES
    from harness.models import real

    model = ENGINES["quanto"].quantize(real.build_model("sdxl-tiny"), "qint8", dtype=torch.float32,
                                       device=torch.device("cpu"))
    stored = storage(model, float_layout(real.build_skeleton("sdxl-tiny")))
    assert stored.quantized_layers["Conv2d"] > 0 and stored.quantized_layers["Linear"] > 0
    assert 8 < stored.bits_per_weight < 9.5
    float_model = storage(real.build_model("sdxl-tiny"), float_layout(real.build_skeleton("sdxl-tiny")))
    assert float_model.quantized_layers == {} and float_model.bits_per_weight == 32.0


def test_stored_bytes_counts_every_state_tensor_once():
    model = build_model("unet-xs")
    expected = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert stored_bytes(model) == expected
    shared = nn.Module()
    shared.a = nn.Linear(64, 64, bias=False)
    shared.b = nn.Linear(64, 64, bias=False)
    shared.b.weight = shared.a.weight
    assert stored_bytes(shared) == 64 * 64 * 4


def test_tensor_bytes_reads_the_inner_tensors_of_a_subclass():
    from torch.testing._internal.two_tensor import TwoTensor  # a real wrapper subclass shipped with torch

    a, b = torch.zeros(16, dtype=torch.float32), torch.zeros(16, dtype=torch.float32)
    assert tensor_bytes(TwoTensor(a, b)) == 2 * 16 * 4


def test_output_error_against_noise_of_known_power():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(200_000, generator=gen, dtype=torch.float64)
    noisy = ref + 0.01 * torch.randn(200_000, generator=gen, dtype=torch.float64)  # signal/noise power 1e4: 40 dB
    err = output_error(noisy, ref)
    assert err.sqnr_db == pytest.approx(40.0, abs=0.2)
    assert 0.9999 < err.cosine < 1.0
    exact = output_error(ref, ref)
    assert exact.sqnr_db is None and exact.max_abs_error == 0 and exact.cosine == pytest.approx(1.0)


def test_ssim_sees_structure_where_psnr_sees_only_pixel_error():
    """A smooth image brightened keeps its structure (SSIM near 1 though every pixel moved); the same pixels
    shuffled lose it (SSIM near 0 with the same histogram); a pipeline's figures carry it and say why LPIPS not."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    image = torch.stack([x, y, (x + y) / 2])[None] * 0.8 + 0.1
    brighter = (image + 0.08).clamp(0, 1)
    shuffled = image.flatten(2)[..., torch.randperm(32 * 32, generator=torch.Generator().manual_seed(0))].view_as(image)
    assert ssim(image, image) == pytest.approx(1.0)
    assert ssim(image, brighter) > 0.9 > 0.2 > ssim(image, shuffled)
    assert psnr_db(image, brighter) < 25  # PSNR: every pixel 0.08 off
    figures = output_figures({"latents": image, "image": brighter}, {"latents": image, "image": image})
    assert figures["ssim"] == pytest.approx(ssim(image, brighter)) and "download" in figures["lpips_not_measured"]


def test_ms_ssim_where_an_image_has_five_scales_and_why_not_where_it_has_not():
    """MS-SSIM (pytorch-msssim) on a 192 px image: 1 for the same image, lower for a blurred one (structure lost at
    the fine scales) than for a brightened one; a 32 px image has no five scales: its figures say so instead."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 192), torch.linspace(0, 1, 192), indexing="ij")
    image = (torch.stack([x, y, (x + y) / 2]) * 0.5 + 0.25 + 0.1 * torch.sin(40 * x) * torch.cos(40 * y))[None]
    blurred = torch.nn.functional.avg_pool2d(image, 5, stride=1, padding=2, count_include_pad=False)
    brighter = (image + 0.05).clamp(0, 1)
    assert ms_ssim(image, image) == pytest.approx(1.0)
    assert ms_ssim(image, blurred) < ms_ssim(image, brighter) < 1
    figures = output_figures({"latents": image, "image": blurred}, {"latents": image, "image": image})
    assert figures["ms_ssim"] == pytest.approx(ms_ssim(image, blurred)) and "ms_ssim_not_measured" not in figures
    small = image[..., :32, :32]
    figures = output_figures({"latents": small, "image": small}, {"latents": small, "image": small})
    assert "ms_ssim" not in figures and figures["ms_ssim_not_measured"].endswith("this one has 32")


def test_latency_does_warmup_then_enough_timed_steps():
    calls = []
    lat = time_steps(lambda: calls.append(1), "cpu", warmup=3, min_steps=7, max_steps=50, min_time_s=0.0)
    assert lat.n == 7 and len(calls) == 10 and lat.warmup == 3
    assert lat.p10 <= lat.median <= lat.p90
    capped = time_steps(lambda: None, "cpu", warmup=0, min_steps=1, max_steps=4, min_time_s=10.0)
    assert capped.n == 4


def test_digest_tells_bit_identical_from_nearly_identical():
    t = torch.randn(100)
    assert digest(t) == digest(t.clone())
    assert digest(t) != digest(t + 1e-7 * t.abs().max())


def test_median_interval_takes_the_binomial_order_statistics():
    assert median_interval(list(range(20))) == (5, 14)  # P(B(20, 1/2) <= 5) = 0.021 <= 0.05 < P(B <= 6) = 0.058
    assert median_interval(list(range(8))) == (1, 6)
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few for 90%: the whole range


def test_paired_timing_alternates_the_cell_and_its_float_model():
    calls = []
    latency, paired = time_paired(lambda: calls.append("cell"), lambda: calls.append("float"), "cpu", warmup=2,
                                  min_steps=6, max_steps=50, min_time_s=0.0,
                                  after_step=lambda: calls.append("after"))
    assert calls == ["cell", "after", "float"] * 6
    assert latency.n == paired.n == 6 and latency.warmup == 2
    assert paired.lo <= paired.ratio <= paired.hi and paired.float_ms > 0


def test_the_paired_ratio_is_the_cell_over_its_float_model(monkeypatch):
    """On a clock the steps themselves advance (3 ms the cell, 1 ms its float model): the ratio is 3, the cell's
    latency 3 ms and the float model's 1 ms, exactly; no wall clock decides it."""
    from types import SimpleNamespace

    from harness.run import measure

    now = [0.0]
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def advance(seconds: float):
        return lambda: now.__setitem__(0, now[0] + seconds)

    latency, paired = time_paired(advance(0.003), advance(0.001), "cpu", warmup=0, min_steps=5, max_steps=5,
                                  min_time_s=0.0)
    assert paired.ratio == pytest.approx(3.0) and paired.lo == pytest.approx(3.0) == paired.hi
    assert latency.median == pytest.approx(3.0) and paired.float_ms == pytest.approx(1.0) and paired.n == 5


def test_each_cell_is_timed_beside_its_float_reference_unless_it_would_not_fit(tmp_path):
    from harness.cell import Cell
    from harness.run.execute import CellTask, _FloatReference, float_reference
    from harness.settings import Settings

    cell = Cell("quanto", "qint8", "post-load", "model", "cpu", "dit-xs", "float32")
    assert float_reference(cell) == cell.baseline  # what quantizing costs, in the same offload mode
    assert float_reference(cell.baseline) == cell.baseline.replace(offload="none")  # what offloading costs
    assert float_reference(cell.baseline.replace(offload="none")) is None  # the float model itself
    ref = _FloatReference(CellTask(cell, Settings(), tmp_path), float_bytes=1 << 50)  # a petabyte of weights
    assert ref.start() is None and "does not fit beside the cell in the cpu memory left" in ref.why


def test_a_repeated_line_is_said_once_with_its_count():
    from harness.run.measure import runs_counted

    assert runs_counted(["a", "a", "a", "b", "a"]) == ["a (x3)", "b", "a"]
    assert runs_counted([]) == []


def test_host_load_sums_each_threads_run_queue_wait_per_wall_second(monkeypatch):
    """cpu_wait from the threads' schedstat readings on a clock the test sets (no wall clock decides it): a thread
    that waited 0.3 s and one that started during the steps and waited 0.1 s, over 2 s: 0.2; a thread that ended
    is left out; no schedstat: null."""
    from types import SimpleNamespace

    from harness.run import measure

    now, readings = [0.0], [{"1": 5_000_000_000, "2": 7_000_000_000, "3": 1}]
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(measure, "thread_waits", lambda: readings[0])
    with measure.HostLoad() as load:
        now[0], readings[0] = 2.0, {"1": 5_300_000_000, "2": 7_000_000_000, "4": 100_000_000}
    assert load.figures["cpu_wait"] == pytest.approx(0.2) and load.figures["wall_s"] == 2.0
    with measure.HostLoad() as load:
        readings[0] = None
    assert load.figures["cpu_wait"] is None


def test_a_thread_sharing_its_cpu_with_a_busy_loop_is_read_as_waiting():
    """The kernel's own reading: pinned to one CPU with a busy loop, the two take turns, so this thread waits about
    half the time (0.50 measured here; alone 0.0). Other load can only add waiting, so only the lower bound is
    asserted."""
    import os
    import subprocess
    import sys
    import time

    from harness.run.measure import HostLoad

    cpu, mask = min(os.sched_getaffinity(0)), os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        pinned = f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
        hog = subprocess.Popen([sys.executable, "-c", pinned])
        try:
            time.sleep(0.3)
            with HostLoad() as load:
                sum(range(30_000_000))  # CPU work, not a wall-clock span
        finally:
            hog.kill()
            hog.wait()
    finally:
        os.sched_setaffinity(0, mask)
    assert load.figures["cpu_wait"] > 0.3, load.figures
