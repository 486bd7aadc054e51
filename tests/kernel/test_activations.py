"""Activation kernels: closed forms vs quadrature, quadrature vs scipy, error honesty, properties.

References used here are independent of the code under test:
- kinked activations (relu family, abs): a 1-D ``scipy.integrate.quad`` over ``z1`` in the
  conditional form, split at the kink, with the inner Gaussian expectation in elementary form
  (``E relu(m + τZ) = mΦ(m/τ) + τφ(m/τ)``, ``P(m + τZ > 0) = Φ(m/τ)``);
- smooth ones: ``scipy.integrate.dblquad`` and the closed forms of erf and GELU.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate
from scipy.special import erf, ndtr

from kernelprop.errors import SpecError
from kernelprop.kernel import quadrature as quad
from kernelprop.kernel.activations import (
    ACTIVATIONS,
    activation_kernel,
    check_activation,
    derivative_kernel,
)

# (Σii, Σjj, Σij): c = 0, ±0.5, near ±1, exactly ±1, unequal variances, small, large, zero variance.
CASES = [
    (1.0, 1.0, 0.0),
    (1.0, 1.0, 0.5),
    (1.0, 1.0, -0.5),
    (1.0, 1.0, 0.999999),
    (1.0, 1.0, -0.999999),
    (1.0, 1.0, 1.0),
    (1.0, 1.0, -1.0),
    (0.3, 2.5, 0.6),
    (4.0, 0.25, -0.9),
    (1e-4, 2e-4, 1e-4),
    (10.0, 10.0, 7.0),
    (10.0, 8.0, -8.5),
    (0.0, 1.0, 0.0),
]
CASE_IDS = [f"{a:g},{b:g},{s:g}" for a, b, s in CASES]

# name, params: every activation with a closed-form kernel
CLOSED = [
    ("identity", {}), ("relu", {}), ("leaky_relu", {}), ("leaky_relu", {"slope": 0.2}),
    ("leaky_relu", {"slope": -0.5}), ("abs", {}), ("erf", {}), ("erf", {"a": 0.5}),
    ("erf", {"a": 2.5}), ("gelu", {}),
]
CLOSED_IDS = [name + "".join(f"-{k}={v}" for k, v in p.items()) for name, p in CLOSED]
KINKED = {"relu", "leaky_relu", "abs"}
# φ = α x + β relu(x) for the kinked ones
LINEAR_RELU = {"relu": lambda p: (0.0, 1.0), "abs": lambda p: (-1.0, 2.0),
               "leaky_relu": lambda p: (p.get("slope", 0.01), 1.0 - p.get("slope", 0.01))}


def matrix(a, b, s):
    return np.array([[a, s], [s, b]])


def bound(fn, params):
    return functools.partial(fn, **params) if params else fn


# --- independent references ------------------------------------------------------------------

def _npdf(z):
    return math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _quad_line(h, width=1.0):
    """∫ h(z) φ(z) dz split at 0 (the kink) and at ±width (a steep transition), to ~1e-13."""
    cuts = sorted({-12.0, -width, 0.0, width, 12.0})
    return sum(integrate.quad(lambda z: h(z) * _npdf(z), x, y, epsabs=1e-14, epsrel=1e-13,
                              limit=200)[0] for x, y in zip(cuts[:-1], cuts[1:]))


def kinked_reference(name, params, a, b, s, derivative=False):
    """``E[g(u)g(v)]`` and ``E[g(u)]``, ``g = φ`` or ``φ'``, ``φ = αx + β relu x``, conditional form."""
    al, be = LINEAR_RELU[name](params)
    sa, sb = math.sqrt(a), math.sqrt(b)
    c = s / (sa * sb) if sa * sb > 0 else 0.0
    c = max(-1.0, min(1.0, c))
    r = math.sqrt(max(0.0, 1.0 - c * c))
    if r < 1e-7:  # round-off away from c = ±1 (sqrt amplifies it): take the exact limit
        c, r = math.copysign(1.0, c), 0.0

    if derivative:
        def g(x):
            return al + be * (x > 0)

        def inner(m, tau):  # E[g(m + τZ)]
            return al + be * (ndtr(m / tau) if tau > 0 else float(m > 0))
    else:
        def g(x):
            return al * x + be * max(x, 0.0)

        def inner(m, tau):
            if tau == 0:
                return g(m)
            return al * m + be * (m * ndtr(m / tau) + tau * _npdf(m / tau))

    # h(z1) = E[g(v) | z1] changes over |z1| ~ r/|c| (a jump as c → ±1)
    width = min(1.0, 10.0 * r / abs(c)) if c != 0 and r > 0 else 1.0
    K = _quad_line(lambda z: g(sa * z) * inner(sb * c * z, sb * r), width)
    mean = _quad_line(lambda z: g(sa * z))
    return K, mean


def dblquad_reference(f, a, b, s, eps=1e-12):
    """``E[f(u) f(v)]`` by scipy dblquad over (z1, z2) ∈ [-10, 10]² in the conditional form."""
    sa, sb = math.sqrt(a), math.sqrt(b)
    c = s / (sa * sb)
    r = math.sqrt(max(0.0, 1.0 - c * c))
    val, _ = integrate.dblquad(lambda z2, z1: _npdf(z1) * _npdf(z2) * f(sa * z1) * f(sb * (c * z1 + r * z2)),
                               -10.0, 10.0, -10.0, 10.0, epsabs=eps, epsrel=eps)
    return val


# --- closed forms vs quadrature ----------------------------------------------------------------

@pytest.mark.parametrize("name,params", CLOSED, ids=CLOSED_IDS)
@pytest.mark.parametrize("derivative", [False, True], ids=["K", "dK"])
def test_closed_form_vs_gauss_hermite(name, params, derivative):
    spec = ACTIVATIONS[name]
    fn = bound(spec.dphi if derivative else spec.phi, params)
    if derivative and name in KINKED:  # step with the mid-value at 0: the jump lies on nodes at c = ±1/√2
        al, be = LINEAR_RELU[name](params)
        fn = lambda x: al + be * 0.5 * (1.0 + np.sign(x))  # noqa: E731
    kernel_fn = derivative_kernel if derivative else activation_kernel
    for a, b, s in CASES:
        if derivative and name in KINKED and a * b == 0:
            continue  # φ'(0) is a convention: see test_zero_variance_tokens
        S = matrix(a, b, s)
        K, mean, err = kernel_fn(name, S, params)
        if (spec.dkernel if derivative else spec.kernel) is not None:
            assert err == 0.0
        Kq, eK = quad.gauss_hermite_kernel(fn, fn, S)
        mq, em = quad.gauss_hermite_mean(fn, np.diag(S))
        dK, dm = np.abs(K - Kq).max(), np.abs(mean - mq).max()
        if name in KINKED:
            # undeclared kinks and jumps: the quadrature finds them and splits there (the sharp check
            # of these closed forms is test_kinked_closed_forms; 1e-15: the closed forms' round-off)
            assert dK <= eK + 1e-15 and dm <= em + 1e-15, (a, b, s, dK, eK, dm, em)
            assert eK <= 1e-10 * max(1.0, abs(K).max()) and em <= 1e-10, (a, b, s, eK, em)
        else:
            assert dK <= eK + 1e-13 and dm <= em + 1e-13, (a, b, s, dK, eK, dm, em)  # honest
            if params.get("a", 1.0) * math.sqrt(max(a, b)) <= 3.2:  # erf(2.5 x) at Σ ≥ 4 is a step
                assert dK <= 1e-10 * max(1.0, abs(K).max()) and dm <= 1e-10, (a, b, s, dK, dm)


@pytest.mark.parametrize("name,params", [c for c in CLOSED if c[0] in KINKED],
                         ids=[i for i, c in zip(CLOSED_IDS, CLOSED) if c[0] in KINKED])
@pytest.mark.parametrize("derivative", [False, True], ids=["K", "dK"])
def test_kinked_closed_forms(name, params, derivative):
    kernel_fn = derivative_kernel if derivative else activation_kernel
    for a, b, s in CASES:
        if a == 0 or b == 0:
            continue  # φ'(0) is a convention: see test_zero_variance_tokens
        K, mean, _ = kernel_fn(name, matrix(a, b, s), params)
        K_ref, m_ref = kinked_reference(name, params, a, b, s, derivative)
        assert K[0, 1] == pytest.approx(K_ref, abs=1e-9), (a, b, s)
        K_ii, m_i = kinked_reference(name, params, a, a, a, derivative)
        K_jj, m_j = kinked_reference(name, params, b, b, b, derivative)
        assert K[0, 0] == pytest.approx(K_ii, abs=1e-9) and K[1, 1] == pytest.approx(K_jj, abs=1e-9)
        assert mean == pytest.approx([m_i, m_j], abs=1e-10)


def test_relu_arc_cosine_values():
    """Hand values: c = 0 gives 1/(2π); c = 1 gives Σ/2; derivative (π − θ)/(2π)."""
    K, mean, _ = activation_kernel("relu", np.eye(2))
    assert K[0, 1] == pytest.approx(1 / (2 * math.pi), abs=1e-15) and K[0, 0] == pytest.approx(0.5)
    assert mean == pytest.approx([1 / math.sqrt(2 * math.pi)] * 2)
    Kd, md, _ = derivative_kernel("relu", matrix(1.0, 1.0, 0.5))
    assert Kd[0, 1] == pytest.approx((math.pi - math.acos(0.5)) / (2 * math.pi), abs=1e-15)
    assert md == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize("name", ["tanh", "silu", "softplus", "gelu"])
def test_quadrature_means(name):
    """Closed means (tanh 0, GELU Stein, GELU' 1/2) and quadrature means agree with scipy quad."""
    spec = ACTIVATIONS[name]
    diag = np.array([0.0, 1e-4, 0.3, 1.0, 4.0, 10.0])
    S = np.diag(diag)
    for fn, kernel_fn in ((spec.phi, activation_kernel), (spec.dphi, derivative_kernel)):
        _, mean, _ = kernel_fn(name, S)
        ref = [integrate.quad(lambda z: float(fn(math.sqrt(v) * z)) * _npdf(z),  # noqa: B023 - quad calls it now
                              -12, 12, epsabs=1e-14, epsrel=1e-13)[0] for v in diag]
        assert mean == pytest.approx(ref, abs=1e-11)


# --- quadrature vs scipy ----------------------------------------------------------------------

SCIPY_POINTS = [(1.0, 1.0, 0.5), (4.0, 2.0, -2.5), (9.0, 9.0, 8.9)]


@pytest.mark.parametrize("name,fn", [
    ("tanh", math.tanh),
    ("softplus", lambda x: max(x, 0.0) + math.log1p(math.exp(-abs(x)))),
    ("tanh'", lambda x: 1.0 - math.tanh(x) ** 2),
])
def test_gauss_hermite_vs_dblquad(name, fn):
    spec = ACTIVATIONS[name.rstrip("'")]
    vec = spec.dphi if name.endswith("'") else spec.phi
    for a, b, s in SCIPY_POINTS:
        K, err = quad.gauss_hermite_kernel(vec, vec, matrix(a, b, s))
        ref = dblquad_reference(fn, a, b, s)
        assert K[0, 1] == pytest.approx(ref, abs=1e-10), (a, b, s)
        assert err < 1e-7


def test_hermite_rule_moments():
    for n in (2, 7, 64, 300, 1024):
        z, w = quad.hermite_rule(n)
        assert w.sum() == pytest.approx(1.0, abs=1e-14)
        assert w @ z == pytest.approx(0.0, abs=1e-14)
        if n >= 3:
            assert w @ z**2 == pytest.approx(1.0, abs=1e-13) and w @ z**4 == pytest.approx(3.0, abs=1e-12)
    assert quad.hermite_rule(1024)[0].size < 300  # negligible nodes pruned


# --- error estimates are honest ---------------------------------------------------------------

SMOOTH_CALLABLES = [
    ("erf", {}, lambda x: erf(x)),
    ("gelu", {}, lambda x: x * ndtr(x)),
]


@pytest.mark.parametrize("name,params,fn", SMOOTH_CALLABLES, ids=[c[0] for c in SMOOTH_CALLABLES])
@pytest.mark.parametrize("nodes", [8, 16, 32, 64, None])
def test_reported_error_is_honest(name, params, fn, nodes):
    for a, b, s in CASES:
        S = matrix(a, b, s)
        K, mean, _ = activation_kernel(name, S, params)
        Kq, mq, err = activation_kernel(fn, S, nodes=nodes)
        actual = max(np.abs(K - Kq).max(), np.abs(mean - mq).max())
        assert actual <= err, (a, b, s, actual, err)


def test_reported_error_for_a_kink():
    """A kinked callable, declared or not: the estimate bounds the error (also as c → ±1)."""
    relu = ACTIVATIONS["relu"].phi
    for a, b, s in CASES:
        S = matrix(a, b, s)
        K, mean, _ = activation_kernel("relu", S)
        for kinks in (None, (0.0,)):
            Kq, mq, err = activation_kernel(relu, S, kinks=kinks)
            assert max(np.abs(K - Kq).max(), np.abs(mean - mq).max()) <= err + 1e-15  # closed form's round-off
            assert err < 1e-10 * max(1.0, np.abs(K).max())


def test_default_rule_accuracy_at_large_variance():
    """Adaptive default: GELU and erf(x/2) as callables match the closed forms to 1e-10 up to Σ = 10."""
    S = np.array([[10.0, 9.99, 3.0, -6.0], [9.99, 10.0, 2.0, 0.0],
                  [3.0, 2.0, 5.0, 1.0], [-6.0, 0.0, 1.0, 8.0]])
    cases = (("gelu", {}, lambda x: x * ndtr(x)), ("erf", {"a": 0.5}, lambda x: erf(0.5 * x)))
    for name, params, fn in cases:
        K, mean, _ = activation_kernel(name, S, params)
        Kq, mq, err = activation_kernel(fn, S)
        assert np.abs(K - Kq).max() < 1e-10 and np.abs(mean - mq).max() < 1e-10
        assert err < 1e-8


# --- properties -------------------------------------------------------------------------------

@st.composite
def psd_matrices(draw, max_n=6, max_scale=4.0):
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, 8))
    x = np.array(draw(st.lists(st.floats(-2.0, 2.0), min_size=n * k, max_size=n * k))).reshape(n, k)
    scale = draw(st.floats(0.01, max_scale))
    return scale * (x @ x.T) / k


def _assert_kernel_properties(K, mean):
    assert np.all(np.isfinite(K)) and np.all(np.isfinite(mean))
    assert np.array_equal(K, K.T)
    tol = 1e-10 * max(1.0, np.abs(K).max())
    assert np.linalg.eigvalsh(K).min() >= -tol
    assert np.linalg.eigvalsh(K - np.outer(mean, mean)).min() >= -tol  # covariance of φ(u)


@settings(deadline=None, max_examples=40, derandomize=True)
@given(S=psd_matrices())
def test_closed_forms_symmetric_psd(S):
    for name, params in CLOSED:
        for fn in (activation_kernel, derivative_kernel):
            K, mean, err = fn(name, S, params)
            assert err == 0.0 or name == "gelu"
            _assert_kernel_properties(K, mean)


@settings(deadline=None, max_examples=6, derandomize=True)
@given(S=psd_matrices(max_n=4, max_scale=2.0))
def test_quadrature_symmetric_psd(S):
    for name in ("tanh", "silu", "softplus"):
        for fn in (activation_kernel, derivative_kernel):
            K, mean, _ = fn(name, S)
            _assert_kernel_properties(K, mean)


@pytest.mark.parametrize("name", ["relu", "erf", "gelu", "tanh"])
def test_leading_batch_dimensions(name):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 5))
    S = x @ np.swapaxes(x, -1, -2) / 5
    S[1, 2] = 1.0  # an equicorrelated/duplicate element
    for fn in (activation_kernel, derivative_kernel):
        K, mean, err = fn(name, S)
        assert K.shape == S.shape and mean.shape == S.shape[:-1]
        for idx in np.ndindex(2, 3):
            K1, m1, e1 = fn(name, S[idx])
            np.testing.assert_allclose(K[idx], K1, rtol=0, atol=max(err, 1e-15))
            np.testing.assert_allclose(mean[idx], m1, rtol=0, atol=max(err, 1e-15))


def test_zero_variance_tokens():
    S = np.array([[0.0, 0.0, 0.0], [0.0, 2.0, 0.7], [0.0, 0.7, 1.0]])
    for name in ACTIVATIONS:
        spec = ACTIVATIONS[name]
        for fn, f0 in ((activation_kernel, spec.phi), (derivative_kernel, spec.dphi)):
            K, mean, _ = fn(name, S)
            assert np.all(np.isfinite(K)) and np.all(np.isfinite(mean)), name
            phi0 = float(np.asarray(f0(np.zeros(1)))[0])
            assert mean[0] == pytest.approx(phi0, abs=1e-15)
            np.testing.assert_allclose(K[0], phi0 * mean, atol=1e-12)
            np.testing.assert_allclose(K[:, 0], phi0 * mean, atol=1e-12)
    K, _, _ = activation_kernel("relu", S)
    assert np.all(K[0] == 0.0)
    Kd, md, _ = derivative_kernel("leaky_relu", S, {"slope": 0.2})  # φ'(0) = slope (PyTorch)
    assert Kd[0, 1] == pytest.approx(0.2 * 0.6) and md[0] == 0.2


def test_slightly_non_psd_input_is_clipped():
    eps = 1e-15
    S = matrix(1.0, 1.0, 1.0 + eps)
    for name in ACTIVATIONS:
        for fn in (activation_kernel, derivative_kernel):
            K, mean, _ = fn(name, S)
            assert np.all(np.isfinite(K)), name


def test_derivatives_match_finite_differences():
    x = np.linspace(-4.0, 4.0, 81) + 0.0123  # avoid the kink at 0
    h = 1e-6
    for name, spec in ACTIVATIONS.items():
        p = {"leaky_relu": {"slope": 0.3}, "erf": {"a": 1.7}}.get(name, {})
        f, df = bound(spec.phi, p), bound(spec.dphi, p)
        np.testing.assert_allclose(df(x), (f(x + h) - f(x - h)) / (2 * h), atol=1e-7, err_msg=name)


def test_user_callable_with_params_and_derivative():
    S = matrix(1.5, 0.7, 0.4)
    K, m, _ = activation_kernel(lambda x, k: np.tanh(k * x), S, {"k": 1.0})
    Kt, mt, _ = activation_kernel("tanh", S)
    np.testing.assert_allclose(K, Kt, atol=1e-13)
    Kd, md, _ = derivative_kernel(lambda x: erf(2 * x), S,
                                  derivative=lambda x: 4 / math.sqrt(math.pi) * np.exp(-4 * x * x))
    Ke, me, _ = derivative_kernel("erf", S, {"a": 2.0})
    np.testing.assert_allclose(Kd, Ke, atol=1e-12)
    np.testing.assert_allclose(md, me, atol=1e-12)


def test_equicorrelated_large_n_is_cheap():
    n = 512
    S = 0.8 * np.ones((n, n)) + 0.4 * np.eye(n)
    K, mean, err = activation_kernel("silu", S)
    Ks, ms, _ = activation_kernel("silu", S[:2, :2])
    assert K[0, 0] == Ks[0, 0] and K[3, 7] == Ks[0, 1] and err < 1e-10


# --- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params,field", [
    ("swish!", None, "activation"),
    (3, None, "activation"),
    ("leaky_relu", {"slope": "abc"}, "slope"),
    ("leaky_relu", {"slope": float("nan")}, "slope"),
    ("leaky_relu", {"slope": float("inf")}, "slope"),
    ("leaky_relu", {"slope": True}, "slope"),
    ("leaky_relu", {"alpha": 0.1}, "alpha"),
    ("relu", {"slope": 0.1}, "slope"),
    ("erf", {"a": None}, "a"),
    ("tanh", [1, 2], "params"),
])
def test_bad_specs_raise(name, params, field):
    with pytest.raises(SpecError) as info:
        check_activation(name, params)
    assert info.value.field == field
    with pytest.raises(SpecError):
        activation_kernel(name, np.eye(2), params)
    with pytest.raises(SpecError):
        derivative_kernel(name, np.eye(2), params)


def test_unknown_name_lists_known_ones():
    with pytest.raises(SpecError) as info:
        check_activation("swish!", {})
    for name in ACTIVATIONS:
        assert name in info.value.allowed


def test_other_bad_arguments():
    with pytest.raises(SpecError) as info:
        derivative_kernel(np.tanh, np.eye(2))
    assert info.value.field == "derivative"
    with pytest.raises(SpecError) as info:
        derivative_kernel("tanh", np.eye(2), derivative=np.tanh)
    assert info.value.field == "derivative"
    for nodes in (1, 2.5, True):
        with pytest.raises(SpecError) as info:
            activation_kernel("tanh", np.eye(2), nodes=nodes)
        assert info.value.field == "nodes"
    with pytest.raises(SpecError) as info:
        activation_kernel("relu", np.ones((2, 3)))
    assert info.value.field == "sigma"
    check_activation("leaky_relu", {"slope": np.float32(0.1)})
    check_activation(np.tanh, None)


def test_asymmetric_pair_uses_all_entries():
    """f ≠ g: E[u_i tanh(u_j)] = Σij E[tanh'(u_j)] (Stein's lemma)."""
    S = np.array([[1.0, 0.3, -0.8], [0.3, 2.0, 0.5], [-0.8, 0.5, 4.0]])
    K, err = quad.gauss_hermite_kernel(lambda x: x, np.tanh, S)
    _, dmean, _ = derivative_kernel("tanh", S)
    np.testing.assert_allclose(K, S * dmean[None, :], atol=1e-12)
    assert err < 1e-9


def test_invalid_input_kernels():
    from kernelprop.errors import NumericalError

    with pytest.raises(NumericalError):
        activation_kernel("relu", np.array([[-1.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(NumericalError):
        activation_kernel("tanh", np.array([[np.nan, 0.0], [0.0, 1.0]]))
    K, mean, _ = activation_kernel("relu", np.zeros((0, 0)))
    assert K.shape == (0, 0) and mean.shape == (0,)
