"""Benchmark of the Gram-space sampler (kernelprop.finite.gram) against the full simulator; prints a
Markdown table.

For a Pre-LN transformer with standard 1/sqrt(d_k) scores (8 heads, ReLU MLP of width 4d, the bundled
``pre_ln`` example) and a deep ReLU MLP, at widths 256-4096 and T = 32-256 tokens: the time of
:func:`kernelprop.montecarlo.simulate` (the floor, its default ``products="auto"``, which already draws each
``X W`` in law when N < fan_in) and of :func:`kernelprop.finite.gram.sample` for the same number of networks
and blocks, both measuring every block (spectral measures off, no Dong residual), and their ratio
``simulate / gram`` (> 1: the Gram sampler is faster).

    python benchmarks/bench_finite.py [--quick]

Timings are minima over repeats; run on an idle machine with ``OPENBLAS_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

from results import best_of, result

import kernelprop as kp
from kernelprop.finite import gram
from kernelprop.montecarlo import simulate

EXAMPLES = Path(kp.__file__).parent / "examples"


def network(name, tokens, depth):
    text = (EXAMPLES / f"{name}.toml").read_text().replace("tokens = 32", f"tokens = {tokens}")
    text = text.replace("tokens = 8", f"tokens = {tokens}")
    text = text.replace('heads = 4, causal = true, scores = "tied"', 'heads = 8, causal = true, scores = "standard"')
    return kp.loads(text, depth=depth)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two widths, two lengths, one repeat (< 60 s)")
    args = ap.parse_args()
    widths = (256, 1024) if args.quick else (256, 1024, 4096)
    lengths = (32, 64) if args.quick else (32, 128, 256)
    repeat = 1 if args.quick else 3
    samples, depth = 4, 2
    print(f"# Gram sampler vs simulate ({platform.processor() or platform.machine()}, {samples} networks, "
          f"{depth} blocks, minimum of {repeat})\n")
    print("| network | width | T | simulate (s) | gram (s) | simulate / gram |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ("pre_ln", "relu_mlp"):
        for t in lengths:
            spec = network(name, t, depth)
            for w in widths:
                if w < t + 1:       # exact inputs need N + 1 features (both methods refuse narrower widths)
                    print(f"| {name} | {w} | {t} | – | – | needs width ≥ {t + 1} |", flush=True)
                    continue
                net, inputs = spec.network, spec.inputs
                ts = best_of(lambda net=net, inputs=inputs, w=w: simulate(
                    net, inputs, w, samples, seed=0, dong=False, spectral=False, keep_kernels=False), repeat)
                tg = best_of(lambda net=net, inputs=inputs, w=w: gram.sample(
                    net, inputs, w, samples, seed=0, batch=samples, spectral=False), repeat)
                print(f"| {name} | {w} | {t} | {ts:.3f} | {tg:.3f} | {ts / tg:.2f} |", flush=True)
                result(f"simulate / Gram sampler, {name}, width {w}, T = {t}", ts / tg, "ratio")


if __name__ == "__main__":
    main()
