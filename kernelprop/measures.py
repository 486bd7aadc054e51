"""Rank-collapse measures computable from the token kernel Σ (docs/theory.md §7).

Every measure is computed within each sequence and averaged over sequences; ``cross_cos_mean``
compares tokens of different sequences. For equicorrelated ``Σ = q[(1−ρ)I + ρ11ᵀ]`` the
eigenvalues are ``q(1−ρ) + Tqρ`` and ``q(1−ρ)`` (multiplicity T−1).
"""

from __future__ import annotations

import numpy as np

from .inputs import segment_slices

SCALAR_MEASURES = {
    "q_mean": "mean squared token norm, mean_i Σ_ii",
    "q_min": "smallest Σ_ii",
    "q_max": "largest Σ_ii",
    "cos_mean": "mean off-diagonal cosine mean_{i≠j} Σ_ij/sqrt(Σ_ii Σ_jj) within sequences",
    "cos_min": "smallest off-diagonal cosine within sequences",
    "cross_cos_mean": "mean cosine between tokens of different sequences (only with several sequences)",
    "rank_one_distance": "tr(PΣ)/tr(Σ), P = I − 11ᵀ/T: relative distance to rank one "
                         "(Dong et al. 2021, Frobenius form)",
    "stable_rank": "tr Σ / λ_max(Σ)",
    "effective_rank": "exp(H(p)), p_k ∝ sqrt(λ_k) (Roy & Vetterli 2007)",
    "eig_ratio": "λ_min(Σ)/λ_max(Σ)",
    "mean_abs": "mean_i |m_i|: size of the per-token feature mean",
    "quad_error": "accumulated error estimate of Σ's approximations: quadrature error bounds plus the standard "
                  "error of the score-draw average of scores=\"standard\" attention (0 when every map is exact)",
}
PROFILE_MEASURES = {
    "cos_first": "cosine of each position to the first token of sequence 0 (causal collapse goes toward it)",
    "q_position": "Σ_ii of each position of sequence 0",
}
SPECTRAL = ("stable_rank", "effective_rank", "eig_ratio")


def cosine(sigma: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.diag(sigma))
    with np.errstate(divide="ignore", invalid="ignore"):
        c = sigma / d[:, None] / d[None, :]
    return np.clip(c, -1.0, 1.0)


def compute(sigma: np.ndarray, segments, mean=None, spectral: bool = True) -> dict:
    """All measures of one kernel: a dict of floats, plus per-position arrays for the profiles."""
    diag = np.diag(sigma)
    cos = cosine(sigma)
    out = {"q_mean": diag.mean(), "q_min": diag.min(), "q_max": diag.max()}
    cm, cmin, r1, sr, er, ratio = [], [], [], [], [], []
    for sl in segment_slices(segments):
        t = sl.stop - sl.start
        c = cos[sl, sl]
        if t > 1:
            off = ~np.eye(t, dtype=bool)
            cm.append(c[off].mean())
            cmin.append(c[off].min())
        block = sigma[sl, sl]
        tr = np.trace(block)
        if not tr > 0:          # an all-zero sequence (e.g. weight_var = 0): rank 0, every rank measure 0
            r1.append(0.0)
            if spectral:
                sr.append(0.0)
                ratio.append(0.0)
                er.append(0.0)
            continue
        r1.append(max(tr - block.sum() / t, 0.0) / tr)
        if spectral:
            lam = np.clip(np.linalg.eigvalsh(block), 0.0, None)
            sr.append(tr / lam[-1])
            ratio.append(lam[0] / lam[-1])
            p = np.sqrt(lam)
            p = p[p > 0] / p.sum()
            er.append(float(np.exp(-(p * np.log(p)).sum())))
    out["cos_mean"] = float(np.mean(cm)) if cm else 1.0
    out["cos_min"] = float(np.min(cmin)) if cmin else 1.0
    if len(segments) > 1:
        same = np.zeros(sigma.shape, dtype=bool)
        for sl in segment_slices(segments):
            same[sl, sl] = True
        out["cross_cos_mean"] = float(cos[~same].mean())
    out["rank_one_distance"] = float(np.mean(r1))
    if spectral:
        out["stable_rank"] = float(np.mean(sr))
        out["effective_rank"] = float(np.mean(er))
        out["eig_ratio"] = float(np.mean(ratio))
    if mean is not None:
        out["mean_abs"] = float(np.abs(mean).mean())
    first = slice(0, segments[0])
    out["cos_first"] = cos[first, 0].copy()
    out["q_position"] = diag[first].copy()
    return {k: (float(v) if np.ndim(v) == 0 else v) for k, v in out.items()}
