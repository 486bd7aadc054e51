"""Attention biases on values and output projection (one vector each, shared by all tokens):
``Σ' = σ_o² (1/H) Σ_h M_h (σ_v² Σ + σ_bv² 11ᵀ) M_hᵀ + σ_bo² 11ᵀ`` against closed forms for softmax rows
(``A 1 = 1``), Value-SkipInit and identity attention (``M 1 ≠ 1``), and against the Monte Carlo."""

import dataclasses

import numpy as np
import pytest

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop import montecarlo as mc
from kernelprop import symbolic as S
from kernelprop.errors import SpecError
from kernelprop.layers import Attention, LayerNorm, Residual
from kernelprop.network.layers import Network

EQ = I.equicorrelated(6, 1.0, 0.3)
TWO = I.equicorrelated(4, 1.0, 0.4, sequences=2, cross_rho=0.2)
BIAS = dict(value_bias_var=0.4, out_bias_var=0.3)


def _one(layer, x):
    return kp.propagate(Network(block=[layer], depth=1), x).kernels[1]


def test_uniform_softmax_bias_terms_are_constant():
    """Softmax rows sum to 1, so the value bias passes unchanged: ``σ_o²(σ_v² Σ̄ + σ_bv²) + σ_bo²`` with Σ̄ the
    block means of Σ (uniform bidirectional attention on two sequences; cross-sequence blocks get the bias too)."""
    got = _one(Attention(value_var=1.5, out_var=0.8, **BIAS), TWO)
    s = TWO.sigma
    means = np.kron(np.array([[s[:4, :4].mean(), s[:4, 4:].mean()], [s[4:, :4].mean(), s[4:, 4:].mean()]]),
                    np.ones((4, 4)))
    np.testing.assert_allclose(got, 0.8 * (1.5 * means + 0.4) + 0.3, rtol=1e-13)


def test_value_skipinit_bias_scales_with_the_row_sums():
    """``M = αI + βA``: ``M 1 = (α + β) 1``, so the value bias enters as ``(α + β)² σ_bv²``."""
    got = _one(Attention(matrix="value_skipinit", alpha=0.6, beta=0.9, causal=True, **BIAS), EQ)
    t = 6
    a = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
    m = 0.6 * np.eye(t) + 0.9 * a
    np.testing.assert_allclose(got, m @ EQ.sigma @ m.T + 1.5 ** 2 * 0.4 + 0.3, rtol=1e-13)


def test_identity_attention_bias_follows_the_score_matrix():
    """Identity attention ``M = σ_qk² Σ`` (causal mask): the value bias gives ``σ_bv² (M1)(M1)ᵀ``."""
    rng = np.random.default_rng(1)
    f = rng.standard_normal((5, 7))
    s = f @ f.T / 7
    got = _one(Attention(attention="identity", scores="tied", qk_var=0.7, causal=True, value_var=1.2,
                         out_var=0.9, **BIAS), I.gram(s))
    m = np.tril(0.7 * s)
    r = m.sum(1)
    np.testing.assert_allclose(got, 0.9 * (1.2 * m @ s @ m.T + 0.4 * np.outer(r, r)) + 0.3, rtol=1e-12)


@pytest.mark.parametrize("layer", [
    Attention(heads=2, scores="tied", qk_var=1.5, causal=True, **BIAS),
    Attention(heads=2, matrix="value_skipinit", alpha=0.7, beta=0.5, causal=True, value_bias_var=0.5),
    Attention(heads=2, scores="tied", qk_var=0.5, attention="identity", bias="alibi", value_bias_var=0.5),
    Attention(heads=2, scores="tied", qk_var=1.5, out_var="unit", **BIAS),
], ids=["tied causal", "value_skipinit", "identity alibi", "unit out_var"])
def test_biases_agree_with_the_monte_carlo(layer):
    """Two blocks, forward and backward (value, output and query gradient norms included)."""
    for x in (EQ, TWO):
        cmp, *_ = mc.check(Network(block=[LayerNorm(), layer], depth=2), x, 192, 16, gradients=True)
        assert cmp.agree, (x.segments, cmp.criterion(), cmp.failures[:3])


def test_standard_scores_with_biases_agree_with_the_monte_carlo():
    net = Network(block=[Residual(Attention(heads=2, scores="standard", qk_var=2.0, **BIAS), beta=0.8)], depth=1)
    for x in (EQ, TWO):
        cmp, *_ = mc.check(net, x, 256, 32, gradients=True)
        assert cmp.agree, (x.segments, cmp.criterion(), cmp.failures[:3])


def test_the_monte_carlo_rejects_the_maps_without_biases():
    """Power: the simulation that agrees with the biased maps rejects the unbiased ones, forward and in the
    output-projection gradient norm (⟨M (σ_v²Σ + σ_bv² 11ᵀ) Mᵀ, Π⟩)."""
    layer = Attention(heads=2, scores="tied", qk_var=1.5, causal=True, **BIAS)
    net = Network(block=[LayerNorm(), layer], depth=1)
    cmp, _, main, half = mc.check(net, TWO, 192, 16, gradients=True)
    assert cmp.agree
    plain = Network(block=[LayerNorm(), dataclasses.replace(layer, value_bias_var=0.0, out_bias_var=0.0)], depth=1)
    assert not mc.compare(kp.propagate(plain, TWO), main.forward, half.forward).agree
    grads = mc.compare_gradients(kp.backpropagate(plain, TWO), main, half)
    row = next(r for r in grads.rows if r.measure == "norm_output")
    assert abs(row.z) > cmp.k, (row.theory, row.estimate, row.se)


def test_symbolic_maps_agree():
    net = Network(block=[Residual(LayerNorm(), Attention(matrix="value_skipinit", alpha=0.8, beta=0.6, **BIAS),
                                  beta=0.5)], depth=2)
    x = I.equicorrelated(3, 1.0, 0.2)
    np.testing.assert_allclose(S.evaluate(S.block_map(net), x).kernels, kp.propagate(net, x).kernels, rtol=1e-12)
    ident = Network(block=[LayerNorm(), Attention(attention="identity", scores="tied", qk_var=0.5, causal=True,
                                                  **BIAS)], depth=2)
    explicit = S.block_map(ident, mode="explicit", tokens=3, simplify_seconds=0)
    np.testing.assert_allclose(S.evaluate(explicit, x).kernels, kp.propagate(ident, x).kernels, rtol=1e-12)


@pytest.mark.parametrize("kw, field", [
    (dict(values="identity", value_bias_var=0.2), "attention.value_bias_var"),
    (dict(projection="identity", out_bias_var=0.2), "attention.out_bias_var"),
    (dict(value_bias_var=-0.1), "attention.value_bias_var"),
])
def test_bad_bias_fields_are_spec_errors(kw, field):
    with pytest.raises(SpecError, match=field):
        Attention(**kw)


def test_unit_out_var_needs_room_for_the_output_bias():
    net = Network(block=[Attention(out_var="unit", out_bias_var=1.0)], depth=1)
    with pytest.raises(SpecError, match="out_var"):
        kp.propagate(net, EQ)
    with pytest.raises(SpecError, match="out_var"):
        mc.simulate(net, EQ, 16, 2)
