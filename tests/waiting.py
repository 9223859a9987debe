"""Polling for the fault and pipeline tests: wait for a condition on a live Ray/Redis system."""

from __future__ import annotations

import time

import pytest


def wait_until(predicate, timeout: float = 120.0) -> None:
    """Poll `predicate` every 0.1 s; fail the test when it is still false after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        time.sleep(0.1)
