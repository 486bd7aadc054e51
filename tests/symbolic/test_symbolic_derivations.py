"""Derivations against independent references: known values from the literature, hand-derived
formulas written out here, Gauss–Hermite quadrature, and brute-force iteration."""

import math

import numpy as np
import pytest
import sympy as sp

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop import symbolic as S
from kernelprop.kernel import activations as A
from kernelprop.kernel import quadrature as Q
from kernelprop.network.layers import Activation, Attention, Dense, LayerNorm, Network, Residual
from kernelprop.symbolic.symbols import c, l, q, rho

X = I.equicorrelated(4, 1.0, 0.2)


def relu_cmap(x):
    """Normalised arc-cosine map (Cho & Saul 2009), written independently of the package."""
    return (np.sqrt(1 - x * x) + (np.pi - np.arccos(x)) * x) / np.pi


def test_relu_c_map_fixed_point_slope_and_power_law():
    """ReLU at σ_w² = 2: C(1) = 1, C'(1) = 1 (marginal), C(0) = 1/π; 1 − ρ_l ≈ 9π²/(2l²) (Hayou et al. 2019)."""
    d = S.derive(kp.load("kernelprop/examples/relu_mlp.toml"))
    cm = d.c_map
    f = sp.lambdify(c, S.activations.explicit(cm.c_map))
    grid = np.linspace(-0.99, 0.99, 41)
    np.testing.assert_allclose(f(grid), relu_cmap(grid), rtol=1e-14)
    assert cm.c1 == 1 and cm.chi == 1 and cm.lambda_a == 0 and sp.simplify(cm.c0 - 1 / sp.pi) == 0
    assert sp.simplify(cm.asymptotic - 9 * sp.pi ** 2 / (2 * l ** 2)) == 0
    assert [(fp.values["rho"], fp.stability) for fp in d.fixed_points] == [(1, "marginal")]
    # the closed-form parts: q is preserved (σ_w²/2 = 1) and the mean follows from q
    assert d.trajectory.solution["q"] == sp.Symbol("q_0", positive=True)
    # brute force: iterate the map and compare (1 − ρ_l) l² with 9π²/2 (the O(log l / l) correction is ~2 %)
    r = 0.0
    for _ in range(20000):
        r = relu_cmap(r)
    assert (1 - r) * 20000 ** 2 == pytest.approx(9 * np.pi ** 2 / 2, rel=0.02)


def test_relu_with_bias_fixed_point_and_slope_chi_1():
    """Dense(σ_w², σ_b²) → ReLU: q* = σ_b²/(2 − σ_w²) after the ReLU, and the slope at ρ* = 1 is
    χ₁ = σ_w² E[φ'(u)²] = σ_w²/2 (Poole et al. 2016); the q-map solves in closed form."""
    net = Network(block=[Dense(1.5, 0.1), Activation("relu")], depth=10)
    d = S.derive(net, X, symbols=["weight_var", "bias_var"])
    w, b = sp.Symbol("sigma_w2", nonnegative=True), sp.Symbol("sigma_b2", nonnegative=True)
    (fp,) = d.fixed_points
    assert fp.values["rho"] == 1 and fp.exact and fp.stability == "stable"
    assert sp.simplify(fp.values["q"] - b / (2 - w)) == 0
    assert sp.simplify(fp.eigenvalues[0] - w / 2) == 0
    q0 = sp.Symbol("q_0", positive=True)
    expected = (w / 2) ** l * (q0 - b / (2 - w)) + b / (2 - w)       # q_l = (σ_w²/2) q_{l−1} + σ_b²/2
    assert sp.simplify(d.trajectory.solution["q"] - expected) == 0


def test_noci_c_map_slope_and_angle_exponent():
    """ρ' = (ρ + a m̃)/(1 + a m̃), m̃ = ρ + (1−ρ)/T, a = β²σ_v²σ_o²: C'(1) = 1/(1 + a) by hand."""
    net = Network(block=[Residual(Attention(value_var="v", out_var=0.5), beta="b")], depth=5,
                  params={"v": 1.5, "b": 0.8})
    cm = S.derive(net, X).c_map
    a = sp.Symbol("b", real=True) ** 2 * sp.Symbol("v", real=True) / 2
    assert cm.q_free and cm.c1 == 1
    assert sp.simplify(cm.chi - 1 / (1 + a)) == 0
    assert cm.chi_value == pytest.approx(1 / (1 + 0.64 * 1.5 / 2), rel=1e-14)
    assert cm.lambda_a_value == pytest.approx(-0.5 * math.log(1 + 0.48), rel=1e-14)


def test_erf_c_map_slope_matches_the_williams_kernel_by_hand():
    """φ = erf(a·) on q = 1: C(c) = arcsin(κc)/arcsin(κ), κ = 2a²/(1 + 2a²), so C'(1) = κ/(sqrt(1 − κ²) arcsin κ)."""
    net = Network(block=[Dense(1.0), Activation("erf", {"a": 0.7})], depth=3)
    cm = S.derive(net, X).c_map
    k = 2 * 0.49 / (1 + 2 * 0.49)
    assert cm.chi_value == pytest.approx(k / (math.sqrt(1 - k * k) * math.asin(k)), rel=1e-13)
    assert cm.c0 == 0


def test_post_ln_slope_is_the_product_of_its_residual_sub_blocks():
    """Post-LN: attention residual C'(1) = 1/(1 + σ_v²σ_o²) = 1/2, ReLU-MLP residual C'(1) = 1."""
    d = S.derive(kp.load("kernelprop/examples/post_ln.toml"))
    assert d.c_map.chi == sp.Rational(1, 2)
    assert d.trajectory.solution == {"q": 1} and d.trajectory.valid_from["q"] == 1
    assert [fp.stability for fp in d.fixed_points] == ["stable"]


def test_chaotic_erf_network_has_a_stable_fixed_point_below_one():
    """erf(2x) with σ_w² = 1: ordered-to-chaotic (Poole et al. 2016) — ρ* = 1 unstable, ρ* = 0 stable."""
    net = Network(block=[Dense(1.0), Activation("erf", {"a": 2.0})], depth=3)
    fps = S.derive(net, X).fixed_points
    found = {round(fp.values["rho"], 9): fp.stability for fp in fps}
    assert found == {0.0: "stable", 1.0: "unstable"}


@pytest.mark.parametrize("name,params", [("relu", {}), ("leaky_relu", {"slope": 0.2}), ("abs", {}),
                                         ("erf", {"a": 0.8}), ("gelu", {}), ("identity", {})])
def test_symbolic_activation_kernels_against_gauss_hermite(name, params):
    """Each sympy closed form (GELU's derived here by Stein's lemma) against 2-D Gauss–Hermite quadrature."""
    form = S.CLOSED_FORMS[name]
    full = {**A.ACTIVATIONS[name].params, **params}
    phi = lambda x: A.ACTIVATIONS[name].phi(x, **full)  # noqa: E731
    for a, b, s in [(1.0, 1.0, 0.3), (0.7, 1.9, -0.5), (2.5, 0.4, 0.9), (1.3, 1.3, 1.3)]:
        sigma = np.array([[a, s], [s, b]])
        k, err = Q.gauss_hermite_kernel(phi, phi, sigma, 1024)
        a_, b_, s_ = map(sp.nsimplify, (a, b, s))
        off = form.off(a_, b_, s_, **{k_: sp.nsimplify(v) for k_, v in full.items()})
        diag = form.diag(a_, **{k_: sp.nsimplify(v) for k_, v in full.items()})
        tol = 10 * err + 1e-12
        assert float(S.activations.explicit(off)) == pytest.approx(k[0, 1], abs=tol)
        assert float(diag) == pytest.approx(k[0, 0], abs=tol)
        m, merr = Q.gauss_hermite_mean(phi, np.array([a]), 1024)
        exact = float(form.mean(a_, **{k_: sp.nsimplify(v) for k_, v in full.items()}))
        assert exact == pytest.approx(m[0], abs=10 * merr + 1e-12)


def test_layernorm_block_gives_q_fixed_and_one_step_closed_form():
    net = Network(block=[LayerNorm(gain="g"), Dense(1.0), Activation("relu")], depth=3, params={"g": 1.3})
    d = S.derive(net, X)
    g = sp.Symbol("g", real=True)
    assert sp.simplify(d.trajectory.solution["q"] - g ** 2 / 2) == 0 and d.trajectory.valid_from["q"] == 1
    assert not d.trajectory.found and "rho" in d.trajectory.reason


def test_block_map_steps_are_the_layer_formulas():
    """Dense: q' = σ_w² q + σ_b², ρ' = (σ_w² qρ + σ_b²)/(σ_w² q + σ_b²); ReLU: q' = q/2."""
    net = Network(block=[Dense(1.0), Activation("relu")], depth=1)
    bm = S.block_map(net, symbols=["weight_var", "bias_var"])
    w, b = sp.Symbol("sigma_w2", nonnegative=True), sp.Symbol("sigma_b2", nonnegative=True)
    dense, relu = bm.block.steps
    assert sp.simplify(dense.outputs[0] - (w * q + b)) == 0
    assert sp.simplify(dense.outputs[1] - (w * q * rho + b) / (w * q + b)) == 0
    assert relu.outputs[0] == q / 2
