"""Monte Carlo backward pass: real backpropagation, by hand in numpy, through the sampler's networks.

For every seed the network is the one :func:`~kernelprop.montecarlo.simulate` builds with
``products="explicit"`` (same seed streams, same draws in the same order: the forward pass *is* the
sampler's :func:`~kernelprop.montecarlo.sampler.forward`, and the taped re-run used for the backward
pass is checked against it unit by unit). An output gradient ``G_L`` with ``G_L G_Lᵀ = Π_L`` is drawn
independently of the weights (``"exact"``: ``G_L = F P`` with ``F Fᵀ = Π_L`` and P an N×w Haar frame
of orthonormal rows, so ``G_L G_Lᵀ = Π_L`` exactly; ``"gaussian"``: ``G_L = F Z/√w``, exact in
expectation) and pushed back through every layer with its exact finite-width Jacobian:

* Dense ``Y = XW + 1bᵀ``: ``G_X = G_Y Wᵀ``; ``‖∂L/∂W‖² = ‖Xᵀ G_Y‖² = ⟨XXᵀ, G_Y G_Yᵀ⟩``;
* activation ``Y = c φ(X)``: ``G_X = c φ'(X) ⊙ G_Y`` (φ' = ``ACTIVATIONS[name].dphi``, or the layer's
  ``derivative`` for a callable);
* LayerNorm ``y = g x_c/s``, ``s² = mean(x_c²) + ε``: ``G_x = P_c (g/s)(G_y − x̂ (x̂·G_y)/w)``,
  ``x̂ = x_c/s``, ``P_c = I − 11ᵀ/w`` (the centring and x̂ projections the engine drops as O(1/d) are
  kept); RMSNorm the same without ``P_c``;
* dropout: ``G_X = G_Y ⊙ mask/(1 − p)`` with the forward mask;
* attention, per head h: ``O_h = M_h V_h``, ``M_h = A_h`` | ``αI + βA_h`` | ``αI + βA_h − γC_h``;
  ``G_{V_h} = M_hᵀ G_{O_h}``, ``∂L/∂A_h = β G_{O_h} V_hᵀ``, scores through the softmax Jacobian
  ``dS_i = (diag a_i − a_i a_iᵀ) dA_i``; tied ``S = QQᵀ/d_k``: ``G_Q = (dS + dSᵀ) Q/d_k``;
  ``"independent"``/``"standard"`` ``S = QKᵀ·scale``: ``G_Q = dS K·scale``, ``G_K = dSᵀ Q·scale``;
  ``G_X = G_V W_Vᵀ + G_Q W_Qᵀ + G_K W_Kᵀ``; output projection ``G_O = G_Y W_Oᵀ``;
* residual / parallel ``Y = αX + Σ_b β_b f_b(X)``: ``G_X = αG_Y + Σ_b J_bᵀ(β_b G_Y)``.

Recorded, per seed: the gradient kernel ``Π̂ = G Gᵀ`` (summed over features, like the engine) at the
labels of :func:`kernelprop.kernel.backward.backpropagate` and its measures ``grad_q_mean``, … ; and the
parameter-gradient norms ``‖∂L/∂W‖²/d`` (d the model width) in the engine's conventions:

* ``dense``: every Dense weight matrix (not the bias);
* ``values`` / ``output``: ``W_V`` / ``W_O`` of attention layers with weights;
* ``queries``: ``Σ_h ‖X_inᵀ dS_h K_h‖² / (d_k d)``. For zero-query layers (``scores = "uniform"``) this is
  exactly ``‖∂L/∂W_Q‖²/d`` at ``W_Q = 0`` with keys ``K_h = X W_K,h``, ``W_K ~ N(0, σ_qk²/w)`` (drawn in law
  from a separate stream, so the forward network is unchanged) and scores ``QKᵀ/√d_k``. For tied
  ``1/d_k`` layers it is ``d_k·‖∂L/∂W_Q‖²/d`` of the query role of the tied weight (``W_Q = W_K`` at init,
  differentiated in W_Q only): the ``1/d_k`` scores make the plain norm vanish like ``1/d_k``, and this
  rescaled norm has the engine's limit. For ``standard`` scores it is ``‖∂L/∂W_Q‖²/d`` with the real
  keys (``W_K ~ N(0, 1/w)``); for SPA (``A = D softmax(B + S)`` at zero queries) through
  ``dS_i = D_i J(p_i) dA_i``. Not recorded (as the engine) for weight-free layers, nor under the
  ``scores`` override (its keys have another law).

Seeds are aggregated to means and standard errors ``sd/√S``; the same networks also give the forward
records (``.forward``, a :class:`~kernelprop.montecarlo.simulate.Simulation`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .. import measures as M
from ..errors import NumericalError, SpecError
from ..inputs import Inputs
from ..kernel.propagate import Records
from ..layers import walk
from ..network import walk as W
from ..network.network import Network
from . import sampler as S
from .simulate import Simulation, _Accumulator, _check_int, _check_seed, _finish, check_options, measure_batch

GRAD_KINDS = ("dense", "values", "output", "queries")
GRAD_DRAWS = ("exact", "gaussian")
_BACKWARD_STREAM = 0xB4C   # spawn-key suffix of each seed's backward stream (output gradient, virtual keys)
TAPE_BUDGET = 256 * 2**20  # bytes of weights and activations a batch may keep for its backward pass


# ------------------------------------------------------------------------------------------------
# the output gradient


def sample_output_gradient(pi: np.ndarray, width: int, gens, kind: str = "exact") -> np.ndarray:
    """``G`` (B, N, w) with ``G Gᵀ = Π`` exactly (``"exact"``: ``G = F P``, ``F Fᵀ = Π``, P Haar with
    orthonormal rows; needs ``w ≥ N``) or in expectation (``"gaussian"``: ``G = F Z/√w``)."""
    lam, vec = np.linalg.eigh(pi)
    factor = vec * np.sqrt(np.clip(lam, 0.0, None))
    n = pi.shape[0]
    ctx = S.Context(list(gens), width, (n,))
    if kind == "exact":
        q, r = np.linalg.qr(ctx.normal((width, n)))
        q *= np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
        p = np.swapaxes(q, -1, -2)                     # (B, N, w), P Pᵀ = I
    else:
        p = ctx.normal((n, width)) / math.sqrt(width)
    return np.matmul(factor, p)


# ------------------------------------------------------------------------------------------------
# forward with a tape: each layer's own finite-width rule, with its transpose


def tape(layer, x: np.ndarray, ctx: S.Context, bctx: S.Context | None, path: str, queries: bool = True):
    """Forward one resolved layer exactly as :func:`~kernelprop.montecarlo.sampler.forward` with
    ``ctx.products == "explicit"`` (the same draws in the same order), returning ``(y, pull)`` with the
    layer's exact transpose ``pull(G_Y, grads) -> G_X`` (it appends ``(path, kind, ‖∂L/∂W‖²/d)`` per
    seed to ``grads``). ``bctx``: the backward stream, for the virtual
    keys of zero-query layers (``None`` or ``queries=False``: no query-gradient norms)."""
    saved = ctx.tape, ctx.path, ctx.bctx
    ctx.tape, ctx.path, ctx.bctx = True, path, (bctx if queries else None)
    try:
        return layer.sample(x, ctx)
    finally:
        ctx.tape, ctx.path, ctx.bctx = saved


# ------------------------------------------------------------------------------------------------
# result


@dataclass(frozen=True, eq=False)
class GradientSimulation(Records):
    """Result of :func:`simulate_gradients`; mirrors :class:`~kernelprop.kernel.backward.GradientTrajectory`.

    ``kernels[r]`` / ``kernel_stderr[r]``: seed mean and standard error of ``Π̂ = G Gᵀ`` at record r
    (``labels``, ``blocks`` as the engine's); ``measures[name][r]`` / ``stderr[name][r]`` /
    ``samples[name]`` (S, R[, T₀]) for ``grad_q_mean, grad_q_min, grad_q_max, grad_cos_mean,
    grad_cos_first``; ``grads``: (unit label, block, layer path, kind, mean, se) per weight matrix,
    ``grad_samples[(unit label, block, path, kind)]`` the per-seed values; ``forward``: the forward
    :class:`~kernelprop.montecarlo.simulate.Simulation` of the same networks.
    """

    labels: list
    blocks: np.ndarray
    measures: dict
    stderr: dict
    samples: dict
    kernels: np.ndarray | None
    kernel_stderr: np.ndarray | None
    grads: list
    grad_samples: dict
    forward: Simulation
    segments: tuple
    width: int
    seeds: int
    meta: dict = field(default_factory=dict)
    records: list = field(default_factory=list)

    def grad_samples_per_block(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """``(blocks, per-seed sums (S, n_blocks))`` of the parameter-gradient norms of ``kind``."""
        by: dict = {}
        for (_label, l, _path, k), v in self.grad_samples.items():
            if k == kind:
                by[l] = by.get(l, 0.0) + v
        ls = np.array(sorted(by), dtype=int)
        return ls, (np.stack([by[l] for l in ls], axis=1) if len(ls) else np.zeros((self.seeds, 0)))

    def grad_norms(self, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(blocks, mean, standard error)`` of the per-block summed norms ``‖∂L/∂W‖²/d`` of ``kind``."""
        ls, v = self.grad_samples_per_block(kind)
        return ls, v.mean(axis=0), _se(v)

    def grad_ratio(self, num: str = "queries", den: str = "values") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(blocks, r, se)``: ratio of seed means ``r = mean(num)/mean(den)`` per block, with its
        delta-method standard error ``sd(num − r·den)/(√S · mean(den))``."""
        ln, a = self.grad_samples_per_block(num)
        ld, c = self.grad_samples_per_block(den)
        common = np.intersect1d(ln, ld)
        a = a[:, np.searchsorted(ln, common)]
        c = c[:, np.searchsorted(ld, common)]
        r = a.mean(axis=0) / c.mean(axis=0)
        return common, r, _se(a - r * c) / np.abs(c.mean(axis=0))


def _se(v):
    s = v.shape[0]
    return v.std(axis=0, ddof=1) / math.sqrt(s) if s > 1 else np.full(v.shape[1:], np.nan)


# ------------------------------------------------------------------------------------------------
# driver




def backward_stream(ss: np.random.SeedSequence) -> np.random.SeedSequence:
    """The seed's second, independent stream (output gradient and virtual keys): the forward stream is
    left exactly as :func:`~kernelprop.montecarlo.simulate` uses it."""
    return np.random.SeedSequence(ss.entropy, spawn_key=tuple(ss.spawn_key) + (_BACKWARD_STREAM,),
                                  pool_size=ss.pool_size)


def simulate_gradients(network: Network, inputs: Inputs, width: int, seeds: int = 16, *,
                       output_grad="identity", rho: float = 0.0, grad_draw: str = "exact",
                       init: str | None = None, input_kind: str = "exact", scores: str | None = None,
                       record: str = "blocks", every: int = 1, seed: int | np.random.SeedSequence = 0,
                       batch: int | None = None, spectral: bool | str = "auto", dong: bool = False,
                       memory_limit: int | None = None, products: str = "explicit",
                       progress: Callable[[int, int], None] | None = None) -> GradientSimulation:
    """Backpropagate through ``seeds`` finite networks of width ``width`` (module docstring).

    ``output_grad``/``rho``: Π_L as for :func:`kernelprop.kernel.backward.backpropagate` (``"identity"``,
    ``"equicorrelated"`` or an N×N PSD matrix). ``grad_draw``: ``"exact"`` (``G_L G_Lᵀ = Π_L``, needs output
    width ≥ N) or ``"gaussian"``. The other options are those of :func:`~kernelprop.montecarlo.simulate`;
    the weights are always explicit matrices (``products`` other than ``"explicit"`` is refused), so the
    networks are those of ``simulate(..., products="explicit")`` with the same seed, whose forward records
    ``.forward`` reproduces. Memory: a batch keeps its whole tape (weights and activations) when it fits
    in ``TAPE_BUDGET`` (256 MiB); otherwise one checkpoint (B, N, w) per unit, each unit re-run with a
    tape during the backward pass (its weights redrawn from the saved generator states) and checked
    against the sampler's forward output.
    """
    from ..kernel.backward import output_gradient
    if products != "explicit":
        raise SpecError("products", products, "the backward pass needs the weight matrices: only \"explicit\"")
    if grad_draw not in GRAD_DRAWS:
        raise SpecError("grad_draw", grad_draw, f"must be one of {list(GRAD_DRAWS)}")
    check_options(inputs, width, seeds, every, init, input_kind, scores, record)
    n = inputs.n_tokens
    pi_out = output_gradient(output_grad, n, rho)
    if spectral == "auto":
        spectral = max(inputs.segments) <= 512
    plan = S.plan(network, width, inputs.segments, init, scores, "explicit")
    t_max = max(inputs.segments)
    fwd_labels = W.RecordPlan(network, record, every).all(network)
    plan.records = len(fwd_labels)
    units = list(network.layers())
    checkpoint = 8 * len(units) * n * plan.max_width                  # one unit input per unit, per seed
    per_seed = plan.batch_bytes(1, n, t_max) + checkpoint
    limit = S.machine_memory() if memory_limit is None else int(memory_limit)
    if per_seed + plan.stored_bytes(seeds, n, inputs.segments[0], True) > limit:
        raise SpecError("width", width, f"one seed needs about {per_seed / S.GIB:.1f} GiB with explicit weights "
                        f"and one checkpoint per unit, more than {limit / S.GIB:.1f} GiB: lower --width or the depth")
    leaves = sum(1 for _, _, layer in units for _ in walk(layer))
    tape_seed = 8 * (plan.weight_count + 3 * leaves * n * plan.max_width)   # the whole tape of one seed
    if batch is None:
        batch = plan.auto_batch(seeds, n, t_max)
        if tape_seed <= TAPE_BUDGET:           # keep the whole tape: no re-run of the forward pass
            batch = min(batch, TAPE_BUDGET // tape_seed)
        else:
            batch = min(batch, max(1, S.BATCH_BUDGET // max(1, checkpoint)))
    else:
        _check_int("batch", batch, 1)
        batch = min(batch, seeds)
    keep_tape = tape_seed * batch <= TAPE_BUDGET

    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(_check_seed(seed))
    streams = ss.spawn(seeds)
    bplan = W.RecordPlan(network, "blocks", every)
    g_labels = [W.INPUT] + [r for r in map(bplan.after_unit, W.units(network)) if r is not None]
    facc = _Accumulator(len(fwd_labels), n, True)
    fsamples: list = [[] for _ in fwd_labels]
    gacc = _Accumulator(len(g_labels), n, True)
    gsamples: list = [[] for _ in g_labels]
    grad_samples: dict = {}
    batches = [list(range(s, min(seeds, s + batch))) for s in range(0, seeds, batch)]
    steps = max(1, 2 * len(units))      # forward and backward through every unit, reported in blocks as simulate
    depth = max(1, network.depth)
    for bi, idx in enumerate(batches):
        gens = [np.random.Generator(np.random.PCG64(streams[i])) for i in idx]
        bgens = [np.random.Generator(np.random.PCG64(backward_stream(streams[i]))) for i in idx]
        cb = None if progress is None else (
            lambda k, bi=bi: progress(bi * depth + (k * depth) // steps, len(batches) * depth))
        fwd, bwd, grads = _run(network, inputs, width, gens, bgens, pi_out, grad_draw, init, input_kind, scores,
                               record, every, spectral, dong, cb, keep_tape)
        if [lab for lab, *_ in fwd] != [r.label for r in fwd_labels] or \
                [lab for lab, _ in bwd] != [r.label for r in g_labels]:   # pragma: no cover - internal consistency
            raise RuntimeError("Monte Carlo records do not match the engine's record labels")
        for r, (_, kern, mean, rows) in enumerate(fwd):
            facc.add(r, kern, mean)
            fsamples[r].extend(rows)
        for r, (_, pi) in enumerate(bwd):
            gacc.add(r, pi, np.zeros((len(idx), n)))
            gsamples[r].extend({"grad_" + k: v for k, v in M.compute(p, inputs.segments, spectral=False).items()}
                               for p in pi)
        for key, v in grads.items():
            grad_samples.setdefault(key, []).append(v)
    meta = dict(width=width, seeds=seeds, init=init or "per layer", inputs=input_kind, scores=scores or "spec",
                seed=str(ss.entropy) if isinstance(seed, np.random.SeedSequence) else seed, batch=batch,
                products="explicit", record=record, every=every, output_grad=_describe(output_grad, rho),
                grad_draw=grad_draw)
    forward = _finish(network, inputs, width, seeds, fwd_labels, facc, fsamples, meta)
    gfin = _finish(network, inputs, width, seeds, g_labels, gacc, gsamples, meta)
    grad_samples = {k: np.concatenate(v) for k, v in grad_samples.items()}
    grads = [(label, l, path, kind, float(v.mean()), float(_se(v[:, None])[0]))
             for (label, l, path, kind), v in grad_samples.items()]
    return GradientSimulation(labels=gfin.labels, blocks=gfin.blocks, measures=gfin.measures, stderr=gfin.stderr,
                              samples=gfin.samples, kernels=gfin.kernels, kernel_stderr=gfin.kernel_stderr,
                              grads=grads, grad_samples=grad_samples, forward=forward, segments=inputs.segments,
                              width=width, seeds=seeds, meta=meta, records=gfin.records)


def _describe(output_grad, rho):
    if isinstance(output_grad, str):
        return output_grad + (f" (rho = {rho:g})" if output_grad == "equicorrelated" else "")
    return "matrix"


def _run(network, inputs, width, gens, bgens, pi_out, grad_draw, init, input_kind, scores, record, every,
         spectral, dong, progress, keep_tape=True):
    """One batch: forward through every unit, then backward unit by unit.

    ``keep_tape``: the forward pass keeps every unit's tape (weights and activations). Otherwise it is
    the sampler's own forward with a checkpoint (input and generator states) per unit, and each unit
    is re-run with a tape during the backward pass and checked against the sampler's output (memory:
    one unit's weights at a time)."""
    ctx = S.Context(gens, width, inputs.segments, init=init, scores=scores, products="explicit")
    ctx.bctx = S.Context(bgens, width, inputs.segments)
    x = S.sample_inputs(inputs, width, gens, input_kind)
    segments = inputs.segments
    fwd = []

    def keep(label, x):
        kern, mean, rows = measure_batch(label, x, segments, spectral, dong)
        fwd.append((label, kern, mean, rows))

    keep("input", x)
    all_units = list(W.units(network))
    fplan, bplan = W.RecordPlan(network, record, every), W.RecordPlan(network, "blocks", every)
    saved = []          # per unit: its pullbacks (keep_tape) or (input, generator states)
    for unit in all_units:
        if not keep_tape:
            saved.append((x, [g.bit_generator.state for g in gens]))
        x, pulls = _unit(unit, x, ctx, fplan, keep, taped=keep_tape)
        if keep_tape:
            saved.append(pulls)
        if progress is not None:
            progress(unit.index + 1)
    if grad_draw == "exact" and x.shape[-1] < pi_out.shape[0]:
        raise SpecError("grad_draw", "exact", f"the network's output has {x.shape[-1]} features, fewer than the "
                        f"{pi_out.shape[0]} tokens: use grad_draw=\"gaussian\" or a wider output")
    g = sample_output_gradient(pi_out, x.shape[-1], bgens, grad_draw)
    bwd, grads = [], {}

    def keep_grad(label, g):
        p = np.matmul(g, np.swapaxes(g, -1, -2))
        bwd.append((label, 0.5 * (p + np.swapaxes(p, -1, -2))))

    if all_units:
        last = bplan.after_unit(all_units[-1])
        if last is not None:
            keep_grad(last.label, g)
    outputs = None if keep_tape else [c[0] for c in saved[1:]] + [x]
    n_units = len(all_units)
    for u in range(n_units - 1, -1, -1):
        unit = all_units[u]
        ctx.where = unit.label
        if keep_tape:
            pulls, saved[u] = saved[u], None
        else:
            x_in, states = saved[u]
            for gen, st in zip(gens, states):
                gen.bit_generator.state = st
            y, pulls = _unit(unit, x_in, ctx, None, None, taped=True)
            ref = outputs[u]
            if y.shape != ref.shape or not np.allclose(y, ref, rtol=1e-9, atol=1e-12 * float(np.abs(ref).max())):
                raise RuntimeError(  # pragma: no cover
                    f"{unit.label}: the taped re-run differs from the sampler's forward pass "
                    "(the backward pass would not see the simulated network)")
            saved[u] = outputs[u] = None
        unit_grads: list = []
        for pull in reversed(pulls):
            g = pull(g, unit_grads)
        for path, kind, v in unit_grads:
            key = (unit.label, unit.block, path, kind)
            grads[key] = grads.get(key, 0.0) + v
        if not np.all(np.isfinite(g)):
            raise NumericalError(unit.label, "the backpropagated gradient has NaN or infinite entries",
                                 "lower weight variances or branch weights, or add normalisation")
        if u > 0:
            rec = bplan.after_unit(all_units[u - 1])
            if rec is not None:
                keep_grad(rec.label, g)
        if progress is not None:
            progress(2 * n_units - u)
    keep_grad("input", g)
    bwd.reverse()
    return fwd, bwd, grads


def _unit(unit, x, ctx, plan, keep, taped):
    """Forward one unit part by part, with tapes (``taped``) or by the sampler's forward; checks that the
    features stay finite and keeps the planned records (``plan``, ``keep``; None: no records)."""
    pulls = []
    ctx.tape, ctx.path = taped, ""
    try:
        for i, part in enumerate(unit.parts):
            ctx.where, ctx.path = unit.part_label(i), unit.part_path(i)
            x, pull = S.sample(part, x, ctx)
            pulls.append(pull)
            if not np.all(np.isfinite(x)):
                raise NumericalError(ctx.where, "the finite-width features have NaN or infinite entries",
                                     f"lower weight_var / branch weights or the depth (layer type {part.kind})")
            if plan is not None:
                rec = plan.after(unit, i)
                if rec is not None:
                    keep(rec.label, x)
    finally:
        ctx.tape = False
    return x, pulls
