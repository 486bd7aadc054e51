"""Backward pass: the gradient kernel ``Π = G Gᵀ`` (``G = ∂loss/∂X``, summed over features) propagated
from the output to the input under gradient independence (THEORY §0, §4-5), and the expected squared
Frobenius norm of every parameter gradient.

Per-layer backward maps (the transpose of each forward map's Jacobian, averaged over fresh weights):

* Dense: ``Π_x = σ_w² Π_h`` (independent of the widths, since Π sums over features);
* activation: ``Π_x = scale² Π_h ⊙ E[φ'(u_i)φ'(u_j)]``;
* LayerNorm / RMSNorm: ``Π_x,ij = g²/(s_i s_j) Π_y,ij`` (the mean and x̂ projections are O(1/d));
* dropout: diagonal divided by ``1 − p``;
* attention: ``Π_X = σ_v²σ_o² (1/H) Σ_h A_hᵀ Π_Y A_h`` plus the path through the scores, which vanishes
  at zero queries and is O(1/d) under tied 1/d scores, but with independent queries and keys at
  1/sqrt(d_k) (``scores="standard"``) adds ``σ_qk²σ_v²σ_o² (1/H) Σ_h E_A[Π ⊙ T + Σ_ik Π_ik Σ_ik J_i Σ J_k]``,
  ``T_ik = tr(J_i Σ J_k Σ)`` (``G_Q = dS K/√d_k``, ``G_K = dSᵀQ/√d_k``; derived here); weight-free
  mixing ``Mᵀ Π M``;
* residual/parallel ``y = αx + Σβ_b f_b``: ``Π_x = α²Π + Σβ_b² B_b(Π) + Σ_{pairs} w_a w_b (P_aᵀΠP_b + P_bᵀΠP_a)``
  with ``P`` the linear part of each stream (identity for the skip; zero after fresh weights).

Parameter-gradient norms, reported per model width d (``E‖∂L/∂W‖_F² / d``):

* Dense: ``w_in Σ_ij Σ_ij Π_ij`` (``w_in`` = input width / d);
* values / output projection: ``σ_o² ⟨AΣAᵀ, Π⟩`` / ``σ_v² ⟨AΣAᵀ, Π⟩`` (head-averaged);
* queries, with keys ``N(0, σ_k²/d)`` and 1/sqrt(d_k) scores (derived here):
  ``σ_k²σ_v²σ_o² (1/H)Σ_h Σ_ik Π_ik Σ_ik tr(J_i Σ J_k Σ)`` with the softmax Jacobian
  ``J_i = diag(a_i) − a_i a_iᵀ``, summed over all token pairs of the batch (a cross-sequence pair
  counts unless the cross block of Σ is constant). Zero queries: ``σ_k² = σ_qk²`` (keys get zero
  gradient); standard scores: ``σ_k² = 1``, ``W_Q ~ N(0, σ_qk²/d)``, A averaged over the draws (the keys'
  norm is σ_qk² times the same); tied 1/d scores: the query role only, rescaled by d_k. Under rank
  collapse (``Σ ∝ 11ᵀ``) ``J_i Σ = 0``, so the query gradient vanishes (Noci et al. 2022).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import measures as M
from ..errors import NotSupportedError, NumericalError, SpecError
from ..inputs import Inputs
from ..network import layers as L
from ..network.layers import Network
from . import activations, attention
from .maps import Context, apply, branch_input, combine
from .propagate import Records, _checked
from .state import KernelState

_MEMORY = 1 << 30  # bytes of stored forward states before checkpointing kicks in


# ------------------------------------------------------------------------------------------------
# forward with a tape


@dataclass
class _Node:
    kind: str
    data: dict = field(default_factory=dict)


def _tape(layer, s: KernelState, ctx, path: str):
    """Run ``layer`` forward, returning ``(state_out, node)`` with what its backward map needs."""
    if isinstance(layer, L.Serial):
        nodes = []
        for i, child in enumerate(layer.layers):
            s, node = _tape(child, s, ctx, f"{path}/{i}:{child.kind}")
            nodes.append(node)
        return s, _Node("serial", {"nodes": nodes})
    if isinstance(layer, (L.Residual, L.Parallel)):
        branches = [layer.branch] if isinstance(layer, L.Residual) else list(layer.branches)
        betas = [layer.beta] if isinstance(layer, L.Residual) else list(layer.betas)
        outs, nodes = [], []
        for b, branch in enumerate(branches):
            o, node = _tape(branch, branch_input(s), ctx, f"{path}/branch{b}" if len(branches) > 1 else path)
            outs.append(o)
            nodes.append(node)
        y = combine(s, layer.alpha, outs, betas, ctx)
        deps = [o.dep for o in outs]
        return y, _Node("sum", {"alpha": layer.alpha, "betas": betas, "nodes": nodes, "deps": deps, "n": s.n})
    out = apply(layer, s, ctx)
    data = {"path": path, "layer": layer, "sigma": s.sigma, "width": s.width}
    if isinstance(layer, L.Activation):
        kp, _, err = activations.derivative_kernel(layer.name, s.sigma, layer.params, derivative=layer.derivative,
                                                   nodes=ctx.quad_nodes)
        data["dkernel"] = (layer.scale ** 2) * kp
    elif isinstance(layer, (L.LayerNorm, L.RMSNorm)):
        sig = s.sigma - np.outer(s.mean, s.mean) if isinstance(layer, L.LayerNorm) and layer.centre else s.sigma
        data["scale"] = layer.gain / np.sqrt(np.diag(sig) + layer.eps)
    elif isinstance(layer, L.Attention):
        ctx.counter -= 1          # reuse the draws the forward map just made
        data["heads"] = attention.head_mixings(layer, s.sigma, s.segments, ctx.cache, seed=ctx.next_seed())
        data["segments"] = s.segments
    return out, _Node(layer.kind, data)


# ------------------------------------------------------------------------------------------------
# backward through a tape


def _back(node: _Node, pi: np.ndarray, grads: list) -> np.ndarray:
    k, d = node.kind, node.data
    if k == "serial":
        for child in reversed(d["nodes"]):
            pi = _back(child, pi, grads)
        return pi
    if k == "sum":
        return _back_sum(d, pi, grads)
    layer = d["layer"]
    if k == "dense":
        grads.append((d["path"], "dense", d["width"] * float(np.vdot(d["sigma"], pi))))
        return layer.weight_var * pi
    if k == "activation":
        return pi * d["dkernel"]
    if k in ("layernorm", "rmsnorm"):
        return pi * np.outer(d["scale"], d["scale"])
    if k == "dropout":
        out = pi.copy()
        out[np.diag_indices_from(out)] /= 1.0 - layer.p
        return out
    if k == "attention":
        return _back_attention(d, pi, grads)
    raise NotSupportedError(f"no backward map for layer type {k}")


def _back_attention(d, pi, grads):
    layer, heads, sigma = d["layer"], d["heads"], d["sigma"]
    out = sum(w * m.kernel_t(pi) for w, m in heads)
    if layer.weight_free:
        return out
    sv = layer.value_var if layer.values == "dense" else 1.0
    so = layer.out_var if layer.projection == "dense" else 1.0
    mixed = sum(w * float(np.vdot(m.kernel(sigma), pi)) for w, m in heads)    # ⟨AΣAᵀ, Π⟩, head-averaged
    if layer.values == "dense":
        grads.append((d["path"], "values", so * mixed))
    if layer.projection == "dense":
        grads.append((d["path"], "output", sv * mixed))
    if layer.spa != "none":
        return (sv * so) * out          # SPA fixes the matrix through D_l and B_l: no score weights
    standard = layer.scores == "standard"
    q, score_pi = _score_terms(heads, sigma, pi, standard)
    # zero queries: virtual keys W_K ~ N(0, σ_qk²/d); standard scores: the real keys, W_K ~ N(0, 1/d)
    grads.append((d["path"], "queries", (1.0 if standard else layer.qk_var) * sv * so * q))
    out = (sv * so) * out
    if standard:
        out = out + (layer.qk_var * sv * so) * score_pi
    return out


def _softmax_part(m):
    """The softmax matrix inside a mixing and the weight of its Jacobian: (dense A, weight)."""
    if isinstance(m, attention.Combination):
        return (m.a.dense(), m.beta ** 2) if m.beta else (None, 0.0)
    return m.dense(), 1.0


def _score_terms(heads, sigma, pi, with_pi: bool):
    """Head-averaged terms through the softmax Jacobians ``J_i = diag a_i − a_i a_iᵀ`` (full N×N: a batch's
    query gradient sums over every token pair, cross-sequence ones included), with ``W = Π ⊙ Σ``:

    * ``q = (1/H) Σ_h Σ_ik W_ik T_ik``, ``T_ik = tr(J_i Σ J_k Σ)`` — the query-gradient norm per unit key
      variance;
    * if ``with_pi``, ``(1/H) Σ_h [Π ⊙ T + Σ_ik W_ik J_i Σ J_k]`` — the gradient kernel that 1/sqrt(d_k)
      scores send back through queries and keys (O(1/d) for zero or tied 1/d scores). O(N³) per head.
    """
    total, extra = 0.0, (np.zeros_like(pi) if with_pi else None)
    for w, m in heads:
        a, weight = _softmax_part(m)
        if a is None:
            continue
        ws = a @ sigma
        asa = ws @ a.T
        t = a @ (sigma * sigma) @ a.T
        t2 = (ws * ws) @ a.T
        t = t - t2 - t2.T + asa * asa
        wpi = pi * sigma
        total += w * weight * float(np.sum(wpi * t))
        if with_pi:
            u = ((a.T @ wpi) * ws.T) @ a
            k2 = sigma * (a.T @ wpi @ a) - u - u.T + a.T @ (wpi * asa) @ a
            extra += (w * weight) * (pi * t + k2)
    return total, extra


def _back_sum(d, pi, grads):
    alpha, betas, nodes, deps, n = d["alpha"], d["betas"], d["nodes"], d["deps"], d["n"]
    out = (alpha * alpha) * pi
    for beta, node in zip(betas, nodes):
        if beta != 0:
            branch_grads = []
            out = out + (beta * beta) * _back(node, pi, branch_grads)
            grads.extend((p, kind, beta * beta * v) for p, kind, v in branch_grads)
    streams = [("diag", np.ones(n), alpha)] + [(dep.kind, dep.p, b) for dep, b in zip(deps, betas)]
    for i in range(len(streams)):
        for j in range(i + 1, len(streams)):
            (ka, pa, wa), (kb, pb, wb) = streams[i], streams[j]
            if wa == 0 or wb == 0 or "zero" in (ka, kb):
                continue
            if "unknown" in (ka, kb):
                raise NotSupportedError("backward cross term of a branch that ends in a nonlinearity of the skip")
            c = _pt_pi_p(ka, pa, pi, kb, pb)
            out = out + (wa * wb) * (c + c.T)
    return out


def _pt_pi_p(ka, pa, pi, kb, pb):
    """``P_aᵀ Π P_b`` for diagonal (vector) or dense linear parts."""
    left = pa[:, None] * pi if ka == "diag" else pa.T @ pi
    return left * pb[None, :] if kb == "diag" else left @ pb


# ------------------------------------------------------------------------------------------------
# driver


@dataclass(frozen=True, eq=False)
class GradientTrajectory(Records):
    """Gradient kernels at every record (same labels as the forward :class:`Trajectory`), their
    measures, the forward trajectory, and the parameter-gradient norms ``grads``: a list of
    (unit label, block l, layer path, kind, value) with kind in dense, values, output, queries."""

    labels: list
    blocks: np.ndarray
    measures: dict
    grads: list
    kernels: np.ndarray | None
    forward: object

    def grad_norms(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """``(blocks, summed norms)`` of the parameter gradients of ``kind`` (dense, values, output, queries)."""
        by = {}
        for label, l, path, k, v in self.grads:
            if k == kind:
                by[l] = by.get(l, 0.0) + v
        ls = np.array(sorted(by))
        return ls, np.array([by[l] for l in ls])

    @property
    def growth(self) -> float:
        """Median per-block log-growth of the gradient norm going backward, ``ln(Π_{l−1}/Π_l)`` (0 = stable)."""
        idx = self._block_records()
        if len(idx) < 2:
            return 0.0
        g = np.log(self.measures["grad_q_mean"][idx])
        return float(np.median(-(np.diff(g) / np.diff(self.blocks[idx]))))

    def _block_records(self):
        return [i for i, label in enumerate(self.labels) if label.startswith("block") or label == "input"]

    def diagnosis(self, tol: float = 0.01) -> str:
        """'vanishing', 'exploding' or 'stable' from the per-block growth rate (|rate| ≤ tol is stable);
        'overall' compares the gradient at the input with the one at the output of the last block."""
        r = self.growth
        idx = self._block_records()
        q = self.measures["grad_q_mean"]
        total = float(np.log(q[idx[0]] / q[idx[-1]])) if len(idx) > 1 else 0.0
        if r > tol:
            return f"exploding toward the input: ×{np.exp(r):.4g} per block, ×{np.exp(total):.4g} overall"
        if r < -tol:
            return f"vanishing toward the input: ×{np.exp(r):.4g} per block, ×{np.exp(total):.4g} overall"
        return f"stable: ×{np.exp(r):.4g} per block, ×{np.exp(total):.4g} overall"


def output_gradient(kind, n: int, rho: float = 0.0) -> np.ndarray:
    """The output gradient kernel Π_L: ``"identity"`` (independent tokens, ‖G_i‖² = 1), ``"equicorrelated"``
    (correlation ``rho``) or an explicit PSD matrix."""
    if isinstance(kind, str):
        if kind == "identity":
            return np.eye(n)
        if kind == "equicorrelated":
            low = -1.0 / max(n - 1, 1)
            if not (isinstance(rho, (int, float)) and low <= rho <= 1):
                raise SpecError("output_gradient.rho", rho, f"must lie in [-1/(N-1), 1] = [{low:.3g}, 1] for N = {n}")
            return (1 - rho) * np.eye(n) + rho
        raise SpecError("output_gradient", kind, "must be \"identity\", \"equicorrelated\" or an N×N PSD matrix")
    pi = np.asarray(kind, dtype=float)
    if pi.shape != (n, n) or not np.allclose(pi, pi.T) or np.linalg.eigvalsh(pi)[0] < -1e-10 * np.abs(pi).max():
        raise SpecError("output_gradient", f"array of shape {pi.shape}", f"must be a symmetric PSD {n}×{n} matrix")
    return pi


def backpropagate(network: Network, inputs: Inputs, *, output_grad="identity", rho: float = 0.0,
                  every: int = 1, keep_kernels: bool = True, quad_nodes: int | None = None,
                  progress=None) -> GradientTrajectory:
    """Forward pass, then the gradient kernel from the output (``Π_L = output_grad``) back to the input.

    Records ``Π`` = ∂loss/∂(output of each recorded unit) at the same labels as :func:`propagate`
    (``input`` is the gradient with respect to the input). Forward states are checkpointed so
    memory stays ≈ 1 GiB whatever the depth.
    """
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise SpecError("every", every, "must be a whole number >= 1")
    from .propagate import propagate
    ctx = Context(quad_nodes)
    units = list(network.layers())
    n = inputs.n_tokens
    # forward, keeping the input state of every k-th unit
    k = max(1, int(np.ceil(len(units) * n * n * 8 / _MEMORY)))
    checkpoints = {}
    s = KernelState(inputs.sigma.copy(), inputs.mean.copy(), inputs.segments)
    for u, (section, l, layer) in enumerate(units):
        if u % k == 0:
            checkpoints[u] = s
        ctx.where = unit_label(section, l, layer)
        ctx.unit(u)
        s = _checked(apply(layer, s, ctx), ctx.where, layer, flush=True)
    pi = output_gradient(output_grad, n, rho)
    rec = [record_at(units, u, every) for u in range(len(units))]
    labels, blocks, kernels, rows, grads = [], [], [], [], []

    def keep(label_block, p):
        label, l = label_block
        labels.append(label)
        blocks.append(l)
        if keep_kernels:
            kernels.append(p.copy())
        m = M.compute(p, inputs.segments, spectral=False)
        rows.append({"grad_q_mean": m["q_mean"], "grad_q_min": m["q_min"], "grad_q_max": m["q_max"],
                     "grad_cos_mean": m["cos_mean"], "grad_cos_first": m["cos_first"]})

    if units and rec[-1] is not None:
        keep(rec[-1], pi)
    for start in sorted(checkpoints, reverse=True):
        seg = range(start, min(start + k, len(units)))
        states = [checkpoints[start]]
        for u in list(seg)[:-1]:
            ctx.unit(u)
            states.append(apply(units[u][2], states[-1], ctx))
        for u in reversed(seg):
            section, l, layer = units[u]
            where = unit_label(section, l, layer)
            ctx.where = where
            ctx.unit(u)
            _, node = _tape(layer, states[u - start], ctx, where)
            unit_grads = []
            pi = _back(node, pi, unit_grads)
            grads.extend((where, l, path, kind, v) for path, kind, v in unit_grads)
            if not np.isfinite(pi.sum()):
                raise NumericalError(where, "the gradient kernel has NaN or infinite entries (backward)",
                                     "lower weight variances or branch weights, or add normalisation")
            if u > 0 and rec[u - 1] is not None:
                keep(rec[u - 1], pi)
            if progress is not None and section == "block":
                progress(network.depth - l + 1, network.depth)
    keep(("input", 0), pi)
    order = list(range(len(labels)))[::-1]
    measures = {}
    for name in rows[0]:
        vals = [rows[i][name] for i in order]
        measures[name] = np.array(vals) if np.ndim(vals[0]) == 0 else np.stack(vals)
    fwd = propagate(network, inputs, every=every, keep_kernels=keep_kernels, quad_nodes=quad_nodes)
    return GradientTrajectory(labels=[labels[i] for i in order], blocks=np.array([blocks[i] for i in order]),
                              measures=measures, grads=grads[::-1],
                              kernels=np.stack([kernels[i] for i in order]) if keep_kernels else None,
                              forward=fwd)


def unit_label(section, l, layer):
    return f"block {l}" if section == "block" else f"{section} · {layer.kind}"


def record_at(units, u, every):
    """``(label, block)`` of the forward record at the output of unit ``u``, or None (as :func:`propagate`)."""
    section, l, _ = units[u]
    last = u + 1 == len(units) or units[u + 1][0] != section
    if section == "block":
        return (f"block {l}", l) if (l % every == 0 or last) else None
    return (section, l) if last else None
