"""Behaviours that mutation testing (docs/testing.md) found no test pinned down, each against a
reference built here: the exact linear part of a residual branch through norms, token mixing and
constant scaling; the seeds of random attention scores; the engine's numerical-error message; the
automatic choice of spectral measures."""

import numpy as np
import pytest

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop.kernel.maps import Context
from kernelprop.network.layers import (
    Activation,
    Attention,
    Dense,
    LayerNorm,
    Network,
    Parallel,
    Residual,
    RMSNorm,
    Scale,
)

WF = dict(values="identity", projection="identity")
EQ = I.equicorrelated(6, 1.0, 0.2)


def causal_mean(t):
    a = np.tril(np.ones((t, t)))
    return a / a.sum(1, keepdims=True)


def test_branch_linear_part_through_norms_mixing_and_scale():
    """y = 0.8 x + 0.6 P x with P = D2 · 1.5 · M · D1: D1 = diag(0.7/sqrt(Σ_ii + 0.1)) (RMSNorm), M the causal
    mean, D2 = diag(1.3/sqrt((1.5² M D1 Σ D1 Mᵀ)_ii + 0.05)); so Σ' = J Σ Jᵀ, J = 0.8 I + 0.6 P, twice.
    The dependence is row-scaled while dense (after the mixing) and scaled by c while dense."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 30))
    s = x @ x.T / 30
    block = [Residual(RMSNorm(gain=0.7, eps=0.1), Attention(causal=True, **WF), Scale(1.5), RMSNorm(gain=1.3, eps=0.05),
                      alpha=0.8, beta=0.6)]
    tr = kp.propagate(Network(block=block, depth=2), I.gram(s))
    m = causal_mean(6)
    want = s
    for l in (1, 2):
        d1 = np.diag(0.7 / np.sqrt(np.diag(want) + 0.1))
        f = 1.5 * m @ d1
        d2 = np.diag(1.3 / np.sqrt(np.diag(f @ want @ f.T) + 0.05))
        j = 0.8 * np.eye(6) + 0.6 * d2 @ f
        want = j @ want @ j.T
        np.testing.assert_allclose(tr.kernels[l], want, rtol=1e-12, err_msg=f"block {l}")


def test_a_scale_on_the_branch_input_scales_its_linear_part():
    """Residual(Scale(−1.3), β = 0.5): y = x − 0.65 x = 0.35 x, so Σ' = 0.1225 Σ (diagonal dependence); then
    an RMSNorm row-scales it: f = −1.3 D x with D = diag(0.8/sqrt(1.69 Σ_ii + 0.1)), Σ' = J Σ Jᵀ, J = I + 0.5 f."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 20))
    s = x @ x.T / 20
    tr = kp.propagate(Network(block=[Residual(Scale(-1.3), beta=0.5)], depth=1), I.gram(s))
    np.testing.assert_allclose(tr.kernels[1], 0.35 ** 2 * s, rtol=1e-14)
    tr = kp.propagate(Network(block=[Residual(Scale(-1.3), RMSNorm(gain=0.8, eps=0.1), beta=0.5)], depth=1), I.gram(s))
    j = np.eye(5) + 0.5 * -1.3 * np.diag(0.8 / np.sqrt(1.69 * np.diag(s) + 0.1))
    np.testing.assert_allclose(tr.kernels[1], j @ s @ j.T, rtol=1e-13)


@pytest.mark.parametrize("after", [RMSNorm(gain=0.9), Scale(0.5)], ids=["rmsnorm", "scale"])
def test_a_multi_head_mixing_stays_marked_through_norms_and_scales(after):
    """Two parallel branches that are both multi-head weight-free mixings with different heads are refused
    (their cross kernel needs per-head tracking), also when one branch row-scales or scales its mixing."""
    heads = Attention(heads=2, bias="alibi", **WF)
    net = Network(block=[Parallel([heads, after], [Attention(heads=2, bias="alibi", **WF)], betas=[0.5, 0.5])],
                  depth=1)
    with pytest.raises(kp.NotSupportedError, match="per-head tracking"):
        kp.propagate(net, I.equicorrelated(5, 1.0, 0.2))


def test_every_attention_layer_of_a_unit_draws_its_own_scores():
    """Random scores are seeded by (unit, k-th layer of the unit): 1, 2, … within a unit, again from 1 in the next."""
    ctx = Context()
    ctx.unit(3)
    assert [ctx.next_seed(), ctx.next_seed()] == [(3, 1), (3, 2)]
    ctx.unit(4)
    assert ctx.next_seed() == (4, 1)


def test_quad_nodes_reach_the_activation_maps():
    """A tanh map on 4 quadrature nodes differs from the default rule (measured 4e-3 on Σ)."""
    net = Network(block=[Dense(), Activation("tanh")], depth=1)
    x = I.equicorrelated(4, 2.0, 0.3)
    coarse = kp.propagate(net, x, quad_nodes=4).kernels[-1]
    fine = kp.propagate(net, x).kernels[-1]
    assert np.abs(coarse - fine).max() > 1e-4


def test_a_non_finite_kernel_is_a_numerical_error_that_says_so():
    net = Network(block=[Dense(), Activation(lambda v: np.sqrt(v))], depth=1)
    with np.errstate(invalid="ignore"), pytest.raises(kp.NumericalError, match="NaN or infinite entries"):
        kp.propagate(net, I.identity(3))


def test_spectral_measures_are_automatic_up_to_512_tokens():
    net = Network(block=[Dense()], depth=1)
    assert "stable_rank" in kp.propagate(net, I.identity(512)).measures
    assert "stable_rank" not in kp.propagate(net, I.identity(513)).measures
    assert "stable_rank" in kp.propagate(net, I.identity(513), spectral=True).measures


def test_progress_reports_every_block():
    calls = []
    kp.propagate(Network(block=[Dense()], depth=4), I.identity(3),
                 progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_gradient_measures_are_read_off_the_gradient_kernel():
    """grad_q_mean / grad_q_min / grad_q_max are the mean, min and max of diag Π at every record."""
    net = Network(block=[Dense(weight_var=1.5), Activation("relu")], depth=3)
    g = kp.backpropagate(net, I.equicorrelated(4, 1.0, 0.3), output_grad=np.diag([1.0, 2.0, 0.5, 1.5]))
    diag = np.diagonal(g.kernels, axis1=1, axis2=2)
    np.testing.assert_allclose(g["grad_q_mean"], diag.mean(1), rtol=1e-14)
    np.testing.assert_allclose(g["grad_q_min"], diag.min(1), rtol=1e-14)
    np.testing.assert_allclose(g["grad_q_max"], diag.max(1), rtol=1e-14)


def test_output_gradient_defaults_and_refusals_name_the_field():
    from kernelprop.kernel import backward as B
    np.testing.assert_array_equal(B.output_gradient("equicorrelated", 4), np.eye(4))     # ρ defaults to 0
    with pytest.raises(kp.SpecError) as info:
        B.output_gradient(np.diag([1.0, -1.0, 1.0]), 3)
    assert info.value.field == "output_grad" and info.value.allowed == "must be a symmetric PSD 3×3 matrix"


def test_backpropagate_reports_progress_from_the_output_down():
    calls = []
    kp.backpropagate(Network(block=[Dense()], depth=3), I.identity(3), progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_moment_view_by_hand():
    """Kedia's moments from the kernels: μ = mean m_i, σ² = mean(Σ_ii − m_i²), r = mean_{i≠j}(Σ_ij − m_i m_j)/σ²
    within sequences, σ_g² = mean Π_ii, r_g = mean_{i≠j} Π_ij/σ_g²; two sequences of 3 and 2 tokens."""
    from kernelprop.methods.moments import moment_view
    rng = np.random.default_rng(9)
    x = rng.standard_normal((5, 12)) + 0.3
    m = x.mean(1)
    inp = I.Inputs(x @ x.T / 12, (3, 2), mean=m)
    g = kp.backpropagate(Network(block=[Dense(weight_var=1.3)], depth=1), inp, output_grad=np.eye(5) + 0.2)
    view = moment_view(g)
    for r in range(len(g.labels)):
        s, mu, pi = g.forward.kernels[r], g.forward.means[r], g.kernels[r]
        cov = s - np.outer(mu, mu)
        var = np.mean(np.diag(cov))
        pairs = [(i, j) for blk in ((0, 1, 2), (3, 4)) for i in blk for j in blk if i != j]
        per_seq = [np.mean([cov[i, j] for i, j in pairs[:6]]), cov[3, 4]]
        per_seq_g = [np.mean([pi[i, j] for i, j in pairs[:6]]), pi[3, 4]]
        assert view["mu"][r] == pytest.approx(np.mean(mu), abs=1e-15)
        assert view["var"][r] == pytest.approx(var, rel=1e-14)
        assert view["r"][r] == pytest.approx(np.mean(per_seq) / var, rel=1e-13)
        assert view["var_g"][r] == pytest.approx(np.mean(np.diag(pi)), rel=1e-14)
        assert view["r_g"][r] == pytest.approx(np.mean(per_seq_g) / np.mean(np.diag(pi)), rel=1e-13)
    with pytest.raises(ValueError, match="keep_kernels"):
        moment_view(kp.backpropagate(Network(block=[Dense()], depth=1), inp, keep_kernels=False))


def test_a_norm_keeps_a_non_gaussian_stream_non_gaussian():
    """LayerNorm of ReLU features is not Gaussian: a second activation after it is refused (a Dense layer in
    between makes it Gaussian again)."""
    with pytest.raises(kp.NotSupportedError, match="not zero-mean Gaussian"):
        kp.propagate(Network(block=[Dense(), Activation("relu"), LayerNorm(), Activation("relu")], depth=1),
                     I.identity(4))
    kp.propagate(Network(block=[Dense(), Activation("relu"), LayerNorm(), Dense(), Activation("relu")], depth=1),
                 I.identity(4))


@pytest.mark.parametrize("norm", [LayerNorm(gain=1.7, eps=0.05), LayerNorm(gain=1.7, eps=0.05, centre=False),
                                  RMSNorm(gain=1.7, eps=0.05)], ids=["layernorm", "uncentred", "rmsnorm"])
def test_a_norm_rescales_the_error_estimate_like_the_kernel(norm):
    """A norm multiplies every entry by at most g²/min_i(Σᶜ_ii + ε) (Σᶜ centred or not): the quadrature
    error estimate after it is the one before times that factor."""
    net = Network(block=[Dense(), Activation("tanh"), norm], depth=1)
    tr = kp.propagate(net, I.equicorrelated(4, 2.0, 0.3), record="sublayers")
    before, after = tr["quad_error"][2], tr["quad_error"][3]
    m = tr.means[2] if getattr(norm, "centre", False) else np.zeros(4)
    var = np.diag(tr.kernels[2] - np.outer(m, m))
    assert before > 0
    assert after == pytest.approx(before * 1.7 ** 2 / (var.min() + 0.05), rel=1e-12, abs=0)


def test_zero_variance_at_a_finite_width_norm_says_so():
    from kernelprop import montecarlo as mc
    with pytest.raises(kp.NumericalError, match="zero variance entering layernorm"):
        mc.simulate(Network(block=[Dense(weight_var=0.0), LayerNorm()], depth=1), I.identity(4), 16, 2, dong=False)


@pytest.mark.parametrize("engine", ["numeric", "symbolic"])
def test_dropout_breaks_gaussianity_unless_p_is_zero(engine):
    """Inverted dropout's output is not Gaussian for p > 0, so an activation after it is refused; p = 0 is the
    identity and changes nothing."""
    from kernelprop import symbolic as S
    from kernelprop.network.layers import Dropout

    def run(p):
        net = Network(block=[Dense(), Dropout(p), Activation("relu")], depth=1)
        return kp.propagate(net, I.identity(3)) if engine == "numeric" else S.block_map(net, mode="explicit", tokens=3)
    with pytest.raises(kp.NotSupportedError, match="not zero-mean Gaussian"):
        run(0.2)
    run(0.0)


def test_dropout_with_p_zero_is_the_identity_at_finite_width():
    """p = 0 draws no mask: the same seed gives the same network with or without the layer."""
    from kernelprop import montecarlo as mc
    from kernelprop.network.layers import Dropout
    x = I.equicorrelated(4, 1.0, 0.2)
    a = mc.simulate(Network(block=[Dense(), Dropout(0.0), Dense()], depth=2), x, 16, 3, dong=False, seed=5)
    b = mc.simulate(Network(block=[Dense(), Dense()], depth=2), x, 16, 3, dong=False, seed=5)
    np.testing.assert_array_equal(a.kernels[-1], b.kernels[-1])


def test_parallel_branches_with_diagonal_dependence_and_means():
    """y = 0.7 x + 0.5 D x + 0.3·1.5 x with D = diag(0.8/sqrt(Σ_ii + 0.1)) (RMSNorm) on tokens with a mean:
    every map is linear in x, so the second moment is J Σ Jᵀ and the mean J m, J = 1.15 I + 0.5 D."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 16)) + 0.4
    s, m = x @ x.T / 16, x.mean(1)
    net = Network(block=[Parallel([RMSNorm(gain=0.8, eps=0.1)], [Scale(1.5)], alpha=0.7, betas=[0.5, 0.3])], depth=1)
    tr = kp.propagate(net, I.Inputs(s, (5,), mean=m))
    j = 1.15 * np.eye(5) + 0.5 * np.diag(0.8 / np.sqrt(np.diag(s) + 0.1))
    np.testing.assert_allclose(tr.kernels[1], j @ s @ j.T, rtol=1e-13)
    np.testing.assert_allclose(tr.means[1], j @ m, rtol=1e-13)


def test_nested_residuals_compose_their_linear_parts():
    """Residual(Residual(M, α = 0.6, β = 0.5), Scale(1.2), α = 0.9, β = 0.7), M the weight-free causal mean:
    J = 0.9 I + 0.7·1.2·(0.6 I + 0.5 M); and all-diagonal, Residual(Residual(Scale(2), β = 0.5), β = 0.3):
    J = (1 + 0.3·(1 + 0.5·2)) I. Both against Σ' = J Σ Jᵀ."""
    x = I.equicorrelated(5, 1.2, 0.3)
    m = causal_mean(5)
    inner = Residual(Attention(causal=True, **WF), alpha=0.6, beta=0.5)
    tr = kp.propagate(Network(block=[Residual(inner, Scale(1.2), alpha=0.9, beta=0.7)], depth=1), x)
    j = 0.9 * np.eye(5) + 0.7 * 1.2 * (0.6 * np.eye(5) + 0.5 * m)
    np.testing.assert_allclose(tr.kernels[1], j @ x.sigma @ j.T, rtol=1e-13)
    tr = kp.propagate(Network(block=[Residual(Residual(Scale(2.0), beta=0.5), beta=0.3)], depth=1), x)
    np.testing.assert_allclose(tr.kernels[1], (1 + 0.3 * (1 + 0.5 * 2.0)) ** 2 * x.sigma, rtol=1e-13)


def test_a_silenced_multi_head_branch_leaves_no_head_blocks():
    """A multi-head weight-free mixing with per-head biases splits the stream into head blocks only if its
    branch weight is non-zero: after β = 0 another such mixing is fine, after β = 0.5 it is refused."""
    heads = dict(heads=2, bias="alibi", alibi_scale=4.0, **WF)
    kp.propagate(Network(block=[Residual(Attention(**heads), beta=0.0), Attention(**heads)], depth=1), EQ)
    with pytest.raises(kp.NotSupportedError, match="head blocks"):
        kp.propagate(Network(block=[Residual(Attention(**heads), beta=0.5), Attention(**heads)], depth=1), EQ)


def test_composite_descriptions_and_their_refusals():
    from kernelprop.network.layers import Serial
    assert repr(Serial(Dense(), Activation("relu"))) == f"Serial({Dense()!r}, {Activation('relu')!r})"
    with pytest.raises(kp.SpecError) as info:
        Serial(Dense(), "relu")
    assert info.value.field == "serial.layers[1]" and info.value.allowed == "must be a layer (Dense, Activation, ...)"
    with pytest.raises(kp.SpecError) as info:
        Parallel([Dense()], [Dense()], betas=[0.5])
    assert info.value.field == "parallel.betas"
    with pytest.raises(kp.SpecError) as info:
        Parallel([Dense()], [Dense()], betas=[0.5, "bad name!"])
    assert info.value.field == "parallel.betas[1]"


def test_a_centring_branch_on_tokens_with_a_mean_keeps_every_cross_term():
    """Residual(LayerNorm(g = 0.8, ε = 0.1), α = 0.7, β = 0.5) on tokens with feature means m_i: the branch is
    D(x_i − m_i 1), D_i = g/sqrt(Σ_ii − m_i² + ε), so with Σᶜ = Σ − m mᵀ
    Σ'_ij = 0.49 Σ_ij + 0.35 (D_i + D_j) Σᶜ_ij + 0.25 D_i D_j Σᶜ_ij and m' = 0.7 m (the mean terms of the cross
    kernel: the branch's mean is not its linear part applied to m)."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 16)) + np.linspace(-0.8, 0.8, 5)[:, None]
    s, m = x @ x.T / 16, x.mean(1)
    tr = kp.propagate(Network(block=[Residual(LayerNorm(gain=0.8, eps=0.1), alpha=0.7, beta=0.5)], depth=1),
                      I.Inputs(s, (5,), mean=m))
    c = s - np.outer(m, m)
    d = 0.8 / np.sqrt(np.diag(c) + 0.1)
    want = 0.49 * s + 0.35 * (d[:, None] + d[None, :]) * c + 0.25 * np.outer(d, d) * c
    np.testing.assert_allclose(tr.kernels[1], want, rtol=1e-13)
    np.testing.assert_allclose(tr.means[1], 0.7 * m, rtol=1e-13)
