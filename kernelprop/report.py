"""Human-readable summaries of a trajectory (rich tables); the library itself prints nothing.

Every table here is built to be printed whole: numbers are formatted to significant digits
(scientific notation with the full exponent when needed, :func:`num`), never cut; :func:`fit` picks the
most digits (5, 4 or 3) whose table fits the width and otherwise sets the table to its natural width
(print it with ``crop=False``: the lines are longer, no cell is truncated). Text that comes from the
user (names, labels, error messages) goes through :func:`safe`: markup escaped, control characters
shown as ``\\xNN``. Sampled rows are said in the caption; the last block is always a row.
"""

from __future__ import annotations

import io
import re

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

DEFAULT_COLUMNS = ("q_mean", "cos_mean", "cos_min", "rank_one_distance", "stable_rank", "effective_rank")
HEADERS = {"q_mean": "q mean", "cos_mean": "cos mean", "cos_min": "cos min", "rank_one_distance": "dist. to\nrank one",
           "stable_rank": "stable\nrank", "effective_rank": "effective\nrank", "quad_error": "approx.\nerror",
           "ntk_mean": "NTK\nmean", "ntk_cond": "NTK\ncond."}
DIGITS = (5, 4, 3)       # significant digits tried, most first, until a table fits its width


def num(v, digits: int = 5) -> str:
    """``v`` to ``digits`` significant digits (``%g``: scientific notation below 1e-4 and from
    10^digits on, exponent written in full without '+' or leading zeros, e.g. ``2.2253e-14``, ``1e5``);
    ``nan``, ``inf``, ``-inf`` as such."""
    v = float(v)
    if not np.isfinite(v):
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
    s = f"{v:.{digits}g}"
    if "e" in s:
        mantissa, exponent = s.split("e")
        s = f"{mantissa}e{int(exponent)}"
    return s


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text) -> str:
    """``text`` with its control characters (escape sequences, bells, carriage returns…; not newline
    or tab) written as ``\\xNN``, so none reaches the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def safe(text) -> str:
    """``text`` fit for rich markup: :func:`printable`, then markup brackets escaped, so it prints literally."""
    return escape(printable(text))


def natural_width(table: Table) -> int:
    """Width in cells of ``table`` with no cell wrapped or cut."""
    console = Console(width=100_000, file=io.StringIO(), color_system=None)
    return Measurement.get(console, console.options, table).maximum


# (significant digits, layout) tried in turn until a table fits, digits first: boxed (rich's default),
# open (no outer edge, blank column rules), tight (open, no cell padding: one blank between columns)
LAYOUTS = ((5, "boxed"), (5, "open"), (5, "tight"), (4, "open"), (4, "tight"), (3, "open"), (3, "tight"))


def _layout(table: Table, layout: str) -> None:
    if layout != "boxed":
        table.box = box.SIMPLE_HEAD
        table.show_edge = False
        table.padding = (0, 1) if layout == "open" else (0, 0)
        table.pad_edge = False


def fit(build, width: int | None) -> Table:
    """``build(digits)`` (a :class:`Table`) with the most digits and the roomiest layout of
    :data:`LAYOUTS` whose natural width is at most ``width``; if none fits, the last with
    ``table.width`` set to its natural width, so that rich neither cuts nor wraps a cell (print it
    with ``crop=False``: the lines are longer than ``width``)."""
    if width is None:
        table = build(DIGITS[0])
        table.digits = DIGITS[0]    # type: ignore[attr-defined]
        return table
    for digits, layout in LAYOUTS:
        table = build(digits)
        _layout(table, layout)
        table.digits = digits       # type: ignore[attr-defined]   # read by shown_digits
        need = natural_width(table)
        if need <= width:
            return table
    table.width = need
    return table


def shown_digits(table: Table) -> int:
    """The significant digits :func:`fit` chose for ``table``."""
    return int(getattr(table, "digits", DIGITS[0]))


def pick_rows(n: int, most: int = 24, keep=()) -> list:
    """Indices of at most ``most`` records (more if ``keep`` needs it): the first few, log-spaced
    ones, the indices ``keep`` (e.g. the last block) and the last."""
    most = max(int(most), 2)
    keep = {int(k) for k in keep if 0 <= int(k) < n}
    if n <= most:
        return list(range(n))
    room = max(most - len(keep - {n - 1}), 2)
    head = min(4, room - 1)
    idx = set(range(head)) | {n - 1} | keep
    if room - head - 1 > 0:
        idx |= set(np.unique(np.geomspace(head, n - 1, room - head - 1).astype(int)).tolist())
    return sorted(idx)


def sampled(shown: int, total: int, what: str = "records") -> str | None:
    """The caption of a table that shows ``shown`` of ``total`` rows (None if it shows them all)."""
    if shown >= total:
        return None
    return f"{shown} of {total} {what} shown: first, log-spaced, last block and last; -o FILE writes all"


def _last_block(traj) -> list:
    recs = traj.depth_records()
    return recs[-1:] if recs else []


def _table(title, caption) -> Table:
    return Table(title=None if title is None else safe(title), caption=caption, header_style="bold",
                 caption_justify="left")


def summary_table(traj, columns=DEFAULT_COLUMNS, most: int = 24, title: str | None = None,
                  width: int | None = None) -> Table:
    """The measures ``columns`` at up to ``most`` records of ``traj`` (:func:`pick_rows`, the last block
    always), fitted to ``width`` (:func:`fit`)."""
    cols = [c for c in columns if c in traj.measures]
    if np.any(traj.measures.get("quad_error", np.zeros(1)) > 0):
        cols.append("quad_error")
    picked = pick_rows(len(traj), most, keep=_last_block(traj))

    def build(digits):
        table = _table(title, sampled(len(picked), len(traj)))
        table.add_column("record", justify="left")
        for c in cols:
            table.add_column(HEADERS.get(c, c), justify="right", no_wrap=True)
        for r in picked:
            table.add_row(safe(traj.labels[r]), *(num(traj.measures[c][r], digits) for c in cols))
        return table
    return fit(build, width)


def depth_rows(traj, most: int = 16) -> list:
    """Record indices of at most ``most`` depth records (input and whole blocks) of ``traj``, spread
    as :func:`pick_rows` spreads them."""
    records = traj.depth_records()
    return [records[i] for i in pick_rows(len(records), most)]


def gradients_table(g, most: int = 16, title: str | None = None, width: int | None = None) -> Table:
    """Gradient-kernel norm and cosine per record of a
    :class:`~kernelprop.kernel.backward.GradientTrajectory`, with the per-block parameter-gradient
    norms of each kind (:func:`kernelprop.io.gradient_rows`; blank where a record is not a whole block)."""
    from .io.tables import gradient_rows
    header, rows = gradient_rows(g)
    kinds = header[5:]
    picked = pick_rows(len(rows), most, keep=_last_block(g))
    approx = any(rows[r][4] for r in range(len(rows)))     # an error column only where something is approximate

    def build(digits):
        table = _table(title, sampled(len(picked), len(rows)))
        for c in ["record", "grad norm²", "grad cos", *(["rel. error"] if approx else []),
                  *(k.removeprefix("param_") for k in kinds)]:
            table.add_column(c, justify="right" if c != "record" else "left", no_wrap=c != "record")
        for r in picked:
            label, _, q, cos, err, *vals = rows[r]
            table.add_row(safe(label), num(q, digits), num(cos, digits), *([f"{err:.1e}"] if approx else []),
                          *("" if v != v else num(v, digits) for v in vals))
        return table
    return fit(build, width)


STABLE_LOG_RATE = 0.01    # |ln(per-block factor)| at most this: the gradient is called stable


def check_gradients(g, names=("grad_q_mean", "grad_cos_mean")) -> None:
    """:class:`~kernelprop.errors.NumericalError` naming the record nearest the output (the first the
    backward pass reaches) where a measure of ``names`` is not finite."""
    from .errors import NumericalError
    bad = [r for r in range(len(g.labels)) if not all(np.isfinite(g.measures[n][r]) for n in names)]
    if not bad:
        return
    r = max(bad)
    depth = int(max(g.blocks[i] for i in g.depth_records()))
    blocks_back = depth - int(g.blocks[r])
    q_min, q_mean = float(g.measures["grad_q_min"][r]), float(g.measures["grad_q_mean"][r])
    values = ", ".join(f"{n} = {num(g.measures[n][r])}" for n in names)
    if q_min == 0.0 and q_mean > 0:
        problem = (f"{values}: the gradient of some token underflowed to 0 (grad q min = 0, grad q mean = "
                   f"{num(q_mean)}), so its cosines are 0/0, {blocks_back} blocks back from the output")
        remedy = (f"Lower the depth below {blocks_back} blocks (-L), or keep the tokens' gradients of one "
                  f"order (e.g. a bidirectional mask or normalised blocks)")
    else:
        problem = f"{values} after {blocks_back} blocks back from the output"
        remedy = "Lower the depth (-L), the weight variances or the branch weights, or add normalisation"
    raise NumericalError(safe(g.labels[r]), problem, remedy)


def gradient_diagnosis(g, digits: int = 5) -> str:
    """'vanishing', 'exploding' or 'stable' from two rows every gradients table shows: the ratio
    R = grad norm² at the input / grad norm² at the last block, each rounded to ``digits``
    significant digits as printed, and its per-block rate R^(1/L); stable when
    |ln R^(1/L)| ≤ 0.01 (:data:`STABLE_LOG_RATE`), exploding toward the input above, vanishing below.
    Also names the smallest and largest grad norm² over all records. Non-finite measures raise
    (:func:`check_gradients`)."""
    check_gradients(g)
    idx = g.depth_records()
    q = g.measures["grad_q_mean"]
    first, last = idx[0], idx[-1]
    depth = int(g.blocks[last])
    q_in, q_out = float(num(q[first], digits)), float(num(q[last], digits))
    lo, hi = int(np.argmin(q)), int(np.argmax(q))
    spread = (f"; smallest {num(q[lo], digits)} at {safe(g.labels[lo])}, largest {num(q[hi], digits)} at "
              f"{safe(g.labels[hi])}")
    if depth < 1:
        return f"none: no block to diagnose (grad norm² {num(q[first], digits)} at the input){spread}"
    if q_out == 0.0:
        return f"undefined: grad norm² 0 at {safe(g.labels[last])}, the ratio to it has no value{spread}"
    ratio = q_in / q_out
    rate = ratio ** (1.0 / depth)
    if ratio == 0.0:
        verdict = "vanishing toward the input"
    else:
        verdict = ("stable" if abs(np.log(rate)) <= STABLE_LOG_RATE else
                   "exploding toward the input" if rate > 1 else "vanishing toward the input")
    return (f"{verdict}: grad norm² {num(q_in, digits)} at the input / {num(q_out, digits)} at "
            f"{safe(g.labels[last])} = ×{num(ratio, digits)} over {depth} blocks, ×{num(rate, 4)} per block "
            f"(stable: ×{num(np.exp(-STABLE_LOG_RATE), 4)} to ×{num(np.exp(STABLE_LOG_RATE), 4)} per block)"
            f"{spread}")


def moments_table(g, moments: dict, most: int = 16, title: str | None = None, width: int | None = None) -> Table:
    """The moment view (μ, σ², r; σ_g², r_g) at the records of ``g``."""
    from .io.tables import moment_rows
    _, rows = moment_rows(g, moments)
    picked = pick_rows(len(rows), most, keep=_last_block(g))

    def build(digits):
        table = _table(title, sampled(len(picked), len(rows)))
        table.add_column("record")
        for c in ("μ", "σ²", "r", "σ_g²", "r_g"):
            table.add_column(c, justify="right", no_wrap=True)
        for r in picked:
            label, _, *vals = rows[r]
            table.add_row(safe(label), *(num(v, digits) for v in vals))
        return table
    return fit(build, width)


def comparison_table(trajectories: dict, measure: str, records, title: str | None = None, names=None,
                     width: int | None = None, total: int | None = None) -> Table:
    """``measure`` of several trajectories (``{name: Trajectory}``, columns ``names``, default all)
    side by side at the record indices ``records`` of the first, one row per block; ``total``: the
    number of depth records, for the caption when ``records`` samples them."""
    from .io.tables import comparison_rows
    header, rows = comparison_rows(trajectories, measure, records, names)

    def build(digits):
        table = _table(title, sampled(len(rows), total if total is not None else len(rows), "depths"))
        table.add_column("block")
        for name in header[1:]:
            table.add_column(safe(name), justify="right", no_wrap=True)
        for block, *vals in rows:
            table.add_row(str(block), *(num(v, digits) for v in vals))
        return table
    return fit(build, width)


def presets_table(presets) -> Table:
    """Named presets (:class:`~kernelprop.methods.presets.Preset`, e.g. ``PRESETS.values()``) with
    their knobs and sources."""
    table = Table(header_style="bold")
    for c in ("preset", "what it is", "knobs", "source"):
        table.add_column(c)
    for p in presets:
        knobs = ", ".join(f"{k}={v}" for k, v in p.knobs.items()) or "-"
        table.add_row(safe(p.name), safe(p.summary), safe(knobs), safe(p.source))
    return table


def verdict(cmp) -> str:
    """One line (rich markup): AGREE or DISAGREE, with the largest |z| or the first failing comparison."""
    if cmp.agree:
        return (f"[green]AGREE[/green]: all {cmp.n_tested} comparisons within the criterion "
                f"(max |z| = {cmp.max_abs_z:.2f}, k = {cmp.k:.2f})")
    f = cmp.failures[0]
    return (f"[red]DISAGREE[/red]: {len(cmp.failures)} of {cmp.n_tested} comparisons outside "
            f"|z| <= {cmp.k:.2f}; first: {safe(f.label)} {safe(f.measure)} {safe(f.position)} (theory "
            f"{num(f.theory, 6)}, simulation {num(f.estimate, 6)} ± {num(f.se, 2)})")
