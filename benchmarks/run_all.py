"""Run every benchmark of this folder and print one table of its headline ratios against their targets.

Usage: python benchmarks/run_all.py [--quick] [--only NAME[,NAME…]]

(bench_neural_tangents creates its own environment with JAX and Neural Tangents on first run.)

Each script prints, besides its own tables, lines of the form
``RESULT | <what> | <value> | <unit> | <target> |`` (:func:`results.result`; target like ``<= 1.5``,
``>= 3`` or ``-``); this driver runs the scripts one after another (never in parallel: they time
themselves), collects those lines and prints them as one Markdown table with a met/missed column — the
README's speed table.
"""

from __future__ import annotations

import argparse
import operator
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("bench_imports", "bench_quadrature", "bench_propagate", "bench_sweep", "bench_montecarlo", "bench_standard",
           "bench_finite", "bench_neural_tangents")
OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


def parse(line: str):
    """``(what, value, unit, target)`` from a line printed by :func:`results.result`, else None."""
    parts = [p.strip() for p in line.split("|")]
    if len(parts) < 5 or parts[0] != "RESULT":
        return None
    _, what, value, unit, target = parts[:5]
    return what, float(value), unit, target


def verdict(value: float, target: str) -> str:
    for op in ("<=", ">=", "<", ">"):
        if target.startswith(op):
            return "met" if OPS[op](value, float(target[len(op):])) else "missed"
    return ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="each script's quick mode")
    p.add_argument("--only", default="", help="comma-separated script names (without .py)")
    a = p.parse_args()
    names = [n for n in (a.only.split(",") if a.only else SCRIPTS) if (HERE / f"{n}.py").exists()]
    rows = []
    for name in names:
        t0 = time.perf_counter()
        cmd = [sys.executable, str(HERE / f"{name}.py"), *(["--quick"] if a.quick else [])]
        res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        took = time.perf_counter() - t0
        print(f"## {name} ({took:.0f} s, exit {res.returncode})\n\n{res.stdout}", flush=True)
        if res.returncode:
            print(res.stderr[-2000:], file=sys.stderr)
        for line in res.stdout.splitlines():
            row = parse(line)
            if row:
                rows.append((name, *row))
    print(f"## Summary ({platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()})\n")
    print("| benchmark | measured | value | unit | target | |")
    print("|---|---|---:|---|---|---|")
    for name, what, value, unit, target in rows:
        print(f"| {name} | {what} | {value:.4g} | {unit} | {target} | {verdict(value, target)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
