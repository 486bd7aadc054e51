"""Mehler's expansion (kernelprop/kernel/quadrature.py, docs/theory.md §1.3) where mutation testing found it
unchecked: the order chosen entry by entry (many distinct variances) when the expansion must give an entry
up or raise its order, tokens of zero variance, and functions far from unit scale.

References: the closed form ``E[sin(ωu) sin(ωv)] = e^{−ω²(a+b)/2} sinh(ω² s)``, ``E[g(0) g(v)] = g(0) E g(v)``
with ``E cos(v) = e^{−b/2}``, and the battery's nested scipy reference for ELU."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kernelprop.errors import SpecError
from kernelprop.kernel import quadrature as quad

from . import battery as B

pytestmark = pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")  # the references' own
TOL = quad.DEFAULT_TOL
W = 1.5
# variances and correlations: ρ within 1e-3 and 1e-4 of ±1 need orders above the first stage's 32
A = np.array([3.0, 2.5, 0.4, 1.0])
B_ = np.array([3.0, 2.9, 0.5, 1.0])
RHO = np.array([0.999, -0.9999, 0.5, 0.0])


def _sin(c=1.0):
    return lambda z: c * np.sin(W * z)


def _exact_sin(a, b, s):
    return np.exp(-0.5 * W * W * (a + b)) * np.sinh(W * W * s)


@pytest.fixture(params=["grouped", "entry by entry"])
def mode(request, monkeypatch):
    """Both ways of choosing the order: thresholds per variance pair, and entry by entry (the route taken
    beyond 2^16 variance pairs, forced here)."""
    if request.param != "grouped":
        monkeypatch.setattr(quad, "_MEHLER_GROUPS", 0)
    return request.param


def test_entries_near_one_are_raised_to_the_order_they_need(mode):
    """sin(1.5x) at |ρ| = 0.999 and 0.9999 (orders above the first stage's 32): every entry resolved by
    the expansion (none given to the per-entry rule), within its bound of the closed form, the bound
    ≤ tol·sqrt(E f² E g²) (measured 0.04-0.3 of it: the coefficients' quadrature errors dominate). The order
    is raised past the tolerance until the truncation term is below ``margin·tol``; the coefficients of this
    entire function being exact to round-off, the distance to the closed form is then below
    ``margin·tol·scale + 1e-15`` (measured ≤ 5e-16; at the first order meeting the tolerance: 3e-13)."""
    s = RHO * np.sqrt(A * B_)
    v, e, done = quad.mehler_pairs(_sin(), _sin(), A, B_, s)
    assert done.all()
    scale = np.sqrt(0.5 * (1 - np.exp(-2 * W * W * A)) * 0.5 * (1 - np.exp(-2 * W * W * B_)))   # E sin²(ωu)
    assert np.all(np.abs(v - _exact_sin(A, B_, s)) <= e)
    assert np.all(e <= TOL * scale), e / scale
    assert np.all(np.abs(v - _exact_sin(A, B_, s)) <= quad._MEHLER_MARGIN * TOL * scale + 1e-15)


def test_an_entry_the_expansion_cannot_meet_is_left_undone(mode):
    """ELU at ρ = 0.99999 (coefficients decaying too slowly for order 1024): ``done`` is False, so the
    kernel takes the per-entry rule there, and the kernel is within its bound of the reference."""
    h = {x.name: x for x in B.BATTERY}["elu"]
    v, e, done = quad.mehler_pairs(h, h, [1.0, 1.0], [1.0, 1.0], [0.99999, 0.3], kinks=h.kinks)
    assert not done[0] and done[1] and e[1] <= TOL
    ref, ref_err = B.reference_pair(h, 1.0, 1.0, 0.3)
    assert abs(v[1] - ref) - ref_err <= e[1]
    sigma = np.array([[1.0, 0.99999], [0.99999, 1.0]])
    k, err = quad.gauss_hermite_kernel(h, h, sigma, kinks=h.kinks)
    ref, ref_err = B.reference_pair(h, 1.0, 1.0, 0.99999)
    assert math.isfinite(err) and abs(k[0, 1] - ref) - ref_err <= err < 1e-10


def test_zero_variance_tokens_are_resolved_by_the_expansion(mode):
    """``g = cos + 0.3·id``: with a = 0 the correlation is 0 and only the k = 0 term remains,
    ``E[g(0) g(v)] = E cos(v) = e^{−b/2}``; the expansion resolves these entries itself."""
    def g(z):
        return np.cos(z) + 0.3 * z
    v, e, done = quad.mehler_pairs(g, g, [0.0, 0.0, 1.3], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0])
    assert done.all()
    np.testing.assert_allclose(v, [1.0, math.exp(-1.0), math.exp(-0.65)], rtol=0, atol=1e-12)
    assert np.all(np.abs(v - [1.0, math.exp(-1.0), math.exp(-0.65)]) <= e + 1e-15) and e.max() <= TOL


@pytest.mark.parametrize("c", [1e-6, 1e6])
def test_the_bound_is_relative_whatever_the_scale_of_f(c, mode):
    """``c·sin(1.5x)`` for c = 1e-6 and 1e6: the same entries are resolved as for c = 1, within their
    bounds of ``c²`` times the closed form, and the bounds are ``c²`` times those of c = 1 (within 1 %):
    the tolerance and the round-off allowance are relative to ``sqrt(E f² E g²)``."""
    s = RHO * np.sqrt(A * B_)
    _, e1, _ = quad.mehler_pairs(_sin(), _sin(), A, B_, s)
    v, e, done = quad.mehler_pairs(_sin(c), _sin(c), A, B_, s)
    assert done.all()
    assert np.all(np.abs(v - c * c * _exact_sin(A, B_, s)) <= e)
    np.testing.assert_allclose(e / (c * c), e1, rtol=1e-2)


def test_an_unknown_method_is_refused_naming_the_choices():
    sigma = np.array([[1.0, 0.3], [0.3, 2.0]])
    with pytest.raises(SpecError) as info:
        quad.gauss_hermite_kernel(np.tanh, np.tanh, sigma, method="fast")
    assert (info.value.field, info.value.value) == ("method", "fast")
    assert info.value.allowed == 'must be "auto" (Mehler expansion, then per-entry rules) or "adaptive"'
