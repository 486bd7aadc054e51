"""Closed-form activation kernels in sympy (docs/theory.md §1).

For ``(u, v) ~ N(0, [[a, s], [s, b]])``, ``g = sqrt(ab)``, ``c = s/g``:

- ReLU (arc-cosine kernel, Cho & Saul 2009): ``g J₁(c)/(2π)``, ``J₁(c) = sqrt(1 − c²) + (π − arccos c) c``, diagonal
  ``a/2``, mean ``sqrt(a/(2π))``.
- leaky ReLU, slope r: ``r s + (1 − r)² K_relu``, diagonal ``a(1 + r²)/2``, mean ``(1 − r) sqrt(a/(2π))``.
- abs: ``4 K_relu − s``, diagonal ``a``, mean ``sqrt(2a/π)``.
- erf(α·) (Williams 1997): ``(2/π) arcsin(2α²s / sqrt((1 + 2α²a)(1 + 2α²b)))``, mean 0.
- GELU ``xΦ(x)`` (Tsuchida et al. 2021), ``A = 1 + a``, ``B = 1 + b``:
  ``s/4 + s arcsin(s/sqrt(AB))/(2π) + (abAB + s²(1 − ab)) / (2πAB sqrt(AB − s²))``; diagonal
  ``a/4 + a arcsin(a/(1 + a))/(2π) + a²/(π(1 + a) sqrt(1 + 2a))``; mean ``a/sqrt(2π(1 + a))``.
  (Derived by Stein's lemma and Gaussian tilting; equal to the numeric engine's arrangement.)
- identity: ``s``, mean 0.

The DKS/TAT form ``γ(φ(αx + β) + δ)`` (docs/dks.md) uses these on ``α²Σ`` when ``β = 0``; a shifted
input ``β ≠ 0`` has no closed form here (the Gaussian is no longer centred on φ's kinks or symmetry
points): refused, or with ``opaque=True`` kept as sympy functions of ``x ↦ φ(αx + β)`` (numeric α, β).

Other activations (tanh, SiLU, softplus, callables) have no closed form: they are refused with
:class:`~kernelprop.errors.NotSupportedError`, or with ``opaque=True`` kept as sympy functions
``K_tanh(a, b, s)``, ``M_tanh(a)`` implemented by the numeric engine's quadrature (they evaluate
numerically but do not simplify or differentiate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import sympy as sp
from sympy.utilities.lambdify import implemented_function

from ..errors import NotSupportedError

pi = sp.pi


def _root(x, y):
    """``sqrt(x y)``, written ``x`` when both are the same expression (x ≥ 0 here)."""
    return x if x == y else sp.sqrt(x * y)


class J1(sp.Function):
    """Cho & Saul's ``J₁ = sin θ + (π − θ) cos θ`` as a function of ``c = cos θ``:
    ``J1(c) = sqrt(1 − c²) + (π − arccos c) c``, ``J1'(c) = π − arccos c``.

    Printed as that formula; kept as one function so the generated numpy code evaluates the two
    ill-conditioned terms from the same ``c`` (their errors cancel: ``J1`` has a bounded slope at
    ``c = 1`` while each term alone has an infinite one).
    """

    nargs = 1

    @classmethod
    def eval(cls, c):
        if c.is_Number or c in (sp.S.One, sp.S.NegativeOne, sp.S.Zero):
            return cls.formula(c)

    @staticmethod
    def formula(c):
        return sp.sqrt(1 - c ** 2) + (pi - sp.acos(c)) * c

    def fdiff(self, argindex=1):
        return pi - sp.acos(self.args[0])

    def _eval_expand_func(self, **hints):
        return self.formula(self.args[0])

    def _eval_rewrite_as_acos(self, c, **kwargs):
        return self.formula(c)

    def _sympystr(self, printer):
        return "(" + printer._print(self.formula(self.args[0])) + ")"

    def _latex(self, printer, exp=None):
        body = r"\left(" + printer._print(self.formula(self.args[0])) + r"\right)"
        return body if exp is None else f"{body}^{{{exp}}}"

    def _numpycode(self, printer):
        c = f"numpy.clip({printer._print(self.args[0])}, -1.0, 1.0)"
        return f"(numpy.sqrt((1.0 - {c})*(1.0 + {c})) + (numpy.pi - numpy.arccos({c}))*{c})"

    def _mpmathcode(self, printer):
        return printer._print(self.formula(self.args[0]))


def explicit(e):
    """``e`` with every :class:`J1` written out (for limits, series and solving)."""
    return sp.sympify(e).replace(J1, J1.formula)


def _relu_off(a, b, s, **_):
    g = _root(a, b)
    return g * J1(s / g) / (2 * pi)


def _gelu_off(a, b, s, **_):
    A, B = 1 + a, 1 + b
    AB = A * B if A != B else A ** 2
    return (s / 4 + s * sp.asin(s / _root(A, B)) / (2 * pi)
            + (a * b * AB + s ** 2 * (1 - a * b)) / (2 * pi * AB * sp.sqrt(AB - s ** 2)))


@dataclass(frozen=True)
class ClosedForm:
    """``off(a, b, s)`` = E[φ(u)φ(v)], ``diag(a)`` = E[φ(u)²], ``mean(a)`` = E[φ(u)]; params as keywords."""

    name: str
    off: Callable
    diag: Callable
    mean: Callable
    source: str


CLOSED_FORMS = {
    "relu": ClosedForm("relu", _relu_off, lambda a: a / 2, lambda a: sp.sqrt(a / (2 * pi)),
                       "arc-cosine kernel (Cho & Saul 2009)"),
    "leaky_relu": ClosedForm(
        "leaky_relu", lambda a, b, s, slope: slope * s + (1 - slope) ** 2 * _relu_off(a, b, s),
        lambda a, slope: a * (1 + slope ** 2) / 2, lambda a, slope: (1 - slope) * sp.sqrt(a / (2 * pi)),
        "r s + (1 − r)² arc-cosine kernel"),
    "abs": ClosedForm("abs", lambda a, b, s: 4 * _relu_off(a, b, s) - s, lambda a: a,
                      lambda a: sp.sqrt(2 * a / pi), "4 arc-cosine kernel − s"),
    "erf": ClosedForm(
        "erf", lambda a_, b_, s, a: 2 / pi * sp.asin(2 * a ** 2 * s / _root(1 + 2 * a ** 2 * a_, 1 + 2 * a ** 2 * b_)),
        lambda a_, a: 2 / pi * sp.asin(2 * a ** 2 * a_ / (1 + 2 * a ** 2 * a_)), lambda a_, a: sp.Integer(0),
        "Williams (1997)"),
    "gelu": ClosedForm(
        "gelu", _gelu_off,
        lambda a: a / 4 + a * sp.asin(a / (1 + a)) / (2 * pi) + a ** 2 / (pi * (1 + a) * sp.sqrt(1 + 2 * a)),
        lambda a: a / sp.sqrt(2 * pi * (1 + a)), "Tsuchida et al. (2021)"),
    "identity": ClosedForm("identity", lambda a, b, s: s, lambda a: a, lambda a: sp.Integer(0), "φ(x) = x"),
}
"""Activation name → sympy closed form (names and params as in :data:`kernelprop.kernel.activations.ACTIVATIONS`)."""


class Opaque:
    """An activation with no closed form, as sympy functions evaluated by the engine's quadrature."""

    def __init__(self, name, params: dict):
        from ..kernel import activations as A
        label = getattr(name, "__name__", "callable") if callable(name) else name
        tag = "".join(ch if ch.isalnum() else "_" for ch in label)

        def kernel(a, b, s):
            k, _, _ = A.activation_kernel(name, np.array([[a, s], [s, b]], dtype=float), params)
            return float(k[0, 1])

        def mean(a):
            _, m, _ = A.activation_kernel(name, np.array([[a]], dtype=float), params)
            return float(m[0])

        def diag(a):
            k, _, _ = A.activation_kernel(name, np.array([[a]], dtype=float), params)
            return float(k[0, 0])

        self.name = label
        self._k = implemented_function(sp.Function(f"K_{tag}"), np.vectorize(kernel))
        self._d = implemented_function(sp.Function(f"Kdiag_{tag}"), np.vectorize(diag))
        self._m = implemented_function(sp.Function(f"M_{tag}"), np.vectorize(mean))
        self.source = "Gauss–Hermite quadrature of the numeric engine (opaque)"

    def off(self, a, b, s, **_):
        return self._k(a, b, s)

    def diag(self, a, **_):
        return self._d(a)

    def mean(self, a, **_):
        return self._m(a)


def lookup(layer, where: str, opaque: bool = False):
    """The closed form of ``layer`` (an :class:`~kernelprop.network.layers.Activation`) or a refusal."""
    name = layer.name
    if not callable(name) and name in CLOSED_FORMS:
        return CLOSED_FORMS[name]
    if opaque:
        return Opaque(name, dict(layer.params))
    label = getattr(name, "__name__", "callable") if callable(name) else name
    raise NotSupportedError(
        f"{where}: activation {label!r} has no closed-form kernel (closed forms: {', '.join(CLOSED_FORMS)}); "
        "pass opaque=True (CLI: --opaque) to keep it as a numerically evaluated function K_φ(a, b, s)")


def shifted(layer, a, b, where: str, opaque: bool = False):
    """The form of ``x ↦ φ(a x + b)`` for an input shift ``b ≠ 0``: opaque (numeric ``a``, ``b``) or a refusal."""
    label = getattr(layer.name, "__name__", "callable") if callable(layer.name) else layer.name
    if not opaque:
        raise NotSupportedError(
            f"{where}: activation {label!r} with input_shift β = {b} has no closed-form kernel (the closed forms "
            "are for φ(α·x) on a centred Gaussian); set input_shift = 0, or pass opaque=True (CLI: --opaque) to "
            "keep it as a numerically evaluated function")
    try:
        a_num, b_num = float(a), float(b)
    except TypeError:
        raise NotSupportedError(
            f"{where}: activation {label!r}: an opaque shifted activation needs numeric input_scale and "
            f"input_shift (got {a}, {b}); do not make them symbols") from None
    phi = layer.pointwise()

    def inner(x):
        return phi(a_num * x + b_num)
    tag = f"{a_num:g}_{b_num:g}".replace("-", "m").replace(".", "p").replace("+", "")
    inner.__name__ = f"{label}_shifted_{tag}"
    return Opaque(inner, {})
