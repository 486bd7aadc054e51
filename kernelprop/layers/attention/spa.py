"""Signal-preserving attention, E-SPA and U-SPA (He et al. 2023, §3; docs/theory.md §3).

Pick target kernels ``Σ_0 = I, Σ_1, …, Σ_L`` and set ``A_l = F_l F_{l−1}^{-1}`` with ``F_l`` the
lower Cholesky factor of ``Σ_l`` (causal) or its symmetric square root (bidirectional); then
``A_l Σ_{l−1} A_lᵀ = Σ_l`` exactly. Under softmax, ``A_l = D_l softmax(B_l + M)`` with
``D_l = diag(A_l 1)`` (location-dependent rescaling) and ``B_l = log(D_l^{-1} A_l)``.

* E-SPA: ``Σ_l = exp(−γ_l |i − j|)``, ``1 − e^{−2γ_l} = (1 − e^{−2γ_L})^{l/L}``; default γ_L = 0.005
  (the value used by public third-party implementations).
* U-SPA: ``Σ_l = (1 − ρ_l) I + ρ_l 11ᵀ``, ``1 − ρ_l = (1 − ρ_L)^{l/L}``. The paper leaves the
  schedule open; this geometric schedule and the default ρ_L = 0.8 are kernelprop's choice.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

from ...errors import SpecError

DEFAULT_FINAL = {"e-spa": 0.005, "u-spa": 0.8}
_LOG_FLOOR = 1e-300


def final_value(kind: str, final) -> float:
    return DEFAULT_FINAL[kind] if final is None else float(final)


def check_schedule(kind, step, layers, final) -> None:
    """SpecError unless ``kind``, the step and the final γ_L / ρ_L describe a valid SPA schedule."""
    if kind not in DEFAULT_FINAL:
        raise SpecError("attention.spa", kind, f"must be one of {sorted(DEFAULT_FINAL)}")
    if not (0 <= step <= layers):
        raise SpecError("attention.spa_step", step, f"must lie in [0, spa_layers = {layers}]")
    if kind == "e-spa" and not final > 0:
        raise SpecError("attention.spa_final", final, "E-SPA needs a final decay γ_L > 0")
    if kind == "u-spa" and not (0 <= final < 1):
        raise SpecError("attention.spa_final", final, "U-SPA needs a final correlation ρ_L in [0, 1)")


def target_kernel(kind: str, t: int, step: float, layers: float, final=None) -> np.ndarray:
    """``Σ_step`` of the schedule (``Σ_0 = I``)."""
    final = final_value(kind, final)
    check_schedule(kind, step, layers, final)
    if step == 0:
        return np.eye(t)
    if kind == "e-spa":
        one_minus = (1.0 - np.exp(-2.0 * final)) ** (step / layers)    # 1 − e^{−2γ_l}
        rho = np.sqrt(1.0 - one_minus)                                  # e^{−γ_l}
        pos = np.arange(t)
        return rho ** np.abs(pos[:, None] - pos[None, :])
    rho = 1.0 - (1.0 - final) ** (step / layers)
    return (1.0 - rho) * np.eye(t) + rho


def _factor(sigma, causal):
    if causal:
        return np.linalg.cholesky(sigma)
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def attention_matrix(kind: str, t: int, step: float, layers: float, final=None, causal: bool = True) -> np.ndarray:
    """``A_step = F_step F_{step−1}^{-1}``: maps the target kernel of step−1 exactly onto that of step."""
    s1 = target_kernel(kind, t, step, layers, final)
    if step == 0:
        return np.eye(t)
    s0 = target_kernel(kind, t, step - 1, layers, final)
    f1, f0 = _factor(s1, causal), _factor(s0, causal)
    if causal:  # A F0 = F1  ⇔  F0ᵀ Aᵀ = F1ᵀ
        a = linalg.solve_triangular(f0.T, f1.T, lower=False).T
        a = np.tril(a)
    else:
        a = linalg.solve(f0.T, f1.T, assume_a="sym").T
    neg = a.min()
    if neg < -1e-10 * np.abs(a).max():
        raise SpecError("attention.spa", kind, f"gives an attention matrix with a negative entry ({neg:.3g}) at "
                        f"step {step}: not realisable by softmax; use causal = true or a smaller spa_final")
    return np.clip(a, 0.0, None)


def softmax_form(a: np.ndarray, causal: bool):
    """``(D, B)`` with ``A = diag(D) softmax(B + M)``: ``D = A1``, ``B = log(A / D)``, entries of A
    below 1e-300 are clamped before the log (masked entries of a causal A get −inf)."""
    d = a.sum(axis=1)
    b = np.log(np.maximum(a / d[:, None], _LOG_FLOOR))
    if causal:
        b = np.where(np.tril(np.ones_like(a, dtype=bool)), b, -np.inf)
    return d, b
