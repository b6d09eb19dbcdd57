"""The stack's known import-time messages stay off the console; other warnings still show."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from recnext_cli import noise

pytest.importorskip("mmcv", reason="needs the mmdet stack (make setup)")


def _stderr_of(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


def test_importing_mmcv_and_mmdet_is_silent_once_silenced():
    loud = _stderr_of("import mmcv.ops")
    assert "MMCV will release v2.0.0" in loud  # the message is real: without silence() it shows
    quiet = _stderr_of("from recnext_cli import noise; noise.silence(); import mmcv.ops")
    assert quiet == ""


def test_unknown_warnings_still_show():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        noise.silence()
        warnings.warn("On January 1, 2023, MMCV will release v2.0.0, in which ...", UserWarning)
        warnings.warn("something else entirely", UserWarning)
    assert [str(warning.message) for warning in caught] == ["something else entirely"]
