"""Standard 1/sqrt(d_k) scores: ``E[M Σ Mᵀ]``, ``E[M]`` and ``E[Mᵀ Π M]`` over Gaussian scores (docs/theory.md §2.1,
case 3 in §2.7).

The scores ``S`` are Gaussian with ``Cov(S_ij, S_kl) = v K_ik K_jl ρ(Δ_ij − Δ_kl)`` (v = σ_qk², K = Σ or C under
QK-norm, ρ ≡ 1 without RoPE). Row i of ``A = softmax(S + B + mask)`` is exactly ``a_i = p_i ⊙ e^{c_i}/⟨e^{c_i}⟩_{p_i}``
with ``p_i`` the zero-score row and ``c_i = s_i − ⟨s_i⟩_{p_i}``, so

    a_i = p_i + δ1_i + δ2_i + O(s³),   δ1_i = J_i s_i = p_i ⊙ c_i,   δ2_i = ½ p_i ⊙ (c_i² − ⟨c_i²⟩_{p_i}).

For the mixing ``M = αI + βA − γC`` (``M₀ = αI + βP − γC``) the even order-≤2 part of ``F(M) = M X Mᵀ`` is
``F₂ = M₀XM₀ᵀ + β² δ1 X δ1ᵀ + β(δ2 X M₀ᵀ + M₀ X δ2ᵀ)``, whose Gaussian expectation is closed-form (Isserlis):
``E[δ1 X δ1ᵀ]_ik = v K_ik Σ_jl (J_i X J_k)_jl K_jl ρ((t_j − t_l) − (t_i − t_k))`` and
``E[c_ij²] = v K_ii (K_jj − 2 (K̃ p_i)_j + p_iᵀ K̃ p_i)``, ``K̃ = K ⊙ ρ(t_j − t_l)``.
The estimate is that closed form plus the mean over antithetic pairs (S, −S) of ``(F(M₊) + F(M₋))/2 − F₂(S)``
(a control variate: the pair cancels every odd order, F₂ the second, so the remainder is O(v²) per pair),
accumulated one draw at a time (memory O(N²) whatever the number of draws). Heads whose scores have the same
law (no bias, or one bias for all) share the draws. The reported error is the Bonferroni Student-t quantile
(family level 0.1 %, at least 3) times the largest per-entry standard error over the pairs.
"""

from __future__ import annotations

import numpy as np

from ...inputs import segment_slices
from . import matrices as MX
from . import rope as RP


def sandwich(m, x):
    """``m x mᵀ``. (Causal m: BLAS trmm on the lower triangle was measured no faster within the estimator,
    0.97–2.7× the time at T = 256–64, benchmarks/bench_standard.py, so full products are kept.)"""
    return m @ x @ m.T


def sandwich_t(m, x):
    """``mᵀ x m``."""
    return m.T @ x @ m


def _t(x):
    return np.swapaxes(x, -1, -2)


def pair_trace(a, x, z):
    """``U_ik = Σ_jl (J_i X J_k)_jl Z_jl`` for ``J_i = diag a_i − a_i a_iᵀ``, symmetric X, any Z (or a stack of Z)."""
    y = a @ x
    t1 = a @ (x * z) @ a.T
    t2 = a @ _t(y * (a @ _t(z)))
    t3 = (y * (a @ z)) @ a.T
    return t1 - t2 - t3 + (y @ a.T) * (a @ z @ a.T)


def pair_sum(a, v, w):
    """``Σ_ik W_ik J_i V J_k`` for ``J_i = diag a_i − a_i a_iᵀ``, any V and W (V or W may be stacks)."""
    aw = a.T @ w
    t1 = v * (aw @ a)
    t2 = (aw * _t(a @ _t(v))) @ a
    t3 = a.T @ ((a @ v) * (w @ a))
    return t1 - t2 - t3 + a.T @ (w * (a @ v @ a.T)) @ a


CLOSED_TOL = 1e-6
"""Relative error (to the largest kernel entry) under which the order-4 closed form is used without pairs."""


class Uniform:
    """Order-2 and order-4 closed forms when the zero-score matrix is uniform per sequence, ``P = 11ᵀ/T``
    (bidirectional, no bias, no RoPE; docs/theory.md §2.7). The centred scores ``c_ij = s_ij − ⟨s_i⟩`` are then
    matrix-normal, ``E[c_ij c_kl] = v K_ik K̄_jl`` with ``K̄ = (I − P) K (I − P)``, and row i of A is
    ``(1/T)(1 + c + q₂(c) + q₃(c) + q₄(c) + …)`` with ``q₂ = (c² − m₂)/2``, ``q₃ = c³/6 − c m₂/2 − m₃/6``,
    ``q₄ = c⁴/24 − c² m₂/4 − c m₃/6 − m₄/24 + m₂²/4`` (m_r = ⟨c^r⟩ over the row). Isserlis reduces every
    expectation to block means of X against fixed matrices of K and K̄: O(N²) plus one product K̄ (K̄ ⊙ P)."""

    def __init__(self, segments, k, v):
        self.segments, self.v = tuple(segments), v
        self.t = np.asarray(self.segments)
        self.starts = np.concatenate([[0], np.cumsum(self.t)[:-1]])
        self.p = np.zeros((len(k), len(k)))
        for sl, t in zip(segment_slices(self.segments), self.segments):
            self.p[sl, sl] = 1.0 / t
        self.k = k
        self.kappa = np.diag(k).copy()
        kb = self.centre(k)
        self.kbar = kb
        d = np.diag(kb).copy()
        t1 = self.mean(d[:, None])[:, 0]
        self.e = d - t1
        k2 = kb * kb
        q = np.zeros(len(k))                        # Q_jj = ⟨K̄_jl²⟩ over j's sequence
        kd = np.zeros(len(k))                       # (K̄^{AA} d^A)_j / T_A
        kkp = np.zeros_like(k)                      # K̄^{AB} K̄^{BB} / T_B
        for sl, t in zip(segment_slices(self.segments), self.segments):
            q[sl] = k2[sl, sl].sum(axis=1) / t
            kd[sl] = kb[sl, sl] @ d[sl] / t
            kkp[:, sl] = kb[:, sl] @ kb[sl, sl] / t
        dd = self.mean((d * d)[:, None])[:, 0]
        qbar = self.mean(q[:, None])[:, 0]
        self.g = d * d / 8.0 - (d * t1 + 2.0 * q) / 4.0 - kd / 2.0 - dd / 8.0 + (t1 * t1 + 2.0 * qbar) / 4.0
        self.r1 = 0.5 * kb * self.e[None, :] - kkp - 0.5 * self.mean((kb * d[None, :]).T).T
        self.c2 = self.centre(k2)
        spread = 0.0                                # the largest variance of a score difference c_ij − c_il
        for sl in segment_slices(self.segments):
            b = kb[sl, sl]
            spread = max(spread, float(np.max(d[sl][:, None] + d[sl][None, :] - 2.0 * b)))
        self.lam = v * float(np.max(self.kappa)) * spread

    def mean(self, y):
        """``P y``: block means over each sequence's rows."""
        if len(self.t) == 1:
            return np.broadcast_to(y.mean(axis=0), y.shape)
        return np.repeat(np.add.reduceat(y, self.starts, axis=0) / self.t[:, None], self.t, axis=0)

    def means(self, y):
        """``P y P``."""
        return self.mean(self.mean(y).T).T

    def centre(self, y):
        """``(I − P) y (I − P)``."""
        py = self.mean(y)
        yp = self.mean(y.T).T
        return y - py - yp + self.mean(yp)

    def mean_a(self):
        """``E[A]`` to order 2 and its order-4 term: ``(v/2) κ_i e_j/T`` and ``v² κ_i² g_j/T``."""
        return (0.5 * self.v) * self.kappa[:, None] * self.p * self.e[None, :], \
            (self.v ** 2) * (self.kappa ** 2)[:, None] * self.p * self.g[None, :]

    def times_a(self, w, y):
        """``W y`` for ``W = w ⊙ P ⊙ (a bᵀ)``-shaped means: rows ``w_i · (P(b ⊙ y))_i``; w, b vectors."""
        return w[0][:, None] * self.mean(w[1][:, None] * y)

    def closed(self, x, coef):
        """``(E₂, E₄, E₂ − M₀XM₀ᵀ)``: the order-≤2 closed form of ``E[M X Mᵀ]``, its order-4 term and its
        order-2 term, X symmetric."""
        al, be, ga = coef
        v, ka, k = self.v, self.kappa, self.k
        mu = be - ga
        px = self.mean(x)
        pxp = self.mean(px.T).T
        m0xm0 = al * al * x + al * mu * (px + px.T) + mu * mu * pxp
        xn = al * x - ga * px.T if (al or ga) else None          # X N₀ᵀ, N₀ = αI − γP
        xm = al * x + mu * px.T                                  # X M₀ᵀ
        d1 = v * k * self.means(x * self.kbar)
        e2 = self.times_a((0.5 * v * ka, self.e), xm)
        e2_ = m0xm0 + be * be * d1 + be * (e2 + e2.T)
        ga_ = self.means(self.g[:, None] * x)
        r1 = self.means(self.r1 * x)
        eta = 0.25 * self.means(np.outer(self.e, self.e) * x)
        zeta = 0.5 * self.means(self.c2 * x)
        ka2 = ka * ka
        axa = v * v * (ka2[:, None] * ga_ + ka2[None, :] * ga_.T + k * (ka[None, :] * r1 + ka[:, None] * r1.T)
                       + np.outer(ka, ka) * eta + k * k * zeta)
        e4 = be * be * axa
        if xn is not None:
            t = self.times_a((v * v * ka2, self.g), xn)
            e4 = e4 + be * (t + t.T)
        return e2_, e4, e2_ - m0xm0

    def deltas(self, s):
        """δ1…δ4 of one draw: ``(1/T) q_r(c_i)`` row-wise."""
        c = s - self.mean(s.T).T
        m = lambda y: self.mean(y.T).T           # noqa: E731   row means, broadcast back
        c2 = c * c
        m2, m3 = m(c2), m(c2 * c)
        q2 = 0.5 * (c2 - m2)
        q3 = c2 * c / 6.0 - 0.5 * c * m2 - m3 / 6.0
        q4 = c2 * c2 / 24.0 - 0.25 * c2 * m2 - c * m3 / 6.0 - m(c2 * c2) / 24.0 + 0.25 * m2 * m2
        return [self.p * q for q in (c, q2, q3, q4)]


class Estimator:
    """The expectations of one attention layer with standard scores on the kernel ``sigma``."""

    def __init__(self, layer, sigma, segments, cache=None, seed=(0,), where="attention"):
        self.layer, self.segments, self.cache, self.seed, self.where = layer, tuple(segments), cache, tuple(seed), where
        self.n = sum(self.segments)
        self.kq = MX.score_kernel(layer, sigma, where)
        self.v = float(layer.qk_var)
        self.offsets = MX.logit_offsets(layer, max(self.segments), where)
        per_head = layer.bias is not None and (isinstance(layer.bias, str) or layer.bias.ndim == 3)
        self.groups = [(1.0 / layer.heads, h) for h in range(layer.heads)] if per_head else [(1.0, 0)]
        self.pairs = max(2, (int(layer.score_samples) + 1) // 2)
        if layer.matrix == "softmax":
            self.coef = (0.0, 1.0, 0.0)
        else:
            self.coef = (float(layer.alpha), float(layer.beta), float(layer.gamma) if layer.matrix == "shaped" else 0.0)
        self.sep = None        # RoPE: ρ(a + b) = Σ_m f_m(a) g_m(b) over offsets (rope.separable)
        ktil = self.kq
        if layer.rope_theta is not None:
            t_max = max(self.segments)
            self.sep = RP.separable(layer, t_max, cache)
            pos = RP.positions(self.segments)
            self.lag = pos[:, None] - pos[None, :] + t_max - 1          # index of t_j − t_l
            ktil = ktil * RP.layer_rho(layer, pos[:, None] - pos[None, :])
        flat = (layer.bias is None and not layer.causal) or all(np.all(o == o[:, :1]) for o in self.offsets)
        # constant rows: P = 11ᵀ/T per sequence
        self.uniform = Uniform(self.segments, self.kq, self.v) if (
            flat and layer.rope_theta is None and layer.attention == "softmax" and layer.spa == "none") else None
        self.p = [self.uniform.p if self.uniform is not None else self._zero_score(h) for _, h in self.groups]
        self.method = "order-2 closed form + control-variate pairs"
        self.ktil, self._ed2 = ktil, None
        self.kernels: list = []          # the forward's estimates, kept for the backward rule
        self.back_error = 0.0            # the error of the last E[MᵀΠM] (largest entry)
        self.score_error = 0.0           # … of the last score-path kernel

    @property
    def ed2(self):
        """``E[δ2]`` per group (computed on first use: the uniform-P forward does without)."""
        if self._ed2 is None:
            self._ed2 = [self._mean_d2(p, self.ktil) for p in self.p]
        return self._ed2

    # -- matrices -------------------------------------------------------------------------------
    def _dense(self, blocks):
        out = np.zeros((self.n, self.n))
        for sl, b in zip(segment_slices(self.segments), blocks):
            out[sl, sl] = b
        return out

    def _zero_score(self, h):
        return self._dense([MX.softmax(self.offsets[h][:t, :t].copy()) for t in self.segments])

    def softmax(self, s, h):
        """``A = softmax(S + B_h + mask)`` per sequence (dense, block-diagonal)."""
        return self._dense([MX.softmax(s[sl, sl] + self.offsets[h][:t, :t])
                            for sl, t in zip(segment_slices(self.segments), self.segments)])

    def mix(self, a, p):
        """``M = αI + βA − γC`` (C = the zero-score matrix ``p``), or A itself."""
        al, be, ga = self.coef
        if self.layer.matrix == "softmax":
            return a
        out = be * a
        if ga:
            out = out - ga * p
        return out + al * np.eye(self.n)

    def _mean_d2(self, p, ktil):
        """``E[δ2]``: rows ``½ p_i ⊙ (E c_i² − ⟨E c_i²⟩_{p_i})``, ``E c_ij² = v K_ii (K_jj − 2(K̃p_i)_j + p_iᵀK̃p_i)``."""
        d = np.diag(self.kq)
        pk = p @ ktil
        ec2 = self.v * d[:, None] * (d[None, :] - 2.0 * pk + np.sum(pk * p, axis=1)[:, None])
        return 0.5 * p * (ec2 - np.sum(p * ec2, axis=1)[:, None])

    def _deltas(self, s, p):
        """δ1 (odd in S) and δ2 (even) of one draw."""
        c = s - np.sum(p * s, axis=1)[:, None]
        d1 = p * c
        c2 = c * c
        return d1, 0.5 * p * (c2 - np.sum(p * c2, axis=1)[:, None])

    def draws(self, g):
        """The score draws of group g, regenerated from the seed (the same in the forward and backward)."""
        draw = MX.score_sampler(self.layer, self.kq, self.segments, (*self.seed, g), self.cache)
        for _ in range(self.pairs):
            yield draw()

    def m0(self, p):
        al, be, ga = self.coef
        return self.mix(p, p) if self.layer.matrix == "softmax" else (be - ga) * p + al * np.eye(self.n)

    # -- closed forms ---------------------------------------------------------------------------
    def factors(self, chunk=None, rotary=True):
        """Stacks ``(F, G)`` of at most ``chunk`` RoPE terms, ``F_m[j, l] = f_m(t_j − t_l)``,
        ``G_m[i, k] = g_m(t_k − t_i)`` (so ``ρ((t_j − t_l) + (t_k − t_i)) = Σ_m F_m[j, l] G_m[i, k]``);
        ``[(1, 1)]`` without RoPE."""
        if self.sep is None or not rotary:
            yield 1.0, 1.0
            return
        f, g = self.sep
        chunk = chunk or max(1, min(16, 2 ** 21 // self.n ** 2))     # stacks of ≤ 16 MiB
        for lo in range(0, len(f), chunk):
            yield f[lo:lo + chunk][:, self.lag], g[lo:lo + chunk][:, self.lag.T]

    def _e_d1xd1(self, p, x):
        """``E[δ1 X δ1ᵀ]_ik = v K_ik Σ_m G_m[i, k] U_ik(K ⊙ F_m)``, U of :func:`pair_trace`."""
        k = self.kq
        out = sum(np.sum(gm * pair_trace(p, x, k * fm), axis=0) if self.sep is not None else pair_trace(p, x, k)
                  for fm, gm in self.factors())
        return self.v * k * out

    def _e_d1pid1(self, p, pi):
        """``E[δ1ᵀ Π δ1] = v Σ_m Σ_ik (Π ⊙ K ⊙ G_m)_ik J_i (K ⊙ F_m) J_k``."""
        k = self.kq
        w = pi * k
        out = sum(np.sum(pair_sum(p, k * fm, w * gm), axis=0) if self.sep is not None else pair_sum(p, k, w)
                  for fm, gm in self.factors())
        return self.v * out

    def score_path(self, a, values, pi, keys, with_pi, rotary=True):
        """The score terms of one draw's softmax matrix ``a`` (as :func:`.layer.score_terms`, ρ separable):
        ``T = Σ_m G_m ⊙ U(V, K ⊙ F_m)``, ``q = ⟨Π ⊙ K, T⟩`` and ``Π ⊙ T + Σ_m F_m ⊙ Σ_ik (W ⊙ G_m)_ik J_i V J_k``."""
        from .layer import _centred
        vc = _centred(values, self.segments)
        w = pi * keys
        t = np.zeros_like(pi)
        k2 = np.zeros_like(pi) if with_pi else None
        for fm, gm in self.factors(rotary=rotary):
            if self.sep is None or not rotary:
                t += pair_trace(a, vc, _centred(keys, self.segments))
                if with_pi:
                    k2 += pair_sum(a, vc, w)
                continue
            z = np.stack([_centred(keys * f, self.segments) for f in fm])
            t += np.sum(gm * pair_trace(a, vc, z), axis=0)
            if with_pi:
                k2 += np.sum(fm * pair_sum(a, vc, w * gm), axis=0)
        return float(np.sum(w * t)), (pi * t + k2 if with_pi else None)

    def _closed(self, p, ed2, m0, x, xm):
        """``E[F₂] = M₀XM₀ᵀ + β² E[δ1 X δ1ᵀ] + β(E[δ2] X M₀ᵀ + M₀ X E[δ2]ᵀ)`` (xm = X M₀ᵀ)."""
        be = self.coef[1]
        e2 = ed2 @ xm
        return m0 @ xm + be * be * self._e_d1xd1(p, x) + be * (e2 + e2.T)

    def expansion(self, x):
        """The order-2 closed form alone, ``(1/H) Σ_h E[F₂]`` for ``F(M) = M X Mᵀ`` (error O(v²), no estimate)."""
        out = np.zeros((self.n, self.n))
        for (w, _), p, ed2 in zip(self.groups, self.p, self.ed2):
            m0 = self.m0(p)
            out += w * self._closed(p, ed2, m0, x, x @ m0.T)
        return out

    # -- estimates ------------------------------------------------------------------------------
    def truncation(self, e4, d2):
        """Estimated bound on the order-≥6 remainder of the order-4 closed form (largest entry):
        ``(max|E₄| + max|D₂| λ/4) · λ/(1 − λ)`` (D₂ the order-2 term; E₄ alone can nearly cancel, e.g. at
        T = 6), λ = v max_i K_ii max_jl (K̄_jj + K̄_ll − 2K̄_jl) the largest variance of a
        difference of two scores of one row (an estimate, not a proof: the series' successive terms shrink like
        λ/r, r ≥ 3; validated on the battery of tests/test_standard_scores.py, docs/theory.md §2.7); ∞ for λ ≥ 1/2."""
        lam = self.uniform.lam
        if lam >= 0.5:
            return np.inf
        return (float(np.max(np.abs(e4))) + 0.25 * lam * float(np.max(np.abs(d2)))) * lam / (1.0 - lam)

    def forward_uniform(self, xs, want_mean=False, tol=None):
        """The uniform-P forward (docs/theory.md §2.7): the order-4 closed form, alone when its estimated
        truncation is ≤ ``tol`` (default :data:`CLOSED_TOL`) times the largest entry of every kernel, else the
        control variate of the antithetic pairs (remainder O(v³) per pair)."""
        un, be = self.uniform, self.coef[1]
        tol = CLOSED_TOL if tol is None else tol
        closed, closed2, bounds = [], [], []
        for x in xs:
            e2, e4, d2 = un.closed(x, self.coef)
            closed.append(e2 + e4)
            closed2.append(e2)
            bounds.append(self.truncation(e4, d2))
        if want_mean:
            ed2, ed4 = un.mean_a()
            m0 = self.m0(self.p[0])
            closed.append(m0 + be * (ed2 + ed4))
        if all(b <= tol * np.max(np.abs(c)) for b, c in zip(bounds, closed)):
            self.method = "order-4 closed form (P uniform), truncation estimate"
            kernels = [(c + c.T) * 0.5 for c in closed[:len(xs)]]
            return kernels, (closed[-1] if want_mean else None), bounds
        n_out = len(closed)
        # both control variates on the same pairs: F₂(S) (order 2) and F₄(S) (order 4); per output the one whose
        # largest per-entry variance is smaller (F₄'s c⁴ terms are heavy-tailed when λ ≳ 1, measured at T = 8)
        acc = [[np.zeros((self.n, self.n)) for _ in range(n_out)] for _ in range(2)]
        sq = [[np.zeros((self.n, self.n)) for _ in range(n_out)] for _ in range(2)]
        base = [closed2 + [m0 + be * ed2] if want_mean else closed2, closed]
        al, ga = self.coef[0], self.coef[2]
        p = self.p[0]
        h = self.groups[0][1]
        mu = be - ga
        pre = []
        for x in xs:
            px = un.mean(x)
            pre.append((al * x + mu * px.T, al * al * x + al * mu * (px + px.T) + mu * mu * un.mean(px.T).T))
        for s in self.draws(0):
            mp, mm = self.mix(self.softmax(s, h), p), self.mix(self.softmax(-s, h), p)
            d1, d2, d3, d4 = un.deltas(s)
            rs: list = [[], []]
            for x, (xm, m0xm0) in zip(xs, pre):
                # F₂(S) = M₀XM₀ᵀ + βδ2XM₀ᵀ + h.c. + β²δ1Xδ1ᵀ
                # F₄(S) = F₂(S) + βδ4XM₀ᵀ + h.c. + β²(δ1Xδ3ᵀ + h.c. + δ2Xδ2ᵀ)
                t2, t4 = d2 @ xm, d4 @ xm
                d1x = d1 @ x
                u = d1x @ d3.T
                f2 = m0xm0 + be * (t2 + t2.T) + be * be * (d1x @ d1.T)
                f4 = f2 + be * (t4 + t4.T) + be * be * (u + u.T + d2 @ x @ d2.T)
                f = 0.5 * (sandwich(mp, x) + sandwich(mm, x))
                for o, fo in enumerate((f2, f4)):
                    r = f - fo
                    rs[o].append((r + r.T) * 0.5)
            if want_mean:
                r = 0.5 * (mp + mm) - self.m0(p) - be * d2
                rs[0].append(r)
                rs[1].append(r - be * d4)
            for o in range(2):
                for j, r in enumerate(rs[o]):
                    acc[o][j] += r
                    sq[o][j] += r * r
        k = self.pairs
        est, var, used = [], [], []
        for j in range(n_out):
            cand = []
            for o in range(2):
                mean = acc[o][j] / k
                cand.append((float(np.max(np.maximum(sq[o][j] - k * mean * mean, 0.0))) / (k * (k - 1)),
                             base[o][j] + mean, np.maximum(sq[o][j] - k * mean * mean, 0.0) / (k * (k - 1)), o))
            best = min(cand, key=lambda c: c[0])
            est.append(best[1])
            var.append(best[2])
            used.append(best[3])
        self.method = ("order-4" if used[0] else "order-2") + " closed form (P uniform) + control-variate pairs"
        q = self.quantile()
        errs = [q * float(np.sqrt(np.max(v))) for v in var[:len(xs)]]
        kernels = [(e + e.T) * 0.5 for e in est[:len(xs)]]
        return kernels, (est[-1] if want_mean else None), errs

    def forward(self, xs, want_mean=False, tol=None):
        """``[E[(1/H)Σ_h M_h X M_hᵀ] for X in xs]``, ``E[(1/H) Σ_h M_h]`` (if asked), and the errors of the
        kernels (largest entry). Uniform P (bidirectional, no bias, no RoPE): :meth:`forward_uniform`."""
        if self.uniform is not None and len(self.groups) == 1:
            return self.forward_uniform(xs, want_mean, tol)
        be = self.coef[1]
        n_out = len(xs) + (1 if want_mean else 0)
        est = [np.zeros((self.n, self.n)) for _ in range(n_out)]
        var = [np.zeros((self.n, self.n)) for _ in range(n_out)]
        for g, ((w, h), p, ed2) in enumerate(zip(self.groups, self.p, self.ed2)):
            m0 = self.m0(p)
            xm0 = [x @ m0.T for x in xs]
            m0xm0 = [m0 @ xm for xm in xm0]             # the same for every draw
            closed = [self._closed(p, ed2, m0, x, xm) for x, xm in zip(xs, xm0)]
            if want_mean:
                closed.append(m0 + be * ed2)
            acc = [np.zeros((self.n, self.n)) for _ in range(n_out)]
            sq = [np.zeros((self.n, self.n)) for _ in range(n_out)]
            for s in self.draws(g):
                mp, mm = self.mix(self.softmax(s, h), p), self.mix(self.softmax(-s, h), p)
                d1, d2 = self._deltas(s, p)
                rs = []
                for x, xm, mxm in zip(xs, xm0, m0xm0):
                    e2 = d2 @ xm
                    f = 0.5 * (sandwich(mp, x) + sandwich(mm, x))
                    r = f - (mxm + be * be * sandwich(d1, x) + be * (e2 + e2.T))
                    rs.append((r + r.T) * 0.5)
                if want_mean:
                    rs.append(0.5 * (mp + mm) - m0 - be * d2)
                for j, r in enumerate(rs):
                    acc[j] += r
                    sq[j] += r * r
            k = self.pairs
            for j in range(n_out):
                mean = acc[j] / k
                est[j] += w * (closed[j] + mean)
                var[j] += w * w * np.maximum(sq[j] - k * mean * mean, 0.0) / (k * (k - 1))
        q = self.quantile()
        errs = [q * float(np.sqrt(np.max(v))) for v in var[:len(xs)]]
        kernels = [(e + e.T) * 0.5 for e in est[:len(xs)]]
        return kernels, (est[-1] if want_mean else None), errs

    def quantile(self):
        """Bonferroni two-sided Student-t quantile over the N(N+1)/2 entries at family level 0.1 % (≥ 3)."""
        m = self.n * (self.n + 1) // 2
        from scipy import stats  # only when scores are sampled: keeps `import kernelprop` light
        return max(3.0, float(stats.t.isf(0.0005 / m, self.pairs - 1)))

    def backward(self, pi, values=None, opts=None, with_pi=True):
        """``E[(1/H) Σ_h M_hᵀ Π M_h]`` (closed form + control-variate pairs as the forward; its error in
        ``back_error``) and, if ``values``
        is given, the draw average of the score terms (:meth:`score_path`: query norm, score-path kernel) over the
        same antithetic pairs; the score path's error (largest entry, as ``back_error``) in ``score_error``."""
        be = self.coef[1]
        opts = opts or {}
        keys = opts.get("keys", self.kq)
        rotary = "rope" in opts or not opts       # the layer's score options say whether ρ enters the score path
        out, var = np.zeros((self.n, self.n)), np.zeros((self.n, self.n))
        q, extra = 0.0, (np.zeros((self.n, self.n)) if with_pi and values is not None else None)
        evar = np.zeros((self.n, self.n)) if extra is not None else None
        for g, ((w, h), p, ed2) in enumerate(zip(self.groups, self.p, self.ed2)):
            m0 = self.m0(p)
            pm0 = pi @ m0
            e2 = ed2.T @ pm0
            m0pm0 = m0.T @ pm0                        # the same for every draw
            out += w * (m0pm0 + be * be * self._e_d1pid1(p, pi) + be * (e2 + e2.T))
            acc, sq = np.zeros((self.n, self.n)), np.zeros((self.n, self.n))
            share = w / (2 * self.pairs)
            ys = (np.zeros((self.n, self.n)), np.zeros((self.n, self.n))) if extra is not None and be else None
            for s in self.draws(g):
                ap, am = self.softmax(s, h), self.softmax(-s, h)
                mp, mm = self.mix(ap, p), self.mix(am, p)
                d1, d2 = self._deltas(s, p)
                e2 = d2.T @ pm0
                r = 0.5 * (sandwich_t(mp, pi) + sandwich_t(mm, pi)) - (m0pm0 + be * be * sandwich_t(d1, pi)
                                                                      + be * (e2 + e2.T))
                r = (r + r.T) * 0.5
                acc += r
                sq += r * r
                if values is not None and be:
                    y = None
                    for a in (ap, am):
                        t, x = self.score_path(a, values, pi, keys, with_pi, rotary)
                        q += share * be * be * t
                        if extra is not None:
                            y = x if y is None else (y + x) * 0.5
                    if ys is not None:
                        ys[0][...] += y
                        ys[1][...] += y * y
            mean = acc / self.pairs
            out += w * mean
            var += w * w * np.maximum(sq - self.pairs * mean * mean, 0.0) / (self.pairs * (self.pairs - 1))
            if ys is not None:     # the score path: the mean over pairs of (X(A₊) + X(A₋))/2, weight w β²
                ym = ys[0] / self.pairs
                extra += (w * be * be) * ym
                evar += (w * be * be) ** 2 * np.maximum(ys[1] - self.pairs * ym * ym, 0.0) / (
                    self.pairs * (self.pairs - 1))
        quant = self.quantile()
        self.back_error = quant * float(np.sqrt(np.max(var)))
        self.score_error = quant * float(np.sqrt(np.max(evar))) if evar is not None else 0.0
        if extra is not None and opts.get("rescale") is not None:
            r = np.asarray(opts["rescale"])
            extra *= np.outer(r, r)
            self.score_error *= float(np.max(np.abs(r))) ** 2
        return (out + out.T) * 0.5, q, extra
