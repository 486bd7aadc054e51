"""Dense layer ``h = x W + b``: description and every rule.

Kernel map (docs/theory.md §1): ``Σ' = σ_w² Σ + σ_b² 11ᵀ`` (one bias vector shared by all tokens),
``m' = 0``; a fresh zero-mean weight matrix makes the output independent of any earlier stream, so a
branch's dependence on its input becomes zero. An error ``e`` of Σ becomes ``σ_w² e`` (§1.3).
Backward: ``Π_x = σ_w² Π_h``; weight-gradient norm per model width ``E‖∂L/∂W‖²/d = w_in Σ_ij Σ_ij Π_ij``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..kernel.state import ZERO
from .base import Layer, Param, choice, num, register_layer, resolved


@register_layer
@dataclass(frozen=True, eq=False)
class Dense(Layer):
    """Fully connected layer ``h = x W + b`` with ``W_ij ~ N(0, weight_var/fan_in)``, ``b_i ~ N(0, bias_var)``.

    Kernel map: ``Σ' = σ_w² Σ + σ_b² 11ᵀ``, ``m' = 0`` (docs/theory.md §1).
    """

    weight_var: Param = num(1.0, "nonneg", "σ_w²: weight variance times fan-in")
    bias_var: Param = num(0.0, "nonneg", "σ_b²: bias variance (one bias vector shared by all tokens)")
    width_factor: Param = num(1.0, "positive", kernel=False,
                              doc="output width as a multiple of the model width (Monte Carlo only)")
    init: str = choice("gaussian", ("gaussian", "orthogonal"),
                       "weight distribution (Monte Carlo only; same wide limit)")
    kind = "dense"

    def kernel_map(self, s, ctx):
        sigma = self.weight_var * s.sigma + self.bias_var
        out = s.replace(sigma=sigma, mean=np.zeros(s.n), gaussian=True, dep=None if s.dep is None else ZERO,
                        width=self.width_factor, head_blocks=False, quad_error=self.weight_var * s.quad_error)
        path, sig_in, width_in, w = ctx.path, s.sigma, s.width, self.weight_var

        def back(pi, grads):
            grads.append((path, "dense", width_in * float(np.vdot(sig_in, pi))))
            return w * pi
        return out, back

    def sample(self, x, ctx):
        from ..montecarlo import sampler as S
        fan_out = self.out_width(ctx.width)
        if not ctx.tape:
            y = S.project(ctx, x, fan_out, self.weight_var, self.init)
            if self.bias_var:
                y += ctx.normal((1, fan_out)) * math.sqrt(self.bias_var)
            return y, None
        w = S.weights(ctx, x.shape[-1], fan_out, self.weight_var, self.init)
        y = np.matmul(x, w)
        if self.bias_var:
            y += ctx.normal((1, fan_out)) * math.sqrt(self.bias_var)
        path, d = ctx.path, ctx.width

        def pull(g, grads):
            grads.append((path, "dense", S.gram_dot(x, g) / d))
            return np.matmul(g, np.swapaxes(w, -1, -2))
        return y, pull

    def symbolic_map(self, s, ctx):
        """``Σ' = σ_w² Σ + σ_b² 11ᵀ``, ``m' = 0``."""
        from ..symbolic.maps import ZERO as SZERO
        w, b = ctx.value(self, "weight_var"), ctx.value(self, "bias_var")
        sigma = s.sigma * w + ctx.fam.ones() * b
        return s.replace(sigma=sigma, mean=ctx.fam.vector(0), gaussian=True, dep=None if s.dep is None else SZERO)

    def plan(self, width, where, plan):
        out = self.out_width(plan.width)
        plan.add_weight(width, out, plan.init or self.init)
        plan.max_width = max(plan.max_width, out)
        return out

    def out_width(self, d: int) -> int:
        """The Monte Carlo output width ``round(width_factor · d)`` for model width d."""
        return max(1, int(round(resolved(self.width_factor) * d)))
