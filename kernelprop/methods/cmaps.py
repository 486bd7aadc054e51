"""C-maps of token-wise blocks and their derivatives; TAT leaky ReLU (DKS: Martens et al. 2021; TAT: Zhang et al. 2022).

The C-map of a block sends the cosine ``c`` of two inputs with squared norm ``q`` to the cosine of
its outputs: ``C(c) = Σ'_12 / sqrt(Σ'_11 Σ'_22)`` for ``Σ = q[[1, c], [c, 1]]`` (docs/theory.md §8). It is
computed with the numeric engine's own maps, so any token-wise block (Dense, activations,
normalisation, dropout, residual and parallel sums of those) has one; attention mixes tokens and
has none (use :func:`kernelprop.propagate`).

Derivatives (:func:`c_map_derivatives`) need no finite differences: a token-wise map leaves the
variances alone as c moves, so ``dΣ'_12/dc`` is carried through the block as a jet (first and
second derivative of the off-diagonal): Dense ``σ_w²``, Scale ``c²``, dropout 1, LayerNorm/RMSNorm
``g²/(s_1 s_2)``, an activation by Price's theorem ``d/ds E[φ(u)φ(v)] = E[φ'(u)φ'(v)]``,
``d²/ds² = E[φ''(u)φ''(v)]``, residual and parallel sums linearly with their cross terms
``P_a Σ̇ P_bᵀ``. The q-map slope ``Q'(q)`` is a jet of one token along q: an activation by Stein's
lemma ``d/da E[φ(u)²] = E[u φ(u) φ'(u)]/a`` (and ``d/da E φ(u) = E[u φ'(u)]/(2a)`` for its mean),
normalisations, means and cross terms by the product rule. Each value carries an error bound from
the quadrature errors of the expectations used (first order).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize

from ..errors import NotSupportedError, NumericalError, SpecError
from ..kernel import activations as A
from ..kernel import quadrature as Q
from ..kernel.maps import Context, apply
from ..kernel.state import KernelState
from ..layers.composite import branch_input, combine
from ..network import layers as L
from ..network.layers import walk

__all__ = ["Slopes", "c_map", "q_map", "c_map_slope", "c_map_derivatives", "network_c_map", "tat_leaky_relu"]

_EPS = float(np.finfo(np.float64).eps)
_ONE = 1.0 - 16.0 * _EPS  # a cosine at least this is c = 1 (as the engine's maps take it)
_ROUND = float(64.0 * _EPS)  # round-off allowance of a jet, relative


def _block(block) -> L.Serial:
    block = block if isinstance(block, L.Layer) else L.Serial(*block)
    for path, layer in walk(block):
        if isinstance(layer, L.Attention):
            raise NotSupportedError(f"C-maps are for token-wise blocks; {path} is attention, which mixes tokens")
    return block


def _resolved(block, env):
    return _block(block).resolve(env or {"L": 1.0, "l": 1.0})


def _check_q(q) -> float:
    if isinstance(q, bool) or not isinstance(q, (int, float, np.integer, np.floating)) or not (0 < q < math.inf):
        raise SpecError("q", q, "the input squared norm must be a finite number > 0")
    return float(q)


def _pair(q: float, c: float) -> KernelState:
    return KernelState(q * np.array([[1.0, c], [c, 1.0]]), np.zeros(2), (1, 1))


def _cosine(sig: np.ndarray, err: float) -> tuple[float, float]:
    """``Σ_12/sqrt(Σ_11 Σ_22)`` and its first-order error when every entry is off by at most ``err``."""
    d = math.sqrt(sig[0, 0] * sig[1, 1])
    if not d > 0:
        raise NumericalError("C-map", "an output variance is zero, so the cosine is undefined",
                             "check the block (a Dense layer with weight_var = 0, or a vanishing activation)")
    cos = sig[0, 1] / d
    return cos, err / d + 0.5 * abs(cos) * (err / sig[0, 0] + err / sig[1, 1]) + 4.0 * _EPS * abs(cos)


def c_map(block, c, q: float = 1.0, env: dict | None = None, *, return_error: bool = False):
    """``C(c)`` of ``block`` (a layer or list of layers) at input norm ``q``, vectorised over ``c``.

    ``return_error=True`` also returns the error bound of each value, from the engine's ``quad_error``
    (every entry of Σ' within it): ``(values, errors)``.
    """
    block = _resolved(block, env)
    q = _check_q(q)
    c = np.atleast_1d(np.asarray(c, dtype=float))
    if np.any(np.abs(c) > 1):
        raise SpecError("c", c, "cosines must lie in [-1, 1]")
    out, err = np.empty_like(c), np.empty_like(c)
    ctx = Context()
    for k, ck in enumerate(c):
        s = apply(block, _pair(q, float(ck)), ctx)
        out[k], err[k] = _cosine(s.sigma, float(s.quad_error))
    return (out, err) if return_error else out


def q_map(block, q, env: dict | None = None, *, return_error: bool = False):
    """``q ↦ Σ'_11`` for one input of squared norm ``q`` (the length map); ``return_error=True`` also
    returns the engine's error bound of each value."""
    block = _resolved(block, env)
    ctx = Context()
    states = [apply(block, KernelState(np.array([[_check_q(qk)]]), np.zeros(1), (1,)), ctx) for qk in np.atleast_1d(q)]
    out = np.array([st.sigma[0, 0] for st in states])
    return (out, np.array([st.quad_error for st in states])) if return_error else out


# --- derivatives -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Slopes:
    """Derivatives of a block's maps (docs/theory.md §8), each with an absolute error bound.

    ``value = C(c)``; ``chi = C'(c)`` (at c = 1 the slope χ); ``curvature = C''(c)`` (``inf`` at c = 1
    when some φ' jumps, e.g. ReLU: ``C(1 − h) = 1 − χh + k h^{3/2} + …``); ``q_out = Q(q)`` and
    ``q_slope = Q'(q)``, the slope of the q-map ``q ↦ Σ'_11``. ``methods`` says how each derivative was
    obtained: ``"identity"`` (jets, no differences), ``"differences"`` (Ridders' extrapolated
    differences of an exact lower derivative or of the map, where an identity does not apply: a jump
    in φ, or no φ'' for a callable) or ``"infinite"``; ``notes`` says why.
    """

    c: float
    q: float
    value: float
    value_error: float
    chi: float
    chi_error: float
    curvature: float
    curvature_error: float
    q_out: float
    q_slope: float
    q_slope_error: float
    methods: dict
    notes: tuple = ()


class _NoIdentity(Exception):
    """A derivative identity does not apply here (the message says why)."""


class _Infinite(Exception):
    """The derivative is infinite (the message says why)."""


def _pieces_of(layer):
    """``(φ̂, φ̂', φ̂'', kinks)`` of an activation layer ``φ̂(x) = γ(φ(αx + β) + δ)`` (DKS/TAT form, docs/dks.md),
    parameters bound, kinks moved to ``(k − β)/α`` (φ̂', φ̂'' may be None)."""
    g, a, b, d = layer.transform()
    phi = layer.pointwise()
    if callable(layer.name) and not isinstance(layer.name, str):
        dphi = None if layer.derivative is None else layer.derivative_fn()
        d2phi, kinks = None, layer.kinks
    else:
        spec = A.ACTIVATIONS[layer.name]
        full = {**spec.params, **{k: float(v) for k, v in layer.params.items()}}
        d2phi = None if spec.d2phi is None else (functools.partial(spec.d2phi, **full) if full else spec.d2phi)
        dphi, kinks = layer.derivative_fn(), A.kinks_of(layer.name, layer.params, layer.kinks)
    if (g, a, b, d) == (1.0, 1.0, 0.0, 0.0):
        return phi, dphi, d2phi, kinks
    moved = None if kinks is None else (tuple(sorted((k - b) / a for k in kinks)) if a != 0.0 else ())

    def hat(f, c, shift=0.0):
        return None if f is None else (lambda x: c * (np.asarray(f(a * x + b), dtype=np.float64) + shift))
    return hat(phi, g, d), hat(dphi, g * a), hat(d2phi, g * a * a), moved


def _suspects(layer, fn, kinks, var: float) -> tuple:
    """The points to test for jumps: the declared kinks, or those found in ``|x| ≤ 10 sqrt(var)``."""
    if kinks is not None:
        return kinks
    top = 10.0 * math.sqrt(max(var, 1e-300))
    return Q.find_kinks(fn, -top, top)


def _jump(fn, points) -> float | None:
    """A point among ``points`` where ``fn`` jumps (by more than 1e-6 of its size), else None."""
    for k in points:
        d = 1e-9 * max(1.0, abs(k))
        lo, hi = (float(np.asarray(fn(np.array([x])), dtype=np.float64)[0]) for x in (k - d, k + d))
        if abs(hi - lo) > 1e-6 * max(1.0, abs(hi), abs(lo)):
            return float(k)
    return None


def _activation_parts(layer, var: float):
    """``(φ, φ', φ'', kinks, jump of φ, jump of φ')`` for an activation acting at variances ≤ var."""
    phi, dphi, d2phi, kinks = _pieces_of(layer)
    if dphi is None:
        raise NotSupportedError(f"activation {layer.label!r} is a callable without derivative=: C-map slopes need φ' "
                                "(give Activation(f, derivative=f_prime)), or use c_map_slope(..., method=\"fit\")")
    pts = _suspects(layer, phi, kinks, var)
    return phi, dphi, d2phi, kinks, _jump(phi, pts), _jump(dphi, pts)


def _c_jet(layer, s, t1, t2, e1, e2, ctx, order):
    """Jet of Σ along the input cosine through ``layer``: ``(state, Σ̇, Σ̈, err Σ̇, err Σ̈)`` (tangents with
    zero diagonal; ``order`` 1 leaves Σ̈ None)."""
    if isinstance(layer, L.Serial):
        for child in layer.layers:
            s, t1, t2, e1, e2 = _c_jet(child, s, t1, t2, e1, e2, ctx, order)
        return s, t1, t2, e1, e2
    if isinstance(layer, (L.Residual, L.Parallel)):
        return _c_jet_sum(layer, s, t1, t2, e1, e2, ctx, order)
    if isinstance(layer, L.Activation):
        return _c_jet_activation(layer, s, t1, t2, e1, e2, ctx, order)
    out = apply(layer, s, ctx)
    if isinstance(layer, (L.Dense, L.Scale)):
        w = layer.weight_var if isinstance(layer, L.Dense) else layer.c ** 2
        return out, w * t1, None if t2 is None else w * t2, abs(w) * e1, abs(w) * e2
    if isinstance(layer, L.Dropout):  # off-diagonal unchanged
        return out, t1, t2, e1, e2
    if isinstance(layer, (L.LayerNorm, L.RMSNorm)):
        sig = s.sigma - np.outer(s.mean, s.mean) if layer.centring else s.sigma
        inv = 1.0 / np.sqrt(np.diag(sig) + layer.eps)
        g2 = layer.gain ** 2
        m = g2 * np.outer(inv, inv)
        top = g2 * inv.max() ** 2
        drift = g2 * inv.max() ** 4 * s.quad_error  # the variances' own error moves 1/(s_i s_j)
        return (out, m * t1, None if t2 is None else m * t2, top * e1 + drift * np.abs(t1).max(),
                top * e2 + (0.0 if t2 is None else drift * np.abs(t2).max()))
    raise NotSupportedError(f"layer {layer.kind!r} has no derivative rule for C-map slopes (Dense, Activation, "
                            "LayerNorm, RMSNorm, Scale, Dropout, Residual, Parallel, Serial have); "
                            "use c_map_slope(..., method=\"fit\")")


def _c_jet_activation(layer, s, t1, t2, e1, e2, ctx, order):
    out = apply(layer, s, ctx)  # the engine's checks (zero-mean Gaussian input) come with it
    diag = np.diag(s.sigma)
    _, _, d2phi, kinks, jump, djump = _activation_parts(layer, float(diag.max()))
    if jump is not None:
        raise _NoIdentity(f"activation {layer.label!r} jumps at x = {jump:g}: E[φ'φ'] misses the jump's delta "
                          "(C' is infinite at c = 1)")
    g, a, _, _ = layer.transform()
    k1, _, d1 = layer.inner_derivative_kernel(s.sigma)        # E[φ'(αu + β) φ'(αv + β)]: closed forms where they exist
    c2 = (g * a) ** 2
    if d2phi is not None:                                     # φ̂'' carries γα², so its kernel carries γ²α⁴
        d2phi = (lambda f: (lambda x: f(x) / (g * a)))(d2phi) if g * a != 0.0 else None
    t1_max = float(np.abs(t1).max())
    # the input's own error moves E[φ'φ']: first order, through the variances (relative) and, where
    # known, through the covariance (E[φ''φ''])
    drift = 2.0 * float(np.abs(k1).max()) * s.quad_error / max(float(diag.min()), 1e-300)
    k2 = d2e = None
    if d2phi is not None and djump is None:
        k2, d2e = Q.gauss_hermite_kernel(d2phi, d2phi, s.sigma, kinks=kinks)
        drift += float(np.abs(k2).max()) * s.quad_error
    n1 = c2 * k1 * t1
    ne1 = c2 * (float(np.abs(k1).max()) * e1 + (d1 + drift) * t1_max)
    if order < 2:
        return out, n1, None, ne1, 0.0
    if djump is not None:
        if s.sigma[0, 1] ** 2 >= _ONE * s.sigma[0, 0] * s.sigma[1, 1] and t1_max > 0:
            raise _Infinite(f"φ' of activation {layer.label!r} jumps at x = {djump:g}, so E[φ''(u)φ''(v)] is "
                            "infinite at |c| = 1")
        raise _NoIdentity(f"φ' of activation {layer.label!r} jumps at x = {djump:g} (E[φ''φ''] has delta terms)")
    if k2 is None:
        raise _NoIdentity(f"activation {layer.label!r} has no φ'' (a callable)")
    n2 = c2 * (k2 * t1 * t1 + k1 * t2)
    ne2 = c2 * (float(np.abs(k2).max()) * 2.0 * t1_max * e1 + d2e * t1_max ** 2
                + float(np.abs(k1).max()) * e2 + (d1 + drift) * float(np.abs(t2).max()))
    return out, n1, n2, ne1, ne2


def _norm(p: np.ndarray) -> float:
    return float(np.abs(p).sum(axis=1).max()) if p.size else 0.0  # ‖P‖_∞, bounds max|P t Qᵀ| with ‖Q‖_∞


def _c_jet_sum(layer, s, t1, t2, e1, e2, ctx, order):
    alpha, betas, n = layer.alpha, layer.weight_list(), s.n
    outs, jets = [], []
    for branch in layer.branch_list():
        o, b1, b2, be1, be2 = _c_jet(branch, branch_input(s), t1, t2, e1, e2, ctx, order)
        outs.append(o)
        jets.append((b1, b2, be1, be2))
    y = combine(s, alpha, outs, betas, ctx)
    n1 = alpha * alpha * t1
    n2 = None if t2 is None else alpha * alpha * t2
    ne1, ne2 = alpha * alpha * e1, alpha * alpha * e2
    for beta, (b1, b2, be1, be2) in zip(betas, jets):
        if beta != 0:
            n1 = n1 + beta * beta * b1
            n2 = None if n2 is None else n2 + beta * beta * b2
            ne1, ne2 = ne1 + beta * beta * be1, ne2 + beta * beta * be2
    streams = [(np.eye(n), alpha)] + [(o.dep.matrix(n), b) for o, b in zip(outs, betas)
                                      if b != 0 and o.dep is not None and o.dep.kind != "zero"]
    for i in range(len(streams)):
        for j in range(i + 1, len(streams)):
            (pa, wa), (pb, wb) = streams[i], streams[j]
            if wa == 0:
                continue
            w, bound = wa * wb, 2.0 * abs(wa * wb) * _norm(pa) * _norm(pb)
            n1 = n1 + w * (pa @ t1 @ pb.T + pb @ t1 @ pa.T)
            ne1 += bound * e1
            if n2 is not None:
                n2 = n2 + w * (pa @ t2 @ pb.T + pb @ t2 @ pa.T)
                ne2 += bound * e2
    return y, n1, n2, ne1, ne2


class _Dual:
    """A number with a tangent along q (for the one-token jet): ``(v, d)``."""

    __slots__ = ("v", "d")

    def __init__(self, v, d=0.0):
        self.v, self.d = float(v), float(d)

    def __add__(self, o):
        o = o if isinstance(o, _Dual) else _Dual(o)
        return _Dual(self.v + o.v, self.d + o.d)

    __radd__ = __add__

    def __sub__(self, o):
        o = o if isinstance(o, _Dual) else _Dual(o)
        return _Dual(self.v - o.v, self.d - o.d)

    def __mul__(self, o):
        o = o if isinstance(o, _Dual) else _Dual(o)
        return _Dual(self.v * o.v, self.d * o.v + self.v * o.d)

    __rmul__ = __mul__


def _dep_value(dep) -> float | None:
    """The one-token linear dependence as a number (0 for "zero", None when unknown or absent)."""
    if dep is None or dep.kind == "unknown":
        return None
    return 0.0 if dep.kind == "zero" else float(np.asarray(dep.p).reshape(-1)[0])


def _q_jet(layer, s, dq, dm, dp, e, ctx):
    """Jet of one token along its input q: ``(state, dq, dm, dp, err dq)`` (``dm``: mean, ``dp``: the
    branch dependence's tangent, None where there is none)."""
    if isinstance(layer, L.Serial):
        for child in layer.layers:
            s, dq, dm, dp, e = _q_jet(child, s, dq, dm, dp, e, ctx)
        return s, dq, dm, dp, e
    if isinstance(layer, (L.Residual, L.Parallel)):
        return _q_jet_sum(layer, s, dq, dm, dp, e, ctx)
    out = apply(layer, s, ctx)
    if isinstance(layer, L.Dense):
        return out, layer.weight_var * dq, 0.0, 0.0, abs(layer.weight_var) * e
    if isinstance(layer, L.Scale):
        c = layer.c
        return out, c * c * dq, c * dm, None if dp is None else c * dp, c * c * e
    if isinstance(layer, L.Dropout):
        return out, dq / (1.0 - layer.p), dm, dp, e / (1.0 - layer.p)
    if isinstance(layer, (L.LayerNorm, L.RMSNorm)):
        m = float(s.mean[0])
        sig = _Dual(s.sigma[0, 0], dq) - (_Dual(m, dm) * _Dual(m, dm) if layer.centring else 0.0)
        inv = 1.0 / math.sqrt(sig.v + layer.eps)
        dinv = -0.5 * inv ** 3 * sig.d
        g = layer.gain
        dq_out = g * g * sig.d * inv * inv * (1.0 - sig.v * inv * inv)
        dm_out = 0.0 if isinstance(layer, L.LayerNorm) and layer.centring else g * (dm * inv + m * dinv)
        p = _dep_value(s.dep)
        dp_out = None if p is None or dp is None else g * (dinv * p + inv * dp)
        return out, dq_out, dm_out, dp_out, g * g * inv ** 4 * max(layer.eps, 0.0) * e + 4.0 * _EPS * abs(dq_out)
    if isinstance(layer, L.Activation):
        return _q_jet_activation(layer, s, out, dq, dm, e)
    raise NotSupportedError(f"layer {layer.kind!r} has no derivative rule for q-map slopes")


def _q_jet_activation(layer, s, out, dq, dm, e):
    if dm != 0.0:
        raise NotSupportedError(f"activation {layer.label!r}: its input mean moves with q")
    a = float(s.sigma[0, 0])
    if not a > 0:
        raise NotSupportedError(f"activation {layer.label!r} acts on a zero-variance token: no q-map slope there")
    phi, dphi, _, kinks, jump, _ = _activation_parts(layer, a)
    if jump is not None:
        raise _NoIdentity(f"activation {layer.label!r} jumps at x = {jump:g}: Stein's lemma needs a continuous φ")
    (e1,), (r1,) = Q.single_expectations(lambda x: x * phi(x) * dphi(x), np.array([a]), kinks=kinks)
    (e2,), (r2,) = Q.single_expectations(lambda x: x * dphi(x), np.array([a]), kinks=kinks)
    c = 1.0  # φ̂ of _pieces_of carries γ, α, β, δ
    drift = s.quad_error / a  # the input variance's own error, first order (relative)
    dq_out = c * c * dq * e1 / a
    dm_out = c * dq * e2 / (2.0 * a)
    err = c * c * (abs(e1) / a * e + abs(dq) * (r1 / a + 2.0 * abs(e1) / a * drift))
    return out, dq_out, dm_out, None, err


def _q_jet_sum(layer, s, dq, dm, dp, e, ctx):
    alpha, betas = layer.alpha, layer.weight_list()
    x_q, x_m = _Dual(s.sigma[0, 0], dq), _Dual(s.mean[0], dm)
    outs, parts = [], []
    for branch in layer.branch_list():
        o, bq, bm, bp, be = _q_jet(branch, branch_input(s), dq, dm, 0.0, e, ctx)
        outs.append(o)
        parts.append((_Dual(o.sigma[0, 0], bq), _Dual(o.mean[0], bm), _dep_value(o.dep), bp, be))
    y = combine(s, alpha, outs, betas, ctx)
    # streams (P, mean, weight) relative to the branch input x: the skip has P = 1, mean m_x
    streams = [(_Dual(1.0), x_m, alpha)]
    qy = x_q * (alpha * alpha)
    err = alpha * alpha * e
    for beta, (bq, bm, bp, bdp, be) in zip(betas, parts):
        if beta == 0:
            continue
        qy = qy + bq * (beta * beta)
        err += beta * beta * be
        if bp is None:  # the engine's combine refuses this first
            raise NotSupportedError("a residual branch ends in a nonlinearity of the skip stream: no cross term")
        streams.append((_Dual(bp, 0.0 if bdp is None else bdp), bm, beta))
    for i in range(len(streams)):
        for j in range(i + 1, len(streams)):
            (pa, ma, wa), (pb, mb, wb) = streams[i], streams[j]
            ra, rb = ma - pa * x_m, mb - pb * x_m
            cross = pa * pb * x_q + (pa * x_m) * rb + ra * (pb * x_m) + ra * rb
            qy = qy + cross * (2.0 * wa * wb)
            err += 2.0 * abs(wa * wb * pa.v * pb.v) * e
    if abs(qy.v - y.sigma[0, 0]) > 1e-9 * max(1.0, abs(y.sigma[0, 0])) + 10.0 * y.quad_error:
        raise NotSupportedError(f"{layer.kind}: the q-map jet does not reproduce the engine's map here "
                                f"({qy.v:.6g} vs {y.sigma[0, 0]:.6g}); use differences of q_map")
    my = x_m * alpha
    for beta, (_, bm, *_rest) in zip(betas, parts):
        my = my + bm * beta
    p_out = _dep_value(s.dep)
    dp_out = None
    if p_out is not None and dp is not None and all(b == 0 or pt[2] is not None for b, pt in zip(betas, parts)):
        inner = _Dual(alpha) + sum((_Dual(pt[2], pt[3] or 0.0) * b for b, pt in zip(betas, parts) if b != 0),
                                   _Dual(0.0))
        dp_out = (inner * _Dual(p_out, dp)).d
    return y, qy.d, my.d, dp_out, err


def _ridders(fn, x: float, h: float, one_sided: bool = False) -> tuple[float, float]:
    """``f'(x)`` by Ridders' extrapolated differences (central, or one-sided from the left), with the
    table's own error estimate plus the amplified error of the values. ``fn(x) -> (value, error)``."""
    shrink = 1.6
    tab_prev: list = []
    best, best_err, value_err = math.nan, math.inf, 0.0
    power = 1 if one_sided else 2
    f0, r0 = fn(x)
    for i in range(12):
        if one_sided:
            f1, r1 = fn(x - h)
            d = (f0 - f1) / h
        else:
            (f0, r0), (f1, r1) = fn(x + h), fn(x - h)
            d = (f0 - f1) / (2.0 * h)
        value_err = max(value_err, (r0 + r1) / (h if one_sided else 2.0 * h))
        tab = [d]
        fac = shrink ** power
        for j in range(1, i + 1):
            tab.append((tab[j - 1] * fac - tab_prev[j - 1]) / (fac - 1.0))
            fac *= shrink ** power
            err = max(abs(tab[j] - tab[j - 1]), abs(tab[j] - tab_prev[j - 1]))
            if err <= best_err:
                best, best_err = tab[j], err
        if i and abs(tab[i] - tab_prev[i - 1]) >= 2.0 * best_err:
            break
        tab_prev = tab
        h /= shrink
    if not math.isfinite(best):
        best, best_err = tab_prev[0] if tab_prev else math.nan, math.inf
    return best, best_err + value_err


def _chi_at(block, q, c, ctx):
    """``(C(c), err, C'(c), err)`` by the first-order jet."""
    s0 = _pair(q, c)
    s, t1, _, e1, _ = _c_jet(block, s0, q * np.array([[0.0, 1.0], [1.0, 0.0]]), None, 0.0, 0.0, ctx, 1)
    value, value_err = _cosine(s.sigma, s.quad_error)
    d = math.sqrt(s.sigma[0, 0] * s.sigma[1, 1])
    chi = t1[0, 1] / d
    chi_err = e1 / d + 0.5 * abs(chi) * (s.quad_error / s.sigma[0, 0] + s.quad_error / s.sigma[1, 1])
    return value, value_err, chi, chi_err


def c_map_derivatives(block, q: float = 1.0, c: float = 1.0, env: dict | None = None, *,
                      curvature: bool = True) -> Slopes:
    """``C(c)``, ``C'(c)``, ``C''(c)`` and ``Q(q)``, ``Q'(q)`` of a token-wise block, each with an error bound.

    By jets of the engine's maps (module docstring): exact up to the quadrature errors of
    ``E[φ'φ']``, ``E[φ''φ'']``, ``E[uφφ']``. Where an identity does not apply the lower derivative
    (or the map) is differenced by Ridders' method for ``c < 1`` (a jump in φ; a jump in φ' or a
    callable without φ'' for ``C''``), and the derivative is ``inf`` at ``c = 1`` where it is infinite
    (a jump in φ for ``C'``, a jump in φ' for ``C''``). ``curvature=False`` skips ``C''`` (then nan).
    A callable activation needs ``derivative=`` (else :class:`NotSupportedError`); layers other than
    Dense, Activation, LayerNorm, RMSNorm, Scale, Dropout and their Serial/Residual/Parallel
    compositions are refused by name.
    """
    block = _resolved(block, env)
    q = _check_q(q)
    if isinstance(c, bool) or not -1.0 <= float(c) <= 1.0:
        raise SpecError("c", c, "the cosine must lie in [-1, 1]")
    c = float(c)
    ctx = Context()
    methods: dict = {}
    notes: list = []
    value, value_err = (float(x) for x in _cosine_pair(block, q, c, ctx))
    chi, chi_err = _slope_at(block, q, c, ctx, methods, notes)
    # C''(c)
    curv, curv_err = math.nan, math.nan
    if curvature:
        curv, curv_err = _curvature(block, q, c, ctx, methods, notes, chi)
    # Q'(q)
    single = KernelState(np.array([[q]]), np.zeros(1), (1,))
    try:
        s, dq, _, _, qe = _q_jet(block, single, 1.0, 0.0, None, 0.0, ctx)
        q_out, q_slope, q_err = float(s.sigma[0, 0]), dq, qe
        methods["q_slope"] = "identity"
    except _NoIdentity as why:
        notes.append(str(why))
        st = apply(block, single, ctx)
        q_out = float(st.sigma[0, 0])
        q_slope, q_err = _ridders(lambda x: _q_value(block, x, ctx), q, 0.25 * q)
        methods["q_slope"] = "differences"
    def floor(x, e):  # round-off of the jets' products and sums
        return float(e) + _ROUND * abs(float(x)) if math.isfinite(x) else float(e)

    return Slopes(c=c, q=q, value=value, value_error=value_err, chi=float(chi), chi_error=floor(chi, chi_err),
                  curvature=float(curv), curvature_error=floor(curv, curv_err), q_out=q_out, q_slope=float(q_slope),
                  q_slope_error=floor(q_slope, q_err), methods=methods, notes=tuple(dict.fromkeys(notes)))


def _slope_at(block, q, c, ctx, methods, notes) -> tuple[float, float]:
    """``(C'(c), error)``: the jet; else differences of C for c < 1, or inf at c = 1."""
    try:
        _, _, chi, chi_err = _chi_at(block, q, c, ctx)
        methods["chi"] = "identity"
        return chi, chi_err + _ROUND * abs(chi)
    except _NoIdentity as why:
        notes.append(str(why))
    if c >= _ONE:
        methods["chi"] = "infinite"
        return math.inf, 0.0
    methods["chi"] = "differences"
    return _ridders(lambda x: _cosine_pair(block, q, x, ctx), c, _step(c))


def _step(c: float) -> float:
    return min(0.05, 0.25 * (1.0 - abs(c))) if abs(c) < 1 else 0.05


def _cosine_pair(block, q, c, ctx):
    s = apply(block, _pair(q, min(1.0, max(-1.0, c))), ctx)
    return _cosine(s.sigma, s.quad_error)


def _q_value(block, q, ctx):
    s = apply(block, KernelState(np.array([[q]]), np.zeros(1), (1,)), ctx)
    return float(s.sigma[0, 0]), s.quad_error


def _curvature(block, q, c, ctx, methods, notes, chi):
    try:
        s0 = _pair(q, c)
        s, _, t2, _, e2 = _c_jet(block, s0, q * np.array([[0.0, 1.0], [1.0, 0.0]]), np.zeros((2, 2)), 0.0, 0.0, ctx, 2)
        d = math.sqrt(s.sigma[0, 0] * s.sigma[1, 1])
        methods["curvature"] = "identity"
        curv = t2[0, 1] / d
        return curv, e2 / d + 0.5 * abs(curv) * (s.quad_error / s.sigma[0, 0] + s.quad_error / s.sigma[1, 1])
    except _Infinite as why:
        notes.append(str(why))
        methods["curvature"] = "infinite"
        return math.inf, 0.0
    except _NoIdentity as why:
        notes.append(str(why))
    if not math.isfinite(chi):
        methods["curvature"] = "infinite"
        return math.inf, 0.0
    methods["curvature"] = "differences"

    def slope(x):
        try:
            _, _, v, r = _chi_at(block, q, x, ctx)
        except _NoIdentity:
            v, r = _ridders(lambda y: _cosine_pair(block, q, y, ctx), x, _step(x))
        return v, r
    width = max(1.0, abs(chi)) ** 2  # a steep C-map turns over ~1/χ² near c = 1
    if c >= _ONE:
        return _ridders(slope, 1.0, 0.02 / width, one_sided=True)
    return _ridders(slope, c, _step(c) / width)


def c_map_slope(block, q: float = 1.0, env: dict | None = None, *, method: str = "exact",
                return_error: bool = False):
    """``χ = C'(1)`` of a token-wise block at input norm ``q``.

    ``method="exact"`` (default): the derivative identity carried through the block
    (:func:`c_map_derivatives`), error ~ the quadrature errors (0 for closed forms); ``inf`` when an
    activation jumps. ``method="fit"``: the former least-squares fit of
    ``1 − C(1 − h) = χh + a h^{3/2} + b h² + e h^{5/2} + f h³`` over h ∈ [1e-7, 1e-3] (needs C to
    ~1e-15, and is wrong across sharp features; kept for blocks without jet rules).
    ``return_error=True`` returns ``(χ, error)`` (the fit reports ``nan`` as its error).
    """
    if method == "fit":
        h = np.geomspace(1e-7, 1e-3, 24)
        y = 1.0 - c_map(block, 1.0 - h, q, env)
        basis = np.stack([h, h ** 1.5, h ** 2, h ** 2.5, h ** 3], axis=1)
        coef, *_ = np.linalg.lstsq(basis / h[:, None], y / h, rcond=None)
        return (float(coef[0]), math.nan) if return_error else float(coef[0])
    if method != "exact":
        raise SpecError("method", method, "must be \"exact\" (derivative identity) or \"fit\"")
    d = c_map_derivatives(block, q, 1.0, env, curvature=False)
    return (d.chi, d.chi_error) if return_error else d.chi


def network_c_map(block, depth: int, c, q: float = 1.0, *, return_error: bool = False):
    """``C_net = C_block ∘ … ∘ C_block`` (depth times) — valid when the block preserves q (q-map fixed point).

    ``return_error=True`` also returns an error bound per value: each step's own error (from the
    engine's ``quad_error``) plus the incoming error times ``|C'|`` at that step (the exact slope and
    its error; first order): ``e_{l+1} = (|C'(c_l)| + err C') e_l + err C(c_l)``.
    """
    out = np.atleast_1d(np.asarray(c, dtype=float))
    if not return_error:
        for _ in range(depth):
            out = c_map(block, out, q)
        return out
    err = np.zeros_like(out)
    blk = _resolved(block, None)
    ctx = Context()
    for _ in range(depth):
        nxt, own = c_map(blk, out, q, return_error=True)
        for k, ck in enumerate(out):
            if err[k] > 0:
                chi, chi_err = _slope_at(blk, q, float(ck), ctx, {}, [])
                err[k] = (abs(chi) + chi_err) * err[k] if math.isfinite(chi) else math.inf
        err = err + own
        out = nxt
    return out, err


def tat_leaky_relu(depth: int, eta: float = 0.9) -> tuple[float, float]:
    """TAT leaky ReLU (Zhang et al. 2022): the slope ``s`` with ``C_net(0) = η`` for ``depth`` nonlinear layers
    of ``φ̃(x) = sqrt(2/(1+s²)) · leaky_relu_s(x)``; returns ``(s, scale)``."""
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise SpecError("depth", depth, "must be a whole number >= 1")
    if not 0 < eta < 1:
        raise SpecError("eta", eta, "the target C_net(0) must lie in (0, 1)")

    def net_c0(s):
        block = [L.Activation("leaky_relu", {"slope": s}, scale=np.sqrt(2.0 / (1.0 + s * s)))]
        return network_c_map(block, depth, 0.0)[0] - eta

    reach = net_c0(0.0) + eta
    if reach < eta:
        raise SpecError("eta", eta, f"is out of reach at depth {depth}: even ReLU (slope 0) gives C_net(0) = "
                        f"{reach:.4g}; lower eta or raise the depth")
    s = optimize.brentq(net_c0, 0.0, 1.0 - 1e-12, xtol=1e-15, rtol=1e-14)
    return float(s), float(np.sqrt(2.0 / (1.0 + s * s)))
