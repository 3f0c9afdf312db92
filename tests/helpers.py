"""Helpers shared by test modules (fixtures live in conftest.py files)."""

from __future__ import annotations

import time


def wait_until(page, expression: str, timeout: float = 30.0, interval: float = 0.2):
    """Poll a JavaScript expression in the page until it is truthy; returns its value.

    Playwright's `wait_for_function` evaluates its predicate with `eval` inside the page, which the
    app's Content-Security-Policy (no unsafe-eval) forbids; `page.evaluate` goes through the
    DevTools protocol and is not subject to it.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(expression)
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"still false after {timeout:.0f} s: {expression}")
        time.sleep(interval)
