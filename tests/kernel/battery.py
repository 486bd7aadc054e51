"""A battery of activations with independent high-precision references for Gaussian expectations.

Each member is a vectorised function ``h`` (the code under test integrates it), the points where it
is not smooth (``kinks``, or sharp smooth features, used by the reference to split its integrals) and
the ``declared`` kinks passed to the quadrature (``None`` for "not declared": the quadrature must
find them, or the function is smooth).

References (independent of :mod:`kernelprop.kernel.quadrature`):

- piecewise members ``h = a0 + a1 x + a2 x² + e·eˣ`` on intervals: the inner expectation
  ``E[h(m + τZ)]`` in closed form from truncated-Gaussian moments, the outer integral over ``z1`` by
  ``scipy.integrate.quad`` split at the kinks and at the points where the inner kink crosses
  ``z2 = 0`` (graded around them when the turn is narrow);
- smooth members: nested ``scipy.integrate.quad`` split at their sharp features, or an elementary
  inner expectation (erf, sin, GELU).

Each reference returns ``(value, abserr)``, abserr being scipy's own estimate (tiny: tolerances
1e-15 absolute, 1e-14 relative).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import integrate
from scipy.special import erf, expit, ndtr

ZR = 12.0  # the references integrate over |z| ≤ 12 (outside mass 3.6e-33)
_SQ2PI = math.sqrt(2.0 * math.pi)


def npdf(z: float) -> float:
    return math.exp(-0.5 * z * z) / _SQ2PI


def quad_split(fun, lo, hi, pts, eps=1e-15):
    """``∫_lo^hi fun`` by scipy quad on the pieces between the points; returns (value, abserr)."""
    cuts = sorted({lo, hi, *[p for p in pts if lo < p < hi]})
    val = err = 0.0
    for x, y in zip(cuts[:-1], cuts[1:]):
        v, e = integrate.quad(fun, x, y, epsabs=eps, epsrel=1e-14, limit=400)
        val += v
        err += e
    return val, err


# --- truncated Gaussian moments: x = m + τZ restricted to (lo, hi) --------------------------------

def _mass(al, be):
    """``P(al < Z < be)`` without cancellation in the upper tail."""
    if al > 0:
        return float(ndtr(-al) - ndtr(-be))
    return float(ndtr(be) - ndtr(al))


def _pdf(t):
    return 0.0 if math.isinf(t) else npdf(t)


def _tpdf(t):
    return 0.0 if math.isinf(t) else t * npdf(t)


def truncated_moments(m, tau, lo, hi, kappa=1.0):
    """``E[1], E[x], E[x²], E[exp(κx)]`` of ``x = m + τZ`` over ``lo < x < hi`` (closed forms)."""
    al, be = (lo - m) / tau, (hi - m) / tau
    p = _mass(al, be)
    d = _pdf(al) - _pdf(be)
    z2 = p + _tpdf(al) - _tpdf(be)
    ex = math.exp(kappa * m + 0.5 * (kappa * tau) ** 2) * _mass(al - kappa * tau, be - kappa * tau)
    return p, m * p + tau * d, m * m * p + 2 * m * tau * d + tau * tau * z2, ex


@dataclass
class Piecewise:
    """``h(x) = a0 + a1 x + a2 x² + e·exp(κx)`` on each interval ``(lo, hi]`` of ``pieces``."""

    name: str
    pieces: list  # (lo, hi, a0, a1, a2, e[, κ = 1])
    declared: tuple | None = None
    undeclared: bool = False

    @property
    def kinks(self):
        return sorted({p for lo, hi, *_ in self.pieces for p in (lo, hi) if math.isfinite(p)})

    def __call__(self, x):
        x = np.asarray(x, dtype=np.float64)
        out = np.zeros(x.shape)
        for lo, hi, a0, a1, a2, e, k in self._full():
            inside = (x > lo) & (x <= hi)
            xe = np.where(inside, x, 0.0)
            out = np.where(inside, a0 + a1 * xe + a2 * xe * xe + (e * np.exp(k * xe) if e else 0.0), out)
        return out

    def _full(self):
        return [tuple(p) + (1.0,) * (7 - len(p)) for p in self.pieces]

    def scalar(self, x):
        for lo, hi, a0, a1, a2, e, k in self._full():
            if lo < x <= hi:
                return a0 + a1 * x + a2 * x * x + (e * math.exp(k * x) if e else 0.0)
        return 0.0

    def inner(self, m, tau):
        """``E[h(m + τZ)]``."""
        if tau == 0:
            return self.scalar(m)
        tot = 0.0
        for lo, hi, a0, a1, a2, e, k in self._full():
            p, x1, x2, ex = truncated_moments(m, tau, lo, hi, k)
            tot += a0 * p + a1 * x1 + a2 * x2 + (e * ex if e else 0.0)
        return tot

    @property
    def kinks_for_quadrature(self):
        return None if self.undeclared else tuple(self.kinks)


@dataclass
class Smooth:
    """A smooth function; ``features``: points of fast change (reference cuts only, not declared)."""

    name: str
    vec: object
    scalar: object
    features: tuple = ()
    inner_closed: object = None  # (m, τ) -> E[h(m + τZ)] when elementary
    kinks: list = field(default_factory=list)

    @property
    def kinks_for_quadrature(self):
        return None

    def __call__(self, x):
        return self.vec(x)

    def inner(self, m, tau):
        if tau == 0:
            return self.scalar(m)
        if self.inner_closed is not None:
            return self.inner_closed(m, tau)
        pts = [(k - m) / tau for k in self.features]
        return quad_split(lambda z: self.scalar(m + tau * z) * npdf(z), -ZR, ZR, pts, eps=1e-16)[0]


def _cuts(h):
    return list(h.kinks) + list(getattr(h, "features", ()))


def reference_pair(h, a, b, s):
    """``E[h(u) h(v)]`` for second moments ``(a, b, s)``: (value, abserr)."""
    sa, sb = math.sqrt(a), math.sqrt(b)
    c = max(-1.0, min(1.0, s / (sa * sb)))
    r = math.sqrt(max(0.0, 1.0 - c * c))
    cuts = _cuts(h)
    own = [k / sa for k in cuts]
    shadow = [k / (sb * c) for k in cuts] if c != 0 else []
    if r <= 4e-8:  # the code under test takes |c| within round-off of 1 as ±1
        c = math.copysign(1.0, c)
        return quad_split(lambda z: h.scalar(sa * z) * h.scalar(sb * c * z) * npdf(z), -ZR, ZR, own + shadow)
    width = r / abs(c) if c != 0 else math.inf
    graded = [p + sg * d * width for p in shadow for d in (0.25, 1, 3, 8) for sg in (-1, 1)] if width < 1 else []
    return quad_split(lambda z: h.scalar(sa * z) * h.inner(sb * c * z, sb * r) * npdf(z), -ZR, ZR,
                      own + shadow + graded)


def reference_mean(h, a):
    sa = math.sqrt(a)
    return quad_split(lambda z: h.scalar(sa * z) * npdf(z), -ZR, ZR, [k / sa for k in _cuts(h)])


# --- the members ----------------------------------------------------------------------------------

INF = math.inf
_S = math.sqrt(2.0 / (1.0 + 0.2 ** 2))       # TAT-style leaky ReLU, slope 0.2, scaled to E φ² = q
_L, _A = 1.0507009873554805, 1.6732632423543772  # SELU
_DA, _DB, _DG, _DD = 1.3, 0.4, 0.9, -0.2      # DKS-style ELU: γ(elu_{0.5}(αx + β) + δ), kink at −β/α
_DK = -_DB / _DA


def _gelu_inner(m, tau):
    t = math.sqrt(1.0 + tau * tau)
    return m * float(ndtr(m / t)) + tau * tau * npdf(m / t) / t


PIECEWISE = [
    Piecewise("relu", [(-INF, 0, 0, 0, 0, 0), (0, INF, 0, 1, 0, 0)]),
    Piecewise("relu-undeclared", [(-INF, 0, 0, 0, 0, 0), (0, INF, 0, 1, 0, 0)], undeclared=True),
    Piecewise("leaky-tat", [(-INF, 0, 0, 0.2 * _S, 0, 0), (0, INF, 0, _S, 0, 0)]),
    Piecewise("elu", [(-INF, 0, -1, 0, 0, 1), (0, INF, 0, 1, 0, 0)]),
    Piecewise("elu-dks", [(-INF, _DK, _DG * (_DD - 0.5), 0, 0, _DG * 0.5 * math.exp(_DB), _DA),
                          (_DK, INF, _DG * (_DB + _DD), _DG * _DA, 0, 0)]),
    Piecewise("selu", [(-INF, 0, -_L * _A, 0, 0, _L * _A), (0, INF, 0, _L, 0, 0)]),
    Piecewise("hard-tanh", [(-INF, -1, -1, 0, 0, 0), (-1, 1, 0, 1, 0, 0), (1, INF, 1, 0, 0, 0)]),
    Piecewise("hard-tanh-asym", [(-INF, -0.5, -0.5, 0, 0, 0), (-0.5, 2, 0, 1, 0, 0), (2, INF, 2, 0, 0, 0)]),
    Piecewise("relu6", [(-INF, 0, 0, 0, 0, 0), (0, 6, 0, 1, 0, 0), (6, INF, 6, 0, 0, 0)]),
    Piecewise("abs", [(-INF, 0, 0, -1, 0, 0), (0, INF, 0, 1, 0, 0)]),
    Piecewise("relu-squared", [(-INF, 0, 0, 0, 0, 0), (0, INF, 0, 0, 1, 0)]),
    Piecewise("step", [(-INF, 0, 0, 0, 0, 0), (0, INF, 1, 0, 0, 0)]),
    Piecewise("sign", [(-INF, 0, -1, 0, 0, 0), (0, INF, 1, 0, 0, 0)]),
    Piecewise("step-shifted", [(-INF, 0.7, 0, 0, 0, 0), (0.7, INF, 1, 0, 0, 0)]),
    Piecewise("step-undeclared", [(-INF, -0.4, 0, 0, 0, 0), (-0.4, INF, 1, 0, 0, 0)], undeclared=True),
    Piecewise("jump-and-kink", [(-INF, 0.3, 0, 0, 0, 0), (0.3, INF, 0, 1, 0, 0)]),
    Piecewise("staircase", [(-INF, -1, -2, 0, 0, 0), (-1, 0, -1, 0, 0, 0), (0, 1, 0, 0, 0, 0), (1, 2, 1, 0, 0, 0),
                            (2, INF, 2, 0, 0, 0)]),
    # derivatives of kinked activations: step-like, as the backward pass integrates them
    Piecewise("d-elu-0.5", [(-INF, 0, 0, 0, 0, 0.5), (0, INF, 1, 0, 0, 0)]),
    Piecewise("d-selu", [(-INF, 0, 0, 0, 0, _L * _A), (0, INF, _L, 0, 0, 0)]),
    Piecewise("d-hard-tanh", [(-INF, -1, 0, 0, 0, 0), (-1, 1, 1, 0, 0, 0), (1, INF, 0, 0, 0, 0)]),
    Piecewise("d-leaky-tat", [(-INF, 0, 0.2 * _S, 0, 0, 0), (0, INF, _S, 0, 0, 0)]),
]

SMOOTH = [
    Smooth("tanh", np.tanh, math.tanh),
    Smooth("tanh(20x)", lambda x: np.tanh(20 * x), lambda x: math.tanh(20 * x), (0.0,)),
    Smooth("softplus-beta20", lambda x: np.logaddexp(0, 20 * x) / 20,
           lambda x: (max(20 * x, 0) + math.log1p(math.exp(-abs(20 * x)))) / 20, (0.0,)),
    Smooth("sigmoid(50x)", lambda x: expit(50 * x), lambda x: float(expit(50 * x)), (0.0,)),
    Smooth("gelu", lambda x: x * ndtr(x), lambda x: x * float(ndtr(x)), (), _gelu_inner),
    Smooth("erf(3x)", lambda x: erf(3 * x), lambda x: math.erf(3 * x), (),
           lambda m, t: math.erf(3 * m / math.sqrt(1 + 18 * t * t))),
    Smooth("sin(2x)", lambda x: np.sin(2 * x), lambda x: math.sin(2 * x), (),
           lambda m, t: math.sin(2 * m) * math.exp(-2 * t * t)),
]

BATTERY = PIECEWISE + SMOOTH

# (Σii, Σjj, Σij): correlations 0.5, −0.7, near ±1 and exactly 1, variances 0.1 … 10, unequal ones
PAIRS = [
    (1.0, 1.0, 0.5),
    (1.0, 1.0, -0.7),
    (1.0, 1.0, 0.999999),
    (2.0, 2.0, -1.9998),
    (0.1, 10.0, 0.3),
    (10.0, 10.0, 9.5),
    (0.1, 0.1, -0.05),
    (3.0, 0.5, 0.999 * math.sqrt(1.5)),
    (3.0, 3.0, 3.0),
]
VARIANCES = [0.1, 1.0, 3.0, 10.0]
