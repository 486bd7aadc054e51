"""Multi-head self-attention ``concat_h(M_h X W_V,h) W_O``: description and every rule.

Kernel map (docs/theory.md §1-2): ``Σ' = σ_v² σ_o² (1/H) Σ_h M_h Σ M_hᵀ`` with the mixing ``M_h`` of
:mod:`.matrices` (zero-score, tied 1/d or standard 1/sqrt(d_k) scores, with RoPE (:mod:`.rope`) and QK-norm;
Value-SkipInit, shaped; SPA; or identity attention ``A = S``), plus the value and output biases.
Backward: ``Π_X = σ_v²σ_o² (1/H) Σ_h M_hᵀ Π M_h`` plus, for standard scores, the O(1) path through the
scores (docs/theory.md §11). Finite width: the real per-head computation with random weights (rotated,
normalised queries and keys), and its exact transpose.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...errors import NotSupportedError, NumericalError, SpecError
from ...inputs import segment_slices
from ...kernel.state import ZERO, Dependence, is_one, nonzero, per
from ..base import Layer, Param, carry, choice, num, register_layer, resolved, unit_scale
from ..composite import axpy
from . import matrices as MX
from . import rope
from . import standard as STD

MAX_HEADS = 65536


@register_layer
@dataclass(frozen=True, eq=False)
class Attention(Layer):
    """Multi-head self-attention ``concat_h(A_h X W_V,h) W_O`` (docs/theory.md §1-2).

    Kernel map: ``Σ' = σ_v² σ_o² (1/H) Σ_h A_h Σ A_hᵀ`` where ``A_h`` is

    * ``scores="uniform"``: zero queries (He et al. 2023) or independent Q, K at 1/d scaling:
      ``A = softmax(B_h + M)``; without bias ``11ᵀ/T`` or, causal, ``A_ij = 1/i`` for ``j ≤ i``;
    * ``scores="tied"``: tied 1/d scaling (Hron et al. 2020): ``A = softmax(σ_qk² Σ + B_h + M)``;
    * ``scores="standard"``: independent queries and keys at 1/sqrt(d_k) scaling: the scores stay
      Gaussian at infinite width, ``S = σ_qk F Z Fᵀ`` with ``F Fᵀ = Σ`` and Z i.i.d. standard normal, so the
      kernel ``σ_v²σ_o² E[A Σ Aᵀ]`` is the second-order expansion around the zero-score matrix (closed form)
      plus ``score_samples``/2 antithetic control-variate pairs of draws of Z per score law, its error bound
      (a Bonferroni Student-t multiple of the standard error) added to the reported approximation error
      (:mod:`.standard`, docs/theory.md §2.7);

    ``attention="identity"`` drops the softmax: ``A = S + B_h`` with masked entries 0 (Hron et al. 2020).
    The matrix is then modified by ``matrix``: ``"value_skipinit"`` ``αI + βA`` (He et al. 2023;
    defaults α=1, β=0) or ``"shaped"`` ``αI + βA − γC`` with C the zero-score matrix (He & Hofmann 2024;
    defaults 1, 1, 1). ``bias`` is ``None``, ``"alibi"`` (``B_ij = −s_h|i−j|``, ``s_h = 2^{−8h/H}``,
    Press et al. 2022) or a T×T array. ``values``/``projection`` = ``"identity"`` make the layer
    weight-free (SAS). ``spa = "e-spa" | "u-spa"`` replaces the zero-score matrix by the
    signal-preserving matrix ``A_l = D_l softmax(B_l + M)`` of step ``spa_step`` of a schedule of
    ``spa_layers`` steps (He et al. 2023, see :mod:`kernelprop.methods.spa`).

    ``rope_theta`` rotates queries and keys by position (RoPE, Su et al. 2021): tied logits become
    ``σ_qk² Σ_ij ρ(j − i)``, standard scores get ``Cov(S_ij, S_kl) = σ_qk² Σ_ik Σ_jl ρ((j−i) − (l−k))``, with
    ``ρ(Δ) = (1 − r) + r·mean_f cos(θ_f Δ)`` over the frequencies of ``rope_dim`` (or their wide-limit integral)
    and r = ``rope_fraction`` (docs/theory.md §2.4). ``qk_norm`` normalises each head's queries and keys: the
    scores see ``C = D^{−1/2} Σ D^{−1/2}`` instead of Σ (§2.5). ``value_bias_var``/``out_bias_var`` add biases
    shared by all tokens: ``σ_o² (1/H) Σ_h M_h (σ_v² Σ + σ_bv² 11ᵀ) M_hᵀ + σ_bo² 11ᵀ`` (§2.6).
    """

    heads: int = 1
    scores: str = choice("uniform", ("uniform", "tied", "standard"), "attention-score limit")
    causal: bool = False
    bias: Any = None
    qk_var: Param = num(1.0, "nonneg", "σ_qk²: score scale (the query weights' variance; under qk_norm the "
                        "query norm's gain²)")
    value_var: Param = num(1.0, "nonneg", "σ_v²")
    out_var: Param = num(1.0, "nonneg", "σ_o², or \"unit\" (the σ_o² that gives the output unit mean variance, "
                         "docs/theory.md §5)", unit=True)
    values: str = choice("dense", ("dense", "identity"), "value weights")
    projection: str = choice("dense", ("dense", "identity"), "output projection")
    matrix: str = choice("softmax", ("softmax", "value_skipinit", "shaped"), "attention-matrix modification")
    alpha: Param = num(None, "real", "α (identity weight) for value_skipinit/shaped")
    beta: Param = num(None, "real", "β (softmax weight) for value_skipinit/shaped")
    gamma: Param = num(None, "real", "γ (centring weight) for shaped")
    alibi_scale: Param = num(1.0, "nonneg", "multiplier of the ALiBi slopes")
    key_width: Param = num(None, "positive", "query/key width per head as a multiple of d/H (Monte Carlo only)",
                           kernel=False)
    score_samples: int = 64
    spa: str = choice("none", ("none", "e-spa", "u-spa"), "signal-preserving attention matrices (He et al. 2023)")
    spa_final: Param = num(None, "real", "final γ_L (E-SPA, default 0.005) or ρ_L (U-SPA, default 0.8)")
    spa_step: Param = num("l", "nonneg", "step of the SPA schedule (default: the block index l)")
    spa_layers: Param = num("L", "positive", "length of the SPA schedule (default: the depth L)")
    attention: str = choice("softmax", ("softmax", "identity"),
                            "softmax, or identity attention A = S (no softmax; Hron et al. 2020)")
    rope_theta: Param = num(None, "positive", "RoPE base θ > 1 (Su et al. 2021; e.g. 10000): queries and keys "
                            "rotated by position; omitted = no RoPE (docs/theory.md §2.4)")
    rope_dim: Any = field(default=None, metadata={"doc": "RoPE head dimension D (even): use its finite frequency set "
                                                  "θ^(−2f/D); omitted = the wide-limit integral over frequencies"})
    rope_fraction: Param = num(1.0, "positive", "share r ≤ 1 of each head's query/key dims that RoPE rotates "
                               "(GPT-NeoX rotary_pct); the others see ρ = 1")
    qk_norm: str = choice("none", ("none", "layernorm", "rmsnorm"),
                          "normalise each head's queries and keys (gain² σ_qk² on the queries, 1 on the keys; "
                          "docs/theory.md §2.5)")
    value_bias_var: Param = num(0.0, "nonneg", "σ_bv²: variance of the value bias (one vector shared by all tokens)")
    out_bias_var: Param = num(0.0, "nonneg", "σ_bo²: variance of the output-projection bias (shared by all tokens)")
    kind = "attention"

    _DEFAULTS = {"softmax": (1.0, 1.0, 0.0), "value_skipinit": (1.0, 0.0, 0.0), "shaped": (1.0, 1.0, 1.0)}

    def __post_init__(self):
        a, b, g = self._DEFAULTS[self.matrix] if self.matrix in self._DEFAULTS else (1.0, 1.0, 0.0)
        for name, default in (("alpha", a), ("beta", b), ("gamma", g)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if self.key_width is None:
            object.__setattr__(self, "key_width", 1.0)
        super().__post_init__()
        if isinstance(self.score_samples, bool) or not isinstance(self.score_samples, (int, np.integer)) \
                or self.score_samples < 2:
            raise SpecError("attention.score_samples", self.score_samples, "must be a whole number >= 2")
        if isinstance(self.heads, bool) or not isinstance(self.heads, (int, np.integer)) or self.heads < 1:
            raise SpecError("attention.heads", self.heads, "must be a whole number >= 1")
        if self.heads > MAX_HEADS:     # per-head biases and masks are (H, T, T) arrays
            raise SpecError("attention.heads", self.heads, f"must be at most {MAX_HEADS} (the wide-limit map keeps one "
                            "T×T bias per head)")
        if self.matrix == "softmax" and (self.alpha != 1.0 or self.beta != 1.0 or self.gamma != 0.0):
            raise SpecError("attention.matrix", self.matrix,
                            "alpha/beta/gamma only apply with matrix = \"value_skipinit\" or \"shaped\"")
        if self.matrix == "value_skipinit" and self.gamma != 0.0:
            raise SpecError("attention.gamma", self.gamma, "only applies with matrix = \"shaped\"")
        if self.spa != "none" and (self.scores != "uniform" or self.bias is not None):
            raise SpecError("attention.spa", self.spa, "SPA sets the attention matrix itself: it needs "
                            "scores = \"uniform\" (zero queries) and no bias")
        if isinstance(self.bias, str) and self.bias != "alibi":
            raise SpecError("attention.bias", self.bias, "must be \"alibi\", a T×T array or omitted")
        if self.bias is not None and not isinstance(self.bias, str):
            b = np.asarray(self.bias, dtype=float)
            if b.ndim not in (2, 3) or b.shape[-1] != b.shape[-2] or not np.all(np.isfinite(b) | (b == -np.inf)):
                raise SpecError("attention.bias", "array of shape " + str(b.shape),
                                "must be \"alibi\", or a T×T (or H×T×T) array of finite numbers or -inf")
            if b.ndim == 3 and b.shape[0] != self.heads:
                raise SpecError("attention.bias", f"{b.shape[0]} head matrices", f"needs one per head ({self.heads})")
            if self.attention == "identity" and not np.all(np.isfinite(b)):
                raise SpecError("attention.bias", "array with -inf entries",
                                "identity attention adds the bias to the scores: it must be finite (use causal = true "
                                "for a causal mask)")
            object.__setattr__(self, "bias", b)
        self._check_extensions()
        if self.attention == "identity":
            if self.scores == "standard":
                raise SpecError("attention.scores", self.scores, "identity attention (attention = \"identity\") "
                                "supports scores = \"tied\" (A = σ_qk² Σ) or \"uniform\" (A = the bias alone)")
            if self.matrix != "softmax" or self.spa != "none":
                raise SpecError("attention.attention", self.attention,
                                "identity attention takes no matrix modification (matrix = \"softmax\") and no spa")

    def _check_extensions(self):
        """RoPE, QK-norm and the biases: what each needs (docs/theory.md §2.4-2.6)."""
        def number(v):
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
        theta, frac, dim = self.rope_theta, self.rope_fraction, self.rope_dim
        if theta is not None:
            if number(theta) and not theta > 1:
                raise SpecError("attention.rope_theta", theta, "must be > 1 (the base of the rotary frequencies "
                                "θ^(−2f/d_k), e.g. 10000)")
            if self.scores == "uniform":
                raise SpecError("attention.rope_theta", theta, "RoPE rotates queries and keys, but scores = "
                                "\"uniform\" has zero queries (every score 0): use scores = \"tied\" or \"standard\"")
        if dim is not None:
            if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 2 or dim % 2:
                raise SpecError("attention.rope_dim", dim, "must be an even whole number >= 2 (a head dimension), "
                                "or omitted for the wide-limit integral")
            if theta is None:
                raise SpecError("attention.rope_dim", dim, "only applies with rope_theta (RoPE)")
        if number(frac):
            if not frac <= 1:
                raise SpecError("attention.rope_fraction", frac, "must be in (0, 1]: the share of each head's dims "
                                "that RoPE rotates")
            if frac != 1 and theta is None:
                raise SpecError("attention.rope_fraction", frac, "only applies with rope_theta (RoPE)")
            if dim is not None:
                rope.check_rotated(int(dim), float(frac), "attention.rope_fraction", f"rope_dim ({dim})")
        if self.qk_norm != "none":
            if self.scores == "uniform":
                raise SpecError("attention.qk_norm", self.qk_norm, "normalises queries and keys, but scores = "
                                "\"uniform\" has zero queries (nothing to normalise): use scores = \"tied\" or "
                                "\"standard\"")
            if number(self.qk_var) and self.qk_var == 0:
                raise SpecError("attention.qk_var", self.qk_var, "is the query norm's gain² under qk_norm; 0 makes "
                                "every score 0: use scores = \"uniform\" for that")
        for name, needs, what in (("value_bias_var", "values", "value weights"),
                                  ("out_bias_var", "projection", "an output projection")):
            v = getattr(self, name)
            if getattr(self, needs) != "dense" and not (number(v) and v == 0):
                raise SpecError(f"attention.{name}", v, f"is the bias of {what}: it needs {needs} = \"dense\"")

    @property
    def weight_free(self) -> bool:
        """True when the layer is a pure token mixing ``x ↦ M x`` (identity values and projection)."""
        return self.values == "identity" and self.projection == "identity"

    def kernel_fields(self):
        modified = self.matrix in ("value_skipinit", "shaped")
        used = {"alpha": modified, "beta": modified,
                "gamma": self.matrix == "shaped", "qk_var": self.scores != "uniform",
                "alibi_scale": isinstance(self.bias, str), "value_var": self.values == "dense",
                "out_var": self.projection == "dense", "value_bias_var": self.values == "dense",
                "out_bias_var": self.projection == "dense", "rope_theta": self.rope_theta is not None,
                "rope_fraction": self.rope_theta is not None}
        return tuple(name for name in super().kernel_fields()
                     if used.get(name, True) and (self.spa != "none" or not name.startswith("spa_")))

    # ------------------------------------------------------------------------------------------
    # infinite width

    def mixings(self, sigma, segments, ctx) -> list:
        """``[(weight, M_h)]`` for this layer on kernel ``sigma`` (random scores seeded by ``ctx``)."""
        return MX.head_mixings(self, sigma, segments, ctx.cache, seed=ctx.next_seed(), where=ctx.where)

    #: standard scores: the kernel map takes the expectation over the scores (False: a subclass whose
    #: :meth:`mixings` are one sample of the random map, e.g. the finite-heads chain of kernelprop.finite)
    expected_scores = True

    def kernel_map(self, s, ctx):
        est = None
        bv = self.value_bias_var if self.values == "dense" else 0.0
        if self.scores == "standard" and self.expected_scores:   # expansion + control-variate pairs (§2.7)
            est = STD.Estimator(self, s.sigma, s.segments, ctx.cache, seed=ctx.next_seed(), where=ctx.where)
            xs = [s.sigma] + ([np.ones_like(s.sigma)] if bv else [])
            kernels, mean_m, errs = est.forward(xs, want_mean=self.weight_free)
            sigma, err = kernels[0].copy(), errs[0]       # scaled in place below
            if bv:
                err += bv * errs[1] / self.value_var if self.value_var else 0.0   # in units of σ_v²σ_o²
            heads = [(1.0, MX.Dense((s.n,), [mean_m]))] if self.weight_free else []
            est.kernels = kernels
            distinct = self.values == "identity" and len(est.groups) > 1
        else:
            heads = self.mixings(s.sigma, s.segments, ctx)
            distinct = self.values == "identity" and _head_dependent(self, heads)
        if s.head_blocks and distinct:
            raise NotSupportedError(
                f"{ctx.where}: a weight-free multi-head attention with per-head biases acts on a stream it (or "
                "another such layer) already split into head blocks: head h would mix its own column block again, "
                "which the averaged kernel cannot describe; put a Dense layer or attention with value weights in "
                "between, or give every head the same bias")
        if est is None:
            err = 0.0
            sigma = heads[0][1].kernel(s.sigma)
            if heads[0][0] != 1.0:
                sigma *= heads[0][0]
            for w, m in heads[1:]:
                sigma = axpy(sigma, w, m.kernel(s.sigma))
        if nonzero(bv):       # (1/H) Σ_h (M_h 1)(M_h 1)ᵀ
            ones = _ones_mixed(heads, s.n) if est is None else est.kernels[1]
        else:
            ones = None
        back = self._backward(heads, s.sigma, s.segments, ctx, est)
        if self.weight_free:
            mean = sum(w * m.left(s.mean[..., :, None])[..., 0] for w, m in heads)
            dep = s.dep
            several = len(heads) > 1 or est is not None      # random standard scores count as several matrices
            if dep is not None and dep.kind in ("diag", "dense"):
                if dep.headwise and several:
                    raise NotSupportedError(f"{ctx.where}: two multi-head weight-free mixings with different head "
                                            "matrices in one residual branch; give the heads identical biases")
                p = sum(w * m.left(dep.matrix(s.n)) for w, m in heads)
                dep = Dependence("dense", p, headwise=dep.headwise or several)
            return s.replace(sigma=sigma, mean=mean, dep=dep, quad_error=s.quad_error + err,
                             head_blocks=s.head_blocks or distinct), back
        sv = self.value_var if self.values == "dense" else 1.0
        layer = self
        if self.projection == "dense" and self.is_unit("out_var"):     # σ_o² chosen from this layer's output
            values = sigma * sv if ones is None else sigma * sv + bv * ones
            c = unit_scale(values, self.out_bias_var, f"{ctx.where}.out_var")
            layer = dataclasses.replace(self, out_var=c)
            back = layer._backward(heads, s.sigma, s.segments, ctx, est)
        so = layer.out_var if layer.projection == "dense" else 1.0
        scale = sv * so
        if not is_one(scale):
            sigma *= per(scale, 2)
        if ones is not None:      # value bias: V = X W_V + 1 b_Vᵀ has kernel σ_v² Σ + σ_bv² 11ᵀ
            sigma += per(so * bv, 2) * ones
        if layer.projection == "dense" and nonzero(layer.out_bias_var):
            sigma += per(layer.out_bias_var, 2)
        return s.replace(sigma=sigma, mean=np.zeros(s.mean.shape), gaussian=True, dep=None if s.dep is None else ZERO,
                         width=1.0, quad_error=scale * (s.quad_error + err), head_blocks=False), back

    def batch_refusal(self) -> str | None:
        """Why the kernel map cannot take a batch of kernels (None: it can): sampled scores, a unit σ_o² and
        fields that shape the matrices themselves (ALiBi scale, RoPE, the SPA schedule) are per kernel."""
        if self.scores == "standard":
            return "scores = \"standard\" samples each kernel's scores"
        if self.projection == "dense" and self.is_unit("out_var"):
            return "out_var = \"unit\" is chosen per kernel"
        used = {"alibi_scale": isinstance(self.bias, str), "rope_theta": self.rope_theta is not None,
                "rope_fraction": self.rope_theta is not None, "spa_final": self.spa != "none",
                "spa_step": self.spa != "none", "spa_layers": self.spa != "none"}
        for name, read in used.items():
            if read and np.ndim(getattr(self, name)):
                return f"{name} differs between members (it shapes the attention matrices)"
        return None

    def score_options(self, sigma, segments, cache=None, where="attention") -> dict:
        """What the score path of the backward rule needs besides the mixings: the key/query kernel (Σ, or C
        under QK-norm), the per-token rescaling ``1/√Σ_ii`` of QK-norm, and RoPE's cosine expansion of ρ with
        the token positions (docs/theory.md §2.4, §2.5, §11)."""
        opts: dict[str, Any] = {"keys": MX.score_kernel(self, sigma, where) if self.scores != "uniform" else sigma}
        if self.qk_norm != "none" and self.scores != "uniform":
            opts["rescale"] = 1.0 / np.sqrt(np.diag(sigma))
        if self.rope_theta is not None:
            c, w = rope.spectrum(self, max(segments), cache)
            opts["rope"] = (c, w, rope.positions(segments))
        return opts

    def _backward(self, heads, sigma, segments, ctx, est=None):
        """The backward rule over the forward's own mixings (docs/theory.md §11).

        ``Π_X = σ_v²σ_o² (1/H) Σ_h A_hᵀ Π A_h`` (+ the score path for standard scores); parameter-gradient
        norms of values, output projection and queries (softmax Jacobians ``J_i = diag a_i − a_i a_iᵀ``).
        Biases add to the forward only: the backward through them is the identity and their own gradient
        norms are not reported.
        """
        path, cache, where = ctx.path, ctx.cache, ctx.where

        def back(pi, grads):
            opts = self.score_options(sigma, segments, cache, where)
            if est is not None and self.weight_free:   # 1/sqrt(d_k) scores send O(1) back through the scores
                out, _, extra = est.backward(pi, sigma, opts)
                res = out + self.qk_var * extra
                carry(grads, est.back_error + abs(self.qk_var) * est.score_error, res)
                return res
            if self.weight_free:   # y = M x: no weights of its own
                return sum(w * m.kernel_t(pi) for w, m in heads)
            sv = self.value_var if self.values == "dense" else 1.0
            so = self.out_var if self.projection == "dense" else 1.0
            bv = self.value_bias_var if self.values == "dense" else 0.0
            standard = self.scores == "standard"
            kv = sv * sigma + bv if bv else (sv * sigma if sv != 1.0 else sigma)     # the values' kernel
            if est is not None:   # the forward's estimates of E[AΣAᵀ], E[A11ᵀAᵀ]; E[AᵀΠA] and the score path
                mixed = float(np.vdot(est.kernels[0], pi))
                ones_pi = float(np.vdot(est.kernels[1], pi)) if bv else 0.0
                out, q, score_pi = est.backward(pi, kv, opts)
            else:
                out = sum(w * m.kernel_t(pi) for w, m in heads)
                mixed = sum(w * float(np.vdot(m.kernel(sigma), pi)) for w, m in heads)    # ⟨AΣAᵀ, Π⟩
                ones_pi = float(np.vdot(_ones_mixed(heads, len(sigma)), pi)) if bv else 0.0
                if self.attention == "identity":
                    q, score_pi = _identity_score_term(kv, pi, segments, self.causal, **opts), None
                else:
                    q, score_pi = score_terms(heads, kv, pi, standard, spa=self.spa != "none", segments=segments,
                                              **opts)
            if self.values == "dense":
                grads.append((path, "values", so * mixed))
            if self.projection == "dense":     # ⟨(1/H) Σ_h M_h (σ_v²Σ + σ_bv² 11ᵀ) M_hᵀ, Π⟩
                grads.append((path, "output", sv * mixed + bv * ones_pi))
            # zero queries: virtual keys W_K ~ N(0, σ_qk²/d); standard scores: the real keys, W_K ~ N(0, 1/d)
            grads.append((path, "queries", (1.0 if standard else self.qk_var) * so * q))
            out = (sv * so) * out
            if standard:
                out = out + (self.qk_var * so) * score_pi
            if est is not None:   # the estimates' own errors (their pairs' spread)
                carry(grads, abs(sv * so) * est.back_error + abs(self.qk_var * so) * est.score_error, out)
            return out
        return back

    # ------------------------------------------------------------------------------------------
    # finite width

    def score_mode(self, override: str | None) -> str:
        """The score law the sampler uses: the layer's, or the simulation's override
        (``"independent"`` for zero-score layers, ``"standard"`` for any softmax layer)."""
        if self.spa != "none":
            return "uniform"          # SPA fixes the matrix itself (zero queries)
        if self.attention == "identity":
            return self.scores
        if override == "standard" or (override == "independent" and self.scores == "uniform"):
            return override
        return self.scores

    def key_dim(self, w: int) -> int:
        """Query/key width per head in the Monte Carlo: ``round(key_width · w/H)``."""
        return max(1, int(round(resolved(self.key_width) * w / self.heads)))

    def sample(self, x, ctx):
        from ...montecarlo import sampler as S
        b, n, w = x.shape
        h = self.heads
        mode = self.score_mode(ctx.scores)
        tape = ctx.tape

        def linear(inp, fan_out, var):
            if not tape:
                return S.project(ctx, inp, fan_out, var), None
            wt = S.weights(ctx, inp.shape[-1], fan_out, var)
            return np.matmul(inp, wt), wt

        v, wv = (x, None) if self.values == "identity" else linear(x, w, self.value_var)
        if self.values == "dense" and self.value_bias_var:     # one bias vector shared by all tokens
            v = v + ctx.normal((1, w)) * math.sqrt(self.value_bias_var)
        uses_a = self.beta != 0
        q = k = wq = wk = qs = ks = qnorm = knorm = rot = None
        dk = self.key_dim(w)
        scale = 1.0
        if uses_a and mode != "uniform":
            q, wq = linear(x, h * dk, self.qk_var)
            k, wk = (q, None) if mode == "tied" else linear(x, h * dk, 1.0)
            scale = 1.0 / (math.sqrt(dk) if mode == "standard" else dk)
            qs, ks = q, k         # what the scores see: normalised (gain² σ_qk² on the queries), then rotated
            if self.qk_norm != "none":
                qs, qnorm = _qk_normalise(q, h, self.qk_norm, math.sqrt(self.qk_var), ctx.where)
                ks, knorm = (qs, qnorm) if k is q else _qk_normalise(k, h, self.qk_norm, 1.0, ctx.where)
            if self.rope_theta is not None:
                n_rot, omegas = rope.mc_frequencies(self, dk, ctx.where)
                rot = (rope.positions(ctx.segments), omegas, n_rot)
                tied_keys = ks is qs
                qs = rope.rotate(qs, *rot, h)
                ks = qs if tied_keys else rope.rotate(ks, *rot, h)
        out = np.empty_like(v)
        segs = []
        for sl, t in zip(segment_slices(ctx.segments), ctx.segments):
            vh = _heads(v[:, sl], b, t, h)                                      # (B, H, t, dv)
            offsets, c = self._fixed_matrices(ctx, t, mode)
            y = np.zeros(vh.shape) if self.matrix == "softmax" else self.alpha * vh
            a = None
            if uses_a:
                if mode == "uniform" and self.attention == "softmax":
                    a = c
                else:
                    if mode == "uniform":
                        logits = np.zeros((1, 1, t, t))
                    else:
                        qh = _heads(qs[:, sl], b, t, h)
                        kh = qh if ks is qs else _heads(ks[:, sl], b, t, h)
                        logits = np.matmul(qh, np.swapaxes(kh, -1, -2)) * scale
                    if self.attention == "identity":
                        a = np.where(np.isfinite(offsets), logits + np.where(np.isfinite(offsets), offsets, 0.0), 0.0)
                        a = np.broadcast_to(a, (b, h, t, t))
                    else:
                        a = MX.softmax(logits + offsets)
                y += self.beta * np.matmul(a, vh)
            if self.matrix == "shaped" and self.gamma != 0:
                y -= self.gamma * np.matmul(c, vh)
            out[:, sl] = _unheads(y, b, t)
            segs.append((sl, t, vh, a, c, offsets))
        unit = self.projection == "dense" and self.is_unit("out_var")
        y, wo = (out, None) if self.projection == "identity" else linear(out, w, 1.0 if unit else self.out_var)
        bo = self.out_bias_var if self.projection == "dense" else 0.0
        if unit:            # σ_o² from the output at hand; the pullback sees the realised c·W_O
            if bo >= 1.0:
                raise SpecError(f"{ctx.where}.out_var", "unit", f"needs the added variance (here out_bias_var = "
                                f"{bo:g}) below 1: the output's mean variance cannot be brought to 1")
            c = np.sqrt((1.0 - bo) / np.maximum(np.mean(y * y, axis=(1, 2), keepdims=True), np.finfo(float).tiny))
            y = y * c
            wo = None if wo is None else wo * c
        if bo:
            y = y + ctx.normal((1, w)) * math.sqrt(bo)
        if not tape:
            return y, None
        # query-gradient norms in the engine's convention (montecarlo.backward docstring)
        bctx = ctx.bctx
        want_q = bctx is not None and not self.weight_free and ctx.scores is None
        keys = None
        if want_q and uses_a:
            keys = ks if mode != "uniform" else S.project(bctx, x, h * dk, self.qk_var)  # virtual keys at W_Q = 0
        data = dict(x=x, v=v, out=out, wv=wv, wo=wo, wq=wq, wk=wk, q=qs, k=ks, mode=mode, scale=scale, dk=dk,
                    segs=segs, want_q=want_q, keys=keys, path=ctx.path, d=ctx.width, qnorm=qnorm, knorm=knorm,
                    rot=rot)

        def pull(g, grads):
            return self._pullback(data, g, grads)
        pull.data = data          # type: ignore[attr-defined]  # the tape, for inspection
        return y, pull

    def _fixed_matrices(self, ctx, t, mode):
        """Bias-plus-mask offsets (H, t, t) and the fixed matrix C (zero-score softmax, or SPA), cached."""
        key = ("offsets", id(self.bias) if isinstance(self.bias, np.ndarray) else self.bias,
               self.alibi_scale, self.causal, self.heads, t)
        offsets = ctx.cache.get(key)
        if offsets is None:
            offsets = ctx.cache[key] = MX.logit_offsets(self, t, ctx.where)
        c = None
        if self.spa != "none":
            skey = ("spa", self.spa, self.spa_step, self.spa_layers, self.spa_final, self.causal, t)
            c = ctx.cache.get(skey)
            if c is None:   # built independently of the engine's SPA (closed forms): montecarlo.spa
                from ...montecarlo import spa as simulated_spa
                c = ctx.cache[skey] = simulated_spa.layer_matrix(self, t)      # (t, t), the same for every head
        elif self.attention == "softmax" and (mode == "uniform" or self.matrix == "shaped"):
            ckey = ("zero-score",) + key[1:]
            c = ctx.cache.get(ckey)
            if c is None:
                c = ctx.cache[ckey] = MX.softmax(offsets.copy())              # (H, t, t), seed-independent
        return offsets, c

    def _pullback(self, D, g, grads):
        """``G_X`` from ``G_Y``: values ``G_V = M_hᵀ G_O``, scores through the softmax Jacobian
        ``dS_i = (diag a_i − a_i a_iᵀ) dA_i`` (identity attention: ``dS = dA`` on the unmasked entries),
        queries/keys, output projection; appends the weight-gradient norms ``‖∂L/∂W‖²/d``."""
        from ...montecarlo.sampler import gram_dot
        b, n, w = g.shape
        h = self.heads
        mode, scale, path, d = D["mode"], D["scale"], D["path"], D["d"]
        if D["wo"] is not None:
            grads.append((path, "output", gram_dot(D["out"], g) / d))
            g = np.matmul(g, np.swapaxes(D["wo"], -1, -2))
        gv = np.empty_like(g)
        score_path = mode != "uniform" and D["q"] is not None
        gq = np.zeros_like(D["q"]) if score_path else None
        gk = np.zeros_like(D["k"]) if score_path and D["k"] is not D["q"] else None
        qrows = np.zeros((b, h, n, D["dk"])) if D["keys"] is not None else None   # dS_h K_h, block-diagonal dS
        for sl, t, vh, a, c, offsets in D["segs"]:
            go = _heads(g[:, sl], b, t, h)
            gvh = np.zeros(go.shape) if self.matrix == "softmax" else self.alpha * go
            if a is not None:
                gvh += self.beta * np.matmul(np.swapaxes(a, -1, -2), go)
            if self.matrix == "shaped" and self.gamma != 0:
                gvh -= self.gamma * np.matmul(np.swapaxes(c, -1, -2), go)
            gv[:, sl] = _unheads(gvh, b, t)
            if a is None or not (score_path or qrows is not None):
                continue
            da = self.beta * np.matmul(go, np.swapaxes(vh, -1, -2))           # ∂L/∂A_h
            if self.attention == "identity":
                ds = da * np.isfinite(offsets)
            else:
                # softmax Jacobian, row by row; SPA's A = D softmax(B + S):
                # dS_i = D_i J(p_i) dA_i = a_i ⊙ (dA_i − p_i·dA_i)
                p = a / np.sum(a, axis=-1, keepdims=True) if self.spa != "none" else a
                ds = a * (da - np.sum(p * da, axis=-1, keepdims=True))
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
        if gq is not None:     # from the vectors the scores saw back to X W_Q, X W_K: rotation, then norm
            gq = self._to_projection(gq, D["rot"], D["qnorm"])
            if gk is not None:
                gk = self._to_projection(gk, D["rot"], D["knorm"])
        if qrows is not None:
            if mode != "uniform" and (D["rot"] is not None or D["qnorm"] is not None):
                qrows = _heads(self._to_projection(_unheads(qrows, b, n), D["rot"], D["qnorm"]), b, n, h)
            rr = np.einsum("bhik,bhjk->bij", qrows, qrows)                      # Σ_h (dS K)(dS K)ᵀ
            xx = np.matmul(D["x"], np.swapaxes(D["x"], -1, -2))
            grads.append((path, "queries", np.einsum("bij,bij->b", xx, rr) / (D["dk"] * d)))
        elif D["want_q"]:
            grads.append((path, "queries", np.zeros(b)))                   # β = 0: no path through A
        if D["wv"] is not None:
            grads.append((path, "values", gram_dot(D["x"], gv) / d))
            gx = np.matmul(gv, np.swapaxes(D["wv"], -1, -2))
        else:
            gx = gv
        if gq is not None:
            gx = gx + np.matmul(gq, np.swapaxes(D["wq"], -1, -2))
        if gk is not None:
            gx = gx + np.matmul(gk, np.swapaxes(D["wk"], -1, -2))
        return gx

    def _to_projection(self, g, rot, norm):
        """Pull a gradient on the scored (normalised, rotated) queries or keys back to ``X W``: the inverse
        rotation (RoPE's transpose), then the exact QK-norm Jacobian."""
        if rot is not None:
            g = rope.rotate(g, *rot, self.heads, inverse=True)
        if norm is not None:
            g = _qk_norm_pull(g, norm, self.heads, self.qk_norm)
        return g

    def plan(self, width, where, plan):
        h = self.heads
        if width % h:
            raise SpecError(f"{where}.heads", h, f"must divide the width entering the layer ({width}); "
                            f"choose --width as a multiple of {h}")
        mode = self.score_mode(plan.scores)
        if self.spa != "none" and self.matrix == "shaped":
            raise SpecError(f"{where}.matrix", "shaped", "cannot be combined with spa")
        init = plan.init or "gaussian"
        if self.values == "dense":
            plan.add_weight(width, width, init)
        if self.projection == "dense":
            plan.add_weight(width, width, init)
        segments = plan.segments
        if self.beta != 0 and mode != "uniform":
            dk = self.key_dim(width)
            plan.add_weight(width, h * dk, init)
            if mode != "tied":
                plan.add_weight(width, h * dk, init)
            plan.flops += sum(t * t * dk * h for t in segments)
            if self.rope_theta is not None:
                rope.mc_frequencies(self, dk, where)     # d_k fits the rotary pairs (spec errors up front)
        plan.flops += 2 * sum(t * t * (width // h) * h for t in segments)
        t_max = max(segments)
        plan.max_scores = max(plan.max_scores, h * t_max * t_max)
        for t in set(segments):
            MX.logit_offsets(self, t, where)
            if self.spa != "none":
                from ...montecarlo import spa as simulated_spa
                simulated_spa.layer_matrix(self, t)   # its spec errors (negative entries, steps) up front
        return width

    # ------------------------------------------------------------------------------------------
    # symbolic

    def symbolic_map(self, s, ctx):
        """``Σ' = σ_v²σ_o² (1/H) Σ_h A_h Σ A_hᵀ``; weight-free (identity values and projection): ``m' = A m``."""
        from ...symbolic.maps import ZERO as SZERO
        from ...symbolic.maps import Dep, total
        if self.projection == "dense" and self.is_unit("out_var"):
            raise NotSupportedError(f"{ctx.where}: out_var = \"unit\" divides by the mean variance of the attention "
                                    "output, which the symbolic state does not carry; give a number or an expression")
        if self.scores == "standard":
            raise NotSupportedError(f"{ctx.where}: standard 1/sqrt(d_k) scores stay random at infinite width; "
                                    "their kernel E[A Σ Aᵀ] has no closed form (the numeric engine estimates it)")
        if self.spa != "none":
            raise NotSupportedError(f"{ctx.where}: SPA matrices come from Cholesky factors of the target kernels "
                                    "(methods.spa); they have no symbolic map")
        heads = self._symbolic_mixings(s, ctx)
        sigma = total(w * (m @ s.sigma @ m.t) for w, m in heads)
        fam = ctx.fam
        if self.weight_free:
            mean = total(m @ s.mean * w for w, m in heads)
            dep = s.dep
            if dep is not None and dep.kind == "matrix":
                if dep.headwise and len(heads) > 1:
                    raise NotSupportedError(f"{ctx.where}: two multi-head weight-free mixings with different head "
                                            "matrices in one residual branch; give the heads identical biases")
                p = total(w * (m @ dep.p) for w, m in heads)
                dep = Dep("matrix", p, headwise=dep.headwise or len(heads) > 1)
            return s.replace(sigma=sigma, mean=mean, dep=dep)
        sv = ctx.value(self, "value_var") if self.values == "dense" else 1
        so = ctx.value(self, "out_var") if self.projection == "dense" else 1
        sigma = sigma * (sv * so)
        if self.values == "dense" and self.value_bias_var != 0:     # M (σ_bv² 11ᵀ) Mᵀ, head-averaged
            ones = total(w * (m @ fam.ones() @ m.t) for w, m in heads)
            sigma = sigma + ones * (ctx.value(self, "value_bias_var") * so)
        if self.projection == "dense" and self.out_bias_var != 0:
            sigma = sigma + fam.ones() * ctx.value(self, "out_bias_var")
        return s.replace(sigma=sigma, mean=fam.vector(0), gaussian=True, dep=None if s.dep is None else SZERO)

    def _symbolic_score_kernel(self, s, ctx):
        """The kernel in the logits: Σ, or C under QK-norm; times ``ρ(j − i)`` (numeric) under RoPE."""
        import sympy as sp
        fam = ctx.fam
        k = s.sigma
        if self.qk_norm != "none":
            k = k.scale_both(k.diag().map(lambda v: 1 / sp.sqrt(v)))
        if self.rope_theta is None:
            return k
        if fam.mode != "explicit":
            raise NotSupportedError(f"{ctx.where}: RoPE makes the logits depend on the offset j − i, which breaks "
                                    "equicorrelation; use the explicit mode (mode=\"explicit\", CLI --explicit T)")
        values = {}
        for name in ("rope_theta", "rope_fraction"):
            v = ctx.value(self, name)
            if not getattr(v, "is_number", False):
                raise NotSupportedError(f"{ctx.where}: RoPE's ρ(Δ) is evaluated numerically; {name} must be a "
                                        f"number here, not {v}")
            values[name] = float(v)
        from ...symbolic.algebra import ExMatrix
        probe = dataclasses.replace(self, **values)
        pos = rope.positions(fam.segments)
        r = rope.layer_rho(probe, pos[None, :] - pos[:, None])
        n = len(pos)
        return ExMatrix(sp.Matrix(n, n, lambda i, j: k.m[i, j] * sp.Float(float(r[i, j]), 17)))

    def _symbolic_mixings(self, s, ctx):
        """``[(weight, M_h)]``: the zero-score, tied or identity matrix, then Value-SkipInit / shaped."""
        fam = ctx.fam
        out = []
        for weight, bias in fam.heads(self, ctx.value(self, "alibi_scale")):
            if self.attention == "identity":
                qk = ctx.value(self, "qk_var") if self.scores == "tied" else 0
                k = self._symbolic_score_kernel(s, ctx) if self.scores == "tied" else s.sigma
                out.append((weight, fam.linear(self, k, ctx.where, bias, qk)))
                continue
            c = fam.zero_score(self, ctx.where, bias) if self.scores == "uniform" or self.matrix == "shaped" else None
            if self.scores == "uniform":
                a = c
            else:  # tied 1/d scores σ_qk² Σ (Hron et al. 2020); C under QK-norm, ⊙ ρ(j − i) under RoPE
                a = fam.tied(self, self._symbolic_score_kernel(s, ctx), ctx.where, bias, ctx.value(self, "qk_var"))
            if self.matrix in ("value_skipinit", "shaped"):  # αI + βA (− γC)
                m = fam.eye() * ctx.value(self, "alpha") + a * ctx.value(self, "beta")
                if self.matrix == "shaped":
                    m = m - c * ctx.value(self, "gamma")
                a = m
            out.append((weight, a))
        return out

    def ntk_map(self, s, ctx):
        """NTK with the wide-limit mixings fixed (docs/theory.md §14): with ``M(X) = (1/H) Σ_h M_h X M_hᵀ``,
        ``Θ' = σ_v²σ_o² [M(Θ) + M(Σ)·(1 if values are weights) + M(Σ)·(1 if the projection is)]`` — the input's
        tangent through the mixings, and W_V's and W_O's own terms (Hron et al. 2020's ``A Θ Aᵀ + 2K'``).
        Zero-score, tied 1/d and identity-attention scores move by O(1/d) under 1/d scaling, so the query/key
        path drops; standard 1/sqrt(d_k) scores stay random at infinite width and are refused."""
        if self.scores == "standard" and self.beta != 0:
            raise NotSupportedError(
                f"{ctx.where}: the NTK of attention with standard 1/sqrt(d_k) scores is not available: the scores stay "
                "random at infinite width and their query/key tangent is O(1) and correlated with the random softmax, "
                "which the engine's score draws do not cover; use scores = \"tied\" or \"uniform\"")
        start = ctx.counter
        out, back = self.kernel_map(s, ctx)
        end, ctx.counter = ctx.counter, start
        heads = self.mixings(s.sigma, s.segments, ctx)       # the same draws as the kernel map (seeded per layer)
        ctx.counter = end

        def mixed(x):
            acc = None
            for w, m in heads:
                acc = w * m.kernel(x) if acc is None else axpy(acc, w, m.kernel(x))
            return acc
        theta = mixed(s.ntk)
        if self.weight_free:
            return out.replace(ntk=theta, ntk_error=s.ntk_error), back
        sv = self.value_var if self.values == "dense" else 1.0
        so = self.out_var if self.projection == "dense" else 1.0
        bv = self.value_bias_var if self.values == "dense" else 0.0
        bo = self.out_bias_var if self.projection == "dense" else 0.0
        base = mixed(s.sigma)
        ones = mixed(np.ones_like(s.sigma)) if bv else 0.0          # M(11ᵀ): the value bias through the mixing
        if self.projection == "dense" and self.is_unit("out_var"):
            so = unit_scale(base * sv + bv * ones, bo, f"{ctx.where}.out_var")
        # Θ through the mixing, W_V's own term, W_O's own term (its input's kernel, bias included), b_V's, b_O's
        theta = (sv * so) * theta
        if self.values == "dense":
            theta = theta + (sv * so) * base + (so * bv) * ones
        if self.projection == "dense":
            theta = theta + so * (sv * base + bv * ones) + bo
        own = (self.values == "dense") + (self.projection == "dense")
        return out.replace(ntk=theta, ntk_error=sv * so * (s.ntk_error + own * s.quad_error)), back


def _qk_normalise(x, h, kind, gain, where):
    """QK-norm per head over its d_k features: ``y = gain · x_c/s``, ``s² = mean(x_c²)`` (ε = 0), x_c centred for
    LayerNorm; returns y and what the pullback needs."""
    b, n, width = x.shape
    z = x.reshape(b, n, h, width // h)
    if kind == "layernorm":
        z = z - z.mean(axis=-1, keepdims=True)
    var = np.mean(z * z, axis=-1, keepdims=True)
    if not np.all(var > 0):
        raise NumericalError(where, f"a query or key vector is exactly 0 and qk_norm = \"{kind}\" divides by its "
                             "norm", "set qk_norm = \"none\", or fix the collapse upstream")
    inv = 1.0 / np.sqrt(var)
    xhat = z * inv
    return (gain * xhat).reshape(b, n, width), (xhat, inv, gain)


def _qk_norm_pull(g, stat, h, kind):
    """Exact transpose Jacobian of :func:`_qk_normalise`: ``P_c (gain/s)(G − x̂ (x̂·G)/d_k)`` per head."""
    xhat, inv, gain = stat
    b, n, width = g.shape
    gz = g.reshape(b, n, h, width // h)
    gx = gz - xhat * np.mean(xhat * gz, axis=-1, keepdims=True)
    gx = gx * (gain * inv)
    if kind == "layernorm":
        gx = gx - gx.mean(axis=-1, keepdims=True)
    return gx.reshape(b, n, width)


def _head_dependent(layer, heads) -> bool:
    """Whether the heads mix tokens differently for a fixed kernel (per-head biases: ALiBi or an H×T×T
    array). Random standard scores do not count (every head draws from the same law), nor shaped
    attention at zero scores, ``αI + β C_h − γ C_h = αI`` for β = γ."""
    if layer.heads == 1 or layer.bias is None or (not isinstance(layer.bias, str) and layer.bias.ndim == 2):
        return False
    same = [isinstance(m, MX.Combination) and m.a is m.c and bool(np.all(m.beta == m.gamma)) for _, m in heads]
    return not all(same)


def _heads(a, b, t, h):
    """(B, t, H·k) → (B, H, t, k)."""
    return a.reshape(b, t, h, -1).transpose(0, 2, 1, 3)


def _unheads(a, b, t):
    """(B, H, t, k) → (B, t, H·k)."""
    return a.transpose(0, 2, 1, 3).reshape(b, t, -1)


def _softmax_part(m, spa=False):
    """The softmax matrix inside a mixing, the weight of its Jacobian and the row scale D of SPA's
    ``A = D softmax(B + S)`` (He et al. 2023): (dense P, weight, D or None)."""
    if isinstance(m, MX.Combination):
        if not m.beta:
            return None, 0.0, None
        a, weight = m.a.dense(), m.beta ** 2
    else:
        a, weight = m.dense(), 1.0
    if not spa:
        return a, weight, None
    d = a.sum(axis=1)
    return a / d[:, None], weight, d


def _centred(sigma, segments):
    """``P Σ P`` with ``P`` the per-sequence centring ``I − 11ᵀ/T`` (block-diagonal).

    Every softmax Jacobian ``J_i = diag a_i − a_i a_iᵀ`` annihilates the constant vector on its sequence,
    so ``J_i Σ J_k = J_i (PΣP) J_k`` exactly; the centred form avoids the float64 cancellation of
    ``q²`` against ``q²(1 − ρ)²`` as tokens collapse (ρ → 1)."""
    out = np.array(sigma, dtype=np.result_type(sigma, np.float64))
    bounds = np.cumsum((0,) + tuple(segments or (sigma.shape[0],)))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out[lo:hi] -= out[lo:hi].mean(axis=0, keepdims=True)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out[:, lo:hi] -= out[:, lo:hi].mean(axis=1, keepdims=True)
    return out


def _ones_mixed(heads, n):
    """``(1/H) Σ_h (M_h 1)(M_h 1)ᵀ``: what a bias shared by all tokens becomes after the mixing (``11ᵀ`` per
    pair of sequences for softmax rows, which sum to 1; not for identity, Value-SkipInit or shaped matrices)."""
    out = np.zeros((n, n))
    for w, m in heads:
        r = m.left(np.ones((n, 1)))[..., 0]
        out = out + w * (r[..., :, None] * r[..., None, :])
    return out


def _rope_terms(rope_opt, n):
    """``[(c, u)]`` with ``ρ(δ) = Σ c cos(ω δ)`` and ``u = e^{iω t}`` per token (None for ω = 0)."""
    if rope_opt is None:
        return [(1.0, None)]
    c, w, pos = rope_opt
    return [(float(cf), None if wf == 0 else np.exp(1j * wf * pos)) for cf, wf in zip(c, w)]


def _trace_terms(a, inner, s2, ws, asa):
    """``T_ik = tr(J_i V J_k S₂)`` for ``J_i = diag a_i − a_i a_iᵀ``, V = ``inner`` (real symmetric, ``ws = aV``,
    ``asa = aVaᵀ``) and any ``S₂`` (Hermitian under RoPE)."""
    t1 = a @ (inner * s2.T) @ a.T
    t2 = (ws * (a @ s2.T)) @ a.T
    t3 = a @ (ws * (a @ s2)).T
    return t1 - t2 - t3 + asa * (a @ s2 @ a.T).T


def _key_terms(a, inner, w, ws, asa):
    """``Σ_ik W_ik J_i V J_k`` for any (complex, non-symmetric) W."""
    k1 = inner * (a.T @ w @ a)
    k2 = a.T @ (ws * (w @ a))
    k3 = ((a.T @ w) * ws.T) @ a
    return k1 - k2 - k3 + a.T @ (w * asa) @ a


def score_terms(heads, sigma, pi, with_pi: bool, spa: bool = False, segments=None, *, keys=None, rescale=None,
                rope=None):
    """Head-averaged terms through the softmax Jacobians ``J_i = diag a_i − a_i a_iᵀ`` (full N×N: a batch's
    query gradient sums over every token pair, cross-sequence ones included), with V = ``sigma`` the values'
    kernel, K = ``keys`` the queries'/keys' kernel (default V; C under QK-norm) and ``W = Π ⊙ K``:

    * ``q = (1/H) Σ_h Σ_ik W_ik T_ik``, ``T_ik = Σ_jl (J_i V J_k)_jl K_jl ρ((t_j − t_i) − (t_l − t_k))`` (``ρ ≡ 1``
      without RoPE: ``T_ik = tr(J_i V J_k K)``) — the query-gradient norm per unit key variance;
    * if ``with_pi``, ``(1/H) Σ_h r r ⊙ [Π ⊙ T + Σ_ik W_ik (J_i V J_k) ⊙ ρ(…)]`` — the gradient kernel that
      1/sqrt(d_k) scores send back through queries and keys (O(1/d) for zero or tied 1/d scores), with
      ``r = rescale`` (``1/√Σ_ii`` under QK-norm, else 1). O(N³) per head and RoPE frequency.

    ``rope = (c, ω, t)``: ``ρ(δ) = Σ_n c_n cos(ω_n δ)`` on the offsets met, t the token positions; each term is
    the ρ ≡ 1 formula with ``K → diag(ū) K diag(u)`` and phases ``ū_i u_k`` (``u = e^{iωt}``).
    SPA (``spa``): ``A = D softmax(B + S)``, so ``dS_i = D_i J(p_i) dA_i`` and ``W_ik`` carries ``D_i D_k``.
    The matrices between Jacobians are centred per sequence (``segments``; one sequence if None), see
    :func:`_centred`.
    """
    keys = sigma if keys is None else keys
    total, extra = 0.0, (np.zeros_like(pi) if with_pi else None)
    inner = _centred(sigma, segments)
    terms = _rope_terms(rope, len(sigma))
    kbs = [(c, u, _centred(keys if u is None else np.conj(u)[:, None] * keys * u[None, :], segments))
           for c, u in terms]
    for w, m in heads:
        a, weight, d = _softmax_part(m, spa)
        if a is None:
            continue
        ws = a @ inner
        asa = ws @ a.T
        wpi = pi * keys if d is None else pi * keys * np.outer(d, d)
        t = np.zeros_like(pi)
        k2 = np.zeros_like(pi) if with_pi else None
        for c, u, kb in kbs:
            if u is None:
                t += c * _trace_terms(a, inner, kb, ws, asa)
                if with_pi:
                    k2 += c * _key_terms(a, inner, wpi, ws, asa)
                continue
            phase = np.conj(u)[:, None] * u[None, :]
            t += c * np.real(phase * _trace_terms(a, inner, kb, ws, asa))
            if with_pi:
                k2 += c * np.real(u[:, None] * _key_terms(a, inner, wpi * phase, ws, asa) * np.conj(u)[None, :])
        total += w * weight * float(np.sum(wpi * t))
        if with_pi:
            extra += (w * weight) * (pi * t + k2)
    if with_pi and rescale is not None:
        extra *= np.outer(rescale, rescale)
    return total, extra


def _identity_score_term(sigma, pi, segments, causal, keys=None, rescale=None, rope=None):
    """The query-gradient norm per unit key variance for identity attention (``J_i`` = the identity on the
    keys query i sees): ``Σ_ik (Π ⊙ K)_ik T_ik`` with ``T_ik = Σ_jl M_ij M_kl V_jl K_jl ρ(…)`` (M the 0/1 mask,
    V = ``sigma`` the values' kernel, not centred: no softmax removes constants; K = ``keys``)."""
    keys = sigma if keys is None else keys
    n = sigma.shape[0]
    mask = np.zeros((n, n))
    for sl in segment_slices(segments):
        t = sl.stop - sl.start
        mask[sl, sl] = np.tril(np.ones((t, t))) if causal else 1.0
    total = np.zeros((n, n))
    for c, u in _rope_terms(rope, n):
        if u is None:
            total += c * (mask @ (sigma * keys) @ mask.T)
        else:
            kb = np.conj(u)[:, None] * keys * u[None, :]
            total += c * np.real(np.conj(u)[:, None] * (mask @ (sigma * kb.T) @ mask.T) * u[None, :])
    return float(np.sum(pi * keys * total))
