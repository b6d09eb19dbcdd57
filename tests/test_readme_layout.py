"""The README's Layout section names every module and package of recnext_cli/, and nothing that is not there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "recnext_cli"


def layout_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1]


def test_every_top_level_module_and_package_is_in_the_layout():
    block = layout_block()
    entries = [path.name + ("/" if path.is_dir() else "") for path in PACKAGE.iterdir()
               if not path.name.startswith("__") and (path.is_dir() or path.suffix == ".py")]
    missing = [entry for entry in sorted(entries) if not re.search(rf"(?<![\w/.]){re.escape(entry)}", block)]
    assert not missing, f"README's Layout does not mention {missing}"


def test_every_module_the_layout_names_exists():
    block = layout_block()
    top_level = re.findall(r"^  (\S+)", block, flags=re.MULTILINE)  # the entries directly under recnext_cli/
    named = set(top_level) | set(re.findall(r"\b(\w+\.py)\b", block))
    present = {path.name for path in PACKAGE.rglob("*.py")} | {
        path.name + "/" for path in PACKAGE.rglob("*") if path.is_dir()}
    outside = {"mmcv_ops_reference.py"}  # under tests/, named in the tests/ line
    assert not sorted(named - present - outside), "README's Layout names what recnext_cli/ does not hold"
