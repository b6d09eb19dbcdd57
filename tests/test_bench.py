"""`recnext bench latency` and the inference fast path: equal outputs, timing statistics, FLOP counts, CLI, plot."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from recnext_cli.bench import (
    BenchConfig,
    BenchResult,
    LatencyStats,
    count_flops,
    count_parameters,
    latency_stats,
    parse_input_size,
    percentile,
    plot_ap_vs_latency,
    random_backbone,
    time_calls,
)
from recnext_cli.cli import app
from recnext_cli.errors import EnvironmentProblem, UnknownModelError, UsageError
from recnext_cli.fastpath import (
    ChannelsLastLinearAttention,
    ChannelsLastRecAttn,
    OneDnnPointwiseConv,
    prepare_for_inference,
    prepare_input,
    resolve_dtype,
)
from recnext_cli.nn import LinearAttention, build_recnext

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOLERANCE = 1e-4


def _relative_error(outputs, references) -> float:
    return max(((out.float() - ref).abs().max() / ref.abs().max()).item() for out, ref in zip(outputs, references))


@pytest.fixture(autouse=True)
def one_thread():
    # On a 2-core machine shared with other jobs, torch's threads wait on each other: one thread is many times faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FAST_PATH_SETTINGS = {
    "fused": dict(fused=True),
    "fused+channels-last": dict(fused=True, channels_last=True),
    "channels-last": dict(fused=False, channels_last=True),
}


# 64x64 halves exactly at every level; 80x80 reaches a 5x5 map whose 3x3 half is no exact 2x (the fallback path).
@pytest.mark.parametrize("size", [64, 80])
@pytest.mark.parametrize("name", ["m3", "a3"])
def test_fast_path_outputs_equal_the_published_model(name, size):
    reference = random_backbone(name)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference(images)
    for label, settings in FAST_PATH_SETTINGS.items():
        fast = prepare_for_inference(copy.deepcopy(reference), device="cpu", **settings)
        with torch.inference_mode():
            outputs = fast(prepare_input(images, channels_last=settings.get("channels_last", False)))
        assert [o.shape for o in outputs] == [e.shape for e in expected], label
        assert _relative_error(outputs, expected) <= TOLERANCE, label


def test_random_backbone_has_batchnorms_that_are_not_the_identity():
    norms = [m for m in random_backbone("m3").modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all((m.running_var != 1).all() and (m.running_mean != 0).all() for m in norms)


def test_fast_path_rewrites_the_model():
    # Equal outputs prove nothing if nothing was rewritten: check the rewrites happened.
    fast = prepare_for_inference(random_backbone("a3"), fused=True, channels_last=True, device="cpu")
    kinds = {type(module) for module in fast.modules()}
    assert nn.BatchNorm2d not in kinds
    assert {ChannelsLastLinearAttention, ChannelsLastRecAttn} <= kinds
    assert LinearAttention not in kinds
    if torch.backends.mkldnn.is_available():
        assert OneDnnPointwiseConv in kinds
        assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in fast.modules())
    weight = next(m.weight for m in fast.modules() if isinstance(m, nn.Conv2d) and m.weight.dim() == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)


def test_unfused_fast_path_without_channels_last_is_the_published_model():
    reference = random_backbone("m3")
    plain = prepare_for_inference(copy.deepcopy(reference), fused=False, device="cpu")
    assert [type(m) for m in plain.modules()] == [type(m) for m in reference.modules()]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["m3", "a3"])
def test_compiled_fast_path_outputs_equal_the_published_model(name):
    reference = random_backbone(name)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    fast = prepare_for_inference(copy.deepcopy(reference), fused=True, channels_last=True, compile=True, device="cpu")
    with torch.inference_mode():
        expected = reference(images)
        outputs = fast(prepare_input(images, channels_last=True))
    assert _relative_error(outputs, expected) <= TOLERANCE


def _fake_clock(durations):
    """A clock that advances by the next duration between each start and stop reading."""
    readings = []
    now = 0.0
    for duration in durations:
        readings += [now, now + duration]
        now += duration + 1.0  # time between calls must not count
    return iter(readings).__next__


def test_time_calls_and_statistics_on_a_fake_clock():
    durations = [0.030, 0.010, 0.100, 0.050, 0.020, 0.090, 0.040, 0.070, 0.060, 0.080]
    calls = []
    synchronized = []
    measured = time_calls(
        lambda: calls.append(1),
        warmup=3,
        iters=len(durations),
        clock=_fake_clock(durations),
        synchronize=lambda: synchronized.append(len(calls)),
    )
    assert len(calls) == 3 + len(durations)
    # Before each start and after each call: never a clock reading with GPU work still queued.
    assert synchronized == [n for i in range(len(durations)) for n in (3 + i, 4 + i)]
    assert measured == pytest.approx(durations)
    stats = latency_stats(measured)
    # Linear interpolation between closest ranks on 10..100 ms: rank 0.9 -> 19, 4.5 -> 55, 8.1 -> 91.
    assert stats.median_ms == pytest.approx(55.0)
    assert stats.p10_ms == pytest.approx(19.0)
    assert stats.p90_ms == pytest.approx(91.0)
    assert stats.mean_ms == pytest.approx(55.0)
    assert stats.iters == 10
    ms = np.array(durations) * 1000
    assert [stats.p10_ms, stats.median_ms, stats.p90_ms] == pytest.approx(list(np.percentile(ms, [10, 50, 90])))


def test_percentile_edges():
    assert percentile([7.0], 90) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([3.0, 1.0, 2.0], 0) == 1.0 and percentile([3.0, 1.0, 2.0], 100) == 3.0
    with pytest.raises(ValueError):
        latency_stats([])


def test_flops_and_parameters_of_a_conv_match_the_formula():
    conv = nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=1, groups=2, bias=True)
    images = torch.randn(1, 8, 20, 20)
    out_h = out_w = (20 + 2 * 1 - 3) // 2 + 1
    macs = 16 * (8 // 2) * 3 * 3 * out_h * out_w
    assert count_flops(lambda: conv(images)) == 2 * macs
    assert count_parameters(conv) == 16 * (8 // 2) * 3 * 3 + 16


def test_flops_count_the_attention_matmuls():
    channels, heads, side = 8, 2, 4
    n, head_dim = side * side, channels // heads
    attention = LinearAttention(channels, heads).eval()
    macs = (
        2 * channels * (channels // 2) * n  # qk: grouped 1x1 conv, 2 groups
        + channels * 3 * 3 * n  # pe: depthwise 3x3
        + heads * head_dim * head_dim * n  # sum_j k_j v_j^T
        + heads * n * head_dim * head_dim  # q_i^T (kv)
        + heads * n * head_dim  # q_i^T mean(k)
    )
    with torch.inference_mode():
        assert count_flops(lambda: attention(torch.randn(1, channels, side, side))) == 2 * macs


@pytest.mark.parametrize(
    ("text", "size"), [("512x512", (512, 512)), ("640X480", (640, 480)), ("96", (96, 96)), (" 64 x 128 ", (64, 128))]
)
def test_parse_input_size(text, size):
    assert parse_input_size(text) == size


@pytest.mark.parametrize("text", ["512by512", "x512", "512x", "16x16", "-64x64"])
def test_parse_input_size_refuses(text):
    with pytest.raises(UsageError):
        parse_input_size(text)


def _invoke(*args):
    return CliRunner().invoke(app, ["bench", "latency", *args])


TINY = ["--input", "64x64", "--iters", "2", "--warmup", "1", "--threads", "1"]


def test_cli_json_on_a_tiny_input():
    result = _invoke("m3", "a3", *TINY, "--channels-last", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["model"] for row in rows] == ["m3", "a3"]
    m3, a3 = rows
    assert m3["params"] == count_parameters(build_recnext("m3"))
    assert m3["reported_box_ap"] == 41.7 and m3["reported_latency_ms"] == 5.2
    assert a3["reported_box_ap"] == 42.1 and a3["reported_latency_ms"] == 8.4
    for row in rows:
        assert row["input_size"] == [64, 64] and row["channels_last"] and row["fused"]
        assert 0 < row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["throughput_img_s"] == pytest.approx(1000 / row["median_ms"])
        assert row["gflops"] == pytest.approx(2 * row["gmacs"]) and row["gflops"] > 0


def test_cli_markdown_table_shows_reported_numbers():
    result = _invoke("a3", *TINY, "--no-fused")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| Model | Params (M) | GFLOPs | Median (ms)")
    row = lines[2].split(" | ")
    assert row[0] == "| RecNeXt-A3" and row[-2:] == ["8.4ms", "42.1 |"]
    assert "eager as published" in result.stdout


def test_cli_unknown_model():
    result = _invoke("m9", *TINY)
    assert isinstance(result.exception, UnknownModelError)
    assert "m3" in str(result.exception)


def test_cli_bad_input_size():
    result = _invoke("m3", "--input", "64by64")
    assert isinstance(result.exception, UsageError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cli_cuda_without_a_gpu():
    result = _invoke("m3", *TINY, "--device", "cuda")
    assert isinstance(result.exception, EnvironmentProblem)


def test_half_precision_on_cpu_is_refused_only_without_kernels():
    device = torch.device("cpu")
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        probe = torch.ones(1, 1, 1, 1, dtype=dtype)
        try:
            torch.mkldnn_convolution(probe, probe, None, [0, 0], [1, 1], [1, 1], 1)
        except RuntimeError:
            with pytest.raises(UsageError):
                resolve_dtype(name, device)
        else:
            assert resolve_dtype(name, device) is dtype


def test_cli_writes_a_plot(tmp_path):
    plot = tmp_path / "plots" / "ap_vs_latency.png"
    tiny = ["--input", "64x64", "--iters", "1", "--warmup", "0", "--threads", "1"]
    result = _invoke("m3", "a3", *tiny, "--plot", str(plot))
    assert result.exit_code == 0, result.output
    data = plot.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def _result(model, box_ap, median_ms):
    stats = LatencyStats(median_ms, median_ms * 0.9, median_ms * 1.1, median_ms, 5)
    return BenchResult(model, f"RecNeXt-{model.upper()}", BenchConfig(), stats, 1000 / median_ms, 1, 2, None, box_ap)


def test_plot_needs_a_model_with_reported_ap(tmp_path):
    with pytest.raises(UsageError):
        plot_ap_vs_latency([_result("m0", None, 10.0)], tmp_path / "p.png")
    path = plot_ap_vs_latency([_result("m0", None, 10.0), _result("a4", 43.5, 20.0)], tmp_path / "p.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_command_module_does_not_import_torch():
    code = "import sys, recnext_cli.commands.bench; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mmdet") is None, reason="mmdet is not installed")
def test_cli_times_the_whole_detector():
    tiny = ["--input", "128x128", "--iters", "1", "--warmup", "1", "--threads", "1"]
    result = _invoke("a3", "--part", "detector", *tiny, "--channels-last", "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    # Mask R-CNN around the backbone: FPN and heads add far more parameters than the 8.6 M of the A3 backbone.
    assert row["part"] == "detector" and row["params"] > 20_000_000 and row["median_ms"] > 0


def test_detector_needs_sides_that_are_multiples_of_32():
    result = _invoke("m3", "--part", "detector", "--input", "100x100")
    assert isinstance(result.exception, UsageError)


def test_detector_half_precision_needs_cuda_fp16():
    result = _invoke("m3", "--part", "detector", "--device", "cpu", "--dtype", "bf16", "--input", "128x128")
    assert isinstance(result.exception, UsageError)
    assert "fp16" in str(result.exception)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mmdet") is None, reason="mmdet is not installed")
def test_fast_backbone_inside_the_detector_feeds_fpn_equal_nchw_features():
    from recnext_cli.bench import build_random_detector
    from recnext_cli.fastpath import NchwFeatures

    detector = build_random_detector("a3")
    with torch.no_grad():
        for module in detector.backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    reference = copy.deepcopy(detector)
    detector.backbone = NchwFeatures(prepare_for_inference(detector.backbone, fused=True, channels_last=True))
    images = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference.extract_feat(images)
        features = detector.extract_feat(prepare_input(images, channels_last=True))
    assert len(features) == 5
    # mmcv's CPU RoIAlign reads these as contiguous NCHW.
    assert all(feature.is_contiguous() for feature in features)
    assert _relative_error(features, expected) <= TOLERANCE
