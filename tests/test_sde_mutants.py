"""Covariance SDEs (kernelprop/finite/sde.py) where mutation testing found them unchecked: the noise of one
step against the closed-form covariance of the linear network, the positive semi-definite step of the shaped
transformer with σ² ≠ 1 against the Euler–Maruyama step, the measures against hand values, and the fields
named by refusals.

Closed form (Li, Nica & Roy 2022; docs/theory.md §15): for φ = identity, or the Wishart parts alone,
``Cov(dV_ab, dV_cd) = c (V_ac V_bd + V_ad V_bc) dt`` with ``c = 2λ²γ²σ² + kγ⁴σ⁴`` (k = 2 for the residual
MLP: its W₂ Wishart part and the Gram of the activations; k = 1, or 2 with the output projection, for the
shaped transformer's value and output weights)."""

import math

import numpy as np
import pytest

from kernelprop import Activation, inputs
from kernelprop.errors import SpecError
from kernelprop.finite import sde

V = np.array([[1.0, 0.3], [0.3, 1.4]])
PATHS = 40000


def _predicted_variance(c, h):
    """``Var(dV_ab) = c h (V_aa V_bb + V_ab²)`` for (a, b) = (0, 0), (0, 1), (1, 1)."""
    return {(a, b): c * h * (V[a, a] * V[b, b] + V[a, b] ** 2) for a, b in ((0, 0), (0, 1), (1, 1))}


def _var_se(x):
    """Sample variance and its standard error ``sqrt((m₄ − s⁴)/P)``; the error must be below 3 % of the
    variance (the Gaussian value is ~0.7-1 % at these path counts): a heavy-tailed noise cannot pass by
    inflating its own standard error."""
    d = x - x.mean()
    s2 = float(np.mean(d * d))
    se = math.sqrt(float(np.mean(d ** 4)) - s2 * s2) / math.sqrt(len(x))
    assert se <= 0.03 * s2, (s2, se)
    return s2, se


def test_residual_mlp_step_variance_is_the_linear_networks_closed_form():
    """φ = identity, σ₁² = 0.8, σ₂² = 2 (σ² = 1.6, so λ² + γ²σ² = 1): the Euler–Maruyama noise has
    variance ``c h (V_aa V_bb + V_ab²)`` with ``c = 2λ²γ²σ² + 2γ⁴σ⁴ = 1`` within 4 standard errors; the PSD
    step at h = 1/64 within that plus 3 % (its documented O(h) and ``1/(2m)`` rounding terms, m = 64 feature
    vectors: measured 0.5-2.2 %). Also pins :meth:`ResidualMLP.noise_scale` to the same c."""
    model = sde.ResidualMLP(skip=math.sqrt(0.5), branch=math.sqrt(0.5 / 1.6), w1_var=0.8, w2_var=2.0)
    width, h = 64, 1.0 / 64
    assert model.noise_scale(V) == pytest.approx(1.0, rel=1e-12)
    vb = np.broadcast_to(V, (PATHS, 2, 2)).copy()
    l_v, _ = sde._sqrt_psd(vb)
    z = model.draw(np.random.default_rng(1), PATHS, 2)
    em = model.step_noise(vb, l_v, h, z)
    psd = model.step(vb, l_v, width, h, z)
    for (a, b), want in _predicted_variance(1.0, h).items():
        got, se = _var_se(em[:, a, b])
        assert abs(got - want) <= 4.0 * se, ("em", a, b, got, want, se)
        got, se = _var_se(psd[:, a, b])
        assert abs(got - want) <= 4.0 * se + 0.03 * want, ("psd", a, b, got, want, se)


@pytest.mark.parametrize("projection", [False, True])
def test_shaped_transformer_noise_scale_is_the_wishart_variance(projection):
    """τ₀ = 1000 (the attention part ~1e-6 of the rest): the step noise has variance
    ``c h (V_aa V_bb + V_ab²)`` with :meth:`ShapedTransformer.noise_scale` ``c = 2λ²γ²σ² + kγ⁴σ⁴``
    (0.75 without the projection, 1 with it, λ² = γ² = 1/2, σ² = 1), within 4 standard errors."""
    model = sde.ShapedTransformer(tau0=1e3, projection=projection)
    c = model.noise_scale(V)
    assert c == pytest.approx(1.0 if projection else 0.75, rel=1e-5)
    h = 0.01
    vb = np.broadcast_to(V, (PATHS, 2, 2)).copy()
    l_v, _ = sde._sqrt_psd(vb)
    noise = model.step_noise(vb, l_v, h, model.draw(np.random.default_rng(2), PATHS, 2))
    for (a, b), want in _predicted_variance(c, h).items():
        got, se = _var_se(noise[:, a, b])
        assert abs(got - want) <= 4.0 * se, (a, b, got, want, se)


def test_shaped_transformer_psd_step_has_the_euler_maruyama_mean_with_value_variance_two():
    """σ_v² = 2, τ₀ = 0.7, h = 0.02, common random numbers: the PSD step's mean equals the Euler–Maruyama
    step's ``V + h·b(V)`` to O(h²) (docs/theory.md §15.3): every entry of the mean difference within 4
    standard errors plus h² (the difference is not resolved at 10⁵ paths: below 0.3 h² measured). The
    ``V∘G`` term enters with ``γ²σ²/τ₀²`` (it moves the mean by ~0.08 h if σ² is misplaced)."""
    model = sde.ShapedTransformer(tau0=0.7, skip=math.sqrt(0.5), branch=0.5, value_var=2.0)
    paths, h, width = 100000, 0.02, 10 ** 6
    vb = np.broadcast_to(V, (paths, 2, 2)).copy()
    l_v, _ = sde._sqrt_psd(vb)
    z = model.draw(np.random.default_rng(3), paths, 2)
    diff = model.step(vb, l_v, width, h, z) - (vb + h * model.drift(vb, width) + model.step_noise(vb, l_v, h, z))
    se = diff.std(axis=0) / math.sqrt(paths)
    assert np.all(np.abs(diff.mean(axis=0)) <= 4.0 * se + h * h), (diff.mean(axis=0), se)


def test_measures_against_hand_values():
    """``q``, cosines and ``tr(PV)/tr(V)`` (P = I − 11ᵀ/N, built here) of two 3×3 covariances and a 1×1 one."""
    a = np.array([[2.0, 1.0, -0.5], [1.0, 0.5, 0.2], [-0.5, 0.2, 3.0]])
    b = 4.0 * np.ones((3, 3))                                   # rank one: distance 0, cosines 1
    m = sde.measures(np.stack([a, b]))
    proj = np.eye(3) - np.ones((3, 3)) / 3
    cos_a = [1.0 / math.sqrt(2.0 * 0.5), -0.5 / math.sqrt(2.0 * 3.0), 0.2 / math.sqrt(0.5 * 3.0)]
    want = {"q_mean": [5.5 / 3, 4.0], "q_min": [0.5, 4.0], "q_max": [3.0, 4.0],
            "cos_mean": [sum(cos_a) / 3, 1.0], "cos_min": [min(cos_a), 1.0],
            "rank_one_distance": [np.trace(proj @ a) / 5.5, 0.0]}
    for name, values in want.items():
        np.testing.assert_allclose(m[name], values, rtol=1e-12, atol=1e-15, err_msg=name)
    one = sde.measures(np.array([[[2.5]]]))
    assert one["q_mean"][0] == 2.5 and one["cos_mean"][0] == 1.0 and one["rank_one_distance"][0] == 0.0


def test_refusals_name_their_field_and_value_and_networks_their_model():
    """The refusals' field, value and text (its first and last words), and the names of the networks."""
    x = inputs.equicorrelated(2, 1.0, 0.3)
    net = sde.ShapedTransformer().network(64, 4)
    assert net.name == "shaped transformer (covariance SDE)"
    assert sde.ResidualMLP().network(64, 4).name == "residual MLP (covariance SDE)"
    models = "must be a ResidualMLP, a ShapedTransformer or a Network"
    for call, field, value, start, end in (
            (lambda: sde.model_of(net, 0), "width", 0, "must be a whole number", ">= 1"),
            (lambda: sde.model_of("net", 64), "model", "str", models, models),
            (lambda: sde.sde_trajectory(object(), x, 64, 4), "model", "object", models, models),
            (lambda: sde.sde_trajectory(sde.ShapedTransformer(), "x", 64, 4), "inputs", "str",
             "must be kernelprop Inputs", "(kernelprop.inputs.*)"),
            (lambda: sde.sde_trajectory(sde.ShapedTransformer(), x, 2, 4), "width", 2,
             "must exceed the 2 tokens", "has rank ≤ n): raise the width"),
            (lambda: sde.ResidualMLP(skip=-0.5), "skip", -0.5, "must be a finite number", ">= 0"),
            (lambda: sde.ResidualMLP(activation="relu"), "activation", "relu", "must be a kernelprop Activation",
             "layer"),
            (lambda: sde.ResidualMLP(activation=Activation("relu", input_shift=0.1)), "activation.input_shift", 0.1,
             "the SDE needs input_shift = offset = 0", "Dense bias-free form")):
        with pytest.raises(SpecError) as info:
            call()
        assert (info.value.field, info.value.value) == (field, value)
        assert info.value.allowed.startswith(start) and info.value.allowed.endswith(end), info.value.allowed
