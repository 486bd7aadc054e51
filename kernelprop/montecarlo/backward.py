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
  keys (``W_K ~ N(0, 1/w)``). Not recorded (as the engine) for SPA and weight-free layers, nor under
  the ``scores`` override (its keys have another law).

Seeds are aggregated to means and standard errors ``sd/√S``; the same networks also give the forward
records (``.forward``, a :class:`~kernelprop.montecarlo.simulate.Simulation`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import measures as M
from ..errors import NotSupportedError, NumericalError, SpecError
from ..inputs import Inputs
from ..network import layers as L
from ..network.layers import Network
from ..kernel.backward import record_at, unit_label
from ..kernel.propagate import Records
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
# forward with a tape (the sampler's rules, explicit weights)


@dataclass
class _Node:
    kind: str
    layer: object = None
    path: str = ""
    data: dict = field(default_factory=dict)


def tape(layer, x: np.ndarray, ctx: S.Context, bctx: S.Context | None, path: str, queries: bool = True):
    """Forward one resolved layer exactly as :func:`~kernelprop.montecarlo.sampler.forward` with
    ``ctx.products == "explicit"`` (the same draws in the same order), returning ``(y, node)`` with
    what :func:`back` needs. ``bctx``: the backward stream, for the virtual keys of zero-query layers
    (``None`` or ``queries=False``: no query-gradient norms)."""
    if isinstance(layer, L.Serial):
        nodes, where = [], ctx.where
        for i, child in enumerate(layer.layers):
            ctx.where = f"{where}/{i}:{child.kind}"
            x, node = tape(child, x, ctx, bctx, f"{path}/{i}:{child.kind}", queries)
            nodes.append(node)
        ctx.where = where
        return x, _Node("serial", layer, path, {"nodes": nodes})
    if isinstance(layer, (L.Residual, L.Parallel)):
        branches = [layer.branch] if isinstance(layer, L.Residual) else list(layer.branches)
        betas = [layer.beta] if isinstance(layer, L.Residual) else list(layer.betas)
        y = layer.alpha * x if layer.alpha != 1 else x.copy()
        nodes = []
        for b, (branch, beta) in enumerate(zip(branches, betas)):
            if beta != 0:
                f, node = tape(branch, x, ctx, bctx, f"{path}/branch{b}" if len(branches) > 1 else path, queries)
                y += beta * f
                nodes.append((beta, node))
        return y, _Node("sum", layer, path, {"alpha": layer.alpha, "nodes": nodes})
    if isinstance(layer, L.Dense):
        fan_out = S.out_width(layer, ctx.width)
        w = S.weights(ctx, x.shape[-1], fan_out, layer.weight_var, layer.init)
        y = np.matmul(x, w)
        if layer.bias_var:
            y += ctx.normal((1, fan_out)) * math.sqrt(layer.bias_var)
        return y, _Node("dense", layer, path, {"x": x, "w": w})
    if isinstance(layer, (L.Activation, L.LayerNorm, L.RMSNorm)):
        return S.forward(layer, x, ctx), _Node(layer.kind, layer, path, {"x": x})
    if isinstance(layer, L.Dropout):
        if layer.p == 0:
            return x, _Node("dropout", layer, path, {"mask": None})
        mask = (ctx.uniform(x.shape[1:]) >= layer.p) * (1.0 / (1.0 - layer.p))
        return x * mask, _Node("dropout", layer, path, {"mask": mask})
    if isinstance(layer, L.Attention):
        return _tape_attention(layer, x, ctx, bctx if queries else None, path)
    raise NotSupportedError(f"{ctx.where}: the Monte Carlo backward pass has no rule for layer type "
                            f"{type(layer).__name__}")


def _heads(a, b, t, h):
    """(B, t, H·k) → (B, H, t, k)."""
    return a.reshape(b, t, h, -1).transpose(0, 2, 1, 3)


def _unheads(a, b, t):
    """(B, H, t, k) → (B, t, H·k)."""
    return a.transpose(0, 2, 1, 3).reshape(b, t, -1)


def _tape_attention(layer: L.Attention, x, ctx, bctx, path):
    b, n, w = x.shape
    h = layer.heads
    mode = S.score_mode(layer, ctx.scores)
    wv = S.weights(ctx, w, w, layer.value_var) if layer.values == "dense" else None
    v = x if wv is None else np.matmul(x, wv)
    uses_a = layer.beta != 0
    wq = wk = q = k = None
    dk = S.key_width(layer, w)
    scale = 1.0
    if uses_a and mode != "uniform":
        wq = S.weights(ctx, w, h * dk, layer.qk_var)
        q = np.matmul(x, wq)
        if mode == "tied":
            k = q
        else:
            wk = S.weights(ctx, w, h * dk, 1.0)
            k = np.matmul(x, wk)
        scale = 1.0 / (math.sqrt(dk) if mode == "standard" else dk)
    out = np.empty_like(v)
    segs = []
    for sl, t in S.segment_slices(ctx.segments):
        vh = _heads(v[:, sl], b, t, h)
        key = ("offsets", id(layer.bias) if isinstance(layer.bias, np.ndarray) else layer.bias,
               layer.alibi_scale, layer.causal, h, t)
        offsets = ctx.cache.get(key)
        if offsets is None:
            offsets = ctx.cache[key] = S._logit_offsets(layer, t, ctx.where)
        y = np.zeros(vh.shape) if layer.matrix == "softmax" else layer.alpha * vh
        c = None
        if S._spa(layer):
            skey = ("spa", layer.spa, layer.spa_step, layer.spa_layers, layer.spa_final, layer.causal, t)
            c = ctx.cache.get(skey)
            if c is None:
                c = ctx.cache[skey] = S._spa_matrix(layer, t)
        elif mode == "uniform" or layer.matrix == "shaped":
            ckey = ("zero-score",) + key[1:]
            c = ctx.cache.get(ckey)
            if c is None:
                c = ctx.cache[ckey] = S.softmax(offsets.copy())
        a = None
        if uses_a:
            if mode == "uniform":
                a = c
            else:
                qh = _heads(q[:, sl], b, t, h)
                kh = qh if k is q else _heads(k[:, sl], b, t, h)
                a = S.softmax(np.matmul(qh, np.swapaxes(kh, -1, -2)) * scale + offsets)
            y += layer.beta * np.matmul(a, vh)
        if layer.matrix == "shaped" and layer.gamma != 0:
            y -= layer.gamma * np.matmul(c, vh)
        out[:, sl] = _unheads(y, b, t)
        segs.append((sl, t, vh, a, c))
    wo = S.weights(ctx, w, w, layer.out_var) if layer.projection == "dense" else None
    y = out if wo is None else np.matmul(out, wo)
    # query-gradient norms in the engine's convention (module docstring)
    want_q = bctx is not None and not layer.weight_free and not S._spa(layer) and ctx.scores is None
    keys = None
    if want_q and uses_a:
        keys = k if mode != "uniform" else S.project(bctx, x, h * dk, layer.qk_var)   # virtual keys at W_Q = 0
    data = dict(x=x, v=v, out=out, wv=wv, wo=wo, wq=wq, wk=wk, q=q, k=k, mode=mode, scale=scale, dk=dk,
                segs=segs, want_q=want_q, keys=keys)
    return y, _Node("attention", layer, path, data)


# ------------------------------------------------------------------------------------------------
# backward through a tape


def _gram_dot(x, g):
    """``‖xᵀ g‖_F²`` per seed, as ``⟨x xᵀ, g gᵀ⟩`` (cheap when N ≪ width)."""
    return np.einsum("bij,bij->b", np.matmul(x, np.swapaxes(x, -1, -2)), np.matmul(g, np.swapaxes(g, -1, -2)))


def back(node: _Node, g: np.ndarray, grads: list, d: int) -> np.ndarray:
    """``G_X`` from ``G_Y`` through a taped layer; appends ``(path, kind, ‖∂L/∂W‖²/d per seed)`` to ``grads``."""
    k, data, layer = node.kind, node.data, node.layer
    if k == "serial":
        for child in reversed(data["nodes"]):
            g = back(child, g, grads, d)
        return g
    if k == "sum":
        out = data["alpha"] * g
        for beta, child in data["nodes"]:
            out = out + back(child, beta * g, grads, d)
        return out
    if k == "dense":
        grads.append((node.path, "dense", _gram_dot(data["x"], g) / d))
        return np.matmul(g, np.swapaxes(data["w"], -1, -2))
    if k == "activation":
        return g * (layer.scale * np.asarray(derivative(layer)(data["x"]), dtype=np.float64))
    if k in ("layernorm", "rmsnorm"):
        return _back_norm(layer, data["x"], g, centre=k == "layernorm" and layer.centre)
    if k == "dropout":
        return g if data["mask"] is None else g * data["mask"]
    if k == "attention":
        return _back_attention(node, g, grads, d)
    raise NotSupportedError(f"no Monte Carlo backward rule for layer type {k}")


def derivative(layer: L.Activation) -> Callable:
    """φ' of an activation layer, parameters bound: the registry's ``dphi`` or the layer's ``derivative``."""
    if callable(layer.name) and not isinstance(layer.name, str):
        if layer.derivative is None:
            raise NotSupportedError(f"activation {layer.label!r} is a callable without derivative=: the Monte Carlo "
                                    "backward pass needs φ' (give Activation(f, derivative=f_prime))")
        return functools.partial(layer.derivative, **layer.params) if layer.params else layer.derivative
    from ..kernel.activations import ACTIVATIONS
    spec = ACTIVATIONS[layer.name]
    params = {**spec.params, **{k: float(v) for k, v in layer.params.items()}}
    return functools.partial(spec.dphi, **params) if params else spec.dphi


def _back_norm(layer, x, g, centre):
    """Exact transpose Jacobian of ``y = g·x_c/s``: ``P_c (g/s)(G − x̂ (x̂·G)/w)``."""
    w = x.shape[-1]
    xc = x - x.mean(axis=-1, keepdims=True) if centre else x
    inv = 1.0 / np.sqrt(np.einsum("bnk,bnk->bn", xc, xc)[..., None] / w + layer.eps)
    xhat = xc * inv
    gx = g - xhat * (np.einsum("bnk,bnk->bn", xhat, g)[..., None] / w)
    gx *= layer.gain * inv
    if centre:
        gx -= gx.mean(axis=-1, keepdims=True)
    return gx


def _back_attention(node, g, grads, d):
    layer, D = node.layer, node.data
    b, n, w = g.shape
    h = layer.heads
    mode, scale = D["mode"], D["scale"]
    if D["wo"] is not None:
        grads.append((node.path, "output", _gram_dot(D["out"], g) / d))
        g = np.matmul(g, np.swapaxes(D["wo"], -1, -2))
    gv = np.empty_like(g)
    score_path = mode != "uniform" and D["q"] is not None
    gq = np.zeros_like(D["q"]) if score_path else None
    gk = np.zeros_like(D["k"]) if score_path and D["k"] is not D["q"] else None
    qrows = np.zeros((b, h, n, D["dk"])) if D["keys"] is not None else None   # dS_h K_h, block-diagonal dS
    for sl, t, vh, a, c in D["segs"]:
        go = _heads(g[:, sl], b, t, h)
        gvh = np.zeros(go.shape) if layer.matrix == "softmax" else layer.alpha * go
        if a is not None:
            gvh += layer.beta * np.matmul(np.swapaxes(a, -1, -2), go)
        if layer.matrix == "shaped" and layer.gamma != 0:
            gvh -= layer.gamma * np.matmul(np.swapaxes(c, -1, -2), go)
        gv[:, sl] = _unheads(gvh, b, t)
        if a is None or not (score_path or qrows is not None):
            continue
        da = layer.beta * np.matmul(go, np.swapaxes(vh, -1, -2))           # ∂L/∂A_h
        ds = a * (da - np.sum(a * da, axis=-1, keepdims=True))             # softmax Jacobian, row by row
        if score_path:
            qh = _heads(D["q"][:, sl], b, t, h)
            if gk is None:                                                 # tied: S = Q Qᵀ/d_k
                gq[:, sl] = _unheads(np.matmul((ds + np.swapaxes(ds, -1, -2)) * scale, qh), b, t)
            else:
                kh = _heads(D["k"][:, sl], b, t, h)
                gq[:, sl] = _unheads(np.matmul(ds * scale, kh), b, t)
                gk[:, sl] = _unheads(np.matmul(np.swapaxes(ds, -1, -2) * scale, qh), b, t)
        if qrows is not None:
            qrows[:, :, sl] = np.matmul(ds, _heads(D["keys"][:, sl], b, t, h))
    if qrows is not None:
        rr = np.einsum("bhik,bhjk->bij", qrows, qrows)                      # Σ_h (dS K)(dS K)ᵀ
        xx = np.matmul(D["x"], np.swapaxes(D["x"], -1, -2))
        grads.append((node.path, "queries", np.einsum("bij,bij->b", xx, rr) / (D["dk"] * d)))
    elif D["want_q"]:
        grads.append((node.path, "queries", np.zeros(b)))                   # β = 0: no path through A
    if D["wv"] is not None:
        grads.append((node.path, "values", _gram_dot(D["x"], gv) / d))
        gx = np.matmul(gv, np.swapaxes(D["wv"], -1, -2))
    else:
        gx = gv
    if gq is not None:
        gx = gx + np.matmul(gq, np.swapaxes(D["wq"], -1, -2))
    if gk is not None:
        gx = gx + np.matmul(gk, np.swapaxes(D["wk"], -1, -2))
    return gx


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

    def grad_samples_per_block(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """``(blocks, per-seed sums (S, n_blocks))`` of the parameter-gradient norms of ``kind``."""
        by = {}
        for (label, l, path, k), v in self.grad_samples.items():
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
    fwd_labels = S.record_labels(network, record, every)
    plan.records = len(fwd_labels)
    units = list(network.layers())
    checkpoint = 8 * len(units) * n * plan.max_width                  # one unit input per unit, per seed
    per_seed = plan.batch_bytes(1, n, t_max) + checkpoint
    limit = S.machine_memory() if memory_limit is None else int(memory_limit)
    if per_seed + plan.stored_bytes(seeds, n, inputs.segments[0], True) > limit:
        raise SpecError("--width", width, f"one seed needs about {per_seed / S.GIB:.1f} GiB with explicit weights "
                        f"and one checkpoint per unit, more than {limit / S.GIB:.1f} GiB: lower --width or the depth")
    leaves = sum(1 for _, _, layer in units for _ in L.walk(layer))
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
    rec = [record_at(units, u, every) for u in range(len(units))]
    g_labels = [("input", 0)] + [r for r in rec if r is not None]
    facc = _Accumulator(len(fwd_labels), n, True)
    fsamples = [[] for _ in fwd_labels]
    gacc = _Accumulator(len(g_labels), n, True)
    gsamples = [[] for _ in g_labels]
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
        if [lab for lab, *_ in fwd] != [lab for lab, _ in fwd_labels] or \
                [lab for lab, _ in bwd] != [lab for lab, _ in g_labels]:   # pragma: no cover - internal consistency
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
                              width=width, seeds=seeds, meta=meta)


def _describe(output_grad, rho):
    if isinstance(output_grad, str):
        return output_grad + (f" (rho = {rho:g})" if output_grad == "equicorrelated" else "")
    return "matrix"


def _run(network, inputs, width, gens, bgens, pi_out, grad_draw, init, input_kind, scores, record, every,
         spectral, dong, progress, keep_tape=True):
    """One batch: forward through every unit, then backward unit by unit.

    ``keep_tape``: the forward pass keeps every unit's tape (weights and activations). Otherwise it is
    the sampler's own :func:`~kernelprop.montecarlo.sampler.forward` with a checkpoint (input and
    generator states) per unit, and each unit is re-run with a tape during the backward pass and
    checked against the sampler's output (memory: one unit's weights at a time)."""
    ctx = S.Context(gens, width, inputs.segments, init=init, scores=scores, products="explicit")
    bctx = S.Context(bgens, width, inputs.segments)
    x = S.sample_inputs(inputs, width, gens, input_kind)
    segments = inputs.segments
    fwd = []

    def keep(label, x):
        kern, mean, rows = measure_batch(label, x, segments, spectral, dong)
        fwd.append((label, kern, mean, rows))

    keep("input", x)
    units = list(network.layers())
    depth = network.depth
    saved = []          # per unit: its tape (keep_tape) or (input, generator states)
    for idx, (section, l, layer) in enumerate(units):
        recorded = l % every == 0 or l == depth
        where = unit_label(section, l, layer)
        if not keep_tape:
            saved.append((x, [g.bit_generator.state for g in gens]))

        def part_done(i, part, x, n_parts, section=section, l=l, recorded=recorded):
            if not np.all(np.isfinite(x)):
                raise NumericalError(f"{ctx.where}", "the finite-width features have NaN or infinite entries",
                                     f"lower weight_var / branch weights or the depth (layer type {part.kind})")
            if record == "sublayers" and section == "block" and recorded and i < n_parts - 1:
                keep(f"block {l} · {i}:{part.kind}", x)

        x, node = _unit(section, l, layer, x, ctx, bctx, where, part_done, taped=keep_tape)
        if keep_tape:
            saved.append(node)
        if section == "block":
            if recorded:
                keep(f"block {l}", x)
        elif idx + 1 == len(units) or units[idx + 1][0] != section:
            keep(section, x)
        if progress is not None:
            progress(idx + 1)
    if grad_draw == "exact" and x.shape[-1] < pi_out.shape[0]:
        raise SpecError("grad_draw", "exact", f"the network's output has {x.shape[-1]} features, fewer than the "
                        f"{pi_out.shape[0]} tokens: use grad_draw=\"gaussian\" or a wider output")
    g = sample_output_gradient(pi_out, x.shape[-1], bgens, grad_draw)
    bwd, grads = [], {}

    def keep_grad(label, g):
        p = np.matmul(g, np.swapaxes(g, -1, -2))
        bwd.append((label, 0.5 * (p + np.swapaxes(p, -1, -2))))

    rec = [record_at(units, u, every) for u in range(len(units))]
    if units and rec[-1] is not None:
        keep_grad(rec[-1][0], g)
    outputs = None if keep_tape else [c[0] for c in saved[1:]] + [x]
    for u in range(len(units) - 1, -1, -1):
        section, l, layer = units[u]
        where = unit_label(section, l, layer)
        ctx.where = where
        if keep_tape:
            node, saved[u] = saved[u], None
        else:
            x_in, states = saved[u]
            for gen, st in zip(gens, states):
                gen.bit_generator.state = st
            y, node = _unit(section, l, layer, x_in, ctx, bctx, where, None, taped=True)
            ref = outputs[u]
            if y.shape != ref.shape or not np.allclose(y, ref, rtol=1e-9, atol=1e-12 * float(np.abs(ref).max())):
                raise RuntimeError(f"{where}: the taped re-run differs from the sampler's forward pass "  # pragma: no cover
                                   "(the backward pass would not see the simulated network)")
            saved[u] = outputs[u] = None
        unit = []
        g = back(node, g, unit, width)
        for path, kind, v in unit:
            key = (where, l, path, kind)
            grads[key] = grads.get(key, 0.0) + v
        if not np.all(np.isfinite(g)):
            raise NumericalError(where, "the backpropagated gradient has NaN or infinite entries",
                                 "lower weight variances or branch weights, or add normalisation")
        if u > 0 and rec[u - 1] is not None:
            keep_grad(rec[u - 1][0], g)
        if progress is not None:
            progress(2 * len(units) - u)
    keep_grad("input", g)
    bwd.reverse()
    return fwd, bwd, grads


def _unit(section, l, layer, x, ctx, bctx, where, part_done, taped):
    """Forward one unit (a block: its top-level parts one by one; a stem/final layer), with a tape
    (``taped``) or by the sampler's :func:`~kernelprop.montecarlo.sampler.forward`; ``part_done(i, part,
    x, n_parts)`` after each part (sub-layer records, finiteness)."""
    parts = layer.layers if section == "block" else (layer,)
    nodes = []
    for i, part in enumerate(parts):
        ctx.where = f"block {l} · {i}:{part.kind}" if section == "block" else where
        if taped:
            x, node = tape(part, x, ctx, bctx, f"{where}/{i}:{part.kind}" if section == "block" else where)
            nodes.append(node)
        else:
            x = S.forward(part, x, ctx)
        if part_done is not None:
            part_done(i, part, x, len(parts))
    if not taped:
        return x, None
    return x, (_Node("serial", layer, where, {"nodes": nodes}) if section == "block" else nodes[0])
