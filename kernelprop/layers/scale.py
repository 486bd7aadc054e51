"""A constant multiplier ``y = c·x``: description and every rule.

Kernel map: ``Σ' = c² Σ``, ``m' = c m``; the stream stays Gaussian, and inside a residual branch its
linear dependence on the branch input is scaled by c (so cross terms stay exact). Backward:
``Π_x = c² Π``. Finite width: the same product, pulled back by ``c·G``. No weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kernel.state import per
from .base import Layer, Param, num, register_layer


@register_layer
@dataclass(frozen=True, eq=False)
class Scale(Layer):
    """Multiply the stream by a constant: ``y = c·x``, ``Σ' = c² Σ``, ``m' = c m``."""

    c: Param = num(1.0, "real", "the multiplier c")
    kind = "scale"

    def kernel_map(self, s, ctx):
        c = self.c
        dep = s.dep
        if dep is not None and dep.kind in ("diag", "dense"):
            dep = dep.scale(c)
        out = s.replace(sigma=per(c * c, 2) * s.sigma, mean=per(c, 1) * s.mean, dep=dep,
                        quad_error=c * c * s.quad_error)
        return out, lambda pi, grads: (c * c) * pi

    def batch_refusal(self) -> str | None:
        """None: the kernel map broadcasts over a batch of kernels."""
        return None

    def sample(self, x, ctx):
        c = self.c
        return c * x, ((lambda g, grads: c * g) if ctx.tape else None)

    def symbolic_map(self, s, ctx):
        """``Σ' = c² Σ``, ``m' = c m``."""
        from ..symbolic.maps import Dep
        c = ctx.value(self, "c")
        dep = s.dep
        if dep is not None and dep.kind == "matrix":
            dep = Dep("matrix", dep.p * c, dep.headwise)
        return s.replace(sigma=s.sigma * c ** 2, mean=s.mean * c, dep=dep)

    def ntk_map(self, s, ctx):
        """NTK (docs/theory.md §14): ``Θ' = c² Θ`` (no parameters)."""
        out, back = self.kernel_map(s, ctx)
        c2 = self.c * self.c
        return out.replace(ntk=c2 * s.ntk, ntk_error=c2 * s.ntk_error), back
