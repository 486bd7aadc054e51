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
_COSINE = ("cos_mean", "cos_min", "cross_cos_mean", "cos_first")
_RANK = ("rank_one_distance",) + SPECTRAL
NAMES = tuple(SCALAR_MEASURES) + tuple(PROFILE_MEASURES)


def check_names(names, field: str = "measures", extra=()) -> tuple:
    """``names`` as a tuple of known measure names (``extra``: further names the caller allows, e.g. the NTK's);
    a :class:`~kernelprop.errors.SpecError` naming ``field`` lists the allowed values otherwise."""
    from .errors import SpecError
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise SpecError(field, names, f"must be a list of measure names from {list(NAMES + tuple(extra))}")
    allowed = set(NAMES) | set(extra)
    for n in names:
        if n not in allowed:
            raise SpecError(field, n, f"is not a measure; allowed: {', '.join(NAMES + tuple(extra))}")
    return tuple(dict.fromkeys(names))


def cosine(sigma: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.diagonal(sigma, axis1=-2, axis2=-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        c = sigma / d[..., :, None]
        c /= d[..., None, :]
    return np.clip(c, -1.0, 1.0, out=c)


def compute(sigma: np.ndarray, segments, mean=None, spectral: bool = True, names=None) -> dict:
    """The measures of one kernel: a dict of floats, plus per-position arrays for the profiles.

    ``names``: only these (default: all). Each family is computed only when one of its measures is asked:
    the cosine matrix for ``cos_*``, the trace and sum for ``rank_one_distance``, the eigenvalues (``eigvalsh``
    per sequence, O(T³)) for the spectral ones and only when ``spectral`` is true as well."""
    want = set(NAMES if names is None else names)
    diag = np.diag(sigma)
    out: dict = {}
    if "q_mean" in want:
        out["q_mean"] = diag.mean()
    if "q_min" in want:
        out["q_min"] = diag.min()
    if "q_max" in want:
        out["q_max"] = diag.max()
    cos = cosine(sigma) if want.intersection(_COSINE) else None
    spectral = bool(spectral) and bool(want.intersection(SPECTRAL))
    rank = bool(want.intersection(_RANK))
    cm, cmin, r1, sr, er, ratio = [], [], [], [], [], []
    for sl in segment_slices(segments) if (cos is not None or rank) else ():
        t = sl.stop - sl.start
        if cos is not None and t > 1:      # off-diagonal mean and min, the diagonal masked in place (no gather)
            c = cos[sl, sl]
            keep = np.diagonal(c).copy()
            np.fill_diagonal(c, 0.0)
            cm.append(c.sum() / (t * (t - 1)))
            np.fill_diagonal(c, np.inf)
            cmin.append(c.min())
            np.fill_diagonal(c, keep)
        if not rank:
            continue
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
    if "cos_mean" in want:
        out["cos_mean"] = float(np.mean(cm)) if cm else 1.0
    if "cos_min" in want:
        out["cos_min"] = float(np.min(cmin)) if cmin else 1.0
    if "cross_cos_mean" in want and len(segments) > 1 and cos is not None:
        same = np.zeros(sigma.shape, dtype=bool)
        for sl in segment_slices(segments):
            same[sl, sl] = True
        out["cross_cos_mean"] = float(cos[~same].mean())
    if "rank_one_distance" in want:
        out["rank_one_distance"] = float(np.mean(r1))
    if spectral:
        for name, vals in (("stable_rank", sr), ("effective_rank", er), ("eig_ratio", ratio)):
            if name in want:
                out[name] = float(np.mean(vals))
    if mean is not None and "mean_abs" in want:
        out["mean_abs"] = float(np.abs(mean).mean())
    first = slice(0, segments[0])
    if "cos_first" in want and cos is not None:
        out["cos_first"] = cos[first, 0].copy()
    if "q_position" in want:
        out["q_position"] = diag[first].copy()
    return {k: (float(v) if np.ndim(v) == 0 else v) for k, v in out.items()}
