"""Shared pieces of the NTK maps (docs/theory.md §14): the per-layer rule lookup, the tangent kernel
of a sum of streams, and the NTK measures kept per record.

Θ is the neural tangent kernel in the NTK parametrisation ``W = (σ/√fan_in)·ω`` (gradients with respect
to ω; Jacot et al. 2018), averaged over the stream's features: ``Θ_ij = (1/d) Σ_k Σ_ω ∂f_ik/∂ω ∂f_jk/∂ω``.
Each layer's ``ntk_map(s, ctx)`` is its ``kernel_map`` with ``s.ntk`` (Θ of the input) mapped to Θ of
the output.
"""

from __future__ import annotations

import numpy as np

from ..errors import NotSupportedError
from .state import Dependence, KernelState


def rule(layer, where: str = ""):
    """The layer's ``ntk_map``, or a refusal naming the layer type."""
    f = getattr(layer, "ntk_map", None)
    if f is None:
        at = f"{where}: " if where else ""
        raise NotSupportedError(f"{at}layer `{layer.kind}` has no NTK map ({type(layer).__name__} defines no "
                                "`ntk_map`; see docs/theory.md §14 for the per-layer rules)")
    return f


def _left(d: Dependence, m: np.ndarray) -> np.ndarray:
    """``P m`` for a dependence P (diag or dense)."""
    return d.p[:, None] * m if d.kind == "diag" else d.p @ m


def cross(a: Dependence, b: Dependence, theta: np.ndarray) -> np.ndarray | None:
    """The tangent cross kernel ``P_a Θ P_bᵀ`` of two streams ``f = P x + z`` of one branch input x (Θ the
    input's NTK): the z parts pass x's tangent through fresh zero-mean weights (cross terms average to 0)
    and their own parameters are disjoint. None when it is exactly zero."""
    if a.kind == "unknown" or b.kind == "unknown":
        raise NotSupportedError("a residual branch ends in a nonlinearity of the skip stream; its tangent cross "
                                "term has no closed form here: end the branch with a Dense layer or attention with "
                                "value weights")
    if a.kind == "zero" or b.kind == "zero":
        return None
    if a.kind == "diag" and b.kind == "diag":
        return theta * a.p[:, None] * b.p[None, :]
    return _left(a, _left(b, theta.T).T)


def combine(s: KernelState, alpha: float, outs, betas) -> tuple[np.ndarray, float]:
    """Θ and its error of ``y = α x + Σ_b β_b f_b(x)``: ``Σ_s w_s² Θ_s + Σ_{s<t} w_s w_t (C_st + C_stᵀ)`` with
    ``C_st = P_s Θ_x P_tᵀ`` (the skip has P = I), the branch outputs ``outs`` started at the branch input."""
    assert s.ntk is not None
    streams = [(Dependence.identity(s.n), s.ntk, s.ntk_error, alpha)]
    streams += [(o.dep, o.ntk, o.ntk_error, b) for o, b in zip(outs, betas)]
    theta = np.zeros_like(s.sigma)
    err = 0.0
    for _, t, e, w in streams:
        if w != 0 and t is not None:
            theta += (w * w) * t
            err += w * w * e
    for i in range(len(streams)):
        for j in range(i + 1, len(streams)):
            da, _, ea, wa = streams[i]
            db, _, eb, wb = streams[j]
            if wa == 0 or wb == 0:
                continue
            c = cross(da, db, s.ntk)
            if c is not None:
                theta += (wa * wb) * (c + c.T)
                err += 2.0 * abs(wa * wb) * s.ntk_error
    return theta, err


def measures(theta: np.ndarray, spectral: bool) -> dict:
    """``ntk_mean`` (mean diagonal, tr Θ/N) and, if ``spectral``, ``ntk_cond`` (λ_max/λ_min of Θ; inf when
    Θ is singular, e.g. Θ = 0 at the input)."""
    n = theta.shape[0]
    row = {"ntk_mean": float(np.diagonal(theta).mean()) if n else 0.0}
    if spectral and n:
        lam = np.linalg.eigvalsh(0.5 * (theta + theta.T))
        top = float(lam[-1])
        row["ntk_cond"] = top / float(lam[0]) if lam[0] > 1e-14 * max(top, 1e-300) else float("inf")
    return row
