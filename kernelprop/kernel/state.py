"""The forward state of the numeric engine at a layer boundary (docs/theory.md §0).

A state may hold a *batch* of kernels (docs/theory.md §15): ``sigma`` of shape (B, N, N), ``mean``
(B, N), the errors of shape (B,), and the layers resolved over the batch hold a numeric field either as
a number or as an array of shape (B,) (one value per member). The maps broadcast over the leading axis
with :func:`per` (a field against a kernel or a vector); an unbatched state is the same code with
scalar fields and 2-D kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np


@dataclass(frozen=True, eq=False)
class Dependence:
    """The linear part of a branch stream in the branch input x: ``f = P x + (part independent of x)``.

    ``kind`` is ``"zero"`` (after fresh zero-mean weights), ``"diag"`` (``P = diag(d)``),
    ``"dense"`` (``P`` an N×N matrix) or ``"unknown"`` (a nonlinearity acted on a stream correlated
    with x; a Dense layer afterwards makes it ``"zero"`` again). ``headwise`` marks a multi-head
    weight-free mixing, whose linear part is exact against x but not against another such branch.
    """

    kind: str
    p: np.ndarray = field(default_factory=lambda: np.zeros(0))
    headwise: bool = False

    @staticmethod
    def identity(n):
        return Dependence("diag", np.ones(n))

    def scale_rows(self, d):
        if self.kind == "diag":
            return Dependence("diag", d * self.p, self.headwise)
        if self.kind == "dense":
            return Dependence("dense", d[..., :, None] * self.p, self.headwise)
        return self

    def scale(self, c) -> Dependence:
        """The dependence of ``c·f`` (``c`` a number or one per batch member)."""
        if self.kind in ("diag", "dense"):
            return Dependence(self.kind, per(c, self.p.ndim - 1) * self.p, self.headwise)
        return self

    def matrix(self, n):
        """``P`` as an (…, N, N) array (a batch of them when ``p`` has a leading batch axis)."""
        if self.kind == "diag":
            return np.diag(self.p) if self.p.ndim == 1 else self.p[..., :, None] * np.eye(n)
        return self.p if self.kind == "dense" else np.zeros((n, n))


ZERO = Dependence("zero")
UNKNOWN = Dependence("unknown")


@dataclass(frozen=True, eq=False)
class KernelState:
    """``sigma`` = Σ = X Xᵀ/d (N×N), ``mean`` = per-token feature mean m (N,), sequence lengths,
    ``gaussian``: the features are i.i.d. Gaussian around the token means (an activation map needs
    this, and a zero mean),
    ``dep``: dependence on the input of the enclosing residual branch (None outside branches),
    ``quad_error``: accumulated error estimate of Σ (quadrature bounds, and the standard error of the
    score-draw average of ``scores="standard"`` attention),
    ``width``: the stream's width as a multiple of the model width (for parameter-gradient norms),
    ``head_blocks``: the features fall into per-head column blocks with different kernels (after a
    weight-free attention whose heads have different biases) and Σ is their average; a map that is
    not linear in Σ, or that mixes each block with its own head again, cannot act on the average.
    ``ntk``: the neural tangent kernel Θ (N×N) of the stream, NTK parametrisation, averaged over
    features (docs/theory.md §14), carried only when asked for (``propagate(..., ntk=True)``), else None;
    ``ntk_error``: its accumulated error estimate (quadrature of K' and of Σ, as ``quad_error``).
    """

    sigma: np.ndarray
    mean: np.ndarray
    segments: tuple
    gaussian: bool = True
    dep: Dependence | None = None
    quad_error: float | np.ndarray = 0.0     # one per member in a batch
    width: float = 1.0
    head_blocks: bool = False
    ntk: np.ndarray | None = None
    ntk_error: float = 0.0

    def replace(self, **kw) -> KernelState:
        """A copy with the fields ``kw`` changed (a shallow copy of the field values, as ``dataclasses.replace``
        without re-running ``__init__``: the maps call it several times per layer)."""
        if not _STATE_FIELDS.issuperset(kw):
            raise TypeError(f"KernelState has no field {sorted(set(kw) - _STATE_FIELDS)[0]!r}")
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__, **kw)
        return new

    @property
    def n(self) -> int:
        return self.sigma.shape[-1]

    @property
    def batch(self) -> int | None:
        """The number of kernels in a batched state (``sigma`` of shape (B, N, N)), None for one kernel."""
        return self.sigma.shape[0] if self.sigma.ndim == 3 else None


def per(x, trailing: int):
    """A field value against an array with ``trailing`` axes per batch member: a number as it is, an array
    of shape (B,) (one value per member) as (B, 1, …, 1), so ``per(w, 2) * sigma`` scales each kernel by
    its own member's value."""
    if not isinstance(x, np.ndarray) or x.ndim == 0:
        return x
    return x.reshape(x.shape + (1,) * trailing)


def nonzero(x) -> bool:
    """Whether a field value (a number, or one per batch member) is non-zero for some member."""
    return bool((x != 0).any()) if isinstance(x, np.ndarray) else x != 0


def is_one(x) -> bool:
    """Whether a field value is exactly 1 for every member (a multiplication by it can be skipped)."""
    return bool((x == 1.0).all()) if isinstance(x, np.ndarray) else x == 1.0


_STATE_FIELDS = frozenset(f.name for f in fields(KernelState))
