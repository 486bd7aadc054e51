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
    label, block, ``grad_q_mean``, ``grad_cos_mean``, ``grad_error`` (the relative error of the gradient kernel)
    and, at whole-block records, the block's summed parameter-gradient norms of each kind (``param_<kind>``;
    NaN elsewhere)."""
    kinds = sorted({k for *_, k, _ in g.grads})
    per = {k: dict(zip(*g.grad_norms(k))) for k in kinds}
    at_block = set(g.where(section="block", part=None))
    rows = []
    for r in range(len(g.labels)):
        vals = [per[k].get(g.blocks[r], float("nan")) if r in at_block else float("nan") for k in kinds]
        rows.append([g.labels[r], g.blocks[r], g["grad_q_mean"][r], g["grad_cos_mean"][r], g["grad_error"][r], *vals])
    return ["record", "block", "grad_q_mean", "grad_cos_mean", "grad_error", *(f"param_{k}" for k in kinds)], rows


MOMENTS = ("mu", "var", "r", "var_g", "r_g")


def moment_rows(g, moments: dict) -> tuple[list, list]:
    """``(header, rows)``: label, block and the moments (:func:`kernelprop.methods.moments.moment_view`
    of ``g``) at every record."""
    rows = [[g.labels[r], g.blocks[r], *(moments[n][r] for n in MOMENTS)] for r in range(len(g.labels))]
    return ["record", "block", *MOMENTS], rows


def comparison_rows(trajectories: dict, measure: str, records=None, names=None) -> tuple[list, list]:
    """``(header, rows)``: at each record index of ``records`` (whole-block records of the first
    trajectory; default: all of them, as files hold), the block index and ``measure`` of the
    trajectories ``{name: Trajectory}`` named in ``names`` (default: all, in order), each read at its
    own whole-block record of that block."""
    names = list(trajectories) if names is None else list(names)
    first = trajectories[names[0]]
    if records is None:
        records = first.depth_records()
    at = {n: {int(trajectories[n].blocks[r]): r for r in trajectories[n].depth_records()} for n in names}
    rows = []
    for r in records:
        block = int(first.blocks[r])
        rows.append([block, *(trajectories[n].measures[measure][at[n][block]] if block in at[n] else float("nan")
                              for n in names)])
    return ["block", *names], rows


PER_RECORD = {"gradients": ("record", "block", "grad_q_mean", "grad_cos_mean"),
              "moments": ("record", "block", *MOMENTS)}


def read_csv(path) -> tuple[str, list, np.ndarray, dict]:
    """A per-record table written by ``gradients`` or ``moments`` read back:
    ``(kind, labels, blocks, {column: values})`` (empty cells and 'nan' as NaN). :class:`SpecError`
    naming ``path`` if its header is neither kind's."""
    from ..errors import SpecError
    path = Path(path)
    lines = path.read_text().splitlines()
    header = lines[0].split(",") if lines else []
    kind = next((k for k, h in PER_RECORD.items() if tuple(header[:len(h)]) == h), None)
    if kind is None:
        raise SpecError("path", str(path), "is not a per-record table written by gradients or moments")
    cells = [line.split(",") for line in lines[1:] if line]
    labels = [c[0] for c in cells]
    blocks = np.array([int(c[1]) for c in cells])
    columns = {h: np.array([float(c[j]) if c[j] != "" else np.nan for c in cells]) for j, h in enumerate(header)
               if j >= 2}
    return kind, labels, blocks, columns
