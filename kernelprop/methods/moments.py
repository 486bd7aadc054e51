"""Moment view of a trajectory (Kedia et al. 2024): mean μ, variance σ², token correlation r forward;
gradient variance σ_g² and correlation r_g backward, at every record.

From the kernel: ``μ = mean_i m_i``, ``σ² = mean_i (Σ_ii − m_i²)``,
``r = mean_{i≠j} (Σ_ij − m_i m_j) / σ²`` (within sequences); from the gradient kernel Π (summed over
features, so σ_g² is per model width): ``σ_g² = mean_i Π_ii``, ``r_g = mean_{i≠j} Π_ij / σ_g²``.
"""

from __future__ import annotations

import numpy as np

from ..inputs import segment_slices


def _offdiag_mean(a, segments):
    vals = []
    for sl in segment_slices(segments):
        t = sl.stop - sl.start
        if t > 1:
            block = a[sl, sl]
            vals.append((block.sum() - np.trace(block)) / (t * (t - 1)))
    return float(np.mean(vals)) if vals else np.nan


def forward_moments(sigma, mean, segments) -> dict:
    cov = sigma - np.outer(mean, mean)
    var = float(np.mean(np.diag(cov)))
    return {"mu": float(np.mean(mean)), "var": var, "r": _offdiag_mean(cov, segments) / var}


def backward_moments(pi, segments) -> dict:
    var_g = float(np.mean(np.diag(pi)))
    return {"var_g": var_g, "r_g": _offdiag_mean(pi, segments) / var_g}


def moment_view(gradients) -> dict:
    """Arrays ``mu, var, r, var_g, r_g`` over the records of a
    :class:`~kernelprop.kernel.backward.GradientTrajectory` (forward kernels are recomputed if not kept)."""
    fwd = gradients.forward
    if fwd.kernels is None or gradients.kernels is None:
        raise ValueError("moment_view needs kernels: run backpropagate(..., keep_kernels=True)")
    rows = []
    for r in range(len(fwd.labels)):
        row = forward_moments(fwd.kernels[r], fwd.means[r], fwd.segments)
        row.update(backward_moments(gradients.kernels[r], fwd.segments))
        rows.append(row)
    return {k: np.array([row[k] for row in rows]) for k in rows[0]}
