"""Backward pass against closed forms and explicit Jacobian algebra."""

import numpy as np
import pytest

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop.errors import SpecError
from kernelprop.kernel import backward as B
from kernelprop.layers.attention import score_terms
from kernelprop.network.layers import Activation, Attention, Dense, LayerNorm, Network, Residual


def test_he_initialised_relu_mlp_preserves_the_gradient_norm():
    net = Network(block=[Dense(weight_var=2.0), Activation("relu")], depth=30)
    g = B.backpropagate(net, I.equicorrelated(4, 1.0, 0.3))
    np.testing.assert_allclose(g["grad_q_mean"], 1.0, rtol=1e-13)   # σ_w² E[relu'²] = 2 · 1/2
    assert g.diagnosis().startswith("stable")
    # the gradient correlation follows the ReLU derivative map (π − θ)/(2π) times 2, from the output down
    off = g.kernels[:, 0, 1]
    fwd = kp.propagate(net, I.equicorrelated(4, 1.0, 0.3), record="sublayers")
    # Π_in(block l) = 2 (π − θ_l)/(2π) ⊙ Π_out, θ_l the angle entering block l's ReLU (after its Dense)
    pre = [k for lab, k in zip(fwd.labels, fwd.kernels) if lab.endswith("0:dense")]
    theta = [np.arccos(np.clip(k[0, 1] / k[0, 0], -1, 1)) for k in pre]
    np.testing.assert_allclose(off, 0.0, atol=1e-15)
    g2 = B.backpropagate(net, I.equicorrelated(4, 1.0, 0.3), output_grad="equicorrelated", rho=0.5)
    p = 0.5
    for l in range(30, 0, -1):
        p = p * 2 * (np.pi - theta[l - 1]) / (2 * np.pi)
        assert g2.kernels[l - 1][0, 1] == pytest.approx(p, rel=1e-12)


def test_weight_free_residual_backward_is_the_transposed_jacobian():
    t = 6
    a = np.tril(np.ones((t, t)))
    a /= a.sum(1, keepdims=True)
    net = Network(block=[Residual(Attention(causal=True, values="identity", projection="identity"),
                                  alpha=0.8, beta=1.3)], depth=4)
    pi0 = np.eye(t) + 0.2
    g = B.backpropagate(net, I.equicorrelated(t, 1.0, 0.1), output_grad=pi0 / pi0.max())
    j = 0.8 * np.eye(t) + 1.3 * a                 # y = J x: Π_x = Jᵀ Π_y J
    p = pi0 / pi0.max()
    for _ in range(4):
        p = j.T @ p @ j
    np.testing.assert_allclose(g.kernels[0], p, rtol=1e-12)


def test_pre_ln_residual_cross_term_through_layernorm_and_mixing():
    """Branch LN → weight-free mixing: linear part P = M diag(g/s); Π_x = α²Π + β²PᵀΠP + αβ(PᵀΠ + ΠP)."""
    t = 5
    x = I.equicorrelated(t, 2.0, 0.3)
    net = Network(block=[Residual(LayerNorm(gain=0.7), Attention(values="identity", projection="identity"),
                                  alpha=1.0, beta=0.5)], depth=1)
    g = B.backpropagate(net, x)
    m = np.full((t, t), 1 / t)
    p = m @ np.diag(0.7 / np.sqrt(np.diag(x.sigma)))
    j = np.eye(t) + 0.5 * p
    np.testing.assert_allclose(g.kernels[0], j.T @ j, rtol=1e-12)


def naive_query_trace(a, s):
    t = len(a)
    jac = [np.diag(a[i]) - np.outer(a[i], a[i]) for i in range(t)]
    return np.array([[np.trace(jac[i] @ s @ jac[k] @ s) for k in range(t)] for i in range(t)])


def test_query_gradient_trace_formula_matches_the_definition():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 20))
    s = x @ x.T / 20
    logits = rng.standard_normal((7, 7))
    a = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pi = np.eye(7) + 0.1
    from kernelprop.layers.attention.matrices import Dense as DenseMix
    got, _ = score_terms([(1.0, DenseMix((7,), [a]))], s, pi, with_pi=False)
    assert got == pytest.approx(np.sum(pi * s * naive_query_trace(a, s)), rel=1e-12)


def test_query_gradient_vanishes_under_rank_collapse_but_value_gradient_does_not():
    """Π_L = I. Values: ⟨AΣAᵀ, Π⟩ = tr(AΣAᵀ) = 1.7·6 for Σ = 1.7·11ᵀ (A row-stochastic). Queries on
    orthonormal tokens: Σ_i tr(J_i²) with J_i = (1/i)I_i − (1/i²)11ᵀ (causal mean, 1-based), = Σ_i (1/i − 1/i²).
    Before: values > 0.1 and queries > 1e-3."""
    collapsed = I.Inputs(np.full((6, 6), 1.7), (6,))     # identical tokens: Σ ∝ 11ᵀ
    net = Network(block=[Attention(causal=True)], depth=1)
    g = B.backpropagate(net, collapsed)
    kinds = {k: val for _, _, _, k, val in g.grads}
    assert kinds["queries"] == pytest.approx(0.0, abs=1e-12)
    assert kinds["values"] == pytest.approx(1.7 * 6, rel=1e-13)
    g = B.backpropagate(net, I.identity(6))
    i = np.arange(1, 7)
    a = np.tril(np.ones((6, 6))) / i[:, None]
    want = float(np.sum(1 / i - 1 / i ** 2))
    assert want == pytest.approx(float(np.trace(naive_query_trace(a, np.eye(6)))), rel=1e-13)
    assert {k: val for _, _, _, k, val in g.grads}["queries"] == pytest.approx(want, rel=1e-12)


def test_one_over_sqrt_depth_keeps_query_gradients_alive():
    """Noci et al. 2022: with branch weight 1 the ratio of query to value gradient norms collapses with
    depth; with 1/sqrt(L) it stays of order one."""
    from kernelprop.methods import presets
    x = I.equicorrelated(16, 1.0, 0.1)
    ratios = {}
    for name in ("pre_ln", "noci"):
        g = B.backpropagate(presets.build(name, 64, heads=1, causal=False), x, keep_kernels=False)
        _, q = g.grad_norms("queries")
        _, v = g.grad_norms("values")
        ratios[name] = q[-1] / v[-1]
    assert ratios["noci"] > 20 * ratios["pre_ln"]


def test_checkpointing_gives_the_same_answer(monkeypatch):
    net = Network(block=[Residual(LayerNorm(), Dense(), Activation("gelu"), Dense(), beta=0.5)], depth=12)
    x = I.equicorrelated(5, 1.0, 0.2)
    full = B.backpropagate(net, x)
    monkeypatch.setattr(B, "_MEMORY", 5 * 5 * 8 * 3)      # force segments of a few blocks
    chk = B.backpropagate(net, x)
    np.testing.assert_allclose(chk.kernels, full.kernels, rtol=1e-14)
    assert [g[4] for g in chk.grads] == pytest.approx([g[4] for g in full.grads], rel=1e-14)


def test_output_gradient_is_checked():
    """An equicorrelated Π_L is PSD exactly for −1/(N−1) ≤ ρ ≤ 1; outside it, or for a non-PSD matrix, refuse."""
    n = 5
    np.testing.assert_allclose(np.linalg.eigvalsh(B.output_gradient("equicorrelated", n, -0.25))[0], 0.0, atol=1e-14)
    for rho in (-0.26, 1.01):
        with pytest.raises(SpecError, match="output_grad.rho"):
            B.output_gradient("equicorrelated", n, rho)
    with pytest.raises(SpecError, match="PSD"):
        B.output_gradient(np.diag([1.0, -1.0, 1.0, 1.0, 1.0]), n)
    with pytest.raises(SpecError, match="output_grad"):
        B.output_gradient("ones", n)
