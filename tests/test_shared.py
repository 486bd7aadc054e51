"""Weights shared across blocks (docs/theory.md §13): the joint-state interpreter and the Monte Carlo.

Independent references: the fresh-weight engine (``propagate``) when every matrix is used once; the
free-probability closed form of a residual linear network with one shared matrix; 2-D integrals of
ReLU pairs done here with scipy; and finite-width networks whose blocks really reuse one draw.
"""

import dataclasses
import math

import numpy as np
import pytest
from scipy import integrate

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop import montecarlo as mc
from kernelprop.errors import NotSupportedError, SpecError
from kernelprop.kernel import shared as J
from kernelprop.montecarlo import sampler as S
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

EQ = I.equicorrelated(8, 1.0, 0.3)
TWO = I.equicorrelated(6, 1.0, 0.4, sequences=2, cross_rho=0.2)
WITH_MEAN = I.Inputs(EQ.sigma + 0.25, EQ.segments, mean=np.full(8, 0.5))
WF = dict(values="identity", projection="identity")


def _same(a, b, tol=1e-13):
    """Kernels and means of two trajectories equal to ``tol`` relative to the largest kernel entry."""
    assert a.labels == b.labels
    scale = np.abs(a.kernels).max()
    assert np.abs(a.kernels - b.kernels).max() <= tol * scale
    assert np.abs(a.means - b.means).max() <= tol * max(1.0, np.abs(a.means).max())


# ----------------------------------------------------------------------------------------------
# without sharing the joint state is the engine


@pytest.mark.parametrize("name", ["pre_ln", "post_ln", "relu_mlp"])
def test_unshared_joint_state_is_propagate(name):
    spec = kp.load(f"kernelprop/examples/{name}.toml")
    fresh = kp.propagate(spec.network, spec.inputs)
    joint = J.propagate(spec.network, spec.inputs, shared=False)
    _same(fresh, joint)
    assert np.array_equal(fresh["quad_error"], joint["quad_error"])
    for k in ("q_mean", "cos_mean", "rank_one_distance"):
        np.testing.assert_allclose(joint[k], fresh[k], rtol=1e-12, atol=1e-13)


BLOCKS = {
    "dense, bias, unit variance": ([Dense(weight_var=1.5, bias_var=0.3), Dense(weight_var="unit", bias_var=0.2)], EQ),
    "relu, gelu with scale": ([Dense(weight_var=2.0), Activation("relu"), Dense(), Activation("gelu", scale=1.3)], EQ),
    "leaky, erf, DKS transform": ([Dense(), Activation("leaky_relu", {"slope": 0.2}), Dense(),
                                   Activation("erf", {"a": 0.7}, input_scale=1.2, offset=0.1)], EQ),
    "shifted relu (quadrature)": ([Dense(), Activation("relu", input_shift=0.3, offset=-0.2)], EQ),
    "layernorm after relu, without centring, rmsnorm": ([Dense(), Activation("relu"), LayerNorm(gain=1.2, eps=0.1),
                                                         Dense(), Activation("relu"), LayerNorm(centre=False),
                                                         Dense(), Activation("relu"), RMSNorm(gain=0.9, eps=0.05)],
                                                        EQ),
    "attention uniform, 2 sequences": ([Attention(heads=2, value_var=1.2, out_var=0.9)], TWO),
    "attention causal alibi, unit out_var": ([Attention(heads=4, causal=True, bias="alibi", out_var="unit")], TWO),
    "attention tied + alibi": ([LayerNorm(), Attention(heads=4, scores="tied", bias="alibi", qk_var=2.0)], EQ),
    "value_skipinit, identity values, identity projection": (
        [Attention(matrix="value_skipinit", beta=0.5, scores="tied"), Attention(heads=2, values="identity",
                                                                                causal=True),
         Attention(heads=2, projection="identity", scores="tied")], EQ),
    "identity attention, tied": ([LayerNorm(), Attention(attention="identity", scores="tied", qk_var=0.3)], EQ),
    "residual MLP, scale": ([Residual(Dense(), Activation("relu"), Dense(weight_var=2.0), Scale(c=0.7),
                                      alpha=0.8, beta=0.6)], EQ),
    "residual weight-free shaped mixing": ([Residual(Attention(matrix="shaped", causal=True, scores="tied", beta=0.7,
                                                               **WF), alpha=0.7, beta=1.5)], EQ),
    "parallel": ([Parallel([LayerNorm(), Attention(heads=2, causal=True)],
                           [LayerNorm(), Dense(width_factor=2), Activation("relu"), Dense(weight_var=2.0)],
                           [Attention(causal=True, **WF)], betas=[0.5, 0.5, 0.3])], TWO),
    "inputs with a mean, layernorm": ([LayerNorm(), Dense(), Activation("relu")], WITH_MEAN),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_unshared_joint_state_is_propagate_for_every_rule(name):
    block, inputs = BLOCKS[name]
    net = Network(block=block, depth=3, stem=[Dense(weight_var=1.1)], final=[LayerNorm(), Dense()])
    fresh = kp.propagate(net, inputs, record="sublayers")
    joint = J.propagate(net, inputs, record="sublayers", shared=False)
    _same(fresh, joint)
    assert np.all(joint["quad_error"] >= fresh["quad_error"] - 1e-15)


def test_unshared_joint_state_with_quadrature_and_callables():
    """tanh (2-D quadrature) and a callable without derivative (Stein's factor by quadrature)."""
    block = [Residual(LayerNorm(), Dense(), Activation("tanh"), Dense(), beta=0.5),
             Residual(LayerNorm(), Dense(), Activation(np.sin), Dense(), beta=0.5)]
    net = Network(block=block, depth=4)
    fresh = kp.propagate(net, EQ)
    joint = J.propagate(net, EQ, shared=False)
    _same(fresh, joint, tol=1e-12)
    assert 0 < fresh["quad_error"][-1] <= joint["quad_error"][-1] < 1e-10


# ----------------------------------------------------------------------------------------------
# closed forms


def test_residual_linear_network_with_one_matrix():
    """``x ← x + β x W``, one W (σ_w² = 1) in all L blocks: ``x_L = x_0 (I + βW)^L`` and W tends to a
    circular element c with ``τ(cᵏ c*ᵐ) = δ_km`` (only the nested pairing), so
    ``Σ_L = Σ⁰ Σ_k C(L,k)² β^{2k}``; fresh weights give ``(1 + β²)^L``."""
    depth, beta = 24, 0.25
    net = Network(block=[Residual(Dense(weight_var=1.0), beta=beta)], depth=depth, shared_weights=True)
    traj = kp.propagate(net, EQ)
    q = sum(math.comb(depth, k) ** 2 * beta ** (2 * k) for k in range(depth + 1))
    np.testing.assert_allclose(traj.kernels[-1], q * EQ.sigma, rtol=1e-13)
    assert q == pytest.approx(6461.247471089217, rel=1e-14)
    fresh = kp.propagate(dataclasses.replace(net, shared_weights=False), EQ)
    np.testing.assert_allclose(fresh.kernels[-1], (1 + beta ** 2) ** depth * EQ.sigma, rtol=1e-13)


def _arccos(a, b, s):
    """``E[relu(u) relu(v)]`` for variances a, b and covariance s (Cho & Saul 2009)."""
    s = np.clip(s, -np.sqrt(a * b), np.sqrt(a * b))
    return (np.sqrt(a * b - s * s) + (np.pi - np.arccos(s / np.sqrt(a * b))) * s) / (2 * np.pi)


def _relu_pair(a, b, s):
    """``E[relu(u) relu(v)]`` by 2-D numerical integration over the positive quadrant."""
    det = a * b - s * s
    f = lambda v, u: u * v * np.exp(-(b * u * u - 2 * s * u * v + a * v * v) / (2 * det))  # noqa: E731
    val, err = integrate.dblquad(f, 0, np.inf, 0, np.inf, epsabs=1e-13, epsrel=1e-11)
    return val / (2 * np.pi * np.sqrt(det))


def test_relu_layers_sharing_one_matrix_by_hand():
    """``h₁ = relu(x W)``, ``h₂ = relu(h₁ W)`` with one W and an input with mean m:
    ``Cov(g₁_i, g₂_j) = σ² ⟨x_i, h₁_j⟩ = σ² m_i E relu(g₁_j)``, so ``⟨h₁_i, h₂_j⟩`` is a genuine 2-D Gaussian
    integral, here done with scipy (fresh weights: the product of the means)."""
    n, s2 = 4, 2.0
    base = I.equicorrelated(n, 1.0, 0.3)
    m = np.array([0.5, -0.3, 0.2, 0.4])
    inputs = I.Inputs(base.sigma + np.outer(m, m), base.segments, mean=m)
    relu = Activation("relu")
    joint = J.Joint(n, inputs.segments)
    fam = joint.family(("w",), "w")
    x = joint.input_stream(inputs)
    h1 = joint.activation(relu, joint.weight_atom(fam, [(1.0, x)], math.sqrt(s2), 0.0, (1, 1), "w", 1, 0), "relu")
    h2 = joint.activation(relu, joint.weight_atom(fam, [(1.0, h1)], math.sqrt(s2), 0.0, (1, 1), "w", 1, 0), "relu")
    a = s2 * inputs.sigma                               # Var g₁ = σ² ⟨x, x⟩ (with the mean)
    k1 = _arccos(np.diag(a)[:, None], np.diag(a)[None, :], a)
    b = s2 * k1                                         # Var g₂ = σ² ⟨h₁, h₁⟩
    cov = s2 * np.outer(m, np.sqrt(np.diag(a) / (2 * np.pi)))
    want = np.array([[_relu_pair(a[i, i], b[j, j], cov[i, j]) for j in range(n)] for i in range(n)])
    got = joint.inner(h1, h2)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(joint.kernel(h2), _arccos(np.diag(b)[:, None], np.diag(b)[None, :], b), rtol=1e-13)
    product = np.outer(np.sqrt(np.diag(a) / (2 * np.pi)), np.sqrt(np.diag(b) / (2 * np.pi)))
    assert np.abs(want - product).max() > 0.01


def test_residual_relu_blocks_sharing_one_matrix_by_hand():
    """Two blocks ``x ← x + relu(x W)`` with one W through ``propagate``: ``g₁ = x₀W``, ``g₂ = x₁W`` with
    ``Cov(g₁_i, g₂_j) = σ² Σ⁰_ij`` (``h₁`` has no component on the input), so
    ``Σ₂ = Σ⁰ + K₁ + K₂ + C + Cᵀ``, ``C_ij = E[relu(g₁_i) relu(g₂_j)]`` by 2-D integration."""
    s2 = 2.0
    inputs = I.equicorrelated(4, 1.0, 0.3)
    net = Network(block=[Residual(Dense(weight_var=s2), Activation("relu"))], depth=2, shared_weights=True)
    traj = kp.propagate(net, inputs)
    s0 = inputs.sigma
    a = s2 * s0
    k1 = _arccos(np.diag(a)[:, None], np.diag(a)[None, :], a)
    b = s2 * (s0 + k1)
    k2 = _arccos(np.diag(b)[:, None], np.diag(b)[None, :], b)
    c = np.array([[_relu_pair(a[i, i], b[j, j], a[i, j]) for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(traj.kernels[1], s0 + k1, rtol=1e-14)
    np.testing.assert_allclose(traj.kernels[2], s0 + k1 + k2 + c + c.T, rtol=1e-10)
    fresh = kp.propagate(dataclasses.replace(net, shared_weights=False), inputs)
    mean = np.outer(np.sqrt(np.diag(a) / (2 * np.pi)), np.sqrt(np.diag(b) / (2 * np.pi)))
    np.testing.assert_allclose(fresh.kernels[2], s0 + k1 + k2 + mean + mean.T, rtol=1e-10)


def test_mlp_kernel_unchanged_by_sharing():
    """Without residual sums each layer's kernel depends only on its own input's: sharing changes nothing."""
    spec = kp.load("kernelprop/examples/relu_mlp.toml", depth=30)
    shared = kp.propagate(dataclasses.replace(spec.network, shared_weights=True), spec.inputs)
    _same(kp.propagate(spec.network, spec.inputs), shared, tol=1e-12)


# ----------------------------------------------------------------------------------------------
# the Monte Carlo with really shared weights


def pre_ln(shared, depth=24):
    """The Pre-LN example at 8 tokens: 4 heads, causal tied scores, ReLU MLP of width 4d, β = 1/sqrt(L)."""
    spec = kp.load("kernelprop/examples/pre_ln.toml", depth=depth)
    return dataclasses.replace(spec.network, shared_weights=shared)


def post_ln(shared, depth=24, heads=2, scores="uniform"):
    """Post-LN, causal attention: x ← LN(x + ½ Attn(x)); x ← LN(x + ½ MLP(x))."""
    return Network(block=[Residual(Attention(heads=heads, scores=scores, causal=True), beta=0.5), LayerNorm(),
                          Residual(Dense(width_factor=2), Activation("relu"), Dense(weight_var=2.0), beta=0.5),
                          LayerNorm()], depth=depth, shared_weights=shared)


def pre_ln_alibi(shared, depth=24):
    """Pre-LN with 4 ALiBi heads (tied scores), a biased GELU MLP and a unit-variance init."""
    return Network(block=[Residual(LayerNorm(), Attention(heads=4, scores="tied", causal=True, bias="alibi"),
                                   beta="1/sqrt(L)"),
                          Residual(LayerNorm(), Dense(width_factor=2, bias_var=0.1), Activation("gelu"),
                                   Dense(weight_var="unit"), beta="1/sqrt(L)")],
                   final=[LayerNorm()], depth=depth, shared_weights=shared)


MC_CASES = {"pre-LN, tied, 4 heads": pre_ln, "post-LN, uniform, 2 heads": post_ln,
            "post-LN, tied, 4 heads": lambda s: post_ln(s, heads=4, scores="tied"),
            "pre-LN, ALiBi, GELU, unit init": pre_ln_alibi}


@pytest.mark.parametrize("name", list(MC_CASES))
def test_shared_weights_agree_with_the_monte_carlo(name):
    """Depth 24, widths 256/128, 16 seeds each: the shared-weight theory passes the Bonferroni check
    (docs/theory.md §12); the fresh-weight prediction fails it against the same simulations, with a
    largest |z| more than twice the threshold k (measured: 2.4 k, 10 k, 18 k, 3.6 k for the four cases;
    the Pre-LN q_mean at block 24 is 36.9 shared, 2.63 fresh, 37.1 ± 1.1 simulated)."""
    make = MC_CASES[name]
    cmp, theory, sim, half = mc.check(make(True), EQ, 256, 16, seed=5, every=6)
    assert cmp.agree, [(r.label, r.measure, r.position, r.z) for r in cmp.failures[:5]]
    fresh = mc.compare(kp.propagate(make(False), EQ, every=6), sim, half)
    assert not fresh.agree
    assert fresh.max_abs_z > 2 * cmp.k


def test_monte_carlo_draws_are_shared():
    """Inside a shared part the k-th draw at a path repeats the first block's; elsewhere draws are fresh."""
    ctx = S.Context([np.random.default_rng(0), np.random.default_rng(1)], 16, (4,), products="explicit")
    ctx.shared = {}
    ctx.share(("block", 0))
    ctx.path = "/1:dense"
    w, b = ctx.normal((16, 16)), ctx.normal((1, 16))
    w *= 2.0                                         # callers scale in place: the cache must not change
    ctx.share(("block", 0))
    assert np.array_equal(ctx.normal((16, 16)), w / 2.0) and np.array_equal(ctx.normal((1, 16)), b)
    ctx.share(("block", 1))
    assert not np.allclose(ctx.normal((16, 16)), w / 2.0)
    ctx.share(None)
    assert not np.allclose(ctx.normal((16, 16)), w / 2.0)


# ----------------------------------------------------------------------------------------------
# spec errors and refusals


def test_spec_field_and_toml():
    text = """
shared_weights = true
depth = 3
[input]
kind = "identity"
tokens = 4
[[block]]
type = "residual"
layers = [{ type = "dense" }]
"""
    spec = kp.loads(text)
    assert spec.network.shared_weights is True
    assert kp.propagate(spec.network, spec.inputs).meta["interpreter"] == "shared weights"
    with pytest.raises(SpecError) as e:
        kp.loads(text.replace("true", "\"yes\""))
    assert e.value.field == "shared_weights"
    assert kp.loads(text.replace("shared_weights = true\n", "")).network.shared_weights is False


def test_shapes_differing_across_blocks_are_refused():
    with pytest.raises(SpecError) as e:
        Network(block=[Residual(Dense(width_factor="l"), Dense())], depth=3, shared_weights=True)
    assert e.value.field == "block.layers[0].residual.layers[0].dense.width_factor"
    assert "varies with the block index" in str(e.value)
    Network(block=[Residual(Dense(width_factor="l"), Dense())], depth=3)               # fine without sharing
    Network(block=[Dense(width_factor="1 + 0*l", weight_var="2/l")], depth=3, shared_weights=True)
    widening = Network(block=[Dense(width_factor=2)], depth=2, shared_weights=True)   # d → 2d, then 2d → 2d
    with pytest.raises(SpecError) as e:
        kp.propagate(widening, EQ)
    assert e.value.field == "shared_weights" and "1d × 2d" in str(e.value) and "2d × 2d" in str(e.value)
    with pytest.raises(SpecError) as e:
        mc.simulate(widening, EQ, 32, 2)
    assert e.value.field == "shared_weights" and "block 2" in str(e.value)


@pytest.mark.parametrize("layer, words", [
    (Dropout(0.1), "dropout"),
    (Attention(scores="standard"), "standard"),
    (Attention(spa="e-spa", causal=True), "spa"),
    (GatedMLP(), "gated_mlp"),
    (Attention(heads=2, bias="alibi", **WF), "head blocks"),
    (Dense(init="orthogonal"), "Gaussian"),
])
def test_unsupported_layers_are_refused_by_name(layer, words):
    net = Network(block=[Residual(LayerNorm(), layer, beta=0.5)], depth=2, shared_weights=True)
    with pytest.raises(NotSupportedError, match=words):
        kp.propagate(net, EQ)


def test_activation_of_several_matrices_is_refused():
    net = Network(block=[Residual(Dense()), Activation("relu")], depth=2, shared_weights=True)
    with pytest.raises(NotSupportedError, match="several weight matrices"):
        kp.propagate(net, EQ)


def test_backward_passes_refuse_shared_weights():
    net = post_ln(True, depth=2)
    with pytest.raises(NotSupportedError, match="backward pass with shared_weights"):
        kp.backpropagate(net, EQ)
    with pytest.raises(NotSupportedError, match="backward pass with shared_weights"):
        mc.simulate_gradients(net, EQ, 32, 2)


def test_memory_estimate_refuses():
    net = pre_ln(True, depth=48)
    need = J.estimate(net, 8)
    assert need["elements"] == 8 * (1 + 4 * 48)
    with pytest.raises(SpecError, match="lower the depth or the number of tokens") as e:
        J.propagate(net, EQ, memory_limit=need["bytes"] - 1)
    assert e.value.field == "depth"
    J.propagate(net, EQ, memory_limit=need["bytes"])


def test_interpreters_without_a_shared_rule_refuse_it():
    """The symbolic engine, the NTK and a sweep's cache all know about shared weights."""
    from kernelprop.layers import Dense, Residual
    from kernelprop.sweep.compute import _fingerprint
    from kernelprop.symbolic import derive
    block = [Residual(Dense(), beta=0.5)]
    shared = kp.Network(block=block, depth=3, shared_weights=True)
    with pytest.raises(kp.NotSupportedError, match="shared_weights = true"):
        derive(shared, I.equicorrelated(3, 1.0, 0.2))
    with pytest.raises(kp.NotSupportedError, match="shared_weights = true"):
        kp.propagate(shared, I.identity(3), ntk=True)
    assert _fingerprint(shared) != _fingerprint(kp.Network(block=block, depth=3))
