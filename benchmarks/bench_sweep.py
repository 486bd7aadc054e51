"""Batched sweeps against one propagation per grid point.

Usage: python benchmarks/bench_sweep.py [--quick]

The README's depth-µP phase diagram (``kernelprop sweep --preset depth_mup --param L=1:1000:20:log
--param a=0.1:10:20:log``: Pre-LN with branch weights a/sqrt(L), T = 32, every (a, L) its own network)
is swept twice in one process: batched (the default, ``sweep(...)``: the networks of one structure run as
one vectorised propagation, each leaving at its own depth) and per point (``sweep(..., batch=False)``, the
previous path: one ``propagate`` per network). Prints the seconds of each, their ratio and the largest
relative difference of the grids (the results must agree to 1e-12). A second row does the same with tied
attention scores (one softmax matrix per member). ``--quick``: a 10 × 10 grid up to L = 300.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))   # this checkout's kernelprop

from results import result  # noqa: E402  (the line format of benchmarks/run_all.py)

from kernelprop import models  # noqa: E402
from kernelprop.sweep import parse_param, sweep  # noqa: E402

MEASURES = ["cos_mean", "q_mean", "stable_rank"]


def timed(fn):
    """``((wall seconds, CPU seconds of this process), result)``: on a shared machine the CPU time is the
    closer estimate of the idle wall time."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - t0, time.process_time() - c0), out


def row(label, scores, params, headline=False):
    options = models.PresetOptions(scores=scores)
    model, x, depth = models.sweep_model(preset_name="depth_mup", options=options)
    grid = dict(parse_param(p)[:2] for p in params)
    (batched_s, batched_cpu), batched = timed(lambda: sweep(model, x, grid, measure=MEASURES, depth=depth))
    (single_s, single_cpu), single = timed(lambda: sweep(model, x, grid, measure=MEASURES, depth=depth,
                                                         batch=False))
    diff = max(float(np.nanmax(np.abs(batched[m] - single[m]) / np.abs(single[m]))) for m in MEASURES)
    points = int(np.prod([len(v) for v in grid.values()]))
    print(f"| {label} | {points} | {batched.runs} | {single_s:.2f} ({single_cpu:.2f}) | {batched_s:.2f} "
          f"({batched_cpu:.2f}) | {single_s / batched_s:.1f} | {diff:.1e} |")
    return batched_s, single_s / batched_s, diff


def main(quick: bool):
    params = ("L=1:300:10:log", "a=0.1:10:10:log") if quick else ("L=1:1000:20:log", "a=0.1:10:20:log")
    print(f"numpy {np.__version__}; depth_mup sweep {' '.join(params)}, T = 32, measures {MEASURES}\n")
    print("| attention | grid points | runs | per point: wall (CPU) s | batched: wall (CPU) s | per point / batched "
          "| max rel. diff |")
    print("|---|---|---|---|---|---|---|")
    seconds, ratio, diff = row("zero-score (uniform), causal", "uniform", params)
    tied = row("tied scores, causal", "tied", params)
    print()
    grid = "10x10 (quick)" if quick else "20x20"
    result(f"depth-muP {grid} sweep, batched", seconds, "s", "<= 3" if not quick else "-")
    result(f"depth-muP {grid} sweep, per point / batched", ratio, "x")
    result(f"depth-muP {grid} sweep, tied scores, per point / batched", tied[1], "x")
    result("batched vs per point, largest relative difference", max(diff, tied[2]), "rel", "<= 1e-12")


if __name__ == "__main__":
    main("--quick" in sys.argv[1:])
