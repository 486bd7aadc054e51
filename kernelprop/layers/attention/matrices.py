"""Attention matrices and the token mixings they induce (docs/theory.md §2) — the helpers every
interpreter of :class:`~kernelprop.layers.attention.Attention` shares: ALiBi slopes, score biases
with masks and their checks, the masked softmax, the wide-limit mixings of each head.

A :class:`Mixing` is a block-diagonal linear map on tokens (one block per sequence) that knows how
to left-multiply a matrix. Structured mixings never form a dense T×T matrix: uniform and causal
uniform attention are (prefix) means, O(T·N) per product, so ``A Σ Aᵀ`` costs O(T²).
"""

from __future__ import annotations

import numpy as np

from ...errors import SpecError
from ...inputs import segment_slices
from ...kernel.state import nonzero, per
from . import rope

_UNDERFLOW = -700.0  # exp(-700) ≈ 1e-304 is still a normal float; smaller weights are set to exactly 0


# ----------------------------------------------------------------------------------------------
# biases, masks, softmax


def alibi_slopes(heads: int, scale: float = 1.0) -> np.ndarray:
    """ALiBi head slopes ``s_h = scale · 2^{−8h/H}``, h = 1…H (Press et al. 2022)."""
    return scale * 2.0 ** (-8.0 * np.arange(1, heads + 1) / heads)


def bias_matrices(layer, t: int):
    """Per-head additive score biases for a sequence of length ``t`` (list of H arrays, or None)."""
    if layer.bias is None:
        return None
    pos = np.arange(t)
    if isinstance(layer.bias, str):  # alibi
        dist = np.abs(pos[:, None] - pos[None, :]).astype(float)
        return [-s * dist for s in alibi_slopes(layer.heads, layer.alibi_scale)]
    b = layer.bias
    if b.shape[-1] < t:
        raise SpecError("attention.bias", f"{b.shape[-1]}×{b.shape[-1]} matrix",
                        f"must cover the longest sequence ({t} tokens)")
    if b.ndim == 2:
        return [b[:t, :t]] * layer.heads
    return [bh[:t, :t] for bh in b]


def logit_offsets(layer, t: int, where: str) -> np.ndarray:
    """Bias plus mask for a sequence of length t: (H, t, t) with −inf where masked; every query
    must keep at least one key."""
    h = layer.heads
    biases = bias_matrices(layer, t)
    out = np.zeros((h, t, t)) if biases is None else np.stack(biases).astype(float, copy=True)
    if layer.causal:
        pos = np.arange(t)
        out[:, pos[:, None] < pos[None, :]] = -np.inf
    top = out.max(axis=-1)
    if not np.all(np.isfinite(top)):
        head, row = np.argwhere(~np.isfinite(top))[0]
        raise SpecError(f"{where}.bias", f"row {int(row)} of head {int(head)} fully masked",
                        "every query needs at least one allowed key: remove the -inf entries that empty the row")
    return out


def softmax(z: np.ndarray, flush: bool = True) -> np.ndarray:
    """Row softmax over the last axis, in place on ``z``: masked (−inf) entries are exactly 0 and
    weights below e^−700 are flushed to 0 (no denormals). ``flush=False`` when the caller knows every
    finite logit of a row lies within 700 of the row's largest (then nothing would be flushed)."""
    z -= z.max(axis=-1, keepdims=True)
    if flush:
        z[z < _UNDERFLOW] = -np.inf
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def cached_offsets(layer, t: int, where: str, cache: dict | None) -> np.ndarray:
    """:func:`logit_offsets`, kept in ``cache`` per (mask, bias, heads, length): built and checked once per run.
    The array is shared: callers must not write to it."""
    if cache is None:
        return logit_offsets(layer, t, where)
    bias_key = id(layer.bias) if isinstance(layer.bias, np.ndarray) else layer.bias
    key = ("offsets", layer.causal, bias_key, layer.alibi_scale, layer.heads, t)
    out = cache.get(key)
    if out is None:
        out = cache[key] = logit_offsets(layer, t, where)
        out.flags.writeable = False
    return out


# ----------------------------------------------------------------------------------------------
# token mixings (the numeric engine)


class Mixing:
    """A token mixing ``X ↦ M X`` acting within each sequence. The products take a leading batch axis: ``x`` of
    shape (…, N, K), and a mixing made from a batch of kernels (tied scores) holds one matrix per member."""

    def __init__(self, segments):
        self.segments = tuple(segments)
        self.n = sum(self.segments)

    def left(self, x: np.ndarray) -> np.ndarray:
        """``M @ x`` for ``x`` of shape (N, K)."""
        raise NotImplementedError

    def left_t(self, x: np.ndarray) -> np.ndarray:
        """``Mᵀ @ x`` (backward pass)."""
        raise NotImplementedError

    def dense(self) -> np.ndarray:
        """The full N×N matrix (for the Monte Carlo and small-T checks)."""
        return self.left(np.eye(self.n))

    def kernel_t(self, pi: np.ndarray) -> np.ndarray:
        """``Mᵀ Π M`` for symmetric Π (backward map of the gradient kernel)."""
        return symmetrised(self.left_t(self.left_t(pi).T))

    def kernel(self, sigma: np.ndarray) -> np.ndarray:
        """``M Σ Mᵀ`` for symmetric Σ (…, N, N), as ``M (M Σ)ᵀ`` using two left products."""
        return symmetrised(self.left(np.swapaxes(self.left(sigma), -1, -2)))

    def cross(self, sigma: np.ndarray) -> np.ndarray:
        """``Σ Mᵀ`` = E[x fᵀ] for ``f = M x``."""
        return np.swapaxes(self.left(np.swapaxes(sigma, -1, -2)), -1, -2)


class Uniform(Mixing):
    """Zero-score softmax: ``A = 11ᵀ/T`` per sequence, or causal ``A_ij = 1/i`` for ``j ≤ i`` (1-based)."""

    def __init__(self, segments, causal: bool):
        super().__init__(segments)
        self.causal = causal

    def left(self, x):
        out = np.empty_like(x)
        for sl in segment_slices(self.segments):
            block = x[..., sl, :]
            if self.causal:
                counts = np.arange(1, block.shape[-2] + 1, dtype=float)[:, None]
                out[..., sl, :] = np.cumsum(block, axis=-2) / counts
            else:
                out[..., sl, :] = block.mean(axis=-2, keepdims=True)
        return out

    def left_t(self, x):
        if not self.causal:
            return self.left(x)
        out = np.empty_like(x)
        for sl in segment_slices(self.segments):
            block = x[sl]
            counts = np.arange(1, block.shape[0] + 1, dtype=float).reshape((-1,) + (1,) * (block.ndim - 1))
            # (Mᵀx)_j = Σ_{i ≥ j} x_i / i: a reversed cumulative sum
            out[sl] = np.cumsum((block / counts)[::-1], axis=0)[::-1]
        return out

    def kernel(self, sigma):
        """Block means (bidirectional) or double prefix sums ``Σ'_ij = Σ_{a≤i, b≤j} Σ_ab / (i j)`` (causal),
        for each kernel of a batch (…, N, N)."""
        out = np.empty_like(sigma)
        for sa in segment_slices(self.segments):
            for sb in segment_slices(self.segments):
                block = sigma[..., sa, sb]
                if not self.causal:
                    out[..., sa, sb] = block.mean(axis=(-2, -1), keepdims=True)
                    continue
                c = out[..., sa, sb]
                _prefix_sums(block, -2, c)
                _prefix_sums(c, -1, c)
                c /= np.arange(1, c.shape[-2] + 1, dtype=float)[:, None]
                c /= np.arange(1, c.shape[-1] + 1, dtype=float)[None, :]
        return out


def _prefix_sums(x, axis, out):
    """``np.cumsum(x, axis, out=out)``; over a wide batch as one vectorised addition per step along ``axis``
    (the same additions in the same order, several times faster than numpy's accumulate there)."""
    steps = x.shape[axis]
    if x.size < 512 * steps:
        return np.cumsum(x, axis=axis, out=out)
    a, o = np.moveaxis(x, axis, 0), np.moveaxis(out, axis, 0)
    if o is not a:
        o[0] = a[0]
    for i in range(1, steps):
        np.add(o[i - 1], a[i], out=o[i])
    return out


_TILE = 64           # tile edge of the blocked transpose in :func:`symmetrised`
_TILED_FROM = 512    # from this size on, symmetrise tile by tile (measured: faster from 512, slower at 256)


def symmetrised(out: np.ndarray, average: bool = True) -> np.ndarray:
    """``(X + Xᵀ)/2`` (or ``X + Xᵀ`` with ``average=False``) of a fresh N×N result ``out``: exactly symmetric,
    bit for bit the plain formula, C-ordered. From 512 tokens on in place, tile by tile (64×64 tiles and their
    mirror images): a whole-matrix transposed pass strides by N·8 bytes, which at power-of-two N maps the
    rows to a few cache sets (about 2× slower at N = 1024)."""
    if out.ndim == 2 and out.flags.f_contiguous and not out.flags.c_contiguous:
        out = out.T                     # the same (X + Xᵀ)/2: addition commutes
    n = out.shape[-1]
    if out.ndim != 2 or n < _TILED_FROM or not out.flags.c_contiguous:
        res = np.add(out, np.swapaxes(out, -1, -2), order="C")
        if average:
            res *= 0.5
        return res
    for i in range(0, n, _TILE):
        ii = slice(i, i + _TILE)
        d = out[ii, ii]
        d += d.T
        if average:
            d *= 0.5
        for j in range(i + _TILE, n, _TILE):
            jj = slice(j, j + _TILE)
            t = out[ii, jj]
            t += out[jj, ii].T
            if average:
                t *= 0.5
            out[jj, ii] = t.T
    return out


_SPLIT_FROM = 512    # dense A Σ Aᵀ by Σ = L + Lᵀ from here on (measured: 5% faster at 512, 20% at 1024, slower at 256)


class Dense(Mixing):
    """An explicit row-stochastic (or any) matrix per sequence; ``lower``: every block is lower triangular
    (a causal mask), so ``A Σ Aᵀ`` takes two triangular products (half the flops of two dense ones)."""

    def __init__(self, segments, blocks, lower: bool = False):
        super().__init__(segments)
        self.blocks = list(blocks)
        self.lower = lower

    def kernel(self, sigma):
        """``A Σ Aᵀ`` for one block (docs/theory.md §2.8): lower-triangular A (causal), ``B = A Σ`` and ``B Aᵀ``
        by BLAS ``trmm`` (T³ flops each instead of 2T³), symmetrised; dense A from 512 tokens on, the symmetry
        of Σ: ``Σ = L + Lᵀ`` with L its lower triangle (half diagonal), ``D = (A L) Aᵀ`` (trmm, then one
        product: 3T³ flops instead of 4T³) and ``A Σ Aᵀ = D + Dᵀ``. Otherwise the two left products of
        :meth:`Mixing.kernel`. A batch (B, N, N) takes the same route member by member, so a batched run's
        arithmetic is each member's own run's. Both triangular routes make both products in scipy's BLAS: numpy's and
        scipy's wheels each bundle an OpenBLAS, and on a few cores the idle threads of one spin against the
        other's work (Pre-LN block at T = 1024 on 2 threads: 90.7 ms with the second product in numpy, 57.9 ms
        in scipy; benchmarks/bench_propagate.py)."""
        if len(self.blocks) != 1 or not (self.lower or sigma.shape[-1] >= _SPLIT_FROM):
            return super().kernel(sigma)
        a = self.blocks[0]
        if sigma.ndim == 3:
            return np.stack([self._kernel(a[b] if a.ndim == 3 else a, sigma[b]) for b in range(len(sigma))])
        return self._kernel(a, sigma)

    def _kernel(self, a, sigma):
        from scipy.linalg.blas import dgemm, dtrmm
        if self.lower:
            at = a.T                      # Fortran-ordered view of A: the upper-triangular matrix Aᵀ
            b = dtrmm(1.0, at, sigma.T, side=0, lower=0, trans_a=1)                # (Aᵀ)ᵀ Σᵀ = A Σ (Σ symmetric)
            out = dtrmm(1.0, at, b, side=1, lower=0, trans_a=0, overwrite_b=1)     # (A Σ) Aᵀ
            return symmetrised(out)
        low = np.tril(sigma)
        low.flat[::len(low) + 1] *= 0.5
        cl = dtrmm(1.0, low.T, a.T, side=0, lower=0, trans_a=0)      # Lᵀ Aᵀ = (A L)ᵀ, Fortran-ordered
        d = dgemm(1.0, cl, a, trans_a=1, trans_b=1)                  # (A L) Aᵀ, Fortran-ordered
        return symmetrised(d, average=False)                         # … + its transpose

    def left(self, x):
        if len(self.blocks) == 1:
            return self.blocks[0] @ x
        out = np.empty(np.broadcast_shapes(self.blocks[0].shape[:-2] + x.shape[-2:], x.shape))
        for sl, a in zip(segment_slices(self.segments), self.blocks):
            out[..., sl, :] = a @ x[..., sl, :]
        return out

    def left_t(self, x):
        if len(self.blocks) == 1:
            return np.swapaxes(self.blocks[0], -1, -2) @ x
        out = np.empty(np.broadcast_shapes(self.blocks[0].shape[:-2] + x.shape[-2:], x.shape))
        for sl, a in zip(segment_slices(self.segments), self.blocks):
            out[..., sl, :] = np.swapaxes(a, -1, -2) @ x[..., sl, :]
        return out

    def dense(self):
        out = np.zeros((self.n, self.n))
        for sl, a in zip(segment_slices(self.segments), self.blocks):
            out[sl, sl] = a
        return out


class Combination(Mixing):
    """``α I + β A − γ C``: Value-SkipInit (He et al. 2023) and shaped attention (He & Hofmann 2024)."""

    def __init__(self, alpha, beta, a: Mixing, gamma=0.0, c: Mixing | None = None):
        super().__init__(a.segments)
        self.alpha, self.beta, self.a, self.gamma, self.c = alpha, beta, a, gamma, c

    def left(self, x):
        out = per(self.alpha, 2) * x
        if nonzero(self.beta):
            out = out + per(self.beta, 2) * self.a.left(x)
        if nonzero(self.gamma) and self.c is not None:
            out = out - per(self.gamma, 2) * self.c.left(x)
        return out

    def left_t(self, x):
        out = per(self.alpha, 2) * x
        if nonzero(self.beta):
            out = out + per(self.beta, 2) * self.a.left_t(x)
        if nonzero(self.gamma) and self.c is not None:
            out = out - per(self.gamma, 2) * self.c.left_t(x)
        return out


def _softmax_blocks(segments, logits_of, offsets, lower=False, flush=True, fresh=False):
    """Per sequence: ``softmax(logits + offsets)`` with ``offsets`` the (t_max × t_max) bias and mask (None: all
    zero). ``lower``: the mask is causal (lower-triangular blocks); ``flush``: see :func:`softmax`; ``fresh``:
    ``logits_of`` returns a new array each call, so the sum and the softmax run in place on it."""
    blocks = []
    for sl, t in zip(segment_slices(segments), segments):
        if offsets is None:          # no bias, no mask: nothing to add
            z = logits_of(sl, t) if fresh else logits_of(sl, t).copy()
        elif fresh:
            z = logits_of(sl, t)
            z += offsets[:t, :t]
        else:
            z = logits_of(sl, t) + offsets[:t, :t]
        blocks.append(softmax(z, flush))
    return Dense(segments, blocks, lower)


def _linear_blocks(segments, logits_of, offsets, lower=False, flush=True, fresh=False):
    """Identity attention (no softmax): ``A = S + B`` with masked entries 0 (Hron et al. 2020)."""
    blocks = []
    for sl, t in zip(segment_slices(segments), segments):
        off = offsets[:t, :t]
        a = logits_of(sl, t) + np.where(np.isfinite(off), off, 0.0)
        a[..., ~np.isfinite(off)] = 0.0
        blocks.append(a)
    return Dense(segments, blocks, lower)


def head_mixings(layer, sigma: np.ndarray, segments, cache: dict | None = None, seed=(0,), where="attention") -> list:
    """The mixing ``M_h`` of every head of a resolved :class:`~kernelprop.layers.attention.Attention`.

    Heads with identical matrices are returned once with a multiplicity: a list of (weight, Mixing)
    whose weights add to 1 (the ``1/H`` head average). Random (``standard``) scores give one entry
    per head and draw, drawn from a generator seeded with ``seed`` (reproducible per layer).
    """
    a: Mixing
    if layer.spa != "none":
        a = spa_mixing(layer, segments, cache)
        if layer.matrix == "value_skipinit":
            a = Combination(layer.alpha, layer.beta, a)
        elif layer.matrix == "shaped":
            raise SpecError("attention.matrix", "shaped", "cannot be combined with spa")
        return [(1.0, a)]
    longest = max(segments)
    offsets = cached_offsets(layer, longest, where, cache)
    if layer.bias is None:
        distinct = [(1.0, 0)]
    elif isinstance(layer.bias, np.ndarray) and layer.bias.ndim == 2:
        distinct = [(1.0, 0)]
    else:
        distinct = [(1.0 / layer.heads, h) for h in range(layer.heads)]

    def zero_score(h):
        if layer.bias is None:
            return Uniform(segments, layer.causal)
        return _softmax_blocks(segments, lambda sl, t: np.zeros((t, t)), offsets[h], layer.causal, fresh=True)

    blocks_of = _linear_blocks if layer.attention == "identity" else _softmax_blocks
    lower = layer.causal
    bias_key = id(layer.bias) if isinstance(layer.bias, np.ndarray) else layer.bias
    kq = score_kernel(layer, sigma, where) if layer.scores != "uniform" else sigma
    rotary = layer.rope_theta is not None
    if layer.scores == "standard":
        distinct = [(1.0 / layer.heads, h) for h in range(layer.heads)]
        draw = score_sampler(layer, kq, segments, seed, cache)
    elif rotary:
        offs = {t: rope.offset_matrix(layer, t) for t in set(segments)}
    out = []
    for weight, h in distinct:
        c = None
        if layer.attention == "softmax" and (layer.scores == "uniform" or layer.matrix == "shaped"):
            key = (layer.causal, bias_key, layer.alibi_scale, layer.heads, h, tuple(segments))
            c = cache.get(key) if cache is not None else None
            if c is None:
                c = zero_score(h)
                if cache is not None:
                    cache[key] = c
        if layer.scores == "standard":
            n = layer.score_samples
            for _ in range(n):
                full = draw()
                a = blocks_of(segments, lambda sl, t: full[sl, sl], offsets[h])  # noqa: B023 (called here)
                out.append((weight / n, _modified(layer, a, c)))
            continue
        if layer.scores == "uniform" and layer.attention == "softmax":
            assert c is not None        # the zero-score matrix, made above
            a = c
        elif layer.scores == "uniform":  # identity attention at zero scores: the bias alone
            a = blocks_of(segments, lambda sl, t: np.zeros((t, t)), offsets[h])
        elif rotary:  # tied with RoPE: σ_qk² Σ_ij ρ(j − i)
            a = blocks_of(segments, lambda sl, t: per(layer.qk_var, 2) * kq[..., sl, sl] * offs[t], offsets[h], lower,
                          fresh=True)
        else:  # tied 1/d scaling: deterministic scores σ_qk² Σ (Hron et al. 2020; C under QK-norm)
            off = offsets[h] if layer.bias is not None or layer.causal or blocks_of is _linear_blocks else None
            a = blocks_of(segments, lambda sl, t: per(layer.qk_var, 2) * kq[..., sl, sl], off, lower,
                          _flush_needed(layer, kq), fresh=True)
        out.append((weight, _modified(layer, a, c)))
    return out


def _flush_needed(layer, kq) -> bool:
    """Whether a tied softmax without bias can have a weight below e^−700: its finite logits σ_qk² K_ij lie
    within ``2 σ_qk² max_i K_ii`` of each other (``|K_ij| ≤ max_i K_ii`` for PSD K, with a margin for rounding)."""
    if layer.bias is not None:
        return True
    top = float(np.diagonal(kq, axis1=-2, axis2=-1).max()) if kq.size else 0.0
    v = layer.qk_var        # a number, or one per batch member
    v = abs(float(v)) if np.ndim(v) == 0 else float(np.max(np.abs(v)))
    return not 2.0 * v * top * (1 + 1e-6) < -_UNDERFLOW


def score_sampler(layer, kq: np.ndarray, segments, seed=(0,), cache: dict | None = None):
    """``draw() -> S``: independent draws of the standard (1/sqrt(d_k)) scores of all N tokens at infinite width,
    ``Cov(S_ij, S_kl) = σ_qk² K_ik K_jl ρ(Δ_ij − Δ_kl)`` (K = ``kq``: Σ, or C under QK-norm; ρ ≡ 1 without RoPE;
    Δ_ij = t_j − t_i, positions within each sequence; docs/theory.md §2.1, §2.4).

    W_Q, W_K are shared by every sequence of the batch: the scores of all tokens are drawn together,
    ``S = σ_qk F Z Fᵀ`` with ``F Fᵀ = K`` over the whole batch, and each sequence keeps its diagonal block.
    RoPE: ``S_ij = σ_qk Σ_m G_{Δ_ij,m} (F Z_m Fᵀ)_ij`` with independent Z_m and ``G Gᵀ`` the lag Toeplitz matrix
    of ρ (:func:`.rope.lag_factor`)."""
    factor = _sqrt_factor(kq)
    rng = np.random.default_rng([*seed, 7919])
    scale = np.sqrt(layer.qk_var)
    n = len(factor)
    if layer.rope_theta is None:
        return lambda: scale * factor @ rng.standard_normal((n, n)) @ factor.T
    longest = max(segments)
    pos = rope.positions(segments)
    g = rope.lag_factor(layer, longest, cache)
    lag = pos[None, :] - pos[:, None] + longest - 1           # row of G for every pair (i, j)

    def draw():            # one N×N field at a time: O(N²) memory, O(r N³) time for r ≤ 2T − 1 fields
        out = np.zeros((n, n))
        for m in range(g.shape[1]):
            out += g[lag, m] * (factor @ rng.standard_normal((n, n)) @ factor.T)
        return scale * out
    return draw


def score_kernel(layer, sigma: np.ndarray, where="attention") -> np.ndarray:
    """The kernel the scores see: Σ, or under QK-norm ``C = D^{−1/2} Σ D^{−1/2}``, ``D = diag Σ``.

    The queries ``q_i = W_Qᵀ x_i`` have i.i.d. features of mean 0 and variance ``σ_qk² Σ_ii`` whatever the
    stream's mean, so LayerNorm and RMSNorm over a head's d_k → ∞ features both divide by ``σ_qk √Σ_ii``."""
    if layer.qk_norm == "none":
        return sigma
    d = np.diagonal(sigma, axis1=-2, axis2=-1).copy()
    bad = np.flatnonzero(~(d > 0))
    if bad.size:
        from ...errors import NumericalError
        raise NumericalError(where, f"token {int(bad[0] % sigma.shape[-1])} has zero variance: its queries and keys "
                             f"are 0 and qk_norm = \"{layer.qk_norm}\" divides by their norm",
                             "set qk_norm = \"none\", or fix the collapse upstream")
    inv = 1.0 / np.sqrt(d)
    return sigma * inv[..., :, None] * inv[..., None, :]


def _modified(layer, a, c):
    if layer.matrix == "value_skipinit":
        return Combination(layer.alpha, layer.beta, a)
    if layer.matrix == "shaped":
        return Combination(layer.alpha, layer.beta, a, layer.gamma, c)
    return a


def _sqrt_factor(s):
    """F with F Fᵀ = Σ for PSD Σ (symmetric square root; works for singular, collapsed kernels), for one
    kernel or a stack (…, N, N).

    Eigenvalues below N·ε·λ_max are rounding noise of a singular Σ and are set to 0, so repeated
    tokens (or sequences) keep identical rows of F."""
    w, v = np.linalg.eigh(s)
    w = np.where(w > s.shape[-1] * np.finfo(float).eps * np.maximum(w[..., -1:], 0.0), w, 0.0)
    return (v * np.sqrt(w)[..., None, :]) @ np.swapaxes(v, -1, -2)


# ----------------------------------------------------------------------------------------------
# signal-preserving attention (He et al. 2023)


def spa_mixing(layer, segments, cache=None) -> Dense:
    """The SPA matrix ``A_l`` of every sequence (He et al. 2023), cached per length and step."""
    from . import spa
    blocks = []
    for t in segments:
        key = ("spa", layer.spa, t, layer.spa_step, layer.spa_layers, layer.spa_final, layer.causal)
        a = cache.get(key) if cache is not None else None
        if a is None:
            a = spa.attention_matrix(layer.spa, t, layer.spa_step, layer.spa_layers, layer.spa_final, layer.causal)
            if cache is not None:
                cache[key] = a
        blocks.append(a)
    return Dense(segments, blocks)
