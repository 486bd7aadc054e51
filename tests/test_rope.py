"""RoPE (Su et al. 2021) on attention scores: ρ(Δ) against quadrature, its large-D limit and the rotary matrices
themselves; the score law and the backward terms against brute force; every rule against the Monte Carlo
(forward and backward, docs/theory.md §12), with the power to reject the maps without RoPE."""

import dataclasses

import numpy as np
import pytest
from scipy.integrate import quad

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop import montecarlo as mc
from kernelprop import symbolic as S
from kernelprop.errors import NotSupportedError, SpecError
from kernelprop.layers import Attention, LayerNorm
from kernelprop.layers.attention import layer as AL
from kernelprop.layers.attention import matrices as MX
from kernelprop.layers.attention import rope
from kernelprop.montecarlo import backward as MB
from kernelprop.montecarlo import sampler as MS
from kernelprop.network.layers import Network

EQ = I.equicorrelated(6, 1.0, 0.5)
TWO = I.equicorrelated(4, 1.0, 0.5, sequences=2, cross_rho=0.3)
HI = I.equicorrelated(6, 1.0, 0.7)


def rho_quad(delta, theta):
    """``∫₀¹ cos(θ^{−u} Δ) du`` by adaptive quadrature (independent of the closed form)."""
    return quad(lambda u: np.cos(theta ** -u * delta), 0.0, 1.0, epsabs=1e-14, epsrel=1e-13, limit=400)[0]


# ----------------------------------------------------------------------------------------------
# ρ(Δ)


@pytest.mark.parametrize("theta", [10.0, 100.0, 10000.0, 500000.0])
def test_rho_closed_form_equals_the_frequency_integral(theta):
    """``(Ci|Δ| − Ci(|Δ|/θ))/ln θ = ∫₀¹ cos(θ^{−u}Δ) du`` to 1e-10 for offsets up to 200."""
    d = np.array([0, 1, 2, 3, 5, 8, 13, 40, 200])
    want = np.array([rho_quad(x, theta) for x in d])
    np.testing.assert_allclose(rope.rho(d, theta), want, rtol=0, atol=1e-10)
    np.testing.assert_allclose(rope.rho(-d, theta), want, rtol=0, atol=1e-10)          # even in Δ


@pytest.mark.parametrize("theta,fraction", [(10.0, 1.0), (10000.0, 1.0), (100.0, 0.5)])
def test_finite_sum_tends_to_the_integral_at_the_euler_maclaurin_rate(theta, fraction):
    """The rotated part is a left Riemann sum of ∫₀¹ cos(θ^{−u}Δ) du with step 2/(rD), weighted r, so
    ``D (ρ_D − ρ_∞) → cos Δ − cos(Δ/θ)`` for every r (the leading Euler-Maclaurin term, by hand here)."""
    d = np.array([1, 2, 5, 9])
    inf = rope.rho(d, theta, None, fraction)
    big = 1 << 15
    got = big * (rope.rho(d, theta, big, fraction) - inf)
    want = np.cos(d) - np.cos(d / theta)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)
    assert np.max(np.abs(rope.rho(d, theta, 64, fraction) - inf)) > 1e-3      # it is a finite-D effect


def test_rho_is_the_normalised_trace_of_the_rotary_matrix():
    """The Monte Carlo's rotation of a head (d_k = 32 repeating rope_dim = 16's frequencies, half the dims
    rotated) applied to the identity: ``tr R(Δ)/d_k = ρ(Δ)`` of the engine, for every offset."""
    layer = Attention(scores="tied", rope_theta=50.0, rope_dim=16, rope_fraction=0.5)
    n_rot, omegas = rope.mc_frequencies(layer, 32)
    assert n_rot == 16 and len(omegas) == 8
    for delta in range(-7, 8):
        r = rope.rotate(np.eye(32)[None], np.full(32, delta), omegas, n_rot, 1)[0]
        assert np.trace(r) / 32 == pytest.approx(float(rope.layer_rho(layer, delta)), abs=1e-14)
        np.testing.assert_allclose(r @ r.T, np.eye(32), atol=1e-14)                    # a rotation


@pytest.mark.parametrize("kw", [dict(rope_theta=10.0), dict(rope_theta=10000.0, rope_dim=8),
                                dict(rope_theta=100.0, rope_dim=64, rope_fraction=0.25)])
def test_cosine_expansion_and_lag_factor_reproduce_rho(kw):
    """The backward rule's ``Σ_n c_n cos(ω_n δ)`` equals ρ on every offset |δ| ≤ 2(T−1), and the draw's factor
    has ``G Gᵀ = [ρ(a − b)]`` (rounding only)."""
    layer = Attention(scores="standard", **kw)
    t = 7
    c, w = rope.spectrum(layer, t)
    d = np.arange(-2 * (t - 1), 2 * (t - 1) + 1)
    np.testing.assert_allclose(np.cos(np.outer(d, w)) @ c, rope.layer_rho(layer, d), rtol=0, atol=1e-13)
    g = rope.lag_factor(layer, t)
    lags = np.arange(-(t - 1), t)
    np.testing.assert_allclose(g @ g.T, rope.layer_rho(layer, lags[:, None] - lags[None, :]), rtol=0, atol=1e-13)


# ----------------------------------------------------------------------------------------------
# the score laws


def test_standard_rope_scores_have_the_stated_covariance():
    """``Cov(S_ij, S_kl) = σ_qk² Σ_ik Σ_jl ρ((j−i) − (l−k))`` (positions within each sequence; two sequences of
    3): 40000 draws, every pair of entries within its Bonferroni bound (family-wise 0.01, normal SE of the
    sample covariance from the fourth moments). The law without the ρ factor lies far outside it."""
    layer = Attention(scores="standard", qk_var=1.7, rope_theta=10.0)
    sigma = I.equicorrelated(3, 1.0, 0.6, sequences=2, cross_rho=0.4).sigma
    segs = (3, 3)
    draw = MX.score_sampler(layer, sigma, segs, seed=(4,))
    n = 40000
    s = np.stack([draw() for _ in range(n)]).reshape(n, -1)
    pos = rope.positions(segs)
    ii, jj = np.divmod(np.arange(36), 6)
    delta = pos[jj] - pos[ii]
    cov = 1.7 * sigma[ii[:, None], ii[None, :]] * sigma[jj[:, None], jj[None, :]]
    want = cov * rope.layer_rho(layer, delta[:, None] - delta[None, :])
    prod = s[:, :, None] * s[:, None, :]
    got, se = prod.mean(0), prod.std(0) / np.sqrt(n)
    iu = np.triu_indices(36)
    k = 4.9       # Φ⁻¹(1 − 0.005/666), 666 entries
    z = (got - want)[iu] / se[iu]
    assert np.max(np.abs(z)) < k, np.max(np.abs(z))
    assert np.max(np.abs((got - cov)[iu] / se[iu])) > 20          # RoPE changes the law measurably


def test_tied_rope_kernel_is_the_explicit_softmax():
    """Tied 1/d scores with RoPE: ``A = softmax(σ_qk² Σ_ij ρ(j − i) + mask)`` built here with quadrature ρ."""
    rng = np.random.default_rng(2)
    f = rng.standard_normal((5, 8))
    sigma = f @ f.T / 8
    layer = Attention(scores="tied", qk_var=1.3, causal=True, rope_theta=20.0, value_var=1.1, out_var=0.9)
    r = np.array([[rho_quad(j - i, 20.0) for j in range(5)] for i in range(5)])
    z = 1.3 * sigma * r + np.where(np.tri(5) > 0, 0.0, -np.inf)
    a = np.exp(z - z.max(1, keepdims=True))
    a /= a.sum(1, keepdims=True)
    out = kp.propagate(Network(block=[layer], depth=1), I.gram(sigma))
    np.testing.assert_allclose(out.kernels[1], 0.99 * a @ sigma @ a.T, rtol=1e-10)


def _brute(a_blocks, vals, keys, pi, pos, rhof, rescale):
    """Explicit loops: ``T_ik = Σ_jl (J_i V J_k)_jl K_jl ρ(Δ_ij − Δ_kl)``, ``q = Σ_ik Π_ik K_ik T_ik`` and
    ``r_j r_l [Π ⊙ T + Σ_ik Π_ik K_ik (J_i V J_k)_jl ρ(…)]``."""
    n = len(pos)
    a = np.zeros((n, n))
    start = 0
    for blk in a_blocks:
        t = len(blk)
        a[start:start + t, start:start + t] = blk
        start += t
    jac = [np.diag(a[i]) - np.outer(a[i], a[i]) for i in range(n)]
    t = np.zeros((n, n))
    k2 = np.zeros((n, n))
    for i in range(n):
        for k in range(n):
            x = jac[i] @ vals @ jac[k]
            rr = np.array([[rhof((pos[j] - pos[i]) - (pos[l] - pos[k])) for l in range(n)] for j in range(n)])
            t[i, k] = np.sum(x * keys * rr)
            k2 += pi[i, k] * keys[i, k] * x * rr
    q = float(np.sum(pi * keys * t))
    return q, (pi * t + k2) * np.outer(rescale, rescale)


def test_score_terms_with_rope_and_qk_norm_against_brute_force():
    """The backward score terms through softmax Jacobians with RoPE's ρ and QK-norm's C and 1/√Σ_ii
    (docs/theory.md §11), against explicit quadruple loops, on two sequences (cross-sequence pairs included)."""
    rng = np.random.default_rng(7)
    segs = (4, 3)
    n = 7
    f = rng.standard_normal((n, 9))
    sigma = f @ f.T / 9 + 0.2
    g = rng.standard_normal((n, 9))
    pi = g @ g.T / 9
    blocks = []
    for t in segs:
        z = rng.standard_normal((t, t)) * 1.5
        e = np.exp(z)
        blocks.append(e / e.sum(1, keepdims=True))
    layer = Attention(scores="standard", rope_theta=10.0, rope_dim=6, qk_norm="rmsnorm")
    heads = [(1.0, MX.Dense(segs, blocks))]
    opts = layer.score_options(sigma, segs)
    keys = opts["keys"]
    np.testing.assert_allclose(keys, sigma / np.sqrt(np.outer(np.diag(sigma), np.diag(sigma))), rtol=1e-14)
    vals = 1.3 * sigma + 0.4                     # values with a bias: the Jacobians remove the constant
    q, extra = AL.score_terms(heads, vals, pi, True, segments=segs, **opts)
    pos = rope.positions(segs)
    bq, bextra = _brute(blocks, vals, keys, pi, pos, lambda d: float(rope.layer_rho(layer, d)), opts["rescale"])
    assert q == pytest.approx(bq, rel=1e-11)
    np.testing.assert_allclose(extra, bextra, rtol=1e-10, atol=1e-13)
    # a long rope_dim uses the Fourier series of ρ on the offsets met instead of its frequencies: same terms
    wide = dataclasses.replace(layer, rope_dim=512)
    q2, extra2 = AL.score_terms(heads, vals, pi, True, segments=segs, **wide.score_options(sigma, segs))
    bq2, bextra2 = _brute(blocks, vals, keys, pi, pos, lambda d: float(rope.layer_rho(wide, d)), opts["rescale"])
    assert q2 == pytest.approx(bq2, rel=1e-11)
    np.testing.assert_allclose(extra2, bextra2, rtol=1e-10, atol=1e-13)


def test_identity_attention_query_term_with_rope_against_brute_force():
    """Identity attention (J_i = the identity on the keys row i sees): ``Σ_ik Π_ik K_ik T_ik`` with
    ``T_ik = Σ_jl M_ij M_kl V_jl K_jl ρ(…)``, by explicit loops."""
    rng = np.random.default_rng(11)
    f = rng.standard_normal((5, 7))
    sigma = f @ f.T / 7
    pi = np.eye(5) + 0.3
    layer = Attention(scores="tied", attention="identity", rope_theta=15.0)
    opts = layer.score_options(sigma, (5,))
    vals = sigma + 0.25
    got = AL._identity_score_term(vals, pi, (5,), True, **opts)
    want = 0.0
    for i in range(5):
        for k in range(5):
            for j in range(i + 1):
                for l in range(k + 1):
                    want += pi[i, k] * sigma[i, k] * vals[j, l] * sigma[j, l] * rho_quad((j - i) - (l - k), 15.0)
    assert got == pytest.approx(want, rel=1e-9)


# ----------------------------------------------------------------------------------------------
# the finite-width rule: its pullback is the exact transpose (central differences)

FD_LAYERS = {
    "tied rope causal": Attention(heads=2, scores="tied", qk_var=1.5, causal=True, rope_theta=10.0),
    "standard rope_dim fraction + layernorm": Attention(heads=2, scores="standard", qk_var=2.0, rope_theta=10.0,
                                                        rope_dim=4, rope_fraction=0.5, qk_norm="layernorm"),
    "tied rmsnorm + biases": Attention(heads=2, scores="tied", qk_var=1.5, qk_norm="rmsnorm", value_bias_var=0.3,
                                       out_bias_var=0.2),
    "identity rope + value bias": Attention(heads=2, scores="tied", attention="identity", qk_var=0.5,
                                            rope_theta=10.0, value_bias_var=0.3),
}


def _fd_setup(layer, weights_hook=None, width=8, seeds=2, segments=(3, 3)):
    gens = [np.random.default_rng([11, s]) for s in range(seeds)]
    ctx = MS.Context(gens, width, segments, products="explicit")
    bctx = MS.Context([np.random.default_rng([12, s]) for s in range(seeds)], width, segments)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((seeds, sum(segments), width))
    states = [g.bit_generator.state for g in gens]

    def f(x):
        for g, st in zip(gens, states):
            g.bit_generator.state = st
        return MS.forward(layer, x, ctx)
    gy = rng.standard_normal(f(x).shape)

    def taped():
        for g, st in zip(gens, states):
            g.bit_generator.state = st
        y, node = MB.tape(layer, x, ctx, bctx, "attn")
        np.testing.assert_allclose(y, f(x), rtol=1e-13, atol=1e-13)     # the tape re-runs the same network
        for g, st in zip(gens, states):
            g.bit_generator.state = st
        y, node = MB.tape(layer, x, ctx, bctx, "attn")
        grads = []
        return node(gy, grads), {kind: v for _, kind, v in grads}
    return x, gy, f, taped


@pytest.mark.parametrize("name", FD_LAYERS)
def test_monte_carlo_pullback_matches_finite_differences(name):
    """``G_X`` of ``L = Σ G_Y ⊙ f(X)`` through rotations, QK-norm and biases, against central differences of the
    sampler's own forward (two sequences)."""
    x, gy, f, taped = _fd_setup(FD_LAYERS[name])
    gx, _ = taped()
    h = 1e-5
    fd = np.zeros_like(x)
    for i in range(x.shape[1]):
        for k in range(x.shape[2]):
            e = np.zeros_like(x)
            e[:, i, k] = h
            fd[:, i, k] = (np.sum(gy * f(x + e), axis=(1, 2)) - np.sum(gy * f(x - e), axis=(1, 2))) / (2 * h)
    np.testing.assert_allclose(gx, fd, rtol=1e-6, atol=1e-7 * np.abs(fd).max())


def test_monte_carlo_query_norm_matches_finite_differences(monkeypatch):
    """Standard scores with RoPE and QK-norm: the recorded ``queries`` norm is ``‖∂L/∂W_Q‖²/d`` (central
    differences over every entry of W_Q, the second weight matrix drawn)."""
    layer = FD_LAYERS["standard rope_dim fraction + layernorm"]
    original, perturb, count = MS.weights, {}, [0]

    def weights(ctx, fan_in, fan_out, var, init="gaussian"):
        w = original(ctx, fan_in, fan_out, var, init)
        i = count[0]
        count[0] += 1
        return w + perturb[i] if i in perturb else w
    monkeypatch.setattr(MS, "weights", weights)
    x, gy, f, taped = _fd_setup(layer)
    count[0] = 0
    _, got = taped()
    h, total = 1e-5, np.zeros(x.shape[0])
    for a in range(8):
        for c in range(8):
            e = np.zeros((x.shape[0], 8, 8))
            e[:, a, c] = h
            perturb[1] = e
            count[0] = 0
            up = np.sum(gy * f(x), axis=(1, 2))
            perturb[1] = -e
            count[0] = 0
            total += ((up - np.sum(gy * f(x), axis=(1, 2))) / (2 * h)) ** 2
    assert np.all(total > 1e-3)
    np.testing.assert_allclose(got["queries"], total / 8, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# against the Monte Carlo


@pytest.mark.parametrize("layer", [
    Attention(heads=2, scores="tied", qk_var=2.0, causal=True, rope_theta=10.0),
    Attention(heads=2, scores="tied", qk_var=2.0, rope_theta=100.0, rope_dim=16, rope_fraction=0.5, bias="alibi"),
    Attention(heads=2, scores="tied", qk_var=0.5, attention="identity", rope_theta=10.0),
], ids=["tied causal", "tied rope_dim fraction alibi", "identity"])
def test_tied_rope_agrees_with_the_monte_carlo(layer):
    """Two blocks, forward and backward (query-gradient norms included); without rope_dim the simulated heads
    use their own d_k's frequencies (an O(1/d_k) bias the Richardson pair removes)."""
    for x in (EQ, TWO):
        cmp, *_ = mc.check(Network(block=[LayerNorm(), layer], depth=2), x, 192, 16, gradients=True)
        assert cmp.agree, (x.segments, cmp.criterion(), cmp.failures[:3])


@pytest.mark.parametrize("layer", [
    Attention(heads=2, scores="standard", qk_var=2.0, causal=True, rope_theta=10.0),
    Attention(heads=2, scores="standard", qk_var=2.0, rope_theta=100.0, rope_dim=8, rope_fraction=0.5),
    Attention(heads=2, scores="standard", qk_var=2.0, rope_theta=10.0, values="identity", projection="identity"),
], ids=["standard causal", "standard rope_dim fraction", "standard weight-free"])
def test_standard_rope_agrees_with_the_monte_carlo(layer):
    """One layer (the engine's standard-score kernel is exact for one layer, docs/theory.md §2.1), forward and
    backward with the score path."""
    for x in (EQ, TWO):
        cmp, *_ = mc.check(Network(block=[layer], depth=1), x, 256, 32, gradients=True)
        assert cmp.agree, (x.segments, cmp.criterion(), cmp.failures[:3])


def _without_rope(layer):
    return dataclasses.replace(layer, rope_theta=None, rope_dim=None, rope_fraction=1.0)


@pytest.mark.parametrize("layer", [
    Attention(heads=2, scores="tied", qk_var=2.0, rope_theta=10.0),
    Attention(heads=2, scores="standard", qk_var=2.0, rope_theta=10.0),
], ids=["tied", "standard"])
def test_the_monte_carlo_rejects_the_maps_without_rope(layer):
    """Power: the same simulation that agrees with the RoPE maps rejects the maps without RoPE, forward (the
    whole comparison) and in the query-gradient norm, where RoPE roughly doubles the standard-score value."""
    net = Network(block=[layer], depth=1)
    cmp, _, main, half = mc.check(net, HI, 256, 128, gradients=True)
    assert cmp.agree, cmp.failures[:3]
    alt = Network(block=[_without_rope(layer)], depth=1)
    fwd = mc.compare(kp.propagate(alt, HI), main.forward, half.forward)
    assert not fwd.agree, fwd.max_abs_z
    grads = mc.compare_gradients(kp.backpropagate(alt, HI), main, half)
    row = next(r for r in grads.rows if r.measure == "norm_queries")
    assert abs(row.z) > cmp.k, (row.theory, row.estimate, row.se)


def test_the_monte_carlo_rejects_the_backward_without_the_rope_factor(monkeypatch):
    """The forward with RoPE but the score path of the backward without ρ: the query-gradient norm
    (with ρ 0.152, without 0.081; simulated 0.158 ± 0.015) is then rejected by the simulation at more than its k."""
    layer = Attention(heads=2, scores="standard", qk_var=2.0, rope_theta=10.0)
    net = Network(block=[layer], depth=1)
    cmp, th, main, half = mc.check(net, HI, 256, 128, gradients=True)
    assert cmp.agree, cmp.failures[:3]
    full = Attention.score_options

    def without(self, *args, **kwargs):
        opts = full(self, *args, **kwargs)
        opts.pop("rope")
        return opts
    monkeypatch.setattr(Attention, "score_options", without)
    grads = mc.compare_gradients(kp.backpropagate(net, HI), main, half)
    row = next(r for r in grads.rows if r.measure == "norm_queries")
    ok = next(r for r in cmp.parts["gradients"].rows if r.measure == "norm_queries")
    assert abs(ok.z) < cmp.k < abs(row.z), (ok.theory, row.theory, row.estimate, row.se)


# ----------------------------------------------------------------------------------------------
# symbolic engine, spec errors


def test_symbolic_explicit_mode_agrees_and_the_equicorrelated_mode_refuses():
    layer = Attention(heads=2, scores="tied", qk_var=1.5, causal=True, rope_theta=10.0, rope_dim=8)
    net = Network(block=[LayerNorm(), layer], depth=2)
    x = I.equicorrelated(3, 1.0, 0.4, sequences=2, cross_rho=0.2)
    sym = S.evaluate(S.block_map(net, mode="explicit", tokens=(3, 3), simplify_seconds=0), x)
    np.testing.assert_allclose(sym.kernels, kp.propagate(net, x).kernels, rtol=1e-12)
    with pytest.raises(NotSupportedError, match="RoPE makes the logits depend on the offset"):
        S.block_map(Network(block=[dataclasses.replace(layer, causal=False)], depth=1))


@pytest.mark.parametrize("kw, field", [
    (dict(rope_theta=10000.0), "attention.rope_theta"),                          # uniform scores: zero queries
    (dict(scores="tied", rope_theta=-5.0), "attention.rope_theta"),
    (dict(scores="tied", rope_theta=1.0), "attention.rope_theta"),
    (dict(scores="tied", rope_theta=100.0, rope_dim=7), "attention.rope_dim"),
    (dict(scores="tied", rope_dim=8), "attention.rope_dim"),
    (dict(scores="tied", rope_theta=100.0, rope_fraction=1.5), "attention.rope_fraction"),
    (dict(scores="tied", rope_fraction=0.5), "attention.rope_fraction"),
    (dict(scores="tied", rope_theta=100.0, rope_dim=8, rope_fraction=0.3), "attention.rope_fraction"),   # 2.4 dims
    (dict(scores="tied", rope_theta=100.0, rope_dim=8, rope_fraction=0.625), "attention.rope_fraction"),  # 5 dims
])
def test_bad_rope_fields_are_spec_errors(kw, field):
    with pytest.raises(SpecError, match=field):
        Attention(**kw)


def test_monte_carlo_key_width_must_fit_rope_dim():
    """rope_dim = 12 does not divide the simulated d_k = 16: refused before any draw, naming the field."""
    net = Network(block=[Attention(heads=2, scores="tied", rope_theta=100.0, rope_dim=12)], depth=1)
    with pytest.raises(SpecError, match="rope_dim"):
        mc.simulate(net, EQ, 32, 2)


def test_rope_from_a_spec_file():
    spec = kp.loads('depth = 1\n[input]\nkind = "equicorrelated"\ntokens = 4\nrho = 0.5\n[[block]]\n'
                    'type = "attention"\nscores = "tied"\nrope_theta = 10000.0\nrope_dim = 64\n')
    layer = spec.network.block.layers[0]
    assert layer.rope_theta == 10000.0 and layer.rope_dim == 64
    assert np.all(np.isfinite(kp.propagate(spec.network, spec.inputs).kernels[-1]))
