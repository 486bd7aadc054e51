"""LayerNorm and RMSNorm over features: description and every rule.

Kernel maps (docs/theory.md §1): LayerNorm centres ``Σᶜ = Σ − m mᵀ`` (if ``centre``), then
``Σ'_ij = g² Σᶜ_ij / sqrt((Σᶜ_ii + ε)(Σᶜ_jj + ε))``, ``m' = 0``; RMSNorm the same without centring,
``m'_i = g m_i / sqrt(Σ_ii + ε)``. A branch's dependence on its input is scaled row by row.
Backward (wide limit): ``Π_x,ij = g²/(s_i s_j) Π_y,ij`` — the projections on the mean and on x̂ are
O(1/d) and dropped; the finite-width rule keeps them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import NumericalError
from ..kernel.state import is_one, per
from .base import Layer, Param, num, register_layer


class _Norm(Layer):
    gain: Param
    eps: Param
    centring = False

    def _scale(self, s, ctx, var):
        bad = np.flatnonzero(~(var > 0))
        if bad.size:
            raise NumericalError(ctx.where, f"token {int(bad[0] % s.n)} has zero variance entering {self.kind}",
                                 f"set {self.kind}.eps > 0, or fix the collapse upstream")
        return 1.0 / np.sqrt(var)

    def kernel_map(self, s, ctx):
        centre = self.centring
        sig = s.sigma - s.mean[..., :, None] * s.mean[..., None, :] if centre and np.any(s.mean) else s.sigma
        inv = self._scale(s, ctx, np.diagonal(sig, axis1=-2, axis2=-1) + per(self.eps, 1))
        g = self.gain
        sigma = (sig if is_one(g * g) else per(g * g, 2) * sig) * inv[..., :, None]
        sigma *= inv[..., None, :]
        dep = s.dep.scale_rows(per(g, 1) * inv) if s.dep is not None else None
        err = s.quad_error * g * g * inv.max(axis=-1) ** 2
        if centre:
            mean = np.zeros(s.mean.shape)
            out = s.replace(sigma=sigma, mean=mean, dep=dep, gaussian=s.gaussian and not np.any(mean),
                            quad_error=err)
        elif isinstance(self, LayerNorm):
            mean = per(g, 1) * s.mean * inv
            out = s.replace(sigma=sigma, mean=mean, dep=dep, gaussian=s.gaussian and not np.any(mean),
                            quad_error=err)
        else:
            out = s.replace(sigma=sigma, mean=per(g, 1) * s.mean * inv, dep=dep, quad_error=err)

        def back(pi, grads):
            scale = self.gain / np.sqrt(np.diag(sig) + self.eps)
            return pi * np.outer(scale, scale)
        return out, back

    def batch_refusal(self) -> str | None:
        """None: the kernel map broadcasts over a batch of kernels."""
        return None

    def sample(self, x, ctx):
        xin = x
        if self.centring:
            x = x - x.mean(axis=-1, keepdims=True)
        var = np.einsum("bnk,bnk->bn", x, x)[..., None] / x.shape[-1] + self.eps
        if not np.all(var > 0):
            raise NumericalError(ctx.where, f"a token has zero variance entering {self.kind}",
                                 f"set {self.kind}.eps > 0, or fix the collapse upstream")
        y = x * (self.gain / np.sqrt(var))
        if not ctx.tape:
            return y, None

        def pull(g, grads):
            """Exact transpose Jacobian of ``y = g·x_c/s``: ``P_c (g/s)(G − x̂ (x̂·G)/w)``."""
            w = xin.shape[-1]
            xc = xin - xin.mean(axis=-1, keepdims=True) if self.centring else xin
            inv = 1.0 / np.sqrt(np.einsum("bnk,bnk->bn", xc, xc)[..., None] / w + self.eps)
            xhat = xc * inv
            gx = g - xhat * (np.einsum("bnk,bnk->bn", xhat, g)[..., None] / w)
            gx *= self.gain * inv
            if self.centring:
                gx -= gx.mean(axis=-1, keepdims=True)
            return gx
        return y, pull

    def symbolic_map(self, s, ctx):
        """``Σᶜ = Σ − m mᵀ`` (LayerNorm with centring), ``Σ'_ij = g² Σᶜ_ij / sqrt((Σᶜ_ii + ε)(Σᶜ_jj + ε))``."""
        fam = ctx.fam
        sig = s.sigma - fam.outer(s.mean, s.mean) if self.centring else s.sigma
        g, eps = ctx.value(self, "gain"), ctx.value(self, "eps")
        inv = sig.diag().map(lambda v: 1 / sympy_sqrt(v + eps))
        dep = s.dep.scale_rows(inv * g) if s.dep is not None else None
        if isinstance(self, LayerNorm):
            mean = fam.vector(0) if self.centre else s.mean * inv * g
            return s.replace(sigma=sig.scale_both(inv) * g ** 2, mean=mean, dep=dep,
                             gaussian=s.gaussian and mean.is_zero())
        return s.replace(sigma=s.sigma.scale_both(inv) * g ** 2, mean=s.mean * inv * g, dep=dep)

    def ntk_map(self, s, ctx):
        """NTK in the wide limit (docs/theory.md §14): ``Θ'_ij = g² Θ_ij/(s_i s_j)``, s from the (centred) Σ as in
        the kernel map; the centring and x̂ projections remove one feature direction each from a tangent
        spread evenly over d directions, O(1/d), and are dropped."""
        out, back = self.kernel_map(s, ctx)
        sig = s.sigma - np.outer(s.mean, s.mean) if self.centring else s.sigma
        f = self.gain / np.sqrt(np.diag(sig) + self.eps)
        return out.replace(ntk=s.ntk * np.outer(f, f), ntk_error=s.ntk_error * float(np.max(f)) ** 2), back


def sympy_sqrt(v):
    import sympy as sp
    return sp.sqrt(v)


@register_layer
@dataclass(frozen=True, eq=False)
class LayerNorm(_Norm):
    """LayerNorm over features with gain ``g`` (bias 0 at init).

    ``Σᶜ = Σ − m mᵀ`` (if ``centre``), ``Σ'_ij = g² Σᶜ_ij / sqrt((Σᶜ_ii + ε)(Σᶜ_jj + ε))``, ``m' = 0``.
    """

    gain: Param = num(1.0, "real", "gain g")
    eps: Param = num(0.0, "nonneg", "ε added to the variance")
    centre: bool = True
    kind = "layernorm"

    @property
    def centring(self) -> bool:  # type: ignore[override]
        return self.centre


@register_layer
@dataclass(frozen=True, eq=False)
class RMSNorm(_Norm):
    """RMSNorm: ``Σ'_ij = g² Σ_ij / sqrt((Σ_ii + ε)(Σ_jj + ε))``, ``m'_i = g m_i / sqrt(Σ_ii + ε)``."""

    gain: Param = num(1.0, "real", "gain g")
    eps: Param = num(0.0, "nonneg", "ε added to the mean square")
    kind = "rmsnorm"
