"""Propagate the token kernel of a network through depth: the numeric engine's entry point."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import measures as M
from ..errors import NumericalError
from ..inputs import Inputs
from ..network.layers import Network
from .maps import Context, apply
from .state import KernelState

_TINY = 1e-250   # entries below this times the largest variance are flushed to 0 (no denormals)
_VANISH, _EXPLODE = 1e-150, 1e150


class Records:
    """Access shared by results with ``labels`` and ``measures``: ``r["cos_mean"]``, ``len(r)``, ``r.final``."""

    def __getitem__(self, name: str) -> np.ndarray:
        return self.measures[name]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def final(self) -> dict:
        """Measures at the last record."""
        return {k: v[-1] for k, v in self.measures.items()}


@dataclass(frozen=True, eq=False)
class Trajectory(Records):
    """Result of :func:`propagate`: one record per recorded depth.

    ``labels[r]`` names the record (``input``, ``block 3``, ``block 3 · 2:residual``, ``final``),
    ``blocks[r]`` its block index l (0 for input and stem, L+1 for the head), ``kernels[r]`` the
    N×N kernel (if kept), ``means[r]`` the per-token means, ``measures[name][r]`` each measure
    (per-position profiles have shape (R, T₀)).
    """

    labels: list
    blocks: np.ndarray
    means: np.ndarray
    measures: dict
    segments: tuple
    network: Network
    inputs: Inputs
    kernels: np.ndarray | None = None
    meta: dict = field(default_factory=dict)


def propagate(network: Network, inputs: Inputs, *, record: str = "blocks", every: int = 1,
              keep_kernels: bool = True, spectral: bool | str = "auto", quad_nodes: int | None = None,
              progress: Callable[[int, int], None] | None = None) -> Trajectory:
    """Iterate the infinite-width kernel maps of ``network`` from ``inputs``.

    ``record``: ``"blocks"`` records the input, the stem output, every ``every``-th block (and the
    last) and the head output; ``"sublayers"`` also records after each top-level layer of a block.
    ``spectral``: compute eigenvalue measures (``"auto"``: when the longest sequence has ≤ 512
    tokens). ``progress(done, total)`` is called after every block.
    Raises :class:`~kernelprop.errors.NumericalError` naming the layer if the kernel stops being finite.
    """
    from ..errors import SpecError
    if record not in ("blocks", "sublayers"):
        raise SpecError("record", record, "must be \"blocks\" or \"sublayers\"")
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise SpecError("every", every, "must be a whole number >= 1")
    if spectral == "auto":
        spectral = max(inputs.segments) <= 512
    ctx = Context(quad_nodes)
    state = KernelState(inputs.sigma.copy(), inputs.mean.copy(), inputs.segments)
    labels, blocks, means, kernels, rows = [], [], [], [], []

    def keep(label, l, s):
        labels.append(label)
        blocks.append(l)
        means.append(s.mean.copy())
        if keep_kernels:
            kernels.append(s.sigma.copy())
        row = M.compute(s.sigma, s.segments, s.mean, spectral=spectral)
        row["quad_error"] = s.quad_error
        rows.append(row)

    keep("input", 0, state)
    depth = network.depth
    items = list(network.layers())
    for idx, (section, l, layer) in enumerate(items):
        ctx.unit(idx)
        parts = layer.layers if section == "block" else (layer,)
        recorded = l % every == 0 or l == depth
        for i, part in enumerate(parts):
            where = f"block {l} · {i}:{part.kind}" if section == "block" else f"{section} · {part.kind}"
            ctx.where = where
            state = _checked(apply(part, state, ctx), where, part, flush=l % 8 == 0 or section != "block")
            if record == "sublayers" and section == "block" and recorded and i < len(parts) - 1:
                keep(where, l, state)
        if section == "block":
            if recorded:
                keep(f"block {l}", l, state)
            if progress is not None:
                progress(l, depth)
        elif idx + 1 == len(items) or items[idx + 1][0] != section:
            keep(section, l, state)
    return _finish(network, inputs, labels, blocks, means, kernels, rows, keep_kernels)


def _checked(s: KernelState, where: str, layer, flush: bool) -> KernelState:
    """Raise on non-finite, exploding or vanishing kernels; flush would-be denormals to 0.

    Entries far below the largest variance carry no information but, once denormal, make every
    later product ~10x slower; ``flush`` zeroes entries below 1e-250 × max variance (done every
    few blocks: one extra pass over Σ).
    """
    sigma = s.sigma
    if not np.isfinite(sigma.sum()):
        raise NumericalError(where, "the kernel has NaN or infinite entries", _remedy(layer))
    top = np.abs(np.diagonal(sigma)).max()
    if top > _EXPLODE:
        raise NumericalError(where, f"the variance exploded to {top:.3g}", _remedy(layer))
    if 0 < top < _VANISH:
        raise NumericalError(where, f"the variance vanished to {top:.3g}",
                             "raise weight_var or the branch weights, or add a normalisation layer")
    if flush:
        small = np.abs(sigma) < _TINY * top
        if small.any():
            sigma = sigma.copy()
            sigma[small] = 0.0
            s = s.replace(sigma=sigma)
    return s


def _remedy(layer) -> str:
    return ("lower weight_var / branch weights (beta), add a normalisation layer, "
            f"or reduce the depth (layer type {layer.kind})")


def _finish(network, inputs, labels, blocks, means, kernels, rows, keep_kernels):
    names = list(dict.fromkeys(k for row in rows for k in row))
    measures = {}
    for k in names:
        vals = [row.get(k, np.nan) for row in rows]
        measures[k] = np.array(vals, dtype=float) if np.ndim(vals[0]) == 0 else np.stack(vals)
    return Trajectory(labels=labels, blocks=np.array(blocks), means=np.stack(means), measures=measures,
                      segments=inputs.segments, network=network, inputs=inputs,
                      kernels=np.stack(kernels) if keep_kernels else None)
