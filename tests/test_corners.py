"""Corners where a map used to be silently wrong; each test fails on the earlier engine.

1. Standard 1/sqrt(d_k) scores with several sequences: W_Q, W_K are shared by the batch, so the
   scores of different sequences are correlated (drawn from the full N×N kernel).
2. The backward pass through weight-free attention with standard scores keeps the O(1) score path.
3. Weight-free multi-head attention whose heads differ (per-head ALiBi) twice in a row: refused,
   never an averaged kernel that the network does not have.
4. An activation on a stream with a non-zero mean: refused, never the zero-mean kernel.
10. Near rank collapse (ρ → 1) the query-gradient term tr(J_i Σ J_k Σ) ~ q²(1 − ρ)² came from a
   difference of O(q²) terms; the symbolic fixed-point search missed ρ* = 1 with float weights
   (SymPy ≥ 1.13: ``Float(1.0) != 1``) and reported roots outside the equicorrelated range.
"""

import numpy as np
import pytest

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop import montecarlo as mc
from kernelprop.errors import NotSupportedError
from kernelprop.layers import Activation, Attention, Dense, LayerNorm, Residual, RMSNorm

WF = dict(values="identity", projection="identity")
EQ = I.equicorrelated(6, 1.0, 0.2)


def test_two_identical_sequences_get_identical_blocks_under_standard_scores():
    """Identical sequences see the same W_Q, W_K: within- and cross-sequence blocks are equal
    (before: 0.11 apart after two layers, cosine 0.88 between a token and its copy)."""
    one = I.equicorrelated(4, 1.0, 0.3)
    two = I.gram(np.kron(np.ones((2, 2)), one.sigma), sequences=[4, 4])
    net = kp.Network(block=[LayerNorm(), Attention(heads=2, scores="standard", qk_var=2.0)], depth=2)
    k = kp.propagate(net, two).kernels[-1]
    np.testing.assert_allclose(k[:4, :4], k[4:, 4:], atol=1e-13)
    np.testing.assert_allclose(k[:4, :4], k[:4, 4:], atol=1e-13)


def test_standard_scores_with_correlated_sequences_agree_with_the_monte_carlo():
    x = I.equicorrelated(4, 1.0, 0.3, sequences=2, cross_rho=0.25)
    net = kp.Network(block=[LayerNorm(), Attention(heads=2, scores="standard", qk_var=3.0, score_samples=256)],
                     depth=2)
    cmp, *_ = mc.check(net, x, 256, 24)
    assert cmp.agree, (cmp.criterion(), cmp.failures[:3])


def test_weight_free_standard_score_backward_keeps_the_score_path():
    """Before: Π at the input 0.637 (mixing term only); simulated 1.25 ± 0.06; now 1.238."""
    net = kp.Network(stem=[Dense()], block=[Attention(scores="standard", qk_var=4.0, causal=True, **WF)],
                     final=[Dense()], depth=1)
    g = kp.backpropagate(net, EQ)
    assert g["grad_q_mean"][0] > 1.1
    cmp, *_ = mc.check(net, EQ, 256, 24, gradients=True)
    assert cmp.agree, (cmp.criterion(), cmp.failures[:3])


def test_weight_free_heads_with_different_biases_twice_in_a_row_are_refused():
    layer = Attention(heads=2, bias="alibi", alibi_scale=4.0, **WF)
    with pytest.raises(NotSupportedError, match="head blocks"):
        kp.propagate(kp.Network(block=[layer], depth=2), EQ)
    with pytest.raises(NotSupportedError, match="head blocks"):
        kp.propagate(kp.Network(block=[layer, Activation("relu")], depth=1), EQ)
    # a feature-mixing layer in between makes the stream one block again
    kp.propagate(kp.Network(block=[layer, Dense()], depth=3), EQ)
    # shaped attention at init is α·I in every head: nothing differs, nothing to refuse
    kp.propagate(kp.Network(block=[Attention(matrix="shaped", bias="alibi", heads=4, **WF)], depth=3), EQ)


def test_the_head_blocks_are_real():
    """The per-head composition (1/H) Σ_h A_h A_h Σ A_hᵀ A_hᵀ is what the network computes; the
    averaged kernel the engine used to return is rejected by the simulation's criterion."""
    x = I.identity(6)
    layer = Attention(heads=2, bias="alibi", alibi_scale=8.0, causal=True, **WF)
    one = kp.propagate(kp.Network(block=[layer], depth=1), x)
    sim = mc.simulate(kp.Network(block=[layer], depth=2), x, 1024, 16, seed=3)
    from kernelprop.layers.attention import head_mixings
    heads = head_mixings(layer, x.sigma, x.segments)
    a = [m.dense() for _, m in heads]
    per_head = sum(w * ah @ ah @ x.sigma @ ah.T @ ah.T for (w, _), ah in zip(heads, a))
    averaged = sum(w * ah @ one.kernels[-1] @ ah.T for (w, _), ah in zip(heads, a))
    se = sim.kernel_stderr[-1]
    assert np.max(np.abs(sim.kernels[-1] - per_head) / (se + 1e-12)) < 6
    assert np.max(np.abs(sim.kernels[-1] - averaged) / (se + 1e-12)) > 6


def test_an_activation_on_a_stream_with_a_mean_is_refused():
    """Before: relu on an input with mean 0.5 returned Σ'_01 = 0.324 (the zero-mean formula); the
    network's value is 0.583."""
    x = I.Inputs(EQ.sigma + 0.25, EQ.segments, mean=np.full(6, 0.5))
    for block in ([Activation("relu")], [RMSNorm(), Activation("relu")]):
        with pytest.raises(NotSupportedError, match="not zero-mean Gaussian"):
            kp.propagate(kp.Network(block=block, depth=1), x)
    ok = kp.Network(block=[LayerNorm(), Activation("relu"), Dense()], depth=2)   # centring removes the mean
    cmp, *_ = mc.check(ok, x, 256, 16)
    assert cmp.agree, cmp.failures[:3]


@pytest.mark.parametrize("block, x", [
    ([Attention(spa="e-spa", causal=True, spa_final=0.5), Dense(), Activation("relu"), Dense(weight_var=2.0)],
     I.identity(8)),
    ([Attention(spa="u-spa", causal=True, heads=2, matrix="value_skipinit", beta=0.6), Dense()],
     I.equicorrelated(8, 1.0, 0.2)),
    ([Attention(spa="u-spa", spa_final=0.5)], I.identity(6)),
], ids=["e-spa", "u-spa value_skipinit", "u-spa bidirectional"])
def test_spa_reports_its_query_gradient_and_it_agrees_with_backpropagation(block, x):
    """SPA's ``A = D softmax(B + S)`` at zero queries: ``dS_i = D_i J(p_i) dA_i`` (before: no query norm)."""
    net = kp.Network(block=block, depth=3)
    g = kp.backpropagate(net, x)
    q = [v for *_, kind, v in g.grads if kind == "queries"]
    assert len(q) == 3 and min(q) > 0
    cmp, *_ = mc.check(net, x, 256, 16, gradients=True)
    assert any(r.measure == "norm_queries" for r in cmp.rows)
    assert cmp.agree, (cmp.criterion(), cmp.failures[:3])


@pytest.mark.parametrize("name, block, mean", [
    ("value and output variances differ", [LayerNorm(), Attention(heads=2, causal=True, scores="tied", value_var=2.0,
                                                                   out_var=0.5), Dense()], None),
    ("weight-free mixing of a token-varying mean", [Residual(Attention(causal=True, **WF), beta=0.7), LayerNorm(),
                                                    Dense()], np.linspace(-0.6, 0.6, 6)),
])
def test_missing_cases_agree_with_backpropagation(name, block, mean):
    x = EQ if mean is None else I.Inputs(EQ.sigma + np.outer(mean, mean), EQ.segments, mean=mean)
    cmp, *_ = mc.check(kp.Network(block=block, depth=2), x, 256, 16, gradients=True)
    assert cmp.n_tested > 200
    assert cmp.agree, (name, cmp.criterion(), cmp.failures[:3])


@pytest.mark.parametrize("gap", [1e-2, 1e-4, 1e-6, 1e-8])
def test_query_gradient_term_keeps_its_digits_as_tokens_collapse(gap):
    """Equicorrelated Σ = q[(1−ρ)I + ρ11ᵀ]: J_i 1 = 0, so tr(J_i Σ J_k Σ) = q²(1−ρ)² tr(J_i J_k) exactly
    (reference from explicit Jacobian matrices). Before: relative error 8e-4 at 1 − ρ = 1e-6 and a
    24× wrong value at 1e-8; now ≲ 4 eps/(1 − ρ), the rounding of the input itself."""
    from kernelprop.layers.attention import score_terms
    from kernelprop.layers.attention.matrices import Dense as DenseMix
    t, q = 12, 1.3
    rng = np.random.default_rng(5)
    a = np.exp(rng.standard_normal((t, t)))
    a /= a.sum(axis=1, keepdims=True)
    sigma = q * (gap * np.eye(t) + (1.0 - gap) * np.ones((t, t)))
    pi = np.eye(t) + 0.3
    jac = [np.diag(a[i]) - np.outer(a[i], a[i]) for i in range(t)]
    ref = sum(pi[i, k] * sigma[i, k] * q * q * gap * gap * np.trace(jac[i] @ jac[k])
              for i in range(t) for k in range(t))
    got, _ = score_terms([(1.0, DenseMix((t,), [a]))], sigma, pi, with_pi=False)
    assert got == pytest.approx(ref, rel=max(1e-12, 8e-16 / gap), abs=0.0)


def test_query_gradient_of_two_collapsing_sequences_is_centred_per_sequence():
    """Two sequences, each nearly collapsed onto its own direction (cross-kernel 0.4): the
    per-sequence centring is exact, the network's query gradient keeps its (1 − ρ)² law."""
    def queries(gap):
        one = (1.0 - gap) * np.ones((6, 6)) + gap * np.eye(6)
        sig = np.block([[one, np.full((6, 6), 0.4)], [np.full((6, 6), 0.4), one]])
        net = kp.Network(block=[Attention(heads=1, causal=True, qk_var=1.0)], depth=1)
        g = kp.backpropagate(net, I.gram(sig, sequences=[6, 6]))
        return next(v for *_, k, v in g.grads if k == "queries")
    assert queries(1e-7) / 1e-14 == pytest.approx(queries(1e-2) / 1e-4, rel=1e-7)


def _fixed_points(block, weights=None):
    from kernelprop.symbolic import derive
    net = kp.Network(block=block, depth=4, params=weights or {})
    return derive(net, I.equicorrelated(8, 1.0, 0.5)).fixed_points


def test_symbolic_fixed_point_rho_one_with_float_weights():
    """α = 0.9, β = sqrt(0.19) as Python floats: ρ* = 1 with slope 1, as with the same weights given
    exactly (before: no fixed point at all)."""
    relu = [Dense(weight_var=2.0), Activation("relu"), Dense(weight_var=1.0)]
    floats = _fixed_points([Residual(*relu, alpha=0.9, beta=0.19 ** 0.5)])
    exact = _fixed_points([Residual(*relu, alpha="9/10", beta="sqrt(19/100)")])
    for pts in (floats, exact):
        assert [fp.values["rho"] for fp in pts] == [1]
        assert float(pts[0].eigenvalues[0]) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("block", [
    [Dense(weight_var=1.5), Activation("erf", scale=1.2)],
    [Residual(LayerNorm(), Attention(heads=1, causal=False), alpha=1.0, beta=0.3),
     Residual(LayerNorm(), Dense(), Activation("relu"), Dense(weight_var=2.0), beta=0.3)],
])
def test_symbolic_fixed_points_lie_in_the_equicorrelated_range(block):
    """ρ of an equicorrelated kernel of T = 8 tokens lies in [−1/7, 1]; before, ρ = −1.0000000000000007
    (erf block) and ρ = −0.63, −1.29 (residual block) were reported as fixed points."""
    for fp in _fixed_points(block):
        assert -1 / 7 - 1e-9 <= float(fp.values["rho"]) <= 1 + 1e-9
