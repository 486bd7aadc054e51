"""Dense activation kernels without closed form: the vectorised Mehler route against the previous
per-entry adaptive route.

Usage: python benchmarks/bench_quadrature.py [--quick]

For T tokens, a LayerNorm-like input kernel (unit variances, correlations spread over about
−0.5 … 0.95; T(T+1)/2 distinct entries) goes through ``activation_kernel`` for SiLU, tanh, GPT-2's
gelu_tanh and a callable (Mish, kinks undeclared, so the kink search runs too). "new" is the default
route (Mehler's expansion for every entry at once, per-entry rules only where it cannot meet the
tolerance); "old" forces the previous per-entry adaptive rule (``method="adaptive"``), timed at the
sizes in ``OLD_SIZES`` and extrapolated beyond as (ms per distinct entry at the largest timed T) ×
entries, marked "est.". A last table repeats T = 2048 with unequal variances (every token its own
variance: the expansion's coefficients are then computed per token).

Accuracy at T = 64: largest reported error against the largest true error, the truth being a
400-node tensor Gauss–Hermite rule over every entry (its own accuracy shown: difference to 300 nodes).
"""

from __future__ import annotations

import functools
import sys
import time

import numpy as np
from results import result

from kernelprop.kernel import activations as A
from kernelprop.kernel import quadrature as Q


def mish(x):
    return x * np.tanh(np.logaddexp(0.0, x))


CASES = {"silu": "silu", "tanh": "tanh", "gelu_tanh": "gelu_tanh", "callable (mish)": mish}


def kernel(t: int, equal: bool = True, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, 48)) + 0.8 * rng.standard_normal(48)
    x -= x.mean(axis=1, keepdims=True)
    x /= np.sqrt((x * x).mean(axis=1, keepdims=True))
    if not equal:
        x *= np.sqrt(rng.uniform(0.3, 3.0, size=(t, 1)))
    return x @ x.T / 48


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run(act, sigma, method):
    original = Q.gauss_hermite_kernel

    def forced(*args, **kw):
        kw["method"] = method
        return original(*args, **kw)
    Q.gauss_hermite_kernel = forced
    try:
        return A.activation_kernel(act, sigma)
    finally:
        Q.gauss_hermite_kernel = original


def truth(f, sigma):
    """Every upper-triangle entry by the tensor Gauss–Hermite rule with 400 (and 300) nodes."""
    ii, jj = np.triu_indices(sigma.shape[0])
    a, b, s = sigma[ii, ii], sigma[jj, jj], sigma[ii, jj]
    sa, sb = np.sqrt(a), np.sqrt(b)
    c = np.clip(s / (sa * sb), -1.0, 1.0)
    r = np.sqrt(np.clip(1.0 - c * c, 0.0, None))
    hi, _ = Q._pair_sum(f, f, sa, sb, c, r, 400)
    lo, _ = Q._pair_sum(f, f, sa, sb, c, r, 300)
    return ii, jj, hi, float(np.abs(hi - lo).max())


def main(quick: bool):
    sizes = (64, 256, 1024) if quick else (64, 256, 1024, 2048)
    old_sizes = (64,) if quick else (64, 256)
    print(f"numpy {np.__version__}; activation_kernel on a dense T×T kernel, ms (best of 3 below T = 1024)\n")
    print("| T | activation | new ms | old ms | old / new | new err |")
    print("|---|---|---|---|---|---|")
    rate: dict = {}
    for t in sizes:
        sigma = kernel(t)
        entries = t * (t + 1) // 2
        for label, act in CASES.items():
            run(act, kernel(8), "auto")  # warm caches (Hermite grids)
            tn, (_, _, err) = timed(functools.partial(run, act, sigma, "auto"), 3 if t < 1024 else 1)
            if t in old_sizes:
                to, _ = timed(functools.partial(run, act, sigma, "adaptive"))
                rate[label] = to / entries
                old = f"{1e3 * to:.4g}"
            else:
                to = rate[label] * entries
                old = f"{1e3 * to:.4g} est."
            print(f"| {t} | {label} | {1e3 * tn:.4g} | {old} | {to / tn:.3g} | {err:.2e} |", flush=True)
            if t in (256, 2048):
                result(f"activation kernel, T = {t}, {label}", 1e3 * tn, "ms", "<= 50" if t == 256 else "<= 5000")
    print("\n| T = 2048, unequal variances | new ms | new err |")
    print("|---|---|---|")
    if not quick:
        sigma = kernel(2048, equal=False)
        for label, act in CASES.items():
            tn, (_, _, err) = timed(functools.partial(run, act, sigma, "auto"))
            print(f"| {label} | {1e3 * tn:.4g} | {err:.2e} |", flush=True)
    else:
        print("| (skipped with --quick) | | |")
    print("\nT = 64: reported error (largest) against the true error (largest, vs 400-node tensor Gauss–Hermite)\n")
    print("| activation | reported (new) | true (new) | reported (old) | true (old) | reference's own accuracy |")
    print("|---|---|---|---|---|---|")
    sigma = kernel(64, seed=1)
    for label, act in CASES.items():
        f = A.ACTIVATIONS[act].phi if isinstance(act, str) else act
        ii, jj, ref, ref_acc = truth(f, sigma)
        kn, _, en = run(act, sigma, "auto")
        ko, _, eo = run(act, sigma, "adaptive")
        tn, to = np.abs(kn[ii, jj] - ref).max(), np.abs(ko[ii, jj] - ref).max()
        result(f"reported / true error, T = 64, {label}", en / max(tn, ref_acc), "ratio", ">= 1")
        print(f"| {label} | {en:.2e} | {tn:.2e} | {eo:.2e} | {to:.2e} | {ref_acc:.1e} |", flush=True)


if __name__ == "__main__":
    main("--quick" in sys.argv)
