"""Human-readable summaries of a trajectory (rich tables); the library itself prints nothing."""

from __future__ import annotations

import numpy as np
from rich.table import Table

DEFAULT_COLUMNS = ("q_mean", "cos_mean", "cos_min", "rank_one_distance", "stable_rank", "effective_rank")
HEADERS = {"q_mean": "q mean", "cos_mean": "cos mean", "cos_min": "cos min", "rank_one_distance": "dist. to\nrank one",
           "stable_rank": "stable\nrank", "effective_rank": "effective\nrank", "quad_error": "approx.\nerror"}


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
