"""Per-component moment maps of Kedia et al. 2024 (DeepScaleLM), with a numpy simulator to check them.

Kedia, Zaidi, Khyalia, Jung, Goka & Lee, "Transformers get stable: an end-to-end signal propagation
theory for language models" (ICML 2024, arXiv:2403.09635) describe a signal by a **moment triplet**
and its gradient by a pair (docs/theory.md §0, §5):

* forward: mean ``μ``, variance ``σ²`` and token correlation ``r`` of ``x ∈ R^{T×d}``: every feature
  column ``x[:, k]`` is Gaussian with mean ``μ`` (all tokens), variance ``σ²`` and correlation ``r``
  between any two tokens; columns are independent;
* backward: variance ``σ_g²`` and token correlation ``r_g`` of the upstream gradient ``g = ∂L/∂y``
  (mean 0), drawn independently of the forward pass (gradient independence).

Each component maps ``(μ, σ², r) ↦ (μ', σ'², r')`` forward and ``(σ_g², r_g) ↦ (σ_g'², r_g')``
backward (the gradient with respect to the component's input). The formulas are taken from the
authors' public simulation code (``akhilkedia/TranformersGetStable``, ``simulations/*.py``), tagged
**[code]**; extensions written here are tagged **[derived]** and checked by :func:`simulate`.
Conventions of that code, kept here: weights ``W ~ N(0, σ_w²/d_in)`` (``σ_w`` is the fan-in-free
std), scores ``QKᵀ/sqrt(d_k)``, inverted dropout, LayerNorm without gain/bias over the ``d``
features of a token, softmax over the ``T`` tokens.

======================  =========================================================================
component               forward / backward (σ² = var, σ_g² = var_g, T = tokens)
======================  =========================================================================
``linear``              ``μ' = 0``, ``σ'² = σ_w²(σ² + μ²)``, ``r' = (rσ² + μ²)/(σ² + μ²)``;
                        ``σ_g'² = σ_w² (d_out/d_in) σ_g²``, ``r_g' = r_g``  — exact [code]
``relu`` (μ = 0)        ``μ' = σ/sqrt(2π)``, ``σ'² = σ²(π − 1)/(2π)``,
                        ``r' = (πr + sqrt(1 − r²) − r·arccos r − 1)/(π − 1)``;
                        ``σ_g'² = σ_g²/2``, ``r_g' = (1/2 + arcsin(r)/π) r_g``  — exact [code]
``gelu`` (μ = 0)        closed forms with ``a = σ²/(1 + σ²)`` (see :func:`gelu_forward`)  — exact [code]
``layernorm``           ``μ' = 0``, ``σ'² = 1``, ``r' = r(1 − 1/d)``; ``σ_g'² = σ_g²/σ²``,
                        ``r_g' = r_g``  — ``r'``, ``σ_g'²``, ``r_g'`` approximate at O(1/d) [code]
``dropout`` (p)         ``μ' = μ``, ``σ'² = (σ² + pμ²)/(1 − p)``, ``r' = rσ²(1 − p)/(σ² + pμ²)``;
                        ``σ_g'² = σ_g²/(1 − p)``, ``r_g' = r_g(1 − p)``  — exact [code]
``softmax`` (over T)    ``μ' = 1/T``, ``σ'² ≈ (e^{(1−r)σ²} − 1)/T²``, ``r' = −1/(T − 1)`` [derived];
                        ``σ_g'² ≈ (1 − r_g) σ_g² e^{(1−r)σ²}/T²`` (their form at r_g = 0),
                        ``r_g' = −1/(T − 1)`` [derived]  — variances approximate [code]
``attention`` (1 head)  their closed form, :func:`attention_forward` / :func:`attention_backward`
                        — approximate (small scores; backward through the values only) [code];
                        ``corrected=True`` adds the dropout term forward and the non-uniform
                        attention and query/key paths backward [derived]
======================  =========================================================================

Where Kedia's formula is exact it equals a Gaussian expectation that :mod:`kernelprop.kernel.activations`
computes independently (``exact=True`` for ReLU and GeLU switches to that code). Where it is an
approximation the docstring says so and :func:`simulate` measures how good it is (docs/components.md).

Every map is vectorised: inputs and parameters broadcast against each other as numpy arrays; scalars
in give floats out. Invalid values raise :class:`~kernelprop.errors.SpecError` naming the field.

The simulator (:func:`simulate`) draws ``T × d`` Gaussian tokens with the requested moments, applies
the component with fresh random weights in numpy, backpropagates an independent upstream gradient
through a hand-written Jacobian, and measures the moments pooled over features and seeds as the
authors' code does: with ``C`` the T×T token covariance over all (feature, seed) samples, per-token
means removed (``torch.cov`` in their code), ``μ'`` = mean of all entries, ``σ'²`` = mean diagonal
entry of ``C``, ``r'`` = mean off-diagonal entry of ``C`` divided by ``σ'²``. (Their ``σ'²`` removes
the pooled mean instead; for exchangeable tokens the two differ by O(1/samples), and centring both
the same way keeps exact identities exact, e.g. ``r' = −1/(T − 1)`` after softmax.)
Standard errors come from a jackknife over seeds (each seed an independent replicate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from scipy.special import gammaln, hyp2f1, ndtr

from ..errors import SpecError
from ..kernel.activations import activation_kernel, derivative_kernel

__all__ = [
    "Component", "COMPONENTS", "Moments", "SimulationResult", "Comparison", "MOMENTS",
    "linear_forward", "linear_backward", "relu_forward", "relu_backward", "gelu_forward",
    "gelu_backward", "layernorm_forward", "layernorm_backward", "dropout_forward", "dropout_backward",
    "softmax_forward", "softmax_backward", "attention_forward", "attention_backward",
    "predict", "simulate", "compare", "moment_errors", "grid_points", "logit_variance",
]

_TWO_PI = 2.0 * math.pi
_INV_SQRT_2PI = 1.0 / math.sqrt(_TWO_PI)

MOMENTS = ("mu", "var", "r", "var_g", "r_g")
"""Names of the five moments, in the order of :class:`Moments`."""


class Moments(NamedTuple):
    """The forward triplet and backward pair of one signal (floats or broadcast arrays)."""

    mu: float | np.ndarray
    var: float | np.ndarray
    r: float | np.ndarray
    var_g: float | np.ndarray
    r_g: float | np.ndarray


# --- validation ----------------------------------------------------------------------------------

def _shown(value, bad):
    a = np.asarray(value)
    if a.ndim == 0:
        return value
    return a[bad].ravel()[:5].tolist()


def _real(field_name, value) -> np.ndarray:
    if isinstance(value, (str, bytes)) or (isinstance(value, bool)):
        raise SpecError(field_name, value, "must be a real number or an array of real numbers")
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise SpecError(field_name, value, "must be a real number or an array of real numbers") from None
    bad = ~np.isfinite(a)
    if np.any(bad):
        raise SpecError(field_name, _shown(value, bad), "must be finite")
    return a


def _variance(field_name, value) -> np.ndarray:
    a = _real(field_name, value)
    bad = a <= 0
    if np.any(bad):
        raise SpecError(field_name, _shown(value, bad), "a variance must be > 0 (a correlation needs a "
                        "positive variance)")
    return a


def _correlation(field_name, value) -> np.ndarray:
    a = _real(field_name, value)
    bad = np.abs(a) > 1
    if np.any(bad):
        raise SpecError(field_name, _shown(value, bad), "a correlation must lie in [-1, 1]")
    return a


def _probability(field_name, value) -> np.ndarray:
    a = _real(field_name, value)
    bad = (a < 0) | (a >= 1)
    if np.any(bad):
        raise SpecError(field_name, _shown(value, bad), "a dropout probability must lie in [0, 1)")
    return a


def _nonnegative(field_name, value) -> np.ndarray:
    a = _real(field_name, value)
    bad = a < 0
    if np.any(bad):
        raise SpecError(field_name, _shown(value, bad), "must be >= 0 (a standard deviation)")
    return a


def _count(field_name, value, minimum: int) -> np.ndarray:
    if value is None:
        raise SpecError(field_name, value, f"is required: a whole number >= {minimum}")
    a = _real(field_name, value)
    bad = (a != np.round(a)) | (a < minimum)
    if np.any(bad):
        raise SpecError(field_name, _shown(value, bad), f"must be a whole number >= {minimum}")
    return a


def _zero_mean(mu, component: str) -> np.ndarray:
    a = _real("mu", mu)
    bad = a != 0
    if np.any(bad):
        raise SpecError("mu", _shown(mu, bad), f"Kedia's {component} formula assumes a zero-mean input "
                        "(as after a Linear layer); pass mu=0")
    return a


def _out(*arrays):
    """Broadcast the results; 0-d results become floats."""
    arrays = np.broadcast_arrays(*[np.asarray(a, dtype=np.float64) for a in arrays])
    if arrays[0].ndim == 0:
        return tuple(float(a) for a in arrays)
    return tuple(np.array(a) for a in arrays)


def _pair_sigma(var, r):
    """``σ²[[1, r], [r, 1]]`` as a ``(..., 2, 2)`` array for the activation kernels."""
    var, r = np.broadcast_arrays(var, r)
    s = np.empty(var.shape + (2, 2))
    s[..., 0, 0] = s[..., 1, 1] = var
    s[..., 0, 1] = s[..., 1, 0] = var * r
    return s


# --- Linear --------------------------------------------------------------------------------------

def linear_forward(mu, var, r, *, sigma_w=1.0, d_in=None, d_out=None):
    """Linear map ``y = x W``, ``W ~ N(0, σ_w²/d_in)`` (no bias) [code, exact].

    ``μ' = 0``, ``σ'² = σ_w²(σ² + μ²)``, ``r' = (rσ² + μ²)/(σ² + μ²)``: the input mean is shared by
    all tokens, so it adds to their covariance. Exact in expectation over the weights at any width.
    ``d_in``, ``d_out`` are not used forward (accepted so one parameter set drives both maps).
    """
    mu, var, r = _real("mu", mu), _variance("var", var), _correlation("r", r)
    sw = _nonnegative("sigma_w", sigma_w)
    second = var + mu * mu
    return _out(0.0 * second, sw * sw * second, (r * var + mu * mu) / second)


def linear_backward(var_g, r_g, *, sigma_w=1.0, d_in, d_out, mu=None, var=None, r=None):
    """Gradient through ``y = x W``: ``g_x = g Wᵀ``; ``σ_g'² = σ_w² (d_out/d_in) σ_g²``, ``r_g' = r_g``
    [code, exact]. ``mu``, ``var``, ``r`` are not used."""
    vg, rg = _variance("var_g", var_g), _correlation("r_g", r_g)
    sw = _nonnegative("sigma_w", sigma_w)
    d_in, d_out = _count("d_in", d_in, 1), _count("d_out", d_out, 1)
    return _out(sw * sw * (d_out / d_in) * vg, rg)


# --- ReLU ----------------------------------------------------------------------------------------

def relu_forward(mu, var, r, *, exact=False):
    """ReLU of a zero-mean input [code, exact].

    ``μ' = σ/sqrt(2π)``, ``σ'² = σ²(π − 1)/(2π)``,
    ``r' = (πr + sqrt(1 − r²) − r·arccos r − 1)/(π − 1)`` (the arc-cosine kernel of Cho & Saul 2009,
    centred). ``exact=True`` evaluates the same Gaussian expectation with
    :func:`kernelprop.kernel.activations.activation_kernel` (an independent implementation).
    """
    _zero_mean(mu, "ReLU")
    var, r = _variance("var", var), _correlation("r", r)
    if exact:
        return _from_kernel(*activation_kernel("relu", _pair_sigma(var, r))[:2])
    mean = np.sqrt(var) * _INV_SQRT_2PI
    v = var * (math.pi - 1.0) / _TWO_PI
    rr = (math.pi * r + np.sqrt(1.0 - r * r) - r * np.arccos(r) - 1.0) / (math.pi - 1.0)
    return _out(mean, v, rr)


def relu_backward(var_g, r_g, *, r, exact=False, mu=None, var=None):
    """Gradient through ReLU: ``g_x = g·1(x > 0)``; ``σ_g'² = σ_g²/2``,
    ``r_g' = (1/2 + arcsin(r)/π) r_g`` (``P(u > 0, v > 0) = 1/4 + arcsin(r)/(2π)``) [code, exact].
    Needs the forward input correlation ``r``; ``exact=True`` uses ``derivative_kernel``."""
    vg, rg = _variance("var_g", var_g), _correlation("r_g", r_g)
    r = _correlation("r", r)
    if exact:
        k = derivative_kernel("relu", _pair_sigma(np.ones_like(r), r))[0]
        return _out(vg * k[..., 0, 0], rg * k[..., 0, 1] / k[..., 0, 0])
    return _out(0.5 * vg, (0.5 + np.arcsin(r) / math.pi) * rg)


def _from_kernel(k, mean):
    m = mean[..., 0]
    v = k[..., 0, 0] - m * m
    return _out(m, v, (k[..., 0, 1] - m * m) / v)


# --- GeLU ----------------------------------------------------------------------------------------

def gelu_forward(mu, var, r, *, exact=False):
    """GeLU ``xΦ(x)`` of a zero-mean input [code, exact]. With ``a = σ²/(1 + σ²)``:

    ``μ' = σ sqrt(a)/sqrt(2π)``,
    ``σ'² = σ²/(2π) · (π − a − arccos a + 2a sqrt((1 − a)/(1 + a)))``,
    ``cov' = σ²/4 · (r + (2/π) r arcsin(ra) + (2/π) σ² (σ²(1 − r²) + 1 + r²) /
    ((1 + σ²) sqrt((1 + σ²)² − r²σ⁴))) − μ'²``, ``r' = cov'/σ'²``.
    These equal the closed form of Tsuchida et al. used by ``activation_kernel('gelu')``
    (``exact=True`` switches to it).
    """
    _zero_mean(mu, "GeLU")
    var, r = _variance("var", var), _correlation("r", r)
    if exact:
        return _from_kernel(*activation_kernel("gelu", _pair_sigma(var, r))[:2])
    a = var / (1.0 + var)
    mean = np.sqrt(var * a) * _INV_SQRT_2PI
    v = var / _TWO_PI * (math.pi - a - np.arccos(a) + 2.0 * a * np.sqrt((1.0 - a) / (1.0 + a)))
    one = 1.0 + var
    cov = var / 4.0 * (r + r * np.arcsin(r * a) * (2.0 / math.pi)
                       + var * (2.0 / math.pi) * (var * (1.0 - r * r) + 1.0 + r * r)
                       / (one * np.sqrt(one * one - (r * var) ** 2))) - mean * mean
    return _out(mean, v, cov / v)


def gelu_backward(var_g, r_g, *, var, r, exact=False, mu=None):
    """Gradient through GeLU: ``g_x = g·(Φ(x) + xφ(x))`` [code, exact]. With ``a = σ²/(1 + σ²)``:

    ``σ_g'² = σ_g² (1/2 + (−arccos a + a(5σ² + 3)/(1 + 2σ²)^{3/2})/(2π))``,
    ``E[φ'φ'] = 1/2 + (−arccos(ra) + ra((σ² + 1)(2σ² + 3) − 2r²σ⁴)/((σ² + 1)² − r²σ⁴)^{3/2})/(2π)``,
    ``r_g' = r_g E[φ'φ']/(σ_g'²/σ_g²)``. ``exact=True`` uses ``derivative_kernel('gelu')``
    (Gauss–Hermite quadrature, an independent check).
    """
    vg, rg = _variance("var_g", var_g), _correlation("r_g", r_g)
    var, r = _variance("var", var), _correlation("r", r)
    if exact:
        k = derivative_kernel("gelu", _pair_sigma(var, r))[0]
        return _out(vg * k[..., 0, 0], rg * k[..., 0, 1] / k[..., 0, 0])
    a = var / (1.0 + var)
    diag = 0.5 + (-np.arccos(a) + a * (5.0 * var + 3.0) / (1.0 + 2.0 * var) ** 1.5) / _TWO_PI
    one = 1.0 + var
    ra, rs = r * a, r * var
    off = 0.5 + (-np.arccos(ra) + ra * (one * (2.0 * var + 3.0) - 2.0 * rs * rs)
                 / (one * one - rs * rs) ** 1.5) / _TWO_PI
    return _out(vg * diag, rg * off / diag)


# --- LayerNorm -----------------------------------------------------------------------------------

def _pearson_mean(r, n):
    """``E[r̂]`` of the Pearson correlation of ``n`` bivariate-normal pairs with correlation ``r``
    (Hotelling 1953): ``r Γ(n/2)² / (Γ((n−1)/2) Γ((n+1)/2)) · ₂F₁(1/2, 1/2; (n+1)/2; r²)``."""
    c = np.exp(2.0 * gammaln(n / 2.0) - gammaln((n - 1.0) / 2.0) - gammaln((n + 1.0) / 2.0))
    return r * c * hyp2f1(0.5, 0.5, (n + 1.0) / 2.0, r * r)


def layernorm_forward(mu, var, r, *, width, finite_width=False):
    """LayerNorm over the ``d = width`` features of each token, no gain/bias.

    Kedia [code]: ``μ' = 0``, ``σ'² = 1`` (both exact at any width), ``r' = r(1 − 1/d)``
    (approximate: the O(1/d) term has the wrong coefficient, see below). The input mean drops out.

    ``finite_width=True`` [derived]: the token correlation after LayerNorm is the Pearson sample
    correlation of the ``d`` feature values of two tokens, whose expectation is known exactly
    (Hotelling 1953): ``r' = r Γ(d/2)²/(Γ((d−1)/2)Γ((d+1)/2)) ₂F₁(1/2, 1/2; (d+1)/2; r²)
    = r(1 − (1 − r²)/(2d) + O(d⁻²))``; Kedia's ``r(1 − 1/d)`` over-corrects by ``r(1 + r²)/(2d)``.
    Both tend to ``r`` as ``d → ∞``.
    """
    mu = _real("mu", mu)
    var, r = _variance("var", var), _correlation("r", r)
    d = _count("width", width, 2)
    rr = _pearson_mean(r, d) if finite_width else r * (1.0 - 1.0 / d)
    return _out(0.0 * (mu + var), 1.0 + 0.0 * (mu + var), rr)


def layernorm_backward(var_g, r_g, *, var, width, r=None, finite_width=False, mu=None):
    """Gradient through LayerNorm: ``g_x = (g − mean(g) − y·mean(g y))/s``, ``s`` the token's std.

    Kedia [code]: ``σ_g'² = σ_g²/σ²``, ``r_g' = r_g`` — the wide-limit values (approximate at O(1/d)).

    ``finite_width=True`` [derived]: the projection has rank ``d − 2`` and ``E[1/s²] = d/((d − 3)σ²)``
    exactly, so ``σ_g'² = σ_g² (d − 2)/((d − 3) σ²)`` (needs ``d ≥ 4``); to first order in 1/d,
    ``r_g' = r_g (1 − 3(1 − r²)/(2(d − 1)))`` with ``r`` the forward input correlation (required then).
    """
    vg, rg = _variance("var_g", var_g), _correlation("r_g", r_g)
    var = _variance("var", var)
    if not finite_width:
        _count("width", width, 2)
        return _out(vg / var, rg)
    d = _count("width", width, 4)
    if r is None:
        raise SpecError("r", r, "finite_width=True needs the forward input correlation r")
    r = _correlation("r", r)
    return _out(vg * (d - 2.0) / ((d - 3.0) * var), rg * (1.0 - 1.5 * (1.0 - r * r) / (d - 1.0)))


# --- Dropout -------------------------------------------------------------------------------------

def dropout_forward(mu, var, r, *, p):
    """Inverted dropout ``y = x·m/(1 − p)``, ``m ~ Bernoulli(1 − p)`` per entry [code, exact].

    ``μ' = μ``, ``σ'² = (σ² + pμ²)/(1 − p)``, ``cov' = rσ²`` so ``r' = rσ²(1 − p)/(σ² + pμ²)``.
    """
    mu, var, r = _real("mu", mu), _variance("var", var), _correlation("r", r)
    p = _probability("p", p)
    v = (var + p * mu * mu) / (1.0 - p)
    return _out(mu + 0.0 * v, v, r * var / v)


def dropout_backward(var_g, r_g, *, p, mu=None, var=None, r=None):
    """Gradient through dropout ``g_x = g·m/(1 − p)``: ``σ_g'² = σ_g²/(1 − p)``, ``cov_g' = r_g σ_g²``
    so ``r_g' = r_g(1 − p)`` [code, exact]."""
    vg, rg = _variance("var_g", var_g), _correlation("r_g", r_g)
    p = _probability("p", p)
    return _out(vg / (1.0 - p), rg * (1.0 - p))


# --- Softmax -------------------------------------------------------------------------------------

_SOFTMAX_FORMS = ("approx", "full", "corrected")


def _softmax_var(var, r, t, form):
    s2 = (1.0 - r) * var
    if form == "approx":
        return np.expm1(s2) / (t * t)
    if form == "corrected":
        e = np.exp(s2)
        return np.expm1(s2) / (t * t) + e * (3.0 * np.expm1(s2) - 2.0 * np.expm1(2.0 * s2)) / t ** 3
    e = np.exp(s2 * t / (t - 1.0))
    return (e - 1.0) * e * e / ((t - 1.0) * np.exp(s2) + 1.0) ** 2


def _check_form(form):
    if form not in _SOFTMAX_FORMS:
        raise SpecError("form", form, "must be 'approx' (Kedia's main formula), 'full' (their refined one) "
                        "or 'corrected' (first order in 1/T, derived here)")


def softmax_forward(mu, var, r, *, tokens, form="approx"):
    """Softmax over ``T = tokens`` equicorrelated logits (variance σ², correlation r).

    ``μ' = 1/T`` (exact). Variance **approximate** [code]: the logits' common part cancels, the
    rest has variance ``s² = (1 − r)σ²``, and with the denominator replaced by its mean
    (``a_i ≈ e^{z_i}/(T E e^{z})``, lognormal) Kedia get ``σ'² ≈ (e^{s²} − 1)/T²`` (``form='approx'``,
    the default). ``form='full'`` is their refined version
    ``(E − 1)E²/((T − 1)e^{s²} + 1)²``, ``E = e^{s² T/(T − 1)}``. Both miss the O(1/T) relative
    term from the fluctuation of the denominator and fail once ``e^{s²}`` is comparable with T.
    ``form='corrected'`` [derived] adds it (expand ``1/(1 + δ)²`` in the denominator's relative
    fluctuation δ, lognormal moments ``E w^k = e^{k²s²/2}``):
    ``σ'² ≈ (e^{s²} − 1)/T² + e^{s²}(3(e^{s²} − 1) − 2(e^{2s²} − 1))/T³``, valid while ``e^{2s²} ≪ T``;
    so Kedia's form is too high by a relative ``c/T``,
    ``c = e^{s²}(2(e^{2s²} − 1) − 3(e^{s²} − 1))/(e^{s²} − 1)`` (1 as s² → 0, 2.0 at s² = 0.25).
    ``r' = −1/(T − 1)`` exactly [derived]: the outputs sum to 1, so their deviations sum to 0.
    The mean ``μ`` of the logits cancels.
    """
    _real("mu", mu)
    var, r = _variance("var", var), _correlation("r", r)
    t = _count("tokens", tokens, 2)
    _check_form(form)
    v = _softmax_var(var, r, t, form)
    return _out(1.0 / t + 0.0 * v, v, -1.0 / (t - 1.0) + 0.0 * v)


def softmax_backward(var_g, r_g, *, var, r, tokens, form="approx", mu=None):
    """Gradient through softmax: ``g_x,i = a_i (g_i − Σ_k a_k g_k)``.

    Kedia [code, approximate, stated for r_g = 0]: ``σ_g'² ≈ σ_g² E[a_i²]`` with
    ``E[a_i²] ≈ e^{s²}/T²`` (``form='approx'``) or ``full variance + 1/T²`` (``form='full'``).
    ``form='corrected'`` [derived] keeps the O(1/T) terms of ``E[a_i²(1 − 2a_i + Σ_k a_k²)]``:
    ``σ_g'² ≈ (1 − r_g) σ_g² e^{s²}/T² · (1 + (4e^{s²} − 4e^{2s²} − 1)/T)``.
    The factor ``(1 − r_g)`` is [derived] and exact: softmax is shift-invariant, so the token-shared
    part of ``g`` is annihilated and only ``(1 − r_g)σ_g²`` reaches ``x``; at ``r_g = 0`` this is
    their formula unchanged. ``r_g' = −1/(T − 1)`` exactly [derived]: ``Σ_i g_x,i = 0``.
    """
    vg, rg = _variance("var_g", var_g), _correlation("r_g", r_g)
    var, r = _variance("var", var), _correlation("r", r)
    t = _count("tokens", tokens, 2)
    _check_form(form)
    if form == "approx":
        second = np.exp((1.0 - r) * var) / (t * t)
    elif form == "corrected":
        e = np.exp((1.0 - r) * var)
        second = e / (t * t) * (1.0 + (4.0 * e - 4.0 * e * e - 1.0) / t)
    else:
        second = _softmax_var(var, r, t, form) + 1.0 / (t * t)
    v = (1.0 - rg) * vg * second
    return _out(v, -1.0 / (t - 1.0) + 0.0 * v)


# --- single-head attention -----------------------------------------------------------------------

def logit_variance(var, r, *, sigma_q=1.0, sigma_k=1.0):
    """``s² = (1 − r) σ⁴ σ_q² σ_k²``: the variance of the token-varying part of the attention logits
    ``q_i·k_j/sqrt(d_k)`` (what the softmax sees), at zero input mean."""
    return (1.0 - np.asarray(r, float)) * np.asarray(var, float) ** 2 * (np.asarray(sigma_q, float)
                                                                        * np.asarray(sigma_k, float)) ** 2


def attention_forward(mu, var, r, *, tokens, d_in, sigma_q=1.0, sigma_k=1.0, sigma_v=1.0, p=0.0,
                      d_k=None, corrected=False):
    """Single-head attention ``y = dropout_p(softmax(QKᵀ/sqrt(d_k))) V`` with ``Q, K, V = xW_{q,k,v}``,
    ``W ~ N(0, σ²_{q,k,v}/d_in)``, no output projection, zero-mean input [code, **approximate**].

    With ``s² = (1 − r)σ⁴σ_q²σ_k²`` (logit variance, see :func:`logit_variance`) and the finite-width
    term ``f = (1 − r)²σ⁶σ_q²σ_k²/d_in``, Kedia's formula is

    ``μ' = 0``,
    ``σ'² = σ_v² [rσ² + ((T − 1)f + e^{s²}/(1 − p) · ((1 − r)σ² + 4f))/T]``,
    ``cov' = σ_v² [rσ² + (2f + (1 − r)σ²)/T]``, ``r' = cov'/σ'²``.

    It is a small-score expansion (``E Σ_j A_ij² ≈ e^{s²}/T``, softmax denominators at their mean,
    O(1/T) terms dropped); the authors' validation grid has ``s² ≤ 0.13``. It fails once ``e^{s²}``
    approaches ``T`` (then ``e^{s²}/T`` exceeds the bound ``Σ_j A_ij² ≤ 1``). ``d_k`` is not used.

    ``corrected=True`` [derived] adds the term Kedia's variance omits with dropout: the masks of one
    row are independent, so ``E(Σ_j A'_ij)² = 1 + p E Σ_j A_ij²/(1 − p)`` and the token-shared part
    of the values gains ``σ_v² rσ² p e^{s²}/(T(1 − p))`` (the covariance between rows is unchanged).
    """
    _zero_mean(mu, "attention")
    var, r = _variance("var", var), _correlation("r", r)
    t, d = _count("tokens", tokens, 2), _count("d_in", d_in, 1)
    sq, sk, sv = (_nonnegative(n, v) for n, v in (("sigma_q", sigma_q), ("sigma_k", sigma_k),
                                                   ("sigma_v", sigma_v)))
    p = _probability("p", p)
    qk = (sq * sk) ** 2
    s2 = (1.0 - r) * var * var * qk
    f = (1.0 - r) ** 2 * var ** 3 * qk / d
    v = sv * sv * (r * var + ((t - 1.0) * f + np.exp(s2) / (1.0 - p) * ((1.0 - r) * var + 4.0 * f)) / t)
    if corrected:
        v = v + sv * sv * r * var * p * np.exp(s2) / ((1.0 - p) * t)
    cov = sv * sv * (r * var + (2.0 * f + (1.0 - r) * var) / t)
    return _out(0.0 * v, v, cov / v)


def attention_backward(var_g, r_g, *, tokens, d_in, d_k, sigma_v=1.0, p=0.0, sigma_q=None,
                       sigma_k=None, corrected=False, mu=None, var=None, r=None):
    """Gradient through single-head attention with respect to its input [code, **approximate**].

    ``σ_g'² = σ_g² σ_v² (d_k/d_in) (1 + (T − 1) r_g (1 − p))/(T(1 − p))``,
    ``cov_g' = σ_g² σ_v² (d_k/d_in) (1 + (T − 1) r_g)/T``, so
    ``r_g' = (1 + (T − 1) r_g)(1 − p)/(1 + (T − 1) r_g (1 − p))``.

    Derived for uniform attention ``A = 11ᵀ/T`` and through the values only, so it is accurate only
    for small logit variance ``s²``. Two things are neglected (see docs/components.md): (i) the
    non-uniformity of A, which the forward formula keeps — through the values,
    ``E Σ_i A'_ij² ≈ e^{s²}/(T(1 − p))``, so at ``r_g = 0`` the variance is low by ``≈ e^{s²}``;
    (ii) the path through the queries and keys (the softmax Jacobian), of relative size ``∝ s²``.
    ``sigma_q``, ``sigma_k``, ``mu``, ``var``, ``r`` are not used by Kedia's form.

    ``corrected=True`` [derived, leading order in ``s²`` and ``1/T``, checked by :func:`simulate`]
    keeps both effects. With ``U = σ_g²σ_v²(d_k/d_in)/T`` and ``s²`` from :func:`logit_variance`:
    ``σ_g'² = U [(e^{s²} + (2 − r)s²)/(1 − p) + (T − 1) r_g (e^{r s²} + r s²)]``,
    ``cov_g' = U [1 + (T − 1) r_g + r_g (1 − r) s²]``. Terms: values path ``e^{s²}/(1 − p)``
    (``E Σ_i A'_ij²``) and ``(T − 1) r_g e^{rs²}`` (two rows share key j, so their logits correlate
    by ``r s²``); query path ``(1 − r)s²``; key path ``s²(1 + (T − 1) r_g r)`` (coherent over the
    queries when both ``g`` and ``q`` are token-correlated). Needs ``var``, ``r``, ``sigma_q``.
    """
    vg, rg = _variance("var_g", var_g), _correlation("r_g", r_g)
    t = _count("tokens", tokens, 2)
    d, dk = _count("d_in", d_in, 1), _count("d_k", d_k, 1)
    sv = _nonnegative("sigma_v", sigma_v)
    p = _probability("p", p)
    scale = vg * sv * sv * dk / d
    if corrected:
        if var is None or r is None or sigma_q is None:
            raise SpecError("var" if var is None else "r" if r is None else "sigma_q", None,
                            "corrected=True needs the forward input var, r and sigma_q")
        var, r = _variance("var", var), _correlation("r", r)
        sq = _nonnegative("sigma_q", sigma_q)
        sk = sq if sigma_k is None else _nonnegative("sigma_k", sigma_k)
        s2 = (1.0 - r) * var * var * (sq * sk) ** 2
        u = scale / t
        v = u * ((np.exp(s2) + (2.0 - r) * s2) / (1.0 - p) + (t - 1.0) * rg * (np.exp(r * s2) + r * s2))
        cov = u * (1.0 + (t - 1.0) * rg + rg * (1.0 - r) * s2)
        return _out(v, cov / v)
    v = scale * (1.0 + (t - 1.0) * rg * (1.0 - p)) / (t * (1.0 - p))
    cov = scale * (1.0 + (t - 1.0) * rg) / t
    return _out(v, cov / v)


# --- simulator: one component = draw its random parameters + run forward/backward -----------------
#
# ``draw(rng, t, d, q)`` returns a dict of random arrays for ONE replicate; ``run(x, g, rand, q)``
# is vectorised over a leading replicate axis: x (S, T, d) → y (S, T, d_out), and g (S, T, d_out)
# → g_x (S, T, d) by the hand-written Jacobian transpose. ``q`` holds the resolved parameters.

def _draw_linear(rng, t, d, q):
    return {"w": rng.standard_normal((d, int(q["d_out"]))) * (q["sigma_w"] / math.sqrt(d))}


def _run_linear(x, g, rand, q):
    w = rand["w"]
    return x @ w, g @ np.swapaxes(w, -1, -2)


def _run_relu(x, g, rand, q):
    return np.maximum(x, 0.0), g * (x > 0)


def _run_gelu(x, g, rand, q):
    cdf = ndtr(x)
    return x * cdf, g * (cdf + x * _INV_SQRT_2PI * np.exp(-0.5 * x * x))


def _run_layernorm(x, g, rand, q):
    c = x - x.mean(axis=-1, keepdims=True)
    s = np.sqrt((c * c).mean(axis=-1, keepdims=True))
    y = c / s
    gx = (g - g.mean(axis=-1, keepdims=True) - y * (g * y).mean(axis=-1, keepdims=True)) / s
    return y, gx


def _draw_dropout(rng, t, d, q):
    return {"keep": rng.random((t, d)) >= q["p"]}


def _run_dropout(x, g, rand, q):
    m = rand["keep"] / (1.0 - q["p"])
    return x * m, g * m


def _softmax(z, axis):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _run_softmax(x, g, rand, q):
    a = _softmax(x, axis=1)  # over the T tokens of each feature column
    return a, a * (g - (a * g).sum(axis=1, keepdims=True))


def _draw_attention(rng, t, d, q):
    dk = int(q["d_k"])
    w = rng.standard_normal((3, d, dk)) / math.sqrt(d)
    return {"wq": w[0] * q["sigma_q"], "wk": w[1] * q["sigma_k"], "wv": w[2] * q["sigma_v"],
            "keep": rng.random((t, t)) >= q["p"]}


def _run_attention(x, g, rand, q):
    wq, wk, wv = rand["wq"], rand["wk"], rand["wv"]
    tr = lambda m: np.swapaxes(m, -1, -2)  # noqa: E731
    scale = 1.0 / math.sqrt(wq.shape[-1])
    qm, km, vm = x @ wq, x @ wk, x @ wv
    a = _softmax(scale * (qm @ tr(km)), axis=-1)
    m = rand["keep"] / (1.0 - q["p"])
    ad = a * m
    y = ad @ vm
    # backward: y = A_d V
    d_ad = g @ tr(vm)
    d_v = tr(ad) @ g
    d_a = d_ad * m
    d_s = a * (d_a - (a * d_a).sum(axis=-1, keepdims=True)) * scale
    d_q, d_k = d_s @ km, tr(d_s) @ qm
    gx = d_q @ tr(wq) + d_k @ tr(wk) + d_v @ tr(wv)
    return y, gx


def _same_width(d, q):
    return d


# --- registry ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Component:
    """A component: Kedia's maps, the grid they are validated on, and the simulator pieces.

    ``params``: the component's parameters with defaults (``None`` = filled by :func:`simulate` from
    ``width``/``tokens``, or required). ``options``: formula-only switches (ignored by the simulator).
    ``approximate``: the moments where the formula is an approximation rather than exact.
    ``grid``: name → values; its Cartesian product is the validation grid (:func:`grid_points`).
    """

    name: str
    forward: Callable
    backward: Callable
    grid: Mapping
    doc: str
    params: Mapping = field(default_factory=dict)
    options: tuple = ()
    approximate: tuple = ()
    draw: Callable | None = field(default=None, repr=False)
    run: Callable | None = field(default=None, repr=False)
    out_width: Callable = field(default=_same_width, repr=False)


_VAR = (0.25, 1.0, 4.0)
_R = (0.0, 0.3, 0.7, 0.95)
_RG = (0.0, 0.5, 0.9)

COMPONENTS: dict[str, Component] = {
    "linear": Component(
        "linear", linear_forward, linear_backward,
        {"mu": (0.0, 1.0), "var": _VAR, "r": _R, "var_g": (1.0,), "r_g": (0.0, 0.5),
         "sigma_w": (0.5, 2.0), "d_in": (64, 256), "d_out": (64, 256)},
        "y = x W, W ~ N(0, σ_w²/d_in); exact", {"sigma_w": 1.0, "d_in": None, "d_out": None},
        draw=_draw_linear, run=_run_linear, out_width=lambda d, q: int(q["d_out"])),
    "relu": Component(
        "relu", relu_forward, relu_backward,
        {"mu": (0.0,), "var": _VAR, "r": _R, "var_g": (1.0,), "r_g": _RG, "tokens": (16, 64)},
        "max(x, 0) of a zero-mean input; exact", {}, options=("exact",), run=_run_relu),
    "gelu": Component(
        "gelu", gelu_forward, gelu_backward,
        {"mu": (0.0,), "var": _VAR, "r": _R, "var_g": (1.0,), "r_g": _RG, "tokens": (16, 64)},
        "xΦ(x) of a zero-mean input; exact", {}, options=("exact",), run=_run_gelu),
    "layernorm": Component(
        "layernorm", layernorm_forward, layernorm_backward,
        {"mu": (0.0, 3.0), "var": _VAR, "r": _R, "var_g": (1.0,), "r_g": _RG, "width": (64, 256)},
        "normalise each token over its d features (no gain/bias); r', var_g', r_g' approximate at O(1/d)",
        {"width": None}, options=("finite_width",), approximate=("r", "var_g", "r_g"),
        run=_run_layernorm),
    "dropout": Component(
        "dropout", dropout_forward, dropout_backward,
        {"mu": (0.0, 1.0), "var": _VAR, "r": _R, "var_g": (1.0,), "r_g": _RG, "p": (0.1, 0.3)},
        "inverted dropout with probability p; exact", {"p": 0.1}, draw=_draw_dropout, run=_run_dropout),
    "softmax": Component(
        "softmax", softmax_forward, softmax_backward,
        {"mu": (0.0,), "var": _VAR, "r": _R, "var_g": (1.0,), "r_g": (0.0, 0.5), "tokens": (16, 64, 256)},
        "softmax over T equicorrelated logits; variances approximate (lognormal, large T)",
        {"tokens": None}, options=("form",), approximate=("var", "var_g"), run=_run_softmax),
    "attention": Component(
        "attention", attention_forward, attention_backward,
        {"mu": (0.0,), "var": (0.25, 1.0, 2.0), "r": (0.0, 0.3, 0.7), "var_g": (1.0,), "r_g": (0.0, 0.5),
         "sigma_q": (0.3, 0.6, 1.0), "p": (0.0, 0.3), "tokens": (16, 64), "d_in": (64, 256)},
        "single-head softmax attention, QKᵀ/sqrt(d_k), no output projection; approximate",
        {"sigma_q": 1.0, "sigma_k": None, "sigma_v": 1.0, "p": 0.0, "tokens": None, "d_in": None,
         "d_k": 64},
        options=("corrected",), approximate=("var", "r", "var_g", "r_g"), draw=_draw_attention,
        run=_run_attention,
        out_width=lambda d, q: int(q["d_k"])),
}
"""Registry: component name → :class:`Component`."""


def _component(name) -> Component:
    if not isinstance(name, str) or name not in COMPONENTS:
        raise SpecError("component", name, "unknown component; known: " + ", ".join(COMPONENTS))
    return COMPONENTS[name]


def grid_points(name):
    """The validation grid of component ``name``: a list of dicts (Cartesian product of ``grid``)."""
    comp = _component(name)
    keys = list(comp.grid)
    out = [{}]
    for k in keys:
        out = [{**pt, k: v} for pt in out for v in comp.grid[k]]
    return out


def _resolve(comp: Component, params: Mapping, width=None, tokens=None) -> dict:
    """Fill the component's parameters: defaults, then ``params``; ``d_in``/``width`` from ``width``
    and ``tokens`` from ``tokens`` when given (a conflicting explicit value is an error)."""
    allowed = set(comp.params) | set(comp.options)
    for k in params:
        if k not in allowed:
            raise SpecError(k, params[k], f"is not a parameter of component {comp.name!r} "
                            f"(parameters: {', '.join(sorted(allowed)) or 'none'})")
    q = {**comp.params, **params}
    for key, value in (("d_in", width), ("width", width), ("tokens", tokens)):
        if key in comp.params and value is not None:
            if params.get(key) is not None and params[key] != value:
                src = "tokens" if key == "tokens" else "width"
                raise SpecError(key, params[key], f"conflicts with {src}={value}; give one of them")
            q[key] = value
    if comp.name == "linear" and q.get("d_out") is None:
        q["d_out"] = q["d_in"]
    if comp.name == "attention" and q.get("sigma_k") is None:
        q["sigma_k"] = q["sigma_q"]
    return q


def predict(name, mu, var, r, *, var_g=1.0, r_g=0.0, **params) -> Moments:
    """Kedia's forward and backward maps of component ``name`` in one call (vectorised)."""
    comp = _component(name)
    q = _resolve(comp, params)
    m, v, rr = comp.forward(mu, var, r, **q)
    vg, rg = comp.backward(var_g, r_g, mu=mu, var=var, r=r, **q)
    return Moments(m, v, rr, vg, rg)


# --- simulation ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SimulationResult:
    """Measured moments of one component at one point, with jackknife standard errors over seeds."""

    component: str
    value: Moments
    stderr: Moments
    settings: Mapping


def _equicorrelated(rng, t, d, var, r, mean=0.0):
    """``T × d`` Gaussian array: columns independent, each ``N(mean·1, var[(1 − r)I + r11ᵀ])``
    (eigen-construction, valid for ``−1/(T − 1) ≤ r ≤ 1``)."""
    e = rng.standard_normal((t, d))
    ebar = e.mean(axis=0, keepdims=True)
    z = math.sqrt(1.0 - r) * (e - ebar) + math.sqrt(1.0 + (t - 1.0) * r) * ebar
    return mean + math.sqrt(var) * z


def _sums(z):
    """Per-replicate sufficient statistics of ``z`` (S, T, n): n, per-token sums, Σz², Σ_n (Σ_t z)²."""
    s = z.shape[0]
    n = np.full(s, z.shape[2], dtype=np.float64)
    return n, z.sum(axis=2), (z * z).sum(axis=(1, 2)), (z.sum(axis=1) ** 2).sum(axis=1)


def _pooled(n, s1, s2, q, t):
    """(mean, var, r) from pooled sums (leading axes broadcast): see the module docstring."""
    m_tok = s1 / n[..., None]
    mean = m_tok.mean(axis=-1)
    var = s2 / (n * t) - (m_tok * m_tok).mean(axis=-1)
    tot = m_tok.sum(axis=-1)
    off = ((q - s2) / n - tot * tot + (m_tok * m_tok).sum(axis=-1)) / (t * (t - 1.0))
    return mean, var, off / var


def _estimate(stats, t):
    """Pooled estimate and jackknife SE from per-replicate statistics (arrays with leading axis S)."""
    tot = [a.sum(axis=0) for a in stats]
    est = _pooled(*tot, t)
    loo = _pooled(*[tt[None] - a for tt, a in zip(tot, stats)], t)
    s = stats[0].shape[0]
    se = [math.sqrt((s - 1.0) / s * float(((x - x.mean()) ** 2).sum())) for x in loo]
    return [float(e) for e in est], se


_CHUNK_ELEMENTS = 2_000_000


def simulate(name, mu=0.0, var=1.0, r=0.0, *, var_g=1.0, r_g=0.0, width=256, tokens=16, seeds=32,
             seed=0, **params) -> SimulationResult:
    """Monte Carlo of component ``name`` in numpy (seeded), measuring the five moments.

    Each of ``seeds`` independent replicates draws ``x`` (``tokens × width``, columns i.i.d.
    ``N(μ1, σ²[(1 − r)I + r11ᵀ])``), fresh weights/masks, and an independent upstream gradient ``g``
    (mean 0, variance ``var_g``, token correlation ``r_g``); runs the component forward and
    backpropagates ``g`` by hand. Moments are pooled over features and replicates (module
    docstring); standard errors are a jackknife over replicates. Replicate ``i`` depends only on
    ``(seed, i)``. ``width`` is the input width (``d_in`` of linear/attention, ``d`` of layernorm);
    ``tokens`` is ``T``. Formula-only options (``exact``, ``finite_width``, ``form``) are ignored.
    """
    comp = _component(name)
    t = int(_count("tokens", tokens, 2))
    d = int(_count("width", width, 2 if name != "layernorm" else 4))
    s = int(_count("seeds", seeds, 2))
    _count("seed", seed, 0)
    mu_a, var_a = float(_real("mu", mu)), float(_variance("var", var))
    r_a, vg_a, rg_a = float(_correlation("r", r)), float(_variance("var_g", var_g)), float(_correlation("r_g", r_g))
    for fld, rr in (("r", r_a), ("r_g", rg_a)):
        if rr < -1.0 / (t - 1.0):
            raise SpecError(fld, rr, f"an equicorrelation of {t} tokens must be >= -1/(T-1) = {-1 / (t - 1):.4g}")
    q = _resolve(comp, params, width=d, tokens=t)
    # check the parameters through the formula (one place for their validation)
    comp.forward(0.0 if name in ("relu", "gelu", "attention") else mu_a, var_a, r_a, **q)
    comp.backward(vg_a, rg_a, mu=mu_a, var=var_a, r=r_a, **q)
    d_out = int(comp.out_width(d, q))

    gens = [np.random.default_rng(c) for c in np.random.SeedSequence(int(seed)).spawn(s)]
    fwd, bwd = [], []
    batch: list = []

    def flush():
        x = np.stack([b[0] for b in batch])
        g = np.stack([b[1] for b in batch])
        rand = {k: np.stack([b[2][k] for b in batch]) for k in batch[0][2]}
        y, gx = comp.run(x, g, rand, q)
        fwd.append(_sums(y))
        bwd.append(_sums(gx))
        batch.clear()

    per = t * (2 * d + 2 * d_out) + (t * t * 4 if name == "attention" else 0) + 3 * d * d_out
    size = max(1, _CHUNK_ELEMENTS // per)
    for rng in gens:
        x = _equicorrelated(rng, t, d, var_a, r_a, mu_a)
        rand = comp.draw(rng, t, d, q) if comp.draw is not None else {}
        g = _equicorrelated(rng, t, d_out, vg_a, rg_a)
        batch.append((x, g, rand))
        if len(batch) >= size:
            flush()
    if batch:
        flush()
    f_stats = [np.concatenate([b[i] for b in fwd]) for i in range(4)]
    b_stats = [np.concatenate([b[i] for b in bwd]) for i in range(4)]
    (m, v, rr), (sm, sv, sr) = _estimate(f_stats, t)
    (_, vg, rg), (_, svg, srg) = _estimate(b_stats, t)
    settings = {"mu": mu_a, "var": var_a, "r": r_a, "var_g": vg_a, "r_g": rg_a, "width": d,
                "tokens": t, "seeds": s, "seed": int(seed), **{k: v for k, v in q.items()
                                                             if k not in comp.options}}
    return SimulationResult(name, Moments(m, v, rr, vg, rg), Moments(sm, sv, sr, svg, srg), settings)


# --- comparison ----------------------------------------------------------------------------------

def moment_errors(formula: Moments, sim: Moments, stderr: Moments | None = None):
    """Normalised errors ``|formula − simulation|/scale`` per moment, and the standard error of the
    simulation in the same units (``None`` if ``stderr`` is not given).

    Scales (chosen so an error is well defined when a moment is 0, as in Kedia's ``calc_err``):
    ``var``, ``var_g`` — relative to the simulated value; ``mu`` — relative to
    ``max(|μ'_sim|, σ'_sim)`` (the output's natural scale); ``r``, ``r_g`` — absolute (a correlation
    is already dimensionless; this equals Kedia's covariance error divided by the variance).
    """
    mu, var, var_g = float(sim.mu), float(sim.var), float(sim.var_g)   # one point: scalar moments
    scale = [max(abs(mu), math.sqrt(max(var, 0.0))), abs(var), 1.0, abs(var_g), 1.0]
    err = Moments(*[abs(float(f) - float(s)) / c for f, s, c in zip(formula, sim, scale)])
    se = None if stderr is None else Moments(*[float(e) / c for e, c in zip(stderr, scale)])
    return err, se


@dataclass(frozen=True)
class Comparison:
    """Formula against simulation at one point: values, normalised errors, their SEs and z-scores
    (``z = (formula − simulation)/SE``, signed)."""

    point: Mapping
    formula: Moments
    simulation: SimulationResult
    error: Moments
    stderr: Moments
    z: Moments


def compare(name, mu=0.0, var=1.0, r=0.0, *, var_g=1.0, r_g=0.0, width=256, tokens=16, seeds=32, seed=0,
            **params) -> Comparison:
    """Run :func:`simulate` and :func:`predict` at one point and compare them (:func:`moment_errors`).

    Formula options (``exact``, ``finite_width``, ``form``) go to the formula only. ``width`` and
    ``tokens`` are passed to the formula as ``d_in``/``width`` and ``tokens`` where it has them.
    """
    comp = _component(name)
    sim_params = {k: v for k, v in params.items() if k not in comp.options}
    sim = simulate(name, mu, var, r, var_g=var_g, r_g=r_g, width=width, tokens=tokens, seeds=seeds,
                   seed=seed, **sim_params)
    q = {k: v for k, v in sim.settings.items() if k in comp.params}
    q.update({k: v for k, v in params.items() if k in comp.options})
    values = [float(x) for x in predict(name, mu, var, r, var_g=var_g, r_g=r_g, **q)]
    f = Moments(*values)
    err, se = moment_errors(f, sim.value, sim.stderr)
    # an SE at round-off level (e.g. LayerNorm's σ'² = 1 exactly) gets a floor of 1e-10 relative
    z = Moments(*[(a - b) / max(e, 1e-10 * max(abs(a), abs(b), 1e-300))
                  for a, b, e in zip(values, map(float, sim.value), map(float, sim.stderr))])
    point = {"mu": mu, "var": var, "r": r, "var_g": var_g, "r_g": r_g, "width": width, "tokens": tokens,
             **params}
    return Comparison(point, f, sim, err, se, z)
