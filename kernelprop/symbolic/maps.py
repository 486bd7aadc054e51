"""The symbolic state and its helpers; each layer's symbolic map lives with the layer
(:meth:`kernelprop.layers.Layer.symbolic_map`).

Same state as the numeric engine (kernel Σ, per-token mean m, Gaussian flag, the branch's linear
dependence on the residual input for exact cross terms), same refusals; the matrices are
:mod:`kernelprop.symbolic.algebra` objects whose entries are sympy expressions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import sympy as sp

from ..errors import NotSupportedError
from .algebra import Matrix, Vector


@dataclass(frozen=True, eq=False)
class Dep:
    """Linear part ``P`` of a branch stream in the branch input x (``kind``: zero, matrix, unknown)."""

    kind: str
    p: Matrix | None = None
    headwise: bool = False

    def scale_rows(self, v):
        return Dep("matrix", self.p.scale_rows(v), self.headwise) if self.kind == "matrix" else self

    def apply(self, m, fam):
        return self.p @ m if self.kind == "matrix" else fam.vector(0)


ZERO = Dep("zero")
UNKNOWN = Dep("unknown")


@dataclass(frozen=True, eq=False)
class State:
    """Σ, m, Gaussian flag and branch dependence (as :class:`kernelprop.kernel.state.KernelState`)."""

    sigma: Matrix
    mean: Vector
    gaussian: bool = True
    dep: Dep | None = None

    def replace(self, **kw):
        return replace(self, **kw)


class Context:
    """Algebra, namespace of symbols, current layer name, and whether to keep opaque activations."""

    clock: dict[str, float]   # {"left": seconds} of simplification, shared by the block map's steps

    def __init__(self, fam, ns, opaque=False):
        self.fam, self.ns, self.opaque = fam, ns, opaque
        self.where = "?"

    def value(self, layer, name):
        return self.ns.value(layer, name)


def apply(layer, s: State, ctx: Context) -> State:
    """The symbolic map of one layer (its :meth:`~kernelprop.layers.Layer.symbolic_map`), refusals named."""
    try:
        return layer.symbolic_map(s, ctx)
    except NotSupportedError as exc:
        if str(exc).startswith(ctx.where):
            raise
        raise NotSupportedError(f"{ctx.where}: {exc}") from None


def nonzero(x) -> bool:
    """Structurally non-zero (a symbol counts as non-zero, as a generic value would)."""
    x = sp.sympify(x)
    return not (x == 0 or x.is_zero is True)


def total(items):
    """The sum of a non-empty iterable of algebra objects."""
    items = list(items)
    out = items[0]
    for x in items[1:]:
        out = out + x
    return out


def second_moment(a: Dep, ma, b: Dep, mb, sigma, m, fam):
    """``E[f_a f_bᵀ] = P_a Σ P_bᵀ + (P_a m) r_bᵀ + r_a (P_b m)ᵀ + r_a r_bᵀ``, ``r = m_f − P m`` (docs/theory.md §1)."""
    if a.kind == "unknown" or b.kind == "unknown":
        raise NotSupportedError(
            "a residual branch ends in a nonlinearity of the skip stream (e.g. an activation with no Dense "
            "layer after it); its cross kernel with the skip has no closed form here: end the branch with a "
            "Dense layer or attention with value weights")
    pm_a, pm_b = a.apply(m, fam), b.apply(m, fam)
    ra, rb = ma - pm_a, mb - pm_b
    if a.kind == "zero" or b.kind == "zero":
        core = fam.zeros()
    else:
        assert a.p is not None and b.p is not None   # a matrix dependence carries its P
        core = a.p @ sigma @ b.p.t
    return core + fam.outer(pm_a, rb) + fam.outer(ra, pm_b) + fam.outer(ra, rb)
