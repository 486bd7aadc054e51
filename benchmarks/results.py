"""The one line format by which a benchmark script reports a headline number to run_all.py."""

from __future__ import annotations


def result(what: str, value: float, unit: str, target: str = "-") -> None:
    """Print ``RESULT | what | value | unit | target |`` (target e.g. ``<= 1.5``, ``>= 3`` or ``-``)."""
    print(f"RESULT | {what} | {value:.6g} | {unit} | {target} |", flush=True)
