"""DKS and TAT: the transformed activation ``φ̂(x) = γ(φ(αx + β) + δ)`` solved for kernel-shape targets.

docs/dks.md states the conditions and sources. With ``z ~ N(0, 1)`` (input ``q = 1``) the local maps
of ``φ̂`` at the points the conditions use are (Price's theorem, Stein's lemma):

    Q(1) = E[φ̂(z)²],           Q'(1) = E[φ̂(z) φ̂'(z) z],
    C(0) = E[φ̂(z)]² / Q(1),     C'(1) = E[φ̂'(z)²] / Q(1),     C''(1) = E[φ̂''(z)²] / Q(1),

``φ̂'(x) = γα φ'(αx + β)``, ``φ̂''(x) = γα² φ''(αx + β)``, evaluated by Gauss–Hermite quadrature
(4096 nodes, of which the ~400 with non-negligible weight are used; the error estimate is the
difference from 2048 nodes).

- DKS (Martens et al. 2021, arXiv:2110.01765): ``Q(1) = 1``, ``Q'(1) = 1``, ``C(0) = 0`` and
  ``C'(1) = ξ``, with ``C'_net(1) = ζ`` spread over the ``D`` nonlinear layers of a chain:
  ``ξ = ζ^(1/D)``. ``δ`` and ``γ`` follow from ``C(0) = 0``, ``Q(1) = 1``; ``(α, β)`` solve the rest.
- TAT for smooth φ (Zhang et al. 2022, ICLR, openreview U0k7XNTiFEq): ``Q(1) = 1``, ``Q'(1) = 1``,
  ``C'(1) = 1`` and ``C''(1) = τ/D`` (with unit slopes the curvatures of a chain add:
  ``C''_net(1) = D C''(1) = τ``). ``γ`` follows from ``Q(1) = 1``; ``(α, β, δ)`` solve the rest.
- TAT for leaky ReLU (Zhang et al. 2022): ``φ̂ = sqrt(2/(1 + s²)) leaky_relu_s``, the negative
  slope ``s`` with ``C_net(0) = η``; ``η = 0`` is the linear network, ``s = 1``.

Defaults ζ = 1.5, τ = 0.3, η = 0.9 are those of the reference implementation of the two papers
(github.com/google-deepmind/dks). Roots are found with ``scipy.optimize.root`` (hybr) from a fixed
list of starting points, then seeded random ones, and accepted when every residual is ≤ 1e-12 and
the quadrature error estimate ≤ 1e-10. The transform is normalised to ``α > 0`` (``φ̂(−x)`` has the
same kernels) and, for an odd φ, to ``β ≥ 0`` (so has ``−φ̂(−x)``). For TAT, roots with ``αγ ≥ 2``
are passed over, as in the reference implementation (such roots were observed there to have
unstable Q maps).
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize
from scipy.special import expit

from ..errors import NumericalError, SpecError
from ..kernel import activations as _acts
from ..kernel.quadrature import hermite_rule
from ..layers.activation import Activation

__all__ = ["Transform", "local_maps", "dks_transform", "tat_transform", "tat_leaky_relu", "leaky_relu_c_map",
           "SECOND_DERIVATIVES"]

_NODES = 4096
_SOLVE_TOL = 1e-12      # accepted |residual| of a root
_TRIES = 60
_KINKED = ("relu", "leaky_relu", "abs")


def _d2_tanh(x):
    t = np.tanh(x)
    return -2.0 * t * (1.0 - t * t)


def _d2_softplus(x):
    s = expit(x)
    return s * (1.0 - s)


def _d2_silu(x):
    s = expit(x)
    return s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))


def _d2_gelu(x):
    return (2.0 - x * x) * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _d2_erf(x, a=1.0):
    return -(4.0 * a ** 3 / math.sqrt(math.pi)) * x * np.exp(-(a * x) ** 2)


def _d2_zero(x):
    return np.zeros_like(np.asarray(x, dtype=np.float64))


SECOND_DERIVATIVES: dict[str, Callable] = {
    "identity": _d2_zero, "tanh": _d2_tanh, "softplus": _d2_softplus, "silu": _d2_silu, "gelu": _d2_gelu,
    "erf": _d2_erf,
}
"""φ'' of the registered smooth activations (TAT's curvature condition needs it)."""


@dataclass(frozen=True)
class Transform:
    """A solved ``φ̂(x) = γ(φ(αx + β) + δ)``: parameters, targets, achieved values and residuals.

    ``targets``/``achieved``/``residuals`` are keyed by condition (``"Q(1)"``, ``"Q'(1)"``, ``"C(0)"``,
    ``"C'(1)"``, ``"C''(1)"`` for one layer, ``"C'_net(1)"``, ``"C''_net(1)"``, ``"C_net(0)"`` for the
    chain); ``achieved`` also lists the local values no condition fixes. ``quad_error`` bounds the
    quadrature error of the achieved values.
    """

    method: str
    name: Any
    params: Mapping
    alpha: float
    beta: float
    gamma: float
    delta: float
    depth: int | None
    targets: Mapping[str, float]
    achieved: Mapping[str, float]
    residuals: Mapping[str, float]
    quad_error: float
    derivative: Callable | None = field(default=None, repr=False)

    @property
    def parameters(self) -> tuple[float, float, float, float]:
        """``(α, β, γ, δ)``."""
        return self.alpha, self.beta, self.gamma, self.delta

    def activation(self) -> Activation:
        """The engine's :class:`~kernelprop.layers.Activation` layer for ``φ̂``."""
        return Activation(self.name, dict(self.params), scale=self.gamma, input_scale=self.alpha,
                          input_shift=self.beta, offset=self.delta, derivative=self.derivative)

    def __call__(self, x):
        """``φ̂(x)``."""
        phi = self.activation().pointwise()
        return self.gamma * (phi(self.alpha * np.asarray(x, dtype=np.float64) + self.beta) + self.delta)


# --- the local maps ---------------------------------------------------------------------------

class _Phi:
    """φ, φ', φ'' of a registered activation or a callable (validated through the Activation layer)."""

    def __init__(self, phi, params, derivative, second_derivative, method):
        if isinstance(phi, str) and phi in _KINKED and method != "local_maps":
            hint = ("use tat_transform('leaky_relu', depth, eta=…) (TAT for leaky ReLU)" if phi != "abs"
                    else "choose a smooth activation")
            raise SpecError("phi", phi, f"is not smooth (a kink at 0): the {method} solver here is for smooth "
                            f"activations; {hint}")
        if isinstance(phi, str) and phi == "identity" and method != "local_maps":
            raise SpecError("phi", phi, "is linear: C'(1) = 1 and C''(1) = 0 whatever α, β, γ, δ, so no "
                            f"{method} target other than the linear network can be met")
        layer = Activation(phi, dict(params or {}), derivative=derivative)
        self.label = layer.label
        self.f = layer.pointwise()
        if callable(phi) and not isinstance(phi, str) and derivative is None:
            raise SpecError("derivative", None, f"{method} needs φ' of a callable activation: pass "
                            "derivative=<vectorised φ'>")
        self.df = layer.derivative_fn()
        self.smooth = not (isinstance(phi, str) and phi in _KINKED)
        self.d2f: Callable | None = None
        if second_derivative is not None:
            if not callable(second_derivative):
                raise SpecError("second_derivative", second_derivative, "must be a vectorised callable φ''")
            full = dict(layer.params)
            self.d2f = (lambda x: second_derivative(x, **full)) if full else second_derivative
        elif isinstance(phi, str) and phi in SECOND_DERIVATIVES:
            full = {**_acts.ACTIVATIONS[phi].params, **{k: float(v) for k, v in layer.params.items()}}
            d2 = SECOND_DERIVATIVES[phi]
            self.d2f = (lambda x: d2(x, **full)) if full else d2

    def second(self, u):
        """φ''(u): the given one, or a 4th-order central difference of φ' (step 1e-3, error ~1e-12)."""
        if self.d2f is not None:
            return np.asarray(self.d2f(u), dtype=np.float64)
        h = 1e-3
        df = self.df
        return (8.0 * (df(u + h) - df(u - h)) - (df(u + 2 * h) - df(u - 2 * h))) / (12.0 * h)


def _raw(phi: _Phi, a, b, d, nodes, curvature):
    """Gaussian moments of ``φ(αz + β) + δ`` (δ = −E[φ(αz + β)] when ``d`` is None) on one rule."""
    z, w = hermite_rule(nodes)
    u = a * z + b
    f = np.asarray(phi.f(u), dtype=np.float64)
    if d is None:
        d = -float(w @ f)
    f = f + d
    df = np.asarray(phi.df(u), dtype=np.float64)
    out = {"delta": d, "m": float(w @ f), "ff": float(w @ (f * f)), "ffz": float(w @ (f * df * z)),
           "dd": float(w @ (df * df))}
    if curvature:
        d2 = phi.second(u)
        out["d2"] = float(w @ (d2 * d2))
    return out


def _maps(raw, a):
    """Local maps of ``γ(φ(αz + β) + δ)`` with ``γ = 1/sqrt(E[(φ + δ)²])`` (so Q(1) = 1) from raw moments."""
    ff = raw["ff"]
    if not ff > 0 or not math.isfinite(ff):
        return None
    gamma = 1.0 / math.sqrt(ff)
    out = {"gamma": gamma, "delta": raw["delta"], "Q(1)": 1.0, "Q'(1)": a * raw["ffz"] / ff,
           "C(0)": raw["m"] ** 2 / ff, "C'(1)": a * a * raw["dd"] / ff}
    if "d2" in raw:
        out["C''(1)"] = a ** 4 * raw["d2"] / ff
    return out


def local_maps(phi, alpha: float = 1.0, beta: float = 0.0, gamma: float = 1.0, delta: float = 0.0, *,
               params=None, derivative=None, second_derivative=None) -> tuple[dict, float]:
    """``Q(1), Q'(1), C(0), C'(1)`` and, when φ'' is known (registered, ``second_derivative=``, or a central
    difference of ``derivative``), ``C''(1)`` of ``γ(φ(αx + β) + δ)`` at input ``q = 1`` (module docstring),
    with an error estimate (4096- against 2048-node Gauss–Hermite; reliable for smooth φ only)."""
    p = _Phi(phi, params, derivative, second_derivative, "local_maps")
    f, df = p.f, p.df
    second = p.second if p.smooth else None
    vals = []
    for n in (_NODES, _NODES // 2):
        z, w = hermite_rule(n)
        u = alpha * z + beta
        v = gamma * (np.asarray(f(u), dtype=np.float64) + delta)
        dv = gamma * alpha * np.asarray(df(u), dtype=np.float64)
        q = float(w @ (v * v))
        if not q > 0:
            raise NumericalError(f"local maps of {p.label!r}", "φ̂ is zero on the Gaussian (Q(1) = 0)",
                                 "choose α, β, γ, δ with a non-constant or non-zero φ̂")
        row = [q, float(w @ (v * dv * z)), float(w @ v) ** 2 / q, float(w @ (dv * dv)) / q]
        if second is not None:
            d2 = gamma * alpha * alpha * second(u)
            row.append(float(w @ (d2 * d2)) / q)
        vals.append(np.array(row))
    names = ("Q(1)", "Q'(1)", "C(0)", "C'(1)", "C''(1)")
    return dict(zip(names, map(float, vals[0]))), float(np.max(np.abs(vals[0] - vals[1])))


# --- validation -------------------------------------------------------------------------------

def _check_depth(depth) -> int:
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 1:
        raise SpecError("depth", depth, "must be a whole number >= 1 (the nonlinear layers of the chain)")
    return int(depth)


def _check_real(name, v, ok, allowed):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) or not ok(float(v)):
        raise SpecError(name, v, allowed)
    return float(v)


# --- the solver -------------------------------------------------------------------------------

_RESOLVED = 1e-10   # largest accepted quadrature error estimate of a solution's local maps


def _starts(names, seed=0):
    """Fixed starting points, then seeded random ones (the same on every run)."""
    fixed = {"alpha": (1.0, 0.1), "beta": (0.0, 1.0, -1.0), "delta": (0.0, 1.0, -1.0)}
    low = {"alpha": 0.0, "beta": -3.0, "delta": -3.0}
    high = {"alpha": 2.0, "beta": 3.0, "delta": 3.0}
    pts = list(itertools.product(*(fixed[n] for n in names)))
    rng = np.random.default_rng(seed)
    while len(pts) < _TRIES:
        pts.append(tuple(rng.uniform(low[n], high[n]) for n in names))
    return pts


def _measure(phi: _Phi, x, curvature):
    """``(maps, error estimate)`` at ``x = (α, β[, δ])`` (δ = −E[φ(αz + β)] when not given), or ``(None, inf)``."""
    a, b = float(x[0]), float(x[1])
    d = float(x[2]) if len(x) > 2 else None
    with np.errstate(all="ignore"):
        raw = _raw(phi, a, b, d, _NODES, curvature)
        fine = _maps(raw, a)
        coarse = _maps(_raw(phi, a, b, raw["delta"], _NODES // 2, curvature), a)
    if fine is None or coarse is None:
        return None, math.inf
    err = max(abs(fine[k] - coarse[k]) for k in fine if k not in ("gamma", "delta"))
    return fine, (err if math.isfinite(err) else math.inf)


def _solve(phi: _Phi, residual, names, curvature, accept=lambda x, maps: True):
    """The first root (|r| ≤ 1e-12, quadrature error ≤ 1e-10, ``accept``-ed) from the starting points.

    Returns ``(x, None)``, or ``(None, (x, err))`` with the best root the quadrature does not resolve."""
    unresolved = None
    for x0 in _starts(names):
        with np.errstate(all="ignore"):
            try:
                sol = optimize.root(residual, np.asarray(x0, dtype=float), method="hybr", options={"xtol": 1e-14})
            except (ValueError, FloatingPointError, ZeroDivisionError):
                continue
        r = np.asarray(sol.fun, dtype=float)
        if not (np.all(np.isfinite(r)) and np.all(np.isfinite(sol.x))) or np.max(np.abs(r)) > _SOLVE_TOL:
            continue
        if sol.x[0] == 0.0:
            continue
        maps, err = _measure(phi, sol.x, curvature)
        if maps is None or not accept(sol.x, maps):
            continue
        if err <= _RESOLVED:
            return sol.x, None
        if unresolved is None or err < unresolved[1]:
            unresolved = (sol.x, err)
    return None, unresolved


def _penalised(fn, size):
    """``fn`` with non-finite or undefined values (a constant φ̂) replaced by a large residual."""
    def wrapped(x):
        with np.errstate(all="ignore"):
            out = fn(x)
        if out is None or not np.all(np.isfinite(out)):
            return np.full(size, 1e6)
        return out
    return wrapped


def _maximum(phi: _Phi, objective: str, constraints: dict, names, curvature, accept=lambda x, maps: True,
             bound: Callable | None = None):
    """The largest ``objective`` found subject to ``constraints`` among points the quadrature resolves
    (SLSQP from a few starts, ``0 < α ≤ 10``, ``|β|, |δ| ≤ 10``, and ``bound(x, maps) ≥ 0`` if given): a
    lower bound on what φ reaches, reported when a target is out of reach."""
    def value(x, key):
        m, _ = _measure(phi, x, curvature)
        return np.nan if m is None else m[key]
    best: tuple[float, Any] = (-math.inf, None)
    bounds = [(1e-3, 10.0), (-10.0, 10.0), (-10.0, 10.0)][:len(names)]
    cons = [{"type": "eq", "fun": (lambda x, k=k, t=t: value(x, k) - t)} for k, t in constraints.items()]
    if bound is not None:   # an inequality g(x, maps) >= 0
        cons.append({"type": "ineq", "fun": lambda x: (lambda m: np.nan if m is None else bound(x, m))(
            _measure(phi, x, curvature)[0])})
    for x0 in _starts(names)[:12]:
        with np.errstate(all="ignore"):
            try:
                res = optimize.minimize(lambda x: -value(x, objective), np.asarray(x0, dtype=float), method="SLSQP",
                                        bounds=bounds, constraints=cons, options={"maxiter": 300, "ftol": 1e-12})
            except (ValueError, FloatingPointError, ZeroDivisionError):
                continue
        if not np.all(np.isfinite(res.x)):
            continue
        m, err = _measure(phi, res.x, curvature)
        if m is None or err > 1e-8 or any(abs(m[k] - t) > 1e-8 for k, t in constraints.items()):
            continue
        if accept(res.x, m) and m[objective] > best[0]:
            best = (m[objective], res.x)
    return best


def _canonical(phi: _Phi, x):
    """``α > 0`` (``φ̂(−x)`` has the same kernels); for an odd φ also ``β ≥ 0`` (``−φ̂(−x)`` has them too)."""
    x = np.array(x, dtype=float)
    x[0] = abs(x[0])
    if x[1] < 0:
        u = np.linspace(-6.0, 6.0, 61)
        f = np.asarray(phi.f(u), dtype=np.float64)
        if np.allclose(f[::-1], -f, rtol=1e-14, atol=1e-14):
            x[1:] = -x[1:]
    return x


def _finish(method, phi: _Phi, name, params, derivative, x, depth, targets, net, curvature):
    """Normalise, re-measure and package a :class:`Transform`."""
    x = _canonical(phi, x)
    maps, err = _measure(phi, x, curvature)
    if maps is None:
        raise NumericalError(f"{method} transform of {phi.label!r}", "the solved φ̂ is constant", "try another target")
    gamma, delta = maps.pop("gamma"), maps.pop("delta")
    achieved = dict(maps)
    for key, (local, fn) in net.items():
        achieved[key] = fn(maps[local])
    residuals = {k: achieved[k] - t for k, t in targets.items()}
    return Transform(method, name, dict(params or {}), float(x[0]), float(x[1]), gamma, delta, depth, dict(targets),
                     achieved, residuals, float(err), derivative)


def _chain_or_local(depth, local, local_name, network_value):
    """``(depth or None, local target)`` from a chain depth or an explicit per-layer target."""
    if local is not None:
        if depth is not None:
            raise SpecError(local_name, local, "give either depth (a chain of nonlinear layers) or the per-layer "
                            f"target {local_name}, not both")
        return None, local
    if depth is None:
        raise SpecError("depth", None, f"give the depth (the chain's nonlinear layers) or {local_name}")
    depth = _check_depth(depth)
    return depth, network_value(depth)


def _unresolved(unresolved, names) -> str:
    if unresolved is None:
        return ""
    x, err = unresolved
    at = ", ".join(f"{n} = {v:.4g}" for n, v in zip(names, x))
    return (f"; a root at {at} is not resolved by the Gauss–Hermite quadrature (error estimate {err:.2g}): "
            "φ(αx + β) is too sharp or not smooth there (this solver is for smooth φ)")


def dks_transform(phi, depth: int | None = None, zeta: float = 1.5, *, params=None, derivative=None,
                  local_slope: float | None = None, q_slope: float = 1.0) -> Transform:
    """DKS (Martens et al. 2021): ``(α, β, γ, δ)`` with ``Q(1) = 1``, ``Q'(1) = q_slope`` (1 in the paper),
    ``C(0) = 0`` and ``C'(1) = ζ^(1/depth)`` (so ``C'_net(1) = ζ`` for a chain of ``depth`` layers).

    ``phi``: a registered smooth activation or a vectorised callable with ``derivative=``.
    ``local_slope`` replaces ``depth, zeta`` by the per-layer target ``C'(1)`` (e.g. from DKS's maximal
    slope function of another architecture). An out-of-reach target raises :class:`SpecError` with the
    largest slope found for φ.
    """
    zeta = _check_real("zeta", zeta, lambda v: v > 1.0, "the target C'_net(1) must be a finite number > 1 "
                       "(ζ = 1 is the linear network; ζ < 1 is unreachable: with C(0) = 0 and Q(1) = 1, "
                       "C'(1) = Σ k a_k² ≥ Σ a_k² = 1 over the Hermite coefficients a_k of φ̂)")
    q_slope = _check_real("q_slope", q_slope, lambda v: v > 0.0, "the target Q'(1) must be a finite number > 0")
    if local_slope is not None:
        local_slope = _check_real("local_slope", local_slope, lambda v: v > 1.0,
                                  "the per-layer target C'(1) must be a finite number > 1")
    depth, xi = _chain_or_local(depth, local_slope, "local_slope", lambda d: zeta ** (1.0 / d))
    p = _Phi(phi, params, derivative, None, "DKS")

    def residual(x):
        m = _maps(_raw(p, x[0], x[1], None, _NODES, False), x[0])
        return None if m is None else np.array([m["Q'(1)"] - q_slope, m["C'(1)"] - xi])
    x, unresolved = _solve(p, _penalised(residual, 2), ("alpha", "beta"), False)
    if x is None:
        top, at = _maximum(p, "C'(1)", {"Q'(1)": q_slope}, ("alpha", "beta"), False)
        if at is None or top <= 1.0 + 1e-9:
            reach = f"no (α, β) with Q'(1) = {q_slope:g}, C(0) = 0 was found"
        else:
            reach = (f"the largest C'(1) found with Q'(1) = {q_slope:g}, C(0) = 0 is {top:.6g} (at α = {at[0]:.4g}, "
                     f"β = {at[1]:.4g}; a lower bound on what φ reaches, searched over α ≤ 10, |β| ≤ 10)")
            if depth is not None:
                reach += (f": ζ up to {top ** depth:.6g} is reachable at depth {depth}, and ζ = {zeta:g} at depth "
                          f">= {math.ceil(math.log(zeta) / math.log(top))}")
        field_name, value = ("zeta", zeta) if local_slope is None else ("local_slope", xi)
        raise SpecError(field_name, value, f"is out of reach for {p.label!r}: the per-layer target is C'(1) = "
                        f"{xi:.6g}, but {reach}{_unresolved(unresolved, ('α', 'β'))}")
    targets = {"Q(1)": 1.0, "Q'(1)": q_slope, "C(0)": 0.0, "C'(1)": xi}
    net = {}
    if depth is not None:
        targets["C'_net(1)"] = zeta
        net["C'_net(1)"] = ("C'(1)", lambda v, n=depth: v ** n)
    return _finish("dks", p, phi, params, derivative, x, depth, targets, net, False)


def tat_transform(phi, depth: int | None = None, tau: float = 0.3, *, eta: float = 0.9, params=None,
                  derivative=None, second_derivative=None, local_curvature: float | None = None) -> Transform:
    """TAT (Zhang et al. 2022). For ``phi = "leaky_relu"``: the negative slope with ``C_net(0) = η`` over
    ``depth`` layers (:func:`tat_leaky_relu`). For a smooth φ: ``(α, β, γ, δ)`` with ``Q(1) = 1``,
    ``Q'(1) = 1``, ``C'(1) = 1`` and ``C''(1) = τ/depth`` (``C''_net(1) = τ`` for the chain), or
    ``C''(1) = local_curvature``. φ'' comes from the registry, ``second_derivative=``, or a central
    difference of ``derivative``.
    """
    if isinstance(phi, str) and phi == "leaky_relu":
        if params:
            raise SpecError("params", params, "TAT solves for the leaky ReLU's slope: give no params")
        slope, scale = tat_leaky_relu(depth, eta)  # type: ignore[arg-type]
        depth = int(depth)  # type: ignore[arg-type]
        q1 = scale * scale * (1.0 + slope * slope) / 2.0     # γ² E[leaky_s(z)²]
        d1 = scale * scale * (1.0 + slope * slope) / 2.0     # γ² E[leaky_s'(z)²]: φ' is 1 or s, each w.p. 1/2
        targets = {"Q(1)": 1.0, "C_net(0)": float(eta)}
        achieved = {"Q(1)": q1, "C'(1)": d1 / q1, "C(0)": float(leaky_relu_c_map(0.0, slope)),
                    "C_net(0)": _leaky_c_net0(slope, depth)}
        return Transform("tat", "leaky_relu", {"slope": slope}, 1.0, 0.0, scale, 0.0, depth, targets, achieved,
                         {k: achieved[k] - t for k, t in targets.items()}, 0.0)
    tau = _check_real("tau", tau, lambda v: v > 0.0, "the target C''_net(1) must be a finite number > 0 (τ = 0 "
                      "is the linear network: Activation('identity'), or tat_transform('leaky_relu', eta=0))")
    if local_curvature is not None:
        local_curvature = _check_real("local_curvature", local_curvature, lambda v: v > 0.0,
                                      "the per-layer target C''(1) must be a finite number > 0")
    depth, kappa = _chain_or_local(depth, local_curvature, "local_curvature", lambda d: tau / d)
    p = _Phi(phi, params, derivative, second_derivative, "TAT")

    def residual(x):
        m = _maps(_raw(p, x[0], x[1], x[2], _NODES, True), x[0])
        return None if m is None else np.array([m["Q'(1)"] - 1.0, m["C'(1)"] - 1.0, m["C''(1)"] - kappa])

    def stable(x, maps):
        return abs(x[0]) * maps["gamma"] < 2.0
    x, unresolved = _solve(p, _penalised(residual, 3), ("alpha", "beta", "delta"), True, stable)
    if x is None:
        top, at = _maximum(p, "C''(1)", {"Q'(1)": 1.0, "C'(1)": 1.0}, ("alpha", "beta", "delta"), True, stable,
                           lambda x, m: 2.0 - abs(x[0]) * m["gamma"])
        if at is None or top <= 1e-9:
            reach = "no (α, β, δ) with Q'(1) = C'(1) = 1 and αγ < 2 was found"
        else:
            reach = (f"the largest C''(1) found with Q'(1) = C'(1) = 1 and αγ < 2 is {top:.6g} (a lower bound on "
                     "what φ reaches, searched over α ≤ 10, |β|, |δ| ≤ 10)")
            if depth is not None:
                reach += (f": τ up to {top * depth:.6g} is reachable at depth {depth}, and τ = {tau:g} at depth "
                          f">= {math.ceil(tau / top)}")
        field_name, value = ("tau", tau) if local_curvature is None else ("local_curvature", kappa)
        raise SpecError(field_name, value, f"is out of reach for {p.label!r}: the per-layer target is C''(1) = "
                        f"{kappa:.6g}, but {reach} (roots with αγ >= 2 are passed over, as in Zhang et al.'s "
                        f"reference implementation){_unresolved(unresolved, ('α', 'β', 'δ'))}")
    targets = {"Q(1)": 1.0, "Q'(1)": 1.0, "C'(1)": 1.0, "C''(1)": kappa}
    net = {}
    if depth is not None:
        targets["C''_net(1)"] = tau
        net["C''_net(1)"] = ("C''(1)", lambda v, n=depth: n * v)
    return _finish("tat", p, phi, params, derivative, x, depth, targets, net, True)


# --- TAT leaky ReLU -----------------------------------------------------------------------------

def leaky_relu_c_map(c, slope: float):
    """C-map of ``sqrt(2/(1 + s²)) leaky_relu_s`` (Zhang et al. 2022, from Cho & Saul's arc-cosine kernel):
    ``C(c) = (2sc + (1 − s)² (sqrt(1 − c²) + (π − arccos c) c)/π) / (1 + s²)``."""
    c = np.clip(np.asarray(c, dtype=np.float64), -1.0, 1.0)
    s = float(slope)
    j1 = np.sqrt(np.maximum(1.0 - c * c, 0.0)) + (math.pi - np.arccos(c)) * c
    return (2.0 * s * c + (1.0 - s) ** 2 * j1 / math.pi) / (1.0 + s * s)


def _leaky_c_net0(slope: float, depth: int) -> float:
    c = 0.0
    for _ in range(depth):
        c = float(leaky_relu_c_map(c, slope))
    return c


def tat_leaky_relu(depth: int, eta: float = 0.9) -> tuple[float, float]:
    """TAT leaky ReLU (Zhang et al. 2022): the negative slope ``s ∈ [0, 1]`` with ``C_net(0) = η`` for a chain
    of ``depth`` layers of ``sqrt(2/(1 + s²)) leaky_relu_s`` (unit second moment, so q is preserved);
    returns ``(s, sqrt(2/(1 + s²)))``. ``η = 0`` gives ``s = 1``, the identity (linear network)."""
    depth = _check_depth(depth)
    eta = _check_real("eta", eta, lambda v: 0.0 <= v < 1.0, "the target C_net(0) must lie in [0, 1)")
    if eta == 0.0:
        return 1.0, 1.0
    reach = _leaky_c_net0(0.0, depth)
    if reach < eta:
        raise SpecError("eta", eta, f"is out of reach at depth {depth}: even ReLU (slope 0) gives C_net(0) = "
                        f"{reach:.6g}; reachable: eta in [0, {reach:.6g}]; lower eta or raise the depth")
    if reach == eta:
        s = 0.0
    else:
        s = optimize.brentq(lambda x: _leaky_c_net0(x, depth) - eta, 0.0, 1.0, xtol=1e-15, rtol=4 * np.finfo(float).eps)
    return float(s), float(math.sqrt(2.0 / (1.0 + s * s)))
