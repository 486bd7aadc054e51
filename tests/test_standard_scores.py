"""Standard 1/sqrt(d_k) scores: the estimator of ``E[A K Aᵀ]``, ``E[Aᵀ Π A]`` and ``E[A]`` (expansion around the
zero-score matrix + antithetic control-variate pairs, docs/theory.md §2.7) against independent references:

* T = 2, exact: each row of A is a logistic function of one score difference, so every entry is a 2-D
  Gaussian integral, done here by Gauss–Hermite (120 nodes per axis, its error the distance to 60 nodes);
* T = 4 (and two sequences of 2): 10⁶-draw plain numpy estimates, cached in tests/data/standard_scores_ref.npz
  by tests/data/make_standard_scores_ref.py (covariance of vec S built entry by entry, eigh factor).

Kernels × σ_qk² ∈ {0.01, 0.1, 0.5, 1, 4} × {bidirectional, causal, ALiBi, RoPE}: the reported error must cover
the distance to the reference (plus the reference's own error: 5 standard errors for the 10⁶ draws)."""

import importlib.util
import itertools
import pathlib

import numpy as np
import pytest

from kernelprop.layers.attention import Attention
from kernelprop.layers.attention.standard import Estimator, pair_sum, pair_trace

SCALES = (0.01, 0.1, 0.5, 1.0, 4.0)
VARIANTS = {"bidirectional": {}, "causal": {"causal": True}, "alibi": {"bias": "alibi", "heads": 2},
            "rope": {"rope_theta": 100.0, "rope_dim": 8}}
REF = pathlib.Path(__file__).parent / "data" / "standard_scores_ref.npz"


def _generator():
    """tests/data/make_standard_scores_ref.py, which wrote the cached references: its kernels, Π and ρ are the
    ones the cache was computed for."""
    path = pathlib.Path(__file__).parent / "data" / "make_standard_scores_ref.py"
    spec = importlib.util.spec_from_file_location("make_standard_scores_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _generator()
_kernels, _pi, _rho = GEN.kernels, GEN.pi_matrix, GEN.rho


def quadrature_t2(kernel, pi, v, opts, nodes, mix=None):
    """Exact T = 2 expectations ``E[M K Mᵀ]``, ``E[Mᵀ Π M]``, ``E[M]`` (head average) by Gauss–Hermite over
    (d_0, d_1), ``d_i = S_i0 − S_i1``: each softmax row is a logistic function of one difference. ``M = A``, or
    ``αI + βA − γC`` for ``mix = {"alpha", "beta", "gamma"}`` (C the zero-score matrix)."""
    cov_s = {}
    for i, j, k, l in itertools.product(range(2), repeat=4):
        r = _rho((j - i) - (l - k), opts["rope_theta"], opts["rope_dim"]) if "rope_theta" in opts else 1.0
        cov_s[i, j, k, l] = v * kernel[i, k] * kernel[j, l] * r
    sign = (1.0, -1.0)
    cov = np.array([[sum(sign[j] * sign[l] * cov_s[i, j, k, l] for j in range(2) for l in range(2))
                     for k in range(2)] for i in range(2)])
    w, u = np.linalg.eigh(cov)
    fac = u * np.sqrt(np.clip(w, 0.0, None))
    x, wt = np.polynomial.hermite_e.hermegauss(nodes)
    wt = wt / wt.sum()
    z = np.stack(np.meshgrid(x, x, indexing="ij"), axis=-1).reshape(-1, 2)
    weights = np.outer(wt, wt).ravel()
    d = z @ fac.T                                           # (nodes², 2)
    al, be, ga = (0.0, 1.0, 0.0) if mix is None else (mix.get("alpha", 1.0), mix.get("beta", 1.0),
                                                      mix.get("gamma", 0.0))
    heads = opts.get("heads", 1)
    slopes = 2.0 ** (-8.0 * np.arange(1, heads + 1) / heads)
    fwd, bwd, mean = np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2))
    for h in range(heads):
        shift = slopes[h] if "bias" in opts else 0.0        # b_i0 − b_i1 = −s|i| + s|i − 1|: +s (row 0), −s (row 1)
        a, c = np.zeros((len(d), 2, 2)), np.zeros((2, 2))
        for i, b in ((0, shift), (1, -shift)):
            p0 = 1.0 / (1.0 + np.exp(-(d[:, i] + b)))
            a[:, i, 0], a[:, i, 1] = p0, 1.0 - p0
            c[i] = (1.0 / (1.0 + np.exp(-b)), 1.0 / (1.0 + np.exp(b)))
        if opts.get("causal"):
            a[:, 0], c[0] = (1.0, 0.0), (1.0, 0.0)
        m = al * np.eye(2) + be * a - ga * c
        fwd += np.einsum("n,nij,jk,nlk->il", weights, m, kernel, m) / heads
        bwd += np.einsum("n,nji,jk,nkl->il", weights, m, pi, m) / heads
        mean += np.einsum("n,nij->ij", weights, m) / heads
    return fwd, bwd, mean


CASES = list(itertools.product(_kernels(), SCALES, VARIANTS))


@pytest.mark.parametrize("kname,v,variant", CASES)
def test_two_tokens_against_quadrature(kname, v, variant):
    """T = 2: kernel, backward mixing and mean within their reported errors of the exact integrals."""
    kernel, pi, opts = _kernels()[kname][:2, :2], _pi()[:2, :2], VARIANTS[variant]
    fwd, bwd, mean = quadrature_t2(kernel, pi, v, opts, 120)
    rough = quadrature_t2(kernel, pi, v, opts, 60)
    qerr = [np.max(np.abs(a - b)) + 1e-14 for a, b in zip((fwd, bwd, mean), rough)]
    est = Estimator(Attention(scores="standard", qk_var=v, **opts), kernel, (2,), {}, seed=(11,))
    (got,), got_mean, (err,) = est.forward([kernel], want_mean=True)
    back = est.backward(pi)[0]
    assert np.max(np.abs(got - fwd)) <= err + qerr[0], (np.max(np.abs(got - fwd)), err)
    assert np.max(np.abs(back - bwd)) <= est.back_error + qerr[1], (np.max(np.abs(back - bwd)), est.back_error)
    assert np.max(np.abs(got_mean - mean)) <= 1e-2 * max(v, 1e-3) ** 2 + 1e-3 * v + qerr[2]   # no error reported
    assert err <= 2.0 * v ** 2 + 1e-12           # the control variate leaves an O(v²) remainder


@pytest.mark.parametrize("kname,v,variant", list(itertools.product(_kernels(), SCALES, list(VARIANTS) + ["batch"])))
def test_four_tokens_against_a_million_draws(kname, v, variant):
    """T = 4 (batch: two sequences of 2 with correlated scores) against cached 10⁶-draw numpy estimates."""
    ref = np.load(REF)[f"{kname}/{v}/{variant}"]
    opts = VARIANTS.get(variant, {})
    segments = (2, 2) if variant == "batch" else (4,)
    kernel, pi = _kernels()[kname], _pi()
    est = Estimator(Attention(scores="standard", qk_var=v, **opts), kernel, segments, {}, seed=(12,))
    (got,), _, (err,) = est.forward([kernel])
    back = est.backward(pi)[0]
    (fwd, fse), (bwd, bse) = ref[:, 0], ref[:, 1]
    assert np.max(np.abs(got - fwd)) <= err + 5.0 * np.max(fse), (np.max(np.abs(got - fwd)), err, np.max(fse))
    assert np.max(np.abs(back - bwd)) <= est.back_error + 5.0 * np.max(bse)


def test_pair_helpers_against_explicit_jacobians():
    """``U_ik = Σ_jl (J_i X J_k)_jl Z_jl`` and ``Σ_ik W_ik J_i V J_k`` by explicit loops (non-symmetric Z, V, W)."""
    rng = np.random.default_rng(3)
    n = 5
    a = rng.random((n, n))
    a /= a.sum(axis=1, keepdims=True)
    g = rng.standard_normal((n, n))
    x, z, v, w = g @ g.T, rng.standard_normal((n, n)), rng.standard_normal((n, n)), rng.standard_normal((n, n))
    jac = [np.diag(a[i]) - np.outer(a[i], a[i]) for i in range(n)]
    want_u = np.array([[np.sum((jac[i] @ x @ jac[k]) * z) for k in range(n)] for i in range(n)])
    want_s = sum(w[i, k] * jac[i] @ v @ jac[k] for i in range(n) for k in range(n))
    np.testing.assert_allclose(pair_trace(a, x, z), want_u, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(pair_sum(a, v, w), want_s, rtol=1e-12, atol=1e-13)


def test_small_scores_beat_plain_sampling():
    """σ_qk² = 0.01 at T = 8: the reported error is far below the old 64-draw plain estimate's (≈ 1e-3 measured
    for this kernel) and covers a 10⁵-draw plain numpy estimate."""
    rng = np.random.default_rng(9)
    g = rng.standard_normal((8, 8))
    kernel = g @ g.T / 8 + 0.5
    est = Estimator(Attention(scores="standard", qk_var=0.01, causal=True), kernel, (8,), {}, seed=(2,))
    (got,), _, (err,) = est.forward([kernel])
    f = np.linalg.cholesky(kernel)
    s = 0.1 * f @ rng.standard_normal((100_000, 8, 8)) @ f.T
    s = s + np.where(np.tril(np.ones((8, 8))) > 0, 0.0, -np.inf)
    a = np.exp(s - s.max(axis=-1, keepdims=True))
    a /= a.sum(axis=-1, keepdims=True)
    x = a @ kernel @ np.swapaxes(a, 1, 2)
    ref, se = x.mean(axis=0), x.std(axis=0) / np.sqrt(len(x))
    assert err < 2e-4
    assert np.max(np.abs(got - ref)) <= err + 5.0 * np.max(se)


@pytest.mark.parametrize("opts", [{}, {"rope_theta": 50.0}, {"rope_theta": 1e4, "rope_dim": 4, "qk_norm": "rmsnorm"},
                                  {"rope_theta": 1e4, "rope_fraction": 0.5, "rope_dim": 8}],
                         ids=["plain", "rope wide", "rope dim + qk_norm", "rope fraction"])
def test_score_path_matches_the_frequency_expansion(opts):
    """The score path per draw with ρ factored as ``Σ_m f_m(a) g_m(b)`` (Hankel eigen-expansion or cosines) against
    :func:`score_terms` (complex phases over the DFT frequencies of ρ) on the same draws, two sequences."""
    from kernelprop.layers.attention import matrices as MX
    from kernelprop.layers.attention import score_terms
    rng = np.random.default_rng(4)
    segs = (5, 3)
    g = rng.standard_normal((8, 8))
    sigma, pi, values = g @ g.T / 8 + 0.3, np.cov(rng.standard_normal((8, 12))), g.T @ g / 8
    layer = Attention(scores="standard", qk_var=0.8, causal=True, **opts)
    est = Estimator(layer, sigma, segs, {}, seed=(5,))
    o = layer.score_options(sigma, segs, {})
    s = next(est.draws(0))
    a = est.softmax(s, 0)
    q, extra = est.score_path(a, values, pi, o["keys"], True)
    if "rescale" in o:
        extra = extra * np.outer(o["rescale"], o["rescale"])
    blocks = [a[:5, :5], a[5:, 5:]]
    want_q, want = score_terms([(1.0, MX.Dense(segs, blocks))], values, pi, True, segments=segs, **o)
    assert q == pytest.approx(want_q, rel=1e-11)
    np.testing.assert_allclose(extra, want, rtol=1e-10, atol=1e-12 * np.max(np.abs(want)))


def test_layer_reports_the_estimators_kernel_and_error():
    """The layer's kernel ``σ_o²(σ_v² E[AΣAᵀ] + σ_bv² E[A11ᵀAᵀ]) + σ_bo²`` and its ``quad_error``
    ``σ_v²σ_o²(e_Σ + (σ_bv²/σ_v²) e_1)`` from the estimator on the same draws (seed of the first layer)."""
    import kernelprop as kp
    from kernelprop import inputs as I
    from kernelprop.network.layers import Network
    x = I.equicorrelated(6, 1.0, 0.3)
    layer = Attention(heads=2, scores="standard", qk_var=0.5, causal=True, value_var=2.0, out_var=0.5,
                      value_bias_var=0.3, out_bias_var=0.1, score_samples=16)
    res = kp.propagate(Network(block=[layer], depth=1), x)
    est = Estimator(layer, x.sigma, x.segments, {}, seed=(0, 1))
    (k, ones), _, (e, e1) = est.forward([x.sigma, np.ones((6, 6))])
    np.testing.assert_allclose(ones, 1.0, rtol=1e-12)       # softmax rows sum to 1: A11ᵀAᵀ = 11ᵀ per draw
    np.testing.assert_allclose(res.kernels[-1], 0.5 * (2.0 * k + 0.3 * ones) + 0.1, rtol=1e-12)
    assert res.measures["quad_error"][-1] == pytest.approx(1.0 * (e + 0.15 * e1), rel=1e-12)
    assert 0 < e < 0.05


# -- P = 11ᵀ/T (bidirectional, no bias, no RoPE): the order-4 closed form (docs/theory.md §2.7) --------------------

MIXINGS = {"softmax": {}, "shaped": {"matrix": "shaped", "alpha": 0.7, "beta": 1.2, "gamma": 0.4},
           "value_skipinit": {"matrix": "value_skipinit", "alpha": 1.0, "beta": 0.6}}


@pytest.mark.parametrize("segments", [(5,), (3, 2)], ids=["one sequence", "two sequences"])
@pytest.mark.parametrize("mixing", list(MIXINGS))
def test_uniform_order_two_matches_the_general_closed_form(segments, mixing):
    """The O(N²) block-mean form of ``E[F₂]`` against the general per-row Jacobian form (pair_trace)."""
    rng = np.random.default_rng(21)
    g = rng.standard_normal((5, 7))
    kernel = g @ g.T / 7 + 0.3
    est = Estimator(Attention(scores="standard", qk_var=0.3, **MIXINGS[mixing]), kernel, segments, {}, seed=(1,))
    p = est.p[0]
    m0 = est.m0(p)
    want = est._closed(p, est.ed2[0], m0, kernel, kernel @ m0.T)
    got, _, _ = est.uniform.closed(kernel, est.coef)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14 * np.max(np.abs(want)))


@pytest.mark.parametrize("kname", list(_kernels()))
def test_uniform_order_four_against_quadrature_slope(kname):
    """T = 2, exact Gauss–Hermite: ``|E[AKAᵀ] − E₂ − E₄|`` is within the truncation estimate at every σ_qk² where
    it is finite, and falls like the next order, σ_qk⁶ (log-log slope of the last halvings in [2.8, 3.2]), while
    the order-2 remainder falls like σ_qk⁴."""
    kernel, pi = _kernels()[kname][:2, :2], _pi()[:2, :2]
    scales = (0.4, 0.2, 0.1, 0.05, 0.025)
    rem2, rem4 = [], []
    for v in scales:
        fwd, _, _ = quadrature_t2(kernel, pi, v, {}, 120)
        est = Estimator(Attention(scores="standard", qk_var=v), kernel, (2,), {}, seed=(1,))
        e2, e4, d2 = est.uniform.closed(kernel, est.coef)
        rem2.append(np.max(np.abs(fwd - e2)))
        rem4.append(np.max(np.abs(fwd - e2 - e4)))
        assert rem4[-1] <= est.truncation(e4, d2), (v, rem4[-1], est.truncation(e4, d2))
    slope2 = np.log(rem2[-2] / rem2[-1]) / np.log(2.0)
    slope4 = [np.log(a / b) / np.log(2.0) for a, b in zip(rem4[-3:-1], rem4[-2:])]
    assert 1.8 <= slope2 <= 2.2, slope2
    assert all(2.8 <= s <= 3.2 for s in slope4), slope4


def _numpy_reference(kernel, segments, v, pairs, seed):
    """Plain numpy: ``E[A K Aᵀ]`` over ``pairs`` antithetic pairs of ``S = √v F Z Fᵀ`` (F Cholesky), A the softmax
    within each sequence; mean and per-entry standard error (over pairs)."""
    rng = np.random.default_rng(seed)
    n = len(kernel)
    f = np.linalg.cholesky(kernel)
    bounds = np.cumsum((0,) + tuple(segments))
    acc, sq, done = np.zeros((n, n)), np.zeros((n, n)), 0
    while done < pairs:
        m = min(100_000, pairs - done)
        s = np.sqrt(v) * f @ rng.standard_normal((m, n, n)) @ f.T
        pair = np.zeros((m, n, n))
        for sign in (1.0, -1.0):
            a = np.zeros((m, n, n))
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                z = sign * s[:, lo:hi, lo:hi]
                z = np.exp(z - z.max(axis=-1, keepdims=True))
                a[:, lo:hi, lo:hi] = z / z.sum(axis=-1, keepdims=True)
            pair += 0.5 * (a @ kernel @ np.swapaxes(a, 1, 2))
        acc += pair.sum(axis=0)
        sq += (pair * pair).sum(axis=0)
        done += m
    mean = acc / pairs
    return mean, np.sqrt(np.maximum(sq / pairs - mean * mean, 0.0) / pairs)


@pytest.mark.parametrize("kname,v,segments", [("equicorrelated", 0.2, (6,)), ("wishart", 0.05, (6,)),
                                              ("equicorrelated", 0.2, (3, 3)), ("wishart", 0.05, (3, 3))])
def test_uniform_order_four_against_a_million_draws(kname, v, segments):
    """T = 6 (or two correlated sequences of 3): the order-4 closed form within its truncation estimate (plus
    5 standard errors) of a 10⁶-draw plain numpy estimate, and closer to it than the order-2 closed form."""
    rng = np.random.default_rng(31)
    g = rng.standard_normal((6, 9))
    wish = g @ g.T / 9
    d = 1.0 / np.sqrt(np.diag(wish))
    kernel = {"equicorrelated": 0.5 * np.eye(6) + 0.5, "wishart": 1.3 * wish * d[:, None] * d[None, :]}[kname]
    ref, se = _numpy_reference(kernel, segments, v, 500_000, 41)
    est = Estimator(Attention(scores="standard", qk_var=v), kernel, segments, {}, seed=(1,))
    e2, e4, d2 = est.uniform.closed(kernel, est.coef)
    bound = est.truncation(e4, d2)
    dist4 = np.max(np.abs(e2 + e4 - ref))
    assert np.isfinite(bound) and dist4 <= bound + 5.0 * np.max(se), (dist4, bound, np.max(se))
    assert dist4 < 0.5 * np.max(np.abs(e2 - ref)), (dist4, np.max(np.abs(e2 - ref)))


def test_uniform_closed_form_alone_when_its_estimate_is_small():
    """σ_qk² = 0.01, T = 16, one sequence: the forward is the order-4 closed form without draws (reported error =
    truncation estimate ≤ 1e-6 of the largest entry); at σ_qk² = 1 it adds control-variate pairs whose error covers
    the distance to the closed form of the small-scale run's own law (E₂ + E₄ + remainder)."""
    from kernelprop import inputs as I
    sigma = I.equicorrelated(16, 1.0, 0.3).sigma
    est = Estimator(Attention(heads=4, scores="standard", qk_var=0.01), sigma, (16,), {}, seed=(3,))
    (k,), _, (err,) = est.forward([sigma])
    assert "pairs" not in est.method
    e2, e4, _ = est.uniform.closed(sigma, est.coef)
    np.testing.assert_allclose(k, e2 + e4, rtol=1e-13)
    assert 0 < err <= 1e-6 * np.max(np.abs(k))
    big = Estimator(Attention(scores="standard", qk_var=1.0), sigma, (16,), {}, seed=(3,))
    (k1,), _, (err1,) = big.forward([sigma])
    assert "pairs" in big.method and 0 < err1 < 1e-2


def test_uniform_pairs_take_the_better_control_variate():
    """T = 8: at σ_qk² = 0.25 (ρ = 0.3, λ = 0.35) the order-4 control variate cuts the pairs' reported error below
    half the order-2 one's (measured 0.28×); at σ_qk² = 1 with K = I (λ = 2), where F₄(S) is heavy-tailed, the
    order-2 variate is kept and the result equals the general estimator's on the same draws."""
    from kernelprop import inputs as I
    for rho, v, better in ((0.3, 0.25, True), (0.0, 1.0, False)):
        kernel = I.equicorrelated(8, 1.0, rho).sigma
        res = []
        for general in (False, True):
            est = Estimator(Attention(scores="standard", qk_var=v), kernel, (8,), {}, seed=(3,))
            if general:
                est.uniform = None
            res.append(est.forward([kernel], tol=0.0))
        (k, ), _, (err, ) = res[0]
        (k_gen, ), _, (err_gen, ) = res[1]
        if better:
            assert err < 0.5 * err_gen and np.max(np.abs(k - k_gen)) <= err + err_gen
        else:
            assert err == pytest.approx(err_gen, rel=1e-9)
            np.testing.assert_allclose(k, k_gen, rtol=1e-11, atol=1e-13)
