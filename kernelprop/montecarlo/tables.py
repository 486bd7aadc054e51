"""Rich tables for the command line: a simulation summary and theory-against-simulation."""

from __future__ import annotations

import math

import numpy as np
from rich.table import Table

from ..report import HEADERS, fit, num, pick_rows, safe
from .compare import TESTED

SIM_COLUMNS = ("q_mean", "cos_mean", "rank_one_distance", "stable_rank", "dong_residual")


def _pm(v, se, digits: int = 5):
    return f"{num(v, digits)} ± {num(se, 2)}" if np.isfinite(se) else num(v, digits)


def _table(title, caption=None) -> Table:
    """A table; ``title`` is rich markup, escaped by the caller (:func:`kernelprop.report.safe`)."""
    return Table(title=title, caption=caption, header_style="bold",
                 caption_justify="left")


def simulation_table(sim, columns=SIM_COLUMNS, most: int = 24, title: str | None = None,
                     width: int | None = None) -> Table:
    """Seed mean ± standard error of the main measures at (at most ``most``) records, fitted to
    ``width`` (:func:`kernelprop.report.fit`: fewer digits or a tighter layout, never a cut cell)."""
    cols = [c for c in columns if c in sim.measures]
    rows = pick_rows(len(sim), most)

    def build(digits):
        table = _table(title)
        table.add_column("record")
        for c in cols:
            table.add_column(HEADERS.get(c, c.replace("_", " ")), justify="right", no_wrap=True)
        for r in rows:
            table.add_row(safe(sim.labels[r]), *(_pm(sim.measures[c][r], sim.stderr[c][r], digits) for c in cols))
        return table
    return fit(build, width)


def comparison_table(cmp, most: int = 24, title: str | None = None, width: int | None = None) -> Table:
    """Per record and tested measure: the largest |z| over its entries (✗ where the criterion fails).

    The measures marked "info" in :mod:`.compare` are left out here; ``rows_table`` lists them."""
    worst = cmp.worst()
    names = ["kernel", "mean"] + [m for m in TESTED if any(k[1] == m for k in worst)]
    return z_table(cmp, names, [HEADERS.get(m, m.replace("_", " ")) + "\n|z|" for m in names], most, title, width)


def z_table(cmp, names, headings, most: int = 24, title: str | None = None, width: int | None = None) -> Table:
    """Per record (at most ``most`` plus every failing one) the largest |z| of each measure in ``names``,
    fitted to ``width`` (:func:`kernelprop.report.fit`)."""
    worst = cmp.worst()
    failing = {r.record for r in cmp.failures}
    records = sorted(set(pick_rows(len(cmp.labels), most)) | failing)
    return fit(lambda digits: _z_rows(cmp, names, headings, records, worst, title), width)


def _z_rows(cmp, names, headings, records, worst, title) -> Table:
    table = _table(title, cmp.criterion())
    table.add_column("record")
    for h in headings:
        table.add_column(h, justify="right", no_wrap=True)
    for r in records:
        cells = []
        for m in names:
            row = worst.get((r, m))
            if row is None:
                cells.append("")
                continue
            z = "inf" if not math.isfinite(row.z) else f"{abs(row.z):.2f}"
            cells.append(z if (row.ok or not row.tested) else f"[red]{z} ✗[/red]")
        table.add_row(safe(cmp.labels[r]), *cells)
    return table


def rows_table(cmp, only_tested: bool = False, width: int | None = None) -> Table:
    """Every comparison: theory, estimate, SE, z, estimated bias at width d, verdict; fitted to ``width``."""
    def build(digits):
        table = _table(None, cmp.criterion())
        for c in ("record", "measure", "position", "theory", "simulation", "se", "z", "bias(d)", "verdict"):
            left = c in ("record", "measure", "verdict")
            table.add_column(c, justify="left" if left else "right", no_wrap=not left)
        for row in cmp.rows:
            if only_tested and not row.tested:
                continue
            pos = "" if row.position == "" else str(tuple(int(i) for i in row.position)) \
                if isinstance(row.position, tuple) else str(row.position)
            verdict = "info" if not row.tested else ("ok" if row.ok else "[red]FAIL[/red]")
            table.add_row(safe(row.label), row.measure, pos, num(row.theory, digits + 1), num(row.estimate, digits + 1),
                          num(row.se, 2), f"{row.z:.2f}", num(row.bias, 2), verdict)
        return table
    return fit(build, width)
