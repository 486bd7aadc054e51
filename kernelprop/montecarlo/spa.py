"""Signal-preserving attention for the simulator, built from closed forms (He et al. 2023 §3; docs/theory.md §3).

The engine (:mod:`kernelprop.layers.attention.spa`) factors every target numerically (Cholesky or
eigendecomposition, then a triangular solve). The simulator builds the same matrices on its own, so
that a slip in the engine's SPA shows up as a disagreement in :func:`kernelprop.montecarlo.check`:

* schedules: E-SPA ``ρ_l = e^{−γ_l}`` with ``1 − ρ_l² = (1 − e^{−2γ_L})^{l/L}``; U-SPA
  ``1 − ρ_l = (1 − ρ_L)^{l/L}``; step 0 is the identity kernel (ρ_0 = 0);
* causal E-SPA, ``Σ = ρ^{|i−j|}`` (AR(1)): ``A_l = L(ρ_l) L(ρ_{l−1})^{-1}`` in closed form,
  ``A_00 = 1``, ``A_ii = s_l/s_{l−1}``, ``A_i0 = ρ_l^{i−1}(ρ_l − s_l ρ_{l−1}/s_{l−1})``,
  ``A_ij = (s_l/s_{l−1}) ρ_l^{i−j−1}(ρ_l − ρ_{l−1})`` for ``i > j ≥ 1``, with ``s = sqrt(1 − ρ²)``;
* causal U-SPA, ``Σ = aI + ρ11ᵀ`` (``a = 1 − ρ``): the Cholesky factor from the innovations of an
  exchangeable sequence, ``L_ii = sqrt(a(1 + iρ)/(a + iρ))``, ``L_ij = ρ sqrt(a/((a + jρ)(1 + jρ)))``
  (0-based, j < i), and its inverse ``(L⁻¹)_ii = 1/L_ii``, ``(L⁻¹)_ij = −ρ/((a + iρ) L_ii)``;
* bidirectional U-SPA: symmetric square roots ``F = sqrt(a)(I − P) + sqrt(a + Tρ) P``, ``P = 11ᵀ/T``,
  so ``A_l = sqrt(a_l/a_{l−1})(I − P) + sqrt((a_l + Tρ_l)/(a_{l−1} + Tρ_{l−1})) P``;
* bidirectional E-SPA has no closed form: principal square roots by the Schur method
  (:func:`scipy.linalg.sqrtm`) and an LU solve.

The network realises ``A = D softmax(B + M)`` at zero queries: ``B = log A`` on the allowed entries
(−∞ where masked), ``D = A 1`` (:func:`realised`).
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

from ..errors import SpecError


def _final(kind, final):
    from ..layers.attention.spa import DEFAULT_FINAL  # the spec's default, not a computation
    return float(DEFAULT_FINAL[kind] if final is None else final)


def _validate(kind, step, layers, final):
    """The spec checks are the engine's (they are not what this module reproduces independently)."""
    from ..layers.attention.spa import check_schedule
    check_schedule(kind, step, layers, final)


def correlation(kind: str, step: float, layers: float, final=None) -> float:
    """``ρ_step`` of the schedule: E-SPA ``e^{−γ_step}`` (neighbour correlation), U-SPA the shared
    correlation; 0 at step 0."""
    final = _final(kind, final)
    _validate(kind, step, layers, final)
    if step == 0:
        return 0.0
    if kind == "e-spa":
        return float(np.sqrt(1.0 - (-np.expm1(-2.0 * final)) ** (step / layers)))
    return float(-np.expm1(step / layers * np.log1p(-final)))


def _e_causal(t, r1, r0):
    s1, s0 = np.sqrt(1.0 - r1 * r1), np.sqrt(1.0 - r0 * r0)
    i = np.arange(t)
    gap = i[:, None] - i[None, :]
    a = np.where(gap > 0, (s1 / s0) * r1 ** np.maximum(gap - 1, 0) * (r1 - r0), 0.0)
    a[1:, 0] = r1 ** (i[1:] - 1) * (r1 - s1 * r0 / s0)
    a[np.diag_indices(t)] = s1 / s0
    a[0, 0] = 1.0
    return a


def _u_cholesky(t, rho):
    """``(L, L⁻¹)`` of ``(1 − ρ)I + ρ11ᵀ`` in closed form."""
    a = 1.0 - rho
    k = np.arange(t, dtype=float)
    diag = np.sqrt(a * (1.0 + k * rho) / (a + k * rho))
    below = rho * np.sqrt(a / ((a + k * rho) * (1.0 + k * rho)))          # column j's entries under the diagonal
    lower = np.tril(np.ones((t, t), dtype=bool), -1)
    chol = np.where(lower, below[None, :], 0.0) + np.diag(diag)
    inv = np.where(lower, (-rho / ((a + k * rho) * diag))[:, None], 0.0) + np.diag(1.0 / diag)
    return chol, inv


def _e_dense(t, rho):
    pos = np.arange(t)
    return rho ** np.abs(pos[:, None] - pos[None, :]) if rho > 0 else np.eye(t)


def attention_matrix(kind: str, t: int, step: float, layers: float, final=None, causal: bool = True) -> np.ndarray:
    """``A_step`` with ``A Σ_{step−1} Aᵀ = Σ_step`` from the closed forms above (identity at step 0)."""
    r1 = correlation(kind, step, layers, final)
    if step == 0:
        return np.eye(t)
    r0 = correlation(kind, step - 1, layers, final)
    if kind == "e-spa" and causal:
        a = _e_causal(t, r1, r0)
    elif causal:
        l1, _ = _u_cholesky(t, r1)
        _, inv0 = _u_cholesky(t, r0)
        a = l1 @ inv0
    elif kind == "u-spa":
        p = np.full((t, t), 1.0 / t)
        a1, a0 = 1.0 - r1, 1.0 - r0
        a = np.sqrt(a1 / a0) * (np.eye(t) - p) + np.sqrt((a1 + t * r1) / (a0 + t * r0)) * p
    else:
        f1 = np.real(linalg.sqrtm(_e_dense(t, r1)))
        f0 = np.real(linalg.sqrtm(_e_dense(t, r0)))
        a = np.linalg.solve(f0, f1)          # F0⁻¹F1 = (F1 F0⁻¹)ᵀ for symmetric F; transposed below
        a = a.T
    neg = a.min()
    if neg < -1e-10 * np.abs(a).max():
        raise SpecError("attention.spa", kind, f"gives an attention matrix with a negative entry ({neg:.3g}) at "
                        f"step {step}: not realisable by softmax; use causal = true or a smaller spa_final")
    return np.clip(a, 0.0, None)


def realised(kind: str, t: int, step: float, layers: float, final=None, causal: bool = True) -> np.ndarray:
    """``D softmax(B + M)``: ``B = log A`` where allowed (−∞ where masked or A = 0), ``D = A 1``."""
    a = attention_matrix(kind, t, step, layers, final, causal)
    allowed = np.tril(np.ones((t, t), dtype=bool)) if causal else np.ones((t, t), dtype=bool)
    with np.errstate(divide="ignore"):
        b = np.where(allowed & (a > 0), np.log(np.where(a > 0, a, 1.0)), -np.inf)
    z = np.exp(b - b.max(axis=1, keepdims=True))
    d = a.sum(axis=1)
    return d[:, None] * z / z.sum(axis=1, keepdims=True)


def layer_matrix(layer, t: int) -> np.ndarray:
    """The realised SPA matrix of an :class:`~kernelprop.layers.attention.Attention` layer (every head)."""
    return realised(layer.spa, t, layer.spa_step, layer.spa_layers, layer.spa_final, layer.causal)
