"""Polling for a condition in tests that watch other processes (sweep workers, Slurm jobs)."""

import time
from collections.abc import Callable

import pytest


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 240.0,
               explain: Callable[[], str] = lambda: "") -> None:
    """Poll `condition` every 0.2 s; fail the test after `timeout` seconds, naming `what` and
    adding `explain()` (such as the Slurm queue)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:.0f} s for {what}{explain()}")
        time.sleep(0.2)
