"""Standard 1/sqrt(d_k) scores: cost of one attention layer against a tied-score layer, and the achieved error.

Usage: python benchmarks/bench_standard.py [--quick]

For T tokens (equicorrelated input kernel, unit variance, ρ = 0.3), H heads and σ_qk² in a range: the
forward estimate of a standard-score layer (the engine's estimator, default score_samples) against the same
layer with tied scores (the floor: one softmax and two T×T products per distinct head), the reported error
relative to the largest kernel entry, and the plain 64-draws-per-head estimate of the previous engine (stacked
draws, one standard error) for comparison; a causal pair's products on the lower triangle (BLAS trmm) against
full products (kept out of the engine: it did not pay); the peak memory of one estimate at 8 and 64 draws.
Then, for bidirectional unbiased RoPE-free scores (P = 11ᵀ/T) at T = 64, 256, the order-4 closed form (alone, or as
the pairs' control variate) against the same floor. Then the backward pass of a RoPE + standard layer (T = 64, H =
2; T = 32 in quick mode). Timings are wall-clock on whatever else the machine runs: compare ratios from one run.
"""

from __future__ import annotations

import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))     # this checkout's kernelprop

from results import best_of as best  # noqa: E402
from results import result  # noqa: E402

from kernelprop import inputs as I  # noqa: E402
from kernelprop.kernel.backward import backpropagate  # noqa: E402
from kernelprop.layers.attention import matrices as MX  # noqa: E402
from kernelprop.layers.attention.standard import Estimator  # noqa: E402
from kernelprop.network.layers import Attention, Network  # noqa: E402


def plain(layer, sigma, segments):
    """The previous estimate: every draw's kernel stacked, mean and max_ij sd/√(nH)."""
    heads = MX.head_mixings(layer, sigma, segments, {}, seed=(0, 1))
    draws = np.stack([m.kernel(sigma) for _, m in heads])
    return draws.mean(axis=0), float(np.max(np.std(draws, axis=0, ddof=1)) / np.sqrt(len(heads)))


def main(quick: bool):
    t, h = (128, 8) if quick else (256, 8)
    sigma = I.equicorrelated(t, 1.0, 0.3).sigma
    segs = (t,)
    tied = Attention(heads=h, scores="tied", qk_var=1.0)
    floor = best(lambda: MX.head_mixings(tied, sigma, segs, {})[0][1].kernel(sigma), 3)
    print(f"T = {t}, H = {h}: tied-score layer {floor * 1e3:.1f} ms (floor)")
    print(f"{'σ_qk²':>6} {'bias':>6} {'standard/tied':>14} {'error/max':>10} {'old/tied':>9} {'old error/max':>14}")
    for v in (0.01, 0.1, 0.5, 1.0):
        for bias in (None, "alibi"):
            layer = Attention(heads=h, scores="standard", qk_var=v, bias=bias, causal=bias is not None)
            tl = Attention(heads=h, scores="tied", qk_var=v, bias=bias, causal=bias is not None)
            heads = MX.head_mixings(tl, sigma, segs, {})
            ref = best(lambda: [m.kernel(sigma) for _, m in heads], 2)  # noqa: B023
            res = {}

            def run():
                res["out"] = Estimator(layer, sigma, segs, {}, seed=(0, 1)).forward([sigma])  # noqa: B023
            cost = best(run, 1)
            (k,), _, (err,) = res["out"]
            line = f"{v:>6} {str(bias):>6} {cost / ref:>14.1f} {err / np.max(np.abs(k)):>10.1e}"
            result(f"standard-score layer / tied layer, T = {t}, H = {h}, σ_qk² = {v}, bias {bias} "
                   f"(error/max {err / np.max(np.abs(k)):.1e})", cost / ref, "ratio", "<= 5")
            if not quick or (v == 0.1 and bias is None):
                t0 = time.perf_counter()
                old, old_err = plain(layer, sigma, segs)
                line += f" {(time.perf_counter() - t0) / ref:>9.1f} {old_err / np.max(np.abs(old)):>14.1e}"
            print(line, flush=True)
    # causal products on the lower triangle (BLAS trmm) against full products (gemm), inside one pair's work
    from scipy.linalg.blas import dtrmm
    layer = Attention(heads=h, scores="standard", qk_var=0.1, causal=True)
    est = Estimator(layer, sigma, segs, {}, seed=(0, 1))
    s = next(est.draws(0))

    def pair(tri):
        for sign in (1.0, -1.0):
            a = est.softmax(sign * s, 0)
            if tri:
                dtrmm(1.0, a, dtrmm(1.0, a, sigma, side=0, lower=1), side=1, lower=1, trans_a=1)
            else:
                a @ sigma @ a.T
    full, tri = best(lambda: pair(False), 5), best(lambda: pair(True), 5)
    print(f"causal A Σ Aᵀ of a pair (softmax included), lower-triangular trmm / full gemm: {tri / full:.2f}")
    # memory: peak allocation of one forward estimate at 8 and 64 draws (the previous engine stacked every draw)
    import tracemalloc
    layer8, layer64 = (Attention(heads=h, scores="standard", qk_var=0.1, score_samples=n) for n in (8, 64))
    peaks = []
    for lay in (layer8, layer64):
        tracemalloc.start()
        Estimator(lay, sigma, segs, {}, seed=(0, 1)).forward([sigma])
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    print(f"peak memory of the estimate: {peaks[0] / 2**20:.1f} MiB at 8 draws, {peaks[1] / 2**20:.1f} MiB at 64 "
          f"(stacking the 64·H draw kernels: {64 * h * t * t * 8 / 2**20:.0f} MiB)")
    uniform_rows(quick)
    tb = 32 if quick else 64
    net = Network(block=[Attention(heads=2, scores="standard", qk_var=1.0, causal=True, rope_theta=10000.0)],
                  depth=1)
    x = I.equicorrelated(tb, 1.0, 0.3)
    cost = best(lambda: backpropagate(net, x), 1)
    print(f"RoPE + standard backward, T = {tb}, H = 2: {cost:.2f} s")


def uniform_rows(quick: bool):
    """Bidirectional, unbiased, RoPE-free scores (P = 11ᵀ/T): the order-4 closed form (alone when its truncation
    estimate is ≤ 1e-6 of the largest entry, else as the pairs' control variate) against the tied floor, with the
    order-2 + pairs estimator for comparison, and the distance of the closed form to a long reference run
    (order-4 control variate, 10× the default pairs; its own error printed); e₄ is the truncation estimate."""
    print("P = 11ᵀ/T (bidirectional, no bias, no RoPE): order-4 closed form")
    print(f"{'T':>4} {'σ_qk²':>6} {'method':>22} {'cost/tied':>9} {'error/max':>10} {'order-2+pairs/tied':>18} "
          f"{'its error/max':>13} {'e₄/max':>8} {'|closed − ref|/max':>18} {'ref error/max':>13}")
    h = 8
    for t in ((64,) if quick else (64, 256)):
        sigma = I.equicorrelated(t, 1.0, 0.3).sigma
        segs = (t,)
        for v in (0.01, 0.1, 0.25, 0.5, 1.0):
            layer = Attention(heads=h, scores="standard", qk_var=v)
            tl = Attention(heads=h, scores="tied", qk_var=v)
            heads = MX.head_mixings(tl, sigma, segs, {})
            ref = best(lambda: [m.kernel(sigma) for _, m in heads], 3)  # noqa: B023
            res = {}

            def run(old=False):
                est = Estimator(layer, sigma, segs, {}, seed=(0, 1))  # noqa: B023
                if old:
                    est.uniform = None
                res["out"], res["method"] = est.forward([sigma]), est.method  # noqa: B023
            cost = best(run, 7 if v <= 0.01 else 1)
            (k,), _, (err,) = res["out"]
            method = "closed" if "pairs" not in res["method"] else res["method"][:7] + " CV + 32 pairs"
            cost_old = best(lambda: run(True), 1)
            (k_old,), _, (err_old,) = res["out"]
            mx = np.max(np.abs(k))
            probe = Estimator(layer, sigma, segs, {}, seed=(0, 1))
            e4_est = probe.truncation(*probe.uniform.closed(sigma, probe.coef)[1:])
            result(f"standard-score layer / tied layer, P = 11ᵀ/T, T = {t}, H = {h}, σ_qk² = {v}, {method} "
                   f"(error/max {err / mx:.1e})", cost / ref, "ratio", "<= 5")
            line = (f"{t:>4} {v:>6} {method:>22} {cost / ref:>9.2f} {err / mx:>10.1e} {cost_old / ref:>18.1f} "
                    f"{err_old / mx:>13.1e} {e4_est / mx:>8.1e}")
            if not quick or v <= 0.1:
                est = Estimator(Attention(heads=h, scores="standard", qk_var=v, score_samples=640), sigma, segs, {},
                                seed=(0, 9))
                (kr,), _, (er,) = est.forward([sigma], tol=0.0)
                e2, e4, _ = est.uniform.closed(sigma, est.coef)
                line += f" {np.max(np.abs(e2 + e4 - kr)) / mx:>18.1e} {er / mx:>13.1e}"
            print(line, flush=True)


if __name__ == "__main__":
    main("--quick" in sys.argv[1:])
