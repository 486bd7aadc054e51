"""Propagate the token kernel of a network through depth: the numeric engine's entry point."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .. import measures as M
from ..errors import NotSupportedError, NumericalError
from ..inputs import Inputs
from ..network.layers import Network
from ..network.walk import INPUT, RecordPlan, Unit, units
from . import heap
from .maps import Context
from .ntk import measures as ntk_measures
from .ntk import rule as ntk_rule
from .state import KernelState
from .threads import limit as threads_limit

_TINY = 1e-250   # entries below this times the largest variance are flushed to 0 (no denormals)
_VANISH, _EXPLODE = 1e-150, 1e150


class Records:
    """Access shared by results with ``labels`` and ``measures``: ``r["cos_mean"]``, ``len(r)``, ``r.final``."""

    labels: list
    measures: dict

    def __getitem__(self, name: str) -> np.ndarray:
        return self.measures[name]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def final(self) -> dict:
        """Measures at the last record."""
        return {k: v[-1] for k, v in self.measures.items()}

    def where(self, **fields) -> list:
        """Indices of the records whose fields equal ``fields``, e.g. ``r.where(section="block", part=None)``
        (fields of :class:`~kernelprop.network.walk.Record`: label, section, block, part, path, kind)."""
        recs = getattr(self, "records", None) or []
        return [i for i, rec in enumerate(recs) if all(getattr(rec, k) == v for k, v in fields.items())]

    def depth_records(self) -> list:
        """Indices of the input and whole-block records: the points of a depth plot."""
        recs = getattr(self, "records", None) or []
        return [i for i, rec in enumerate(recs) if rec.is_block]


@dataclass(frozen=True, eq=False)
class Trajectory(Records):
    """Result of :func:`propagate`: one record per recorded depth.

    ``records[r]`` describes the record (:class:`~kernelprop.network.walk.Record`: section, block
    index, part, layer path, kind); ``labels[r]`` is its name (``input``, ``block 3``,
    ``block 3 · 2:residual``, ``final``), ``blocks[r]`` its block index l (0 for input and stem, L+1 for
    the head), ``kernels[r]`` the N×N kernel (if kept), ``means[r]`` the per-token means,
    ``measures[name][r]`` each measure (per-position profiles have shape (R, T₀)). With ``ntk=True``:
    ``ntk[r]`` the N×N neural tangent kernel Θ at record r (docs/theory.md §14) and the measures
    ``ntk_mean`` (tr Θ/N), ``ntk_cond`` (λ_max/λ_min, with ``spectral``) and ``ntk_error``.
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
    records: list = field(default_factory=list)
    ntk: np.ndarray | None = None


def propagate(network: Network, inputs: Inputs, *, record: str = "blocks", every: int = 1,
              keep_kernels: bool = True, spectral: bool | str = "auto", quad_nodes: int | None = None,
              progress: Callable[[int, int], None] | None = None, ntk: bool = False,
              memory_limit: int | None = None, measures=None, threads: int | None = None,
              width: int | None = None, heads: int | None = None, samples: int = 256, seed: int = 0,
              method: str | None = None) -> Trajectory:
    """Iterate the infinite-width kernel maps of ``network`` from ``inputs``.

    ``record``: ``"blocks"`` records the input, the stem output, every ``every``-th block (and the
    last) and the head output; ``"sublayers"`` also records after each top-level layer of a block
    and after each stem and final layer. ``spectral``: compute eigenvalue measures (``"auto"``: when
    the longest sequence has ≤ 512 tokens). ``progress(done, total)`` is called after every block.
    ``ntk``: also propagate the neural tangent kernel Θ (NTK parametrisation, docs/theory.md §14) and
    keep it per record (``Trajectory.ntk``); Θ = 0 at the input. ``memory_limit`` (bytes, default half
    the machine's memory) bounds the up-front estimate of :func:`check_memory`. ``measures``: the names of
    the measures to compute at each record (default: all of :mod:`kernelprop.measures`, and ``ntk_*`` with
    ``ntk``); asking for a spectral one turns ``spectral="auto"`` on. ``threads``: BLAS threads (default
    :func:`kernelprop.kernel.threads.choose`: 1 below 512 tokens, or ``KERNELPROP_THREADS``).
    Raises :class:`~kernelprop.errors.NumericalError` naming the layer if the kernel stops being finite.
    ``width`` / ``heads``: return instead a :class:`kernelprop.finite.interface.FinitePrediction` — this limit
    beside ``samples`` finite-width (Gram sampler) or finite-heads (chain) draws, seeded by ``seed``
    (docs/finite-width.md); ``method="sde"`` integrates the proportional depth-width limit instead
    (docs/theory.md §16).
    A network with ``shared_weights`` runs on the joint-state interpreter
    (:func:`kernelprop.kernel.shared.propagate`, docs/theory.md §13).
    """
    if width is not None or heads is not None:      # the finite prediction beside this limit
        from ..finite.interface import predict
        if ntk:
            raise NotSupportedError("ntk=True with width= or heads= is not implemented: the finite prediction "
                                    "covers the forward kernel")
        return predict(network, inputs, width=width, heads=heads, samples=samples, seed=seed,  # type: ignore[return-value]
                       record=record, every=every, spectral=spectral, quad_nodes=quad_nodes, method=method)
    names, spectral = measure_names(measures, spectral, ntk)
    if names is not None and "cross_cos_mean" in names and len(inputs.segments) < 2:
        from ..errors import SpecError
        raise SpecError("measures", "cross_cos_mean", "compares tokens of different sequences: the input has one")
    heap.retain()
    with threads_limit(int(inputs.sigma.shape[0]), threads):
        if getattr(network, "shared_weights", False):
            from .shared import propagate as joint
            if ntk:
                raise NotSupportedError("ntk=True with shared_weights = true is not implemented: the tangent "
                                        "kernel would need the cross-block covariances of the shared matrices' "
                                        "gradients; run without ntk, or with fresh weights")
            traj = joint(network, inputs, record=record, every=every, keep_kernels=keep_kernels, spectral=spectral,
                         quad_nodes=quad_nodes, progress=progress)
            if names is not None:
                traj = dataclasses.replace(traj, measures={k: v for k, v in traj.measures.items() if k in names})
            return traj
        plan = RecordPlan(network, record, every)
        check_memory(network, inputs, plan, keep_kernels=keep_kernels, ntk=ntk, limit=memory_limit)
        traj, _ = forward(network, inputs, plan, keep_kernels=keep_kernels, spectral=spectral, quad_nodes=quad_nodes,
                          progress=progress, ntk=ntk, measures=names)
    return traj


NTK_MEASURES = ("ntk_mean", "ntk_cond", "ntk_error")


def measure_names(measures, spectral: bool | str = "auto", ntk: bool = False, field: str = "measures"):
    """``(names, spectral)``: the checked measure names (None: all) and the ``spectral`` setting they imply —
    a spectral measure asked by name is computed whatever the size (``"auto"`` becomes True); with
    ``spectral=False`` asking for one is a :class:`~kernelprop.errors.SpecError`."""
    from ..errors import SpecError
    if measures is None:
        return None, spectral
    names = M.check_names(measures, field, extra=NTK_MEASURES if ntk else ())
    asked = [n for n in names if n in M.SPECTRAL or n == "ntk_cond"]
    if asked and spectral is False:
        raise SpecError(field, asked[0], "is a spectral measure, and spectral=False: drop it or allow spectra")
    if spectral == "auto" and asked:
        spectral = True
    return names, spectral


WORKING_KERNELS = 16     # N×N float64 arrays the maps hold at once (measured peak of the layer maps: 6-16)


def check_memory(network: Network, inputs: Inputs, plan: RecordPlan, *, keep_kernels: bool, ntk: bool = False,
                 limit: int | None = None) -> int:
    """Estimated peak bytes ``8 N² (16 + R)`` (×2 with the NTK; R records kept when ``keep_kernels``), N the
    total tokens; a :class:`~kernelprop.errors.SpecError` naming ``tokens`` when it exceeds ``limit``
    (default: half the machine's physical memory), before any work is done."""
    kept = len(plan.all(network)) if keep_kernels else 0
    return check_tokens(int(inputs.sigma.shape[0]), kept, ntk=ntk, limit=limit)


def check_tokens(n: int, kept: int = 0, *, ntk: bool = False, limit: int | None = None, field: str = "tokens") -> int:
    """The estimate of :func:`check_memory` for ``n`` tokens and ``kept`` stored kernels (usable before the
    input kernel is built, e.g. for a preset's ``--tokens``)."""
    from ..errors import SpecError
    need = 8 * n * n * (WORKING_KERNELS + kept) * (2 if ntk else 1)
    limit = machine_memory() // 2 if limit is None else int(limit)
    if need > limit:
        raise SpecError(field, n, f"{n} tokens need about {need / 2 ** 30:.1f} GiB ({WORKING_KERNELS} working "
                        f"{n}×{n} float64 kernels{f' and {kept} kept ones' if kept else ''}), more than the "
                        f"{limit / 2 ** 30:.1f} GiB allowed (half this machine's memory): use fewer tokens "
                        "(--tokens or input.tokens), or record fewer kernels")
    return need


def machine_memory() -> int:
    """Physical memory in bytes (24 GiB if the system does not say): the Monte Carlo's
    ``sampler.machine_memory`` when that module is loaded (one estimate for the whole package), else the same
    reading without importing the Monte Carlo."""
    sampler = sys.modules.get("kernelprop.montecarlo.sampler")
    if sampler is not None:
        return int(sampler.machine_memory())
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 24 * 2 ** 30


def forward(network: Network, inputs: Inputs, plan: RecordPlan, *, keep_kernels: bool = True,
            spectral: bool | str = "auto", quad_nodes: int | None = None, progress=None, on_unit=None,
            ctx: Context | None = None, ntk: bool = False, measures=None):
    """The one forward walk: apply every part of every unit, check it, keep the planned records.

    ``measures``: the checked names to compute per record (None: all; see :func:`measure_names`).

    ``on_unit(unit, state_in, backs)``, if given, receives each unit's input state and the backward
    rules of its parts (the backward pass keeps or checkpoints them). Returns ``(trajectory, state)``.
    """
    if getattr(network, "shared_weights", False):
        raise NotSupportedError("the backward pass with shared_weights = true is not implemented: the gradient "
                                "kernel would need the covariances of every shared matrix's gradients across blocks "
                                "(its transpose is used on the way back, beyond docs/theory.md §13); the forward "
                                "kernels come from propagate")
    if spectral == "auto":
        spectral = max(inputs.segments) <= 512
    ctx = ctx or Context(quad_nodes)
    state = KernelState(inputs.sigma.copy(), inputs.mean.copy(), inputs.segments,
                        ntk=np.zeros_like(inputs.sigma) if ntk else None)
    records, means, kernels, rows, tangents = [], [], [], [], []

    def keep(rec, s):
        records.append(rec)
        means.append(s.mean.copy())
        if keep_kernels:
            kernels.append(s.sigma.copy())
        row = M.compute(s.sigma, s.segments, s.mean, spectral=spectral, names=measures)
        if measures is None or "quad_error" in measures:
            row["quad_error"] = s.quad_error
        if s.ntk is not None:
            tangents.append(s.ntk.copy())
            if measures is None:
                row.update(ntk_measures(s.ntk, spectral), ntk_error=s.ntk_error)
            else:
                if "ntk_mean" in measures or "ntk_cond" in measures:
                    extra = ntk_measures(s.ntk, spectral and "ntk_cond" in measures)
                    row.update({k: v for k, v in extra.items() if k in measures})
                if "ntk_error" in measures:
                    row["ntk_error"] = s.ntk_error
        rows.append(row)

    keep(INPUT, state)
    for unit in units(network, kernel_only=True):
        state, backs = run_unit(unit, state, ctx, keep=lambda i, s, unit=unit: _keep_planned(plan, unit, i, s, keep),
                                with_backs=on_unit is not None, on_start=on_unit)
        if unit.section == "block" and progress is not None:
            progress(unit.block, network.depth)
    traj = _finish(network, inputs, records, means, kernels, rows, keep_kernels)
    if ntk:
        traj = dataclasses.replace(traj, ntk=np.stack(tangents), meta={**traj.meta, "ntk": "NTK parametrisation"})
    return traj, state


def _keep_planned(plan, unit, i, s, keep):
    rec = plan.after(unit, i)
    if rec is not None:
        keep(rec, s)


def run_unit(unit: Unit, state: KernelState, ctx: Context, keep=None, with_backs=False, on_start=None):
    """Apply the parts of one unit (checked, denormal-flushed as :func:`propagate` does); ``keep(i, s)``
    after part i; ``on_start(unit, state, backs)`` is called with the list the parts' backward rules fill."""
    ctx.unit(unit.index)
    backs: list = []
    if on_start is not None:
        on_start(unit, state, backs)
    flush = unit.block % 8 == 0 or unit.section != "block"
    for i, part in enumerate(unit.parts):
        ctx.where, ctx.path = unit.part_label(i), unit.part_path(i)
        state, back = (ntk_rule(part, ctx.where) if state.ntk is not None else part.kernel_map)(state, ctx)
        if with_backs:
            backs.append(back)
        state = _checked(state, ctx.where, part, flush=flush)
        if keep is not None:
            keep(i, state)
    return state, backs


def _checked(s: KernelState, where: str, layer, flush: bool) -> KernelState:
    """Raise on non-finite, exploding or vanishing kernels; flush would-be denormals to 0.

    Entries far below the largest variance carry no information but, once denormal, make every
    later product ~10x slower; ``flush`` zeroes entries below 1e-250 × max variance (done every
    few blocks: one extra pass over Σ).
    """
    sigma = s.sigma
    if not np.isfinite(sigma.sum()):
        raise NumericalError(where, "the kernel has NaN or infinite entries", _remedy(layer))
    if s.ntk is not None and not np.isfinite(s.ntk.sum()):
        raise NumericalError(where, "the NTK has NaN or infinite entries", _remedy(layer))
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


def _finish(network, inputs, records, means, kernels, rows, keep_kernels, meta=None):
    names = list(dict.fromkeys(k for row in rows for k in row))
    measures = {}
    for k in names:
        vals = [row.get(k, np.nan) for row in rows]
        measures[k] = np.array(vals, dtype=float) if np.ndim(vals[0]) == 0 else np.stack(vals)
    return Trajectory(labels=[r.label for r in records], blocks=np.array([r.block for r in records]),
                      means=np.stack(means), measures=measures, segments=inputs.segments, network=network,
                      inputs=inputs, kernels=np.stack(kernels) if keep_kernels else None, records=list(records),
                      meta=dict(meta or {}))
