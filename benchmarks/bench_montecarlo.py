"""Benchmark of the Monte Carlo sampler (kernelprop.montecarlo); prints Markdown tables.

1. A forward pass against a bare numpy chain of the same matrix products: every ``np.matmul`` of
   one forward pass is recorded (operand shapes) and replayed on preallocated random arrays; the
   ratio ``forward / chain`` is the overhead of everything else (random numbers, softmax, norms,
   activations). Both product modes: ``explicit`` weight matrices, and ``auto`` (each ``X W`` drawn
   in law from the QR of X when N < fan_in, :func:`kernelprop.montecarlo.sampler.project`).
2. Seeds batched (one stacked forward pass) against looped (one seed at a time).
3. With ``--false-alarm R``: the measured false-alarm rate of ``check`` (R independent repetitions
   per configuration, theory correct by construction of the comparison).

    python benchmarks/bench_montecarlo.py [--quick] [--false-alarm 200]

Run it on an idle machine (``OPENBLAS_NUM_THREADS`` unset or 1): the timings are minima over repeats.
"""

from __future__ import annotations

import argparse
import math
import platform
from pathlib import Path

import numpy as np
from results import best_of, result

import kernelprop as kp
from kernelprop import montecarlo as mc
from kernelprop.montecarlo import sampler as S

EXAMPLES = Path(kp.__file__).parent / "examples"


def forward_pass(network, inputs, width, seeds, products, seed=0):
    """One batched forward pass (no measurements), as :func:`simulate` runs it."""
    gens = [np.random.default_rng([seed, i]) for i in range(seeds)]
    ctx = S.Context(gens, width, inputs.segments, products=products)
    x = S.sample_inputs(inputs, width, gens, "exact")
    for section, l, layer in network.layers():
        parts = layer.layers if section == "block" else (layer,)
        for part in parts:
            x = S.forward(part, x, ctx)
    return x


class _Recorder:
    """Stands in for numpy inside the sampler module and records the shapes of every matmul."""

    def __init__(self):
        self.shapes = []

    def __getattr__(self, name):
        return getattr(np, name)

    def matmul(self, a, b, *args, **kw):
        self.shapes.append((a.shape, b.shape))
        return np.matmul(a, b, *args, **kw)


def matmul_shapes(network, inputs, width, seeds, products):
    rec = _Recorder()
    saved = S.np
    S.np = rec
    try:
        forward_pass(network, inputs, width, seeds, products)
    finally:
        S.np = saved
    return rec.shapes


def bare_chain(shapes):
    rng = np.random.default_rng(0)
    ops = [(rng.standard_normal(a), rng.standard_normal(b)) for a, b in shapes]
    return lambda: [np.matmul(a, b) for a, b in ops]


def hand_chain(shapes, seeds):
    """The chain a user writes by hand: every seed-stacked weight operand drawn fresh (one generator per
    seed, ``standard_normal``), then the product; the other operands preallocated."""
    rng = np.random.default_rng(0)
    gens = [np.random.default_rng(i) for i in range(seeds)]
    ops = [(rng.standard_normal(a), b, len(b) == 3 and len(a) == 3 and b[0] == seeds) for a, b in shapes]
    fixed = [None if w else rng.standard_normal(b) for _, b, w in ops]

    def go():
        for (a, b, w), f in zip(ops, fixed):
            m = np.stack([g.standard_normal(b[1:]) for g in gens]) if w else f
            np.matmul(a, m)
    return go


def table_forward(cases, repeat):
    """Forward pass vs its own matmul chain, vs the explicit network's chain, and the RNG share."""
    lines = ["| network | N | d | seeds | products | forward (s) | its matmuls (s) | ratio | "
             "explicit matmuls (s) | forward / explicit matmuls | Gaussian draws (s) | hand-written chain (s) | "
             "forward / hand-written |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, depth, width, seeds in cases:
        spec = kp.load(EXAMPLES / f"{name}.toml", depth=depth)
        chains = {}
        for products in ("explicit", "auto"):
            shapes = matmul_shapes(spec.network, spec.inputs, width, seeds, products)
            chains[products] = (shapes, best_of(bare_chain(shapes), repeat, warm=True))
        t_hand = best_of(hand_chain(chains["explicit"][0], seeds), repeat, warm=True)
        for products in ("explicit", "auto"):
            shapes, t_chain = chains[products]
            t_fwd = best_of(lambda: forward_pass(spec.network, spec.inputs, width, seeds, products), repeat, warm=True)
            # random numbers: weight operands (3-D, seed-stacked) of explicit products, N×fan_out draws in law
            draws = sum(math.prod(b) if len(b) == 3 and len(a) == 3 and a[0] == seeds else 0 for a, b in shapes)
            gens = [np.random.default_rng(i) for i in range(seeds)]
            t_rng = best_of(lambda: S._fill(gens, (draws // seeds,), "standard_normal"), repeat, warm=True)
            t_exp = chains["explicit"][1]
            result(f"Monte Carlo forward / hand-written numpy chain ({name}, d = {width}, {seeds} seeds batched, "
                   f"{products})", t_fwd / t_hand, "ratio", "<= 1.2")
            lines.append(f"| {name} L={depth} | {spec.inputs.n_tokens} | {width} | {seeds} | {products} | "
                         f"{t_fwd:.3f} | {t_chain:.3f} | {t_fwd / t_chain:.2f} | {t_exp:.3f} | {t_fwd / t_exp:.2f} | "
                         f"{t_rng:.3f} | {t_hand:.3f} | {t_fwd / t_hand:.2f} |")
    return "\n".join(lines)


def table_batching(cases, repeat):
    lines = ["| network | N | d | seeds | products | batched (s) | looped (s) | speed-up |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for name, depth, width, seeds, products in cases:
        spec = kp.load(EXAMPLES / f"{name}.toml", depth=depth)

        def run(batch):
            return lambda: mc.simulate(spec.network, spec.inputs, width, seeds, batch=batch, dong=False,
                                       products=products, keep_kernels=False)
        t_b, t_l = best_of(run(seeds), repeat, warm=True), best_of(run(1), repeat, warm=True)
        lines.append(f"| {name} L={depth} | {spec.inputs.n_tokens} | {width} | {seeds} | {products} | "
                     f"{t_b:.3f} | {t_l:.3f} | {t_l / t_b:.2f} |")
    return "\n".join(lines)


def table_false_alarm(reps, configs):
    lines = ["| configuration | width pair | seeds | comparisons n | k | repetitions | disagreements | rate | "
             "max\\|z\\|/k: median | largest |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, network, inputs, width, seeds in configs:
        fails, ratios, n, k = 0, [], 0, 0.0
        for r in range(reps):
            cmp, *_ = mc.check(network, inputs, width, seeds, seed=1000 + r)
            fails += not cmp.agree
            ratios.append(cmp.max_abs_z / cmp.k)
            n, k = cmp.n_tested, cmp.k
        lines.append(f"| {label} | {width}/{mc.half_width(width, network)} | {seeds} | {n} | {k:.2f} | {reps} | "
                     f"{fails} | {fails / reps:.3f} | {np.median(ratios):.2f} | {np.max(ratios):.2f} |")
    return "\n".join(lines)


def false_alarm_configs():
    from kernelprop import inputs as I
    from kernelprop.network.layers import Activation, Attention, Dense, LayerNorm, Network, Residual
    eq = I.equicorrelated(8, 1.0, 0.3)
    two = I.equicorrelated(6, 1.0, 0.4, sequences=2, cross_rho=0.2)
    pre = kp.load(EXAMPLES / "pre_ln.toml", depth=4)
    van = kp.load(EXAMPLES / "vanilla.toml", depth=4)
    return [
        ("ReLU MLP, depth 4", Network(block=[Dense(weight_var=2.0), Activation("relu")], depth=4), eq, 256, 16),
        ("LN + tied attention + GELU MLP, 2 sequences, depth 3",
         Network(block=[Residual(LayerNorm(), Attention(heads=2, scores="tied", causal=True), beta=0.7),
                        Residual(LayerNorm(), Dense(width_factor=2), Activation("gelu"), Dense(), beta=0.7)],
                 depth=3), two, 128, 16),
        ("pre_ln example, depth 4 (N = 32)", pre.network, pre.inputs, 128, 16),
        ("vanilla example, depth 4 (N = 32)", van.network, van.inputs, 128, 16),
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes, one repeat")
    p.add_argument("--false-alarm", type=int, default=0, metavar="R", help="measure the false-alarm rate")
    a = p.parse_args()
    repeat = 1 if a.quick else 3
    print(f"machine: {platform.processor() or platform.machine()}, numpy {np.__version__}, python "
          f"{platform.python_version()}\n")
    fwd = [("pre_ln", 4, 256, 16), ("pre_ln", 4, 512, 16), ("vanilla", 4, 512, 16)]
    bat = [("pre_ln", 4, 256, 16, "explicit"), ("pre_ln", 4, 256, 16, "auto"), ("relu_mlp", 20, 64, 64, "auto")]
    if a.quick:
        fwd, bat = fwd[:1], bat[:2]
    print("### Forward pass against the bare chain of its matrix products\n")
    print(table_forward(fwd, repeat), "\n")
    print("### Seeds batched against looped\n")
    print(table_batching(bat, repeat), "\n")
    if a.false_alarm:
        print("### False-alarm rate of `check` (nominal family-wise α = 0.01)\n")
        print(table_false_alarm(a.false_alarm, false_alarm_configs()), "\n")


if __name__ == "__main__":
    main()
