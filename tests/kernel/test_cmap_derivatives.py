"""C-map derivatives without finite differences (docs/theory.md §8): χ = C'(c), C''(c), Q'(q) and the
error of network C-maps, against closed forms and independent high-precision references.

References: Williams' erf kernel differentiated by hand (and by mpmath at 50 digits), the arc-cosine
kernels, scipy ``quad`` for one-dimensional Gaussian expectations, and a 300 × 300 Gauss–Legendre
product rule over ``[-12, 12]²`` in extended precision for the tanh network (analytic integrand:
converged to round-off, checked against 400 × 400).
"""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
from scipy import integrate

from kernelprop.errors import NotSupportedError, SpecError
from kernelprop.methods import cmaps
from kernelprop.network import layers as L

pytestmark = pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")  # the references' own


def gauss(f, var):
    """``E f(u)``, ``u ~ N(0, var)``, by scipy quad (split at 0)."""
    s = math.sqrt(var)
    return sum(integrate.quad(lambda z: f(s * z) * math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi), a, b,
                              epsabs=1e-15, epsrel=1e-14, limit=400)[0] for a, b in ((-12, 0), (0, 12)))


def tanh_d(x, k=1.0):
    return k * (1.0 - math.tanh(k * x) ** 2)


def tanh_dd(x, k=1.0):
    t = math.tanh(k * x)
    return -2.0 * k * k * t * (1.0 - t * t)


# --- closed forms ------------------------------------------------------------------------------

def test_relu_slope_is_one_and_curvature_infinite():
    d = cmaps.c_map_derivatives([L.Activation("relu", scale=math.sqrt(2))])
    assert d.chi == pytest.approx(1.0, abs=d.chi_error + 1e-15) and d.chi_error < 1e-13
    assert d.curvature == math.inf and d.methods["curvature"] == "infinite" and "jumps" in d.notes[0]
    assert d.q_slope == pytest.approx(1.0, abs=d.q_slope_error) and d.q_slope_error < 1e-12  # q ↦ q
    assert cmaps.c_map_slope([L.Activation("relu", scale=math.sqrt(2))]) == pytest.approx(1.0, abs=1e-14)


@pytest.mark.parametrize("q", [0.5, 1.0, 3.0])
def test_erf_against_williams_differentiated_by_hand(q):
    """``C(c) = arcsin(kc)/arcsin(k)``, ``k = 2q/(1 + 2q)``: ``C' = k/(√(1 − k²c²) arcsin k)``,
    ``C'' = k³c/((1 − k²c²)^{3/2} arcsin k)``; ``Q(q) = (2/π) arcsin k``."""
    k = 2 * q / (1 + 2 * q)
    for c in (1.0, 0.4, -0.7):
        d = cmaps.c_map_derivatives([L.Activation("erf")], q=q, c=c)
        root = math.sqrt(1 - k * k * c * c)
        assert d.value == pytest.approx(math.asin(k * c) / math.asin(k), abs=d.value_error + 1e-15)
        assert abs(d.chi - k / (root * math.asin(k))) <= d.chi_error < 1e-13
        assert abs(d.curvature - k ** 3 * c / (root ** 3 * math.asin(k))) <= d.curvature_error < 1e-11
        assert abs(d.q_slope - (2 / math.pi) / math.sqrt(1 - k * k) * 2 / (1 + 2 * q) ** 2) <= d.q_slope_error
        assert d.methods == {"chi": "identity", "curvature": "identity", "q_slope": "identity"}
    # the curvature at c = 1 against a one-sided 50-digit difference of the closed form
    mp.mp.dps = 50
    ref = mp.diff(lambda c: mp.asin(k * c) / mp.asin(k), 1, 2, direction=-1)
    d = cmaps.c_map_derivatives([L.Activation("erf")], q=q)
    assert abs(d.curvature - float(ref)) <= d.curvature_error


@pytest.mark.parametrize("slope", [0.0, 0.2, 0.6])
def test_leaky_relu_slope_at_any_cosine(slope):
    """Normalised leaky ReLU: ``C'(c) = (s + (1 − s)²(π − arccos c)/(2π)) / ((1 + s²)/2)`` (from the
    arc-cosine kernel of degree 0); 1 at c = 1."""
    block = [L.Activation("leaky_relu", {"slope": slope}, scale=math.sqrt(2 / (1 + slope ** 2)))]
    for c in (1.0, 0.3, -0.8):
        d = cmaps.c_map_derivatives(block, c=c, curvature=False)
        exact = (slope + (1 - slope) ** 2 * (math.pi - math.acos(c)) / (2 * math.pi)) / ((1 + slope ** 2) / 2)
        assert abs(d.chi - exact) <= d.chi_error + 1e-15 and d.chi_error < 1e-13


def test_a_step_has_an_infinite_slope_at_one_and_a_finite_one_below():
    """``C(c) = 1 − arccos(c)/π`` for the Heaviside step: ``C'(c) = 1/(π√(1 − c²))``; the derivative
    identity misses the jump, so below 1 the exact map is differenced (Ridders)."""
    d = cmaps.c_map_derivatives([L.Activation("step")])
    assert d.chi == math.inf and d.methods["chi"] == "infinite" and d.curvature == math.inf
    for c in (0.5, -0.3, 0.99):
        d = cmaps.c_map_derivatives([L.Activation("step")], c=c)
        assert d.methods["chi"] == "differences"
        assert abs(d.chi - 1 / (math.pi * math.sqrt(1 - c * c))) <= d.chi_error < 1e-8
        assert abs(d.curvature - c / (math.pi * (1 - c * c) ** 1.5)) <= d.curvature_error < 1e-6
    assert cmaps.c_map_slope([L.Activation("step")]) == math.inf


# --- sharp activations: the finite-difference fit fails, the identity does not -------------------

@pytest.mark.parametrize("q", [1.0, 25.0])
def test_sharp_tanh_slope(q):
    """tanh(20x): ``χ = q E[φ'(u)²]/E[φ(u)²]`` by scipy quad (11.08 at q = 1, 53.62 at q = 25)."""
    block = [L.Activation(lambda x: np.tanh(20 * x), derivative=lambda x: 20 * (1 - np.tanh(20 * x) ** 2))]
    ref = q * gauss(lambda x: tanh_d(x, 20) ** 2, q) / gauss(lambda x: math.tanh(20 * x) ** 2, q)
    chi, err = cmaps.c_map_slope(block, q=q, return_error=True)
    assert abs(chi - ref) <= err < 1e-8 * ref
    if q == 1.0:  # no φ'' for a callable: C'' by one-sided differences of the exact C'
        d = cmaps.c_map_derivatives(block, q=q)
        ref2 = q * q * gauss(lambda x: tanh_dd(x, 20) ** 2, q) / gauss(lambda x: math.tanh(20 * x) ** 2, q)
        assert d.methods["curvature"] == "differences" and abs(d.curvature - ref2) <= d.curvature_error < 1e-3 * ref2


# --- blocks: residual, LayerNorm ---------------------------------------------------------------

def test_residual_block_with_a_tanh_branch():
    """``y = αx + β W₂ tanh(W₁ x)``: ``C'(1) = (α² q + β² w q E[tanh'(u)²]) / (α² q + β² E[tanh(u)²])``,
    ``Q'(q) = α² + β² w E[tanh'(u)² + tanh(u) tanh''(u)]`` (the heat equation, not Stein's lemma),
    ``u ~ N(0, wq)``."""
    al, be, w, q = 0.8, 0.6, 1.7, 1.3
    block = [L.Residual(L.Dense(weight_var=w), L.Activation("tanh"), L.Dense(), alpha=al, beta=be)]
    d = cmaps.c_map_derivatives(block, q=q)
    t2 = gauss(lambda x: math.tanh(x) ** 2, w * q)
    d2 = gauss(lambda x: tanh_d(x) ** 2, w * q)
    assert abs(d.chi - (al ** 2 * q + be ** 2 * w * q * d2) / (al ** 2 * q + be ** 2 * t2)) <= d.chi_error < 1e-11
    heat = gauss(lambda x: tanh_d(x) ** 2 + math.tanh(x) * tanh_dd(x), w * q)
    assert abs(d.q_slope - (al ** 2 + be ** 2 * w * heat)) <= d.q_slope_error < 1e-11
    # C''(1) = β² w² q² E[tanh''(u)²] / (α² q + β² E tanh²)
    dd2 = gauss(lambda x: tanh_dd(x) ** 2, w * q)
    assert abs(d.curvature - be ** 2 * w * w * q * q * dd2 / (al ** 2 * q + be ** 2 * t2)) <= d.curvature_error


@pytest.mark.parametrize("q", [0.5, 2.0])
def test_residual_around_a_layernorm_carries_the_cross_term(q):
    """``y = αx + β LN(x) = (α + βg/√q) x``: C(c) = c and ``Q'(q) = α(α√q + βg)/√q`` — the branch
    depends on x linearly (cross term ``2αβ g √q``) through a factor that moves with q."""
    al, be, g = 0.8, 0.6, 1.3
    d = cmaps.c_map_derivatives([L.Residual(L.LayerNorm(gain=g), alpha=al, beta=be)], q=q, c=0.3)
    assert d.value == pytest.approx(0.3, abs=d.value_error + 1e-15)
    assert abs(d.chi - 1.0) <= d.chi_error and d.curvature == pytest.approx(0.0, abs=d.curvature_error + 1e-15)
    assert abs(d.q_slope - al * (al * math.sqrt(q) + be * g) / math.sqrt(q)) <= d.q_slope_error


def test_layernorm_block():
    """``[Dense(w), tanh, LayerNorm]``: ``C = K₁₂/K₁₁`` so ``C'(1) = wq E[tanh'²]/E[tanh²]``; the
    output norm is fixed: ``Q' = 0``."""
    w, q = 1.7, 1.3
    d = cmaps.c_map_derivatives([L.Dense(weight_var=w), L.Activation("tanh"), L.LayerNorm()], q=q)
    ref = w * q * gauss(lambda x: tanh_d(x) ** 2, w * q) / gauss(lambda x: math.tanh(x) ** 2, w * q)
    assert abs(d.chi - ref) <= d.chi_error < 1e-11
    assert d.q_slope == 0.0


def test_q_slope_with_kinks_and_means():
    """ELU after Dense (a kink, and a mean ≠ 0), then LayerNorm with ε > 0 (centres: the mean enters).
    By the heat equation ``d/da E F(u) = E F''(u)/2`` (not Stein's lemma): with ``σ² = E elu² − (E elu)²``,
    ``Q(q) = g² σ²/(σ² + ε)``, ``Q' = g² ε/(σ² + ε)² · w (E[(elu²)'']/2 − E[elu] E[elu''])``, ``u ~ N(0, wq)``;
    ``elu'' = eˣ 1[x < 0]`` (elu' is continuous for α = 1)."""
    w, q, g, eps = 2.0, 0.7, 1.2, 0.5

    def f2(x):  # (elu²)''/2
        return 1.0 if x > 0 else math.exp(2 * x) + (math.exp(x) - 1) * math.exp(x)

    def elu(x):
        return x if x > 0 else math.expm1(x)

    d = cmaps.c_map_derivatives([L.Dense(weight_var=w), L.Activation("elu")], q=q, curvature=False)
    assert abs(d.q_slope - w * gauss(f2, w * q)) <= d.q_slope_error < 1e-11
    m = gauss(elu, w * q)
    var = gauss(lambda x: elu(x) ** 2, w * q) - m * m
    dvar = w * (gauss(f2, w * q) - m * gauss(lambda x: math.exp(x) if x < 0 else 0.0, w * q))
    d = cmaps.c_map_derivatives([L.Dense(weight_var=w), L.Activation("elu"), L.LayerNorm(gain=g, eps=eps)], q=q,
                                curvature=False)
    assert abs(d.q_out - g * g * var / (var + eps)) < 1e-12
    assert abs(d.q_slope - g * g * eps / (var + eps) ** 2 * dvar) <= d.q_slope_error < 1e-11


# --- network C-maps carry their error ---------------------------------------------------------

def _legendre_rule(n):
    """Gauss–Legendre nodes and weights in extended precision: numpy's, polished by two Newton steps
    on the three-term recurrence evaluated in ``longdouble``."""
    x = np.polynomial.legendre.leggauss(n)[0].astype(np.longdouble)
    for _ in range(2):
        p0, p1 = np.ones_like(x), x
        for k in range(2, n + 1):
            p0, p1 = p1, ((2 * k - 1) * x * p1 - (k - 1) * p0) / k
        dp = n * (x * p1 - p0) / (x * x - 1)
        x = x - p1 / dp
    return x, 2 / ((1 - x * x) * dp * dp)


def _tanh_cmap_reference(c, var, n):
    """C(c) of ``[Dense(var), tanh, LayerNorm]`` at q = 1 by an n × n Gauss–Legendre rule on [-12, 12]²,
    in extended precision."""
    x, w = _legendre_rule(n)
    z = 12 * x
    w = 12 * w * np.exp(-z * z / 2) / np.sqrt(2 * np.pi * np.longdouble(1))
    s = np.sqrt(np.longdouble(var))
    c = np.longdouble(c)
    r = np.sqrt(max(np.longdouble(0), 1 - c * c))
    inner = np.tanh(s * (c * z[:, None] + r * z[None, :])) @ w
    return float((np.tanh(s * z) * inner) @ w / (np.tanh(s * z) ** 2 @ w))


def test_network_c_map_error_bounds_the_truth_at_depth_10():
    var = 1.5
    block = [L.Dense(weight_var=var), L.Activation(np.tanh, derivative=lambda x: 1 - np.tanh(x) ** 2), L.LayerNorm()]
    starts = [0.5, 0.9, -0.3, 0.999]
    values, errors = cmaps.network_c_map(block, 10, starts, q=1.0, return_error=True)
    assert np.array_equal(values, cmaps.network_c_map(block, 10, starts, q=1.0))
    for c0, v, e in zip(starts, values, errors):
        c, c_check = c0, c0
        for _ in range(10):
            c = _tanh_cmap_reference(c, var, 300)
            if c0 == 0.999:  # the reference is converged far below the errors tested
                c_check = _tanh_cmap_reference(c_check, var, 400)
        assert c0 != 0.999 or abs(c - c_check) < 1e-3 * e
        assert abs(v - c) <= e < 1e-9, (c0, v, c, e)
    plain, err_plain = cmaps.c_map(block, starts, return_error=True)
    assert np.all(err_plain > 0) and np.all(errors >= err_plain)


# --- interface ---------------------------------------------------------------------------------

def test_interface_and_refusals():
    relu = [L.Activation("relu", scale=math.sqrt(2))]
    assert isinstance(cmaps.c_map_slope(relu), float)
    assert cmaps.c_map_slope(relu, method="fit") == pytest.approx(1.0, abs=1e-7)  # the former method, kept
    with pytest.raises(SpecError):
        cmaps.c_map_slope(relu, method="secant")
    with pytest.raises(SpecError):
        cmaps.c_map_derivatives(relu, q=0.0)
    with pytest.raises(SpecError):
        cmaps.c_map_derivatives(relu, c=1.5)
    with pytest.raises(NotSupportedError, match="derivative="):
        cmaps.c_map_derivatives([L.Activation(np.tanh)])
    values, errors = cmaps.c_map(relu, [0.0, 1.0], return_error=True)
    assert values == pytest.approx([1 / math.pi, 1.0], abs=1e-15) and np.all(errors < 1e-14)
    q_out, q_err = cmaps.q_map([L.Activation(np.tanh)], [0.5, 2.0], return_error=True)
    assert q_out == pytest.approx([gauss(lambda x: math.tanh(x) ** 2, v) for v in (0.5, 2.0)], abs=1e-12)
    assert np.all(q_err < 1e-10)
