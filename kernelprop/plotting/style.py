"""The package figure style: single-column width, colour-blind-safe colours, embedded TrueType fonts.

* width :data:`COLUMN_WIDTH` = 3.5 in (one column of a two-column paper), 8 pt text;
* colours: the Okabe & Ito (2008) palette, paired with line styles so curves stay distinct in
  greyscale print; sequential/diverging data use ``viridis`` / ``RdBu_r``;
* ``pdf.fonttype = 42`` (TrueType embedded in PDF/PS, text stays editable and searchable);
  no LaTeX needed: symbols use matplotlib's mathtext.

Use :func:`paper_style` as a context manager, :func:`use` to set it globally, and :func:`save` to
write a figure (the font type is read when the file is written, so save through :func:`save` or
inside :func:`paper_style`).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import matplotlib as mpl
import numpy as np
from cycler import cycler

COLUMN_WIDTH = 3.5       # inches: one column of a two-column paper
FULL_WIDTH = 7.0         # inches: both columns
HEIGHT = 2.4             # inches: default single-panel height

#: Okabe & Ito (2008) colour-blind-safe palette, in the order the cycle uses it (yellow last: weak on white).
OKABE_ITO = {
    "blue": "#0072B2", "vermillion": "#D55E00", "bluish green": "#009E73", "reddish purple": "#CC79A7",
    "orange": "#E69F00", "sky blue": "#56B4E9", "black": "#000000", "yellow": "#F0E442",
}
COLORS = list(OKABE_ITO.values())
LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (8, 2))]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]

RC = {
    "figure.figsize": (COLUMN_WIDTH, HEIGHT),
    "figure.dpi": 150,
    "figure.constrained_layout.use": True,
    "savefig.dpi": 300,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "legend.handlelength": 2.4,
    "legend.columnspacing": 1.2,
    "text.usetex": False,
    "mathtext.fontset": "dejavusans",
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "svg.fonttype": "none",
    "axes.prop_cycle": cycler(color=COLORS) + cycler(linestyle=LINESTYLES),
    "axes.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.35,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.0,
    "errorbar.capsize": 1.5,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.minor.width": 0.4,
    "ytick.minor.width": 0.4,
    "image.cmap": "viridis",
}

FIGURE_FORMATS = (".pdf", ".png", ".svg")


@contextlib.contextmanager
def paper_style():
    """Context manager applying :data:`RC` (on top of matplotlib's defaults).

    An interactive-mode switch made inside is kept: Jupyter's inline backend turns interactive mode on
    with the session's first figure, and restoring it on exit would hide every later figure."""
    inside = mpl.is_interactive()
    try:
        with mpl.rc_context(RC):
            try:
                yield
            finally:
                inside = mpl.is_interactive()
    finally:
        mpl.interactive(inside)


def use():
    """Apply the package style globally (``matplotlib.rcParams``)."""
    mpl.rcParams.update(RC)


def figure(ax=None, *, width: float = COLUMN_WIDTH, height: float = HEIGHT):
    """``(fig, ax)``: the given axes and its figure, or a new single-panel figure at column width."""
    if ax is not None:
        return ax.figure, ax
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(width, height))
    return fig, ax


def check_format(path, field: str = "figure") -> str:
    """The figure format of ``path`` from its extension; :class:`SpecError` naming ``field`` if unsupported."""
    from ..errors import SpecError
    suffix = Path(path).suffix.lower()
    if suffix not in FIGURE_FORMATS:
        raise SpecError(field, str(path), f"extension must be one of {list(FIGURE_FORMATS)}")
    return suffix[1:]


def render(fig, fmt: str) -> bytes:
    """The figure as bytes in format ``fmt`` (pdf, png, svg), written with the package style."""
    buf = io.BytesIO()
    with paper_style():
        fig.savefig(buf, format=fmt)
    return buf.getvalue()


def save(fig, path) -> Path:
    """Write ``fig`` to ``path`` (format from the extension), atomically and with embedded TrueType fonts."""
    from ..io.results import atomic_write
    path = Path(path)
    atomic_write(path, render(fig, check_format(path)))
    return path


def legend(ax, where: str | None = "above", ncol: int | None = None, **kw):
    """A legend that does not cover data: ``"above"`` the axes (default), ``"right"`` of them,
    ``"best"`` inside (matplotlib's least-overlap spot) or ``None`` (no legend)."""
    handles, labels = ax.get_legend_handles_labels()
    if where is None or not handles:
        return None
    n = len(handles)
    if where == "above":
        ncol = ncol or (n if n <= 3 else 3 if n in (5, 6, 9) else min(n, 4) if n <= 8 else 4)
        while True:
            order = _row_major(n, ncol)       # matplotlib fills columns first; read the legend row by row
            leg = ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="lower center",
                            bbox_to_anchor=(0.5, 1.01), ncol=ncol, borderaxespad=0.2, **kw)
            if ncol == 1 or _legend_width(leg) <= 0.98 * ax.figure.get_figwidth():
                return leg
            ncol -= 1                         # too wide for the figure: fewer columns, more rows
    if where == "right":
        return ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=ncol or 1,
                         borderaxespad=0.0, **kw)
    if where == "best":
        return ax.legend(handles, labels, loc="best", ncol=ncol or 1, **kw)
    from ..errors import SpecError
    raise SpecError("legend", where, 'must be "above", "right", "best" or None')


def _legend_width(leg) -> float:
    """Width of a legend in inches."""
    fig = leg.figure
    renderer = fig.canvas.get_renderer()
    return leg.get_window_extent(renderer).width / fig.dpi


def _row_major(n: int, ncol: int) -> list:
    """Handle order that makes matplotlib's column-first legend read row by row."""
    rows = -(-n // ncol)
    return [i * ncol + j for j in range(ncol) for i in range(rows) if i * ncol + j < n]


def log_ticks(axis):
    """Readable ticks on a log ``axis`` (``ax.xaxis``/``ax.yaxis``): plain numbers (1, 10, 0.5) at
    1-2-5 steps when the axis spans under two decades, at powers of ten otherwise; minor ticks unlabelled."""
    from matplotlib.ticker import FuncFormatter, LogFormatterMathtext, LogLocator, NullFormatter
    lo, hi = sorted(axis.get_view_interval())
    decades = (np.log10(hi) - np.log10(lo)) if lo > 0 else 3.0
    subs = (1.0, 2.0, 5.0) if decades < 2.0 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    plain = lo > 0 and 1e-3 <= lo and hi < 1e4       # small range of ordinary numbers: 0.01, 1, 100
    axis.set_major_formatter(FuncFormatter(_plain) if plain else LogFormatterMathtext())
    axis.set_minor_formatter(NullFormatter())


def _plain(v, _pos=None) -> str:
    if v == 0:
        return "0"
    e = np.log10(abs(v))
    if -3 <= e < 4:
        return f"{v:g}"
    m, k = f"{v:.0e}".split("e")
    return f"${m}\\times10^{{{int(k)}}}$" if m not in ("1", "-1") else f"$10^{{{int(k)}}}$"
