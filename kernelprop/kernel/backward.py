"""Backward pass: the gradient kernel ``Π = G Gᵀ`` (``G = ∂loss/∂X``, summed over features) propagated
from the output to the input under gradient independence (docs/theory.md §0, §4-5), and the expected squared
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
from ..errors import NumericalError, SpecError
from ..inputs import Inputs
from ..layers.base import Grads
from ..network.network import Network
from ..network.walk import INPUT, RecordPlan, units
from . import heap
from .maps import Context
from .propagate import Records, forward, run_unit
from .threads import limit as threads_limit

_MEMORY = 1 << 30  # bytes of stored forward states before checkpointing kicks in


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
    records: list = field(default_factory=list)

    def grad_norms(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """``(blocks, summed norms)`` of the parameter gradients of ``kind`` (dense, values, output, queries)."""
        by: dict = {}
        for _label, l, _path, k, v in self.grads:
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
        return self.depth_records()

    def diagnosis(self, tol: float = 0.01) -> str:
        """'vanishing', 'exploding' or 'stable' toward the input from the overall ratio
        ``R = grad norm² at the input / grad norm² after the last block`` and its per-block rate ``R^(1/L)``:
        stable when ``|ln R^(1/L)| ≤ tol`` (the rule the CLI's gradients table states)."""
        idx = self._block_records()
        q = self.measures["grad_q_mean"]
        depth = int(self.blocks[idx[-1]] - self.blocks[idx[0]]) if len(idx) > 1 else 0
        if depth < 1:
            return "none: no block to diagnose"
        q_in, q_out = float(q[idx[0]]), float(q[idx[-1]])
        if not (np.isfinite(q_in) and np.isfinite(q_out)) or q_out <= 0.0:
            return f"undefined: grad norm² {q_in:.4g} at the input, {q_out:.4g} after the last block"
        ratio = q_in / q_out
        rate = ratio ** (1.0 / depth) if ratio > 0 else 0.0
        verdict = ("stable" if rate > 0 and abs(np.log(rate)) <= tol else
                   "exploding toward the input" if rate > 1 else "vanishing toward the input")
        return f"{verdict}: ×{rate:.4g} per block, ×{ratio:.4g} overall"


def output_gradient(kind, n: int, rho: float = 0.0) -> np.ndarray:
    """The output gradient kernel Π_L: ``"identity"`` (independent tokens, ‖G_i‖² = 1), ``"equicorrelated"``
    (correlation ``rho``) or an explicit PSD matrix."""
    if isinstance(kind, str):
        if kind == "identity":
            return np.eye(n)
        if kind == "equicorrelated":
            low = -1.0 / max(n - 1, 1)
            if not (isinstance(rho, (int, float)) and low <= rho <= 1):
                raise SpecError("output_grad.rho", rho, f"must lie in [-1/(N-1), 1] = [{low:.3g}, 1] for N = {n}")
            return (1 - rho) * np.eye(n) + rho
        raise SpecError("output_grad", kind, "must be \"identity\", \"equicorrelated\" or an N×N PSD matrix")
    pi = np.asarray(kind, dtype=float)
    if pi.shape != (n, n) or not np.allclose(pi, pi.T) or np.linalg.eigvalsh(pi)[0] < -1e-10 * np.abs(pi).max():
        raise SpecError("output_grad", f"array of shape {pi.shape}", f"must be a symmetric PSD {n}×{n} matrix")
    return pi


def backpropagate(network: Network, inputs: Inputs, *, output_grad="identity", rho: float = 0.0,
                  every: int = 1, keep_kernels: bool = True, quad_nodes: int | None = None,
                  progress=None, threads: int | None = None) -> GradientTrajectory:
    """Forward pass, then the gradient kernel from the output (``Π_L = output_grad``) back to the input.

    Records ``Π`` = ∂loss/∂(output of each recorded unit) at the same records as :func:`propagate`
    with ``record="blocks"`` (``input`` is the gradient with respect to the input). The forward pass
    runs once and yields ``.forward``; each layer's backward rule is the closure its kernel map
    returned. Beyond ≈ 1 GiB of stored states the rules are not kept: the input state of every k-th
    unit is, and each stretch is re-run (same draws) just before its backward pass. BLAS threads as
    :func:`~kernelprop.kernel.propagate.propagate` (``threads``; :func:`kernelprop.kernel.threads.choose`).
    """
    heap.retain()
    with threads_limit(inputs.n_tokens, threads):
        return _backpropagate(network, inputs, output_grad, rho, every, keep_kernels, quad_nodes, progress)


def _backpropagate(network, inputs, output_grad, rho, every, keep_kernels, quad_nodes, progress):
    plan = RecordPlan(network, "blocks", every)
    all_units = list(units(network))
    n = inputs.n_tokens
    pi = output_gradient(output_grad, n, rho)
    ctx = Context(quad_nodes)
    k = max(1, int(np.ceil(len(all_units) * n * n * 8 / _MEMORY)))
    saved: dict = {}       # unit index -> its parts' backward rules (k == 1) or its input state (checkpoints)

    def on_unit(unit, state, backs):
        if k == 1:
            saved[unit.index] = backs
        elif unit.index % k == 0:
            saved[unit.index] = state

    fwd, _ = forward(network, inputs, plan, keep_kernels=keep_kernels, quad_nodes=quad_nodes, on_unit=on_unit,
                     ctx=ctx)
    records: list = []
    kernels: list = []
    rows: list = []
    grads: list = []

    def keep(rec, p, err):
        records.append(rec)
        if keep_kernels:
            kernels.append(p.copy())
        m = M.compute(p, inputs.segments, spectral=False)
        rows.append({"grad_q_mean": m["q_mean"], "grad_q_min": m["q_min"], "grad_q_max": m["q_max"],
                     "grad_cos_mean": m["cos_mean"], "grad_cos_first": m["cos_first"], "grad_error": err})

    err = 0.0      # the relative error of Π (docs/theory.md §11.6); the output gradient is exact
    if all_units:
        last = plan.after_unit(all_units[-1])
        if last is not None:
            keep(last, pi, err)
    for u in range(len(all_units) - 1, -1, -1):
        unit = all_units[u]
        if k > 1 and u not in saved:          # re-run the stretch from its checkpoint, keeping the rules
            start = (u // k) * k
            state = saved.pop(start)
            for v in range(start, u + 1):
                state, backs = run_unit(all_units[v], state, ctx, with_backs=True)
                saved[v] = backs
        backs = saved.pop(u)
        ctx.where = unit.label
        unit_grads = Grads(error=err)
        for back in reversed(backs):
            pi = back(pi, unit_grads)
        err = unit_grads.error
        grads.extend((unit.label, unit.block, path, kind, v) for path, kind, v in unit_grads)
        if not np.isfinite(pi.sum()):
            raise NumericalError(unit.label, "the gradient kernel has NaN or infinite entries (backward)",
                                 "lower weight variances or branch weights, or add normalisation")
        if u > 0:
            rec = plan.after_unit(all_units[u - 1])
            if rec is not None:
                keep(rec, pi, err)
        if progress is not None and unit.section == "block":
            progress(network.depth - unit.block + 1, network.depth)
    keep(INPUT, pi, err)
    order = list(range(len(records)))[::-1]
    measures = {}
    for name in rows[0]:
        vals = [rows[i][name] for i in order]
        measures[name] = np.array(vals) if np.ndim(vals[0]) == 0 else np.stack(vals)
    recs = [records[i] for i in order]
    g = GradientTrajectory(labels=[r.label for r in recs], blocks=np.array([r.block for r in recs]),
                           measures=measures, grads=grads[::-1],
                           kernels=np.stack([kernels[i] for i in order]) if keep_kernels else None,
                           forward=fwd, records=recs)
    from ..report import check_gradients
    check_gradients(g)      # a gradient measure that is not finite is an error naming the record, never a NaN
    return g

