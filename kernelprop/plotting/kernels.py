"""Token kernels at chosen depths: heatmaps of Σ (or its cosines) and eigenvalue spectra.

The source is a :class:`~kernelprop.Trajectory` with kernels kept, the path of an ``.npz`` written
by ``kernelprop run -o x.npz``, or a mapping with arrays ``kernels`` (R, N, N), ``labels`` (R,) and
optionally ``blocks`` and ``segments``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from ..errors import SpecError
from . import style
from .depth import block_records


def kernel_records(source) -> dict:
    """``{"kernels", "labels", "blocks", "segments", "records"}`` from a trajectory, an .npz path or a
    mapping (``records``: the trajectory's structured records, None from a file)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix.lower() != ".npz":
            raise SpecError("kernels", str(path), "kernels are read from an .npz written by `kernelprop run -o x.npz`")
        try:
            with np.load(path, allow_pickle=False) as z:
                source = {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            raise SpecError("kernels", str(path), f"cannot be read as .npz ({exc})") from None
    if isinstance(source, Mapping):
        if "kernels" not in source:
            raise SpecError("kernels", sorted(source), "no `kernels` array: write the run as .npz")
        kernels = np.asarray(source["kernels"], dtype=float)
        labels = [str(x) for x in source.get("labels", [f"record {r}" for r in range(len(kernels))])]
        blocks = np.asarray(source.get("blocks", np.arange(len(kernels))))
        segments = tuple(int(t) for t in source.get("segments", [kernels.shape[-1]]))
    else:
        kept = getattr(source, "kernels", None)
        if kept is None:
            raise SpecError("kernels", type(source).__name__, "has no kernels: propagate with keep_kernels=True")
        kernels = kept
        labels, blocks, segments = list(source.labels), np.asarray(source.blocks), tuple(source.segments)
    if kernels.ndim != 3 or kernels.shape[1] != kernels.shape[2]:
        raise SpecError("kernels", f"array of shape {kernels.shape}", "must be (records, N, N)")
    records = source.get("records") if isinstance(source, Mapping) else getattr(source, "records", None)
    return {"kernels": kernels, "labels": labels, "blocks": blocks, "segments": segments, "records": records or None}


def pick_depths(rec: dict, depths=None, most: int = 4) -> list[tuple[int, str]]:
    """``[(record, title)]`` for the requested block indices (0 = input) or record labels; by default
    up to ``most`` block records spread evenly (first, last and between)."""
    records, depth = block_records(rec["labels"], rec["blocks"], rec.get("records"))
    if depths is None:
        if len(records) == 0:
            records, depth = np.arange(len(rec["labels"])), np.arange(len(rec["labels"]))
        idx = np.unique(np.round(np.linspace(0, len(records) - 1, min(most, len(records)))).astype(int))
        return [(int(records[i]), _title(rec["labels"][records[i]])) for i in idx]
    out = []
    for d in depths:
        if isinstance(d, str) and d in rec["labels"]:
            r = rec["labels"].index(d)
        else:
            try:
                d_int = int(d)
            except (TypeError, ValueError):
                d_int = None
            hit: np.ndarray | list[int] = np.flatnonzero(depth == d_int) if d_int is not None else []
            if len(hit) == 0:
                raise SpecError("depths", d, f"is not a recorded block; recorded: {_ranges(depth)} "
                                f"(0 = input)")
            r = int(records[hit[0]])
        out.append((r, _title(rec["labels"][r])))
    return out


def _ranges(values) -> str:
    """``"0-32"`` or ``"0, 4-8, 16"``: a compact list of whole numbers."""
    out, vals = [], sorted(set(int(v) for v in values))
    start: int | None = None
    prev: int | None = None
    for v in [*vals, None]:
        if start is not None and prev is not None and (v is None or v != prev + 1):
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if v is not None and start is None:
            start = v
        prev = v
    return ", ".join(out)


def _title(label: str) -> str:
    return label.replace("block ", "block $l$ = ") if label.startswith("block ") and "·" not in label else label


def cosine_matrix(k: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.clip(np.diag(k), 1e-300, None))
    return np.clip(k / d[:, None] / d[None, :], -1.0, 1.0)


def _grid(n: int):
    if n <= 3:
        return 1, n
    if n == 4:
        return 2, 2
    return math.ceil(n / 3), 3


def kernel_heatmaps(source, depths=None, *, ax=None, cosine: bool = True, cmap: str | None = None,
                    width: float = style.COLUMN_WIDTH):
    """Heatmaps of the token kernel at chosen depths, one panel per depth, one shared colour bar.

    ``depths``: block indices (0 = input) or record labels; default up to four spread over the run.
    ``cosine`` shows ``Σ_ij/sqrt(Σ_ii Σ_jj)`` (comparable across depths); ``False`` shows Σ itself.
    ``ax``: one axes per depth (a single axes for a single depth). Returns the figure.
    """
    rec = kernel_records(source)
    picks = pick_depths(rec, depths)
    mats = [cosine_matrix(rec["kernels"][r]) if cosine else rec["kernels"][r] for r, _ in picks]
    lo = min(float(m.min()) for m in mats)
    hi = max(float(m.max()) for m in mats)
    if cosine:
        if lo < -1e-9:
            cmap, vmin, vmax = cmap or "RdBu_r", -1.0, 1.0
        else:
            cmap, vmin, vmax = cmap or "viridis", 0.0, 1.0
        label = r"cosine $\Sigma_{ij}/\sqrt{\Sigma_{ii}\Sigma_{jj}}$"
    else:
        m = max(abs(lo), abs(hi))
        cmap, vmin, vmax = (cmap or "RdBu_r", -m, m) if lo < -1e-9 * m else (cmap or "viridis", 0.0, hi)
        label = r"kernel $\Sigma_{ij}$"
    with style.paper_style():
        axes: np.ndarray | list     # a grid of new axes, or the ones given
        if ax is None:
            import matplotlib.pyplot as plt
            rows, cols = _grid(len(picks))
            panel = min((width - 1.0) / cols, 1.75)      # 1 in: tick labels, axis label and the colour bar
            fig, axes = plt.subplots(rows, cols, figsize=(width, rows * (panel + 0.25) + 0.3), squeeze=False,
                                     sharex=True, sharey=True)
            axes = axes.ravel()
            for extra in axes[len(picks):]:
                extra.set_visible(False)
            axes = axes[:len(picks)]
        else:
            axes = list(ax) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
            if len(axes) != len(picks):
                raise SpecError("ax", f"{len(axes)} axes", f"needs one axes per depth ({len(picks)})")
            fig = axes[0].figure
        n = mats[0].shape[0]
        cols = _grid(len(picks))[1] if ax is None else len(axes)
        for i, (a, mat, (_, title)) in enumerate(zip(axes, mats, picks)):
            im = a.imshow(mat, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", origin="upper",
                          extent=(-0.5, n - 0.5, n - 0.5, -0.5))
            a.grid(False)
            a.set_title(title, pad=2)
            a.set_aspect("equal")
            for edge in np.cumsum(rec["segments"])[:-1]:
                a.axhline(edge - 0.5, color="white", lw=0.6)
                a.axvline(edge - 0.5, color="white", lw=0.6)
            for side in ("top", "right"):
                a.spines[side].set_visible(True)
            if ax is not None or i % cols == 0:
                a.set_ylabel("token $i$")
            if ax is not None or i >= len(picks) - cols:
                a.set_xlabel("token $j$")
            a.tick_params(length=2, pad=1)
            a.xaxis.set_major_locator(MaxNLocator(5, integer=True))
            a.yaxis.set_major_locator(MaxNLocator(5, integer=True))
        cb = fig.colorbar(im, ax=axes, shrink=0.9, pad=0.02, aspect=25)
        cb.set_label(label)
        cb.ax.tick_params(length=2)
    return fig


def spectrum_plot(source, depths=None, *, ax=None, normalise: bool = True, segment: int = 0,
                  legend: str | None = "above", floor: float = 1e-16):
    """Eigenvalues of the token kernel (of sequence ``segment``) in decreasing order, one line per depth.

    ``normalise`` divides by ``tr Σ`` (the spectrum then sums to one and depths are comparable).
    Eigenvalues below ``floor`` × tr Σ (zero up to float64 rounding) are drawn at that level, marked
    by a dotted line, so the log axis keeps them visible. Returns the figure.
    """
    rec = kernel_records(source)
    picks = pick_depths(rec, depths)
    starts = np.concatenate([[0], np.cumsum(rec["segments"])])
    if not 0 <= segment < len(rec["segments"]):
        raise SpecError("segment", segment, f"must lie in [0, {len(rec['segments']) - 1}]")
    sl = slice(starts[segment], starts[segment + 1])
    import matplotlib as mpl
    shades = mpl.colormaps["viridis"](np.linspace(0.0, 0.85, len(picks)))
    clipped, low = False, floor
    with style.paper_style():
        fig, ax = style.figure(ax)
        for (r, title), color, ls in zip(picks, shades, style.LINESTYLES * 4):
            k = rec["kernels"][r][sl, sl]
            lam = np.sort(np.linalg.eigvalsh(k))[::-1]
            if normalise:
                lam = lam / np.trace(k)
            low = floor * (1.0 if normalise else float(np.trace(k)))
            clipped = clipped or bool(np.any(lam < low))
            lam = np.clip(lam, low, None)
            ax.plot(np.arange(1, len(lam) + 1), lam, color=color, linestyle=ls, marker=".", markersize=2.5,
                    label=title)
        ax.set_yscale("log")
        if clipped and normalise:
            ax.axhline(low, color="0.45", lw=0.8, ls=":", zorder=0,
                       label=f"rounding ({style._plain(floor)}" + r"$\,$tr$\,\Sigma$)")
        ax.set_xlabel("eigenvalue index $k$ (decreasing)")
        ax.set_ylabel(r"eigenvalue $\lambda_k/\mathrm{tr}\,\Sigma$" if normalise
                      else r"eigenvalue $\lambda_k$ of $\Sigma$")
        style.legend(ax, legend if len(ax.get_legend_handles_labels()[0]) > 1 else None)
    return fig
