"""C-maps of token-wise blocks and TAT leaky ReLU (DKS: Martens et al. 2021; TAT: Zhang et al. 2022).

The C-map of a block sends the cosine ``c`` of two inputs with squared norm ``q`` to the cosine of
its outputs: ``C(c) = Σ'_12 / sqrt(Σ'_11 Σ'_22)`` for ``Σ = q[[1, c], [c, 1]]`` (docs/theory.md §8). It is
computed with the numeric engine's own maps, so any token-wise block (Dense, activations,
normalisation, dropout, residual and parallel sums of those) has one; attention mixes tokens and
has none (use :func:`kernelprop.propagate`).
"""

from __future__ import annotations

import numpy as np
from scipy import optimize

from ..errors import NotSupportedError, SpecError
from ..kernel.maps import Context, apply
from ..kernel.state import KernelState
from ..network import layers as L
from ..network.layers import walk


def _block(block) -> L.Serial:
    block = block if isinstance(block, L.Layer) else L.Serial(*block)
    for path, layer in walk(block):
        if isinstance(layer, L.Attention):
            raise NotSupportedError(f"C-maps are for token-wise blocks; {path} is attention, which mixes tokens")
    return block


def c_map(block, c, q: float = 1.0, env: dict | None = None) -> np.ndarray:
    """``C(c)`` of ``block`` (a layer or list of layers) at input norm ``q``, vectorised over ``c``."""
    block = _block(block).resolve(env or {"L": 1.0, "l": 1.0})
    c = np.atleast_1d(np.asarray(c, dtype=float))
    if np.any(np.abs(c) > 1):
        raise SpecError("c", c, "cosines must lie in [-1, 1]")
    out = np.empty_like(c)
    ctx = Context()
    for k, ck in enumerate(c):
        s = KernelState(q * np.array([[1.0, ck], [ck, 1.0]]), np.zeros(2), (1, 1))
        sig = apply(block, s, ctx).sigma
        out[k] = sig[0, 1] / np.sqrt(sig[0, 0] * sig[1, 1])
    return out


def q_map(block, q, env: dict | None = None) -> np.ndarray:
    """``q ↦ Σ'_11`` for one input of squared norm ``q`` (the length map)."""
    block = _block(block).resolve(env or {"L": 1.0, "l": 1.0})
    ctx = Context()
    return np.array([apply(block, KernelState(np.array([[qk]]), np.zeros(1), (1,)), ctx).sigma[0, 0]
                     for qk in np.atleast_1d(q)])


def c_map_slope(block, q: float = 1.0, env: dict | None = None) -> float:
    """``χ = C'(1)``, from a least-squares fit of ``1 − C(1 − h) = χh + a h^{3/2} + b h² + e h^{5/2} + f h³``
    over h ∈ [1e-7, 1e-3] (the half-integer powers capture kinks such as ReLU's); accurate to ~1e-8."""
    h = np.geomspace(1e-7, 1e-3, 24)
    y = 1.0 - c_map(block, 1.0 - h, q, env)
    basis = np.stack([h, h ** 1.5, h ** 2, h ** 2.5, h ** 3], axis=1)
    coef, *_ = np.linalg.lstsq(basis / h[:, None], y / h, rcond=None)
    return float(coef[0])


def network_c_map(block, depth: int, c, q: float = 1.0) -> np.ndarray:
    """``C_net = C_block ∘ … ∘ C_block`` (depth times) — valid when the block preserves q (q-map fixed point)."""
    out = np.atleast_1d(np.asarray(c, dtype=float))
    for _ in range(depth):
        out = c_map(block, out, q)
    return out


def tat_leaky_relu(depth: int, eta: float = 0.9) -> tuple[float, float]:
    """TAT leaky ReLU (Zhang et al. 2022): the slope ``s`` with ``C_net(0) = η`` for ``depth`` nonlinear layers
    of ``φ̃(x) = sqrt(2/(1+s²)) · leaky_relu_s(x)``; returns ``(s, scale)``."""
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise SpecError("depth", depth, "must be a whole number >= 1")
    if not 0 < eta < 1:
        raise SpecError("eta", eta, "the target C_net(0) must lie in (0, 1)")

    def net_c0(s):
        block = [L.Activation("leaky_relu", {"slope": s}, scale=np.sqrt(2.0 / (1.0 + s * s)))]
        return network_c_map(block, depth, 0.0)[0] - eta

    reach = net_c0(0.0) + eta
    if reach < eta:
        raise SpecError("eta", eta, f"is out of reach at depth {depth}: even ReLU (slope 0) gives C_net(0) = "
                        f"{reach:.4g}; lower eta or raise the depth")
    s = optimize.brentq(net_c0, 0.0, 1.0 - 1e-12, xtol=1e-15, rtol=1e-14)
    return float(s), float(np.sqrt(2.0 / (1.0 + s * s)))
