"""`recnext bench latency` and the inference fast path: equal outputs, timing statistics, FLOP counts, CLI, plot."""

from __future__ import annotations

import copy
import dataclasses
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
    machine_info,
    parse_input_size,
    percentile,
    plot_ap_vs_latency,
    random_backbone,
    speedup_in_turns,
    time_calls,
    time_in_turns,
    untimed_calls,
    write_result,
)
from recnext_cli.cli import app
from recnext_cli.errors import EnvironmentProblem, UnknownModelError, UsageError
from recnext_cli.fastpath import (
    BF16_CPU_FLAGS,
    PUBLISHED,
    ChannelsLastLinearAttention,
    ChannelsLastRecAttn,
    FastPath,
    FusedDownsample,
    FusedResidualBlock,
    FusedStem,
    OneDnnConv,
    SplitChannelDoublingConv,
    choose_fast_path,
    cpu_flags,
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


ONEDNN = torch.backends.mkldnn.is_available()
FAST_PATHS = {
    "default": choose_fast_path("cpu"),
    "folded": FastPath(channels_last=False),
    "folded+channels-last": FastPath(),
    "channels-last": FastPath(fold_batchnorm=False),
}


# 64x64 halves exactly at every level; 80x80 reaches a 5x5 map whose 3x3 half is no exact 2x (the fallback path).
@pytest.mark.parametrize("size", [64, 80])
@pytest.mark.parametrize("name", ["m3", "a3"])
def test_fast_path_outputs_equal_the_published_model(name, size):
    reference = random_backbone(name)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference(images)
    for label, plan in FAST_PATHS.items():
        fast = prepare_for_inference(copy.deepcopy(reference), plan, device="cpu")
        with torch.inference_mode():
            outputs = fast(prepare_input(images, plan))
        assert [o.shape for o in outputs] == [e.shape for e in expected], label
        assert _relative_error(outputs, expected) <= TOLERANCE, label


@pytest.mark.skipif(not ONEDNN, reason="torch without oneDNN")
def test_the_default_cpu_fast_path_is_the_fused_channels_last_one_and_says_so():
    plan = choose_fast_path("cpu")
    assert plan == FastPath(channels_last=True, onednn_fusion=True, detector_heads=True)
    assert "channels-last" in plan.describe() and "GELU" in plan.describe() and "RoIAlign" in plan.describe()
    assert choose_fast_path("cpu", fused=False) == PUBLISHED
    assert "published" in PUBLISHED.describe()
    # Inductor cannot trace the oneDNN fusion kernels and fuses on its own.
    assert choose_fast_path("cpu", compile=True) == FastPath(compile=True, detector_heads=True)
    # CUDA, as timed on an H100 (benchmarks/cuda_fastpath.py): NCHW in eager mode, channels-last in CUDA graphs.
    assert choose_fast_path("cuda") == FastPath(channels_last=False)
    assert choose_fast_path("cuda", compile=True) == FastPath(channels_last=True, compile=True)
    with pytest.raises(ValueError):
        FastPath(fold_batchnorm=False, onednn_fusion=True)


@pytest.mark.skipif(not ONEDNN, reason="torch without oneDNN")
def test_prepacked_weights_stay_correct_when_the_input_size_changes():
    reference = random_backbone("a3")
    plan = choose_fast_path("cpu")
    fast = prepare_for_inference(copy.deepcopy(reference), plan)
    with torch.inference_mode():
        for height, width in ((64, 64), (96, 64), (64, 128)):
            images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(height + width))
            assert _relative_error(fast(prepare_input(images, plan)), reference(images)) <= TOLERANCE


def test_random_backbone_has_batchnorms_that_are_not_the_identity():
    norms = [m for m in random_backbone("m3").modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all((m.running_var != 1).all() and (m.running_mean != 0).all() for m in norms)


@pytest.mark.skipif(not ONEDNN, reason="torch without oneDNN")
@pytest.mark.parametrize("name", ["m3", "a3"])
def test_fast_path_rewrites_the_model(name):
    # Equal outputs prove nothing if nothing was rewritten: check the rewrites happened.
    fast = prepare_for_inference(random_backbone(name), choose_fast_path("cpu"), device="cpu")
    kinds = {type(module) for module in fast.modules()}
    assert nn.BatchNorm2d not in kinds and nn.GELU not in kinds
    assert {FusedResidualBlock, FusedDownsample, FusedStem, OneDnnConv, SplitChannelDoublingConv} <= kinds
    # Every 1x1 convolution runs with its GELU or residual add fused, or as a grouped oneDNN convolution.
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in fast.modules())
    if name == "a3":
        assert {ChannelsLastLinearAttention, ChannelsLastRecAttn} <= kinds and LinearAttention not in kinds
    weight = next(m.weight for m in fast.modules() if isinstance(m, nn.Conv2d))
    assert weight.is_contiguous(memory_format=torch.channels_last)


def test_unfused_fast_path_without_channels_last_is_the_published_model():
    reference = random_backbone("m3")
    plain = prepare_for_inference(copy.deepcopy(reference), PUBLISHED, device="cpu")
    assert [type(m) for m in plain.modules()] == [type(m) for m in reference.modules()]


def test_warm_up_covers_what_a_prepared_model_does_once():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # CUDA graphs: compile on call 1, record on call 2, replay from call 3 on; none of that may be timed.
    assert untimed_calls(FastPath(compile=True), cuda, warmup=0) == 3
    assert untimed_calls(FastPath(compile=True), cpu, warmup=0) == 1
    assert untimed_calls(FastPath(channels_last=True, onednn_fusion=True), cpu, warmup=0) == 1
    assert untimed_calls(PUBLISHED, cpu, warmup=0) == 0
    assert untimed_calls(FastPath(compile=True), cuda, warmup=10) == 10


@pytest.mark.skipif(not ONEDNN, reason="torch without oneDNN")
def test_no_one_time_work_is_left_for_the_first_timed_call():
    plan = choose_fast_path("cpu")
    fast = prepare_for_inference(random_backbone("m3"), plan)
    images = prepare_input(torch.randn(1, 3, 64, 64), plan)
    convs = [m for m in fast.modules() if isinstance(m, OneDnnConv)]
    assert convs and all(conv.packed is None for conv in convs)
    with torch.inference_mode():
        time_calls(lambda: fast(images), warmup=untimed_calls(plan, torch.device("cpu"), warmup=0), iters=0)
    assert all(conv.packed is not None and conv.packed.is_mkldnn for conv in convs)


@pytest.mark.slow
# The smallest size of each series: the same blocks as the detection sizes (recursive convolutions; linear
# attention), in a graph that Inductor compiles in a fraction of the time.
@pytest.mark.parametrize("name", ["m0", "a0"])
def test_compiled_fast_path_outputs_equal_the_published_model(name):
    reference = random_backbone(name)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    plan = choose_fast_path("cpu", compile=True)
    fast = prepare_for_inference(copy.deepcopy(reference), plan, device="cpu")
    with torch.inference_mode():
        expected = reference(images)
        outputs = fast(prepare_input(images, plan))
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


def test_time_in_turns_calls_each_run_once_a_round_and_ratios_pair_rounds():
    order = []
    clock = _fake_clock([0.010, 0.030, 0.020, 0.040, 0.010, 0.020])  # a, b per timed round
    measured = time_in_turns({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, warmup=1, rounds=3,
                             clock=clock)
    assert order == ["a", "b"] * 4  # the warm-up round is not timed, so the fake clock is not read there...
    assert measured["a"] == pytest.approx([0.010, 0.020, 0.010]) and measured["b"] == pytest.approx([0.030, 0.040,
                                                                                                     0.020])
    # ...and each ratio pairs one round's two calls: 1/3, 1/2, 1/2.
    assert speedup_in_turns(measured["a"], measured["b"]) == pytest.approx(0.5)


def test_time_in_turns_drops_a_failing_run_when_asked_and_stops_at_the_deadline():
    calls = {"good": 0, "bad": 0}

    def bad():
        calls["bad"] += 1
        raise RuntimeError("no kernel")

    failures = []
    rounds_left = iter([True, True, True, False])
    measured = time_in_turns({"good": lambda: calls.__setitem__("good", calls["good"] + 1), "bad": bad}, warmup=0,
                             rounds=10, keep_going=lambda: next(rounds_left),
                             on_error=lambda label, error: failures.append((label, str(error))))
    assert calls == {"good": 3, "bad": 1} and len(measured["good"]) == 3 and measured["bad"] == []
    assert failures == [("bad", "no kernel")]
    with pytest.raises(RuntimeError, match="no kernel"):
        time_in_turns({"bad": bad}, warmup=0, rounds=1)


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
    result = _invoke("m3", "a3", *TINY, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [row["model"] for row in rows] == ["m3", "a3"]
    m3, a3 = rows
    assert m3["params"] == count_parameters(build_recnext("m3"))
    assert m3["reported_bbox_mAP"] == 0.417 and m3["reported_latency_ms"] == 5.2
    assert a3["reported_bbox_mAP"] == 0.421 and a3["reported_latency_ms"] == 8.4
    for row in rows:
        # A backbone alone has no Mask R-CNN heads: the rewrites named are the backbone's only.
        backbone_path = dataclasses.replace(choose_fast_path("cpu"), detector_heads=False).describe()
        assert row["input_size"] == [64, 64] and row["fused"] and row["fast_path"] == backbone_path
        assert "Mask R-CNN" not in row["fast_path"]
        assert 0 < row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["throughput_img_s"] == pytest.approx(1000 / row["median_ms"])
        assert row["gflops"] == pytest.approx(2 * row["gmacs"]) and row["gflops"] > 0


def test_cli_json_is_a_versioned_document_in_the_shared_units():
    result = _invoke("m0", "m3", *TINY, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert (document["schema"], document["schema_version"]) == ("recnext.bench", 1)
    assert list(document) == ["schema", "schema_version", "rows"]
    m0, m3 = document["rows"]
    assert {"model", "title", "part", "device", "input_size", "fast_path", "median_ms", "p10_ms", "p90_ms", "mean_ms",
            "throughput_img_s", "params", "gflops", "gmacs", "reported_latency_ms", "reported_bbox_mAP",
            "top_operators"} <= set(m3)
    # AP a fraction under mmdet's name (the README's 41.7 percent), not the percent of the Markdown table.
    assert "reported_box_ap" not in m3 and m3["reported_bbox_mAP"] == 0.417
    assert m0["reported_bbox_mAP"] is None and m0["reported_latency_ms"] is None
    # Durations in milliseconds: a 64x64 backbone call takes well under a second, and more than a microsecond.
    assert 0.001 < m3["median_ms"] < 1000


def test_cli_markdown_table_shows_reported_numbers():
    result = _invoke("a3", *TINY, "--no-fused")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| Model | Params (M) | GFLOPs | Median (ms)")
    row = lines[2].split(" | ")
    assert row[0] == "| RecNeXt-A3" and row[-2:] == ["8.4ms", "42.1 |"]
    assert "published eager model" in result.stdout


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
    probe = torch.ones(1, 1, 1, 1, dtype=torch.float16)
    try:
        torch.mkldnn_convolution(probe, probe, None, [0, 0], [1, 1], [1, 1], 1)
    except RuntimeError:
        with pytest.raises(UsageError):
            resolve_dtype("fp16", device)
    else:
        assert resolve_dtype("fp16", device) is torch.float16


def test_bf16_on_cpu_needs_the_bf16_instructions():
    device = torch.device("cpu")
    if BF16_CPU_FLAGS & cpu_flags() and ONEDNN:
        assert resolve_dtype("bf16", device) is torch.bfloat16
    else:
        with pytest.raises(UsageError, match="avx512_bf16 or AMX"):
            resolve_dtype("bf16", device)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_machine_info_for_benchmark_records(tmp_path):
    info = machine_info(threads=1)
    assert info["threads"] == 1 and len(info["load_average"]) == 3 and info["torch"] == torch.__version__
    if info["machine"] == "x86_64":
        assert "avx2" in info["cpu_flags"] or "sse4_2" in info["cpu_flags"]
    path = write_result(tmp_path / "results" / "x.json", {"machine": info})
    assert json.loads(path.read_text())["machine"] == info
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_cli_profile_lists_the_top_operators():
    result = _invoke("m3", *TINY, "--profile", "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["rows"]
    operators = row["top_operators"]
    assert 0 < len(operators) <= 15 and all(op["ms_per_call"] > 0 for op in operators)
    assert any("conv" in op["name"] for op in operators)
    assert sum(op["share"] for op in operators) <= 1.0 + 1e-9
    table = _invoke("m3", *TINY, "--profile").stdout
    assert "Top operators of RecNeXt-M3" in table


def test_cli_writes_a_plot(tmp_path):
    plot = tmp_path / "plots" / "ap_vs_latency.png"
    tiny = ["--input", "64x64", "--iters", "1", "--warmup", "0", "--threads", "1"]
    result = _invoke("m3", "a3", *tiny, "--plot", str(plot))
    assert result.exit_code == 0, result.output
    data = plot.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def _result(model, box_ap, median_ms):
    stats = LatencyStats(median_ms, median_ms * 0.9, median_ms * 1.1, median_ms, 5)
    return BenchResult(
        model, f"RecNeXt-{model.upper()}", BenchConfig(), "fast", stats, 1000 / median_ms, 1, 2, None, box_ap
    )


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
    result = _invoke("a3", "--part", "detector", *tiny, "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["rows"]
    # Mask R-CNN around the backbone: FPN and heads add far more parameters than the 8.6 M of the A3 backbone.
    assert row["part"] == "detector" and row["params"] > 20_000_000 and row["median_ms"] > 0


def test_detector_needs_sides_that_are_multiples_of_32():
    result = _invoke("m3", "--part", "detector", "--input", "100x100")
    assert isinstance(result.exception, UsageError)


def test_detector_fp16_needs_cuda():
    result = _invoke("m3", "--part", "detector", "--device", "cpu", "--dtype", "fp16", "--input", "128x128")
    assert isinstance(result.exception, UsageError)
    assert "fp16" in str(result.exception)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mmdet") is None, reason="mmdet is not installed")
def test_fast_backbone_inside_the_detector_feeds_fpn_equal_features_in_the_layout_its_roi_align_reads():
    from recnext_cli.bench import build_random_detector
    from recnext_cli.fast_detector import ChannelsLastRoIExtractor
    from recnext_cli.fastpath import speed_up_detector

    reference = build_random_detector("a3")
    with torch.no_grad():
        for module in reference.backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    images = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference.extract_feat(images)
    plan = choose_fast_path("cpu")
    # With its heads rewritten the detector reads channels-last maps; without, mmcv's CPU RoIAlign reads them as
    # contiguous NCHW, whatever their strides say.
    for heads, layout in ((True, torch.channels_last), (False, torch.contiguous_format)):
        detector = speed_up_detector(copy.deepcopy(reference), dataclasses.replace(plan, detector_heads=heads))
        assert isinstance(detector.roi_head.bbox_roi_extractor, ChannelsLastRoIExtractor) == heads
        with torch.inference_mode():
            features = detector.extract_feat(prepare_input(images, plan))
        assert len(features) == 5
        assert all(feature.is_contiguous(memory_format=layout) for feature in features[:4]), heads
        assert _relative_error(features, expected) <= TOLERANCE
