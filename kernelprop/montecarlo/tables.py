"""Rich tables for the command line: a simulation summary and theory-against-simulation."""

from __future__ import annotations

import math

import numpy as np
from rich.table import Table

from ..report import pick_rows
from .compare import TESTED

SIM_COLUMNS = ("q_mean", "cos_mean", "rank_one_distance", "stable_rank", "dong_residual")


def _pm(v, se):
    return f"{v:.5g} ± {se:.2g}" if np.isfinite(se) else f"{v:.5g}"


def simulation_table(sim, columns=SIM_COLUMNS, most: int = 24, title: str | None = None) -> Table:
    """Seed mean ± standard error of the main measures at (at most ``most``) records."""
    cols = [c for c in columns if c in sim.measures]
    table = Table(title=title, header_style="bold")
    table.add_column("record")
    for c in cols:
        table.add_column(c, justify="right")
    for r in pick_rows(len(sim), most):
        table.add_row(sim.labels[r], *(_pm(sim.measures[c][r], sim.stderr[c][r]) for c in cols))
    return table


def comparison_table(cmp, most: int = 24, title: str | None = None) -> Table:
    """Per record and tested measure: the largest |z| over its entries (✗ where the criterion fails).

    The measures marked "info" in :mod:`.compare` are left out here; ``rows_table`` lists them."""
    worst = cmp.worst()
    names = ["kernel", "mean"] + [m for m in TESTED if any(k[1] == m for k in worst)]
    return z_table(cmp, names, [m + " |z|" for m in names], most, title)


def z_table(cmp, names, headings, most: int = 24, title: str | None = None) -> Table:
    """Per record (at most ``most`` plus every failing one) the largest |z| of each measure in ``names``."""
    worst = cmp.worst()
    failing = {r.record for r in cmp.failures}
    records = sorted(set(pick_rows(len(cmp.labels), most)) | failing)
    table = Table(title=title, header_style="bold", caption=cmp.criterion())
    table.add_column("record")
    for h in headings:
        table.add_column(h, justify="right")
    for r in records:
        cells = []
        for m in names:
            row = worst.get((r, m))
            if row is None:
                cells.append("")
                continue
            z = "inf" if not math.isfinite(row.z) else f"{abs(row.z):.2f}"
            cells.append(z if (row.ok or not row.tested) else f"[red]{z} ✗[/red]")
        table.add_row(cmp.labels[r], *cells)
    return table


def rows_table(cmp, only_tested: bool = False) -> Table:
    """Every comparison: theory, estimate, SE, z, estimated bias at width d, verdict."""
    table = Table(header_style="bold", caption=cmp.criterion())
    for c in ("record", "measure", "position", "theory", "simulation", "se", "z", "bias(d)", "verdict"):
        table.add_column(c, justify="left" if c in ("record", "measure", "verdict") else "right")
    for row in cmp.rows:
        if only_tested and not row.tested:
            continue
        pos = "" if row.position == "" else str(tuple(int(i) for i in row.position)) \
            if isinstance(row.position, tuple) else str(row.position)
        verdict = "info" if not row.tested else ("ok" if row.ok else "[red]FAIL[/red]")
        table.add_row(row.label, row.measure, pos, f"{row.theory:.6g}", f"{row.estimate:.6g}", f"{row.se:.2g}",
                      f"{row.z:.2f}", f"{row.bias:.2g}", verdict)
    return table
