"""Covariance SDEs of the proportional depth-width limit (docs/theory.md §16).

The state is the N×N token covariance ``V = X Xᵀ/n`` of a width-n network; one block changes it by
``O(1/n)`` in mean and ``O(1/sqrt n)`` in fluctuation, so with time ``t = ℓ/n`` (block ℓ, final time
``T = depth/width``) the chain of covariances is described by an Itô SDE

    dV = b(V) dt + (noise with Cov(dV_ab, dV_cd) = Σ_{ab,cd}(V) dt)

(Li, Nica & Roy 2022, "The Neural Covariance SDE"; Noci et al. 2023, "The Shaped Transformer").
Two block types, each the exact kernelprop network given by its ``network(width, depth)``:

* :class:`ResidualMLP` — ``x ← λx + γ·φ(x W₁) W₂`` with ``W_k ~ N(0, σ_k²/n)``. Drift
  ``b = n[(λ² − 1)V + γ²σ₂² K_φ(σ₁²V)]`` (K_φ the activation's kernel map; exact mean change per block).
  Noise, three independent parts: the skip-branch cross term ``λγσ₂·sym(L_V dB L_Kᵀ)``, the Wishart
  fluctuation of W₂, ``γ²σ₂²·sym(L_K dB L_Kᵀ)/√2``, and the fluctuation of the activations' Gram,
  ``γ²σ₂²·Σ_j r_j(φ_jφ_jᵀ − K)√(dt/m)`` over m = 8 Gaussian feature vectors with random signs r_j
  (its covariance is the exact four-point function ``E[φ_aφ_bφ_cφ_d] − K_ab K_cd``). For φ = identity
  (or a shaped activation, at leading order) this is ``Cov = c(V_ac V_bd + V_ad V_bc)`` with
  ``c = 2λ²γ²σ² + 2γ⁴σ⁴``, σ² = σ₁²σ₂²; ``c = 2γ²`` when ``λ² + γ² = 1`` and σ² = 1.
* :class:`ShapedTransformer` — ``x ← λx + γ·concat_h(A_h X W_V,h)[W_O]`` with the shaped attention
  ``A_h = I + softmax(S_h) − C`` (C the zero-score matrix) and standard scores at temperature
  ``τ = τ₀ sqrt(n)`` on top of 1/sqrt(d_k), i.e. ``qk_var = 1/(τ₀² n)``. With ``Z`` the unit scores,
  ``P₁ = row-centred Z / T_a`` and ``P₂`` the second-order softmax term, the drift is
  ``n(λ² + γ²σ² − 1)V + (γ²σ²/τ₀²) D(V)`` with ``D = E[P₂V + VP₂ᵀ + P₁VP₁ᵀ]`` (closed form below) and
  the noise is the Wishart part ``c = 2λ²γ²σ² + kγ⁴σ⁴`` (k = 1, or 2 with the output projection) plus
  the attention part ``(γ²σ²/(τ₀ sqrt H))(P₁(Ξ)V + VP₁(Ξ)ᵀ)``, ``Ξ = L dB Lᵀ``.

Integration: Euler–Maruyama in t with ``steps`` steps (weak order 1). With ``steps = depth`` each step
has exactly the mean and covariance of one block's change. A step that leaves the positive
semi-definite cone raises :class:`~kernelprop.errors.NumericalError` (more steps is the remedy);
``sym(Y) = Y + Yᵀ``, ``L Lᵀ = V``, ``dB`` an N×N matrix of independent ``N(0, dt)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import NumericalError, SpecError
from ..inputs import Inputs
from ..layers.activation import Activation
from ..layers.attention import Attention
from ..layers.composite import Residual, Serial
from ..layers.dense import Dense
from ..network.network import Network

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
MEASURES = {
    "q_mean": "mean_i V_ii",
    "q_min": "smallest V_ii",
    "q_max": "largest V_ii",
    "cos_mean": "mean off-diagonal cosine V_ab/sqrt(V_aa V_bb)",
    "cos_min": "smallest off-diagonal cosine",
    "rank_one_distance": "tr(PV)/tr(V), P = I − 11ᵀ/N",
}
_EXPLODED = 1e4     # a path whose trace of V passes this many times N has exploded
_MAX_SCORE = 1.0    # largest score standard deviation for which the softmax expansion is kept
_FEATURES = 8       # feature vectors per step for the activations' Gram noise of ResidualMLP
_MAX_SHARE = 0.01   # largest share of paths allowed beyond that
_MAX_STEP = 0.35     # largest relative change of V allowed in one step: drift plus one noise s.d.


def _positive(name, v, allow_zero=False):
    ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v < 0 or (v == 0 and not allow_zero):
        raise SpecError(name, v, "must be a finite number " + (">= 0" if allow_zero else "> 0"))
    return float(v)


def _whole(name, v, minimum):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise SpecError(name, v, f"must be a whole number >= {minimum}")
    return int(v)


def _sym(y):
    return y + np.swapaxes(y, -1, -2)


def _sqrt_psd(v):
    """Symmetric square roots of a (P, N, N) batch and its smallest eigenvalues."""
    w, u = np.linalg.eigh(v)
    return (u * np.sqrt(np.clip(w, 0.0, None))[:, None, :]) @ np.swapaxes(u, -1, -2), w[:, 0]


def _wishart(l_a, db, l_b=None):
    """``L_a dB L_bᵀ`` (L_b = L_a by default): covariance ``V_ac V'_bd dt`` entrywise."""
    return l_a @ db @ np.swapaxes(l_a if l_b is None else l_b, -1, -2)


@dataclass(frozen=True)
class ResidualMLP:
    """``x ← skip·x + branch·γ_φ φ(α_φ x W₁) W₂`` (Li, Nica & Roy 2022 with a skip; docs/theory.md §16.1).

    ``activation`` is a kernelprop :class:`~kernelprop.layers.Activation` (its ``input_shift`` and ``offset``
    must be 0); ``w1_var``/``w2_var`` are σ₁², σ₂². Two scalings have an SDE limit: a shaped activation
    (φ = identity + O(1/sqrt n), e.g. :func:`shaped_relu`) with ``skip² + branch²σ² = 1``, and a
    branch weight ``branch ∝ 1/sqrt(depth)``, whose diffusion is O(1/n) (deterministic limit).
    """

    skip: float = 1.0
    branch: float = 1.0
    activation: Activation = field(default_factory=lambda: Activation("identity"))
    w1_var: float = 1.0
    w2_var: float = 1.0
    name = "residual_mlp"

    def __post_init__(self):
        _positive("skip", self.skip, allow_zero=True)
        _positive("branch", self.branch)
        _positive("w1_var", self.w1_var)
        _positive("w2_var", self.w2_var)
        if not isinstance(self.activation, Activation):
            raise SpecError("activation", self.activation, "must be a kernelprop Activation layer")
        g, a, b, d = self.activation.transform()
        if b != 0.0 or d != 0.0:
            raise SpecError("activation.input_shift", b if b else d, "the SDE needs input_shift = offset = 0 "
                            "(a zero-mean-free branch input); fold them into a Dense bias-free form")

    def network(self, width: int, depth: int) -> Network:
        """The kernelprop network this SDE describes (``width`` is not used: no width-dependent field)."""
        branch = Serial(Dense(weight_var=self.w1_var), self.activation, Dense(weight_var=self.w2_var))
        return Network(block=Serial(Residual(branch, alpha=self.skip, beta=self.branch)), depth=depth,
                       name="residual MLP (covariance SDE)")

    def _kernel(self, v):
        g, a, _, _ = self.activation.transform()
        k, _, _ = self.activation.inner_kernel(self.w1_var * v)
        return g * g * np.asarray(k)

    def drift(self, v, width):
        """``n[(λ² − 1)V + γ²σ₂² K_φ(σ₁²V)]``: the exact mean change of V in one block, per unit t."""
        lam, gam = self.skip, self.branch
        return width * ((lam * lam - 1.0) * v + gam * gam * self.w2_var * self._kernel(v))

    @staticmethod
    def draw(rng, p, n):
        """The random numbers of one step: two N×N standard normal matrices, ``_FEATURES`` standard normal
        feature vectors and as many random signs (Euler–Maruyama), a seed for the PSD step's features."""
        return {"m": rng.standard_normal((2, p, n, n)), "u": rng.standard_normal((_FEATURES, p, n)),
                "s": rng.choice((-1.0, 1.0), size=(_FEATURES, p)), "seed": rng.integers(2 ** 63)}

    def _gram_noise(self, l_v, k, z):
        """``Σ_j r_j(φ_jφ_jᵀ − K)/sqrt(m)`` over m feature vectors ``u_j ~ N(0, σ₁²V)`` with random signs
        r_j: covariance ``E[φ_aφ_bφ_cφ_d] − K_ab K_cd`` (the exact four-point function), odd moments 0."""
        g, a, _, _ = self.activation.transform()
        u = math.sqrt(self.w1_var) * np.einsum("pij,fpj->fpi", l_v, z["u"])
        f = g * np.asarray(self.activation.pointwise()(a * u), dtype=float)
        terms = z["s"][:, :, None, None] * (f[..., :, None] * f[..., None, :] - k)
        return terms.sum(axis=0) / math.sqrt(len(f))

    def step_noise(self, v, l_v, dt, z):
        lam, gam, s2 = self.skip, self.branch, self.w2_var
        k = self._kernel(v)
        l_k, _ = _sqrt_psd(k)
        sq = math.sqrt(dt)
        out = lam * gam * math.sqrt(s2) * _sym(_wishart(l_v, z["m"][0] * sq, l_k))
        out += gam * gam * s2 / math.sqrt(2.0) * _sym(_wishart(l_k, z["m"][1] * sq))
        out += gam * gam * s2 * sq * self._gram_noise(l_v, k, z)
        return out

    def step(self, v, l_v, width, h, z):
        """One step kept in the PSD cone (docs/theory.md §16.3). With ``b = λγσ₂``, ``λ_h² = 1 + hn(λ² − 1)``
        (λ² exactly when h = 1/n) and ``A = nγ²σ₂² − b²N/λ_h²``:
        ``V' = Y Yᵀ + x L_F(I + (w/x) dB₂)(I + (w/x) dB₂)ᵀ L_Fᵀ`` with ``Y = λ_h L_V + (b/λ_h) L_K dB₁ᵀ``
        (the skip-branch cross noise; its extra mean b²N h K/λ_h² is what A takes off), ``F`` the Gram of
        ``m = round(hA²/(γ⁴σ₂⁴))`` activation vectors ``φ(u_j)``, ``u_j ~ N(0, σ₁²V)`` (mean K, covariance
        ``(E[φφφφ] − KK)/m``: the activations' Gram noise), ``w = γ²σ₂²/√2`` (the W₂ Wishart noise) and
        ``x + w²Nh/x = hA`` (mean kept). Every term is PSD; mean and covariance match Euler–Maruyama to
        O(h²) up to the rounding of m (relative variance error ≤ 1/(2m))."""
        lam, gam, s2 = self.skip, self.branch, self.w2_var
        p, n, _ = v.shape
        k = self._kernel(v)
        l_k, _ = _sqrt_psd(k)
        m = z["m"] * math.sqrt(h)
        b = lam * gam * math.sqrt(s2)
        keep = 1.0 + h * width * (lam * lam - 1.0)
        if keep <= 0.0:
            raise SpecError("steps", f"step {h:.3g}", f"a step longer than 1/(n(1 − skip²)) = "
                            f"{1 / (width * (1 - lam * lam)):.3g} leaves the PSD cone: use more steps or "
                            "scheme = \"em\"")
        y = math.sqrt(keep) * l_v + b / math.sqrt(keep) * l_k @ np.swapaxes(m[0], -1, -2)
        out = y @ np.swapaxes(y, -1, -2)
        big_a = width * gam * gam * s2 - b * b * n / keep
        w = gam * gam * s2 / math.sqrt(2.0)
        disc = (h * big_a) ** 2 - 4.0 * w * w * n * h
        if big_a <= 0 or disc < 0:
            raise SpecError("steps", f"step {h:.3g}", "too short for the PSD step at this width (the branch "
                            "noise exceeds its mean): use fewer steps or scheme = \"em\"")
        x = 0.5 * (h * big_a + math.sqrt(disc))
        feats = max(1, int(round(h * big_a ** 2 / (gam * gam * s2) ** 2)))
        g, a, _, _ = self.activation.transform()
        u = np.random.default_rng(z["seed"]).standard_normal((p, n, feats))
        f = g * np.asarray(self.activation.pointwise()(a * math.sqrt(self.w1_var) * (l_v @ u)), dtype=float)
        l_f, _ = _sqrt_psd(f @ np.swapaxes(f, -1, -2) / feats)
        c = l_f @ (np.eye(n) + (w / x) * m[1])
        return out + x * (c @ np.swapaxes(c, -1, -2))

    limit_text = "trace of V beyond 1e4 per token"
    remedy = ""

    def beyond(self, v, width):
        return np.zeros(len(v), dtype=bool)

    def noise_scale(self, v):
        """``c`` of ``Cov = c(V⊗V)`` for φ ≈ identity: the size of the relative noise per unit t."""
        s = self.w1_var * self.w2_var
        return 2 * self.skip ** 2 * self.branch ** 2 * s + 2 * self.branch ** 4 * s * s


def shaped_relu(width: int, c: float = 1.0) -> Activation:
    """Shaped ReLU (Li, Nica & Roy 2022): slopes ``s_± = 1 ± c/sqrt(n)``, i.e. ``φ(x) = x + (c/sqrt n)|x|``,
    as a kernelprop leaky ReLU ``s₊·leaky(x; s₋/s₊)``. Its kernel is exactly
    ``K = V + (c²/n) E|g_a||g_b|`` (the O(1/sqrt n) term vanishes by symmetry), so a block with
    ``skip² + branch² = 1`` changes V by O(1/n)."""
    _whole("width", width, 2)
    eps = _positive("c", c, allow_zero=True) / math.sqrt(width)
    if eps >= 1.0:
        raise SpecError("width", width, f"the shaped slopes 1 ± c/sqrt(n) must be positive: raise the width above "
                        f"c² = {c * c:.3g}")
    return Activation("leaky_relu", params={"slope": (1.0 - eps) / (1.0 + eps)}, scale=1.0 + eps)


@dataclass(frozen=True)
class ShapedTransformer:
    """``x ← skip·x + branch·concat_h(A_h X W_V,h)[W_O]``, shaped attention ``A_h = I + softmax(S_h) − C``
    (Noci et al. 2023; docs/theory.md §16.2).

    Scores: independent queries and keys, ``S = q·k/sqrt(d_k)`` with ``qk_var = 1/(τ₀² n)``, i.e. the
    temperature ``τ₀ sqrt(n d_k)`` of the paper. ``value_var`` σ_v²; ``projection`` adds the output
    projection W_O with variance ``out_var`` (σ² = σ_v²σ_o²). The limit needs ``skip² + branch²σ² = 1``
    (else the drift carries ``n(skip² + branch²σ² − 1)V``).
    """

    tau0: float = 1.0
    skip: float = math.sqrt(0.5)
    branch: float = math.sqrt(0.5)
    heads: int = 1
    causal: bool = False
    value_var: float = 1.0
    projection: bool = False
    out_var: float = 1.0
    name = "shaped_transformer"

    def __post_init__(self):
        _positive("tau0", self.tau0)
        _positive("skip", self.skip, allow_zero=True)
        _positive("branch", self.branch)
        _positive("value_var", self.value_var)
        _positive("out_var", self.out_var)
        _whole("heads", self.heads, 1)
        if not isinstance(self.causal, bool):
            raise SpecError("causal", self.causal, "must be true or false")

    @property
    def sigma2(self) -> float:
        return self.value_var * (self.out_var if self.projection else 1.0)

    def attention(self, width: int) -> Attention:
        return Attention(heads=self.heads, scores="standard", causal=self.causal, matrix="shaped",
                         qk_var=1.0 / (self.tau0 ** 2 * width), value_var=self.value_var,
                         out_var=self.out_var if self.projection else 1.0,
                         projection="dense" if self.projection else "identity")

    def network(self, width: int, depth: int) -> Network:
        """The kernelprop network this SDE describes (its ``qk_var`` depends on the width)."""
        _whole("width", width, 1)
        return Network(block=Serial(Residual(self.attention(width), alpha=self.skip, beta=self.branch)), depth=depth,
                       name="shaped transformer (covariance SDE)")

    def _centring(self, n):
        """``R[a]``: row a's first-order softmax map ``z ↦ (z − mean_{S_a} z)/T_a`` on its allowed set S_a."""
        r = np.zeros((n, n, n))
        for a in range(n):
            m = a + 1 if self.causal else n
            r[a, :m, :m] = (np.eye(m) - 1.0 / m) / m
        return r

    def _parts(self, v):
        """``(G, E[P₂])`` for unit scores with ``Cov(Z_ab, Z_cd) = V_ac V_bd``: ``E[P₁VP₁ᵀ] = V ∘ G`` with
        ``G_ac = tr(R_aᵀ V R_c V)``; ``E[P₂]_ab = (E[Zc_ab²] − mean_{S_a} E[Zc²])/(2T_a)`` on S_a with
        ``E[Zc_ab²] = V_aa (J_a V J_a)_bb``, ``J_a = T_a R_a`` the centring on S_a."""
        n = v.shape[-1]
        r = self._centring(n)
        mask = np.array([[b <= a or not self.causal for b in range(n)] for a in range(n)], dtype=float)
        tsize = mask.sum(axis=1)
        vr = np.einsum("pij,ajk->paik", v, r)                   # V R_a
        rv = np.einsum("cij,pjk->pcik", r, v)                   # R_c V
        g = np.einsum("paji,pcji->pac", vr, rv)                 # tr(R_aᵀ V R_c V)
        jvj = np.einsum("aib,paib->pab", r, vr) * (tsize ** 2)[None, :, None]
        e2 = np.einsum("paa->pa", v)[:, :, None] * jvj * mask
        p2 = (e2 - (e2.sum(axis=2) / tsize)[:, :, None] * mask) / (2.0 * tsize)[None, :, None]
        return g, p2

    def drift(self, v, width):
        """``n(λ² + γ²σ² − 1)V + (γ²σ²/τ₀²) D(V)``, ``D = E[P₁VP₁ᵀ + P₂V + VP₂ᵀ]`` (see :meth:`_parts`)."""
        lam, gam, s2 = self.skip, self.branch, self.sigma2
        g, p2 = self._parts(v)
        p2v = p2 @ v
        d = v * g + p2v + np.swapaxes(p2v, -1, -2)
        return width * (lam * lam + gam * gam * s2 - 1.0) * v + gam * gam * s2 / self.tau0 ** 2 * d

    def draw(self, rng, p, n):
        """The standard normals of one step: 3 (or 4 with the projection) N×N matrices."""
        return {"m": rng.standard_normal((4 if self.projection else 3, p, n, n))}

    def _coefficients(self):
        lam, gam, s2 = self.skip, self.branch, self.sigma2
        wish = [lam * gam * math.sqrt(s2)] + [gam * gam * s2 / math.sqrt(2.0)] * (2 if self.projection else 1)
        return wish, gam * gam * s2 / (self.tau0 * math.sqrt(self.heads))

    def step_noise(self, v, l_v, dt, z):
        """Euler–Maruyama noise: ``sym(L dM Lᵀ) + sym(P₁(Ξ) V)``, ``dM = Σ_j w_j dB_j`` (Wishart parts),
        ``Ξ = L dB Lᵀ`` (attention part)."""
        wish, att = self._coefficients()
        m = z["m"] * math.sqrt(dt)
        dm = sum(w * m[j] for j, w in enumerate(wish))
        out = _sym(_wishart(l_v, dm))
        p1 = np.einsum("pab,abc->pac", _wishart(l_v, m[-1]), self._centring(v.shape[-1]))
        return out + att * _sym(p1 @ v)

    def step(self, v, l_v, width, h, z):
        """One positive semi-definite step (docs/theory.md §16.3): with ``dM`` and ``P₁`` as in
        :meth:`step_noise` and ``B = (γ²σ²/τ₀²) E[P₂]``,
        ``V' = e^{hα}/(1 + c_M N h) · (I + P₁)(I + hB) L(I + dM)(I + dM)ᵀLᵀ (I + hB)ᵀ(I + P₁)ᵀ
        + h(γ²σ²/τ₀²)(1 − γ²σ²/H) V∘G``, α = n(λ² + γ²σ² − 1), ``E[dM dMᵀ] = c_M N h I``. Its mean and
        covariance differ from Euler–Maruyama's by O(h²) per step (weak order 1), and V' is PSD whenever
        ``γ²σ² ≤ H``."""
        wish, att = self._coefficients()
        lam, gam, s2 = self.skip, self.branch, self.sigma2
        p, n, _ = v.shape
        m = z["m"] * math.sqrt(h)
        eye = np.eye(n)
        f = eye + sum(w * m[j] for j, w in enumerate(wish))
        c_m = sum(w * w for w in wish)
        g, p2 = self._parts(v)
        y = (eye + h * gam * gam * s2 / self.tau0 ** 2 * p2) @ l_v @ f
        p1 = att * np.einsum("pab,abc->pac", _wishart(l_v, m[-1]), self._centring(n))
        y = (eye + p1) @ y
        alpha = width * (lam * lam + gam * gam * s2 - 1.0)
        scale = math.exp(h * alpha) / (1.0 + c_m * n * h)
        rest = h * gam * gam * s2 / self.tau0 ** 2 * (1.0 - gam * gam * s2 / self.heads)
        return scale * (y @ np.swapaxes(y, -1, -2)) + rest * (v * g)

    limit_text = ("attention scores of standard deviation max_a V_aa/(τ₀ sqrt n) above 1, or a trace beyond 1e4 "
                  "per token")
    remedy = ", raise tau0, or raise the width"

    def beyond(self, v, width):
        """Paths whose scores have a standard deviation ``max_a V_aa/(τ₀ sqrt n)`` above 1, where the
        second-order expansion of the softmax behind the drift and diffusion no longer holds."""
        with np.errstate(invalid="ignore"):
            return np.einsum("pii->pi", v).max(axis=1) / (self.tau0 * math.sqrt(width)) > _MAX_SCORE

    def noise_scale(self, v):
        s2 = self.sigma2
        k = 2 if self.projection else 1
        return 2 * self.skip ** 2 * self.branch ** 2 * s2 + k * self.branch ** 4 * s2 * s2 \
            + 4 * self.branch ** 4 * s2 * s2 / (self.tau0 ** 2 * self.heads)


MODELS = (ResidualMLP, ShapedTransformer)
_COVERED = ("a network whose block is one Residual(alpha=λ, beta=γ ≥ 0) around either Attention(scores=\"standard\", "
            "matrix=\"shaped\", qk_var=1/(τ₀² width), no bias/RoPE/QK-norm/biases) or Dense, Activation, Dense (no "
            "biases), with no stem, final layers or shared weights: the networks ShapedTransformer/ResidualMLP.network "
            "build")


def model_of(network: Network, width: int):
    """The :class:`ShapedTransformer` or :class:`ResidualMLP` whose ``network(width, depth)`` is ``network``
    (SpecError naming what does not fit otherwise)."""
    _whole("width", width, 1)
    if not isinstance(network, Network):
        raise SpecError("model", type(network).__name__, "must be a ResidualMLP, a ShapedTransformer or a Network")
    if len(network.stem) or len(network.final) or network.shared_weights:
        raise SpecError("network", network.name or "network", "has a stem, final layers or shared weights; the SDE "
                        "covers " + _COVERED)
    first, last = (_block_model(network.block.resolve(network.env(l)), width) for l in (1, max(network.depth, 1)))
    if first != last:
        raise SpecError("network.block", f"{first} in block 1, {last} in block {network.depth}",
                        "the SDE needs the same block at every depth")
    return first


def _block_model(first, width):
    if len(first) != 1 or not isinstance(first.layers[0], Residual):
        raise SpecError("network.block", repr(first)[:80], "the SDE covers " + _COVERED)
    res = first.layers[0]
    lam, gam, parts = float(res.alpha), float(res.beta), res.branch.layers
    if len(parts) == 1 and isinstance(parts[0], Attention):
        a = parts[0]
        plain = (a.scores == "standard" and a.matrix == "shaped" and (a.alpha, a.beta, a.gamma) == (1.0, 1.0, 1.0)
                 and a.bias is None and a.rope_theta is None and a.qk_norm == "none" and a.values == "dense"
                 and a.attention == "softmax" and a.spa == "none" and not a.value_bias_var and not a.out_bias_var
                 and not a.is_unit("out_var") and float(a.qk_var) > 0)
        if plain:
            return ShapedTransformer(tau0=1.0 / math.sqrt(float(a.qk_var) * width), skip=lam, branch=gam,
                                     heads=int(a.heads), causal=bool(a.causal), value_var=float(a.value_var),
                                     projection=a.projection == "dense",
                                     out_var=float(a.out_var) if a.projection == "dense" else 1.0)
    if (len(parts) == 3 and isinstance(parts[0], Dense) and isinstance(parts[1], Activation)
            and isinstance(parts[2], Dense)
            and all(not d.bias_var and float(d.width_factor) == 1.0 and not d.is_unit("weight_var")
                    for d in (parts[0], parts[2]))):
        return ResidualMLP(skip=lam, branch=gam, activation=parts[1], w1_var=float(parts[0].weight_var),
                           w2_var=float(parts[2].weight_var))
    raise SpecError("network.block", repr(first)[:80], "the SDE covers " + _COVERED)


@dataclass(frozen=True, eq=False)
class SDETrajectory:
    """Result of :func:`sde_trajectory`: at every record time ``t[r]`` (block ``t·width``), the path mean,
    standard deviation, standard error ``sd/sqrt(paths)`` and quantiles (``QUANTILES``) of each measure;
    ``samples[name]`` holds the per-path values (paths, R; NaN once a path has stopped), ``stopped[r]`` the
    share of stopped paths (at most 1%, else NumericalError), ``kernel_mean`` the mean covariance (R, N, N)."""

    t: np.ndarray
    blocks: np.ndarray
    mean: dict
    sd: dict
    stderr: dict
    quantiles: dict
    samples: dict
    kernel_mean: np.ndarray
    model: object
    width: int
    depth: int
    steps: int
    paths: int
    stopped: np.ndarray
    meta: dict = field(default_factory=dict)


def measures(v: np.ndarray) -> dict:
    """The :data:`MEASURES` of a (P, N, N) batch of covariances, each a (P,) array."""
    n = v.shape[-1]
    diag = np.einsum("pii->pi", v)
    out = {"q_mean": diag.mean(axis=1), "q_min": diag.min(axis=1), "q_max": diag.max(axis=1)}
    d = np.sqrt(np.clip(diag, 1e-300, None))
    cos = np.clip(v / d[:, :, None] / d[:, None, :], -1.0, 1.0)
    if n > 1:
        off = ~np.eye(n, dtype=bool)
        out["cos_mean"] = cos[:, off].mean(axis=1)
        out["cos_min"] = cos[:, off].min(axis=1)
    else:
        out["cos_mean"] = out["cos_min"] = np.ones(len(v))
    tr = diag.sum(axis=1)
    out["rank_one_distance"] = np.clip(tr - v.sum(axis=(1, 2)) / n, 0.0, None) / tr
    return out


def check_step(model, v0, width, steps, horizon):
    """SpecError unless one step of size ``horizon/steps`` changes V by less than 0.35 of its size (drift plus
    one noise standard deviation), and unless one block (dt = 1/width) changes it by less than that too."""
    drift = model.drift(v0[None], width)[0]
    scale = max(float(np.abs(v0).max()), 1e-300)
    c = model.noise_scale(v0)
    for dt, what in ((1.0 / width, "block"), (horizon / steps, "step")):
        size = dt * float(np.abs(drift).max()) / scale + math.sqrt(c * dt)
        if size <= _MAX_STEP:
            continue
        if what == "block":
            raise SpecError("width", width, f"one block changes the covariance by about {size:.2g} of its size "
                            f"(more than {_MAX_STEP}): the proportional limit needs small per-block changes; raise "
                            "the width, use a shaped activation/attention with skip² + branch²σ² = 1, or scale the "
                            "branch as 1/sqrt(depth)")
        need = int(math.ceil(steps * (size / _MAX_STEP) ** 2))
        raise SpecError("steps", steps, f"a step of dt = {horizon / steps:.3g} changes the covariance by about "
                        f"{size:.2g} of its size (more than {_MAX_STEP}): use at least steps = {need}")


def sde_trajectory(model, inputs: Inputs, width: int, depth: int, *, paths: int = 1000,
                   steps: int | None = None, dt: float | None = None, records: int = 20,
                   scheme: str = "auto", seed: int = 0) -> SDETrajectory:
    """Integrate the covariance SDE of ``model`` (a :class:`ResidualMLP` or :class:`ShapedTransformer`,
    describing ``model.network(width, depth)``, or such a Network itself: :func:`model_of`) from the input
    kernel over ``t ∈ [0, depth/width]``: ``paths`` independent paths, ``steps`` steps (or a step ``dt``;
    default: one step per block). Records at ``records + 1`` evenly spaced times (rounded to steps).
    ``scheme``: ``"psd"`` (default; the step of docs/theory.md §16.3, PSD by construction) or ``"em"``
    (plain Euler–Maruyama); ``"auto"`` is ``"psd"``. Paths that leave the SDE's range are stopped
    (:func:`_em_step`); per-path values, mean, s.d., standard error and quantiles of every measure.
    """
    if isinstance(model, Network):
        model = model_of(model, width)
    if not isinstance(model, MODELS):
        raise SpecError("model", type(model).__name__, "must be a ResidualMLP, a ShapedTransformer or a Network")
    if not isinstance(inputs, Inputs):
        raise SpecError("inputs", type(inputs).__name__, "must be kernelprop Inputs (kernelprop.inputs.*)")
    if len(inputs.segments) != 1:
        raise SpecError("inputs.sequences", list(inputs.segments), "the SDE takes one sequence")
    n_tok = inputs.sigma.shape[0]
    width = _whole("width", width, 1)
    depth = _whole("depth", depth, 1)
    if width < n_tok + 1:
        raise SpecError("width", width, f"must exceed the {n_tok} tokens (the covariance of a width-n network "
                        "has rank ≤ n): raise the width")
    paths = _whole("paths", paths, 2)
    records = _whole("records", records, 1)
    _whole("seed", seed, 0)
    horizon = depth / width
    if steps is not None and dt is not None:
        raise SpecError("dt", dt, "give steps or dt, not both")
    if dt is not None:
        steps = max(1, int(round(horizon / _positive("dt", dt))))
    steps = depth if steps is None else _whole("steps", steps, 1)
    scheme = _check_scheme(model, scheme)
    v0 = inputs.sigma
    check_step(model, v0, width, steps, horizon)
    rng = np.random.default_rng(seed)
    at = sorted(set(np.round(np.linspace(0, steps, min(records, steps) + 1)).astype(int)))
    v = np.broadcast_to(v0, (paths, n_tok, n_tok)).copy()
    alive = np.ones(paths, dtype=bool)
    h = horizon / steps
    kept = {0: (v.copy(), alive.copy())}
    for k in range(1, steps + 1):
        v, alive = _em_step(model, v, alive, width, h, model.draw(rng, paths, n_tok), scheme, k, steps)
        if k in at:
            kept[k] = (v.copy(), alive.copy())
    return _summarise(model, kept, at, h, width, depth, steps, paths, dict(seed=seed, scheme=scheme))


def _check_scheme(model, scheme):
    if scheme not in ("auto", "em", "psd"):
        raise SpecError("scheme", scheme, "must be \"auto\", \"em\" or \"psd\"")
    return "psd" if scheme == "auto" else scheme


def _em_step(model, v, alive, width, h, z, scheme, k, steps):
    """One step of the paths still ``alive``. A path stops (is frozen and left out of the statistics from
    then on) when the model's expansion no longer holds (:meth:`ShapedTransformer.beyond`) or its trace
    passes ``_EXPLODED`` times the input's (the SDE's solution exists only up to such a time: its
    attention terms grow like V² and V³); more than 1% stopped paths, or a path outside the PSD cone,
    raise :class:`~kernelprop.errors.NumericalError`."""
    where = f"SDE step {k} of {steps} (t = {(k - 1) * h:.4g} to {k * h:.4g})"
    trace = np.einsum("pii->p", v)
    with np.errstate(invalid="ignore"):
        stop = ~np.isfinite(trace) | (trace > _EXPLODED * v.shape[-1]) | model.beyond(v, width)
    alive = alive & ~stop
    share = 1.0 - alive.mean()
    if share > _MAX_SHARE:
        raise NumericalError(where, f"{share:.1%} of the paths left the range of the SDE ({model.limit_text})",
                             "the SDE is not stable to this depth/width ratio: lower depth/width" + model.remedy)
    idx = np.flatnonzero(alive)
    va = v[idx]
    l_v, lo = _sqrt_psd(va)
    tr = np.abs(trace[idx])
    if np.any(lo < -1e-9 * tr):
        bad = int(np.argmin(lo / tr))
        raise NumericalError(where, f"path {idx[bad]} left the positive semi-definite cone (smallest eigenvalue "
                             f"{lo[bad]:.3g}, trace {tr[bad]:.3g})", f"use more steps (now {steps})"
                             + (" or scheme = \"psd\"" if scheme == "em" else ""))
    za = {key: (val[:, idx] if key != "seed" else val) for key, val in z.items()}
    if scheme == "psd":
        out = model.step(va, l_v, width, h, za)
    else:
        out = va + h * model.drift(va, width) + model.step_noise(va, l_v, h, za)
    v = v.copy()
    v[idx] = 0.5 * (out + np.swapaxes(out, -1, -2))
    return v, alive


def integrate(model, v0: np.ndarray, width: int, horizon: float, normals: list, scheme: str = "psd"):
    """Integrate from ``v0`` (P, N, N) over ``[0, horizon]`` driven by the given per-step random numbers
    (``normals[k]`` as ``model.draw`` returns them; ``len(normals)`` steps): ``(V, alive)`` at the end.
    For coupled step-size studies: the normals of a step twice as long are sums of two fine ones over √2."""
    scheme = _check_scheme(model, scheme)
    steps = len(normals)
    h = horizon / steps
    v = np.array(v0, dtype=float)
    alive = np.ones(len(v), dtype=bool)
    for k, z in enumerate(normals, start=1):
        v, alive = _em_step(model, v, alive, width, h, z, scheme, k, steps)
    return v, alive


def _summarise(model, kept, at, h, width, depth, steps, paths, meta):
    per = [measures(kept[k][0]) for k in at]
    alive = np.stack([kept[k][1] for k in at], axis=1)             # (paths, R)
    names = list(per[0])
    samples = {m: np.where(alive, np.stack([p[m] for p in per], axis=1), np.nan) for m in names}
    count = alive.sum(axis=0)
    kmean = np.stack([kept[k][0][kept[k][1]].mean(axis=0) for k in at])
    return SDETrajectory(
        t=np.array(at) * h, blocks=np.array(at) * h * width,
        mean={m: np.nanmean(s, axis=0) for m, s in samples.items()},
        sd={m: np.nanstd(s, axis=0, ddof=1) for m, s in samples.items()},
        stderr={m: np.nanstd(s, axis=0, ddof=1) / np.sqrt(count) for m, s in samples.items()},
        quantiles={m: np.nanquantile(s, QUANTILES, axis=0).T for m, s in samples.items()},
        samples=samples, kernel_mean=kmean, model=model, width=width, depth=depth, steps=steps, paths=paths,
        stopped=1.0 - count / paths, meta=meta)


@dataclass(frozen=True, eq=False)
class SDESamples:
    """The SDE's per-path measures at the records of the limit (:func:`run`): ``samples[name]`` (paths, R),
    ``labels`` and ``blocks`` of those records, ``stopped`` the share of paths left out (≤ 1%)."""

    labels: list
    blocks: np.ndarray
    samples: dict
    stopped: float
    trajectory: SDETrajectory


def run(network: Network, inputs: Inputs, *, width: int | None, heads: int | None = None, samples: int = 1000,
        seed: int = 0, every: int = 1, spectral: bool | str = "auto") -> SDESamples:
    """The ``"sde"`` method of :func:`kernelprop.finite.interface.predict`: ``samples`` paths of the covariance
    SDE of ``network`` at ``width`` (one step per block), read at the records of the wide limit
    (``record="blocks"``, every ``every``-th block). Paths stopped before the last block are left out (at
    most 1%, else NumericalError from :func:`sde_trajectory`). ``heads`` is already set on ``network``;
    ``spectral`` is accepted for the interface (the SDE reports the measures of :func:`measures`)."""
    from ..network.walk import RecordPlan
    if width is None:
        raise SpecError("width", None, "the SDE integrates t = depth/width: give a width")
    depth = _whole("depth", network.depth, 1)
    traj = sde_trajectory(network, inputs, width, depth, paths=samples, steps=depth, records=depth, seed=seed)
    plan = RecordPlan(network, "blocks", every)
    labels, blocks = [], []
    for rec in plan.all(network):
        labels.append(rec.label)
        blocks.append(min(int(rec.block), depth))
    index = {int(round(b)): i for i, b in enumerate(traj.blocks)}
    cols = [index[b] for b in blocks]
    keep = np.all(np.isfinite(traj.samples["q_mean"]), axis=1)
    out = {m: s[keep][:, cols] for m, s in traj.samples.items()}
    return SDESamples(labels=labels, blocks=np.array(blocks), samples=out, stopped=float(1.0 - keep.mean()),
                      trajectory=traj)
