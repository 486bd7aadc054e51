"""Gated MLP ``y = (φ(x W_g) ⊙ x W_u) W_d`` (SwiGLU, GeGLU, ReGLU; Shazeer 2020): description and every rule.

Kernel map (docs/theory.md §1.5): the gate ``g = x W_g ~ N(0, σ_g² Σ)`` and the up-projection
``u = x W_u ~ N(0, σ_u² Σ)`` are independent given x (Σ the uncentred second moment; x need not be
Gaussian), so ``E[h_i h_j] = K_φ(σ_g² Σ)_ij · σ_u² Σ_ij`` for ``h = φ(g) ⊙ u`` and, after the fresh
``W_d``, ``Σ' = σ_d² σ_u² K_φ(σ_g² Σ) ⊙ Σ``, ``m' = 0``, Gaussian; inside a residual branch the
dependence on the branch input becomes zero. Backward (gradient independence):
``Π_h = σ_d² Π``, ``Π_x = σ_g² σ_u² Π_h ⊙ Σ ⊙ K'_φ(σ_g² Σ) + σ_u² Π_h ⊙ K_φ(σ_g² Σ)``.
Finite width: the three weight matrices, pulled back by the product rule.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import NotSupportedError, NumericalError, SpecError
from ..kernel import activations
from ..kernel.state import ZERO, per
from .base import Layer, Param, carry, choice, num, register_layer, resolved


@register_layer
@dataclass(frozen=True, eq=False)
class GatedMLP(Layer):
    """Gated MLP ``(φ(x W_g) ⊙ x W_u) W_d``: ``Σ' = σ_d² σ_u² K_φ(σ_g² Σ) ⊙ Σ``, ``m' = 0`` (docs/theory.md §1.5).

    ``activation`` "silu" is SwiGLU, "gelu" GeGLU, "relu" ReGLU (Shazeer 2020); any registered
    activation or a vectorised callable (with ``derivative=`` for backward passes) is accepted, with
    ``params`` as for :class:`~kernelprop.layers.Activation`. Weights ``W_g, W_u ~ N(0, σ²/fan_in)`` of
    shape d × (width_factor·d), ``W_d`` back to the input width; no biases. A token of variance q leaves
    with variance ``σ_d² σ_u² q E[φ(√(σ_g² q) z)²]``: unit output at q = 1 needs
    ``σ_d² σ_u² = 1/E[φ(σ_g z)²]``, at σ_g² = 1 that is 2.8108 (silu), 2.3517 (gelu), 2 (relu).
    """

    activation: Any = field(default="silu", metadata={"doc": "gate activation φ: \"silu\" (SwiGLU), \"gelu\" "
                                                              "(GeGLU), \"relu\" (ReGLU) or any activation name"})
    params: Mapping = field(default_factory=dict, metadata={"doc": "parameters of φ, e.g. { slope = 0.2 } "
                                                                   "for leaky_relu"})
    gate_var: Param = num(1.0, "nonneg", "σ_g²: gate weight variance times fan-in")
    up_var: Param = num(1.0, "nonneg", "σ_u²: up-projection weight variance times fan-in")
    down_var: Param = num(1.0, "nonneg", "σ_d²: down-projection weight variance times fan-in "
                          "(unit output at unit input: σ_d² σ_u² = 1/E[φ(σ_g z)²])")
    width_factor: Param = num(8 / 3, "positive", kernel=False,
                              doc="hidden width as a multiple of the model width (Monte Carlo only; Llama: 8/3)")
    init: str = choice("gaussian", ("gaussian", "orthogonal"),
                       "weight distribution (Monte Carlo only; same wide limit)")
    derivative: Callable | None = None
    kind = "gated_mlp"

    def __post_init__(self):
        super().__post_init__()
        try:
            activations.check_activation(self.activation, self.params)
        except SpecError as exc:
            if exc.field == "activation":
                raise SpecError(f"{self.kind}.activation", exc.value, f"unknown gate activation of {self.kind}; "
                                f"known: {', '.join(activations.ACTIVATIONS)} (or a vectorised callable)") from None
            where = f"{self.kind}.params" if exc.field == "params" else f"{self.kind}.params.{exc.field}"
            raise SpecError(where, exc.value, exc.allowed) from None
        if self.derivative is not None and not (callable(self.activation) and callable(self.derivative)):
            raise SpecError(f"{self.kind}.derivative", self.derivative, "only for a callable activation (φ' of it, "
                            "a vectorised callable); a named activation has its own")
        object.__setattr__(self, "params", dict(self.params))

    @property
    def label(self) -> str:
        return getattr(self.activation, "__name__", "callable") if callable(self.activation) else self.activation

    def numeric_fields(self):
        yield from super().numeric_fields()
        if not callable(self.activation):
            for k, v in self.params.items():
                yield f"params.{k}", v, "real"

    def kernel_fields(self):
        own = ("gate_var", "up_var", "down_var")
        return own + tuple(f"params.{k}" for k in self.params) if not callable(self.activation) else own

    # --- infinite width ------------------------------------------------------------------------

    def kernel_map(self, s, ctx):
        vg, vu, vd = self.gate_var, self.up_var, self.down_var
        k, _, err = activations.activation_kernel(self.activation, per(vg, 2) * s.sigma, self.params,
                                                  nodes=ctx.quad_nodes)
        with np.errstate(over="ignore", invalid="ignore"):
            sig_h = per(vu, 2) * (k * s.sigma)               # E[h_i h_j] per hidden feature
            sigma = per(vd, 2) * sig_h
        if not np.all(np.isfinite(sigma)):
            raise NumericalError(ctx.where, "the gated MLP's output kernel is not finite",
                                 "lower gate_var/up_var/down_var or the input variance")
        # K's error scaled like the map; the input's error through Σ and through K (slope taken as ≤ 1)
        a = np.max(np.diagonal(s.sigma, axis1=-2, axis2=-1), axis=-1) if s.n else 0.0
        kmax = np.max(np.abs(np.diagonal(k, axis1=-2, axis2=-1)), axis=-1) if s.n else 0.0
        quad = vd * vu * (a * err + (kmax + vg * a) * s.quad_error)
        out = s.replace(sigma=sigma, mean=np.zeros(s.mean.shape), gaussian=True, dep=None if s.dep is None else ZERO,
                        quad_error=quad, head_blocks=False)
        path, sig_in, width_in, nodes = ctx.path, s.sigma, s.width, ctx.quad_nodes
        hidden = resolved(self.width_factor)

        def back(pi, grads):
            kp, _, kerr = activations.derivative_kernel(self.activation, vg * sig_in, self.params,
                                                        derivative=self.derivative, nodes=nodes)
            pi_h = vd * pi
            pi_gate = vu * (pi_h * sig_in * kp)      # E[G_g G_gᵀ], G_g = G_h ⊙ u ⊙ φ'(g)
            pi_up = pi_h * k                          # E[G_u G_uᵀ], G_u = G_h ⊙ φ(g)
            grads.append((f"{path}/gate", "dense", width_in * float(np.vdot(sig_in, pi_gate))))
            grads.append((f"{path}/up", "dense", width_in * float(np.vdot(sig_in, pi_up))))
            grads.append((f"{path}/down", "dense", hidden * float(np.vdot(sig_h, pi))))
            res = vg * pi_gate + vu * pi_up
            # Π' = vd (vg vu Π ⊙ Σ ⊙ K' + vu Π ⊙ K): K' and K carry their quadrature errors
            carry(grads, vd * float(np.max(np.abs(pi))) * (vg * vu * float(np.max(np.abs(sig_in))) * kerr + vu * err)
                  if (kerr or err) else 0.0, res)
            return res
        return out, back

    def batch_refusal(self) -> str | None:
        """Why the kernel map cannot take a batch of kernels (None: it can): a batch shares φ's params."""
        return "the activation's params must be the same for every member" if any(
            np.ndim(v) for v in self.params.values()) else None

    # --- finite width --------------------------------------------------------------------------

    def _bound(self, which: str) -> Callable:
        """φ (``which="phi"``) or φ' (``"dphi"``) with the parameters bound."""
        if callable(self.activation) and not isinstance(self.activation, str):
            f = self.activation if which == "phi" else self.derivative
            if f is None:
                raise NotSupportedError(f"gated_mlp activation {self.label!r} is a callable without derivative=: "
                                        "the Monte Carlo backward pass needs φ' (give GatedMLP(f, derivative=f_prime))")
            return functools.partial(f, **self.params) if self.params else f
        spec = activations.ACTIVATIONS[self.activation]
        params = {**spec.params, **{k: float(v) for k, v in self.params.items()}}
        f = spec.phi if which == "phi" else spec.dphi
        return functools.partial(f, **params) if params else f

    def hidden_width(self, d: int) -> int:
        """The Monte Carlo hidden width ``round(width_factor · d)`` for model width d."""
        return max(1, int(round(resolved(self.width_factor) * d)))

    def sample(self, x, ctx):
        from ..montecarlo import sampler as S
        hidden, d_out = self.hidden_width(ctx.width), x.shape[-1]
        phi = self._bound("phi")
        if not ctx.tape:
            g = S.project(ctx, x, hidden, self.gate_var, self.init)
            u = S.project(ctx, x, hidden, self.up_var, self.init)
            h = np.asarray(phi(g), dtype=np.float64) * u
            return S.project(ctx, h, d_out, self.down_var, self.init), None
        wg = S.weights(ctx, x.shape[-1], hidden, self.gate_var, self.init)
        wu = S.weights(ctx, x.shape[-1], hidden, self.up_var, self.init)
        wd = S.weights(ctx, hidden, d_out, self.down_var, self.init)
        g, u = np.matmul(x, wg), np.matmul(x, wu)
        a = np.asarray(phi(g), dtype=np.float64)
        h = a * u
        y = np.matmul(h, wd)
        path, d, dphi = ctx.path, ctx.width, self._bound("dphi")

        def pull(gy, grads):
            grads.append((f"{path}/down", "dense", S.gram_dot(h, gy) / d))
            gh = np.matmul(gy, np.swapaxes(wd, -1, -2))
            gu = gh * a
            gg = gh * u * np.asarray(dphi(g), dtype=np.float64)
            grads.append((f"{path}/gate", "dense", S.gram_dot(x, gg) / d))
            grads.append((f"{path}/up", "dense", S.gram_dot(x, gu) / d))
            return np.matmul(gg, np.swapaxes(wg, -1, -2)) + np.matmul(gu, np.swapaxes(wu, -1, -2))
        return y, pull

    def plan(self, width, where, plan):
        hidden = self.hidden_width(plan.width)
        init = plan.init or self.init
        plan.add_weight(width, hidden, init)
        plan.add_weight(width, hidden, init)
        plan.add_weight(hidden, width, init)
        plan.max_width = max(plan.max_width, hidden, width)
        return width

    # --- symbolic ------------------------------------------------------------------------------

    def symbolic_map(self, s, ctx):
        """``Σ'_ij = σ_d² σ_u² Σ_ij K_φ(σ_g² Σ_ii, σ_g² Σ_jj, σ_g² Σ_ij)``, ``m' = 0``."""
        from ..symbolic import activations as symbolic_activations
        from ..symbolic.maps import ZERO as SZERO
        gate = types.SimpleNamespace(name=self.activation, params=self.params)
        try:
            form = symbolic_activations.lookup(gate, ctx.where, ctx.opaque)
        except NotSupportedError as exc:
            raise NotSupportedError(f"{ctx.where}: layer `{self.kind}` has no symbolic map for its gate: "
                                    f"{str(exc).removeprefix(ctx.where + ': ')}") from None
        defaults = dict(activations.ACTIVATIONS[self.activation].params) if not callable(self.activation) else {}
        params = {k: ctx.value(self, f"params.{k}") if k in self.params else ctx.ns.convert(v)
                  for k, v in {**defaults, **self.params}.items()}
        if isinstance(form, symbolic_activations.Opaque):
            params = {}
        vg, vu, vd = (ctx.value(self, f) for f in ("gate_var", "up_var", "down_var"))
        sigma = s.sigma.entrywise(lambda a, b, c: c * form.off(vg * a, vg * b, vg * c, **params),
                                  lambda a: a * form.diag(vg * a, **params))
        return s.replace(sigma=sigma * (vd * vu), mean=ctx.fam.vector(0), gaussian=True,
                         dep=None if s.dep is None else SZERO)

    def ntk_map(self, s, ctx):
        """NTK by the product rule (docs/theory.md §14): with ``K = K_φ(σ_g² Σ)``, ``K' = K_φ'(σ_g² Σ)``,
        ``Θ' = σ_d² σ_u² [(σ_g² Σ ⊙ K' + K) ⊙ (Θ + Σ) + K ⊙ Σ]`` — gate and up-projection tangents
        ``σ_g²(Θ + Σ)``, ``σ_u²(Θ + Σ)`` through ``∂h = φ'(g) u ∂g + φ(g) ∂u`` (their cross term averages to 0:
        u has mean 0), pushed through ``W_d``, plus ``W_d``'s own term ``σ_d² Σ_h``."""
        out, back = self.kernel_map(s, ctx)
        vg, vu, vd = self.gate_var, self.up_var, self.down_var
        k, _, err = activations.activation_kernel(self.activation, vg * s.sigma, self.params, nodes=ctx.quad_nodes)
        kp, _, errp = activations.derivative_kernel(self.activation, vg * s.sigma, self.params,
                                                    derivative=self.derivative, nodes=ctx.quad_nodes)
        with np.errstate(over="ignore", invalid="ignore"):
            tan = vg * s.sigma * kp + k
            theta = (vd * vu) * (tan * (s.ntk + s.sigma) + k * s.sigma)
        if not np.all(np.isfinite(theta)):
            raise NumericalError(ctx.where, "the gated MLP's NTK is not finite",
                                 "lower gate_var/up_var/down_var or the input variance")
        a = float(np.max(np.abs(s.sigma))) if s.n else 0.0
        t = float(np.max(np.abs(s.ntk))) if s.n else 0.0
        tmax = float(np.max(np.abs(tan))) if s.n else 0.0
        e = vd * vu * ((vg * a * errp + err) * (t + a) + tmax * (s.ntk_error + s.quad_error) + a * err)
        return out.replace(ntk=theta, ntk_error=e), back
