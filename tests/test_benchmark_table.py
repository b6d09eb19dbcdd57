"""The README's benchmark table is generated from benchmarks/results/ by benchmarks/render_table.py, never typed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from recnext_cli.bench import machine_info, write_result

ROOT = Path(__file__).resolve().parents[1]


def _render_table():
    spec = importlib.util.spec_from_file_location("render_table", ROOT / "benchmarks" / "render_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_table_is_what_the_recorded_results_give():
    render_table = _render_table()
    assert render_table.main(["--check"]) == 0


def _latency_record() -> dict:
    variant = {"fast_path": "BatchNorm folded, channels-last", "dtype": "fp32", "p10_ms": 1.0, "p90_ms": 9.0}
    return {
        "benchmark": "latency", "input": "512x512", "rounds": 3, "threads": 2, "machine": machine_info(2),
        "load_average_after": [0.5, 0.5, 0.5],
        "models": [{
            "model": "m3",
            "variants": {
                "published": {**variant, "median_ms": 157.0, "speedup": 1.0, "max_relative_difference": 0.0},
                "fast": {**variant, "median_ms": 98.0, "speedup": 1.61, "max_relative_difference": 7e-7},
            },
            "fp32_outputs_equal": True, "goal_met": True,
        }],
    }


def test_rendering_writes_the_recorded_figures_between_the_markers(tmp_path):
    render_table = _render_table()
    write_result(tmp_path / "results" / "latency-2-threads.json", _latency_record())
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{render_table.START}\nold typed table\n{render_table.END}\n\nafter\n")
    args = ["--results", str(tmp_path / "results"), "--readme", str(readme)]
    assert render_table.main([*args, "--check"]) == 1
    assert render_table.main(args) == 0
    text = readme.read_text()
    assert "old typed table" not in text and text.startswith("# title") and text.endswith("after\n")
    row = next(line for line in text.splitlines() if "RecNeXt-M3" in line)
    assert "157 → 98 ms (**1.61x**)" in row and "2 thread(s)" in row and "load " in row
    assert render_table.main([*args, "--check"]) == 0
    # The README was replaced through a temporary file, none of which is left behind.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md", "results"]


def _records() -> dict[str, dict]:
    machine = machine_info(1)
    common = {"machine": machine, "load_average_after": [0.5, 0.5, 0.5], "threads": 1}
    return {
        "detector-1-thread.json": {
            **common, "benchmark": "detector", "model": "m3", "input": "800x1344", "rounds": 3,
            "fast_path": "BatchNorm folded", "median_ms": {"eager": 5316.0, "fast": 3720.0},
            "cpu_ms": {"eager": 5300.0, "fast": 3700.0}, "speedup": 1.43, "cpu_speedup": 1.44, "detections": 100,
            "largest_box_difference": 1.2e-4, "masks_differ": 0, "pixels_differ": 0, "goal_met": True,
        },
        "test_loop.json": {
            **common, "benchmark": "test_loop", "images": 64, "rounds": 3,
            "images_per_s": {"plain mmdet": 18.0, "recnext test": 24.6}, "speedup": 1.37, "cpu_speedup": 1.4,
            "metrics": {"bbox_mAP": 0.106}, "metrics_equal": True, "goal_met": True,
        },
        "bf16.json": {
            **common, "benchmark": "bf16", "rounds": 3, "images": 64,
            "metrics": {"fp32": {"bbox_mAP": 0.1061, "segm_mAP": 0.1302},
                        "bf16": {"bbox_mAP": 0.1054, "segm_mAP": 0.1267}},
            "ap_change": {"bbox_mAP": -0.0007, "segm_mAP": -0.0035}, "speedup_test_loop": 1.02,
            "speedup_backbone": 1.2, "backbone_input": [128, 128],
        },
    }


def test_detector_test_loop_and_bf16_rows_carry_their_figures(tmp_path):
    render_table = _render_table()
    for name, record in _records().items():
        write_result(tmp_path / "results" / name, record)
    readme = tmp_path / "README.md"
    readme.write_text(f"{render_table.START}\n{render_table.END}\n")
    assert render_table.main(["--results", str(tmp_path / "results"), "--readme", str(readme)]) == 0
    rows = {line.split("|")[1].strip(): line for line in readme.read_text().splitlines() if line.startswith("| `")}
    detector = rows["`benchmarks/detector.py`"]
    assert "5316 → 3720 ms (**1.43x**; CPU time 1.44x), 100 detections, masks identical" in detector
    test_loop = rows["`benchmarks/test_loop.py`"]
    assert "18.0 → 24.6 images/s (**1.37x**; CPU time 1.40x), all COCO metrics equal" in test_loop
    bf16 = rows["`benchmarks/bf16_accuracy.py`"]
    assert "box AP 0.1061 (bf16 -0.0007), mask AP 0.1302 (bf16 -0.0035)" in bf16
    assert "1.20x (backbone at 128x128)" in bf16
    assert "1 thread(s)" in bf16


def test_a_bf16_run_skipped_for_want_of_the_instructions_says_why(tmp_path):
    render_table = _render_table()
    record = {"benchmark": "bf16", "machine": machine_info(1), "skipped": "--dtype bf16 needs a CPU with avx512_bf16"}
    assert "not measured: --dtype bf16 needs a CPU with avx512_bf16" in render_table.render([record])


def test_a_readme_without_markers_is_refused(tmp_path):
    render_table = _render_table()
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit):
        render_table.main(["--results", str(tmp_path), "--readme", str(readme)])
    assert readme.read_text() == "no markers\n"


def test_every_recorded_result_names_its_machine_and_load():
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        record = json.loads(path.read_text())
        machine = record["machine"]
        assert {"cpu_flags", "threads", "load_average", "torch", "date"} <= machine.keys(), path
