"""Kedia et al. 2024 per-component moment maps (kernelprop.methods.components).

Checked against: hand-computed special cases; the independent closed forms and quadrature of
kernelprop.kernel.activations (ReLU, GeLU); finite differences (the simulator's hand-written
Jacobians); and the seeded simulator with a statistical criterion:

* where a formula is exact, every moment agrees with the simulation within K = 4 standard errors
  (jackknife over seeds; |z| ≤ 4 has a false-alarm rate of 6e-5 per moment under the null);
* where it is an approximation (softmax and attention variances, attention correlations), the
  normalised error is below a tolerance taken from the measured percentiles in docs/components.md
  (a few points inside the regime the authors validated), and the known deviations are asserted
  to be real (many SE) with the size the derivation predicts — not hidden by a loose tolerance.
"""

import math

import numpy as np
import pytest

from kernelprop.errors import SpecError
from kernelprop.methods import components as C

K = 4.0  # standard errors allowed where the formula is exact


def assert_within_k_se(cmp, moments=C.MOMENTS, k=K):
    bad = {m: (getattr(cmp.formula, m), getattr(cmp.simulation.value, m), getattr(cmp.z, m))
           for m in moments if abs(getattr(cmp.z, m)) > k}
    assert not bad, f"{cmp.point}: formula, simulation, z = {bad}"


# --- registry ----------------------------------------------------------------------------------

def test_registry_lists_the_seven_components_with_all_parts():
    assert set(C.COMPONENTS) == {"linear", "relu", "gelu", "layernorm", "dropout", "softmax", "attention"}
    for name, comp in C.COMPONENTS.items():
        assert comp.name == name and comp.doc and callable(comp.forward) and callable(comp.backward)
        assert callable(comp.run) and set(comp.approximate) <= set(C.MOMENTS)
        pts = C.grid_points(name)
        assert len(pts) == math.prod(len(v) for v in comp.grid.values())
        for pt in (pts[0], pts[-1]):
            moments = {k: v for k, v in pt.items() if k in C.MOMENTS}
            params = {k: v for k, v in pt.items() if k not in C.MOMENTS}
            width = params.pop("d_in", params.pop("width", 64))
            q = C._resolve(comp, params, width=width, tokens=params.pop("tokens", 16))
            assert all(np.isfinite(x) for x in C.predict(name, **moments, **q))


# --- exact special cases by hand -----------------------------------------------------------------

@pytest.mark.parametrize("var", [0.25, 1.0, 4.0])
def test_relu_by_hand(var):
    sigma = math.sqrt(var)
    mu, v, r = C.relu_forward(0.0, var, 0.0)
    assert mu == pytest.approx(sigma / math.sqrt(2 * math.pi), rel=1e-14)
    assert v == pytest.approx(var * (math.pi - 1) / (2 * math.pi), rel=1e-14)
    assert r == pytest.approx(0.0, abs=1e-15)          # independent inputs stay uncorrelated
    assert C.relu_forward(0.0, var, 1.0)[2] == pytest.approx(1.0, abs=1e-14)
    assert C.relu_forward(0.0, var, -1.0)[2] == pytest.approx(-1.0 / (math.pi - 1), abs=1e-14)
    assert C.relu_backward(2.0, 0.6, r=0.0) == pytest.approx((1.0, 0.3), abs=1e-15)
    assert C.relu_backward(2.0, 0.6, r=1.0) == pytest.approx((1.0, 0.6), abs=1e-15)


def test_gelu_small_variance_limit_and_mean():
    var = 1e-6
    mu, v, r = C.gelu_forward(0.0, var, 0.5)
    assert mu == pytest.approx(var / math.sqrt(2 * math.pi * (1 + var)), rel=1e-12)  # Stein
    assert v == pytest.approx(var / 4, rel=1e-3)       # gelu'(0) = 1/2
    assert r == pytest.approx(0.5, rel=1e-3)
    assert C.gelu_backward(1.0, 0.5, var=var, r=0.5)[0] == pytest.approx(0.25, rel=1e-3)


@pytest.mark.parametrize("mu,var", [(0.0, 1.0), (3.0, 0.25), (-2.0, 4.0)])
def test_layernorm_by_hand(mu, var):
    assert C.layernorm_forward(mu, var, 0.7, width=256)[:2] == (0.0, 1.0)
    assert C.layernorm_forward(mu, var, 0.7, width=256)[2] == pytest.approx(0.7 * (1 - 1 / 256))
    assert C.layernorm_backward(2.0, 0.4, var=var, width=256) == pytest.approx((2.0 / var, 0.4))
    assert C.layernorm_backward(2.0, 0.4, var=var, r=0.7, width=256, finite_width=True)[0] == \
        pytest.approx(2.0 / var * 254 / 253)


@pytest.mark.parametrize("mu,var,p", [(0.0, 1.0, 0.1), (1.0, 0.25, 0.3), (-2.0, 4.0, 0.5)])
def test_dropout_by_hand(mu, var, p):
    m, v, r = C.dropout_forward(mu, var, 0.6, p=p)
    assert m == mu
    assert v == pytest.approx((var + p * mu * mu) / (1 - p))
    assert r * v == pytest.approx(0.6 * var)            # covariance unchanged
    assert C.dropout_backward(2.0, 0.5, p=p) == pytest.approx((2.0 / (1 - p), 0.5 * (1 - p)))


def test_linear_by_hand():
    assert C.linear_forward(1.0, 3.0, 0.5, sigma_w=2.0) == pytest.approx((0.0, 16.0, 2.5 / 4.0))
    assert C.linear_forward(0.0, 3.0, 0.5)[2] == pytest.approx(0.5)
    assert C.linear_backward(1.5, 0.3, sigma_w=2.0, d_in=64, d_out=256) == pytest.approx((24.0, 0.3))


@pytest.mark.parametrize("t", [2, 16, 256])
def test_softmax_by_hand(t):
    mu, v, r = C.softmax_forward(5.0, 1e-8, 0.3, tokens=t)  # the logits' mean cancels
    assert mu == pytest.approx(1 / t) and r == pytest.approx(-1 / (t - 1))
    assert v == pytest.approx(0.7e-8 / t ** 2, rel=1e-6)
    assert C.softmax_backward(1.0, 1.0, var=1.0, r=0.3, tokens=t)[0] == 0.0  # shared gradient annihilated
    assert C.softmax_backward(1.0, 0.0, var=1.0, r=0.3, tokens=t) == \
        pytest.approx((math.exp(0.7) / t ** 2, -1 / (t - 1)))


def test_attention_uniform_limit_by_hand():
    # zero queries and keys: A = 11ᵀ/T; at infinite d_in every token gets the mean value vector
    t, var, r = 16, 2.0, 0.3
    m, v, rr = C.attention_forward(0.0, var, r, tokens=t, d_in=10**12, sigma_q=0.0, sigma_v=1.5)
    assert m == 0 and v == pytest.approx(2.25 * var * (r + (1 - r) / t)) and rr == pytest.approx(1.0)
    vg, rg = C.attention_backward(1.0, 0.2, tokens=t, d_in=64, d_k=32, sigma_v=1.5)
    assert vg == pytest.approx(2.25 * 0.5 * (1 + 15 * 0.2) / t) and rg == pytest.approx(1.0)


def test_logit_variance():
    assert C.logit_variance(2.0, 0.25, sigma_q=0.5, sigma_k=2.0) == pytest.approx(0.75 * 4.0)


# --- Kedia's exact formulas against independent closed forms -------------------------------------

def _grid():
    var, r = np.meshgrid([0.05, 0.25, 1.0, 4.0, 20.0], np.linspace(-0.99, 0.99, 23))
    return var, r


def test_relu_matches_arc_cosine_kernel_of_activations_module():
    var, r = _grid()
    for a, b in zip(C.relu_forward(0.0, var, r), C.relu_forward(0.0, var, r, exact=True)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    for a, b in zip(C.relu_backward(1.3, 0.4, r=r), C.relu_backward(1.3, 0.4, r=r, exact=True)):
        np.testing.assert_allclose(a + 0 * r, b, rtol=1e-12, atol=1e-13)


def test_gelu_matches_tsuchida_closed_form_and_quadrature():
    var, r = _grid()
    for a, b in zip(C.gelu_forward(0.0, var, r), C.gelu_forward(0.0, var, r, exact=True)):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)
    for a, b in zip(C.gelu_backward(1.3, 0.4, var=var, r=r), C.gelu_backward(1.3, 0.4, var=var, r=r, exact=True)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)   # quadrature error estimate ~1e-12


def test_pearson_mean_limits_and_asymptotics():
    for d in (4, 16, 64):
        assert C.layernorm_forward(0, 1, 1.0, width=d, finite_width=True)[2] == pytest.approx(1.0, abs=1e-12)
        assert C.layernorm_forward(0, 1, -1.0, width=d, finite_width=True)[2] == pytest.approx(-1.0, abs=1e-12)
        assert C.layernorm_forward(0, 1, 0.0, width=d, finite_width=True)[2] == 0.0
    d, r = 4000, np.array([0.1, 0.5, 0.9])
    series = r * (1 - (1 - r * r) / (2 * d))   # E[Pearson r̂] = r(1 − (1 − r²)/(2d) + O(d⁻²))
    np.testing.assert_allclose(C.layernorm_forward(0, 1, r, width=d, finite_width=True)[2], series, rtol=1e-6)


def test_maps_are_vectorised():
    var = np.array([[0.25], [1.0], [4.0]])
    r = np.array([0.0, 0.3, 0.95])
    got = C.predict("dropout", 1.0, var, r, var_g=2.0, r_g=r, p=0.3)
    assert got.var.shape == (3, 3)
    for i in range(3):
        for j in range(3):
            one = C.predict("dropout", 1.0, float(var[i, 0]), float(r[j]), var_g=2.0, r_g=float(r[j]), p=0.3)
            assert [float(np.broadcast_to(x, (3, 3))[i, j]) for x in got] == pytest.approx(list(one))
    got = C.predict("attention", 0.0, 1.0, r, tokens=np.array([16, 64])[:, None], d_in=64, d_k=32)
    assert np.shape(got.r) == (2, 3)
    assert isinstance(C.relu_forward(0.0, 1.0, 0.3)[0], float)


# --- the simulator's hand-written Jacobians against finite differences -------------------------

@pytest.mark.parametrize("name", list(C.COMPONENTS))
def test_simulator_backward_is_the_jacobian_transpose(name):
    comp = C.COMPONENTS[name]
    rng = np.random.default_rng(7)
    t, d = 4, 6
    q = C._resolve(comp, {"p": 0.3} if "p" in comp.params else {}, width=d, tokens=t)
    if name == "linear":
        q["d_out"] = 5
    if name == "attention":
        q.update(d_k=3, sigma_q=1.3, sigma_k=0.8, sigma_v=1.1)
    rand = comp.draw(rng, t, d, q) if comp.draw else {}
    rand = {k: v[None] for k, v in rand.items()}
    x = rng.standard_normal((1, t, d)) + 0.3
    g = rng.standard_normal((1, t, comp.out_width(d, q)))
    _, gx = comp.run(x, g, rand, q)
    num = np.empty_like(x)
    eps = 1e-6
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        num[idx] = ((comp.run(xp, g, rand, q)[0] - comp.run(xm, g, rand, q)[0]) * g).sum() / (2 * eps)
    np.testing.assert_allclose(gx, num, rtol=1e-6, atol=1e-8)


# --- formulas against the simulator where they are exact ----------------------------------------

SIM = dict(tokens=16, seeds=48, seed=1)

EXACT_CASES = [
    ("linear", dict(mu=1.0, var=0.25, r=0.7, r_g=0.5, sigma_w=2.0, width=64, d_out=128)),
    ("linear", dict(mu=0.0, var=4.0, r=0.0, r_g=0.0, width=128, d_out=32)),
    ("relu", dict(var=0.25, r=0.95, r_g=0.5)),
    ("relu", dict(var=4.0, r=0.0, r_g=0.9)),
    ("relu", dict(var=1.0, r=-0.05, r_g=0.3)),
    ("gelu", dict(var=0.25, r=0.3, r_g=0.9)),
    ("gelu", dict(var=4.0, r=0.95, r_g=0.5)),
    ("dropout", dict(mu=1.0, var=0.25, r=0.7, r_g=0.5, p=0.3)),
    ("dropout", dict(mu=-2.0, var=4.0, r=0.0, r_g=0.9, p=0.1)),
    ("dropout", dict(mu=0.5, var=1.0, r=-0.06, r_g=-0.06, p=0.0)),  # p = 0: the input draw itself
]


@pytest.mark.parametrize("name,case", EXACT_CASES)
def test_exact_formulas_agree_with_simulation(name, case):
    case = dict(case)
    width = case.pop("width", 256)
    cmp = C.compare(name, width=width, **SIM, **case)
    assert_within_k_se(cmp)


@pytest.mark.parametrize("mu,var,r,width", [(3.0, 0.25, 0.7, 64), (0.0, 4.0, 0.3, 16), (-1.0, 1.0, 0.95, 256)])
def test_layernorm_finite_width_forms_agree_with_simulation(mu, var, r, width):
    cmp = C.compare("layernorm", mu, var, r, r_g=0.5, width=width, finite_width=True, **SIM)
    assert_within_k_se(cmp)  # μ' = 0, σ'² = 1 (Kedia's, exact) and the finite-width r', σ_g'², r_g'


def hotelling_mean(r, n):
    """E[Pearson r̂] of n bivariate-normal pairs (Hotelling 1953), at 40 digits with mpmath:
    r Γ(n/2)²/(Γ((n−1)/2)Γ((n+1)/2)) ₂F₁(1/2, 1/2; (n+1)/2; r²)."""
    import mpmath
    with mpmath.workdps(40):
        n = mpmath.mpf(n)
        c = mpmath.gamma(n / 2) ** 2 / (mpmath.gamma((n - 1) / 2) * mpmath.gamma((n + 1) / 2))
        return float(r * c * mpmath.hyp2f1(0.5, 0.5, (n + 1) / 2, mpmath.mpf(r) ** 2))


def test_layernorm_kedia_correlation_is_off_by_the_predicted_amount():
    """Kedia's r' = r(1 − 1/d) against the exact E[Pearson r̂]: at d = 16, r = 0.95 the gap is 0.05588
    (first order r(1 + r²)/(2d) = 0.05648). The simulated gap (960 seeds: 0.05495 ± 0.00076) is within
    K standard errors of the exact one (±0.0030); before: within 15 % of the first-order value (±0.0085)."""
    d, r = 16, 0.95
    cmp = C.compare("layernorm", 0.0, 1.0, r, width=d, tokens=16, seeds=960, seed=1)
    assert cmp.z.r < -10
    exact = hotelling_mean(r, d) - r * (1 - 1 / d)
    assert abs(exact - r * (1 + r * r) / (2 * d)) < 1e-3                  # the O(1/d²) remainder
    assert abs(cmp.simulation.value.r - cmp.formula.r - exact) <= K * cmp.simulation.stderr.r
    # and the wide-limit gradient variance σ_g²/σ² is low by the factor (d − 2)/(d − 3) = 14/13
    ratio_se = cmp.simulation.stderr.var_g / cmp.formula.var_g
    assert abs(cmp.simulation.value.var_g / cmp.formula.var_g - 14 / 13) <= K * ratio_se


# --- softmax: exact identities, and the approximate variances -------------------------------------

def test_softmax_correlations_are_exactly_minus_one_over_t_minus_one():
    cmp = C.compare("softmax", 0.0, 4.0, 0.3, r_g=0.5, width=64, tokens=16, seeds=8)
    assert cmp.simulation.value.r == pytest.approx(-1 / 15, rel=1e-10)
    assert cmp.simulation.value.r_g == pytest.approx(-1 / 15, rel=1e-10)
    assert cmp.simulation.value.mu == pytest.approx(1 / 16, rel=1e-12)


def within_tolerance(cmp, tol):
    """``error < tol + K·SE``: the tolerance bounds the formula's error, K·SE this test's own noise."""
    for m, t in tol.items():
        err, se = getattr(cmp.error, m), getattr(cmp.stderr, m)
        assert err < t + K * se, (m, err, t, se)


# Tolerances = the measured 99th percentiles in docs/components.md, rounded up
# (softmax, s² = (1 − r)σ² ≤ 1, T = 256: σ'² 4.5 %, σ_g'² 7.1 %).
SOFTMAX_TOL = {"var": 0.05, "var_g": 0.08}


@pytest.mark.parametrize("var,r,r_g", [(1.0, 0.3, 0.0), (0.25, 0.0, 0.5), (1.0, 0.0, 0.5)])
def test_softmax_variance_within_stated_tolerance_at_t256(var, r, r_g):
    cmp = C.compare("softmax", 0.0, var, r, r_g=r_g, width=64, tokens=256, seeds=16)
    within_tolerance(cmp, SOFTMAX_TOL)


def test_softmax_kedia_error_is_the_missing_one_over_t_term():
    # Kedia's variance overestimates by a relative O(1/T): the error falls like 1/T, and the
    # first-order correction (form='corrected', derived) removes it to within the noise.
    # s² = 0.25: Kedia's error ≈ 2.0/T (13 % at T = 16, 3 % at T = 64; SE here ≈ 0.25 %).
    errs = {}
    for t in (16, 64):
        cmp = C.compare("softmax", 0.0, 0.25, 0.0, width=128, tokens=t, seeds=128)
        errs[t] = (cmp.formula.var - cmp.simulation.value.var) / cmp.simulation.value.var
        fixed = C.compare("softmax", 0.0, 0.25, 0.0, width=128, tokens=t, seeds=128, form="corrected")
        assert abs(fixed.z.var) < K or fixed.error.var < 0.25 * errs[t]
    assert errs[16] > 0 and errs[64] > 0
    slope = math.log(errs[16] / errs[64]) / math.log(4)
    assert slope == pytest.approx(1.0, abs=0.25)


# --- attention: approximate; tolerances inside the authors' regime, and one derived deviation ------

# The measured 99th percentiles in docs/components.md for attention with logit variance s² ≤ 0.15
# (the authors' own grid has s² ≤ 0.13), rounded up: σ'² 5.4 %, r' 0.026, σ_g'² 33 %, r_g' 0.30.
# The backward ones are large because Kedia's backward misses two effects at any score size; the
# next test asserts that those deviations are real and that the derived correction removes them.
ATTN_TOL = {"var": 0.06, "r": 0.03, "var_g": 0.35, "r_g": 0.31}


@pytest.mark.parametrize("var,sq,r,p,t", [(1.0, 0.3, 0.0, 0.0, 64), (1.0, 0.6, 0.3, 0.3, 16),
                                          (0.25, 1.0, 0.7, 0.0, 64)])
def test_attention_within_stated_tolerance_for_small_scores(var, sq, r, p, t):
    assert C.logit_variance(var, r, sigma_q=sq, sigma_k=sq) <= 0.15
    cmp = C.compare("attention", 0.0, var, r, r_g=0.5, width=128, tokens=t, seeds=48, sigma_q=sq, p=p, d_k=32)
    within_tolerance(cmp, ATTN_TOL)
    assert abs(cmp.z.mu) < K


def test_attention_dropout_term_missing_from_kedia_variance():
    # With dropout the token-shared part of the output also gains p E ΣA²/(1 − p): Kedia's r' is too
    # high by ≈ r p/((1 − p) T (r + (1 − r)/(T(1 − p)))) ≈ 0.026 here; the derived correction fits.
    kw = dict(width=256, tokens=16, seeds=48, sigma_q=0.1, p=0.3, d_k=32)
    kedia = C.compare("attention", 0.0, 1.0, 0.7, **kw)
    fixed = C.compare("attention", 0.0, 1.0, 0.7, corrected=True, **kw)
    assert kedia.z.r > 8
    assert abs(fixed.z.r) < K
    # the gap itself (measured 0.0241 ± 0.0013) within K·SE of the corrected formula's 0.0249; the leading-order
    # estimate above is 0.0258, within its O(1/T) remainder (1/16). Before: 0.024 ± 0.004 with no reference.
    gap, predicted = kedia.formula.r - kedia.simulation.value.r, kedia.formula.r - fixed.formula.r
    assert abs(gap - predicted) <= K * kedia.simulation.stderr.r
    r, p, t = 0.7, 0.3, 16
    assert predicted == pytest.approx(r * p / ((1 - p) * t * (r + (1 - r) / (t * (1 - p)))), rel=0.05)


# corrected attention backward, s² ≤ 0.15 rows of docs/components.md: p99 7.8 % (σ_g'²), 0.047 (r_g')
ATTN_CORRECTED_TOL = {"var_g": 0.08, "r_g": 0.05}


@pytest.mark.parametrize("r,r_g,sq,p", [(0.0, 0.0, 0.6, 0.0), (0.0, 0.0, 0.6, 0.3), (0.7, 0.5, 1.0, 0.0)])
def test_attention_backward_misses_nonuniform_attention_and_query_key_paths(r, r_g, sq, p):
    # Kedia's backward (values path, uniform A) is ~30 % low at s² = 0.13-0.3, many SE; the derived
    # correction (e^{s²} and e^{rs²} through the values, plus the query and key paths) fits to within
    # its own measured tolerance.
    kw = dict(width=256, tokens=16, seeds=48, sigma_q=sq, p=p, d_k=32, r_g=r_g)
    kedia = C.compare("attention", 0.0, 1.0, r, **kw)
    fixed = C.compare("attention", 0.0, 1.0, r, corrected=True, **kw)
    assert kedia.z.var_g < -K and kedia.z.r_g > 2 * K
    within_tolerance(fixed, ATTN_CORRECTED_TOL)


# --- errors and reproducibility -----------------------------------------------------------------

@pytest.mark.parametrize("call,field", [
    (lambda: C.dropout_forward(0.0, 1.0, 0.0, p=1.0), "p"),
    (lambda: C.dropout_backward(1.0, 0.0, p=np.array([0.1, 1.2])), "p"),
    (lambda: C.linear_forward(0.0, -1.0, 0.0), "var"),
    (lambda: C.relu_forward(0.0, 0.0, 0.0), "var"),
    (lambda: C.gelu_forward(0.0, 1.0, 1.5), "r"),
    (lambda: C.softmax_forward(0.0, 1.0, np.array([0.0, -1.01]), tokens=8), "r"),
    (lambda: C.relu_backward(-1.0, 0.0, r=0.0), "var_g"),
    (lambda: C.relu_backward(1.0, 2.0, r=0.0), "r_g"),
    (lambda: C.relu_forward(1.0, 1.0, 0.0), "mu"),
    (lambda: C.attention_forward(0.5, 1.0, 0.0, tokens=8, d_in=16), "mu"),
    (lambda: C.softmax_forward(0.0, 1.0, 0.0, tokens=1), "tokens"),
    (lambda: C.layernorm_backward(1.0, 0.0, var=1.0, width=3, r=0.0, finite_width=True), "width"),
    (lambda: C.linear_backward(1.0, 0.0, d_in=64.5, d_out=8), "d_in"),
    (lambda: C.linear_forward(0.0, 1.0, 0.0, sigma_w=-1.0), "sigma_w"),
    (lambda: C.softmax_forward(0.0, 1.0, 0.0, tokens=8, form="exact"), "form"),
    (lambda: C.simulate("transformer"), "component"),
    (lambda: C.simulate("dropout", p=1.0), "p"),
    (lambda: C.simulate("dropout", 0.0, 1.0, -0.5, tokens=8), "r"),
    (lambda: C.simulate("dropout", exponent=2), "exponent"),
    (lambda: C.simulate("linear", width=64, d_in=32), "d_in"),
    (lambda: C.simulate("relu", seeds=1), "seeds"),
    (lambda: C.predict("softmax", 0.0, 1.0, 0.0, tokens=8, p=0.1), "p"),
])
def test_bad_parameters_raise_spec_error_naming_the_field(call, field):
    with pytest.raises(SpecError) as info:
        call()
    assert info.value.field == field
    assert field in str(info.value)


@pytest.mark.parametrize("call,field,shown", [
    (lambda: C.relu_forward(0.0, 1.0, np.array([0.2, np.inf, 0.1])), "r", [np.inf]),
    (lambda: C.linear_forward(0.0, np.array([1.0, -2.0, 0.0]), 0.0), "var", [-2.0, 0.0]),
    (lambda: C.softmax_forward(0.0, 1.0, 0.0, tokens=np.array([4, 2.5, 1])), "tokens", [2.5, 1.0]),
    (lambda: C.relu_forward(np.array([0.0, np.nan]), 1.0, 0.0), "mu", "nan"),
    (lambda: C.linear_backward(1.0, np.array([0.0, 2.0]), d_in=8, d_out=8), "r_g", [2.0]),
    (lambda: C.gelu_backward(1.0, 0.5, var=-1.0, r=0.3), "var", -1.0),
    (lambda: C.layernorm_backward(1.0, 0.0, var=1.0, r=1.5, width=8, finite_width=True), "r", [1.5]),
    (lambda: C.simulate("dropout", 0.0, 1.0, -0.15, tokens=8), "r", -0.15),   # −1/6 < r < −1/7: not PSD
])
def test_bad_values_are_named_and_shown(call, field, shown):
    """The SpecError names the argument and shows the offending entries of an array."""
    with pytest.raises(SpecError) as info:
        call()
    assert info.value.field == field
    if shown == -0.15:
        assert info.value.allowed == "an equicorrelation of 8 tokens must be >= -1/(T-1) = -0.1429"
    if shown == "nan":
        assert np.isnan(info.value.value).all()
    else:
        assert np.all(np.asarray(info.value.value) == np.asarray(shown)) and np.size(info.value.value) == np.size(shown)


def test_softmax_limits_at_vanishing_logit_variance():
    """s² → 0: every a_i = 1/T. The mean is exactly 1/T at any variance (the weights sum to 1); backward,
    E[a_i²(1 − 2a_i + Σ_k a_k²)] → (1 − 1/T)/T² (the corrected form is exact there) and E[a_i²] → 1/T²
    (the 'full' form); at r_g = 1 nothing reaches the input, r_g' = −1/(T − 1) still."""
    t = 8
    assert C.softmax_forward(0.0, 1.0, 0.3, tokens=16)[0] == pytest.approx(1 / 16, rel=1e-15)
    v, rg = C.softmax_backward(1.0, 0.0, var=1e-12, r=0.0, tokens=t, form="corrected")
    assert v == pytest.approx((1 - 1 / t) / t ** 2, rel=1e-9) and rg == pytest.approx(-1 / (t - 1), rel=1e-15)
    full = C.softmax_backward(1.0, 0.0, var=1e-12, r=0.0, tokens=t, form="full")[0]
    assert full == pytest.approx(1 / t ** 2, rel=1e-9)
    assert C.softmax_backward(1.0, 1.0, var=1.0, r=0.3, tokens=t) == (0.0, pytest.approx(-1 / (t - 1), rel=1e-15))


def test_simulation_is_reproducible_and_replicates_are_independent_of_their_number():
    a = C.simulate("gelu", 0.0, 1.0, 0.3, r_g=0.5, width=32, tokens=8, seeds=6, seed=3)
    b = C.simulate("gelu", 0.0, 1.0, 0.3, r_g=0.5, width=32, tokens=8, seeds=6, seed=3)
    c = C.simulate("gelu", 0.0, 1.0, 0.3, r_g=0.5, width=32, tokens=8, seeds=6, seed=4)
    assert a.value == b.value and a.stderr == b.stderr and a.value != c.value
    assert a.settings["seeds"] == 6 and a.settings["tokens"] == 8 and a.settings["width"] == 32
    point = C.compare("gelu", 0.0, 1.0, 0.3, r_g=0.5, width=32, tokens=8, seeds=6, seed=3).point
    assert {k: point[k] for k in ("mu", "var", "r", "var_g", "r_g", "width", "tokens")} == \
        {"mu": 0.0, "var": 1.0, "r": 0.3, "var_g": 1.0, "r_g": 0.5, "width": 32, "tokens": 8}


def test_moment_errors_normalisation():
    f = C.Moments(0.1, 1.1, 0.5, 2.2, -0.1)
    s = C.Moments(0.0, 1.0, 0.45, 2.0, 0.0)
    err, se = C.moment_errors(f, s, C.Moments(0.01, 0.02, 0.01, 0.04, 0.01))
    assert err == pytest.approx(C.Moments(0.1, 0.1, 0.05, 0.1, 0.1))
    assert se == pytest.approx(C.Moments(0.01, 0.02, 0.01, 0.02, 0.01))
