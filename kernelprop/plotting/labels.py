"""Axis labels that say what is plotted (definitions from :mod:`kernelprop.measures`, docs/theory.md §7)."""

from __future__ import annotations

from ..sweep.files import DEPTH_LABEL  # noqa: F401  (the depth axis of sweeps: one label for both)

MEASURE_LABELS = {
    "q_mean": r"mean squared token norm $\Sigma_{ii}$",
    "q_min": r"smallest squared norm $\min_i \Sigma_{ii}$",
    "q_max": r"largest squared norm $\max_i \Sigma_{ii}$",
    "cos_mean": r"mean token cosine ($i \neq j$)",
    "cos_min": r"smallest token cosine ($i \neq j$)",
    "cross_cos_mean": "mean cosine across sequences",
    "rank_one_distance": r"distance to rank one $\mathrm{tr}(P\Sigma)/\mathrm{tr}\,\Sigma$",
    "stable_rank": r"stable rank $\mathrm{tr}\,\Sigma/\lambda_{\max}$",
    "effective_rank": "effective rank (Roy & Vetterli)",
    "eig_ratio": r"$\lambda_{\min}/\lambda_{\max}$ of $\Sigma$",
    "mean_abs": r"feature mean $\overline{|m_i|}$",
    "quad_error": "approximation error of Σ",
    "cos_first": "cosine to the first token",
    "q_position": r"squared norm $\Sigma_{ii}$",
}
SHORT_LABELS = {
    "q_mean": r"mean $\Sigma_{ii}$", "cos_mean": "mean token cosine", "cos_min": "min token cosine",
    "rank_one_distance": "distance to rank one", "stable_rank": "stable rank", "effective_rank": "effective rank",
    "eig_ratio": r"$\lambda_{\min}/\lambda_{\max}$",
}
BLOCK_LABEL = "block $l$ (depth)"


def measure_label(name: str, short: bool = False) -> str:
    """The axis label of a measure, with its definition (``short``: for colour bars and titles)."""
    if short and name in SHORT_LABELS:
        return SHORT_LABELS[name]
    if name.endswith("_se"):
        return "standard error of " + measure_label(name[:-3], short=True)
    return MEASURE_LABELS.get(name, name.replace("_", " "))

