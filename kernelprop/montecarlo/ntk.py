"""Empirical NTK of finite networks, and its comparison with the engine's Θ (docs/theory.md §14).

For every seed the network is a finite numpy network of width ``width`` built by the layers' own
finite-width rules (:meth:`~kernelprop.layers.Layer.sample` with a tape). Its NTK in the NTK
parametrisation ``W = (σ/√fan_in)·ω`` is formed from Jacobian products, without reading the engine:

* for a random unit output direction v (uniform on the sphere, ``E[v vᵀ] = I/d_out``) and every
  token p, the gradient of ``⟨v, f_p⟩`` is backpropagated through the layers' exact transposes, and
  at every layer with weights the pair (layer input X, gradient G_p at the weight's output) is kept;
* a weight ``W`` (fan_in × fan_out) of variance ``σ²/fan_in`` then contributes
  ``(σ²/fan_in) ⟨Xᵀ G_p, Xᵀ G_q⟩ = (σ²/fan_in) Σ_ts (X Xᵀ)_ts G_p,t·G_q,s`` to ``Θ̂_pq``, a shared bias of
  variance σ_b² contributes ``σ_b² (Σ_t G_p,t)·(Σ_t G_q,t)``;
* ``E_v`` of the sum is ``Θ_pq = (1/d_out) Σ_k Σ_ω ∂f_pk/∂ω ∂f_qk/∂ω``; directions are averaged.

Weights: Dense (and its bias), attention ``W_V``, ``W_O`` and the tied query/key matrix (its gradient
through both roles), the gated MLP's ``W_g, W_u, W_d``. Normalisation gains, activations, dropout and
Scale have no parameters (as in the engine). Inputs are not parameters: Θ = 0 at the input.
The comparison (:func:`check_ntk`) judges every entry ``Θ_pq`` (p ≤ q) of the network's output with the
criterion of :mod:`kernelprop.montecarlo.compare` (Richardson over two widths, Student t over seeds,
Bonferroni over the entries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import NotSupportedError, SpecError
from ..inputs import Inputs
from ..layers.activation import Activation
from ..layers.attention.layer import Attention
from ..layers.composite import Serial, _Sum
from ..layers.dense import Dense
from ..layers.dropout import Dropout
from ..layers.gated import GatedMLP
from ..layers.norm import _Norm
from ..layers.scale import Scale
from ..network import walk as W
from ..network.network import Network
from . import sampler as S
from .compare import ATOL, RTOL, _append, _check_alpha, _judge, _pair
from .simulate import _check_int, _check_seed, check_options

_NTK_STREAM = 0x7A7   # spawn-key suffix of each seed's stream of output directions
_FREE = (Activation, _Norm, Dropout, Scale)


@dataclass(frozen=True, eq=False)
class NTKSimulation:
    """Result of :func:`simulate_ntk`: ``mean`` (N×N) and ``stderr`` of the empirical NTK of the network's
    output over ``seeds`` networks of width ``width``; ``samples`` (S, N, N) the per-seed estimates;
    ``parts[kind]`` (S, N, N) the share of each kind of weight (``dense`` — Dense and gated-MLP matrices,
    ``bias``, ``values``, ``output``, ``queries`` — the tied query/key matrix)."""

    mean: np.ndarray
    stderr: np.ndarray
    samples: np.ndarray
    width: int
    seeds: int
    directions: int
    parts: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


class _Leaf:
    """One layer of the taped forward: its input, its pullback and the gradients met on the way back."""

    def __init__(self, layer, x, pull):
        self.layer, self.x, self.pull = layer, x, pull
        self.gs: list = []


def _taped(layer, x, ctx, leaves):
    """Forward ``layer`` with tapes, composites walked here (the same draws, in the order of their
    ``sample``), each leaf's pullback wrapped to keep the gradient at its output."""
    if isinstance(layer, Serial):
        where, path, pulls = ctx.where, ctx.path, []
        for i, child in enumerate(layer.layers):
            ctx.where, ctx.path = f"{where}/{i}:{child.kind}", f"{path}/{i}:{child.kind}"
            x, p = _taped(child, x, ctx, leaves)
            pulls.append(p)
        ctx.where, ctx.path = where, path

        def pull_serial(g):
            for p in reversed(pulls):
                g = p(g)
            return g
        return x, pull_serial
    if isinstance(layer, _Sum):
        alpha, path = layer.alpha, ctx.path
        branches, betas = layer.branch_list(), layer.weight_list()
        y = alpha * x
        pairs = []
        for b, (branch, beta) in enumerate(zip(branches, betas)):
            if beta != 0:
                ctx.path = f"{path}/branch{b}" if len(branches) > 1 else path
                f, p = _taped(branch, x, ctx, leaves)
                y = y + beta * f
                pairs.append((beta, p))
        ctx.path = path

        def pull_sum(g):
            out = alpha * g
            for beta, p in pairs:
                out = out + p(beta * g)
            return out
        return y, pull_sum
    _check_leaf(layer, ctx.where)
    y, pull = S.sample(layer, x, ctx)
    leaf = _Leaf(layer, x, pull)
    leaves.append(leaf)

    def pull_leaf(g):
        leaf.gs.append(g)
        return pull(g, [])
    return y, pull_leaf


def _check_leaf(layer, where):
    if isinstance(layer, _FREE):
        return
    if isinstance(layer, Dense):
        if layer.is_unit("weight_var"):
            raise NotSupportedError(f"{where}: the empirical NTK takes numeric weight variances (not \"unit\")")
        return
    if isinstance(layer, GatedMLP):
        return
    if isinstance(layer, Attention):
        if layer.projection == "dense" and layer.is_unit("out_var"):
            raise NotSupportedError(f"{where}: the empirical NTK takes numeric weight variances (not \"unit\")")
        if layer.score_mode(None) == "standard" and layer.beta != 0:
            raise NotSupportedError(f"{where}: standard 1/sqrt(d_k) scores have no NTK here (docs/theory.md §14)")
        return
    raise NotSupportedError(f"{where}: layer `{layer.kind}` has no empirical NTK rule (its parameters are not known "
                            "to kernelprop.montecarlo.ntk)")


def _weight_term(x, g, var):
    """``(var/fan_in) Σ_ts (X Xᵀ)_ts G_p,t·G_q,s`` per seed: x (B, N, fan_in), g (B, P, N, fan_out) → (B, P, P)."""
    k = np.matmul(x, np.swapaxes(x, -1, -2))
    z = np.einsum("bts,bqsk->bqtk", k, g)
    return (var / x.shape[-1]) * np.einsum("bptk,bqtk->bpq", g, z)


def _bias_term(g, var):
    u = g.sum(axis=2)                                       # (B, P, fan_out)
    return var * np.matmul(u, np.swapaxes(u, -1, -2))


def _closure(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


def _leaf_ntk(leaf) -> dict:
    """The contributions of one leaf's own weights to Θ̂ (B, P, P) by kind, from its kept gradients."""
    layer, x = leaf.layer, leaf.x
    if isinstance(layer, _FREE) or not leaf.gs:
        return {}
    g = np.stack(leaf.gs, axis=1)                           # (B, P, N, fan_out)
    if isinstance(layer, Dense):
        out = {"dense": _weight_term(x, g, layer.weight_var)}
        if layer.bias_var:
            out["bias"] = _bias_term(g, layer.bias_var)
        return out
    if isinstance(layer, GatedMLP):
        c = _closure(leaf.pull)
        gh = np.matmul(g, np.swapaxes(c["wd"], -1, -2)[:, None])
        gu = gh * c["a"][:, None]
        gg = gh * (c["u"] * np.asarray(c["dphi"](c["g"]), dtype=np.float64))[:, None]
        return {"dense": _weight_term(c["h"], g, layer.down_var) + _weight_term(x, gg, layer.gate_var)
                + _weight_term(x, gu, layer.up_var)}
    return _attention_ntk(layer, leaf, g)


def _attention_ntk(layer, leaf, g):
    d = leaf.pull.data
    out = {}
    if d["wo"] is not None:
        out["output"] = _weight_term(d["out"], g, layer.out_var)
        go = np.matmul(g, np.swapaxes(d["wo"], -1, -2)[:, None])
    else:
        go = g
    passes = go.shape[1]
    if d["wv"] is not None:     # G_V: the pullback with no weights after V and no score path
        only_v = dict(d, wo=None, wv=None, q=None, keys=None, want_q=False)
        gv = np.stack([layer._pullback(only_v, go[:, p], []) for p in range(passes)], axis=1)
        out["values"] = _weight_term(d["x"], gv, layer.value_var)
    if d["mode"] == "tied" and d["q"] is not None:     # G_Q through both roles of the tied matrix
        hk = d["q"].shape[-1]
        only_q = dict(d, wo=None, wv=np.zeros((hk, d["x"].shape[-1])), wq=np.eye(hk), keys=None, want_q=False)
        gq = np.stack([layer._pullback(only_q, go[:, p], []) for p in range(passes)], axis=1)
        out["queries"] = _weight_term(d["x"], gq, layer.qk_var)
    return out


def simulate_ntk(network: Network, inputs: Inputs, width: int, seeds: int = 16, *, directions: int = 2,
                 seed: int | np.random.SeedSequence = 0, init: str | None = None,
                 input_kind: str = "exact") -> NTKSimulation:
    """Empirical NTK of the output of ``seeds`` finite networks of width ``width`` (module docstring).

    ``directions``: random output directions per seed (each costs N backward passes). Networks are
    those of :func:`~kernelprop.montecarlo.simulate` with explicit weights (same seed streams); the
    directions come from a separate stream of each seed.
    """
    check_options(inputs, width, seeds, 1, init, input_kind, None, "blocks")
    _check_int("directions", directions, 1)
    n = inputs.n_tokens
    S.plan(network, width, inputs.segments, init, None, "explicit")
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(_check_seed(seed))
    streams = ss.spawn(seeds)
    batch = max(1, min(seeds, 8))
    samples, parts = [], []
    for start in range(0, seeds, batch):
        idx = range(start, min(seeds, start + batch))
        gens = [np.random.Generator(np.random.PCG64(streams[i])) for i in idx]
        vgens = [np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            streams[i].entropy, spawn_key=tuple(streams[i].spawn_key) + (_NTK_STREAM,)))) for i in idx]
        t, p = _batch(network, inputs, width, gens, vgens, directions, init, input_kind, n)
        samples.append(t)
        parts.append(p)
    theta = np.concatenate(samples)
    by_kind = {k: np.concatenate([p.get(k, np.zeros_like(t)) for p, t in zip(parts, samples)])
               for k in dict.fromkeys(k for p in parts for k in p)}
    se = theta.std(axis=0, ddof=1) / math.sqrt(seeds) if seeds > 1 else np.full(theta.shape[1:], np.nan)
    return NTKSimulation(mean=theta.mean(axis=0), stderr=se, samples=theta, width=width, seeds=seeds,
                         directions=directions, parts=by_kind,
                         meta=dict(width=width, seeds=seeds, directions=directions, init=init or "per layer",
                                   inputs=input_kind))


def _batch(network, inputs, width, gens, vgens, directions, init, input_kind, n):
    ctx = S.Context(gens, width, inputs.segments, init=init, products="explicit")
    ctx.tape = True
    x = S.sample_inputs(inputs, width, gens, input_kind)
    leaves: list = []
    pulls = []
    for unit in W.units(network):
        for i, part in enumerate(unit.parts):
            ctx.where, ctx.path = unit.part_label(i), unit.part_path(i)
            x, p = _taped(part, x, ctx, leaves)
            pulls.append(p)
            if not np.all(np.isfinite(x)):
                raise SpecError("width", width, f"the finite network's features are not finite after {ctx.where}")
    b, _, w_out = x.shape
    vctx = S.Context(vgens, w_out, (n,))
    theta = np.zeros((b, n, n))
    parts: dict = {}
    for _ in range(directions):
        v = vctx.normal((w_out,))                             # uniform on the unit sphere: E[v vᵀ] = I/w_out
        v /= np.linalg.norm(v, axis=-1, keepdims=True)
        for leaf in leaves:
            leaf.gs = []
        for p in range(n):
            g = np.zeros_like(x)
            g[:, p] = v
            for pull in reversed(pulls):
                g = pull(g)
        for leaf in leaves:
            for kind, c in _leaf_ntk(leaf).items():
                theta += c
                parts[kind] = parts.get(kind, 0.0) + c

    def sym(t):
        return 0.5 * (t + np.swapaxes(t, -1, -2)) / directions
    return sym(theta), {k: sym(v) for k, v in parts.items()}


def check_ntk(network: Network, inputs: Inputs, width: int, seeds: int = 16, *, directions: int = 2,
              half: int | None = None, alpha: float = 0.01, seed: int = 0, quad_nodes: int | None = None):
    """Compare the engine's Θ at the network's output with the empirical NTK at widths ``width`` and
    ``half`` (default width/2, Richardson-extrapolated; ``half=0``: no extrapolation), with the criterion
    of :mod:`~kernelprop.montecarlo.compare` (entries p ≤ q, Student t, Bonferroni, the engine's
    ``ntk_error`` as its own error). Returns ``(comparison, trajectory, simulation, half simulation)``."""
    from ..kernel.propagate import propagate
    _check_alpha(alpha)
    traj = propagate(network, inputs, keep_kernels=False, spectral=False, quad_nodes=quad_nodes, ntk=True)
    sim = simulate_ntk(network, inputs, width, seeds, directions=directions, seed=seed)
    hsim = None
    if half != 0:
        hw = half if half is not None else width // 2
        hsim = simulate_ntk(network, inputs, hw, seeds, directions=directions, seed=seed + 1)
    assert traj.ntk is not None
    cmp = compare_ntk(traj.ntk[-1], sim, hsim, alpha=alpha, error=float(traj["ntk_error"][-1]),
                      label=traj.labels[-1], record=len(traj) - 1)
    return cmp, traj, sim, hsim


def compare_ntk(theory: np.ndarray, sim: NTKSimulation, half: NTKSimulation | None = None, *, alpha: float = 0.01,
                error: float = 0.0, label: str = "output", record: int = 0):
    """Judge every entry ``Θ_pq`` (p ≤ q) of ``theory`` against the empirical NTK ``sim`` (Richardson with
    ``half`` when given) under the criterion of :mod:`~kernelprop.montecarlo.compare`; ``error``: the
    theory's own error estimate."""
    _check_alpha(alpha)
    theory = np.asarray(theory, dtype=float)
    if theory.shape != sim.mean.shape:
        raise SpecError("theory", f"shape {theory.shape}", f"must be the simulated NTK's shape {sim.mean.shape}")
    ab = _pair(sim, half)
    iu = np.triu_indices(theory.shape[0])
    raw: list = []
    _append(raw, ab, record, label, "ntk", [(int(i), int(j)) for i, j in zip(*iu)], theory[iu], sim.mean[iu],
            sim.stderr[iu], None if half is None else half.mean[iu], None if half is None else half.stderr[iu],
            True, ATOL, RTOL, error)
    return _judge([(raw, [label])], sim, half, alpha)[0]
