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
