"""Regenerate the published-run fixtures in this folder from the upstream files in ../shared/reference.

The tests need only a few facts of the six published RecNeXt Mask R-CNN runs (each ~475 KB mmdet json log) and of
the upstream detection README, so those facts are kept here, small and committed, for the tests to run from a plain
clone:

- recnext_<model>_coco.py: the config text each run logged on its first line, verbatim after one provenance comment;
- val_metrics.json: each run's exp_name and per-epoch validation records, and the SHA-256 of the log they came from;
- readme_table.md: the results table of the upstream README, verbatim.

Run `python tests/data/published/extract.py [REFERENCE_DIR]` to rewrite them, or add `--check` to only compare.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The reference folder sits beside the repository, not inside it: it is not part of a clone.
DEFAULT_REFERENCE = HERE.parents[3] / "shared" / "reference"
MODELS = ("m3", "m4", "m5", "a3", "a4", "a5")
README = "seed-detection-README.md"


def _log_lines(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]


def config_fixture(log: Path) -> str:
    """The run's config text (mmdet's `Config.pretty_text`) under one comment naming where it came from."""
    meta = _log_lines(log)[0]
    return f"# The config text of a published RecNeXt Mask R-CNN run (first line of its log.json, {log.name}).\n" + meta["config"]


def run_record(log: Path) -> dict:
    """What the tests use of one run: its exp_name and validation records, tied to the log by its digest."""
    lines = _log_lines(log)
    return {
        "source": log.name,
        "sha256": hashlib.sha256(log.read_bytes()).hexdigest(),
        "exp_name": lines[0]["exp_name"],
        "val": [line for line in lines if line.get("mode") == "val"],
    }


def readme_table(readme: Path) -> str:
    """The README's first Markdown table, the lines between its header and the first line that is not a row."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].lstrip().startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


def fixtures(reference: Path) -> dict[str, str]:
    """File name in this folder -> its text, all derived from `reference`."""
    logs = {model: reference / f"recnext_{model}_coco.log.json" for model in MODELS}
    out = {f"recnext_{model}_coco.py": config_fixture(log) for model, log in logs.items()}
    runs = {model: run_record(log) for model, log in logs.items()}
    # One run per line: small diffs when a log is republished, and still compact.
    out["val_metrics.json"] = "{\n" + ",\n".join(f"{json.dumps(m)}: {json.dumps(r)}" for m, r in runs.items()) + "\n}\n"
    out["readme_table.md"] = readme_table(reference / README)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", nargs="?", type=Path, default=DEFAULT_REFERENCE)
    parser.add_argument("--check", action="store_true", help="compare with the committed files; write nothing")
    args = parser.parse_args(argv)
    if not args.reference.is_dir():
        print(f"error: {args.reference} is not a folder holding the published logs and README", file=sys.stderr)
        return 2
    stale = []
    for name, text in fixtures(args.reference).items():
        path = HERE / name
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"out of date: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
