"""The two token algebras the symbolic maps run on.

* :class:`Equi` — the equicorrelated family on T tokens (T a symbol): every matrix is
  ``x I + y 11ᵀ``, stored by its diagonal ``d = x + y`` and off-diagonal ``o = y`` entries; every
  vector is ``v 1``. The family is closed under sums, products (``11ᵀ11ᵀ = T 11ᵀ``), entrywise maps
  and uniform bidirectional attention ``11ᵀ/T`` (Noci et al. 2022), so a whole block maps (q, ρ) to
  (q', ρ'). Causal masks and position biases leave it and are refused.
* :class:`Explicit` — explicit N×N sympy matrices for small N (several sequences allowed; attention
  mixes within each).

Both expose the same operations, so :mod:`kernelprop.symbolic.maps` is written once.
"""

from __future__ import annotations

import numpy as np
import sympy as sp

from ..errors import NotSupportedError

# ----------------------------------------------------------------------------------------------
# equicorrelated family


class EqMatrix:
    """``(d − o) I + o 11ᵀ`` on T tokens."""

    __slots__ = ("d", "o", "T")

    def __init__(self, d, o, T):
        self.d, self.o, self.T = sp.sympify(d), sp.sympify(o), T

    def _new(self, d, o):
        return EqMatrix(d, o, self.T)

    def __add__(self, other):
        return self._new(self.d + other.d, self.o + other.o)

    def __sub__(self, other):
        return self._new(self.d - other.d, self.o - other.o)

    def __mul__(self, k):
        return self._new(k * self.d, k * self.o)

    __rmul__ = __mul__

    def __matmul__(self, other):
        if isinstance(other, EqVector):
            return EqVector(((self.d - self.o) + self.T * self.o) * other.v)
        x1, y1, x2, y2 = self.d - self.o, self.o, other.d - other.o, other.o
        x, y = x1 * x2, x1 * y2 + y1 * x2 + self.T * y1 * y2
        return self._new(x + y, y)

    @property
    def t(self):
        return self

    def diag(self):
        return EqVector(self.d)

    def entrywise(self, off, diag):
        """``K_ij = off(Σ_ii, Σ_jj, Σ_ij)`` off the diagonal, ``diag(Σ_ii)`` on it."""
        return self._new(diag(self.d), off(self.d, self.d, self.o))

    def scale_rows(self, v):
        """``diag(v) M``."""
        return self * v.v

    def scale_both(self, v):
        """``diag(v) M diag(v)``."""
        return self * (v.v * v.v)

    def map_diag(self, f):
        return self._new(f(self.d), self.o)

    def is_zero(self):
        return _zero(self.d) and _zero(self.o)

    def xreplace(self, rule):
        return self._new(self.d.xreplace(rule), self.o.xreplace(rule))


class EqVector:
    """``v 1``."""

    __slots__ = ("v",)

    def __init__(self, v):
        self.v = sp.sympify(v)

    def __add__(self, other):
        return EqVector(self.v + other.v)

    def __sub__(self, other):
        return EqVector(self.v - other.v)

    def __mul__(self, k):
        return EqVector(k * self.v) if not isinstance(k, EqVector) else EqVector(self.v * k.v)

    __rmul__ = __mul__

    def map(self, f):
        return EqVector(f(self.v))

    def is_zero(self):
        return _zero(self.v)


class Equi:
    """Builders of the equicorrelated algebra on ``T`` tokens of one sequence."""

    mode = "equicorrelated"

    def __init__(self, T):
        self.T = T

    def eye(self):
        return EqMatrix(1, 0, self.T)

    def ones(self):
        return EqMatrix(1, 1, self.T)

    def zeros(self):
        return EqMatrix(0, 0, self.T)

    def vector(self, v=0):
        return EqVector(v)

    def outer(self, u, v):
        return EqMatrix(u.v * v.v, u.v * v.v, self.T)

    def zero_score(self, layer, where, bias):
        """``softmax(0 + mask)``: ``11ᵀ/T`` bidirectional; causal and biased ones leave the family."""
        if layer.causal:
            raise NotSupportedError(
                f"{where}: causal attention does not preserve equicorrelation (the causal uniform matrix "
                "A_ij = 1/i, j ≤ i, gives Σ'_ij that depends on max(i, j)); use the explicit mode "
                "(mode=\"explicit\", CLI --explicit T) for a small number of tokens T")
        if bias is not None:
            raise NotSupportedError(
                f"{where}: attention score biases (ALiBi or a bias matrix) depend on token positions and "
                "break equicorrelation; use the explicit mode (CLI --explicit T)")
        return EqMatrix(1 / self.T, 1 / self.T, self.T)

    def tied(self, layer, sigma, where, bias, scale):
        """``softmax(σ_qk² Σ)`` of an equicorrelated Σ: ``(e^{σ_qk²(d−o)} I + 11ᵀ)/(e^{σ_qk²(d−o)} + T − 1)``."""
        self.zero_score(layer, where, bias)  # same refusals
        e = sp.exp(scale * (sigma.d - sigma.o))
        return EqMatrix(e / (e + self.T - 1), 1 / (e + self.T - 1), self.T)

    def linear(self, layer, sigma, where, bias, scale):
        """Identity attention ``A = σ_qk² Σ`` (no softmax; Hron et al. 2020) of an equicorrelated Σ."""
        self.zero_score(layer, where, bias)  # same refusals
        return EqMatrix(scale * sigma.d, scale * sigma.o, self.T)

    def heads(self, layer, alibi_scale):
        return [(sp.Integer(1), None)]


# ----------------------------------------------------------------------------------------------
# explicit small-T matrices


class ExMatrix:
    """An explicit N×N sympy matrix."""

    __slots__ = ("m",)

    def __init__(self, m):
        self.m = m

    def __add__(self, other):
        return ExMatrix(self.m + other.m)

    def __sub__(self, other):
        return ExMatrix(self.m - other.m)

    def __mul__(self, k):
        return ExMatrix(self.m * k)

    __rmul__ = __mul__

    def __matmul__(self, other):
        if isinstance(other, ExVector):
            return ExVector(self.m * other.v)
        return ExMatrix(self.m * other.m)

    @property
    def t(self):
        return ExMatrix(self.m.T)

    def diag(self):
        return ExVector(sp.Matrix([self.m[i, i] for i in range(self.m.rows)]))

    def entrywise(self, off, diag):
        n = self.m.rows
        out = sp.zeros(n, n)
        for i in range(n):
            out[i, i] = diag(self.m[i, i])
            for j in range(i + 1, n):
                out[i, j] = out[j, i] = off(self.m[i, i], self.m[j, j], self.m[i, j])
        return ExMatrix(out)

    def scale_rows(self, v):
        return ExMatrix(sp.diag(*v.v) * self.m)

    def scale_both(self, v):
        n = self.m.rows
        return ExMatrix(sp.Matrix(n, n, lambda i, j: v.v[i] * self.m[i, j] * v.v[j]))

    def map_diag(self, f):
        out = self.m.copy()
        for i in range(out.rows):
            out[i, i] = f(out[i, i])
        return ExMatrix(out)

    def is_zero(self):
        return all(_zero(x) for x in self.m)

    def xreplace(self, rule):
        return ExMatrix(self.m.xreplace(rule))


class ExVector:
    __slots__ = ("v",)

    def __init__(self, v):
        self.v = v

    def __add__(self, other):
        return ExVector(self.v + other.v)

    def __sub__(self, other):
        return ExVector(self.v - other.v)

    def __mul__(self, k):
        if isinstance(k, ExVector):
            return ExVector(sp.Matrix([a * b for a, b in zip(self.v, k.v)]))
        return ExVector(self.v * k)

    __rmul__ = __mul__

    def map(self, f):
        return ExVector(sp.Matrix([f(x) for x in self.v]))

    def is_zero(self):
        return all(_zero(x) for x in self.v)


class Explicit:
    """Builders of explicit matrices for sequences of lengths ``segments`` (N = their sum)."""

    mode = "explicit"

    def __init__(self, segments):
        self.segments = tuple(int(t) for t in segments)
        self.n = sum(self.segments)

    def eye(self):
        return ExMatrix(sp.eye(self.n))

    def ones(self):
        return ExMatrix(sp.ones(self.n, self.n))

    def zeros(self):
        return ExMatrix(sp.zeros(self.n, self.n))

    def vector(self, v=0):
        return ExVector(sp.Matrix([sp.sympify(v)] * self.n))

    def outer(self, u, v):
        return ExMatrix(u.v * v.v.T)

    def _blocks(self, block):
        out = sp.zeros(self.n, self.n)
        start = 0
        for t in self.segments:
            out[start:start + t, start:start + t] = block(start, t)
            start += t
        return ExMatrix(out)

    def _softmax(self, layer, logits, bias):
        """Row softmax of ``logits + bias + causal mask`` (t×t sympy)."""
        t = logits.rows
        z = logits + (bias[:t, :t] if bias is not None else sp.zeros(t, t))
        out = sp.zeros(t, t)
        for i in range(t):
            keys = [j for j in range(t) if (j <= i or not layer.causal) and z[i, j] != -sp.oo]
            if not keys:
                from ..errors import SpecError
                raise SpecError("attention.bias", f"row {i} fully masked",
                                "every query needs at least one allowed key: "
                                "remove the -inf entries that empty the row")
            ex = {j: sp.exp(z[i, j]) for j in keys}
            tot = sum(ex.values())
            for j in keys:
                out[i, j] = ex[j] / tot
        return out

    def zero_score(self, layer, where, bias):
        if bias is None:
            if layer.causal:  # A_ij = 1/i for j ≤ i (1-based)
                return self._blocks(lambda s, t: sp.Matrix(t, t, lambda i, j: sp.Rational(1, i + 1) if j <= i else 0))
            return self._blocks(lambda s, t: sp.ones(t, t) / t)
        return self._blocks(lambda s, t: self._softmax(layer, sp.zeros(t, t), bias))

    def tied(self, layer, sigma, where, bias, scale):
        return self._blocks(lambda s, t: self._softmax(layer, scale * sigma.m[s:s + t, s:s + t], bias))

    def linear(self, layer, sigma, where, bias, scale):
        """Identity attention ``A = σ_qk² Σ + B`` (no softmax; Hron et al. 2020), causal entries zeroed."""
        def block(s, t):
            a = scale * sigma.m[s:s + t, s:s + t] + (bias[:t, :t] if bias is not None else sp.zeros(t, t))
            return sp.Matrix(t, t, lambda i, j: a[i, j] if (j <= i or not layer.causal) else 0)
        return self._blocks(block)

    def heads(self, layer, alibi_scale):
        """``[(weight, bias matrix or None)]`` per distinct head, as
        :func:`kernelprop.kernel.attention.head_mixings`."""
        t = max(self.segments)
        if layer.bias is None:
            return [(sp.Integer(1), None)]
        if isinstance(layer.bias, str):  # ALiBi: B_ij = −s_h |i − j|, s_h = scale·2^{−8h/H} (Press et al. 2022)
            return [(sp.Rational(1, layer.heads),
                     sp.Matrix(t, t, lambda i, j: -alibi_scale
                               * sp.Integer(2) ** sp.Rational(-8 * h, layer.heads)  # noqa: B023 - sp.Matrix calls it now
                               * abs(i - j)))
                    for h in range(1, layer.heads + 1)]
        b = np.asarray(layer.bias, dtype=float)
        if b.shape[-1] < t:
            from ..errors import SpecError
            raise SpecError("attention.bias", f"{b.shape[-1]}×{b.shape[-1]} matrix",
                            f"must cover the longest sequence ({t} tokens)")
        conv = lambda m: sp.Matrix(t, t, lambda i, j: _num(m[i, j]))
        if b.ndim == 2:
            return [(sp.Integer(1), conv(b))]
        return [(sp.Rational(1, layer.heads), conv(bh)) for bh in b]


# a matrix or vector of either algebra
Matrix = EqMatrix | ExMatrix
Vector = EqVector | ExVector


def _num(x):
    from .symbols import number
    return -sp.oo if x == -np.inf else number(x)


def _zero(e) -> bool:
    e = sp.sympify(e)
    return e == 0 or e.is_zero is True
