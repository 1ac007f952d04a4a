"""Fault-injection points for the reliability tests: a process told to stop at a known point, so a test can kill it
there with a real signal (as a pre-empted or crashed node would see). Inert unless the variable is set."""

from __future__ import annotations

import os
import time


def fault_point(variable: str, step: int, message: str, until=None) -> None:
    """If `$variable` == str(step): print `message` and block (until `until()` is true, if given, else forever)."""
    if os.environ.get(variable) != str(step):
        return
    print(f"fault injection: {message}", flush=True)
    while until is None or not until():
        time.sleep(0.05)


def fault_flag(variable: str, message: str) -> None:
    """If `$variable` == "1": print `message` and block forever (a point that has no step, such as an export)."""
    fault_point(variable, 1, message)
