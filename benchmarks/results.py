"""What every benchmark script shares: the smallest time of repeated calls, and the one line format by which
a script reports a headline number to run_all.py."""

from __future__ import annotations

import time


def best_of(fn, repeat: int = 3, *, warm: bool = False, clock=time.perf_counter) -> float:
    """The smallest time of ``repeat`` calls of ``fn`` by ``clock`` (the least disturbed by other processes);
    ``warm``: one untimed call first."""
    if warm:
        fn()
    out = float("inf")
    for _ in range(repeat):
        t0 = clock()
        fn()
        out = min(out, clock() - t0)
    return out


def result(what: str, value: float, unit: str, target: str = "-") -> None:
    """Print ``RESULT | what | value | unit | target |`` (target e.g. ``<= 1.5``, ``>= 3`` or ``-``)."""
    print(f"RESULT | {what} | {value:.6g} | {unit} | {target} |", flush=True)
