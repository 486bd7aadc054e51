"""Batched sweep runs: many networks of one structure as one vectorised propagation (docs/theory.md §15).

The networks of a sweep that differ only in the values of their params and in their depth share every
layer's description; their kernel maps differ only in the resolved numbers. A batch stacks their
kernels into one state (``sigma`` of shape (B, N, N)) and resolves each layer once for all members: a
field whose expression gives the same number for every member stays a number, the others become arrays
of one value per member (:func:`resolve`). The maps broadcast over the leading axis
(:func:`kernelprop.kernel.state.per`), so member b's kernel is computed by the same arithmetic as its own
run.

Members of different depths run together up to the largest depth: after its own last block a member
runs the final layers, records what its job reads and leaves the batch, so the work is the sum of the
depths, not ``B`` times the largest. A member whose kernel stops being finite (or explodes, or vanishes)
fails alone, with the message its own run gives. Whatever else goes wrong in a batch (a layer without a
batched map, a map that refuses one member's kernel) sends the batch's jobs back to one run each, so the
result is always the per-point one.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import measures as M
from ..errors import NumericalError, SpecError
from ..kernel.maps import Context
from ..kernel.state import KernelState
from ..layers.base import _CHECKS, check_number
from ..layers.composite import Parallel, Residual, Serial, walk
from ..network import expressions

BATCH_BYTES = 256 * 2 ** 20     # bound on the batch's working kernels: B · 16 · N² · 8 bytes
WORKING_KERNELS = 16            # N×N kernels a member's maps hold at once (as kernel.propagate.check_memory)
_BLOCK = re.compile(r"block (\d+)")


# ----------------------------------------------------------------------------------------------
# which networks can be batched, and with which


def structure_key(network) -> tuple:
    """Networks with equal keys differ only in their params' values and their depth: they can share a batch."""
    with np.printoptions(threshold=sys.maxsize, precision=17):
        return (repr(network.stem), repr(network.block), repr(network.final), bool(network.shared_weights),
                tuple(sorted(network.params)))


def refusal(network) -> str | None:
    """Why ``network`` cannot run in a batch (None: it can). A layer takes part when it has a method
    ``batch_refusal()`` answering None; a layer type without one (a user's layer) is refused by name."""
    if getattr(network, "shared_weights", False):
        return "shared_weights = true runs on the joint-state interpreter (one kernel at a time)"
    for part in ("stem", "block", "final"):
        for _, layer in walk(getattr(network, part)):
            why = _layer_refusal(layer)
            if why:
                return why
    return None


def _layer_refusal(layer) -> str | None:
    ask = getattr(layer, "batch_refusal", None)
    if ask is None:
        return f"layer `{layer.kind}` has no batched kernel map (its class defines no batch_refusal)"
    why = ask()
    return f"layer `{layer.kind}`: {why}" if why else None


# ----------------------------------------------------------------------------------------------
# layers resolved over a batch


def resolve(layer: Any, env: dict) -> Any:
    """``layer`` with every expression evaluated over the batch ``env`` (names to numbers or arrays of
    shape (B,)): a number where all members agree, else an array (checked as :meth:`Layer.resolve` checks)."""
    if isinstance(layer, Serial):
        return Serial(*(resolve(child, env) for child in layer.layers))
    if isinstance(layer, Residual):
        res = Residual(resolve(layer.branch, env))
        res.alpha = _value(layer.alpha, env, "residual.alpha", "real")
        res.beta = _value(layer.beta, env, "residual.beta", "real")
        return res
    if isinstance(layer, Parallel):
        par = Parallel(*(resolve(b, env) for b in layer.branches))
        par.alpha = _value(layer.alpha, env, "parallel.alpha", "real")
        par.betas = tuple(_value(b, env, f"parallel.betas[{i}]", "real") for i, b in enumerate(layer.betas))
        return par
    if not dataclasses.is_dataclass(layer):
        return layer.resolve(env)
    changes = {}
    kind = getattr(layer, "kind", "layer")
    for f in dataclasses.fields(layer):
        v = getattr(layer, f.name)
        if isinstance(v, expressions.Expr):
            changes[f.name] = _value(v, env, f"{kind}.{f.name} = {v.text!r}", f.metadata["numeric"])
    if not changes:
        return layer
    out = copy.copy(layer)          # the description was checked on construction; only the numbers change
    for name, v in changes.items():
        object.__setattr__(out, name, v)
    return out


def _value(v, env, where, check):
    if not isinstance(v, expressions.Expr):
        return v
    x = v.over(env)
    if np.ndim(x) == 0:
        check_number(where, x, check)
        return x
    ok, allowed = _CHECKS[check]
    bad = np.flatnonzero(~(np.isfinite(x) & ok(x)))
    if bad.size:
        raise SpecError(where, float(x[bad[0]]), allowed)
    return float(x[0]) if np.all(x == x[0]) else x


# ----------------------------------------------------------------------------------------------
# the batched run


class _Fallback(Exception):
    """The batch cannot go on: its jobs are run one by one."""


def batch_size(n: int) -> int:
    """Members per batch for kernels of ``n`` tokens, so that ``B · 16 · n² · 8`` bytes stays below
    :data:`BATCH_BYTES`."""
    return max(1, BATCH_BYTES // (WORKING_KERNELS * 8 * n * n))


def execute(jobs: list, inputs, measures, spectral, done: Callable[[int, object], None] | None = None) -> list:
    """The outcomes of ``jobs`` (:class:`~kernelprop.sweep.compute._Job`), in order: jobs of one structure
    that can batch run as batches of at most :func:`batch_size` members, the others one by one
    (``_execute``). ``done(i, outcome)`` is called as each job's outcome is known (a batch's members as
    they leave it); what it raises stops the sweep."""
    from ..kernel import heap
    from .compute import _execute
    heap.retain()
    outcomes: list = [None] * len(jobs)

    def finish(i, outcome):
        outcomes[i] = outcome
        if done is not None:
            done(i, outcome)

    groups: dict = {}
    for i, job in enumerate(jobs):
        if refusal(job.network) is None:
            groups.setdefault(structure_key(job.network), []).append(i)
        else:
            finish(i, _execute(job, inputs, measures, spectral))
    def settle_from(chunk):
        def settle(k, outcome):
            try:
                finish(chunk[k], outcome)
            except BaseException as exc:   # the caller's (a progress callback's): not the batch's
                raise _Passthrough(exc) from exc
        return settle

    def run(chunk):
        """``chunk`` as one batch; when a map raises for one member's kernel (a NumericalError), the members
        left run again as two halves, down to single runs; anything else: one run each."""
        if len(chunk) == 1:
            finish(chunk[0], _execute(jobs[chunk[0]], inputs, measures, spectral))
            return
        split = False
        try:
            _Batch([jobs[i] for i in chunk], inputs, measures, spectral).run(settle_from(chunk))
        except _Passthrough as wrapped:
            raise wrapped.error from None
        except NumericalError:
            split = True
        except Exception:  # noqa: BLE001, S110 - whatever a batch meets, the single runs meet again, exactly
            pass
        rest = [i for i in chunk if outcomes[i] is None]      # the members the batch did not settle
        if split and len(rest) > 1:
            run(rest[:len(rest) // 2])
            run(rest[len(rest) // 2:])
            return
        for i in rest:
            finish(i, _execute(jobs[i], inputs, measures, spectral))

    size = batch_size(int(inputs.sigma.shape[0]))
    for members in groups.values():
        for lo in range(0, len(members), size):
            run(members[lo:lo + size])
    return outcomes


class _Passthrough(Exception):
    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


class _Batch:
    """One batch: the members' jobs, their state and what each has read so far."""

    def __init__(self, jobs, inputs, measures, spectral):
        self.jobs, self.inputs, self.measures, self.spectral = jobs, inputs, list(measures), bool(spectral)
        self.nets = [job.network for job in jobs]
        self.net = self.nets[0]
        self.reads = [list(dict.fromkeys((d, last) for _, d, last in job.reads)) for job in jobs]
        self.values: list[dict] = [{} for _ in jobs]

    # --- helpers ---------------------------------------------------------------------------------

    def env(self, members, l):
        """The expressions' names over ``members``: params and L as arrays (one value per member), l a number."""
        out = {k: np.array([float(self.nets[b].params[k]) for b in members]) for k in self.net.params}
        out["L"] = np.array([float(self.nets[b].depth) for b in members])
        out["l"] = float(l)
        return out

    def record(self, state, members, which, last):
        """Read the measures of the members whose job reads block ``which`` (or, ``last``, the output)."""
        for k, b in enumerate(members):
            key = (self.nets[b].depth if last else which, last)
            if last and key not in self.reads[b]:
                continue
            if not last and (which, False) not in self.reads[b]:
                continue
            row = M.compute(state.sigma[k], state.segments, state.mean[k], spectral=self.spectral)
            row["quad_error"] = np.broadcast_to(state.quad_error, (len(members),))[k]
            self.values[b][key] = [float(row[m]) for m in self.measures]

    # --- the run -------------------------------------------------------------------------------

    def run(self, settle):
        """Propagate every member; ``settle(k, outcome)`` as member k's outcome is known."""
        from ..kernel.propagate import check_tokens
        from .compute import _Outcome, network_expressions
        x = self.inputs
        n = int(x.sigma.shape[0])
        check_tokens(n)
        big = len(self.nets)
        state = KernelState(np.broadcast_to(x.sigma, (big, n, n)).copy(), np.broadcast_to(x.mean, (big, n)).copy(),
                            x.segments, quad_error=np.zeros(big))
        members = list(range(big))
        ctx = Context(None)
        self.settle = settle
        self.outcome = _Outcome

        # stem
        for layer in self.net.stem.layers:
            resolved = self.resolved(layer, members, 0)
            ctx.where = ctx.path = f"stem · {layer.kind}"
            state, members = self.apply(resolved, state, members, ctx, flush=True)
        # blocks, members leaving after their own last one
        top = max(net.depth for net in self.nets)
        uses_l = any("l" in e.names for _, e in network_expressions(self.net, ("block",)))
        parts, key = (), None
        for l in range(1, top + 1):
            if not members:
                break
            flush = l % 8 == 0
            for i in range(len(self.net.block.layers)):
                if key != (l if uses_l else 0, tuple(members)):
                    parts, key = self.resolved(self.net.block, members, l).children(), (l if uses_l else 0,
                                                                                      tuple(members))
                ctx.where, ctx.path = f"block {l} · {i}:{parts[i].kind}", f"block {l}/{i}:{parts[i].kind}"
                state, members = self.apply(parts[i], state, members, ctx, flush)
                if not members:
                    break
            if not members:
                break
            self.record(state, members, l, last=False)
            ending = [k for k, b in enumerate(members) if self.nets[b].depth == l]
            if ending:
                self.final([members[k] for k in ending], _take(state, ending), ctx)
                stay = [k for k in range(len(members)) if self.nets[members[k]].depth != l]
                state, members = _take(state, stay), [members[k] for k in stay]

    def resolved(self, layer, members, l):
        out = resolve(layer, self.env(members, l))
        for _, sub in walk(out):
            why = _layer_refusal(sub)
            if why:
                raise _Fallback(why)
        return out

    def final(self, members, state, ctx):
        """The final layers of the members that ended their blocks, then their outcomes."""
        l = self.nets[members[0]].depth + 1
        for layer in self.net.final.layers:
            if not members:
                return
            resolved = self.resolved(layer, members, l)
            ctx.where = ctx.path = f"final · {layer.kind}"
            state, members = self.apply(resolved, state, members, ctx, flush=True)
        if members:
            self.record(state, members, None, last=True)
        for b in members:
            self.settle(b, self.outcome([(d, last, self.values[b][(d, last)]) for d, last in self.reads[b]], [], 1))

    def apply(self, part, state, members, ctx, flush):
        """Apply one part to the batch, then check every member as a single run checks its kernel (and
        flush would-be denormals); the members that fail leave the batch with their outcome."""
        from ..kernel.propagate import _EXPLODE, _TINY, _VANISH
        state = part.kernel_map(state, ctx)[0]
        if state.sigma.ndim != 3 or state.sigma.shape[0] != len(members):
            raise _Fallback(f"{ctx.where}: the map did not keep the batch axis")
        sigma = state.sigma
        with np.errstate(all="ignore"):
            finite = np.isfinite(sigma.sum(axis=(-2, -1)))
            top = np.abs(np.diagonal(sigma, axis1=-2, axis2=-1)).max(axis=-1)
        bad = ~finite | (top > _EXPLODE) | ((top > 0) & (top < _VANISH))
        if bad.any():
            for k in np.flatnonzero(bad):
                self.fail(members[k], _take(state, [k], single=True), ctx.where, part)
            keep = [k for k in range(len(members)) if not bad[k]]
            state, members = _take(state, keep), [members[k] for k in keep]
            if not members:
                return state, members
            sigma, top = state.sigma, top[keep]
        if flush:
            small = np.abs(sigma) < _TINY * top[:, None, None]
            if small.any():
                sigma = sigma.copy()
                sigma[small] = 0.0
                state = state.replace(sigma=sigma)
        return state, members

    def fail(self, b, single, where, part):
        """Member b's failure, as its own run reports it (kernelprop.sweep.compute._execute)."""
        from ..kernel.propagate import _checked
        from .compute import _point_text
        try:
            _checked(single, where, part, flush=False)
        except NumericalError as exc:
            error = exc
        else:
            raise _Fallback(f"{where}: the batch's check and the single run's disagree")
        job, net = self.jobs[b], self.nets[b]
        m = _BLOCK.search(str(error.layer))
        failed_at = int(m.group(1)) if m else None
        depths = sorted({d for _, d, _ in job.reads})
        ok = [d for d in depths if failed_at is not None and d < failed_at]
        failures = [f"{_point_text(net)}: {error}" + (f" (depths >= {failed_at} are NaN)" if job.shared else "")]
        if not (job.shared and ok):
            self.settle(b, self.outcome([], failures, 1, (error.layer, error.problem, error.remedy)))
            return
        values = [(d, last, self.values[b][(d, last)]) for d, last in self.reads[b] if d in ok]
        self.settle(b, self.outcome(values, failures, 2))


def _take(state: KernelState, keep, single=False) -> KernelState:
    """The members ``keep`` of a batched state (``single``: one member as an unbatched state)."""
    errors = np.broadcast_to(state.quad_error, state.sigma.shape[:1])
    if single:
        k = keep[0]
        return state.replace(sigma=state.sigma[k], mean=state.mean[k], quad_error=errors[k])
    idx = np.asarray(keep, dtype=int)
    return state.replace(sigma=state.sigma[idx], mean=state.mean[idx], quad_error=errors[idx])
