"""Elementwise activation in the DKS/TAT form ``φ̂(x) = γ·(φ(α·x + β) + δ)``: description and every rule.

``γ`` is the field ``scale``, ``α`` ``input_scale``, ``β`` ``input_shift``, ``δ`` ``offset`` (the
transformed activation of Martens et al. 2021, DKS, and Zhang et al. 2022, TAT; docs/dks.md).

Kernel map (docs/theory.md §1, docs/dks.md §1): on a zero-mean Gaussian stream ``u ~ N(0, Σ)``, with
``K = E[φ(αu_i + β) φ(αu_j + β)]`` and ``m_i = E[φ(αu_i + β)]``,
``Σ'_ij = γ²(K_ij + δ(m_i + m_j) + δ²)``, ``m'_i = γ(m_i + δ)``. For ``β = 0`` the closed forms
(ReLU family, abs, erf, GELU, identity) are evaluated on ``α²Σ``; otherwise, and for activations
without closed form, quadrature of ``x ↦ φ(αx + β)`` with an error bound (Mehler's expansion over all
entries at once, per-entry rules where it cannot meet the tolerance; :mod:`kernelprop.kernel.quadrature`),
its kinks moved to ``(k − β)/α``. The derivative kernel of the backward pass takes the same route.
Backward: ``Π_x = γ²α² Π_h ⊙ E[φ'(αu_i + β) φ'(αu_j + β)]``.
Finite width: ``γ(φ(αX + β) + δ)``, pulled back by ``γα φ'(αX + β) ⊙ G``.
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
from ..kernel.state import UNKNOWN, is_one, nonzero, per
from .base import Layer, Param, carry, num, register_layer, resolved

_NOT_GAUSSIAN = ("acts on a stream that is not zero-mean Gaussian (it follows another activation or dropout "
                 "without a Dense layer in between, or it carries a per-token mean: the input's `mean`, or a "
                 "normalisation without centring); its kernel map needs a zero-mean Gaussian input: put a Dense "
                 "layer or a centring LayerNorm before it")


@register_layer
@dataclass(frozen=True, eq=False)
class Activation(Layer):
    """Elementwise ``γ·(φ(α·x + β) + δ)`` on a Gaussian stream (DKS/TAT form; docs/dks.md).

    ``name`` is a registered activation (see :data:`kernelprop.kernel.activations.ACTIVATIONS`) or a
    vectorised callable (evaluated by Gauss–Hermite quadrature). ``params`` holds its parameters,
    e.g. ``{"slope": 0.2}`` for ``leaky_relu``; ``derivative`` is φ' of a callable (for backward passes).
    ``scale``, ``input_scale``, ``input_shift`` and ``offset`` are DKS's γ, α, β and δ (Martens et al.
    2021); the defaults 1, 1, 0, 0 give plain ``φ(x)``. :mod:`kernelprop.methods.dks` solves for them.
    """

    name: Any = "relu"
    params: Mapping = field(default_factory=dict)
    scale: Param = num(1.0, "real", "γ: output multiplier, γ·(φ(α·x + β) + δ) (DKS/TAT's γ)")
    input_scale: Param = num(1.0, "real", "α: input multiplier, φ(α·x + β) (DKS/TAT's α)")
    input_shift: Param = num(0.0, "real", "β: input shift, φ(α·x + β) (DKS/TAT's β)")
    offset: Param = num(0.0, "real", "δ: output offset, added to φ(α·x + β) before γ (DKS/TAT's δ)")
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

    def transform(self) -> tuple[float, float, float, float]:
        """``(γ, α, β, δ)`` of a resolved layer (γ, α, δ may be arrays of one value per batch member)."""
        return (_number(self.scale), _number(self.input_scale), resolved(self.input_shift),
                _number(self.offset))

    def batch_refusal(self) -> str | None:
        """Why the kernel map cannot take a batch of kernels (None: it can): a batch shares β and φ's params."""
        if isinstance(self.input_shift, np.ndarray) or any(np.ndim(v) for v in self.params.values()):
            return "input_shift and the activation's params must be the same for every member"
        return None

    def kernel_map(self, s, ctx):
        if not s.gaussian or np.any(s.mean):
            raise NotSupportedError(f"{ctx.where}: activation {self.label!r} {_NOT_GAUSSIAN}")
        if s.head_blocks and self.label != "identity":
            raise NotSupportedError(
                f"{ctx.where}: activation {self.label!r} acts on a stream whose head blocks have different kernels "
                "(a weight-free attention with per-head biases came before it): the kernel of the average is not "
                "the average of the kernels; put a Dense layer (or attention with value weights) in between")
        g, a, _, d = self.transform()
        k, m, err = self.inner_kernel(s.sigma, ctx.quad_nodes)
        if nonzero(d):
            k = k + per(d, 2) * (m[..., :, None] + m[..., None, :]) + per(d * d, 2)
            m = m + per(d, 1)
        dep = s.dep
        if dep is not None and dep.kind not in ("zero",):
            dep = UNKNOWN
        out = s.replace(sigma=per(g * g, 2) * k, mean=per(g, 1) * m, gaussian=self.label == "identity",
                        dep=dep, quad_error=g * g * (a * a * s.quad_error + (1.0 + 2.0 * abs(d)) * err))
        sig_in, nodes = s.sigma, ctx.quad_nodes

        def back(pi, grads):
            kp, _, kerr = self.inner_derivative_kernel(sig_in, nodes)
            res = pi * ((g * a) ** 2 * kp)
            carry(grads, (g * a) ** 2 * kerr * float(np.max(np.abs(pi))) if kerr else 0.0, res)
            return res
        return out, back

    def inner_kernel(self, sigma, nodes=None):
        """``(K, m, err)``: ``K_ij = E[φ(αu_i + β) φ(αu_j + β)]``, ``m_i = E[φ(αu_i + β)]``, ``u ~ N(0, sigma)``.

        ``β = 0``: the registry's closed forms (or quadrature) on ``α²Σ``; ``β ≠ 0``: quadrature of
        ``x ↦ φ(αx + β)`` with φ's kinks moved to ``(k − β)/α``."""
        _, a, b, _ = self.transform()
        if b == 0.0:
            sig = sigma if is_one(a) else per(a * a, 2) * np.asarray(sigma, dtype=np.float64)
            return activations.activation_kernel(self.name, sig, self.params, nodes=nodes,
                                                 kinks=self._own_kinks() or None)
        phi = self.pointwise()
        return activations.activation_kernel(lambda x: phi(a * x + b), sigma, nodes=nodes,
                                             kinks=self._moved_kinks() or None)

    def inner_derivative_kernel(self, sigma, nodes=None):
        """``(K', m', err)``: ``K'_ij = E[φ'(αu_i + β) φ'(αu_j + β)]`` (without the factor γ²α²)."""
        _, a, b, _ = self.transform()
        if b == 0.0:
            sig = sigma if a == 1.0 else (a * a) * np.asarray(sigma, dtype=np.float64)
            return activations.derivative_kernel(self.name, sig, self.params, derivative=self.derivative,
                                                 nodes=nodes,
                                                 kinks=self._own_kinks() or None)
        phi = self.pointwise()
        dphi = None if (callable(self.name) and self.derivative is None) else self.derivative_fn()
        shifted = None if dphi is None else (lambda x: dphi(a * x + b))
        return activations.derivative_kernel(lambda x: phi(a * x + b), sigma, derivative=shifted, nodes=nodes,
                                             kinks=self._moved_kinks() or None)

    def _own_kinks(self) -> tuple[float, ...]:
        """A callable's declared kinks, for the ``β = 0`` path (on ``α²Σ`` they stay in φ's argument); a
        registered activation's are its closed forms' or the quadrature's business."""
        return tuple(_phi_kinks(self)) if callable(self.name) and not isinstance(self.name, str) else ()

    def _moved_kinks(self) -> tuple[float, ...]:
        """The kinks of ``x ↦ φ(αx + β)``: φ's kinks ``k`` moved to ``(k − β)/α`` (none when ``α = 0``)."""
        _, a, b, _ = self.transform()
        if a == 0.0:
            return ()
        return tuple(sorted((float(k) - b) / a for k in _phi_kinks(self)))

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
        g, a, b, d = self.transform()
        z = x if (a == 1.0 and b == 0.0) else a * x + b
        y = np.asarray(self.pointwise()(z), dtype=np.float64)
        if y.shape != x.shape:
            raise SpecError("activation.name", self.label, "must be a vectorised elementwise function (output "
                            f"shape {y.shape} for input shape {x.shape})")
        if d != 0.0:
            y = y + d
        if g != 1.0:
            y = y * g
        if not ctx.tape:
            return y, None

        def pull(grad, grads):
            return grad * ((g * a) * np.asarray(self.derivative_fn()(z), dtype=np.float64))
        return y, pull

    # --- symbolic ------------------------------------------------------------------------------

    def symbolic_map(self, s, ctx):
        """``Σ'_ij = γ²(K(α²Σ)_ij + δ(m_i + m_j) + δ²)``, ``m'_i = γ(m(α²Σ)_i + δ)`` on a zero-mean Gaussian
        stream, ``K``, ``m`` the closed forms of φ; ``β ≠ 0`` has none (refused, or opaque)."""
        from ..symbolic import activations as symbolic_activations
        from ..symbolic.maps import UNKNOWN as SUNKNOWN
        from ..symbolic.maps import nonzero
        if not s.gaussian or not s.mean.is_zero():
            raise NotSupportedError(f"{ctx.where}: activation {self.label!r} {_NOT_GAUSSIAN}")
        g, a, b, d = (ctx.value(self, f) for f in ("scale", "input_scale", "input_shift", "offset"))
        if nonzero(b):
            form = symbolic_activations.shifted(self, a, b, ctx.where, ctx.opaque)
            params: dict = {}
            a = 1
        else:
            form = symbolic_activations.lookup(self, ctx.where, ctx.opaque)
            defaults = dict(activations.ACTIVATIONS[self.name].params) if not callable(self.name) else {}
            params = {k: ctx.value(self, f"params.{k}") if k in self.params else ctx.ns.convert(v)
                      for k, v in {**defaults, **self.params}.items()}
            if isinstance(form, symbolic_activations.Opaque):
                params = {}
        a2 = a ** 2

        def mean_of(v):
            return form.mean(a2 * v, **params)

        def off(x, y, c):
            return form.off(a2 * x, a2 * y, a2 * c, **params) + d * (mean_of(x) + mean_of(y)) + d ** 2

        def diag(x):
            return form.diag(a2 * x, **params) + 2 * d * mean_of(x) + d ** 2

        sigma = s.sigma.entrywise(off, diag)
        mean = s.sigma.diag().map(lambda x: mean_of(x) + d)
        dep = s.dep
        if dep is not None and dep.kind != "zero":
            dep = SUNKNOWN
        return s.replace(sigma=sigma * g ** 2, mean=mean * g, gaussian=self.label == "identity", dep=dep)

    def kernel_fields(self):
        own = ("scale", "input_scale", "input_shift", "offset")
        return own + tuple(f"params.{k}" for k in self.params) if not callable(self.name) else own

    def ntk_map(self, s, ctx):
        """NTK (docs/theory.md §14): ``Θ' = γ²α² Θ ⊙ K'``, ``K'_ij = E[φ'(αu_i + β) φ'(αu_j + β)]``, u ~ N(0, Σ)
        (the tangent is multiplied by φ' feature-wise; Jacot et al. 2018)."""
        out, back = self.kernel_map(s, ctx)
        g, a, _, _ = self.transform()
        kp, _, err = self.inner_derivative_kernel(s.sigma, ctx.quad_nodes)
        c = (g * a) ** 2
        big = float(np.max(np.abs(s.ntk))) if s.n else 0.0
        kmax = float(np.max(np.abs(kp))) if s.n else 0.0
        return out.replace(ntk=c * (s.ntk * kp), ntk_error=c * (kmax * s.ntk_error + big * err)), back



def _number(v):
    """A resolved field: a number, or an array of one value per batch member (kept as it is)."""
    return v if isinstance(v, np.ndarray) else resolved(v)


def _phi_kinks(layer) -> tuple:
    """φ's kinks: the registry's (``ActivationSpec.kinks`` when it has them) or the layer's ``kinks``."""
    return tuple(activations.kinks_of(layer.name, layer.params, layer.kinks) or ())

