"""Time per layer of the numeric engine against the bare matrix products it needs.

Usage: python benchmarks/bench_propagate.py [--quick] [--threads N]

The floor: a bare loop of ``S = A @ S @ A.T`` on a fixed dense row-stochastic A (two T×T products per
layer, what dense attention cannot avoid). Each network is propagated through ``depth`` blocks twice:

* measures off: ``keep_kernels=False, measures=()``, recording only the last block;
* measures on: the defaults of ``kernelprop run`` (every block recorded, every measure, spectra up to
  512 tokens).

Networks: Residual(Attention) with uniform, causal uniform and tied (dense, causal and bidirectional)
scores, and the pre_ln preset (attention + ReLU MLP, each in a Pre-LN residual) with tied scores.
Every timing and the floor run with the same BLAS thread count (``--threads``, default 1: the machine is
shared). The ratios ``engine / floor`` per layer are the numbers to read; a second table shows BLAS's
1-thread and all-core time for one product (the crossover of kernelprop.kernel.threads.PARALLEL_TOKENS),
and a third the issue-14 run (pre_ln, T = 256, every block recorded) with the measures asked by name.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from results import best_of, result  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

import kernelprop as kp  # noqa: E402
from kernelprop import inputs as I  # noqa: E402
from kernelprop.kernel.threads import cores  # noqa: E402
from kernelprop.methods.presets import build  # noqa: E402
from kernelprop.network.layers import Attention, Network, Residual  # noqa: E402

CLOCK = time.perf_counter


def best(fn, repeat=3):
    """:func:`results.best_of` by the current :data:`CLOCK`."""
    return best_of(fn, repeat, clock=CLOCK)


def bare(t, depth, repeat):
    rng = np.random.default_rng(0)
    a = rng.random((t, t))
    a /= a.sum(1, keepdims=True)

    def go():
        s = np.eye(t)
        for _ in range(depth):
            s = a @ s @ a.T
            s /= s[0, 0]
    return best(go, repeat) / depth


def network(kind, depth):
    if kind == "pre_ln (tied)":
        return build("pre_ln", depth, scores="tied", heads=1)
    attn = {"uniform": {}, "causal uniform": {"causal": True}, "tied causal": {"scores": "tied", "causal": True},
            "tied bidirectional": {"scores": "tied"}}[kind]
    return Network(block=[Residual(Attention(**attn), beta="1/sqrt(L)")], depth=depth)


KINDS = ("uniform", "causal uniform", "tied causal", "tied bidirectional", "pre_ln (tied)")


def engine(kind, t, depth, threads, measures_on, repeat):
    net = network(kind, depth)
    x = I.equicorrelated(t, 1.0, 0.1)
    if measures_on:
        run = lambda: kp.propagate(net, x, keep_kernels=False, threads=threads)
    else:
        run = lambda: kp.propagate(net, x, every=depth, keep_kernels=False, measures=(), threads=threads)
    run()   # warm: caches, imports
    return best(run, repeat) / depth


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T = 64, 256, 1024 with fewer layers (< 60 s)")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads for the engine and the floor")
    ap.add_argument("--wall", action="store_true", help="wall-clock times (default with --threads 1: the process's "
                    "CPU time, which other processes on a shared machine disturb less)")
    args = ap.parse_args()
    global CLOCK
    cpu = args.threads == 1 and not args.wall
    CLOCK = time.process_time if cpu else time.perf_counter
    sizes = (64, 256, 1024) if args.quick else (64, 256, 1024, 2048)
    repeat = 2 if args.quick else 3
    load = os.getloadavg()[0]
    print(f"numpy {np.__version__}; {cores()} cores, load average {load:.2f} at start; BLAS threads {args.threads}; "
          f"{'CPU' if cpu else 'wall-clock'} time")
    print("ms per layer; ratio = engine / bare floor (measures off | on)\n")
    print("| T | depth | bare A@S@A.T | " + " | ".join(KINDS) + " |")
    print("|---|---|---|" + "---|" * len(KINDS))
    with threadpool_limits(args.threads, user_api="blas"):
        for t in sizes:
            budget = 0.4 if args.quick else 2.0            # seconds of floor work per configuration
            floor1 = bare(t, 3, 1)
            depth = int(max(4, min(400, budget / max(floor1, 1e-6))))
            if t >= 1024:
                depth = min(depth, 6 if args.quick else 12)
            b = bare(t, depth, repeat)
            cells, heads = [], []
            for kind in KINDS:
                off = engine(kind, t, depth, args.threads, False, repeat)
                if kind in ("tied causal", "tied bidirectional", "pre_ln (tied)"):
                    heads.append((f"{kind} / bare A S Aᵀ per layer, T = {t}, measures off", off / b))
                on = engine(kind, t, depth, args.threads, True, 1) if t <= 1024 or not args.quick else np.nan
                cells.append(f"{1e3 * off:.3g} ({off / b:.2f}×) | {1e3 * on:.3g} ({on / b:.2f}×)"
                             .replace(" | ", " ‖ "))
            print(f"| {t} | {depth} | {1e3 * b:.3g} | " + " | ".join(cells) + " |", flush=True)
            for what, ratio in heads:
                result(what, ratio, "×", "<= 1.5")
    CLOCK = time.perf_counter       # threads compete for the machine: wall clock from here on
    print("\nBLAS threads: one T×T product, wall-clock ms (1 thread | all cores)\n")
    print("| T | 1 | " + f"{cores()} |")
    print("|---|---|---|")
    for t in (64, 256, 512, 1024):
        a = np.random.default_rng(1).random((t, t))
        n = max(2, int(2e8 / t ** 3))
        row = []
        for th in (1, cores()):
            with threadpool_limits(th, user_api="blas"):
                row.append(best(lambda: [a @ a for _ in range(n)], repeat) / n)  # noqa: B023
        print(f"| {t} | {1e3 * row[0]:.3g} | {1e3 * row[1]:.3g} |", flush=True)
    depth = 60 if args.quick else 1000
    print(f"\nissue 14: pre_ln, T = 256, {depth} blocks, every block recorded (default threads), wall-clock s\n")
    print("| measures | s | per block ms |")
    print("|---|---|---|")
    net, x = build("pre_ln", depth), I.equicorrelated(256, 1.0, 0.1)
    for label, names in (("all (default)", None), ("cos_mean,rank_one_distance", ("cos_mean", "rank_one_distance")),
                         ("none", ())):
        s = best(lambda: kp.propagate(net, x, keep_kernels=False, measures=names), 1)  # noqa: B023
        print(f"| {label} | {s:.3g} | {1e3 * s / depth:.3g} |", flush=True)
        result(f"pre_ln T = 256, every block recorded, measures {label}", 1e3 * s / depth, "ms per block")


if __name__ == "__main__":
    main()
