"""Checks every test gets for free: none may leave a distributed job's variables behind in this process."""

from __future__ import annotations

import os

import pytest

from recnext_cli.runners import TORCHRUN_VARIABLES


@pytest.fixture(autouse=True)
def _no_job_variables_leak():
    # A leaked RANK/WORLD_SIZE reaches every worker a later test starts, which then waits for ranks that never come.
    before = {name: os.environ.get(name) for name in TORCHRUN_VARIABLES}
    yield
    after = {name: os.environ.get(name) for name in TORCHRUN_VARIABLES}
    leaked = {name: value for name, value in after.items() if value != before[name]}
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    assert not leaked, f"the test changed {leaked} in os.environ and did not put them back"
