"""Activation kernels: Gaussian expectations of an elementwise nonlinearity and its derivative.

For a zero-mean Gaussian stream ``u ~ N(0, Σ)`` (docs/theory.md §1) the elementwise map ``φ`` sends

    K[i, j] = E[φ(u_i) φ(u_j)],   mean[i] = E[φ(u_i)],

and the backward pass needs the same with ``φ'``. Notation: ``a = Σii``, ``b = Σjj``, ``s = Σij``,
``c = s / sqrt(ab)``, ``θ = arccos c`` (computed as ``atan2(sqrt(ab − s²), s)``, which needs no
clipping and is 0 on the diagonal; a correlation within round-off of ±1, ``ab − s² ≤ 16 eps·ab``,
is treated as exactly ±1).

Closed forms:

- ReLU (arc-cosine kernel of degree 1, Cho & Saul 2009):
  ``K = (sqrt(ab − s²) + (π − θ) s) / (2π)``, mean ``sqrt(a/(2π))``;
  ``K' = (π − θ)/(2π)``, mean' ``1/2``.
- leaky ReLU, slope ``r`` (``φ = r x + (1 − r) relu x``): ``K = r s + (1 − r)² K_relu``,
  mean ``(1 − r) sqrt(a/(2π))``; ``K' = r + (1 − r)² (π − θ)/(2π)``, mean' ``(1 + r)/2``.
- abs (``|x| = 2 relu x − x``): ``K = 4 K_relu − s``, mean ``sqrt(2a/π)``;
  ``K' = 1 − 2θ/π``, mean' 0.
- erf(α x) (Williams 1997): ``K = (2/π) arcsin(2α²s / sqrt((1 + 2α²a)(1 + 2α²b)))``, mean 0;
  ``K' = (4α²/π) / sqrt((1 + 2α²a)(1 + 2α²b) − 4α⁴s²)``, mean' ``2α / sqrt(π(1 + 2α²a))``.
- GELU ``xΦ(x)`` (Tsuchida et al. 2021; second-order Price/Stein), with ``A = 1 + a``,
  ``B = 1 + b``, ``D = AB − s²``:
  ``K = s(1/4 + arcsin(s/sqrt(AB))/(2π)) − s²a/(2πA sqrt D) − s²b/(2πB sqrt D)
  + (ab + s²)/(2π sqrt D)``,
  mean ``a / sqrt(2π(1 + a))``; mean' ``1/2``; ``K'`` by quadrature.
- identity: ``K = Σ``, mean 0, ``K' = 1``, mean' 1. tanh: mean 0 (odd).
- step ``1[x > 0]``: ``K = P(u > 0, v > 0) = (π − θ)/(2π)``, mean 1/2; ``K' = 0`` (φ' = 0 away
  from the jump, whose delta is not a derivative the backward pass can carry).

Everything else (tanh, SiLU, softplus, GELU's ``K'``, ELU, SELU, hard tanh, ReLU6, user callables)
uses the quadrature of :mod:`kernelprop.kernel.quadrature`, which also reports an error bound:
Mehler's expansion in the correlation over all entries at once, then, for entries it cannot resolve,
Gauss–Hermite for smooth functions and Gauss–Kronrod split at the kinks for the others. Each
registered activation lists its kinks (``ActivationSpec.kinks``: relu, leaky_relu, abs, elu, selu,
step at 0; hard_tanh at ``min_val, max_val``; relu6 at 0 and 6); a callable may declare them
(``kinks=``), else the quadrature looks for them (:func:`~kernelprop.kernel.quadrature.find_kinks`).

Zero-variance tokens (``Σii = 0``): ``u_i ≡ 0`` so ``K[i, j] = φ(0) mean[j]`` and ``mean[i] = φ(0)``,
with the derivative conventions of PyTorch at kinks: ``relu'(0) = 0``, ``leaky'(0) = slope``,
``abs'(0) = 0``, ``elu'(0) = alpha``, ``hard_tanh'`` and ``relu6'`` 0 at their corners.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy.special import erf as _erf
from scipy.special import expit as _expit
from scipy.special import ndtr as _ndtr

from ..errors import NumericalError, SpecError
from . import quadrature as _quad

__all__ = [
    "ActivationSpec", "ACTIVATIONS", "check_activation", "activation_kernel", "derivative_kernel", "kinks_of",
]

_TWO_PI = 2.0 * math.pi
_INV_SQRT_2PI = 1.0 / math.sqrt(_TWO_PI)
_SNAP = 16.0 * np.finfo(np.float64).eps  # |1 − c²| below this is treated as c = ±1
_CLOSED_FORM_BLOCK = 2**19  # entries per block of closed-form evaluation (4 MB per temporary)


@dataclass(frozen=True)
class ActivationSpec:
    """A registered activation: ``phi(x, **params)``, its derivative ``dphi`` and closed forms.

    The closed forms take ``(Σii, Σjj, Σij, **params)`` (broadcastable arrays) or
    ``(Σii, **params)`` for means; ``None`` means "by quadrature". ``kinks``: the points where φ or
    φ' is not smooth (a tuple, or a function of the params), where the quadrature splits its
    integrals; ``d2phi``: φ'' where it exists (for C-map curvatures); ``check(**params)``: a
    constraint between parameters, raising :class:`SpecError`.
    """

    name: str
    phi: Callable
    dphi: Callable
    params: Mapping = field(default_factory=dict)
    kernel: Callable | None = None
    mean: Callable | None = None
    dkernel: Callable | None = None
    dmean: Callable | None = None
    doc: str = ""
    kinks: Callable | tuple = ()
    d2phi: Callable | None = None
    check: Callable | None = None

    def kink_points(self, params: Mapping | None = None) -> tuple[float, ...]:
        """Points where φ or φ' is not smooth (kinks, jumps), for ``params`` (defaults filled in)."""
        full = {**self.params, **(params or {})}
        pts = self.kinks(**full) if callable(self.kinks) else self.kinks
        return _quad.check_kinks(pts)


# --- elementwise functions -------------------------------------------------------------------

def _identity(x):
    return np.asarray(x, dtype=np.float64)


def _ones(x):
    return np.ones_like(x, dtype=np.float64)


def _relu(x):
    return np.maximum(x, 0.0)


def _step(x):
    return (np.asarray(x) > 0).astype(np.float64)


def _leaky(x, slope=0.01):
    return np.where(x > 0, x, slope * x)


def _dleaky(x, slope=0.01):
    return np.where(x > 0, 1.0, float(slope)) + np.zeros_like(x, dtype=np.float64)


def _abs(x):
    return np.abs(x)


def _sign(x):
    return np.sign(x).astype(np.float64)


def _erf_a(x, a=1.0):
    return _erf(a * x)


def _derf_a(x, a=1.0):
    return (2.0 * a / math.sqrt(math.pi)) * np.exp(-(a * x) ** 2)


def _gelu(x):
    return x * _ndtr(x)


def _dgelu(x):
    return _ndtr(x) + x * _INV_SQRT_2PI * np.exp(-0.5 * x * x)


def _tanh(x):
    return np.tanh(x)


def _dtanh(x):
    t = np.tanh(x)
    return 1.0 - t * t


def _silu(x):
    return x * _expit(x)


def _dsilu(x):
    return _expit(x) * (1.0 + x * _expit(-x))


def _softplus(x):
    return np.logaddexp(0.0, x)


def _dsoftplus(x):
    return _expit(x)


def _zeros(x, **_):
    return np.zeros_like(x, dtype=np.float64)


_GELU_TANH_C = math.sqrt(2.0 / math.pi)


def _gelu_tanh(x):
    """GPT-2's ``gelu_new``: ``½x(1 + tanh(c(x + 0.044715x³)))``, ``c = sqrt(2/π)`` (Hendrycks & Gimpel 2016)."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + np.tanh(_GELU_TANH_C * (x + 0.044715 * x ** 3)))


def _dgelu_tanh(x):
    x = np.asarray(x, dtype=np.float64)
    t = np.tanh(_GELU_TANH_C * (x + 0.044715 * x ** 3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_TANH_C * (1.0 + 3 * 0.044715 * x * x)


def _d2gelu_tanh(x):
    x = np.asarray(x, dtype=np.float64)
    u = _GELU_TANH_C * (x + 0.044715 * x ** 3)
    du = _GELU_TANH_C * (1.0 + 3 * 0.044715 * x * x)
    d2u = _GELU_TANH_C * 6 * 0.044715 * x
    t = np.tanh(u)
    sech2 = 1.0 - t * t
    return sech2 * du + 0.5 * x * (sech2 * d2u - 2.0 * t * sech2 * du * du)


def _d2erf_a(x, a=1.0):
    return (-4.0 * a ** 3 / math.sqrt(math.pi)) * x * np.exp(-(a * x) ** 2)


def _d2gelu(x):
    return (2.0 - x * x) * _INV_SQRT_2PI * np.exp(-0.5 * x * x)


def _d2tanh(x):
    t = np.tanh(x)
    return -2.0 * t * (1.0 - t * t)


def _d2silu(x):
    s = _expit(x)
    return s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))


def _d2softplus(x):
    s = _expit(x)
    return s * (1.0 - s)


def _elu(x, alpha=1.0):
    return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0)))


def _delu(x, alpha=1.0):
    return np.where(x > 0, 1.0, alpha * np.exp(np.minimum(x, 0.0)))


def _d2elu(x, alpha=1.0):
    return np.where(x > 0, 0.0, alpha * np.exp(np.minimum(x, 0.0)))


_SELU_SCALE = 1.0507009873554804934193349852946   # Klambauer et al. (2017)
_SELU_ALPHA = 1.6732632423543772848170429916717


def _selu(x):
    return _SELU_SCALE * _elu(x, _SELU_ALPHA)


def _dselu(x):
    return _SELU_SCALE * _delu(x, _SELU_ALPHA)


def _d2selu(x):
    return _SELU_SCALE * _d2elu(x, _SELU_ALPHA)


def _hard_tanh(x, min_val=-1.0, max_val=1.0):
    return np.clip(np.asarray(x, dtype=np.float64), min_val, max_val)


def _dhard_tanh(x, min_val=-1.0, max_val=1.0):
    return ((x > min_val) & (x < max_val)).astype(np.float64)


def _check_hard_tanh(min_val=-1.0, max_val=1.0):
    if not min_val < max_val:
        raise SpecError("max_val", max_val, f"must be greater than min_val = {min_val} (hard_tanh clips to "
                        "[min_val, max_val])")


def _relu6(x):
    return np.clip(np.asarray(x, dtype=np.float64), 0.0, 6.0)


def _drelu6(x):
    return ((x > 0) & (x < 6)).astype(np.float64)


# --- closed forms ----------------------------------------------------------------------------

def _angle(a, b, s):
    """``(sqrt(ab − s²), θ, s clipped to ±sqrt(ab))`` with ``θ = arccos(s/sqrt(ab)) ∈ [0, π]``.

    ``ab − s² ≤ 16 eps·ab`` (``|c|`` within round-off of 1) is taken as exactly 0: the input cannot
    resolve such a gap, and ``θ ≈ sqrt(2(1 − |c|))`` would turn round-off into ~1e-8 errors
    (and a non-PSD derivative kernel for duplicated tokens).
    """
    ab = a * b
    root = np.sqrt(ab)
    s = np.clip(s, -root, root)
    gap2 = ab - s * s
    gap = np.sqrt(np.where(gap2 <= _SNAP * ab, 0.0, gap2))
    return gap, np.arctan2(gap, s), s


def _relu_kernel(a, b, s):
    """Cho & Saul (2009) arc-cosine kernel, degree 1: ``sqrt(ab)(sin θ + (π − θ) cos θ)/(2π)``."""
    gap, theta, s = _angle(a, b, s)
    return (gap + (math.pi - theta) * s) / _TWO_PI


def _relu_dkernel(a, b, s):
    """Arc-cosine kernel of degree 0: ``P(u > 0, v > 0) = (π − θ)/(2π)``."""
    return (math.pi - _angle(a, b, s)[1]) / _TWO_PI


def _relu_mean(a):
    return np.sqrt(a / _TWO_PI)


def _leaky_kernel(a, b, s, slope=0.01):
    return slope * _angle(a, b, s)[2] + (1.0 - slope) ** 2 * _relu_kernel(a, b, s)


def _leaky_dkernel(a, b, s, slope=0.01):
    return slope + (1.0 - slope) ** 2 * _relu_dkernel(a, b, s)


def _leaky_mean(a, slope=0.01):
    return (1.0 - slope) * _relu_mean(a)


def _leaky_dmean(a, slope=0.01):
    return np.full(np.shape(a), 0.5 * (1.0 + slope))


def _abs_kernel(a, b, s):
    return 4.0 * _relu_kernel(a, b, s) - _angle(a, b, s)[2]


def _abs_dkernel(a, b, s):
    return 1.0 - 2.0 * _angle(a, b, s)[1] / math.pi


def _abs_mean(a):
    return np.sqrt(2.0 * a / math.pi)


def _erf_closed(a, b, s, alpha):
    """Williams (1997): ``(2/π) arcsin(2α²s / sqrt((1 + 2α²a)(1 + 2α²b)))``."""
    k2 = 2.0 * alpha * alpha
    s = _angle(a, b, s)[2]
    arg = k2 * s / np.sqrt((1.0 + k2 * a) * (1.0 + k2 * b))
    return (2.0 / math.pi) * np.arcsin(np.clip(arg, -1.0, 1.0))


def _erf_dclosed(a, b, s, alpha):
    """``(4α²/π) / sqrt((1 + 2α²a)(1 + 2α²b) − 4α⁴s²)`` (Williams 1997 with φ' a Gaussian bump).

    The denominator is evaluated as ``1 + 2α²(a + b) + 4α⁴(ab − s²)`` (no cancellation)."""
    k2 = 2.0 * alpha * alpha
    gap = _angle(a, b, s)[0]
    return (2.0 * k2 / math.pi) / np.sqrt(1.0 + k2 * (a + b) + k2 * k2 * gap * gap)


def _erf_dmean_closed(d, alpha):
    return (2.0 * alpha / math.sqrt(math.pi)) / np.sqrt(1.0 + 2.0 * alpha * alpha * d)


def _gelu_kernel(a, b, s):
    """GELU ``xΦ(x)`` (Tsuchida et al. 2021): see the module docstring; ``D = 1 + a + b + (ab − s²)``."""
    gap, _, s = _angle(a, b, s)
    big_a, big_b = 1.0 + a, 1.0 + b
    root_d = np.sqrt(1.0 + (a + b) + gap * gap)
    ss = s * s
    return (s * (0.25 + np.arcsin(np.clip(s / np.sqrt(big_a * big_b), -1.0, 1.0)) / _TWO_PI)
            + (a * b + ss - ss * (a / big_a + b / big_b)) / (_TWO_PI * root_d))


def _gelu_mean(a):
    """Stein: ``E[uΦ(u)] = a E[φ_N(u)] = a / sqrt(2π(1 + a))``."""
    return a / np.sqrt(_TWO_PI * (1.0 + a))


def _zero_mean(d, **_):
    return np.zeros(np.shape(d))


def _half(d, **_):
    return np.full(np.shape(d), 0.5)


def _one(d, **_):
    return np.ones(np.shape(d))


ACTIVATIONS: dict[str, ActivationSpec] = {
    "identity": ActivationSpec(
        "identity", _identity, _ones, {},
        kernel=lambda a, b, s: np.asarray(s, dtype=np.float64) + 0.0 * (a + b),
        mean=_zero_mean, dkernel=lambda a, b, s: np.ones(np.broadcast(a, b, s).shape), dmean=_one,
        doc="φ(x) = x", d2phi=_zeros),
    "relu": ActivationSpec(
        "relu", _relu, _step, {}, kernel=_relu_kernel, mean=_relu_mean,
        dkernel=_relu_dkernel, dmean=_half, doc="max(x, 0); arc-cosine kernel (Cho & Saul 2009)",
        kinks=(0.0,), d2phi=_zeros),
    "leaky_relu": ActivationSpec(
        "leaky_relu", _leaky, _dleaky, {"slope": 0.01}, kernel=_leaky_kernel, mean=_leaky_mean,
        dkernel=_leaky_dkernel, dmean=_leaky_dmean,
        doc="x for x > 0, slope·x otherwise (default slope 0.01 as in PyTorch)", kinks=(0.0,), d2phi=_zeros),
    "abs": ActivationSpec(
        "abs", _abs, _sign, {}, kernel=_abs_kernel, mean=_abs_mean,
        dkernel=_abs_dkernel, dmean=_zero_mean, doc="|x| = 2 relu(x) − x", kinks=(0.0,), d2phi=_zeros),
    "erf": ActivationSpec(
        "erf", _erf_a, _derf_a, {"a": 1.0},
        kernel=lambda vi, vj, s, a=1.0: _erf_closed(vi, vj, s, a), mean=_zero_mean,
        dkernel=lambda vi, vj, s, a=1.0: _erf_dclosed(vi, vj, s, a),
        dmean=lambda d, a=1.0: _erf_dmean_closed(d, a), doc="erf(a·x) (Williams 1997)", d2phi=_d2erf_a),
    "gelu": ActivationSpec(
        "gelu", _gelu, _dgelu, {}, kernel=_gelu_kernel, mean=_gelu_mean, dkernel=None,
        dmean=_half, doc="exact GELU xΦ(x) (Tsuchida et al. 2021)", d2phi=_d2gelu),
    "gelu_tanh": ActivationSpec(
        "gelu_tanh", _gelu_tanh, _dgelu_tanh, {}, doc="tanh-approximate GELU (GPT-2's gelu_new, PyTorch "
        "approximate=\"tanh\"), by quadrature", d2phi=_d2gelu_tanh),
    "tanh": ActivationSpec(
        "tanh", _tanh, _dtanh, {}, kernel=None, mean=_zero_mean, doc="tanh(x), by quadrature", d2phi=_d2tanh),
    "silu": ActivationSpec(
        "silu", _silu, _dsilu, {}, doc="x·sigmoid(x) (swish), by quadrature", d2phi=_d2silu),
    "softplus": ActivationSpec(
        "softplus", _softplus, _dsoftplus, {}, doc="log(1 + eˣ), by quadrature", d2phi=_d2softplus),
    "elu": ActivationSpec(
        "elu", _elu, _delu, {"alpha": 1.0}, doc="x for x > 0, alpha·(eˣ − 1) otherwise (Clevert et al. "
        "2016); split quadrature", kinks=(0.0,), d2phi=_d2elu),
    "selu": ActivationSpec(
        "selu", _selu, _dselu, {}, doc="λ·elu(x, α), λ ≈ 1.0507, α ≈ 1.6733 (Klambauer et al. 2017); split "
        "quadrature", kinks=(0.0,), d2phi=_d2selu),
    "hard_tanh": ActivationSpec(
        "hard_tanh", _hard_tanh, _dhard_tanh, {"min_val": -1.0, "max_val": 1.0},
        doc="x clipped to [min_val, max_val] (PyTorch Hardtanh); split quadrature",
        kinks=lambda min_val=-1.0, max_val=1.0: (min_val, max_val), d2phi=_zeros, check=_check_hard_tanh),
    "relu6": ActivationSpec(
        "relu6", _relu6, _drelu6, {}, doc="min(max(x, 0), 6); split quadrature", kinks=(0.0, 6.0), d2phi=_zeros),
    "step": ActivationSpec(
        "step", _step, _zeros, {}, kernel=lambda a, b, s: _relu_dkernel(a, b, s), mean=_half,
        dkernel=lambda a, b, s: np.zeros(np.broadcast(a, b, s).shape), dmean=_zero_mean,
        doc="Heaviside 1[x > 0]: P(u > 0, v > 0) = (π − θ)/(2π); φ' = 0 away from the jump", kinks=(0.0,),
        d2phi=_zeros),
}
"""Registry: activation name → :class:`ActivationSpec`."""

# --- validation --------------------------------------------------------------------------------

def check_activation(name, params=None) -> None:
    """Raise :class:`SpecError` unless ``name`` is a registered activation (or a callable) and
    ``params`` holds only its parameters, each a finite real number."""
    if callable(name) and not isinstance(name, str):
        if params is not None and not isinstance(params, Mapping):
            raise SpecError("params", params, "must be a table of keyword arguments for the callable")
        for key in params or {}:
            if not isinstance(key, str):
                raise SpecError("params", key, "parameter names must be strings")
        return
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise SpecError("activation", name, "unknown activation; known: " + ", ".join(ACTIVATIONS)
                        + " (or pass a vectorised Python callable)")
    spec = ACTIVATIONS[name]
    if params is None:
        return
    if not isinstance(params, Mapping):
        raise SpecError("params", params, f"must be a table of parameters of {name}")
    for key, val in params.items():
        if key not in spec.params:
            allowed = ", ".join(spec.params) or "none"
            raise SpecError(key, val, f"is not a parameter of activation {name!r} (parameters: {allowed})")
        if (isinstance(val, bool) or not isinstance(val, numbers.Real)
                or not math.isfinite(float(val))):
            raise SpecError(key, val, f"parameter {key!r} of activation {name!r} must be a finite "
                            "real number")
    if spec.check is not None:
        spec.check(**{**spec.params, **{k: float(v) for k, v in params.items()}})


def _resolve(name_or_callable, params):
    """Return ``(spec or None, params filled with defaults, bound φ, bound φ', label)``."""
    check_activation(name_or_callable, params)
    if isinstance(name_or_callable, str):
        spec = ACTIVATIONS[name_or_callable]
        full = {**spec.params, **{k: float(v) for k, v in (params or {}).items()}}
        phi = functools.partial(spec.phi, **full) if full else spec.phi
        dphi = functools.partial(spec.dphi, **full) if full else spec.dphi
        return spec, full, phi, dphi, name_or_callable
    full = dict(params or {})
    phi = functools.partial(name_or_callable, **full) if full else name_or_callable
    label = getattr(name_or_callable, "__name__", "callable")
    return None, full, phi, None, label


def _prepare(sigma, label):
    s = np.asarray(sigma, dtype=np.float64)
    if s.ndim < 2 or s.shape[-1] != s.shape[-2]:
        raise SpecError("sigma", s.shape, "must be a (..., N, N) array of second moments")
    if not np.all(np.isfinite(s)):
        raise NumericalError(f"activation {label}", "the input kernel has non-finite entries",
                             "check the layers before it (e.g. variance blow-up)")
    s = s + np.swapaxes(s, -1, -2)  # symmetrise (a new array: the caller's is left alone)
    s *= 0.5
    diag = np.diagonal(s, axis1=-2, axis2=-1)
    if diag.size and diag.min() < -1e-10 * max(np.abs(diag).max(), np.finfo(float).tiny):
        raise NumericalError(f"activation {label}", f"the input kernel has a negative variance "
                             f"{diag.min():.3g}", "the input must be positive semi-definite")
    return s, np.clip(diag, 0.0, None)


def _value_at_zero(f) -> float:
    return float(np.asarray(f(np.zeros(1)), dtype=np.float64).reshape(-1)[0])


def _fix_zero_variance(K, mean, diag, f0):
    """Rows/columns of tokens with ``Σii = 0`` are exactly ``φ(0)·mean[j]`` (``u_i ≡ 0``)."""
    zero = diag <= 0
    if not np.any(zero):
        return K, mean
    mean = np.where(zero, f0, mean)
    K = np.where(zero[..., :, None], f0 * mean[..., None, :], K)
    K = np.where(zero[..., None, :], f0 * mean[..., :, None], K)
    return K, mean


def _expectations(f, closed_kernel, closed_mean, cparams, s, diag, nodes, kinks=None):
    """Closed forms where given, else quadrature (split at ``kinks``); returns ``(K, mean, err)``."""
    err = 0.0
    if closed_mean is not None:
        mean = np.asarray(closed_mean(diag, **cparams), dtype=np.float64) + np.zeros(diag.shape)
    else:
        mean, e = _quad.gauss_hermite_mean(f, diag, nodes, kinks=kinks)
        err = max(err, e)
    if closed_kernel is not None:  # in row blocks, so the temporaries stay small for large N
        K = np.empty(s.shape)
        n_tok = s.shape[-1]
        rows = max(1, _CLOSED_FORM_BLOCK // max(1, diag.size))
        for lo in range(0, n_tok, rows):
            blk = slice(lo, lo + rows)
            K[..., blk, :] = closed_kernel(diag[..., blk, None], diag[..., None, :], s[..., blk, :],
                                           **cparams)
    else:
        K, e = _quad.gauss_hermite_kernel(f, f, s, nodes, kinks=kinks)
        err = max(err, e)
    K, mean = _fix_zero_variance(K, mean, diag, _value_at_zero(f))
    return K, mean, float(err)


def kinks_of(name_or_callable, params=None, kinks=None):
    """The points where the quadrature splits: for a registered name its own kinks (given ``params``)
    merged with ``kinks``; for a callable ``kinks`` as given (``None``: not declared, so the
    quadrature looks for them, see :func:`kernelprop.kernel.quadrature.find_kinks`)."""
    given = None if kinks is None else _quad.check_kinks(kinks)
    if isinstance(name_or_callable, str):
        spec, full, *_ = _resolve(name_or_callable, params)
        assert spec is not None
        return tuple(sorted(set(spec.kink_points(full)) | set(given or ())))
    return given


# --- public maps -----------------------------------------------------------------------------

def activation_kernel(name_or_callable, sigma, params=None, *, nodes=None, kinks=None):
    """``K[..., i, j] = E[φ(u_i) φ(u_j)]`` and ``mean[..., i] = E[φ(u_i)]`` for ``u ~ N(0, sigma)``.

    ``name_or_callable``: a key of :data:`ACTIVATIONS` or a vectorised callable ``φ`` (called as
    ``φ(x, **params)``). ``sigma``: ``(..., N, N)`` symmetric PSD (leading batch dimensions allowed).
    ``nodes``: Gauss–Hermite rule for quadrature (``None`` = adaptive, see
    :mod:`kernelprop.kernel.quadrature`); ignored by closed forms and by split rules.
    ``kinks``: points in φ's argument where φ or φ' is not smooth (kinks, jumps): the quadrature
    splits its integrals there (docs/theory.md §1.3). A registered name brings its own (these are
    merged); for a callable, ``None`` means "not declared" (the quadrature then looks for them) and
    ``()`` "smooth".
    Returns ``(K, mean, err)``; ``err`` bounds the largest absolute error of ``K`` and ``mean`` in
    practice (0.0 for closed forms; see :mod:`kernelprop.kernel.quadrature`). Closed forms and
    sources are listed in the module docstring.
    """
    spec, full, phi, _, label = _resolve(name_or_callable, params)
    _quad.check_nodes(nodes)
    cuts = kinks_of(name_or_callable, params, kinks)
    s, diag = _prepare(sigma, label)
    if spec is None:
        return _expectations(phi, None, None, {}, s, diag, nodes, cuts)
    return _expectations(phi, spec.kernel, spec.mean, full, s, diag, nodes, cuts)


def derivative_kernel(name_or_callable, sigma, params=None, *, derivative=None, nodes=None, kinks=None):
    """``K'[..., i, j] = E[φ'(u_i) φ'(u_j)]`` and ``mean'[..., i] = E[φ'(u_i)]``, ``u ~ N(0, sigma)``.

    Closed forms for identity, relu ``(π − θ)/(2π)``, leaky_relu, abs, erf (Williams 1997) and
    step (0: the jump's delta is not a derivative); quadrature of the derivative otherwise, split at
    the kinks (where φ' jumps) as in :func:`activation_kernel`. A callable activation needs
    ``derivative=`` (a vectorised callable ``φ'``, called with the same ``params``).
    Returns ``(K', mean', err)`` as :func:`activation_kernel`.
    """
    spec, full, _, dphi, label = _resolve(name_or_callable, params)
    _quad.check_nodes(nodes)
    cuts = kinks_of(name_or_callable, params, kinks)
    if spec is None:
        if derivative is None or not callable(derivative):
            raise SpecError("derivative", derivative, "a callable activation needs derivative=<vectorised "
                            "callable φ'> for the derivative kernel")
        dphi = functools.partial(derivative, **full) if full else derivative
        s, diag = _prepare(sigma, label)
        return _expectations(dphi, None, None, {}, s, diag, nodes, cuts)
    if derivative is not None:
        raise SpecError("derivative", derivative, f"only for callable activations; {label!r} has a "
                        "built-in derivative")
    s, diag = _prepare(sigma, label)
    return _expectations(dphi, spec.dkernel, spec.dmean, full, s, diag, nodes, cuts)
