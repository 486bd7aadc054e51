"""Finite heads at infinite width: the Markov chain of kernels (docs/finite-width.md, "Finite heads").

With standard 1/sqrt(d_k) scores the scores of head h stay Gaussian as the width grows,
``S_h = σ_qk F Z_h Fᵀ`` with ``F Fᵀ = Σ`` (Σ, or C under QK-norm) and Z_h i.i.d. standard normal
(docs/theory.md §2 case 3); the values concentrate, so given the scores the layer's output kernel is
``Σ' = σ_v²σ_o² (1/H) Σ_h M_h Σ M_hᵀ`` (+ the biases' terms), with one draw of Z_h per head — not the
expectation over the scores that :func:`kernelprop.propagate` takes. Every other layer's map is
deterministic. The kernel after each layer is therefore random and the depth iteration is a Markov chain
of kernels; :func:`run` samples ``samples`` independent chains. ``propagate``'s expected-kernel iteration
is its many-heads limit: one layer's mean is the same for every H, and the chain's variance is O(1/H),
so the chain's mean differs from the limit by O(1/H) (tests/test_finite.py).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from .. import measures as M
from ..errors import NotSupportedError, SpecError
from ..inputs import Inputs
from ..kernel.maps import Context
from ..kernel.propagate import run_unit
from ..kernel.state import KernelState
from ..layers.attention import Attention
from ..layers.attention import matrices as MX
from ..layers.base import resolved
from ..layers.composite import Parallel, Residual, Serial, walk
from ..montecarlo.simulate import Simulation, _Accumulator, _finish
from ..network.network import Network
from ..network.walk import RecordPlan, units


class ChainAttention(Attention):
    """Attention whose standard scores are one draw per head from the chain's own generator
    (``ctx.chain_rng``), head weight 1/H: a sample of the random kernel map, not its mean."""

    expected_scores = False

    def mixings(self, sigma, segments, ctx) -> list:
        if self.rope_theta is None and self.matrix == "softmax" and self.attention == "softmax":
            return self._plain(sigma, segments, ctx)
        seed = tuple(int(v) for v in ctx.chain_rng.integers(0, 2 ** 32, 2))
        probe = dataclasses.replace(self, score_samples=2)
        draws = MX.head_mixings(probe, sigma, segments, ctx.cache, seed=seed, where=ctx.where)
        # head_mixings returns score_samples = 2 independent draws per head, in head order: keep the first
        return [(1.0 / self.heads, m) for _, m in draws[::2]]

    def _plain(self, sigma, segments, ctx) -> list:
        """All H heads' scores at once, ``S_h = σ_qk F Z_h Fᵀ`` (F the symmetric square root of the score
        kernel), then the masked, biased softmax per sequence; for a batch of chains (B, N, N) every chain
        draws its own scores (B, H, N, N)."""
        h, n = self.heads, sigma.shape[-1]
        f = MX._sqrt_factor(MX.score_kernel(self, sigma, ctx.where))[..., None, :, :]        # (…, 1, N, N)
        z = ctx.chain_rng.standard_normal(sigma.shape[:-2] + (h, n, n))
        full = np.sqrt(resolved(self.qk_var)) * (f @ z @ np.swapaxes(f, -1, -2))              # (…, H, N, N)
        key = ("chain-offsets", id(self), max(segments))
        offsets = ctx.cache.get(key)
        if offsets is None:
            offsets = ctx.cache[key] = MX.logit_offsets(self, max(segments), ctx.where)
        blocks, start = [], 0
        for t in segments:
            blocks.append(MX.softmax(full[..., start:start + t, start:start + t] + offsets[:, :t, :t]))
            start += t
        return [(1.0 / h, MX.Dense(segments, [b[..., i, :, :] for b in blocks])) for i in range(h)]

    def kernel_map(self, s, ctx):
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            out, back = super().kernel_map(s, ctx)
        # no error estimate of the mean: the draw is the sample itself (one error per chain in a batch)
        q = np.asarray(s.quad_error, dtype=float)
        q = np.where(np.isfinite(q), q, 0.0)
        return out.replace(quad_error=q if q.ndim else float(q)), back


def _plain_only(layer) -> bool:
    """Whether every chain attention in ``layer`` draws its scores in :meth:`ChainAttention._plain` (so the
    chains can run as one batch)."""
    return all(a.rope_theta is None and a.matrix == "softmax" and a.attention == "softmax"
               for _, a in walk(layer) if isinstance(a, ChainAttention))


def with_heads(layer, heads: int | None, chain: bool):
    """``layer`` with every attention layer's head count set to ``heads`` (None: kept) and, with ``chain``,
    standard-score attention replaced by :class:`ChainAttention`."""
    if isinstance(layer, Attention):
        if heads is not None and heads != layer.heads:
            layer = dataclasses.replace(layer, heads=int(heads))
        if chain and layer.scores == "standard" and not isinstance(layer, ChainAttention):
            layer = ChainAttention(**{f.name: getattr(layer, f.name) for f in dataclasses.fields(layer) if f.init})
        return layer
    if isinstance(layer, Residual):
        return Residual(with_heads(layer.branch, heads, chain), alpha=layer.alpha, beta=layer.beta)
    if isinstance(layer, Parallel):
        return Parallel(*(with_heads(b, heads, chain) for b in layer.branches), alpha=layer.alpha,
                        betas=list(layer.betas))
    if isinstance(layer, Serial):
        return Serial(*(with_heads(c, heads, chain) for c in layer.layers))
    return layer


def check_heads(heads) -> None:
    if heads is not None and (isinstance(heads, bool) or not isinstance(heads, (int, np.integer)) or heads < 1):
        raise SpecError("heads", heads, "must be a whole number >= 1 (attention heads per layer), or omitted")


def run(network: Network, inputs: Inputs, heads: int | None = None, samples: int = 256, *, seed: int = 0,
        every: int = 1, spectral: bool | str = "auto") -> Simulation:
    """``samples`` independent chains of kernels at infinite width with ``heads`` heads per attention layer
    (None: each layer's own), recorded at the engine's block records. Returns a
    :class:`~kernelprop.montecarlo.simulate.Simulation` whose ``samples[name]`` are the per-chain values and
    whose ``width`` is 0 (infinite)."""
    check_heads(heads)
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 2:
        raise SpecError("samples", samples, "must be a whole number >= 2 (a standard deviation needs two)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SpecError("seed", seed, "must be a whole number >= 0")
    if getattr(network, "shared_weights", False):
        raise NotSupportedError("the finite-heads chain with shared_weights = true is not implemented: a shared "
                                "layer's scores would be correlated across blocks")
    if spectral == "auto":
        spectral = max(inputs.segments) <= 512
    plan = RecordPlan(network, "blocks", every)
    labels = plan.all(network)
    work = [dataclasses.replace(u, layer=with_heads(u.layer, heads, True)) for u in units(network)]
    n = inputs.n_tokens
    acc = _Accumulator(len(labels), n, True)
    rows: list[list[dict]] = [[] for _ in labels]
    streams = np.random.SeedSequence(int(seed)).spawn(samples)
    kerns = np.empty((len(labels), samples, n, n))
    means = np.empty((len(labels), samples, n))
    if all(_plain_only(u.layer) for u in work):       # every chain at once: a batch of kernels
        from ..sweep.batch import batch_size
        size = batch_size(n)
        for first in range(0, samples, size):
            b = min(size, samples - first)
            ctx = Context()
            ctx.chain_rng = np.random.Generator(np.random.PCG64(streams[first]))   # type: ignore[attr-defined]
            state = KernelState(np.broadcast_to(inputs.sigma, (b, n, n)).copy(),
                                np.broadcast_to(inputs.mean, (b, n)).copy(), inputs.segments,
                                quad_error=np.zeros(b))
            r = 0

            def keep_all(s, first=first, b=b):
                nonlocal r
                kerns[r, first:first + b], means[r, first:first + b] = s.sigma, s.mean
                rows[r].extend(M.compute(s.sigma[k], s.segments, s.mean[k], spectral=spectral) for k in range(b))
                r += 1

            keep_all(state)
            for unit in work:
                state, _ = run_unit(unit, state, ctx, keep=lambda i, s, unit=unit: (
                    keep_all(s) if plan.after(unit, i) is not None else None))
        samples_done = samples
    else:
        samples_done = 0
    for c in range(samples_done, samples):
        ctx = Context()
        ctx.chain_rng = np.random.Generator(np.random.PCG64(streams[c]))     # type: ignore[attr-defined]
        state = KernelState(inputs.sigma.copy(), inputs.mean.copy(), inputs.segments)
        r = 0

        def keep(s, c=c):
            nonlocal r
            kerns[r, c], means[r, c] = s.sigma, s.mean
            rows[r].append(M.compute(s.sigma, s.segments, s.mean, spectral=spectral))
            r += 1

        keep(state)
        for unit in work:
            state, _ = run_unit(unit, state, ctx, keep=lambda i, s, unit=unit: (
                keep(s) if plan.after(unit, i) is not None else None))
    for r in range(len(labels)):
        acc.add(r, kerns[r], means[r])
    return _finish(network, inputs, 0, samples, labels, acc, rows,
                   dict(width="infinite", heads=heads, seeds=samples, method="chain", seed=seed, every=every))
