"""Elementwise activation ``scale · φ(x)``: description and every rule.

Kernel map (docs/theory.md §1): on a zero-mean Gaussian stream ``u ~ N(0, Σ)``,
``Σ'_ij = scale² E[φ(u_i)φ(u_j)]``, ``m'_i = scale E[φ(u_i)]`` — closed forms for the ReLU family,
abs, erf and GELU, 2-D Gauss–Hermite quadrature with an error estimate otherwise
(:mod:`kernelprop.kernel.activations`). Backward: ``Π_x = scale² Π_h ⊙ E[φ'(u_i)φ'(u_j)]``.
Finite width: ``scale·φ(X)``, pulled back by ``scale·φ'(X) ⊙ G``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import NotSupportedError, SpecError
from ..kernel import activations
from ..kernel.quadrature import check_kinks
from ..kernel.state import UNKNOWN
from .base import Layer, Param, num, register_layer

_NOT_GAUSSIAN = ("acts on a stream that is not zero-mean Gaussian (it follows another activation or dropout "
                 "without a Dense layer in between, or it carries a per-token mean: the input's `mean`, or a "
                 "normalisation without centring); its kernel map needs a zero-mean Gaussian input: put a Dense "
                 "layer or a centring LayerNorm before it")


@register_layer
@dataclass(frozen=True, eq=False)
class Activation(Layer):
    """Elementwise ``scale · φ(x)`` on a Gaussian stream: ``Σ'_ij = scale² E[φ(u_i)φ(u_j)]``, ``u ~ N(0, Σ)``.

    ``name`` is a registered activation (see :data:`kernelprop.kernel.activations.ACTIVATIONS`) or a
    vectorised callable (evaluated by Gauss–Hermite quadrature). ``params`` holds its parameters,
    e.g. ``{"slope": 0.2}`` for ``leaky_relu``; ``derivative`` is φ' of a callable (for backward passes).
    """

    name: Any = "relu"
    params: Mapping = field(default_factory=dict)
    scale: Param = num(1.0, "real", "output multiplier")
    derivative: Callable | None = None
    kinks: tuple | None = field(default=None, metadata={
        "doc": "points where φ or φ' is not smooth, for a callable (the quadrature splits there)"})
    kind = "activation"

    def __post_init__(self):
        super().__post_init__()
        if not callable(self.name):
            activations.check_activation(self.name, dict(self.params))
        object.__setattr__(self, "params", dict(self.params))
        if self.kinks is not None:
            object.__setattr__(self, "kinks", check_kinks(self.kinks))

    @property
    def label(self) -> str:
        return getattr(self.name, "__name__", "callable") if callable(self.name) else self.name

    def numeric_fields(self):
        yield from super().numeric_fields()
        if not callable(self.name):
            for k, v in self.params.items():
                yield f"params.{k}", v, "real"

    # --- infinite width ------------------------------------------------------------------------

    def kernel_map(self, s, ctx):
        if not s.gaussian or np.any(s.mean):
            raise NotSupportedError(f"{ctx.where}: activation {self.label!r} {_NOT_GAUSSIAN}")
        if s.head_blocks and self.label != "identity":
            raise NotSupportedError(
                f"{ctx.where}: activation {self.label!r} acts on a stream whose head blocks have different kernels "
                "(a weight-free attention with per-head biases came before it): the kernel of the average is not "
                "the average of the kernels; put a Dense layer (or attention with value weights) in between")
        k, m, err = activations.activation_kernel(self.name, s.sigma, self.params, nodes=ctx.quad_nodes,
                                                  kinks=self.kinks)
        c = self.scale
        dep = s.dep
        if dep is not None and dep.kind not in ("zero",):
            dep = UNKNOWN
        out = s.replace(sigma=c * c * k, mean=c * m, gaussian=self.label == "identity",
                        dep=dep, quad_error=c * c * (s.quad_error + err))
        sig_in, nodes = s.sigma, ctx.quad_nodes

        def back(pi, grads):
            kp, _, _ = activations.derivative_kernel(self.name, sig_in, self.params, derivative=self.derivative,
                                                     nodes=nodes, kinks=self.kinks)
            return pi * ((self.scale ** 2) * kp)
        return out, back

    # --- finite width --------------------------------------------------------------------------

    def pointwise(self) -> Callable:
        """φ with its parameters bound."""
        if callable(self.name) and not isinstance(self.name, str):
            return functools.partial(self.name, **self.params) if self.params else self.name
        spec = activations.ACTIVATIONS[self.name]
        params = {**spec.params, **{k: float(v) for k, v in self.params.items()}}
        return functools.partial(spec.phi, **params) if params else spec.phi

    def derivative_fn(self) -> Callable:
        """φ' with its parameters bound: the registry's ``dphi`` or the layer's ``derivative``."""
        if callable(self.name) and not isinstance(self.name, str):
            if self.derivative is None:
                raise NotSupportedError(f"activation {self.label!r} is a callable without derivative=: the Monte "
                                        "Carlo backward pass needs φ' (give Activation(f, derivative=f_prime))")
            return functools.partial(self.derivative, **self.params) if self.params else self.derivative
        spec = activations.ACTIVATIONS[self.name]
        params = {**spec.params, **{k: float(v) for k, v in self.params.items()}}
        return functools.partial(spec.dphi, **params) if params else spec.dphi

    def sample(self, x, ctx):
        y = np.asarray(self.pointwise()(x), dtype=np.float64)
        if y.shape != x.shape:
            raise SpecError("activation.name", self.label, "must be a vectorised elementwise function (output "
                            f"shape {y.shape} for input shape {x.shape})")
        if self.scale != 1.0:
            y = y * self.scale
        if not ctx.tape:
            return y, None

        def pull(g, grads):
            return g * (self.scale * np.asarray(self.derivative_fn()(x), dtype=np.float64))
        return y, pull

    # --- symbolic ------------------------------------------------------------------------------

    def symbolic_map(self, s, ctx):
        """``Σ'_ij = scale² E[φ(u_i)φ(u_j)]``, ``m'_i = scale E[φ(u_i)]`` on a zero-mean Gaussian stream."""
        from ..symbolic import activations as symbolic_activations
        from ..symbolic.maps import UNKNOWN as SUNKNOWN
        if not s.gaussian or not s.mean.is_zero():
            raise NotSupportedError(f"{ctx.where}: activation {self.label!r} {_NOT_GAUSSIAN}")
        form = symbolic_activations.lookup(self, ctx.where, ctx.opaque)
        defaults = dict(activations.ACTIVATIONS[self.name].params) if not callable(self.name) else {}
        params = {k: ctx.value(self, f"params.{k}") if k in self.params else ctx.ns.convert(v)
                  for k, v in {**defaults, **self.params}.items()}
        if isinstance(form, symbolic_activations.Opaque):
            params = {}
        k = ctx.value(self, "scale")
        sigma = s.sigma.entrywise(lambda a, b, c: form.off(a, b, c, **params), lambda a: form.diag(a, **params))
        mean = s.sigma.diag().map(lambda a: form.mean(a, **params))
        dep = s.dep
        if dep is not None and dep.kind != "zero":
            dep = SUNKNOWN
        return s.replace(sigma=sigma * k ** 2, mean=mean * k, gaussian=self.label == "identity", dep=dep)

    def kernel_fields(self):
        return ("scale",) + tuple(f"params.{k}" for k in self.params) if not callable(self.name) else ("scale",)
