"""A measure against depth for one or several trajectories, with optional simulation error bars."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import SpecError
from . import style
from .labels import BLOCK_LABEL, measure_label

_BLOCK = re.compile(r"^block (\d+)$")


def block_records(labels, blocks, records=None) -> tuple[np.ndarray, np.ndarray]:
    """``(records, depths)``: the state entering block 1 (input, or stem output) at depth 0, then every
    recorded ``block l`` (sub-layer records and the head's output are left out).

    ``records``: the structured :class:`~kernelprop.network.walk.Record` list of a trajectory, used
    when given; results read back from files have only their ``labels``."""
    if records:
        zero = [r for r, rec in enumerate(records) if rec.section in ("input", "stem")]
        whole = [(r, rec.block) for r, rec in enumerate(records) if rec.section == "block" and rec.part is None]
    else:
        zero = [r for r, lab in enumerate(labels) if lab in ("input", "stem") or lab.startswith("stem")]
        whole = [(r, int(m.group(1))) for r, m in ((r, _BLOCK.match(str(lab))) for r, lab in enumerate(labels)) if m]
    rec, depth = ([zero[-1]], [0]) if zero else ([], [])
    rec += [r for r, _ in whole]
    depth += [l for _, l in whole]
    return np.array(rec, dtype=int), np.array(depth, dtype=int)


def series(traj, measure: str, position: int | None = None):
    """``(depth, values, stderr or None)`` of ``measure`` at every block record of ``traj``.

    ``traj`` is anything with ``labels`` and ``measures`` (a :class:`~kernelprop.Trajectory`, a
    simulation result, a result read from a file; its ``records`` pick the blocks when it has them); if it
    also has ``stderr[measure]`` or a measure ``<measure>_se``, that is returned as the standard error.
    """
    if measure not in traj.measures:
        raise SpecError("measure", measure, f"must be one of {sorted(traj.measures)}")
    rec, depth = block_records(traj.labels, getattr(traj, "blocks", None), getattr(traj, "records", None))
    vals = np.asarray(traj.measures[measure], dtype=float)
    se = getattr(traj, "stderr", None)
    se = se.get(measure) if isinstance(se, Mapping) else None
    if se is None:
        se = traj.measures.get(measure + "_se")
    se = None if se is None else np.asarray(se, dtype=float)
    if vals.ndim == 2:
        if position is None:
            raise SpecError("position", None, f"{measure} is a per-position profile: choose a token position")
        vals = vals[:, position]
        se = None if se is None else se[:, position]
    return depth, vals[rec], None if se is None else se[rec]


def _named(items, labels, kind):
    """``[(label, item)]`` from one item, a sequence or a mapping label -> item."""
    if isinstance(items, Mapping):
        return list(items.items())
    if not isinstance(items, (list, tuple)) or (kind == "simulation" and _is_triple(items)):
        items = [items]
    if labels is None:
        labels = [_default_label(x, i) for i, x in enumerate(items)]
    if len(labels) != len(items):
        raise SpecError("labels", list(labels), f"needs one label per {kind} ({len(items)})")
    return list(zip(labels, items))


def _is_triple(x):
    return isinstance(x, tuple) and len(x) == 3 and all(np.ndim(v) == 1 for v in x)


def _default_label(x, i):
    net = getattr(x, "network", None)
    name = getattr(net, "name", "") if net is not None else ""
    return name or f"run {i + 1}"


def errorbars(ax, depth, mean, stderr, *, label=None, color=None, marker="o", z: float = 1.0, **kw):
    """Overlay simulation means ± ``z`` standard errors as markers with error bars (plain arrays:
    no simulator import needed). Returns the figure."""
    depth, mean = np.asarray(depth, dtype=float), np.asarray(mean, dtype=float)
    stderr = None if stderr is None else z * np.asarray(stderr, dtype=float)
    if ax.get_xscale() == "log":
        keep = depth > 0
        depth, mean = depth[keep], mean[keep]
        stderr = None if stderr is None else stderr[keep]
    with style.paper_style():
        ax.errorbar(depth, mean, yerr=stderr, fmt=marker, color=color, label=label, linestyle="none",
                    markersize=2.8, markerfacecolor="white", markeredgewidth=0.8, elinewidth=0.8, zorder=3, **kw)
    return ax.figure


def depth_plot(trajectories, measure: str = "cos_mean", *, ax=None, labels: Sequence[str] | None = None,
               logx: bool = False, logy: bool = False, simulations=None, position: int | None = None,
               legend: str | None = "above", ylabel: str | None = None, z: float = 1.0):
    """``measure`` against block index l for one or several trajectories; returns the figure.

    ``trajectories``: a :class:`~kernelprop.Trajectory`, a list of them, or a mapping label -> trajectory.
    ``simulations``: Monte Carlo estimates to overlay as error bars (``mean ± z·stderr``), as a mapping
    label -> ``(depth, mean, stderr)`` arrays (a label equal to a theory curve's takes its colour) or a
    list aligned with ``trajectories``. ``logx`` drops depth 0 (the input); ``logy`` drops values <= 0
    (a measure rounded to exactly zero ends its line). Profiles (``cos_first``,
    ``q_position``) need a token ``position``.
    """
    theory = _named(trajectories, labels, "trajectory") if trajectories is not None else []
    with style.paper_style():
        fig, ax = style.figure(ax)
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        colors: dict[str, str] = {}     # curve label -> its colour
        used = 0
        curves = []
        for label, traj in theory:
            depth, vals, se = series(traj, measure, position)
            if logx:
                keep = depth > 0
                depth, vals, se = depth[keep], vals[keep], None if se is None else se[keep]
            if logy:     # zeros (exact, or rounded to zero) have no place on a log axis: end the line there
                vals = np.where(vals > 0, vals, np.nan)
            curves.append((label, depth, vals, se if se is not None and np.any(np.isfinite(se)) else None))
        for label, depth, vals, se in sorted(curves, key=lambda c: c[3] is not None):   # theory lines first
            base = label.split(" (simulation")[0]
            if se is not None and base in colors:         # a simulation of a drawn theory: same colour
                color = colors[base]
            else:
                color = style.COLORS[used % len(style.COLORS)]
                used += 1
            if se is not None:                            # a simulation passed as a trajectory
                errorbars(ax, depth, vals, se, label=f"{label}, ±{z:g} s.e.", color=color,
                          marker=style.MARKERS[(used - 1) % 8], z=z)
            else:
                ax.plot(depth, vals, color=color, linestyle=style.LINESTYLES[(used - 1) % len(style.LINESTYLES)],
                        label=label)
            colors.setdefault(base, color)
        if simulations is not None:
            sims = (list(zip([lab for lab, _ in theory], simulations)) if isinstance(simulations, (list, tuple))
                    and not _is_triple(simulations) and len(simulations) == len(theory)
                    else _named(simulations, None, "simulation"))
            for j, (label, triple) in enumerate(sims):
                if len(triple) != 3:
                    raise SpecError("simulations", label, "each entry must be (depth, mean, stderr) arrays")
                if label in colors:
                    color = colors[label]
                else:
                    color = style.COLORS[used % len(style.COLORS)]
                    used += 1
                errorbars(ax, *triple, label=f"{label} (simulation), ±{z:g} s.e.", color=color,
                          marker=style.MARKERS[j % 8], z=z)
        ax.set_xlabel(BLOCK_LABEL)
        ax.set_ylabel(ylabel or (measure_label(measure) + (f", position {position}" if position is not None else "")))
        if not logx:
            ax.set_xlim(left=0)
        else:
            style.log_ticks(ax.xaxis)
        if logy:
            style.log_ticks(ax.yaxis)
        style.legend(ax, legend if len(ax.get_legend_handles_labels()[0]) > 1 else None)
    return fig
