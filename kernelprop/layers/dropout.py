"""Inverted dropout in train mode: description and every rule.

Kernel map (docs/theory.md §1, Kedia et al. 2024): the diagonal of Σ is divided by ``1 − p``, the
off-diagonal and the means are unchanged (the mask has mean one and is independent of everything
else, so cross kernels are unchanged too); an error ``e`` of Σ becomes ``e/(1 − p)`` (§1.3).
Backward: the same on Π. Finite width: Bernoulli masks independent per seed, token and feature,
scaled by ``1/(1 − p)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..kernel.state import nonzero, per
from .base import Layer, Param, num, register_layer


@register_layer
@dataclass(frozen=True, eq=False)
class Dropout(Layer):
    """Inverted dropout in train mode: diagonal of Σ divided by ``1 − p``, off-diagonal unchanged."""

    p: Param = num(0.1, "prob", "drop probability")
    kind = "dropout"

    def kernel_map(self, s, ctx):
        sigma = s.sigma.copy()
        diag = np.einsum("...ii->...i", sigma)          # a writable view of every kernel's diagonal
        diag /= per(1.0 - self.p, 1)
        out = s.replace(sigma=sigma, gaussian=s.gaussian and not nonzero(self.p),
                        quad_error=s.quad_error / (1.0 - self.p))

        def back(pi, grads):
            out = pi.copy()
            out[np.diag_indices_from(out)] /= 1.0 - self.p
            return out
        return out, back

    def batch_refusal(self) -> str | None:
        """None: the kernel map broadcasts over a batch of kernels."""
        return None

    def sample(self, x, ctx):
        if self.p == 0:
            return x, ((lambda g, grads: g) if ctx.tape else None)
        mask = (ctx.uniform(x.shape[1:]) >= self.p) * (1.0 / (1.0 - self.p))
        y = x * mask
        return y, ((lambda g, grads: g * mask) if ctx.tape else None)

    def symbolic_map(self, s, ctx):
        """Inverted dropout (train mode): ``Σ'_ii = Σ_ii/(1 − p)``, off-diagonal and means unchanged."""
        from ..symbolic.maps import nonzero
        p = ctx.value(self, "p")
        return s.replace(sigma=s.sigma.map_diag(lambda v: v / (1 - p)), gaussian=s.gaussian and not nonzero(p))

    def ntk_map(self, s, ctx):
        """NTK (docs/theory.md §14): ``Θ'_ii = Θ_ii/(1 − p)``, off-diagonal unchanged (the tangent is masked
        like the features; masks of different tokens are independent with mean one)."""
        out, back = self.kernel_map(s, ctx)
        theta = s.ntk.copy()
        theta[np.diag_indices(s.n)] /= 1.0 - self.p
        return out.replace(ntk=theta, ntk_error=s.ntk_error / (1.0 - self.p)), back
