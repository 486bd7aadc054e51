"""Human-readable summaries of a trajectory (rich tables); the library itself prints nothing."""

from __future__ import annotations

import numpy as np
from rich.table import Table

DEFAULT_COLUMNS = ("q_mean", "cos_mean", "cos_min", "rank_one_distance", "stable_rank", "effective_rank")
HEADERS = {"q_mean": "q mean", "cos_mean": "cos mean", "cos_min": "cos min", "rank_one_distance": "dist. to\nrank one",
           "stable_rank": "stable\nrank", "effective_rank": "effective\nrank", "quad_error": "approx.\nerror",
           "ntk_mean": "NTK\nmean", "ntk_cond": "NTK\ncond."}


def pick_rows(n: int, most: int = 24) -> list:
    """Indices of at most ``most`` records: the first few, log-spaced ones, and the last."""
    most = max(int(most), 2)
    if n <= most:
        return list(range(n))
    head = min(4, most - 1)
    idx = set(range(head)) | {n - 1}
    if most - head - 1 > 0:
        idx |= set(np.unique(np.geomspace(head, n - 1, most - head - 1).astype(int)).tolist())
    return sorted(idx)


def summary_table(traj, columns=DEFAULT_COLUMNS, most: int = 24, title: str | None = None) -> Table:
    cols = [c for c in columns if c in traj.measures]
    table = Table(title=title, show_lines=False, header_style="bold")
    table.add_column("record", justify="left")
    if np.any(traj.measures.get("quad_error", np.zeros(1)) > 0):
        cols.append("quad_error")
    for c in cols:
        table.add_column(HEADERS.get(c, c), justify="right")
    for r in pick_rows(len(traj), most):
        table.add_row(traj.labels[r], *(f"{traj.measures[c][r]:.5g}" for c in cols))
    return table


def depth_rows(traj, most: int = 16) -> list:
    """Record indices of at most ``most`` depth records (input and whole blocks) of ``traj``, spread
    as :func:`pick_rows` spreads them."""
    records = traj.depth_records()
    return [records[i] for i in pick_rows(len(records), most)]


def gradients_table(g, most: int = 16, title: str | None = None) -> Table:
    """Gradient-kernel norm and cosine per record of a
    :class:`~kernelprop.kernel.backward.GradientTrajectory`, with the per-block parameter-gradient
    norms of each kind (:func:`kernelprop.io.gradient_rows`)."""
    from .io.tables import gradient_rows
    header, rows = gradient_rows(g)
    kinds = header[4:]
    table = Table(title=title, header_style="bold")
    for c in ["record", "grad norm²", "grad cos", *(k.removeprefix("param_") for k in kinds)]:
        table.add_column(c, justify="right" if c != "record" else "left")
    for r in pick_rows(len(rows), most):
        label, _, q, cos, *vals = rows[r]
        table.add_row(label, f"{q:.5g}", f"{cos:.5g}", *("" if v != v else f"{v:.4g}" for v in vals))
    return table


def moments_table(g, moments: dict, most: int = 16, title: str | None = None) -> Table:
    """The moment view (μ, σ², r; σ_g², r_g) at the records of ``g``."""
    from .io.tables import moment_rows
    _, rows = moment_rows(g, moments)
    table = Table(title=title, header_style="bold")
    table.add_column("record")
    for c in ("μ", "σ²", "r", "σ_g²", "r_g"):
        table.add_column(c, justify="right")
    for r in pick_rows(len(rows), most):
        label, _, *vals = rows[r]
        table.add_row(label, *(f"{v:.5g}" for v in vals))
    return table


def comparison_table(trajectories: dict, measure: str, records, title: str | None = None, names=None) -> Table:
    """``measure`` of several trajectories (``{name: Trajectory}``, columns ``names``, default all)
    side by side at the record indices ``records``, one row per block."""
    from .io.tables import comparison_rows
    header, rows = comparison_rows(trajectories, measure, records, names)
    table = Table(title=title, header_style="bold")
    table.add_column("block")
    for name in header[1:]:
        table.add_column(name, justify="right")
    for block, *vals in rows:
        table.add_row(str(block), *(f"{v:.5g}" for v in vals))
    return table


def presets_table(presets) -> Table:
    """Named presets (:class:`~kernelprop.methods.presets.Preset`, e.g. ``PRESETS.values()``) with
    their knobs and sources."""
    table = Table(header_style="bold")
    for c in ("preset", "what it is", "knobs", "source"):
        table.add_column(c)
    for p in presets:
        knobs = ", ".join(f"{k}={v}" for k, v in p.knobs.items()) or "-"
        table.add_row(p.name, p.summary, knobs, p.source)
    return table


def verdict(cmp) -> str:
    """One line (rich markup): AGREE or DISAGREE, with the largest |z| or the first failing comparison."""
    if cmp.agree:
        return (f"[green]AGREE[/green]: all {cmp.n_tested} comparisons within the criterion "
                f"(max |z| = {cmp.max_abs_z:.2f}, k = {cmp.k:.2f})")
    f = cmp.failures[0]
    return (f"[red]DISAGREE[/red]: {len(cmp.failures)} of {cmp.n_tested} comparisons outside "
            f"|z| <= {cmp.k:.2f}; first: {f.label} {f.measure} {f.position} (theory {f.theory:.6g}, "
            f"simulation {f.estimate:.6g} ± {f.se:.2g})")
