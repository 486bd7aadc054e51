"""Small per-record tables as ``.csv`` (the files of ``gradients``, ``moments`` and ``compare``):
one row per record, floats with full precision; see docs/formats.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .results import atomic_write


def write_csv(path, header: list, rows) -> Path:
    """Write ``header`` and ``rows`` as a small .csv, atomically (floats as ``repr``: full precision)."""
    path = Path(path)
    cell = lambda v: repr(float(v)) if isinstance(v, (float, np.floating)) else str(v)   # noqa: E731
    lines = [",".join(header)] + [",".join(cell(v) for v in row) for row in rows]
    atomic_write(path, ("\n".join(lines) + "\n").encode())
    return path


def gradient_rows(g) -> tuple[list, list]:
    """``(header, rows)`` of a :class:`~kernelprop.kernel.backward.GradientTrajectory`: per record its
    label, block, ``grad_q_mean``, ``grad_cos_mean`` and, at whole-block records, the block's summed
    parameter-gradient norms of each kind (``param_<kind>``; NaN elsewhere)."""
    kinds = sorted({k for *_, k, _ in g.grads})
    per = {k: dict(zip(*g.grad_norms(k))) for k in kinds}
    at_block = set(g.where(section="block", part=None))
    rows = []
    for r in range(len(g.labels)):
        vals = [per[k].get(g.blocks[r], float("nan")) if r in at_block else float("nan") for k in kinds]
        rows.append([g.labels[r], g.blocks[r], g["grad_q_mean"][r], g["grad_cos_mean"][r], *vals])
    return ["record", "block", "grad_q_mean", "grad_cos_mean", *(f"param_{k}" for k in kinds)], rows


MOMENTS = ("mu", "var", "r", "var_g", "r_g")


def moment_rows(g, moments: dict) -> tuple[list, list]:
    """``(header, rows)``: label, block and the moments (:func:`kernelprop.methods.moments.moment_view`
    of ``g``) at every record."""
    rows = [[g.labels[r], g.blocks[r], *(moments[n][r] for n in MOMENTS)] for r in range(len(g.labels))]
    return ["record", "block", *MOMENTS], rows


def comparison_rows(trajectories: dict, measure: str, records, names=None) -> tuple[list, list]:
    """``(header, rows)``: at each record index of ``records`` (whole-block records of the first
    trajectory), the block index and ``measure`` of the trajectories ``{name: Trajectory}`` named in
    ``names`` (default: all, in order)."""
    names = list(trajectories) if names is None else list(names)
    first = trajectories[names[0]]
    rows = [[first.blocks[r], *(trajectories[n].measures[measure][r] for n in names)] for r in records]
    return ["block", *names], rows
