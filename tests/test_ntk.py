"""The NTK alongside the NNGP kernel (docs/theory.md §14).

Every map is checked against something computed here without the engine: closed forms (arc-cosine
kernels, explicit mixing matrices, explicit residual Jacobians), scipy quadrature, finite differences
of a wide LayerNorm, and the empirical NTK of finite networks (Jacobian products, montecarlo/ntk.py)
under the Student-t/Bonferroni criterion, which is also shown to reject wrong theories.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
from scipy import integrate
from scipy.special import ndtr

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop.errors import NotSupportedError
from kernelprop.kernel.maps import Context
from kernelprop.kernel.state import KernelState
from kernelprop.layers import Layer, register_layer, unregister_layer
from kernelprop.montecarlo.ntk import check_ntk, compare_ntk, simulate_ntk
from kernelprop.network.layers import (
    Activation,
    Attention,
    Dense,
    Dropout,
    GatedMLP,
    LayerNorm,
    Network,
    Parallel,
    Residual,
    RMSNorm,
    Scale,
)

SIGMA3 = np.array([[1.3, 0.4, -0.2], [0.4, 0.7, 0.3], [-0.2, 0.3, 1.1]])
EQ = I.equicorrelated(4, 1.0, 0.3)


def _final_ntk(net, inputs):
    return kp.propagate(net, inputs, ntk=True).ntk[-1]


# ------------------------------------------------------------------------------------------------
# closed forms and quadrature


def _arccos(sigma):
    """ReLU: ``K = √(q_i q_j)/(2π)(sin θ + (π − θ) cos θ)``, ``K' = (π − θ)/(2π)`` (Cho & Saul 2009)."""
    q = np.sqrt(np.diag(sigma))
    c = np.clip(sigma / np.outer(q, q), -1.0, 1.0)
    np.fill_diagonal(c, 1.0)
    th = np.arccos(c)
    return np.outer(q, q) * (np.sin(th) + (np.pi - th) * c) / (2 * np.pi), (np.pi - th) / (2 * np.pi)


def test_relu_mlp_ntk_is_the_arccosine_recursion_at_every_block():
    vw, vb = 1.7, 0.15
    net = Network(block=[Dense(weight_var=vw, bias_var=vb), Activation("relu")], depth=3,
                  final=[Dense(weight_var=vw, bias_var=vb)])
    traj = kp.propagate(net, I.gram(SIGMA3), ntk=True)
    sigma, theta = SIGMA3.copy(), np.zeros((3, 3))
    expected = [theta.copy()]
    for _ in range(3):
        sigma, theta = vw * sigma + vb, vw * (theta + sigma) + vb
        k, kp_ = _arccos(sigma)
        sigma, theta = k, theta * kp_
        expected.append(theta.copy())
    expected.append(vw * (theta + sigma) + vb)
    assert traj.labels == ["input", "block 1", "block 2", "block 3", "final"]
    np.testing.assert_allclose(traj.ntk, np.stack(expected), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(traj["ntk_mean"], [np.trace(t) / 3 for t in expected], rtol=1e-12)
    lam = np.linalg.eigvalsh(expected[-1])
    assert traj["ntk_cond"][-1] == pytest.approx(lam[-1] / lam[0], rel=1e-10)
    assert traj["ntk_cond"][0] == np.inf          # Θ = 0 at the input: singular, said so


@pytest.mark.parametrize("name, dphi, g, a, b", [
    ("tanh", lambda x: 1.0 - np.tanh(x) ** 2, 1.3, 0.8, 0.2),
    ("gelu", lambda x: ndtr(x) + x * np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi), 0.9, 1.1, 0.0),
])
def test_activation_ntk_is_theta_times_the_derivative_kernel_by_scipy_quadrature(name, dphi, g, a, b):
    sigma = SIGMA3[:2, :2]
    theta = np.array([[0.9, 0.35], [0.35, 1.4]])
    layer = Activation(name, scale=g, input_scale=a, input_shift=b)
    out, _ = layer.ntk_map(KernelState(sigma.copy(), np.zeros(2), (2,), ntk=theta), Context())
    chol = np.linalg.cholesky(sigma)

    def expect(i, j):
        def f(z2, z1):
            u = chol @ np.array([z1, z2])
            return dphi(a * u[i] + b) * dphi(a * u[j] + b) * np.exp(-0.5 * (z1 * z1 + z2 * z2)) / (2 * np.pi)
        return integrate.dblquad(f, -9, 9, -9, 9, epsabs=1e-11, epsrel=1e-11)[0]
    ref = np.array([[expect(0, 0), expect(0, 1)], [expect(0, 1), expect(1, 1)]]) * (g * a) ** 2 * theta
    np.testing.assert_allclose(out.ntk, ref, rtol=1e-7)
    assert out.ntk_error < 1e-6


@pytest.mark.parametrize("norm", [LayerNorm(gain=1.3, eps=0.05), RMSNorm(gain=0.8, eps=0.02)])
def test_norm_ntk_matches_finite_differences_of_a_wide_normalisation(norm):
    """Features with token means, an isotropic tangent field t (Θ = t tᵀ/d); the tangent of the exact
    normalisation by central differences; the projections drop at O(1/d)."""
    rng = np.random.default_rng(7)
    d = 40000
    mean = np.array([0.4, -0.3, 0.1])
    x = mean[:, None] + np.linalg.cholesky(SIGMA3) @ rng.standard_normal((3, d))
    theta = np.array([[1.0, 0.3, 0.2], [0.3, 0.8, -0.1], [0.2, -0.1, 1.2]])
    t = np.linalg.cholesky(theta) @ rng.standard_normal((3, d))

    def apply(z):
        zc = z - z.mean(axis=1, keepdims=True) if isinstance(norm, LayerNorm) else z
        return norm.gain * zc / np.sqrt((zc * zc).mean(axis=1, keepdims=True) + norm.eps)
    h = 1e-5
    dt = (apply(x + h * t) - apply(x - h * t)) / (2 * h)
    state = KernelState(x @ x.T / d, x.mean(axis=1), (3,), gaussian=False, ntk=t @ t.T / d)
    out, _ = norm.ntk_map(state, Context())
    np.testing.assert_allclose(out.ntk, dt @ dt.T / d, atol=2e-3)


def test_sums_of_weight_free_branches_are_explicit_jacobians_with_every_cross_term():
    """Dense, dropout, then y = 0.9x + 0.8·0.5·LN(x), y = x + 0.6 A x (A causal uniform), and a
    parallel sum of a Scale and an RMSNorm: Θ' = P Θ Pᵀ with each P written out here."""
    net = Network(block=[Dense(weight_var=1.5, bias_var=0.2), Dropout(0.2),
                         Residual(LayerNorm(gain=1.2), Scale(0.5), alpha=0.9, beta=0.8),
                         Residual(Attention(values="identity", projection="identity", causal=True), beta=0.6),
                         Parallel([Scale(-0.7)], [RMSNorm(gain=1.1)], alpha=1.0, betas=[0.3, 0.4])], depth=1)
    traj = kp.propagate(net, I.gram(SIGMA3), ntk=True, record="sublayers")
    sigma = 1.5 * SIGMA3 + 0.2
    theta = sigma.copy()                                     # Θ⁰ = 0: the dense layer's own terms
    sigma[np.diag_indices(3)] /= 0.8
    theta[np.diag_indices(3)] /= 0.8
    p = 0.9 * np.eye(3) + 0.4 * np.diag(1.2 / np.sqrt(np.diag(sigma)))
    theta = p @ theta @ p.T
    a = np.tril(np.ones((3, 3))) / np.arange(1, 4)[:, None]
    p = np.eye(3) + 0.6 * a
    theta = p @ theta @ p.T
    sigma = traj.kernels[-2]                                 # the NNGP entering the parallel sum
    p = (1.0 - 0.21) * np.eye(3) + 0.4 * np.diag(1.1 / np.sqrt(np.diag(sigma)))
    theta = p @ theta @ p.T
    np.testing.assert_allclose(traj.ntk[-1], theta, rtol=1e-12)


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("values", ["dense", "identity"])
def test_attention_ntk_with_alibi_heads_is_mixed_theta_plus_the_value_and_output_terms(values):
    sv, so = 1.3, 0.7
    net = Network(block=[Dense(weight_var=1.1), Attention(heads=2, bias="alibi", value_var=sv, out_var=so,
                                                          values=values)], depth=1)
    got = _final_ntk(net, I.gram(SIGMA3))
    sigma = 1.1 * SIGMA3
    theta = sigma.copy()
    dist = np.abs(np.subtract.outer(np.arange(3), np.arange(3)))
    heads = [_softmax(-(2.0 ** (-8 * h / 2)) * dist) for h in (1, 2)]
    mix = lambda m: sum(a @ m @ a.T for a in heads) / 2          # noqa: E731
    sv_eff, own = (sv, 2) if values == "dense" else (1.0, 1)
    np.testing.assert_allclose(got, sv_eff * so * (mix(theta) + own * mix(sigma)), rtol=1e-12)


@pytest.mark.parametrize("kw, mix", [
    (dict(matrix="shaped", alpha=1.0, beta=0.5, gamma=0.2, causal=True),
     lambda c: np.eye(3) + 0.3 * c),
    (dict(matrix="value_skipinit", alpha=0.8, beta=0.6),
     lambda c: 0.8 * np.eye(3) + 0.6 * np.full((3, 3), 1 / 3)),
])
def test_modified_zero_score_matrices_enter_the_ntk_as_fixed_mixings(kw, mix):
    net = Network(block=[Dense(weight_var=1.1, bias_var=0.1), Attention(value_var=0.9, out_var=1.4, **kw)], depth=1)
    got = _final_ntk(net, I.gram(SIGMA3))
    sigma = 1.1 * SIGMA3 + 0.1
    m = mix(np.tril(np.ones((3, 3))) / np.arange(1, 4)[:, None])
    np.testing.assert_allclose(got, 0.9 * 1.4 * (m @ sigma @ m.T + 2 * m @ sigma @ m.T), rtol=1e-12)


def test_tied_score_ntk_uses_the_deterministic_softmax_of_the_kernel():
    net = Network(block=[Dense(weight_var=0.9), Attention(scores="tied", qk_var=1.7, causal=True)], depth=1)
    got = _final_ntk(net, I.gram(SIGMA3))
    sigma = 0.9 * SIGMA3
    a = _softmax(1.7 * sigma + np.where(np.tril(np.ones((3, 3))) > 0, 0.0, -np.inf))
    np.testing.assert_allclose(got, a @ sigma @ a.T + 2 * a @ sigma @ a.T, rtol=1e-12)


def test_gated_mlp_ntk_with_a_linear_gate_is_the_product_rule_in_closed_form():
    vg, vu, vd = 1.4, 0.8, 1.7
    net = Network(block=[Dense(weight_var=1.2), GatedMLP("identity", gate_var=vg, up_var=vu, down_var=vd)], depth=1)
    got = _final_ntk(net, I.gram(SIGMA3))
    s = 1.2 * SIGMA3
    theta = s.copy()
    # h = g ⊙ u, g = x W_g, u = x W_u: ∂h = u ∂g + g ∂u; E[u_i u_j] = vu Σ_ij, E[g_i g_j] = vg Σ_ij
    ref = vd * (vu * s * vg * (theta + s) + vg * s * vu * (theta + s) + vg * vu * s * s)
    np.testing.assert_allclose(got, ref, rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# the empirical NTK of finite networks


def _pre_ln(scores="uniform", **kw):
    return Network(block=[Residual(LayerNorm(), Attention(heads=2, causal=True, scores=scores, **kw), beta=0.7),
                          Residual(LayerNorm(), Dense(weight_var=2.0), Activation("relu"), Dense(), beta=0.7)],
                   depth=2)


NETWORKS = {
    "relu_mlp": Network(block=[Dense(weight_var=2.0, bias_var=0.1), Activation("relu")], depth=2,
                        final=[Dense(bias_var=0.05)]),
    "pre_ln_uniform": _pre_ln(),
    "pre_ln_tied": Network(block=[Residual(LayerNorm(), Attention(heads=2, scores="tied", qk_var=2.0), beta=0.8),
                                  Residual(LayerNorm(), GatedMLP("silu", width_factor=2.0), beta=0.7)], depth=2),
    "post_ln": Network(block=[Residual(Attention(heads=2, value_var=1.2), beta=0.7), LayerNorm(gain=1.1),
                              Residual(Dense(weight_var=2.0), Activation("gelu"), Dense(), Dropout(0.1), beta=0.7),
                              LayerNorm(), Scale(1.1)], depth=2),
    "e_spa": Network(block=[Residual(LayerNorm(), Attention(spa="e-spa", causal=True), beta=0.8),
                            Residual(LayerNorm(), Dense(weight_var=2.0), Activation("relu"), Dense(), beta=0.6)],
                     depth=3),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_engine_ntk_agrees_with_the_empirical_ntk_of_finite_networks(name):
    inputs = I.equicorrelated(3, 1.0, 0.4, sequences=2, cross_rho=0.2) if name == "pre_ln_uniform" else EQ
    cmp, traj, sim, half = check_ntk(NETWORKS[name], inputs, 256, 32, directions=2, seed=11)
    assert (sim.width, half.width) == (256, 128)
    assert cmp.agree, [(r.position, r.theory, r.estimate, r.se) for r in cmp.rows if not r.ok]
    assert cmp.n_tested == inputs.n_tokens * (inputs.n_tokens + 1) // 2
    # the estimate is informative: its standard errors are a few percent of Θ
    assert np.max(sim.stderr / np.abs(traj.ntk[-1])) < 0.15


def test_the_criterion_rejects_a_theory_that_misses_a_weight_or_confuses_theta_with_sigma():
    net = _pre_ln()
    cmp, traj, sim, half = check_ntk(net, EQ, 256, 32, directions=2, seed=3)
    assert cmp.agree
    # without the value weights' own term (values as an identity map: same NNGP, σ_v² = 1)
    no_values = _pre_ln(values="identity")
    wrong = kp.propagate(no_values, EQ, ntk=True)
    np.testing.assert_allclose(wrong.kernels[-1], traj_sigma(net), rtol=1e-12)
    assert not compare_ntk(wrong.ntk[-1], sim, half).agree
    # the NNGP kernel in place of the NTK
    mlp = NETWORKS["relu_mlp"]
    cmp2, traj2, sim2, half2 = check_ntk(mlp, EQ, 256, 32, seed=5)
    assert cmp2.agree
    assert not compare_ntk(kp.propagate(mlp, EQ).kernels[-1], sim2, half2).agree


def traj_sigma(net):
    return kp.propagate(net, EQ).kernels[-1]


def test_the_tied_query_key_weights_share_of_the_empirical_ntk_vanishes_like_one_over_width():
    """The engine drops the tied matrix's own term (O(1/d) under 1/d scores); the empirical NTK keeps it.
    Its share falls about 8-fold from d = 64 to d = 512 (an O(1) term would stay put), and at d = 512
    it is below 0.5% of the mean diagonal of Θ."""
    net = Network(block=[Residual(LayerNorm(), Attention(heads=2, scores="tied", qk_var=3.0), beta=1.0)], depth=1)
    a, b = (simulate_ntk(net, EQ, w, 32, seed=2).parts["queries"].mean() for w in (64, 512))
    assert a > 0 and b > 0
    assert a / b > 3.0, (a, b)
    assert b < 0.005 * np.trace(_final_ntk(net, EQ)) / 4


# ------------------------------------------------------------------------------------------------
# records, refusals, CLI


def test_the_ntk_option_leaves_the_nngp_records_unchanged():
    net = NETWORKS["post_ln"]
    a, b = kp.propagate(net, EQ), kp.propagate(net, EQ, ntk=True)
    np.testing.assert_array_equal(a.kernels, b.kernels)
    assert a.ntk is None and b.ntk.shape == (len(b), 4, 4)
    assert b["ntk_error"].shape == (len(b),)


def test_standard_scores_and_layers_without_an_ntk_map_are_refused_by_name():
    net = Network(block=[Residual(LayerNorm(), Attention(scores="standard"), beta=0.5)], depth=1)
    with pytest.raises(NotSupportedError, match="standard 1/sqrt"):
        kp.propagate(net, EQ, ntk=True)

    @register_layer
    @dataclass(frozen=True, eq=False)
    class Halve(Layer):
        kind = "halve_for_ntk_test"

        def kernel_map(self, s, ctx):
            return s.replace(sigma=0.25 * s.sigma, mean=0.5 * s.mean), lambda pi, grads: 0.25 * pi

    try:
        with pytest.raises(NotSupportedError, match="has no NTK map"):
            kp.propagate(Network(block=[Dense(), Halve()], depth=1), EQ, ntk=True)
    finally:
        unregister_layer("halve_for_ntk_test")
    with pytest.raises(NotSupportedError, match="numeric weight variances"):
        simulate_ntk(Network(block=[Dense(weight_var="unit")], depth=1), EQ, 32, 2)


def test_cli_run_with_ntk_prints_and_writes_the_ntk_measures(tmp_path):
    from typer.testing import CliRunner

    from cli import app
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["run", "pre_ln", "-L", "2", "--ntk", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "ntk" in res.output
    rec = json.loads(out.read_text())["records"]
    spec = kp.models.load("pre_ln", depth=2)
    traj = kp.propagate(spec.network, spec.inputs, ntk=True)
    assert [r["ntk_mean"] for r in rec] == pytest.approx(list(traj["ntk_mean"]), rel=1e-12)


def test_attention_biases_enter_the_ntk_as_the_empirical_jacobian_says():
    """y = A(X W_V + 1b_Vᵀ) W_O + 1b_Oᵀ in NTK parametrisation, A causal uniform: the empirical NTK summed
    parameter by parameter (∂y/∂ω_V, ∂y/∂β_V, ∂y/∂ω_O, ∂y/∂β_O written out, random weights at width 512,
    8 networks) against the engine's Θ; the biases carry ~40% of Θ here."""
    from kernelprop.layers import Attention
    sv, so, bv, bo, t, d = 1.3, 0.7, 0.5, 0.4, 5, 512
    x_in = I.equicorrelated(t, 1.0, 0.3)
    net = kp.Network(block=[Attention(heads=1, causal=True, value_var=sv, out_var=so, value_bias_var=bv,
                                      out_bias_var=bo)], depth=1)
    theta = kp.propagate(net, x_in, ntk=True).ntk[-1]
    a = np.tril(np.ones((t, t)))
    a /= a.sum(axis=1, keepdims=True)
    rng = np.random.default_rng(17)
    chol = np.linalg.cholesky(x_in.sigma)
    est = []
    for _ in range(8):
        x = chol @ rng.standard_normal((t, d))                      # X Xᵀ/d ≈ Σ
        w_v = rng.standard_normal((d, d)) * np.sqrt(sv / d)
        w_o = rng.standard_normal((d, d)) * np.sqrt(so / d)
        b_v = rng.standard_normal(d) * np.sqrt(bv)
        z = a @ (x @ w_v + b_v)
        wo2 = np.sum(w_o ** 2) / d
        ax = a @ x
        a1 = a @ np.ones(t)
        est.append((sv / d) * (ax @ ax.T) * wo2 + bv * np.outer(a1, a1) * wo2 + (so / d) * (z @ z.T) + bo)
    est = np.array(est)
    mean, se = est.mean(axis=0), est.std(axis=0, ddof=1) / np.sqrt(len(est))
    assert np.all(np.abs(mean - theta) <= 5 * se + 0.02 * np.abs(theta)), np.max(np.abs(mean - theta))
    no_bias = kp.propagate(kp.Network(block=[Attention(heads=1, causal=True, value_var=sv, out_var=so)], depth=1),
                           x_in, ntk=True).ntk[-1]
    assert np.min(theta - no_bias) > 0.3
