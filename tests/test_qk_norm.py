"""QK-norm (LayerNorm/RMSNorm of each head's queries and keys before the scores): the wide-limit score kernel
``C = D^{−1/2} Σ D^{−1/2}`` against explicit softmaxes and an exact rescaling identity, the backward's
``1/√Σ_ii`` against the Monte Carlo with the power to reject it missing, and the refusals."""

import dataclasses

import numpy as np
import pytest

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop import montecarlo as mc
from kernelprop import symbolic as S
from kernelprop.errors import NumericalError, SpecError
from kernelprop.layers import Attention, Dense, Residual
from kernelprop.network.layers import Network


def _gram():
    """Six tokens whose squared norms range over 1.3 … 7.3 (mean 3.2), so C differs from Σ in scale and shape."""
    rng = np.random.default_rng(5)
    f = rng.standard_normal((6, 6)) * np.array([0.6, 1.4, 0.8, 1.2, 1.0, 0.7])[:, None]
    return 3.0 * (f @ f.T / 6 + 0.3)


G = _gram()
ONE, TWO = I.gram(G), I.gram(G, sequences=(3, 3))


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_tied_qk_norm_is_the_softmax_of_the_normalised_kernel(kind):
    """Both norms have the same wide limit (the queries' features have mean 0): ``A = softmax(σ_qk² C)``."""
    layer = Attention(scores="tied", qk_var=2.5, qk_norm=kind, value_var=1.2, out_var=0.7)
    d = np.sqrt(np.diag(G))
    a = _softmax(2.5 * G / np.outer(d, d))
    out = kp.propagate(Network(block=[layer], depth=1), ONE)
    np.testing.assert_allclose(out.kernels[1], 0.84 * a @ G @ a.T, rtol=1e-12)


@pytest.mark.parametrize("scores", ["tied", "standard"])
def test_on_a_constant_diagonal_qk_norm_only_rescales_the_scores(scores):
    """``Σ_ii = q`` for every token: ``C = Σ/q``, so QK-norm at σ_qk² is the plain layer at σ_qk²/q (tied) or
    σ_qk²/q² (standard: the score covariance is quadratic in the kernel; same draws)."""
    x = I.equicorrelated(5, 2.5, 0.3, sequences=2, cross_rho=0.1)
    normed = Attention(heads=2, scores=scores, qk_var=1.6, qk_norm="rmsnorm", score_samples=8)
    plain = dataclasses.replace(normed, qk_norm="none", qk_var=1.6 / (2.5 if scores == "tied" else 2.5 ** 2))
    got = kp.propagate(Network(block=[normed], depth=1), x).kernels[1]
    want = kp.propagate(Network(block=[plain], depth=1), x).kernels[1]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert np.max(np.abs(got - kp.propagate(Network(block=[dataclasses.replace(normed, qk_norm="none")],
                                                    depth=1), x).kernels[1])) > 1e-2


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("layer", [
    Attention(heads=2, scores="tied", qk_var=3.0),
    Attention(heads=2, scores="tied", qk_var=3.0, causal=True, rope_theta=10.0),
], ids=["tied", "tied causal rope"])
def test_tied_qk_norm_agrees_with_the_monte_carlo(kind, layer):
    """Two residual blocks (the stream's token norms keep differing), forward and backward."""
    net = Network(block=[Residual(dataclasses.replace(layer, qk_norm=kind), beta=0.7)], depth=2)
    for x in (ONE, TWO):
        cmp, *_ = mc.check(net, x, 192, 16, gradients=True)
        assert cmp.agree, (x.segments, cmp.criterion(), cmp.failures[:3])


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("weight_free", [False, True])
def test_standard_qk_norm_agrees_with_the_monte_carlo(kind, weight_free):
    """One layer (exact for one layer, docs/theory.md §2.1), forward and backward with the score path."""
    wf = dict(values="identity", projection="identity") if weight_free else {}
    net = Network(block=[Attention(heads=2, scores="standard", qk_var=3.0, qk_norm=kind, **wf)], depth=1)
    for x in (ONE, TWO):
        cmp, *_ = mc.check(net, x, 256, 32, gradients=True)
        assert cmp.agree, (x.segments, cmp.criterion(), cmp.failures[:3])


def test_the_monte_carlo_rejects_the_forward_without_qk_norm():
    """Tied scores on tokens of unequal norms: the plain map (logits σ_qk² Σ instead of σ_qk² C) is rejected."""
    layer = Attention(heads=2, scores="tied", qk_var=3.0, qk_norm="rmsnorm")
    cmp, _, main, half = mc.check(Network(block=[layer], depth=1), ONE, 192, 16, gradients=True)
    assert cmp.agree, cmp.failures[:3]
    plain = Network(block=[dataclasses.replace(layer, qk_norm="none")], depth=1)
    assert not mc.compare(kp.propagate(plain, ONE), main.forward, half.forward).agree


def test_the_monte_carlo_rejects_the_backward_without_the_norm_scale(monkeypatch):
    """Standard scores: dropping the ``1/√(Σ_ii Σ_kk)`` of the norm's Jacobian from the score path (mean token
    norm 3.2 here) is rejected by real backpropagation, which agrees with the full rule. 1024 score draws: the
    comparison allows the engine's forward error bound (σ_qk² = 3 is far outside the expansion's range; 8 % of
    the kernel here, 59 % at the default 64 draws, which would hide the 40 % the norm scale changes)."""
    net = Network(block=[Attention(heads=2, scores="standard", qk_var=3.0, qk_norm="layernorm", score_samples=1024)],
                  depth=1)
    cmp, _, main, half = mc.check(net, ONE, 256, 48, gradients=True)
    assert cmp.agree, cmp.failures[:3]
    full = Attention.score_options

    def without(self, *args, **kwargs):
        opts = full(self, *args, **kwargs)
        opts.pop("rescale")
        return opts
    monkeypatch.setattr(Attention, "score_options", without)
    assert not mc.compare_gradients(kp.backpropagate(net, ONE), main, half).agree


def test_symbolic_maps_agree():
    """Equicorrelated (C = Σ/q there) and explicit modes against the numeric engine."""
    block = [Residual(Dense(weight_var=2.0), Attention(scores="tied", qk_var=1.5, qk_norm="layernorm"), beta=0.5)]
    net = Network(block=block, depth=2)
    x = I.equicorrelated(3, 1.5, 0.2)
    np.testing.assert_allclose(S.evaluate(S.block_map(net), x).kernels, kp.propagate(net, x).kernels, rtol=1e-12)
    explicit = S.block_map(net, mode="explicit", tokens=3, simplify_seconds=0)
    y = I.gram(G[:3, :3])
    np.testing.assert_allclose(S.evaluate(explicit, y).kernels, kp.propagate(net, y).kernels, rtol=1e-12)


@pytest.mark.parametrize("kw, field", [
    (dict(qk_norm="layernorm"), "attention.qk_norm"),                      # uniform scores: zero queries
    (dict(scores="tied", qk_norm="rmsnorm", qk_var=0.0), "attention.qk_var"),
    (dict(scores="tied", qk_norm="batchnorm"), "attention.qk_norm"),
])
def test_bad_qk_norm_fields_are_spec_errors(kw, field):
    with pytest.raises(SpecError, match=field):
        Attention(**kw)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # measures of the zero stem record
def test_a_token_of_zero_variance_is_a_numerical_error():
    """A zero stream (σ_w² = 0) has zero queries and keys: the engine and the simulation both refuse to divide
    by their norm, naming qk_norm."""
    zero = Network(stem=[Dense(weight_var=0.0)], block=[Attention(scores="tied", qk_norm="rmsnorm")], depth=1)
    with pytest.raises(NumericalError, match="qk_norm"):
        kp.propagate(zero, ONE)
    with pytest.raises(NumericalError, match="qk_norm"):
        mc.simulate(zero, ONE, 16, 2)
