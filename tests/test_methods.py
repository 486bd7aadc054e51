"""SPA attention, C-maps/TAT, and presets against closed forms and hand computations (issue: THEORY §3, §6, §8)."""

import numpy as np
import pytest
from scipy import optimize

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop.methods import cmaps, presets, spa
from kernelprop.network.layers import Activation, Attention, Dense, Network

# ---------------------------------------------------------------- SPA

@pytest.mark.parametrize("kind", ["e-spa", "u-spa"])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_only_spa_stack_reproduces_the_targets_exactly(kind, causal):
    depth, t = 40, 48
    tr = kp.propagate(Network(block=[Attention(spa=kind, causal=causal)], depth=depth), I.identity(t))
    for l in range(depth + 1):
        np.testing.assert_allclose(tr.kernels[l], spa.target_kernel(kind, t, l, depth), atol=1e-12)


def ar1_attention(t, rho1, rho0):
    """E-SPA causal A_l = F_l F_{l−1}^{-1} for AR(1) Cholesky factors, derived by hand:
    A[0,0] = 1, A[i,i] = s1/s0, A[i,j] = (s1/s0) ρ1^{i−j−1}(ρ1 − ρ0) (i > j ≥ 1), A[i,0] = ρ1^{i−1}(ρ1 − s1ρ0/s0)."""
    s1, s0 = np.sqrt(1 - rho1 ** 2), np.sqrt(1 - rho0 ** 2)
    a = np.zeros((t, t))
    a[0, 0] = 1
    for i in range(1, t):
        a[i, i] = s1 / s0
        a[i, 0] = rho1 ** (i - 1) * (rho1 - s1 * rho0 / s0)
        for j in range(1, i):
            a[i, j] = s1 / s0 * rho1 ** (i - j - 1) * (rho1 - rho0)
    return a


@pytest.mark.parametrize("depth,gamma_final", [(10, 0.005), (64, 0.005), (100, 0.05)])
def test_e_spa_matrix_is_the_ar1_closed_form_positive_with_the_stated_diagonal(depth, gamma_final):
    t = 128
    rho = lambda l: 0.0 if l == 0 else np.sqrt(1 - (1 - np.exp(-2 * gamma_final)) ** (l / depth))
    for l in (1, 2, depth // 2, depth):
        a = spa.attention_matrix("e-spa", t, l, depth, gamma_final, causal=True)
        np.testing.assert_allclose(a, ar1_attention(t, rho(l), rho(l - 1)), rtol=1e-9, atol=1e-300)
        lower = a[np.tril_indices(t)]
        assert lower.min() > 0                                   # entrywise positive: softmax-realisable
        diag = (1 - np.exp(-2 * gamma_final)) ** (1 / (2 * depth))
        np.testing.assert_allclose(np.diag(a)[1:], diag, rtol=1e-12)


@pytest.mark.parametrize("kind,causal", [("e-spa", True), ("u-spa", True), ("e-spa", False)])
def test_softmax_form_rebuilds_the_matrix(kind, causal):
    a = spa.attention_matrix(kind, 64, 3, 12, causal=causal)
    d, b = spa.softmax_form(a, causal)
    z = np.exp(b - b.max(1, keepdims=True))
    np.testing.assert_allclose(d[:, None] * z / z.sum(1, keepdims=True), a, rtol=1e-12, atol=1e-300)


def test_spa_bad_parameters_are_spec_errors():
    with pytest.raises(kp.SpecError, match="spa_final"):
        kp.propagate(Network(block=[Attention(spa="u-spa", spa_final=1.5)], depth=2), I.identity(4))
    with pytest.raises(kp.SpecError, match="scores"):
        Attention(spa="e-spa", scores="tied")


# ---------------------------------------------------------------- C-maps and TAT

def leaky_c_map(c, s):
    """Normalised leaky-ReLU C-map, by hand: (s c + (1−s)² k(c)) / ((1+s²)/2),
    k(c) = (sqrt(1−c²) + (π − arccos c) c)/(2π)."""
    k = (np.sqrt(1 - c * c) + (np.pi - np.arccos(c)) * c) / (2 * np.pi)
    return (s * c + (1 - s) ** 2 * k) / ((1 + s * s) / 2)


def test_relu_c_map_values_and_slope():
    relu = [Activation("relu", scale=np.sqrt(2))]
    np.testing.assert_allclose(cmaps.c_map(relu, [0.0, 1.0, -1.0]), [1 / np.pi, 1.0, 0.0], atol=1e-14)
    assert cmaps.c_map_slope(relu) == pytest.approx(1.0, abs=1e-7)
    # erf: C'(1) = q E[φ'²]/E[φ²] = (4/(π sqrt(1+4q))) / ((2/π) arcsin(2q/(1+2q))) at q = 1
    expected = (4 / (np.pi * np.sqrt(5))) / ((2 / np.pi) * np.arcsin(2 / 3))
    assert cmaps.c_map_slope([Activation("erf")]) == pytest.approx(expected, rel=1e-7)


def test_c_map_of_a_dense_layer_with_bias():
    # Dense: C(c) = (σ_w² c + σ_b²)/(σ_w² + σ_b²) at q = 1
    np.testing.assert_allclose(cmaps.c_map([Dense(weight_var=2.0, bias_var=0.5)], [0.3]), [(0.6 + 0.5) / 2.5])
    with pytest.raises(kp.NotSupportedError, match="attention"):
        cmaps.c_map([Attention()], 0.5)


@pytest.mark.parametrize("depth,eta", [(1, 0.2), (12, 0.5), (48, 0.9), (200, 0.95)])
def test_tat_slope_against_an_independent_root_solve(depth, eta):
    def c_net0(s):
        c = 0.0
        for _ in range(depth):
            c = leaky_c_map(c, s)
        return c - eta
    s_ref = optimize.brentq(c_net0, 0, 1 - 1e-12, xtol=1e-15)
    s, scale = cmaps.tat_leaky_relu(depth, eta)
    assert s == pytest.approx(s_ref, abs=1e-10)
    assert scale == pytest.approx(np.sqrt(2 / (1 + s_ref ** 2)), rel=1e-12)


def test_tat_target_out_of_reach_is_a_clear_error():
    with pytest.raises(kp.SpecError, match="out of reach at depth 3"):
        cmaps.tat_leaky_relu(3, 0.99)


# ---------------------------------------------------------------- simplified blocks and presets

def test_sas_attention_sub_block_is_the_identity_and_sas_p_coincides_with_sas_at_init():
    x = I.equicorrelated(16, 1.0, 0.2)
    for causal in (True, False):
        shaped = Attention(matrix="shaped", causal=causal, values="identity", projection="identity", heads=4)
        tr = kp.propagate(Network(block=[shaped], depth=3), x)
        np.testing.assert_allclose(tr.kernels[-1], x.sigma, atol=1e-14)
        a = kp.propagate(presets.build("sas", 30, causal=causal), x)
        b = kp.propagate(presets.build("sas_p", 30, causal=causal), x)
        np.testing.assert_allclose(a.kernels, b.kernels, rtol=1e-12)


T = 5


def causal_a():
    a = np.tril(np.ones((T, T)))
    return a / a.sum(1, keepdims=True)


def relu_k(s):
    d = np.sqrt(np.diag(s))
    c = np.clip(s / np.outer(d, d), -1, 1)
    return np.outer(d, d) * (np.sqrt(1 - c * c) + (np.pi - np.arccos(c)) * c) / (2 * np.pi)


def ln(s):   # inputs here have zero feature mean (Gaussian streams)
    d = np.sqrt(np.diag(s))
    return s / np.outer(d, d)


def mlp(s):  # Dense(1) → ReLU → Dense(2): fresh weights, so no cross term with the skip
    return 2 * relu_k(s)


def unit(s):  # a "unit" last init: the branch's mean variance brought to 1
    return s / np.mean(np.diag(s))


def attn(s, value=1.0):
    a = causal_a()
    return value * a @ s @ a.T


HAND = {  # preset → (one block by hand, final map by hand), depth L = 6
    "post_ln": (lambda s, L: ln(ln(s + attn(s)) + mlp(ln(s + attn(s)))), None),
    "pre_ln": (lambda s, L: (lambda z: z + mlp(ln(z)))(s + attn(ln(s))), ln),
    "noci": (lambda s, L: (lambda z: z + mlp(ln(z)) / L)(s + attn(ln(s)) / L), ln),
    "deepnorm": (lambda s, L: (lambda z: ln(np.sqrt(2 * L) * z + mlp(ln(z) / (8 * L) ** 0.5) / (8 * L) ** 0.5))(
        ln(np.sqrt(2 * L) * s + attn(s) / (8 * L))), None),
    "gpt2": (lambda s, L: (lambda z: z + mlp(ln(z)) / (2 * L))(s + attn(ln(s)) / (2 * L)), ln),
    "deepscalelm": (lambda s, L: (lambda z: (1 - 2 / L) * z + 2 / L * unit(mlp(ln(z))))(
        (1 - 2 / L) * s + 2 / L * unit(attn(ln(s)))), ln),
    "vanilla": (lambda s, L: mlp(attn(s)), None),
    "rezero": (lambda s, L: s, None),
    "layerscale": (lambda s, L: (lambda z: z + 0.01 * mlp(ln(z)))(s + 0.01 * attn(ln(s))), ln),
    "sas": (lambda s, L: (lambda z: z + 0.01 * mlp(z))(ln(s)), None),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_preset_first_blocks_against_a_hand_computation(name):
    depth = 6
    x = I.equicorrelated(T, 1.3, 0.2)
    tr = kp.propagate(presets.build(name, depth, heads=1), x)
    block, final = HAND[name]
    s = x.sigma
    for l in (1, 2, 3):
        s = block(s, depth)
        np.testing.assert_allclose(tr.kernels[l], s, rtol=1e-12, err_msg=f"{name} block {l}")
    if final is not None:
        s = x.sigma
        for _ in range(depth):
            s = block(s, depth)
        np.testing.assert_allclose(tr.kernels[-1], final(s), rtol=1e-11)


def test_every_preset_runs_and_is_listed_with_a_source():
    x = I.equicorrelated(8, 1.0, 0.1)
    for name, p in presets.PRESETS.items():
        assert p.source and p.summary
        tr = kp.propagate(presets.build(name, 20), x, keep_kernels=False)
        assert np.all(np.isfinite(tr["cos_mean"]))
    with pytest.raises(kp.SpecError, match="knob"):
        presets.build("noci", 4, beta=2.0)
    with pytest.raises(kp.SpecError, match="preset"):
        presets.build("resnet", 4)


# ---------------------------------------------------------------- simulation

@pytest.mark.parametrize("kind", ["e-spa", "u-spa"])
def test_attention_only_spa_stack_is_exact_at_finite_width_with_orthogonal_values(kind):
    """He et al. 2023: with orthogonal value/output weights and exact orthogonal inputs, the realised
    D_l softmax(B_l + M) attention maps the finite-width kernel onto the target to float precision."""
    from kernelprop import montecarlo
    depth, t = 24, 32
    net = Network(block=[Attention(spa=kind, causal=True)], depth=depth)
    sim = montecarlo.simulate(net, I.identity(t), width=2 * t, seeds=2, init="orthogonal", seed=0, dong=False)
    for l in range(depth + 1):
        np.testing.assert_allclose(sim.kernels[l], spa.target_kernel(kind, t, l, depth), atol=1e-11)


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_agrees_with_the_simulator(name):
    """Theory against finite-width networks for the first blocks of every preset (criterion of
    kernelprop.montecarlo.check: Bonferroni at family-wise rate 0.01 on width-extrapolated estimates)."""
    from kernelprop import montecarlo
    depth = 16 if name in ("e_spa", "u_spa", "value_skipinit") else 6
    net = presets.build(name, depth, heads=2)
    cmp, *_ = montecarlo.check(net, I.equicorrelated(8, 1.0, 0.2), width=128, seeds=8, seed=1, every=depth // 3)
    assert cmp.agree, [(r.label, r.measure, r.z) for r in cmp.failures][:5]
