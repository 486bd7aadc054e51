"""Rotary position embeddings (RoPE, Su et al. 2021): wide-limit laws and finite-width rotations.

RoPE rotates each pair of query/key dimensions by ``t·ω_f`` (t the token's position in its sequence), so a
score sees only the offset: ``S_ij = Σ_f q_i^f · R((t_j − t_i) ω_f) k_j^f · scale``. With i.i.d. weights the
pairs are independent and ``E[q_i^f·R(φ)q_k^f] ∝ cos φ``, so every wide-limit law carries the factor

    ρ(Δ) = (1 − r) + r · mean_f cos(ω_f Δ)        (r = ``rope_fraction``, the rotated share of dims)

(docs/theory.md §2.4): the finite set ``ω_f = θ^{−2f/D_r}``, ``f < D_r/2``, ``D_r = r·rope_dim``, or, without
``rope_dim``, its wide-limit average ``∫₀¹ cos(θ^{−u}Δ) du = (Ci|Δ| − Ci(|Δ|/θ))/ln θ``.

Here: ρ itself, the exact Gaussian draw of RoPE scores (a factor of the lag Toeplitz matrix), the exact cosine
expansion the backward rule needs, and the Monte Carlo's rotation of real query/key pairs.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import sici

from ...errors import SpecError


def rotated_dims(dim: int, fraction: float) -> float:
    """``r·D``: the number of rotated dims of a head of width ``D``."""
    return fraction * dim


def check_rotated(dim: int, fraction: float, field: str, what: str) -> int:
    """``r·D`` as a whole even number ≥ 2, else a :class:`SpecError` on ``field``."""
    n = rotated_dims(dim, fraction)
    k = int(round(n))
    if abs(n - k) > 1e-9 * max(1.0, n) or k < 2 or k % 2:
        raise SpecError(field, fraction if field.endswith("fraction") else dim,
                        f"rope_fraction · {what} = {n:g} must be a whole even number ≥ 2 (the rotated dims "
                        "come in pairs)")
    return k


def frequencies(theta: float, rot: int) -> np.ndarray:
    """``ω_f = θ^{−2f/rot}``, f = 0 … rot/2 − 1 (Su et al. 2021; rot the rotated dims of a head)."""
    return theta ** (-2.0 * np.arange(rot // 2) / rot)


def rho(delta, theta: float, dim: int | None = None, fraction: float = 1.0) -> np.ndarray:
    """``ρ(Δ) = (1 − r) + r·mean_f cos(ω_f Δ)`` for integer offsets Δ.

    ``dim`` given: the finite frequency set of a head of ``dim`` dims (rotated ``r·dim``). ``dim = None``:
    the wide-limit average over ``u = 2f/D_r ∈ [0, 1)``, ``∫₀¹ cos(θ^{−u}Δ) du = (Ci|Δ| − Ci(|Δ|/θ))/ln θ``
    (substitute ``ω = θ^{−u}``: ``∫_{1/θ}^{1} cos(ωΔ) dω/(ω ln θ)``), 1 at Δ = 0."""
    d = np.abs(np.asarray(delta, dtype=float))
    if dim is not None:
        rot = check_rotated(dim, fraction, "attention.rope_dim", "rope_dim")
        w = frequencies(theta, rot)
        rotated = np.mean(np.cos(np.multiply.outer(d, w)), axis=-1)
    else:
        rotated = np.ones_like(d)
        nz = d > 0
        rotated[nz] = (sici(d[nz])[1] - sici(d[nz] / theta)[1]) / math.log(theta)
    return (1.0 - fraction) + fraction * rotated


def layer_rho(layer, delta) -> np.ndarray:
    """ρ(Δ) of a resolved attention layer."""
    return rho(delta, float(layer.rope_theta), layer.rope_dim, float(layer.rope_fraction))


def positions(segments) -> np.ndarray:
    """The position of every token within its own sequence (0-based), stacked over the sequences."""
    return np.concatenate([np.arange(t) for t in segments]).astype(int)


def offset_matrix(layer, t: int) -> np.ndarray:
    """``R_ij = ρ(j − i)`` on one sequence of ``t`` tokens (the tied-score factor)."""
    pos = np.arange(t)
    return layer_rho(layer, pos[None, :] - pos[:, None])


def lag_factor(layer, t_max: int, cache: dict | None = None) -> np.ndarray:
    """``G`` ((2T−1) × r) with ``G Gᵀ = [ρ(a − b)]`` over the offsets a, b ∈ {−(T−1), …, T−1}.

    ``ρ`` is a characteristic function (of the random frequency), so this Toeplitz matrix is PSD; row
    ``Δ + T − 1`` of G gives ``S_ij = Σ_m G_{Δ_ij, m} Z^m_ij`` with independent Kronecker fields Z^m the exact
    covariance ``Cov(S_ij, S_kl) ∝ ρ(Δ_ij − Δ_kl)``. Eigenvalues below (2T−1)·ε·λ_max (rounding) are dropped."""
    key = ("rope-factor", layer.rope_theta, layer.rope_dim, layer.rope_fraction, t_max)
    if cache is not None and key in cache:
        return cache[key]
    lags = np.arange(-(t_max - 1), t_max)
    r = layer_rho(layer, lags[:, None] - lags[None, :])
    w, v = np.linalg.eigh(r)
    keep = w > len(w) * np.finfo(float).eps * max(w[-1], 0.0)
    g = v[:, keep] * np.sqrt(w[keep])
    if cache is not None:
        cache[key] = g
    return g


def spectrum(layer, t_max: int, cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Weights c and frequencies ω with ``ρ(δ) = Σ_n c_n cos(ω_n δ)`` exactly for every integer
    ``|δ| ≤ L = 2(T−1)`` (the offsets a backward rule meets): the frequency set itself when ``rope_dim`` is
    given and shorter, else the discrete Fourier series of ρ on ``−L … L`` (period 2L + 1)."""
    key = ("rope-spectrum", layer.rope_theta, layer.rope_dim, layer.rope_fraction, t_max)
    if cache is not None and key in cache:
        return cache[key]
    big = 2 * (t_max - 1)
    r = float(layer.rope_fraction)
    out = None
    if layer.rope_dim is not None:
        rot = check_rotated(layer.rope_dim, r, "attention.rope_dim", "rope_dim")
        if rot // 2 + 1 <= big + 1:
            w = frequencies(float(layer.rope_theta), rot)
            c = np.full(len(w), r / len(w))
            out = (np.append(c, 1.0 - r), np.append(w, 0.0)) if r < 1 else (c, w)
    if out is None:
        period = 2 * big + 1
        d = np.arange(-big, big + 1)
        vals = layer_rho(layer, d)
        n = np.arange(big + 1)
        w = 2.0 * np.pi * n / period
        chat = (np.cos(np.outer(w, d)) @ vals) / period
        c = np.where(n == 0, 1.0, 2.0) * chat
        out = (c, w)
    if cache is not None:
        cache[key] = out
    return out


# ----------------------------------------------------------------------------------------------
# finite width: real rotations of query/key pairs (Monte Carlo)


def mc_frequencies(layer, dk: int, where: str = "attention") -> tuple[int, np.ndarray]:
    """``(rot, ω_p)``: the rotated dims of a head of ``dk`` dims in the Monte Carlo and each pair's frequency.

    Without ``rope_dim`` the head is a real RoPE head of width d_k (``ω_p = θ^{−2p/rot}``); its mean over pairs
    differs from the integral by O(1/d_k), a finite-width bias the Richardson pair removes. With ``rope_dim``
    the engine's frequency set is repeated ``d_k/rope_dim`` times (pair p gets ``ω_{p mod n_f}``), so its law
    is the engine's exactly; d_k must then be a multiple of ``rope_dim``."""
    r = float(layer.rope_fraction)
    if layer.rope_dim is None:
        rot = check_rotated(dk, r, f"{where}.rope_fraction", f"d_k (the Monte Carlo's key width {dk})")
        return rot, frequencies(float(layer.rope_theta), rot)
    if dk % layer.rope_dim:
        raise SpecError(f"{where}.rope_dim", layer.rope_dim,
                        f"the Monte Carlo repeats the rope_dim frequencies over the key width per head, d_k = {dk}: "
                        "choose a width (or key_width) with d_k a multiple of rope_dim, or omit rope_dim (the "
                        "wide-limit integral)")
    base = frequencies(float(layer.rope_theta), check_rotated(layer.rope_dim, r, f"{where}.rope_dim", "rope_dim"))
    rot = check_rotated(dk, r, f"{where}.rope_fraction", f"d_k ({dk})")
    return rot, base[np.arange(rot // 2) % len(base)]


def rotate(x: np.ndarray, pos: np.ndarray, omegas: np.ndarray, rot: int, heads: int, inverse: bool = False):
    """Rotate the first ``rot`` dims of every head of ``x`` (B, N, H·d_k): pair ``(p, p + rot/2)`` of token n by
    the angle ``pos_n ω_p`` (the half-split layout of GPT-NeoX; the law does not depend on the pairing).
    ``inverse`` rotates back (the transpose, for the pullback)."""
    b, n, width = x.shape
    y = x.reshape(b, n, heads, width // heads).copy()
    half = rot // 2
    ang = np.outer(pos, omegas)[None, :, None, :]                 # (1, N, 1, rot/2)
    c, s = np.cos(ang), np.sin(ang)
    if inverse:
        s = -s
    x1, x2 = y[..., :half].copy(), y[..., half:rot].copy()
    y[..., :half] = x1 * c - x2 * s
    y[..., half:rot] = x1 * s + x2 * c
    return y.reshape(b, n, width)


def separable(layer, t_max: int, cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Real vectors ``f_m, g_m`` over the offsets ``−(T−1) … T−1`` (index Δ + T − 1) with
    ``ρ(a + b) = Σ_m f_m(a) g_m(b)`` for every pair of offsets: the shorter of the cosine expansion
    ``cos ω(a+b) = cos ωa cos ωb − sin ωa sin ωb`` over :func:`spectrum`'s frequencies and the eigen-expansion of
    the symmetric Hankel matrix ``[ρ(a + b)]`` with the eigenvalues of smallest modulus dropped while their sum
    stays below 1e−14 (each dropped term changes ρ by at most |λ|: the eigenvectors have entries ≤ 1)."""
    key = ("rope-separable", layer.rope_theta, layer.rope_dim, layer.rope_fraction, t_max)
    if cache is not None and key in cache:
        return cache[key]
    offs = np.arange(-(t_max - 1), t_max)
    lam, vec = np.linalg.eigh(layer_rho(layer, offs[:, None] + offs[None, :]))
    order = np.argsort(np.abs(lam))
    dropped = np.cumsum(np.abs(lam[order]))
    keep = np.sort(order[dropped > 1e-14])
    c, w = spectrum(layer, t_max, cache)
    if 2 * len(w) <= len(keep):
        ang = np.multiply.outer(w, offs.astype(float))
        sin_used = w != 0
        f = np.concatenate([c[:, None] * np.cos(ang), -(c[sin_used, None] * np.sin(ang[sin_used]))])
        g = np.concatenate([np.cos(ang), np.sin(ang[sin_used])])
    else:
        f, g = (vec[:, keep] * lam[keep]).T, vec[:, keep].T
    out = (np.ascontiguousarray(f), np.ascontiguousarray(g))
    if cache is not None:
        cache[key] = out
    return out
