"""The finite-width (or finite-heads) band around the limit (docs/finite-width.md)."""

from __future__ import annotations

import numpy as np

from ..errors import SpecError
from . import style
from .depth import block_records
from .labels import BLOCK_LABEL, measure_label


def band_plot(prediction, measure: str = "cos_mean", *, ax=None, outer: tuple = (0.05, 0.95),
              inner: tuple | None = (0.25, 0.75), simulation=None, legend: str | None = "above", z: float = 1.0):
    """``measure`` against block index: the limit as a line, the finite prediction's mean as a dashed line
    with its quantile bands (``outer`` and ``inner`` levels among the prediction's ``quantile_levels``), and
    optionally a full simulation's means ± ``z`` standard errors (anything with ``measures``/``stderr``, e.g.
    :func:`kernelprop.montecarlo.simulate`). ``prediction``: a
    :class:`~kernelprop.finite.interface.FinitePrediction`. Returns the figure."""
    levels = tuple(prediction.quantile_levels)
    for pair, name in ((outer, "outer"), (inner, "inner")):
        if pair is not None and not all(q in levels for q in pair):
            raise SpecError(name, pair, f"quantile levels must be among {list(levels)}")
    if measure not in prediction.measures:
        raise SpecError("measure", measure, f"must be one of {sorted(prediction.measures)}")
    vals = np.asarray(prediction.limit.measures[measure], dtype=float)
    if vals.ndim != 1:
        raise SpecError("measure", measure, "is a per-position profile: the band is drawn for scalar measures")
    rec, depth = block_records(prediction.limit.labels, None, prediction.limit.records)
    quant = prediction.quantiles(measure)[:, rec]
    mean = prediction.mean(measure)[rec]
    what = (f"width {prediction.width}" if prediction.width else "infinite width") + (
        f", {prediction.heads} heads" if prediction.heads else "")
    with style.paper_style():
        fig, ax = style.figure(ax)
        c_lim, c_fin, c_sim = style.COLORS[0], style.COLORS[1], style.COLORS[2]
        ax.plot(depth, vals[rec], color=c_lim, label="limit")
        for pair, alpha in ((outer, 0.18), (inner, 0.32)):
            if pair is not None:
                lo, hi = quant[levels.index(pair[0])], quant[levels.index(pair[1])]
                ax.fill_between(depth, lo, hi, color=c_fin, alpha=alpha, linewidth=0,
                                label=f"{what}: {int(100 * pair[0])}–{int(100 * pair[1])}%")
        ax.plot(depth, mean, color=c_fin, linestyle="--", label=f"{what}: mean ({prediction.method})")
        if simulation is not None:
            srec, sdepth = block_records(simulation.labels, None, getattr(simulation, "records", None))
            ax.errorbar(sdepth, np.asarray(simulation.measures[measure])[srec],
                        yerr=z * np.asarray(simulation.stderr[measure])[srec], fmt="o", color=c_sim,
                        markersize=2.8, markerfacecolor="white", linestyle="none", label="simulated")
        ax.set_xlabel(BLOCK_LABEL)
        ax.set_ylabel(measure_label(measure))
        if legend is not None:
            style.legend(ax, legend)
    return fig
