"""A sweep as a rich table (the library itself prints nothing)."""

from __future__ import annotations

from rich.table import Table

from ..report import pick_rows
from .files import SweepResult


def summary_table(result: SweepResult, measure: str | None = None, most: int = 8):
    """A rich table of one measure: rows = first axis, columns = second axis (at most ``most`` each)."""
    measure = measure or result.measures[0]
    grid = result.values[measure]
    a = result.axes[0]
    fmt = (lambda ax, v: str(int(v)) if ax.is_depth else f"{v:.3g}")
    table = Table(title=f"{measure} ({'after block L' if result.at == 'block' else 'network output'})",
                  header_style="bold")
    if len(result.axes) == 1:
        table.add_column(a.name)
        table.add_column(measure, justify="right")
        for i in pick_rows(len(a.values), most):
            table.add_row(fmt(a, a.values[i]), f"{grid[i]:.5g}")
        return table
    b = result.axes[1]
    cols = pick_rows(len(b.values), most)
    table.add_column(f"{a.name} \\ {b.name}")
    for j in cols:
        table.add_column(fmt(b, b.values[j]), justify="right")
    for i in pick_rows(len(a.values), most):
        table.add_row(fmt(a, a.values[i]), *(f"{grid[i, j]:.3g}" for j in cols))
    return table
