"""Dong et al.'s composite residual against an exact linear program, and its invariances."""

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from kernelprop import inputs as I
from kernelprop import montecarlo as mc
from kernelprop.montecarlo.residual import composite_norm, dong_residual, residual_centre
from kernelprop.network.layers import Attention, Network


def _lp(x, theta):
    """``min_c θ‖X − 1cᵀ‖_1 + ‖X − 1cᵀ‖_∞/θ`` exactly (HiGHS); returns the composite norm at its c."""
    t, w = x.shape
    n = w + t * w + 2                          # c, |X − c| per entry, u ≥ column sums, v ≥ row sums
    e = w + np.arange(t * w)
    k = np.tile(np.arange(w), t)
    i = np.repeat(np.arange(t), w)
    m = t * w
    rows = np.concatenate([np.arange(m), np.arange(m), m + np.arange(m), m + np.arange(m),
                           2 * m + k, 2 * m + np.arange(w), 2 * m + w + i, 2 * m + w + np.arange(t)])
    cols = np.concatenate([k, e, k, e, e, np.full(w, n - 2), e, np.full(t, n - 1)])
    vals = np.concatenate([-np.ones(m), -np.ones(m), np.ones(m), -np.ones(m), np.ones(m), -np.ones(w),
                           np.ones(m), -np.ones(t)])
    a = sparse.csr_matrix((vals, (rows, cols)), shape=(2 * m + w + t, n))
    b = np.concatenate([-x.ravel(), x.ravel(), np.zeros(w + t)])
    cost = np.zeros(n)
    cost[-2], cost[-1] = theta, 1 / theta
    res = linprog(cost, A_ub=a, b_ub=b, bounds=[(None, None)] * w + [(0, None)] * (m + 2), method="highs")
    return composite_norm(x - res.x[:w])


def exact_minimum(x):
    """``min_c sqrt(fg) = min_θ min_c (θf + g/θ)/2``: every θ gives an upper bound; a fine grid finds the min."""
    return min(_lp(x, th) for th in np.geomspace(0.05, 20, 61))


def test_the_centre_is_within_a_tenth_of_a_percent_of_the_exact_minimum():
    rng = np.random.default_rng(3)
    shapes = [(4, 6), (5, 12), (8, 10), (6, 20)]
    worst, median_gap = 0.0, []
    for n, (t, w) in enumerate(shapes):
        x = rng.standard_normal((t, w))
        if n % 2:
            x = x ** 3 + 2.0 * rng.standard_normal(w)      # heavy tails, plus a common row
        best = exact_minimum(x)
        ours = composite_norm(x - residual_centre(x[None])[0])
        worst = max(worst, ours / best - 1)
        median_gap.append(composite_norm(x - np.median(x, axis=0)) / best - 1)
        assert ours >= best * (1 - 1e-9)                  # a value at a concrete centre: never below the min
    assert worst < 1e-3
    assert max(median_gap) > 0.03                         # the column median alone would not do


def test_rank_one_matrices_have_zero_residual_and_invariances_hold():
    rng = np.random.default_rng(0)
    row = rng.standard_normal(30)
    x = np.broadcast_to(row, (3, 5, 30)).copy()
    assert np.all(dong_residual(x, (5,)) == 0)
    y = rng.standard_normal((2, 6, 30))
    base = dong_residual(y, (6,))

    def res(z):
        return composite_norm(z - residual_centre(z)[:, None, :])
    np.testing.assert_allclose(res(y + row), res(y), rtol=2e-3)                    # ‖res(X)‖ ignores 1xᵀ shifts
    np.testing.assert_allclose(dong_residual(3.0 * y, (6,)), base, rtol=1e-4)       # relative: scale-free
    assert np.all((0 < base) & (base <= 1))


def test_pure_uniform_attention_collapses_the_residual_to_zero():
    """One uniform attention layer makes all tokens equal (Dong et al.: pure attention loses rank)."""
    net = Network(block=[Attention(values="identity", projection="identity")], depth=1)
    sim = mc.simulate(net, I.identity(6), 64, 3)
    assert sim.measures["dong_residual"][0] > 0.5
    assert sim.measures["dong_residual"][1] < 1e-12


def test_batched_norms_and_sequences_are_handled_one_by_one():
    """composite_norm of a stack is the norm of each matrix; dong_residual of two sequences is the mean of
    each sequence's ‖X − 1cᵀ‖_{1,∞}/‖X‖_{1,∞}, c = residual_centre of that sequence's tokens."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 7, 10)) * np.array([1.0, 4.0, 0.2])[:, None, None]
    np.testing.assert_allclose(composite_norm(x), [composite_norm(m) for m in x], rtol=1e-15)
    parts = []
    for sl in (slice(0, 4), slice(4, 7)):
        block = x[:, sl, :]
        centre = residual_centre(block)
        parts.append(composite_norm(block - centre[:, None, :]) / composite_norm(block))
    np.testing.assert_allclose(dong_residual(x, (4, 3)), np.mean(parts, axis=0), rtol=1e-12)
