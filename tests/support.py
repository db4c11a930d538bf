"""Small helpers shared by the test modules."""

from __future__ import annotations

import time


def wait_for(check, timeout=60.0, what="condition"):
    """Polls `check` (a wait, not a timed assertion: the timeout only bounds a hang)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)
