"""The sweep itself (:func:`sweep`) and what a network's expressions depend on (which runs can be
shared); see :mod:`kernelprop.sweep` for what is shared and what is rerun."""

from __future__ import annotations

import itertools
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import measures as M
from ..errors import NumericalError, SpecError
from ..inputs import Inputs
from ..network import expressions
from ..network.layers import Network, walk
from .files import DEPTH_NAMES, Axis, SweepResult, _infer_spacing, axis_label

AT = ("block", "output")
_PATH = re.compile(r"/(\d+):")


# ----------------------------------------------------------------------------------------------
# what a network's expressions depend on


def _numeric_fields(layer):
    """``(field, value)`` of the fields of ``layer`` that the kernel maps read."""
    for name in layer.kernel_fields():
        yield name, layer.field_value(name)


def network_expressions(network: Network, parts=("stem", "block", "final")):
    """``(where, Expr)`` for every expression the kernel maps of ``network`` read."""
    for part in parts:
        for path, layer in walk(getattr(network, part), part):
            for name, v in _numeric_fields(layer):
                if isinstance(v, expressions.Expr):
                    yield _PATH.sub(r"[\1].", path) + "." + name, v


def depth_dependence(network: Network, parts=("stem", "block")) -> list:
    """``["where = text", …]`` for the expressions of ``parts`` that use the depth ``L``
    (and, in ``final``, the block index ``l``, which is ``L + 1`` there)."""
    out = []
    for where, e in network_expressions(network, parts):
        if "L" in e.names or (where.startswith("final") and "l" in e.names):
            out.append(f"{where} = {e.text}")
    return out


def param_uses(network: Network, name: str) -> list:
    """``["layer.field = text", …]``: where the param ``name`` enters the network."""
    seen = []
    for where, e in network_expressions(network):
        if name in e.names:
            s = f"{'.'.join(where.split('.')[-2:])} = {e.text}"
            if s not in seen:
                seen.append(s)
    return seen


def _fingerprint(network: Network) -> tuple:
    """Two networks with equal fingerprints have the same kernel maps (params no expression uses
    are left out)."""
    used = set()
    for _, e in network_expressions(network):
        used |= e.names
    with np.printoptions(threshold=sys.maxsize, precision=17):
        return (repr(network.stem), repr(network.block), repr(network.final), int(network.depth),
                bool(getattr(network, "shared_weights", False)),
                tuple(sorted((k, float(v)) for k, v in network.params.items() if k in used)))


# ----------------------------------------------------------------------------------------------
# the sweep


@dataclass
class _Job:
    network: Network
    reads: list = field(default_factory=list)   # (grid index, depth d, read the last record?)
    shared: bool = False


def sweep(model, inputs: Inputs | None = None, params: Mapping[str, Sequence[float] | np.ndarray] | None = None, *,
          measure: str | Sequence[str] = "cos_mean", depth: int | None = None, at: str = "block",
          spacing: Mapping[str, str] | None = None,
          progress: Callable[[int, int], None] | None = None,
          workers: int | None = None, scheduler=None, cache: str | Path | None = None,
          chunk: int | None = None, batch: bool = True) -> SweepResult:
    """Evaluate ``measure`` on the grid ``params = {name: values, …}`` (one or two axes).

    ``model``: a :class:`~kernelprop.Network`, a :class:`~kernelprop.Spec`, a spec path or bundled
    example name, or a builder ``build(depth, **params) -> Network`` (e.g.
    ``functools.partial(presets.build, "noci")``: its knobs become sweepable). ``inputs`` defaults to
    the spec's. ``depth`` is the depth when it is not swept (default: the network's). ``measure`` is
    one scalar measure or several. ``at``: ``"block"`` reads the kernel after block ``L``; ``"output"``
    after the ``final`` layers. ``spacing`` (``{name: "linear" | "log"}``) only labels the axes for
    plots; it is inferred when omitted. ``progress(done, total)`` is called after every run.
    See the module docstring for which runs are shared.

    Distributed runs (docs/sweeps.md, extra ``kernelprop[dask]``): ``workers=N`` runs the distinct
    networks on a local ``dask.distributed`` cluster of N processes (0: one per core; None or 1:
    serially, without Dask); ``scheduler`` (an address ``tcp://host:port`` or a
    ``distributed.Client``) sends them to an existing cluster; ``chunk`` networks per task
    (default: about four tasks per worker thread). The grid is filled in the serial order, so the
    result equals the serial one bit for bit. ``cache``: a directory keeping each network's
    measures (keyed by its description, the input, the measures and the package version), so a
    rerun of an interrupted sweep computes only what is missing; ``cached`` counts the networks read
    from it.

    ``batch`` (default True): networks that differ only in their params' values and depth run as one
    vectorised propagation (:mod:`kernelprop.sweep.batch`, docs/theory.md §15), each member stopping at
    its own depth; networks with a layer that cannot batch run one by one. ``batch=False`` runs one
    propagation per network (the results agree to rounding, ≤ 1e-12 relative).
    """
    make, net0, inputs, meta = _model(model, inputs, depth)
    measures = _measures(measure, inputs)
    if at not in AT:
        raise SpecError("at", at, f"must be one of {list(AT)}")
    axes = _axes(params, net0, make, spacing or {})
    kd = next((i for i, a in enumerate(axes) if a.is_depth), None)
    base_depth = net0.depth
    if kd is None and base_depth < 1:
        raise SpecError("depth", base_depth, "must be a whole number >= 1 (block L is read)")
    spectral = any(m in M.SPECTRAL for m in measures)

    jobs: dict = {}
    plan = []
    other = [i for i in range(len(axes)) if i != kd]
    shared_points = rerun_points = 0
    for combo in itertools.product(*(range(len(axes[i].values)) for i in other)):
        point = {axes[i].name: float(axes[i].values[j]) for i, j in zip(other, combo)}
        index = dict(zip(other, combo))
        if kd is None:
            net = make(base_depth, point)
            _add(jobs, net, (_full(index, None, None, len(axes)), base_depth, _reads_last(net, at)))
            continue
        depths = [int(d) for d in axes[kd].values]
        deepest = make(max(depths), point)
        why = _rerun_reason(make, point, deepest, depths, at)
        if why is None:
            shared_points += 1
            for j, d in enumerate(depths):
                _add(jobs, deepest, (_full(index, kd, j, len(axes)), d, False), shared=True)
        else:
            rerun_points += 1
            for j, d in enumerate(depths):
                net = make(d, point)
                _add(jobs, net, (_full(index, kd, j, len(axes)), d, _reads_last(net, at)))
    plan.extend(_describe_plan(axes, kd, net0, make, jobs, shared_points, rerun_points, at))

    from .parallel import run_jobs
    if not isinstance(batch, (bool, np.bool_)):
        raise SpecError("batch", batch, "must be true or false")
    if batch and len(jobs) > 1:
        plan.append(_describe_batches([job.network for job in jobs.values()]))
    outcomes, cached = run_jobs(jobs, inputs, measures, spectral, workers=workers, scheduler=scheduler,
                                cache=cache, chunk=chunk, progress=progress, batch=bool(batch))
    grid = {m: np.full(tuple(len(a.values) for a in axes), np.nan) for m in measures}
    failures: list[str] = []
    runs = 0
    first_error = None
    for job, outcome in zip(jobs.values(), outcomes):   # the planning order, whoever computed what
        failures.extend(outcome.failures)
        runs += outcome.runs
        if outcome.error is not None:   # every point of the job failed
            first_error = first_error or NumericalError(*outcome.error)
            continue
        values = {(d, last): v for d, last, v in outcome.values}
        for index, d, last in job.reads:
            if (d, last) in values:
                for m, v in zip(measures, values[(d, last)]):
                    grid[m][index] = v
    if all(np.isnan(g).all() for g in grid.values()) and first_error is not None:
        raise first_error
    if cached:
        plan.append(f"{cached} of {len(jobs)} run(s) read from the cache {cache}")
    return SweepResult(axes=tuple(axes), values=grid, at=at, runs=runs, plan=plan, failures=failures,
                       meta={**meta, "depth": base_depth, "params": dict(net0.params)}, cached=cached)


def _full(index, kd, j, n):
    return tuple(j if i == kd else index[i] for i in range(n))


def _reads_last(net, at):
    return at == "output" and len(net.final.layers) > 0


def _add(jobs, net, read, shared=False):
    key = _fingerprint(net)
    job = jobs.setdefault(key, _Job(net))
    job.reads.append(read)
    job.shared = job.shared or shared


def _rerun_reason(make, point, deepest, depths, at) -> str | None:
    """Why the depths of this point cannot come from one run (None: they can)."""
    parts = ("stem", "block") if at == "block" or not deepest.final.layers else ("stem", "block", "final")
    uses = depth_dependence(deepest, parts)
    if uses:
        return "L appears in " + "; ".join(uses[:3]) + (" …" if len(uses) > 3 else "")
    if at == "output" and deepest.final.layers:
        return "at=\"output\": the final layers act on each depth's kernel"
    if not isinstance(make, _NetworkModel):
        ref = _fingerprint(deepest)
        for d in depths:
            if _fingerprint(make(d, point).with_depth(deepest.depth)) != ref:
                return f"the builder makes a different network at depth {d} than at {deepest.depth}"
    return None


@dataclass
class _Outcome:
    """What one job computed, in plain data (it travels between processes and into the cache):
    ``values`` ``[(depth, read last record?, [value per measure]), …]`` for the reads it could
    make, ``failures`` (messages), ``runs`` (propagations) and ``error`` (the fields of the
    :class:`NumericalError` when every read failed, else None)."""

    values: list
    failures: list
    runs: int
    error: tuple | None = None


def _execute(job: _Job, inputs, measures, spectral) -> _Outcome:
    """Run ``job``: its measures at every read, or the failure."""
    from ..kernel.propagate import propagate
    depths = sorted({d for _, d, _ in job.reads})
    every = math.gcd(*depths)
    net = job.network
    reads = list(dict.fromkeys((d, last) for _, d, last in job.reads))
    try:
        traj = propagate(net, inputs, every=every, keep_kernels=False, spectral=spectral)
    except NumericalError as exc:
        m = re.search(r"block (\d+)", str(exc.layer))
        failed_at = int(m.group(1)) if m else None
        ok = [d for d in depths if failed_at is not None and d < failed_at]
        failures = [f"{_point_text(net)}: {exc}" + (f" (depths >= {failed_at} are NaN)" if job.shared else "")]
        if not (job.shared and ok):
            return _Outcome([], failures, 1, (exc.layer, exc.problem, exc.remedy))
        shorter = net.with_depth(max(ok))
        traj = propagate(shorter, inputs, every=math.gcd(*ok), keep_kernels=False, spectral=spectral)
        return _Outcome(_read(traj, [r for r in reads if r[0] in ok], measures), failures, 2)
    return _Outcome(_read(traj, reads, measures), [], 1)


def _read(traj, reads, measures) -> list:
    after_block = {traj.records[r].block: r for r in traj.where(section="block", part=None)}
    out = []
    for d, last in reads:
        r = len(traj.labels) - 1 if last else after_block[d]
        out.append((d, last, [float(traj.measures[m][r]) for m in measures]))
    return out


def _point_text(net) -> str:
    ps = ", ".join(f"{k}={v:g}" for k, v in net.params.items())
    return f"L={net.depth}" + (f", {ps}" if ps else "")


def _describe_plan(axes, kd, net0, make, jobs, shared_points, rerun_points, at) -> list:
    plan = []
    if kd is not None:
        n = len(axes[kd].values)
        if shared_points:
            plan.append(f"depth axis: {shared_points} point(s) share one run at L={int(max(axes[kd].values))} "
                        f"read at {n} depths (no expression of the blocks uses L)")
        if rerun_points:
            deepest = make(int(max(axes[kd].values)), {a.name: float(a.values[0]) for a in axes if not a.is_depth})
            why = _rerun_reason(make, {a.name: float(a.values[0]) for a in axes if not a.is_depth}, deepest,
                                [int(d) for d in axes[kd].values], at)
            plan.append(f"depth axis: rerun at each of {n} depths for {rerun_points} point(s): {why}")
    for a in axes:
        if a.is_depth:
            continue
        uses = param_uses(net0, a.name)
        if not uses and isinstance(make, _NetworkModel):
            plan.append(f"{a.name}: used by no expression; its values give one network, computed once")
        else:
            plan.append(f"{a.name}: one run per value" + (f" (enters {'; '.join(uses)})" if uses else
                                                          " (a knob of the builder)"))
    plan.append(f"{len(jobs)} distinct run(s) for {int(np.prod([len(a.values) for a in axes]))} grid point(s)")
    return plan


def _describe_batches(networks) -> str:
    """One plan line: how many runs go into how many batched propagations, and why any run alone."""
    from .batch import refusal, structure_key
    alone, groups = [], set()
    for net in networks:
        why = refusal(net)
        if why:
            alone.append(why)
        else:
            groups.add(structure_key(net))
    line = (f"batched: {len(networks) - len(alone)} run(s) as {len(groups)} propagation(s), one per structure"
            if groups else "batched: none")
    if alone:
        line += f"; {len(alone)} run(s) one by one: {alone[0]}"
    return line


# ----------------------------------------------------------------------------------------------
# inputs of sweep()


class _NetworkModel:
    """``make(depth, point)`` for a fixed network description: params and depth replaced."""

    def __init__(self, network: Network):
        self.network = network

    def __call__(self, depth, point):
        net = self.network.with_params(**point) if point else self.network
        return net if depth == net.depth else net.with_depth(int(depth))


class _BuilderModel:
    def __init__(self, build):
        self.build = build

    def __call__(self, depth, point):
        net = self.build(int(depth), **point)
        if not isinstance(net, Network):
            raise SpecError("model", type(net).__name__, "a builder must return a Network")
        return net


def _model(model, inputs, depth):
    from ..models import example_path
    from ..network.spec import Spec, load
    meta = {}
    if isinstance(model, (str, Path)):
        model = load(example_path(model), depth=depth)
    if isinstance(model, Spec):
        meta["spec"] = model.raw
        inputs = model.inputs if inputs is None else inputs
        model = model.network
    if isinstance(model, Network):
        make = _NetworkModel(model if depth is None else model.with_depth(int(depth)))
        net0 = make.network
    elif callable(model):
        if depth is None:
            raise SpecError("depth", None, "give depth= when the model is a builder")
        make = _BuilderModel(model)
        net0 = make(int(depth), {})
        meta["spec"] = {"builder": getattr(model, "__name__", None) or repr(model)}
    else:
        raise SpecError("model", type(model).__name__, "must be a Network, a Spec, a spec path or a builder")
    if not isinstance(inputs, Inputs):
        raise SpecError("inputs", type(inputs).__name__, "give the input kernel (kernelprop.inputs.…)")
    meta["input"] = inputs.description
    meta.setdefault("spec", {"network": repr(net0)})
    return make, net0, inputs, meta


def _measures(measure, inputs) -> list:
    names = [measure] if isinstance(measure, str) else list(measure)
    if not names:
        raise SpecError("measure", names, "give at least one measure")
    allowed = sorted(set(M.SCALAR_MEASURES) - ({"cross_cos_mean"} if len(inputs.segments) < 2 else set()))
    for m in names:
        if m in M.PROFILE_MEASURES:
            raise SpecError("measure", m, f"is a per-position profile; a sweep needs a scalar measure: {allowed}")
        if m not in allowed:
            raise SpecError("measure", m, f"must be one of {allowed}" +
                            (" (cross_cos_mean needs several sequences)" if m == "cross_cos_mean" else ""))
    return list(dict.fromkeys(names))


def _axes(params, net0, make, spacing) -> list:
    if not isinstance(params, Mapping) or not 1 <= len(params) <= 2:
        raise SpecError("params", params if not isinstance(params, Mapping) else sorted(params),
                        "give one or two parameters to sweep: {name: values}")
    if sum(name in DEPTH_NAMES for name in params) > 1:
        raise SpecError("params", sorted(params), "the depth can be swept once (as L or depth)")
    known = sorted(net0.params) if isinstance(make, _NetworkModel) else None
    axes = []
    for name, values in params.items():
        where = f"params.{name}"
        try:
            vals = np.asarray(values, dtype=float).ravel()
        except (TypeError, ValueError):
            raise SpecError(where, values, "must be a list of numbers") from None
        if vals.size == 0 or not np.all(np.isfinite(vals)):
            raise SpecError(where, values, "must be a non-empty list of finite numbers")
        if name in DEPTH_NAMES:
            if np.any(vals != np.round(vals)) or np.any(vals < 1):
                raise SpecError(where, values.tolist() if hasattr(values, "tolist") else values,
                                "depths must be whole numbers >= 1")
            vals = vals.astype(int)
        elif known is not None and name not in known:
            raise SpecError("params", name, f"is not a param of the network; sweepable: {known + ['L']}")
        elif known is None:
            make(net0.depth, {name: float(vals[0])})   # a builder rejects unknown knobs itself
        if len(np.unique(vals)) != len(vals):
            raise SpecError(where, vals.tolist(), "values must be distinct")
        sp = spacing.get(name) or _infer_spacing(vals)
        if sp not in ("linear", "log", "list"):
            raise SpecError(f"spacing.{name}", sp, 'must be "linear", "log" or "list"')
        uses = param_uses(net0, name) if name not in DEPTH_NAMES else []
        axes.append(Axis(name, vals, sp, axis_label(name, "; ".join(uses[:2]) or None)))
    return axes




def parse_param(item: str, log: bool = False) -> tuple[str, np.ndarray, str]:
    """``(name, values, spacing)`` from ``NAME=START:STOP:N`` (N points, ends included; append
    ``:log`` or ``:lin`` to choose the spacing, default ``log`` if ``log`` else linear) or
    ``NAME=V1,V2,…``. Depth values (``L``/``depth``) are rounded to whole numbers and deduplicated.
    Raises :class:`SpecError` naming ``param``."""
    usage = ("must be NAME=START:STOP:N (N points, e.g. beta=0.1:2:20 or L=1:1000:30:log) "
             "or NAME=V1,V2,... (e.g. L=8,16,32)")
    name, sep, spec = str(item).partition("=")
    name, spec = name.strip(), spec.strip()
    if not sep or not name.isidentifier() or not spec:
        raise SpecError("param", item, usage)
    try:
        if ":" in spec:
            parts = spec.split(":")
            spacing = "log" if log else "linear"
            if parts[-1].strip().lower() in ("log", "lin", "linear"):
                spacing = "log" if parts.pop().strip().lower() == "log" else "linear"
            if len(parts) != 3:
                raise ValueError
            start, stop, count = float(parts[0]), float(parts[1]), parts[2].strip()
            if not count.isdigit() or int(count) < 1:
                raise SpecError("param", item, f"the number of points N = {count!r} must be a whole number >= 1")
            n = int(count)
            if not (math.isfinite(start) and math.isfinite(stop)):
                raise ValueError
            if spacing == "log":
                if start <= 0 or stop <= 0:
                    raise SpecError("param", item, "a log range needs START > 0 and STOP > 0")
                values = np.geomspace(start, stop, n)
            else:
                values = np.linspace(start, stop, n)
        else:
            values = np.array([float(v) for v in spec.split(",")])
            spacing = "list"
            if not np.all(np.isfinite(values)):
                raise ValueError
    except ValueError as exc:
        if isinstance(exc, SpecError):
            raise
        raise SpecError("param", item, usage) from None
    if name in DEPTH_NAMES:
        rounded = np.round(values)
        if spacing == "list" and np.any(rounded != values):
            raise SpecError("param", item, "depths must be whole numbers >= 1")
        values = np.array(list(dict.fromkeys(int(v) for v in rounded)))
        if np.any(values < 1):
            raise SpecError("param", item, "depths must be whole numbers >= 1")
    elif len(np.unique(values)) != len(values):
        raise SpecError("param", item, "values must be distinct")
    return name, values, spacing
