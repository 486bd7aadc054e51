"""The quadrature's reported error bounds the true error (docs/theory.md §1.3).

A battery of 28 activations (kinked, jumping, derivatives of kinked ones, sharp smooth and smooth;
see ``battery.py``) × 9 second-moment triples (correlations 0.5, −0.7, near ±1 and exactly 1,
variances 0.1 … 10, unequal variances) × forward kernel and mean, each against an independent
scipy reference at tolerances far below the errors tested.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.polynomial import legendre
from scipy.special import erf

from kernelprop.errors import SpecError
from kernelprop.kernel import quadrature as quad
from kernelprop.kernel.activations import ACTIVATIONS, activation_kernel, check_activation, derivative_kernel
from kernelprop.layers import Activation

from . import battery as B

pytestmark = pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")  # the references' own
BY_NAME = {h.name: h for h in B.BATTERY}


@pytest.fixture(scope="module")
def references():
    cache: dict = {}

    def get(h, kind, key):
        if (h.name, kind, key) not in cache:
            cache[h.name, kind, key] = (B.reference_pair(h, *key) if kind == "K" else B.reference_mean(h, key))
        return cache[h.name, kind, key]
    return get


# --- the rule itself ---------------------------------------------------------------------------

def test_kronrod_rule_exact_to_degree_3n_plus_1():
    x, wk, gi, wg = quad.kronrod_rule()
    n = wg.size
    assert x.size == 2 * n + 1 and np.all(np.diff(x) > 0) and np.all(wk > 0)
    xg, wg_ref = legendre.leggauss(n)
    np.testing.assert_allclose(x[gi], xg, atol=1e-15)
    np.testing.assert_allclose(wg, wg_ref, atol=1e-15)
    for d in range(3 * n + 2):
        exact = 2.0 / (d + 1) if d % 2 == 0 else 0.0
        assert wk @ x ** d == pytest.approx(exact, abs=1e-14), d
    # the rule is not exact one degree higher (it is a genuine Kronrod extension, not more)
    assert abs(wk @ x ** (3 * n + 3) - 2.0 / (3 * n + 4)) > 1e-10


def test_find_kinks_locates_kinks_and_jumps():
    cases = [
        (lambda x: np.maximum(x, 0.0), (0.0,)),
        (lambda x: np.clip(x, -1.0, 2.0), (-1.0, 2.0)),
        (lambda x: (x > 0.3) * 1.0, (0.3,)),
        (lambda x: np.where(x > -0.7, 0.5 * x, 0.2 * x + 1.0), (-0.7,)),
    ]
    for fn, truth in cases:
        found = quad.find_kinks(fn, -31.6, 31.6)
        assert len(found) == len(truth)
        np.testing.assert_allclose(found, truth, atol=1e-11)
    for fn in (np.tanh, np.sin, erf, lambda x: x * x):
        assert quad.find_kinks(fn, -31.6, 31.6) == ()


# --- the bound ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(BY_NAME))
def test_reported_error_bounds_the_true_error(name, references):
    """Per entry: reported ≥ |value − reference| − (the reference's own error estimate); and the
    bound is useful (≤ 1e-9 relative)."""
    h = BY_NAME[name]
    a, b, s = np.array(B.PAIRS).T
    values, errs = quad.pair_expectations(h, h, a, b, s, kinks=h.kinks_for_quadrature)
    for key, val, err in zip(B.PAIRS, values, errs):
        ref, ref_err = references(h, "K", key)
        assert err >= abs(val - ref) - ref_err, (key, val, ref, err)
        assert err <= 1e-9 * max(1.0, abs(ref)), (key, err)
    means, merrs = quad.single_expectations(h, np.array(B.VARIANCES), kinks=h.kinks_for_quadrature)
    for key, val, err in zip(B.VARIANCES, means, merrs):
        ref, ref_err = references(h, "mean", key)
        assert err >= abs(val - ref) - ref_err, (key, val, ref, err)
        assert err <= 1e-9 * max(1.0, abs(ref)), (key, err)


def test_the_kernel_matrix_error_bounds_every_entry(references):
    """``gauss_hermite_kernel`` reports the largest entry error: checked on a 3×3 kernel of a DKS-style
    ELU (the issue's case) and of the step-like derivative of a SELU."""
    S = np.array([[1.0, 0.999999, -0.4], [0.999999, 1.0, 0.2], [-0.4, 0.2, 0.1]])
    for name in ("elu-dks", "d-selu"):
        h = BY_NAME[name]
        K, err = quad.gauss_hermite_kernel(h, h, S, kinks=h.kinks)
        for i in range(3):
            for j in range(i, 3):
                ref, ref_err = references(h, "K", (S[i, i], S[j, j], S[i, j]))
                assert abs(K[i, j] - ref) - ref_err <= err, (name, i, j)
        assert err < 1e-11


# --- registered kinked activations and the public interface -------------------------------------

@pytest.mark.parametrize("name,params,member", [
    ("elu", {}, "elu"), ("selu", {}, "selu"), ("hard_tanh", {}, "hard-tanh"),
    ("hard_tanh", {"min_val": -0.5, "max_val": 2.0}, "hard-tanh-asym"), ("relu6", {}, "relu6"),
])
def test_registered_kinked_activations(name, params, member, references):
    h = BY_NAME[member]
    assert ACTIVATIONS[name].kink_points(params) == tuple(h.kinks)
    for a, b, s in B.PAIRS[:4] + B.PAIRS[5:7]:
        K, mean, err = activation_kernel(name, np.array([[a, s], [s, b]]), params)
        refs = [references(h, "K", key)[0] for key in ((a, a, a), (b, b, b), (a, b, s))]
        mrefs = [references(h, "mean", v)[0] for v in (a, b)]
        true = max(np.abs([K[0, 0], K[1, 1], K[0, 1]] - np.array(refs)).max(), np.abs(mean - mrefs).max())
        assert true <= err < 1e-10, (a, b, s, true, err)


def test_registered_derivatives_are_split_too(references):
    """ELU(α = 0.5)' jumps at 0 (from 0.5 to 1): the derivative kernel is split there."""
    h = BY_NAME["d-elu-0.5"]
    for a, b, s in B.PAIRS[:4]:
        K, mean, err = derivative_kernel("elu", np.array([[a, s], [s, b]]), {"alpha": 0.5})
        ref = references(h, "K", (a, b, s))[0]
        assert abs(K[0, 1] - ref) <= err < 1e-11


def test_callables_take_kinks(references):
    h, dh = BY_NAME["elu-dks"], BY_NAME["d-elu-0.5"]
    S = np.array([[2.0, -1.9998], [-1.9998, 2.0]])
    K, mean, err = activation_kernel(h, S, kinks=h.kinks)
    ref = references(h, "K", (2.0, 2.0, -1.9998))[0]
    assert abs(K[0, 1] - ref) <= err < 1e-11
    elu = ACTIVATIONS["elu"]
    Kd, md, errd = derivative_kernel(lambda x: elu.phi(x, 0.5), S, derivative=lambda x: elu.dphi(x, 0.5),
                                     kinks=[0])
    ref = references(dh, "K", (2.0, 2.0, -1.9998))[0]
    assert abs(Kd[0, 1] - ref) <= errd < 1e-11
    # a registered name merges the given kinks with its own (extra cuts change nothing)
    K1, _, _ = activation_kernel("elu", S)
    K2, _, _ = activation_kernel("elu", S, kinks=(0.25, -3.0))
    np.testing.assert_allclose(K1, K2, rtol=0, atol=1e-13)


@pytest.mark.parametrize("bad", ["0", 0.0, [0.0, math.nan], [math.inf], [True], [None], {"a": 1}])
def test_bad_kinks_are_spec_errors(bad):
    with pytest.raises(SpecError) as info:
        activation_kernel(np.tanh, np.eye(2), kinks=bad)
    assert info.value.field == "kinks"
    with pytest.raises(SpecError):
        derivative_kernel(np.tanh, np.eye(2), derivative=np.tanh, kinks=bad)
    with pytest.raises(SpecError):
        quad.gauss_hermite_kernel(np.tanh, np.tanh, np.eye(2), kinks=bad)
    with pytest.raises(SpecError):
        quad.gauss_hermite_mean(np.tanh, np.ones(2), kinks=bad)
    with pytest.raises(SpecError):
        Activation(np.tanh, kinks=bad)


def test_hard_tanh_bounds_must_be_ordered():
    with pytest.raises(SpecError) as info:
        check_activation("hard_tanh", {"min_val": 1.0, "max_val": 1.0})
    assert info.value.field == "max_val"
    with pytest.raises(SpecError):
        Activation("hard_tanh", {"min_val": 2.0})


def test_activation_layer_passes_kinks_on():
    """A callable layer with kinks=(…) gets the split rule, forward and backward."""
    from kernelprop.kernel.maps import Context
    from kernelprop.kernel.state import KernelState

    h, (k,) = BY_NAME["elu-dks"], BY_NAME["elu-dks"].kinks

    def dh(x):  # φ' of γ(elu_{1/2}(αx + β) + δ)
        return np.where(x > k, B._DG * B._DA, B._DG * 0.5 * B._DA * np.exp(np.minimum(B._DA * x + B._DB, 0.0)))

    S = np.array([[1.0, 0.5], [0.5, 1.0]])
    layer = Activation(h, derivative=dh, kinks=[k])
    assert layer.kinks == (h.kinks[0],)
    out, back = layer.kernel_map(KernelState(S, np.zeros(2), (2,)), Context())
    K, _, err = activation_kernel(h, S, kinks=h.kinks)
    np.testing.assert_array_equal(out.sigma, K)
    assert out.quad_error == err
    pi = back(np.ones((2, 2)), [])
    Kd, _, _ = activation_kernel(dh, S, kinks=h.kinks)
    np.testing.assert_array_equal(pi, Kd)


def test_declared_kinks_take_the_split_rule_whatever_the_nodes(references):
    """``nodes=`` chooses a Gauss–Hermite rule; a function with declared kinks is split regardless."""
    h = BY_NAME["elu-dks"]
    S = np.array([[1.0, 0.5], [0.5, 1.0]])
    K, err = quad.gauss_hermite_kernel(h, h, S, 16, kinks=h.kinks)
    ref = references(h, "K", (1.0, 1.0, 0.5))[0]
    assert abs(K[0, 1] - ref) <= err < 1e-11
    K16, err16 = quad.gauss_hermite_kernel(h, h, S, 16)  # undeclared with a fixed rule: plain Gauss–Hermite
    assert abs(K16[0, 1] - ref) > 1e-6 and err16 > 1e-6
