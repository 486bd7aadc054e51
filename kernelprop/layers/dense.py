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

from ..errors import NotSupportedError
from ..kernel.state import ZERO, per
from .base import Layer, Param, choice, num, register_layer, resolved, unit_scale


@register_layer
@dataclass(frozen=True, eq=False)
class Dense(Layer):
    """Fully connected layer ``h = x W + b`` with ``W_ij ~ N(0, weight_var/fan_in)``, ``b_i ~ N(0, bias_var)``.

    Kernel map: ``Σ' = σ_w² Σ + σ_b² 11ᵀ``, ``m' = 0`` (docs/theory.md §1).
    """

    weight_var: Param = num(1.0, "nonneg", "σ_w²: weight variance times fan-in, or \"unit\" (the σ_w² that gives the "
                            "output unit mean variance, docs/theory.md §5)", unit=True)
    bias_var: Param = num(0.0, "nonneg", "σ_b²: bias variance (one bias vector shared by all tokens)")
    width_factor: Param = num(1.0, "positive", kernel=False,
                              doc="output width as a multiple of the model width (Monte Carlo only)")
    init: str = choice("gaussian", ("gaussian", "orthogonal"),
                       "weight distribution (Monte Carlo only; same wide limit)")
    kind = "dense"

    def kernel_map(self, s, ctx):
        w = self.weight_var
        if self.is_unit("weight_var"):     # σ_w² mean_i Σ_ii + σ_b² = 1
            w = unit_scale(s.sigma, self.bias_var, f"{ctx.where}.weight_var")
        sigma = per(w, 2) * s.sigma + per(self.bias_var, 2)
        out = s.replace(sigma=sigma, mean=np.zeros(s.mean.shape), gaussian=True, dep=None if s.dep is None else ZERO,
                        width=self.width_factor, head_blocks=False, quad_error=w * s.quad_error)
        path, sig_in, width_in = ctx.path, s.sigma, s.width

        def back(pi, grads):
            grads.append((path, "dense", width_in * float(np.vdot(sig_in, pi))))
            return w * pi
        return out, back

    def batch_refusal(self) -> str | None:
        """Why the kernel map cannot take a batch of kernels (None: it can)."""
        return "weight_var = \"unit\" is chosen per kernel" if self.is_unit("weight_var") else None

    def sample(self, x, ctx):
        from ..montecarlo import sampler as S
        fan_out = self.out_width(ctx.width)
        unit = self.is_unit("weight_var")
        var = 1.0 if unit else self.weight_var
        if not ctx.tape:
            y = S.project(ctx, x, fan_out, var, self.init)
            if unit:
                y *= _unit_multiplier(y, self.bias_var)
            if self.bias_var:
                y += ctx.normal((1, fan_out)) * math.sqrt(self.bias_var)
            return y, None
        w = S.weights(ctx, x.shape[-1], fan_out, var, self.init)
        y = np.matmul(x, w)
        if unit:            # the realised weights are c·W: the pullback sees them, not W
            c = _unit_multiplier(y, self.bias_var)
            y *= c
            w = w * c
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
        if self.is_unit("weight_var"):
            raise NotSupportedError(f"{ctx.where}: weight_var = \"unit\" divides by the mean variance of the "
                                    "input, which the symbolic state does not carry; give a number or an expression")
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

    def ntk_map(self, s, ctx):
        """NTK (NTK parametrisation, docs/theory.md §14): ``Θ' = σ_w² Θ + σ_w² Σ + σ_b² 11ᵀ`` — the input's
        tangent through W, plus W's and the bias's own terms (Jacot et al. 2018)."""
        out, back = self.kernel_map(s, ctx)
        w = self.weight_var
        if self.is_unit("weight_var"):
            w = unit_scale(s.sigma, self.bias_var, f"{ctx.where}.weight_var")
        theta = w * (s.ntk + s.sigma) + self.bias_var
        return out.replace(ntk=theta, ntk_error=w * (s.ntk_error + s.quad_error)), back


def _unit_multiplier(y: np.ndarray, offset: float) -> np.ndarray:
    """Per network (leading axis): ``c`` with ``c² mean(y²) + offset = 1``, the finite-width :data:`UNIT` init
    (measured on the batch at hand, as a data-dependent init is in practice)."""
    v = np.mean(y * y, axis=tuple(range(1, y.ndim)), keepdims=True)
    return np.sqrt((1.0 - offset) / np.where(v > 0, v, 1.0))
