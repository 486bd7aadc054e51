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
        self.p = [self._zero_score(h) for _, h in self.groups]
        self.ed2 = [self._mean_d2(p, ktil) for p in self.p]
        self.kernels: list = []          # the forward's estimates, kept for the backward rule
        self.back_error = 0.0            # the error of the last E[MᵀΠM] (largest entry)

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
    def forward(self, xs, want_mean=False):
        """``[E[(1/H)Σ_h M_h X M_hᵀ] for X in xs]``, ``E[(1/H) Σ_h M_h]`` (if asked), and the errors of the
        kernels (largest entry)."""
        be = self.coef[1]
        n_out = len(xs) + (1 if want_mean else 0)
        est = [np.zeros((self.n, self.n)) for _ in range(n_out)]
        var = [np.zeros((self.n, self.n)) for _ in range(n_out)]
        for g, ((w, h), p, ed2) in enumerate(zip(self.groups, self.p, self.ed2)):
            m0 = self.m0(p)
            xm0 = [x @ m0.T for x in xs]
            closed = [self._closed(p, ed2, m0, x, xm) for x, xm in zip(xs, xm0)]
            if want_mean:
                closed.append(m0 + be * ed2)
            acc = [np.zeros((self.n, self.n)) for _ in range(n_out)]
            sq = [np.zeros((self.n, self.n)) for _ in range(n_out)]
            for s in self.draws(g):
                mp, mm = self.mix(self.softmax(s, h), p), self.mix(self.softmax(-s, h), p)
                d1, d2 = self._deltas(s, p)
                rs = []
                for x, xm in zip(xs, xm0):
                    e2 = d2 @ xm
                    f = 0.5 * (sandwich(mp, x) + sandwich(mm, x))
                    r = f - (m0 @ xm + be * be * sandwich(d1, x) + be * (e2 + e2.T))
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
        same antithetic pairs."""
        be = self.coef[1]
        opts = opts or {}
        keys = opts.get("keys", self.kq)
        rotary = "rope" in opts or not opts       # the layer's score options say whether ρ enters the score path
        out, var = np.zeros((self.n, self.n)), np.zeros((self.n, self.n))
        q, extra = 0.0, (np.zeros((self.n, self.n)) if with_pi and values is not None else None)
        for g, ((w, h), p, ed2) in enumerate(zip(self.groups, self.p, self.ed2)):
            m0 = self.m0(p)
            pm0 = pi @ m0
            e2 = ed2.T @ pm0
            out += w * (m0.T @ pm0 + be * be * self._e_d1pid1(p, pi) + be * (e2 + e2.T))
            acc, sq = np.zeros((self.n, self.n)), np.zeros((self.n, self.n))
            share = w / (2 * self.pairs)
            for s in self.draws(g):
                ap, am = self.softmax(s, h), self.softmax(-s, h)
                mp, mm = self.mix(ap, p), self.mix(am, p)
                d1, d2 = self._deltas(s, p)
                e2 = d2.T @ pm0
                r = 0.5 * (sandwich_t(mp, pi) + sandwich_t(mm, pi)) - (m0.T @ pm0 + be * be * sandwich_t(d1, pi)
                                                                      + be * (e2 + e2.T))
                r = (r + r.T) * 0.5
                acc += r
                sq += r * r
                if values is not None and be:
                    for a in (ap, am):
                        t, x = self.score_path(a, values, pi, keys, with_pi, rotary)
                        q += share * be * be * t
                        if extra is not None:
                            extra += (share * be * be) * x
            mean = acc / self.pairs
            out += w * mean
            var += w * w * np.maximum(sq - self.pairs * mean * mean, 0.0) / (self.pairs * (self.pairs - 1))
        self.back_error = self.quantile() * float(np.sqrt(np.max(var)))
        if extra is not None and opts.get("rescale") is not None:
            extra *= np.outer(opts["rescale"], opts["rescale"])
        return (out + out.T) * 0.5, q, extra
