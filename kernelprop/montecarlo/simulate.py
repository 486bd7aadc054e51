"""Run finite-width networks over many seeds and aggregate what :func:`kernelprop.propagate` reports.

Records are taken at exactly the engine's points and labels (input, stem, every k-th block and the
last, sub-layers on request, final). At each record and for each seed: the empirical kernel
``Σ̂ = X Xᵀ/w``, token means ``m̂ = X 1/w``, every measure of :func:`kernelprop.measures.compute`
evaluated on ``(Σ̂, m̂)``, and Dong et al.'s composite residual (only samples have it). Aggregated
over S seeds: mean and standard error ``sd/sqrt(S)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .. import measures as M
from ..errors import NumericalError, SpecError
from ..inputs import Inputs
from ..kernel.propagate import Records, Trajectory
from ..network.network import Network
from ..network.walk import RecordPlan, units
from . import sampler as S
from .residual import dong_residual

SAMPLE_MEASURES = {"dong_residual": "‖X − 1xᵀ‖_{1,∞}/‖X‖_{1,∞}, x minimising it (Dong et al. 2021): samples only"}


@dataclass(frozen=True, eq=False)
class Simulation(Records):
    """Result of :func:`simulate`; duck-types :class:`~kernelprop.kernel.propagate.Trajectory`.

    ``measures[name][r]`` / ``means[r]`` / ``kernels[r]`` are seed averages at record r,
    ``stderr[name][r]`` / ``mean_stderr[r]`` / ``kernel_stderr[r]`` their standard errors
    ``sd/sqrt(S)`` (sd with ``ddof = 1``), ``samples[name]`` the per-seed values (S, R[, T₀]).
    """

    labels: list
    blocks: np.ndarray
    means: np.ndarray
    measures: dict
    segments: tuple
    network: Network
    inputs: Inputs
    kernels: np.ndarray | None
    stderr: dict
    mean_stderr: np.ndarray
    kernel_stderr: np.ndarray | None
    samples: dict
    width: int
    seeds: int
    meta: dict = field(default_factory=dict)
    records: list = field(default_factory=list)

    def as_trajectory(self, kernel_se: bool = False) -> Trajectory:
        """A :class:`Trajectory` whose measures also hold ``<name>_se`` and ``mean_se`` (and, with
        ``kernel_se``, the (R, N, N) ``kernel_se``): what :func:`kernelprop.io.write` stores."""
        ms = dict(self.measures)
        ms.update({f"{k}_se": v for k, v in self.stderr.items()})
        ms["mean_se"] = self.mean_stderr
        if kernel_se and self.kernel_stderr is not None:
            ms["kernel_se"] = self.kernel_stderr
        return Trajectory(labels=self.labels, blocks=self.blocks, means=self.means, measures=ms,
                          segments=self.segments, network=self.network, inputs=self.inputs,
                          kernels=self.kernels, meta=self.meta, records=self.records)


def measure_batch(label, x, segments, spectral, dong):
    """Empirical kernels ``X Xᵀ/w`` of a (B, N, w) batch, the per-token means and every seed's measures
    (plus Dong et al.'s residual with ``dong``); overflow raises with the record label."""
    with np.errstate(over="ignore", invalid="ignore"):
        kern = np.matmul(x, np.swapaxes(x, -1, -2)) / x.shape[-1]
    if not np.all(np.isfinite(kern)):
        raise NumericalError(label, "the empirical kernel X Xᵀ/w overflows (the features grew beyond 1e154)",
                             "lower weight_var / branch weights, add a normalisation layer, or reduce the depth")
    kern = 0.5 * (kern + np.swapaxes(kern, -1, -2))
    mean = x.mean(axis=-1)
    rows = [M.compute(kern[b], segments, mean[b], spectral=spectral) for b in range(len(x))]
    if dong:
        res = dong_residual(x, segments)
        for b, row in enumerate(rows):
            row["dong_residual"] = float(res[b])
    return kern, mean, rows


def check_options(inputs: Inputs, width, seeds, every, init, input_kind, scores, record) -> None:
    """The run options shared by :func:`simulate` and the backward pass, checked before any work."""
    _check_int("width", width, 1)
    _check_int("seeds", seeds, 1)
    _check_int("every", every, 1)
    if init not in (None,) + S.INITS:
        raise SpecError("init", init, f"must be one of {list(S.INITS)} (or omitted: each layer's own)")
    if input_kind not in S.INPUT_KINDS:
        raise SpecError("input_kind", input_kind, f"must be one of {list(S.INPUT_KINDS)}")
    if scores not in (None,) + S.SCORE_OVERRIDES:
        raise SpecError("scores", scores, f"must be one of {list(S.SCORE_OVERRIDES)} (or omitted: the spec's)")
    if record not in ("blocks", "sublayers"):
        raise SpecError("record", record, "must be \"blocks\" or \"sublayers\"")
    n = inputs.n_tokens
    if input_kind == "exact" and width < n + 1:
        raise SpecError("width", width, f"exact inputs need N + 1 = {n + 1} features for the {n} tokens "
                        "(N orthonormal directions orthogonal to the mean): raise --width or use --inputs gaussian")
    if init == "orthogonal" and width < n:
        raise SpecError("width", width, f"orthogonal weights are meant to keep the rank-{n} token kernel "
                        f"exactly, which needs width >= N = {n}: raise --width")


def simulate(network: Network, inputs: Inputs, width: int, seeds: int = 16, *, init: str | None = None,
             input_kind: str = "exact", scores: str | None = None, record: str = "blocks", every: int = 1,
             seed: int | np.random.SeedSequence = 0, batch: int | None = None, keep_kernels: bool = True,
             spectral: bool | str = "auto", dong: bool = True, products: str = "auto",
             memory_limit: int | None = None, progress: Callable[[int, int], None] | None = None) -> Simulation:
    """Simulate ``network`` at width ``width`` for ``seeds`` independent initialisations.

    ``init``: ``None`` (each Dense layer's own ``init``; attention weights Gaussian), ``"gaussian"``
    or ``"orthogonal"`` for every weight. ``input_kind``: ``"exact"`` (``X Xᵀ/d = Σ⁰`` exactly, needs
    ``d ≥ N + 1``) or ``"gaussian"``. ``scores``: ``None`` (as the spec says), ``"independent"``
    (realise uniform-limit layers with random independent Q, K at 1/d_k scaling instead of zero
    queries) or ``"standard"`` (independent Q, K at 1/sqrt(d_k) for every layer: random attention at
    infinite width, no engine counterpart). ``batch``: seeds per stacked forward pass (default: as
    many as keep the arrays small, 128 MiB in all and 8 MiB per weight array). ``dong``: also compute
    Dong et al.'s composite residual (an L-BFGS solve per record). ``products``: ``"auto"`` draws
    each product ``X W`` directly in law when N < fan_in (:func:`~kernelprop.montecarlo.sampler.project`),
    ``"explicit"`` always forms the weight matrices. Everything is checked, and the memory
    estimated, before any work. With ``network.shared_weights`` every block reuses the first block's
    weights and biases (stem and final layers keep their own), formed explicitly (``products`` is then
    ``"explicit"``: a projected draw assumes one use per matrix).
    """
    from ..kernel import heap
    heap.retain()
    if products not in ("auto", "explicit"):
        raise SpecError("products", products, "must be \"auto\" or \"explicit\"")
    shared = bool(getattr(network, "shared_weights", False))
    if shared:
        products = "explicit"
    check_options(inputs, width, seeds, every, init, input_kind, scores, record)
    n = inputs.n_tokens
    if spectral == "auto":
        spectral = max(inputs.segments) <= 512
    plan = S.plan(network, width, inputs.segments, init, scores, products, shared=shared)
    labels = RecordPlan(network, record, every).all(network)
    plan.records = len(labels)
    t_max, t0 = max(inputs.segments), inputs.segments[0]
    limit = S.machine_memory() if memory_limit is None else int(memory_limit)
    stored = plan.stored_bytes(seeds, n, t0, keep_kernels)
    need_one = plan.batch_bytes(1, n, t_max) + stored
    if need_one > limit:
        raise SpecError("width", width, f"one seed needs about {need_one / S.GIB:.1f} GiB (features "
                        f"{n}×{plan.max_width}, largest weight matrix {plan.max_weight:,} entries, "
                        f"{plan.records} stored {n}×{n} kernels), more than the {limit / S.GIB:.1f} GiB "
                        "of this machine: lower --width, the number of tokens, or the depth")
    if batch is None:
        batch = plan.auto_batch(seeds, n, t_max)
    else:
        _check_int("batch", batch, 1)
        batch = min(batch, seeds)
        need = plan.batch_bytes(batch, n, t_max) + stored
        if need > limit:
            raise SpecError("batch", batch, f"{batch} seeds at once need about {need / S.GIB:.1f} GiB, more than "
                            f"the {limit / S.GIB:.1f} GiB of this machine: use a smaller batch")

    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(_check_seed(seed))
    streams = ss.spawn(seeds)
    acc = _Accumulator(len(labels), n, keep_kernels)
    samples: list[list[dict]] = [[] for _ in labels]
    depth = network.depth
    batches = [list(range(s, min(seeds, s + batch))) for s in range(0, seeds, batch)]
    for bi, idx in enumerate(batches):
        gens = [np.random.Generator(np.random.PCG64(streams[i])) for i in idx]
        cb = None if progress is None else (lambda l, _d, bi=bi: progress(bi * depth + l, len(batches) * depth))
        recs = _run(network, inputs, width, gens, input_kind, init, scores, products, record, every, spectral,
                    dong, cb)
        if [r[0] for r in recs] != [rec.label for rec in labels]:   # pragma: no cover - internal consistency
            raise RuntimeError("Monte Carlo records do not match the engine's record labels")
        for r, (_, kern, mean, rows) in enumerate(recs):
            acc.add(r, kern, mean)
            samples[r].extend(rows)
    return _finish(network, inputs, width, seeds, labels, acc, samples, dict(
        width=width, seeds=seeds, init=init or "per layer", inputs=input_kind, scores=scores or "spec",
        seed=str(seed.entropy) if isinstance(seed, np.random.SeedSequence) else seed, batch=batch,
        products=products, record=record, every=every))


def _check_int(name, v, minimum):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise SpecError(name, v, f"must be a whole number >= {minimum}")


def _check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SpecError("seed", seed, "must be a whole number >= 0")
    return int(seed)


def _run(network, inputs, width, gens, input_kind, init, scores, products, record, every, spectral, dong,
         progress):
    """One batch: forward through every layer, measuring at the record points."""
    ctx = S.Context(gens, width, inputs.segments, init=init, scores=scores, products=products)
    shared = bool(getattr(network, "shared_weights", False))
    if shared:
        ctx.shared = {}
    x = S.sample_inputs(inputs, width, gens, input_kind)
    out = []

    def keep(label, x):
        kern, mean, rows = measure_batch(label, x, inputs.segments, spectral, dong)
        out.append((label, kern, mean, rows))

    keep("input", x)
    plan = RecordPlan(network, record, every)
    for unit in units(network):
        for i, part in enumerate(unit.parts):
            ctx.where = unit.part_label(i)
            if shared:
                ctx.share(("block", i) if unit.section == "block" else None)
            x = S.forward(part, x, ctx)
            if not np.all(np.isfinite(x)):
                raise NumericalError(ctx.where, "the finite-width features have NaN or infinite entries",
                                     "lower weight_var / branch weights, add a normalisation layer, or reduce "
                                     f"the depth (layer type {part.kind})")
            rec = plan.after(unit, i)
            if rec is not None:
                keep(rec.label, x)
        if unit.section == "block" and progress is not None:
            progress(unit.block, network.depth)
    return out


class _Accumulator:
    """Seed means and centred second moments merged batch by batch (Chan et al. 1979)."""

    def __init__(self, records, n, keep_kernels):
        self.count = np.zeros(records, dtype=int)
        self.kmean = np.zeros((records, n, n)) if keep_kernels else None
        self.km2 = np.zeros((records, n, n)) if keep_kernels else None
        self.mmean = np.zeros((records, n))
        self.mm2 = np.zeros((records, n))

    @staticmethod
    def _merge(mean, m2, na, x):
        nb = x.shape[0]
        bmean = x.mean(axis=0)
        bm2 = ((x - bmean) ** 2).sum(axis=0)
        tot = na + nb
        delta = bmean - mean
        return mean + delta * (nb / tot), m2 + bm2 + delta ** 2 * (na * nb / tot)

    def add(self, r, kern, mean):
        na = self.count[r]
        if self.kmean is not None:
            self.kmean[r], self.km2[r] = self._merge(self.kmean[r], self.km2[r], na, kern)
        self.mmean[r], self.mm2[r] = self._merge(self.mmean[r], self.mm2[r], na, mean)
        self.count[r] = na + kern.shape[0]

    def stderr(self, m2):
        s = self.count.reshape((-1,) + (1,) * (m2.ndim - 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(s > 1, np.sqrt(m2 / np.maximum(s - 1, 1) / s), np.nan)


def _finish(network, inputs, width, seeds, records, acc, samples, meta):
    """Seed means and standard errors at the ``records`` (:class:`~kernelprop.network.walk.Record`)."""
    names = list(dict.fromkeys(k for rows in samples for row in rows for k in row))
    measures, stderr, per_seed = {}, {}, {}
    for k in names:
        vals = np.array([[row.get(k, np.nan) for row in rows] for rows in samples], dtype=float)  # (R, S[, T])
        vals = np.moveaxis(vals, 1, 0)                                                          # (S, R[, T])
        per_seed[k] = vals
        measures[k] = vals.mean(axis=0)
        stderr[k] = vals.std(axis=0, ddof=1) / math.sqrt(seeds) if seeds > 1 else np.full(vals.shape[1:], np.nan)
    return Simulation(
        labels=[r.label for r in records], blocks=np.array([r.block for r in records]), means=acc.mmean,
        measures=measures, segments=inputs.segments, network=network, inputs=inputs,
        kernels=acc.kmean, stderr=stderr, mean_stderr=acc.stderr(acc.mm2),
        kernel_stderr=None if acc.kmean is None else acc.stderr(acc.km2), samples=per_seed,
        width=width, seeds=seeds, meta=meta, records=list(records))


def write(sim: Simulation, path, spec_raw=None):
    """Write a simulation with :func:`kernelprop.io.write`: measures plus ``<name>_se`` columns,
    ``mean_se``, and (``.npz``) the kernel standard errors ``measure_kernel_se``."""
    from pathlib import Path

    from .. import io
    npz = Path(path).suffix.lower() == ".npz"
    return io.write(sim.as_trajectory(kernel_se=npz), path, spec_raw=spec_raw,
                    extra={"simulation": dict(sim.meta)})
