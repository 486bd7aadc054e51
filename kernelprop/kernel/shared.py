"""The joint-state interpreter: token kernels of networks whose blocks share their weights (docs/theory.md §13).

When every block reuses one set of weights (``Network(shared_weights=True)``: torch's
``nn.TransformerEncoder`` clones, ALBERT, Universal Transformers), a matrix ``W`` meets a new input at
every block, and its outputs are correlated across blocks. In the wide limit, while ``Wᵀ`` is never
used forward, all outputs ``y⁽ᵃ⁾ = x⁽ᵃ⁾ W + b`` of one matrix are jointly Gaussian with
``Cov(y⁽ᵃ⁾_i, y⁽ᵇ⁾_j) = σ_w² ⟨x⁽ᵃ⁾_i, x⁽ᵇ⁾_j⟩ + σ_b²`` and independent of every other matrix's outputs
(Yang 2019, Tensor Programs I). This interpreter carries exactly what that needs.

Every vector the network forms is, token by token, a linear combination with deterministic
coefficients of *elements*: the constant vector 1, and the per-token coordinates of *atoms*

* G-atoms: the input (centred: ``Σ⁰ − m mᵀ``), and each output of a weight matrix;
* H-atoms ``φ̃(z) = φ(αz + β) − E φ(αz + β)``, an activation of a Gaussian stream ``z`` made of the
  outputs of one matrix (centred, so that every element but 1 has zero mean).

The state keeps the Gram matrix of the elements, ``⟨e, e'⟩`` = the limit of ``e·e'/d``, and a
stream as its coefficients ``C`` on the elements and ``c`` on 1 (``c`` = the token means), so
``Σ = C Gram Cᵀ + c cᵀ``. Elements of different matrices are orthogonal, so the Gram matrix is block
diagonal, one block (a *family*) per matrix. The rules, keyed by layer type:

* Dense ``x W + b`` (and attention's output projection): a new G-atom, Gram entries with the
  matrix's earlier outputs ``s s' ⟨x, x'⟩ + t t'`` (``s² = σ_w²``, ``t² = σ_b²`` of each use; attention
  ``s² = σ_v²σ_o²``, input ``(1/H) Σ_h M_h x`` paired head by head), with its H-atoms by Stein's lemma
  ``⟨y_i, φ̃(z_j)⟩ = Cov(y_i, z_j) E[α φ'(αz_j + β)]``;
* Activation ``γ(φ(αz + β) + δ)`` = ``γ φ̃ + γ(E φ + δ) 1``: a new H-atom, with the 2-D Gaussian
  expectations ``E[φ(αz_i + β) ψ(α'z'_j + β')] − E φ E ψ`` against the family's other H-atoms;
* LayerNorm drops ``c`` (centring) and scales token i by ``g/s_i``; RMSNorm, Scale, weight-free
  token mixings ``M``, residual and parallel sums act linearly on ``(C, c)``;
* attention with ``scores = "uniform"`` or ``"tied"``: the engine's deterministic mixings (from the
  current kernel, :mod:`kernelprop.layers.attention.matrices`).

Without shared weights every matrix has one use and the interpreter reproduces
:func:`kernelprop.propagate` (to rounding). Cost: K = N·(1 + atoms) elements; memory about
``8·(Σ_f K_f² + U·N·K/2)`` bytes (K_f the elements of matrix f, U the uses of shared matrices),
work about ``N²·K`` per pair of uses of one matrix; refused beyond ``memory_limit`` by the upper
estimate :func:`estimate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .. import measures as M
from ..errors import NotSupportedError, NumericalError, SpecError
from ..inputs import Inputs
from ..layers.activation import Activation
from ..layers.attention import Attention
from ..layers.base import resolved, unit_scale
from ..layers.composite import Parallel, Residual, Serial
from ..layers.dense import Dense
from ..layers.norm import LayerNorm, RMSNorm
from ..layers.scale import Scale
from ..network.network import Network
from ..network.walk import INPUT, RecordPlan, units
from . import activations, quadrature
from .maps import Context
from .state import KernelState

GIB = 2**30
DEFAULT_MEMORY = 4 * GIB


@dataclass
class Stream:
    """A stream of N token vectors: ``x_i = Σ_e C[i, e] e_i + c_i 1`` over the first ``C.shape[1]``
    elements; ``R = C Gram`` (its inner products with the elements, filled lazily), ``err`` the
    accumulated error estimate of its kernel, ``width`` its width as a multiple of the model width."""

    c: np.ndarray
    C: np.ndarray
    R: np.ndarray | None = None
    err: float = 0.0
    width: float = 1.0


@dataclass
class _Use:
    """One use of a shared matrix: its scales ``s``, ``t`` (weight and bias standard deviations) and,
    per head, ``(weight, C, c)`` of its input; ``local``: the family positions of its output."""

    s: float
    t: float
    inputs: list
    local: np.ndarray


@dataclass
class _HAtom:
    """``φ̃(z) = φ(αz + β) − m`` of the Gaussian stream ``z = Z·(family G elements zloc)``; ``d`` =
    ``E[α φ'(αz + β)]`` (Stein), ``v`` = Var z, ``layer`` the activation."""

    layer: Activation
    zloc: np.ndarray
    Z: np.ndarray
    v: np.ndarray
    m: np.ndarray
    d: np.ndarray
    local: np.ndarray


@dataclass
class _Family:
    """The elements made from one weight matrix (or the input): their Gram block and the matrix's uses."""

    key: tuple
    index: int
    idx: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))   # global element indices
    buf: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))              # Gram, with spare capacity
    size: int = 0
    g_local: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    uses: list = field(default_factory=list)
    hatoms: list = field(default_factory=list)
    shape: tuple | None = None
    where: str = ""

    @property
    def gram(self) -> np.ndarray:
        return self.buf[:self.size, :self.size]

    def append(self, glob: np.ndarray, row: np.ndarray, block: np.ndarray) -> np.ndarray:
        """Add elements ``glob`` with Gram ``row`` against the family's elements and ``block`` among
        themselves; returns their local positions."""
        n, k = len(glob), self.size
        if k + n > self.buf.shape[0]:
            cap = max(3 * self.buf.shape[0] // 2, k + n, 16)
            buf = np.zeros((cap, cap))
            buf[:k, :k] = self.gram
            self.buf = buf
        local = np.arange(k, k + n)
        self.buf[k:k + n, :k] = row
        self.buf[:k, k:k + n] = row.T
        self.buf[k:k + n, k:k + n] = 0.5 * (block + block.T)
        self.size = k + n
        self.idx = np.concatenate([self.idx, glob])
        return local


@dataclass
class _Where:
    """Where a rule runs: ``label`` for messages, ``key`` the family prefix (per block position when
    weights are shared, per unit otherwise), ``path`` the layer path inside the part."""

    label: str
    key: tuple
    path: str = ""

    def child(self, suffix: str) -> _Where:
        return _Where(f"{self.label}/{suffix}", self.key, f"{self.path}/{suffix}")


class Joint:
    """The joint state: elements, their families (Gram blocks) and the layer rules acting on streams."""

    def __init__(self, n: int, segments: tuple, quad_nodes: int | None = None, shared: bool = True):
        self.n, self.segments, self.quad_nodes, self.shared = n, tuple(segments), quad_nodes, shared
        self.K = 0
        self._fam_of = np.zeros(0, dtype=np.int64)
        self._is_h = np.zeros(0, dtype=bool)
        self.families: list[_Family] = []
        self._by_key: dict = {}
        self.ctx = Context(quad_nodes)

    # ------------------------------------------------------------------------------------------
    # elements and streams

    def family(self, key: tuple, where: str) -> _Family:
        fam = self._by_key.get(key)
        if fam is None:
            fam = _Family(key, len(self.families), where=where)
            self.families.append(fam)
            self._by_key[key] = fam
        return fam

    def _new_elements(self, fam: _Family, row: np.ndarray, block: np.ndarray, is_h: bool) -> tuple:
        n = self.n
        glob = np.arange(self.K, self.K + n)
        if self.K + n > len(self._fam_of):
            cap = max(2 * len(self._fam_of), self.K + n, 64)
            self._fam_of = np.concatenate([self._fam_of, np.zeros(cap - len(self._fam_of), dtype=np.int64)])
            self._is_h = np.concatenate([self._is_h, np.zeros(cap - len(self._is_h), dtype=bool)])
        self._fam_of[glob] = fam.index
        self._is_h[glob] = is_h
        self.K += n
        local = fam.append(glob, row, block)
        if not is_h:
            fam.g_local = np.concatenate([fam.g_local, local])
        return glob, local

    def _atom_stream(self, fam: _Family, glob: np.ndarray, local: np.ndarray, width: float, err: float) -> Stream:
        n, k = self.n, self.K
        C = np.zeros((n, k))
        C[:, glob] = np.eye(n)
        R = np.zeros((n, k))
        R[:, fam.idx] = fam.buf[local, :fam.size]
        return Stream(np.zeros(n), C, R, err, width)

    def input_stream(self, inputs: Inputs) -> Stream:
        """The input: ``m 1`` plus one G-atom with Gram ``Σ⁰ − m mᵀ`` (the input family)."""
        m = np.asarray(inputs.mean, dtype=float)
        fam = self.family(("input",), "input")
        glob, local = self._new_elements(fam, np.zeros((self.n, 0)), inputs.sigma - np.outer(m, m), False)
        s = self._atom_stream(fam, glob, local, 1.0, 0.0)
        s.c = m.copy()
        return s

    def rows(self, s: Stream) -> np.ndarray:
        """``R = C Gram`` over every element made so far (the missing columns computed and kept)."""
        k = self.K
        r0 = 0 if s.R is None else s.R.shape[1]
        if s.R is not None and r0 == k:
            return s.R
        R = np.zeros((self.n, k))
        if r0:
            R[:, :r0] = s.R
        kc = s.C.shape[1]
        for f in np.unique(self._fam_of[r0:k]):
            fam = self.families[int(f)]
            nrow = int(np.searchsorted(fam.idx, kc))
            if nrow == 0:
                continue
            col0 = int(np.searchsorted(fam.idx, r0))
            R[:, fam.idx[col0:]] = _mm(s.C[:, fam.idx[:nrow]], fam.buf[:nrow, col0:fam.size])
        s.R = R
        return R

    def inner(self, u: Stream, v: Stream) -> np.ndarray:
        """``⟨u_i, v_j⟩`` (N×N)."""
        k = v.C.shape[1]
        return _mm(self.rows(u)[:, :k], v.C.T) + np.outer(u.c, v.c)

    def kernel(self, u: Stream) -> np.ndarray:
        """``Σ = ⟨u, u⟩``, symmetric."""
        out = self.inner(u, u)
        return 0.5 * (out + out.T)

    def coefficients(self, s: Stream, cols: np.ndarray) -> np.ndarray:
        """``C[:, cols]``, zero for elements made after ``s``."""
        out = np.zeros((self.n, len(cols)))
        ok = cols < s.C.shape[1]
        out[:, ok] = s.C[:, cols[ok]]
        return out

    @staticmethod
    def mix(s: Stream, m: np.ndarray) -> Stream:
        """The token mixing ``M x`` (``M`` N×N)."""
        return Stream(m @ s.c, _mm(m, s.C), None if s.R is None else _mm(m, s.R), s.err, s.width)

    @staticmethod
    def scale_rows(s: Stream, d: np.ndarray, constant: bool = True) -> Stream:
        """Token i times ``d_i`` (``constant=False`` also drops the constant part, LayerNorm's centring)."""
        c = d * s.c if constant else np.zeros_like(s.c)
        return Stream(c, d[:, None] * s.C, None if s.R is None else d[:, None] * s.R, s.err, s.width)

    def combine(self, terms: list, err: float, width: float) -> Stream:
        """``Σ_k a_k s_k`` for ``terms = [(a_k, s_k)]``."""
        k = max(s.C.shape[1] for _, s in terms)
        C = np.zeros((self.n, k))
        c = np.zeros(self.n)
        for a, s in terms:
            C[:, :s.C.shape[1]] += a * s.C
            c += a * s.c
        R = None
        if all(s.R is not None for _, s in terms):
            R = sum(a * self.rows(s) for a, s in terms)
        return Stream(c, C, R, err, width)

    # ------------------------------------------------------------------------------------------
    # atoms

    def weight_atom(self, fam: _Family, inputs: list, s: float, t: float, shape: tuple, where: str,
                    width: float, err: float) -> Stream:
        """A new output ``Σ_h (x_h W_h) + b`` of the matrix of ``fam`` on ``inputs = [(w_h, x_h)]``
        (one entry per distinct head, weights adding to 1): a G-atom (docs/theory.md §13)."""
        if fam.shape is None:
            fam.shape, fam.where = shape, where
        elif not np.allclose(fam.shape, shape):
            raise SpecError("shared_weights", True,
                            f"{where}: the shared matrix would need shape {_shape(shape)} here but has "
                            f"{_shape(fam.shape)} in {fam.where}; a block with shared weights must map the stream "
                            "width to itself (every block's weights need the shapes of the first block's)")
        n = self.n
        rows_in = [(w, x, self.rows(x)) for w, x in inputs]
        row = np.zeros((n, fam.size))
        for use in fam.uses:
            if len(use.inputs) != len(inputs):
                raise NotSupportedError(f"{where}: the heads' attention matrices differ in number between blocks "
                                        f"({len(use.inputs)} and {len(inputs)} distinct heads)")
            acc = np.full((n, n), t * use.t)
            for (w, x, R), (_, C2, c2) in zip(rows_in, use.inputs):
                acc += (s * use.s * w) * (_mm(R[:, :C2.shape[1]], C2.T) + np.outer(x.c, c2))
            row[:, use.local] = acc
        for h in fam.hatoms:   # Stein: ⟨y_i, φ̃(z_j)⟩ = Cov(y_i, z_j) E[α φ'(α z_j + β)]
            row[:, h.local] = _mm(row[:, h.zloc], h.Z.T) * h.d[None, :]
        block = np.full((n, n), t * t)
        for w, x, _ in rows_in:
            block += (s * s * w) * self.kernel(x)
        glob, local = self._new_elements(fam, row, block, False)
        if self.shared:
            fam.uses.append(_Use(s, t, [(w, x.C.copy(), x.c.copy()) for w, x in inputs], local))
        else:
            fam.uses.append(_Use(s, t, [], local))
        return self._atom_stream(fam, glob, local, width, err)

    def activation(self, layer: Activation, z: Stream, where: str) -> Stream:
        """``γ(φ(αz + β) + δ) = γ φ̃(z) + γ(E φ + δ) 1``: a new H-atom of ``z``'s family."""
        g, a, _, dl = layer.transform()
        if np.any(z.c):
            raise NotSupportedError(f"{where}: activation {layer.label!r} acts on a stream with a per-token mean; "
                                    "its map needs a zero-mean Gaussian input: put a Dense layer or a centring "
                                    "LayerNorm before it")
        nz = np.flatnonzero(np.any(z.C != 0, axis=0))
        if nz.size and self._is_h[nz].any():
            raise NotSupportedError(f"{where}: activation {layer.label!r} acts on a stream that is not Gaussian "
                                    "(it follows another activation without a Dense layer in between): put a Dense "
                                    "layer before it")
        fams = np.unique(self._fam_of[nz])
        if len(fams) > 1:
            raise NotSupportedError(f"{where}: activation {layer.label!r} acts on a sum of the outputs of several "
                                    "weight matrices (e.g. the residual stream); the shared-weights interpreter "
                                    "needs it to act on the output of one matrix: put a Dense layer before it")
        sig = self.kernel(z)
        kz, m, err = layer.inner_kernel(sig, self.quad_nodes)
        err_in = z.err
        if nz.size == 0:    # z ≡ 0: the constant φ(β)
            return Stream(g * (m + dl), np.zeros((self.n, 0)), None, g * g * (a * a * err_in + err), z.width)
        fam = self.families[int(fams[0])]
        v = np.clip(np.diagonal(sig).copy(), 0.0, None)
        d, derr = self._stein(layer, v)
        err = max(err, derr * float(np.sqrt(v.max())))
        R = self.rows(z)
        row = np.zeros((self.n, fam.size))
        gl = fam.g_local
        row[:, gl] = R[:, fam.idx[gl]] * d[:, None]
        for h in fam.hatoms:
            cov = _mm(R[:, fam.idx[h.zloc]], h.Z.T)
            e, e_err = self._cross(layer, v, h.layer, h.v, cov)
            row[:, h.local] = e - np.outer(m, h.m)
            err = max(err, e_err)
        block = kz - np.outer(m, m)
        glob, local = self._new_elements(fam, row, block, True)
        zloc = gl.copy()
        fam.hatoms.append(_HAtom(layer, zloc, self.coefficients(z, fam.idx[zloc]), v, m, d, local))
        atom = self._atom_stream(fam, glob, local, z.width, g * g * (a * a * err_in + (1.0 + 2.0 * abs(dl)) * err))
        return Stream(g * (m + dl), g * atom.C, None if atom.R is None else g * atom.R, atom.err, atom.width)

    def _stein(self, layer: Activation, v: np.ndarray) -> tuple:
        """``d_i = E[∂_z φ(αz + β)] = α E[φ'(αz_i + β)]``, ``z_i ~ N(0, v_i)``, and its error: from φ' when
        the activation has one, else ``E[z φ(αz + β)]/v`` (Stein's lemma read backwards, by quadrature)."""
        _, a, _, _ = layer.transform()
        if not (callable(layer.name) and layer.derivative is None):
            _, dmean, derr = layer.inner_derivative_kernel(v[:, None, None], self.quad_nodes)
            return a * np.asarray(dmean, dtype=float).reshape(self.n), abs(a) * derr
        ez, err = quadrature.gauss_hermite_kernel(lambda u: u, _shifted(layer), v[:, None, None], self.quad_nodes)
        safe = np.where(v > 0, v, 1.0)
        return np.where(v > 0, ez.reshape(self.n) / safe, 0.0), err / float(np.sqrt(safe.min()))

    def _cross(self, la: Activation, va, lb: Activation, vb, cov) -> tuple:
        """``E[φ_a(α_a u_i + β_a) φ_b(α_b w_j + β_b)]`` for jointly Gaussian ``(u_i, w_j)`` with variances
        ``va_i``, ``vb_j`` and covariance ``cov_ij``: the layer's own kernel map on the 2×2 joint kernels
        when both apply the same function, else 2-D Gauss–Hermite quadrature (with its error estimate)."""
        n1, n2 = cov.shape
        root = np.sqrt(np.outer(va, vb))
        joint = np.empty((n1, n2, 2, 2))
        joint[..., 0, 0] = va[:, None]
        joint[..., 1, 1] = vb[None, :]
        joint[..., 0, 1] = joint[..., 1, 0] = np.clip(cov, -root, root)
        if _same_function(la, lb):
            k, _, err = la.inner_kernel(joint, self.quad_nodes)
            return k[..., 0, 1], err
        (_, a1, b1, _), (_, a2, b2, _) = la.transform(), lb.transform()
        if isinstance(la.name, str) and la.name == lb.name and dict(la.params) == dict(lb.params) \
                and b1 == 0.0 and b2 == 0.0:     # φ(a₁u), φ(a₂w): φ on the rescaled joint kernel
            scale = np.array([a1, a2])
            k, _, err = activations.activation_kernel(la.name, joint * np.outer(scale, scale), la.params,
                                                      nodes=self.quad_nodes)
            return k[..., 0, 1], err
        fa, fb = _shifted(la), _shifted(lb)
        k, err = quadrature.gauss_hermite_kernel(fa, fb, joint, self.quad_nodes)
        return k[..., 0, 1], err

    # ------------------------------------------------------------------------------------------
    # the rules, keyed by layer type

    def apply(self, layer, x: Stream, where: _Where) -> Stream:
        rule = RULES.get(type(layer))
        if rule is None:
            reason = REFUSALS.get(layer.kind, "it has no rule here (the rules are listed in docs/theory.md §13)")
            raise NotSupportedError(f"{where.label}: layer `{layer.kind}` is not supported with shared weights "
                                    f"(the joint-state interpreter): {reason}")
        out = rule(self, layer, x, where)
        if not np.isfinite(out.C).all() or not np.isfinite(out.c).all():
            raise NumericalError(where.label, "the stream's coefficients are not finite",
                                 f"lower weight_var / branch weights or the depth (layer type {layer.kind})")
        return out

    def _serial(self, layer: Serial, x: Stream, where: _Where) -> Stream:
        for i, child in enumerate(layer.layers):
            x = self.apply(child, x, where.child(f"{i}:{child.kind}"))
        return x

    def _sum(self, layer, x: Stream, where: _Where) -> Stream:
        branches, betas = layer.branch_list(), layer.weight_list()
        alpha = resolved(layer.alpha)
        terms, err = [(alpha, x)], alpha * alpha * x.err
        for b, (branch, beta) in enumerate(zip(branches, betas)):
            sub = where.child(f"branch{b}") if len(branches) > 1 else where
            f = self.apply(branch, Stream(x.c, x.C, x.R, 0.0, x.width), sub)
            if beta != 0:
                terms.append((resolved(beta), f))
                err += beta * beta * f.err
        return self.combine(terms, err, x.width)

    def _dense(self, layer: Dense, x: Stream, where: _Where) -> Stream:
        if self.shared and layer.init != "gaussian" and where.key[0] == "block":
            raise NotSupportedError(f"{where.label}: dense.init = {layer.init!r}: the shared-weights limit "
                                    "(docs/theory.md §13) is derived for Gaussian weights; use init = \"gaussian\"")
        bias = resolved(layer.bias_var)
        if layer.is_unit("weight_var"):
            w = unit_scale(self.kernel(x), bias, f"{where.label}.weight_var")
        else:
            w = resolved(layer.weight_var)
        fam = self.family(where.key + (where.path, "dense"), where.label)
        out_w = resolved(layer.width_factor)
        return self.weight_atom(fam, [(1.0, x)], math.sqrt(w), math.sqrt(bias), (x.width, out_w),
                                where.label, out_w, x.err)

    def _norm(self, layer, x: Stream, where: _Where) -> Stream:
        sig = self.kernel(x)
        centre = layer.centring
        if centre:
            sig = sig - np.outer(x.c, x.c)
        var = np.diagonal(sig) + resolved(layer.eps)
        bad = np.flatnonzero(~(var > 0))
        if bad.size:
            raise NumericalError(where.label, f"token {int(bad[0])} has zero variance entering {layer.kind}",
                                 f"set {layer.kind}.eps > 0, or fix the collapse upstream")
        inv = 1.0 / np.sqrt(var)
        g = resolved(layer.gain)
        out = self.scale_rows(x, g * inv, constant=not centre)
        out.err = x.err * g * g * float(inv.max()) ** 2
        return out

    def _scale(self, layer: Scale, x: Stream, where: _Where) -> Stream:
        c = resolved(layer.c)
        out = self.scale_rows(x, np.full(self.n, c))
        out.err = c * c * x.err
        return out

    def _activation(self, layer: Activation, x: Stream, where: _Where) -> Stream:
        return self.activation(layer, x, where.label)

    def _attention(self, layer: Attention, x: Stream, where: _Where) -> Stream:
        if layer.scores == "standard":
            raise NotSupportedError(f"{where.label}: attention with scores = \"standard\" is not supported with "
                                    "shared weights: its scores stay random at infinite width, and with shared "
                                    "W_Q, W_K they are correlated across blocks; use \"uniform\" or \"tied\"")
        if layer.spa != "none":
            raise NotSupportedError(f"{where.label}: attention with spa is not supported with shared weights: its "
                                    "schedules are built for the fresh-weight kernel map (He et al. 2023)")
        sig = self.kernel(x)
        heads = layer.mixings(sig, self.segments, self.ctx)
        mats = [(float(w), m.dense()) for w, m in heads]
        sv = resolved(layer.value_var) if layer.values == "dense" else 1.0
        if layer.projection == "dense":
            mixed = [(w, self.mix(x, m)) for w, m in mats]
            if layer.is_unit("out_var"):
                total = np.zeros((self.n, self.n))
                for w, u in mixed:
                    total += w * self.kernel(u)
                so = unit_scale(total * sv, 0.0, f"{where.label}.out_var")
            else:
                so = resolved(layer.out_var)
            fam = self.family(where.key + (where.path, "attention"), where.label)
            return self.weight_atom(fam, mixed, math.sqrt(sv * so), 0.0, (x.width, x.width), where.label,
                                    x.width, sv * so * x.err)
        if len(mats) > 1:
            raise NotSupportedError(f"{where.label}: attention without an output projection whose heads have "
                                    "different matrices (per-head biases) splits the stream into head blocks, which "
                                    "the shared-weights interpreter does not carry: give every head the same bias "
                                    "or use projection = \"dense\"")
        m = mats[0][1]
        if layer.values == "dense":
            fam = self.family(where.key + (where.path, "values"), where.label)
            v = self.weight_atom(fam, [(1.0, x)], math.sqrt(sv), 0.0, (x.width, x.width), where.label, x.width,
                                 sv * x.err)
            return self.mix(v, m)
        return self.mix(x, m)


def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` on contiguous copies (numpy's matmul of strided views can skip BLAS and run 40× slower)."""
    return np.ascontiguousarray(a) @ np.ascontiguousarray(b)


def _shape(shape) -> str:
    return f"{shape[0]:g}d × {shape[1]:g}d"


def _same_function(a: Activation, b: Activation) -> bool:
    return (a.name is b.name or a.name == b.name) and dict(a.params) == dict(b.params) and \
        a.transform()[1:3] == b.transform()[1:3]


def _shifted(layer: Activation) -> Callable:
    phi, (_, a, b, _) = layer.pointwise(), layer.transform()
    return lambda u: np.asarray(phi(a * u + b), dtype=float)


RULES: dict = {
    Serial: Joint._serial, Residual: Joint._sum, Parallel: Joint._sum, Dense: Joint._dense,
    LayerNorm: Joint._norm, RMSNorm: Joint._norm, Scale: Joint._scale, Activation: Joint._activation,
    Attention: Joint._attention,
}
"""The shared-weights interpreter's rules, by layer type (docs/theory.md §13)."""

REFUSALS = {
    "dropout": "a dropout mask multiplies the stream coordinate by coordinate, which is no linear combination of "
               "the matrices' outputs",
    "gated_mlp": "its product φ(x W_g) ⊙ (x W_u) of two matrices' outputs has no rule in the joint state yet",
}


# ----------------------------------------------------------------------------------------------
# memory estimate


def _atoms(layer) -> list:
    """The atoms one pass of ``layer`` makes, as a list of weight-matrix groups: ``[1 + activations]``
    per weight use (activations counted with the matrix they follow)."""
    if isinstance(layer, (Serial, Residual, Parallel)):
        out: list = []
        for child in layer.children():
            sub = _atoms(child)
            if sub and sub[0] == 0 and out:       # activations right after the previous matrix
                out[-1] += 1
                sub = sub[1:]
            out += [k for k in sub if k]
        return out
    if isinstance(layer, Dense) or (isinstance(layer, Attention) and
                                    (layer.values == "dense" or layer.projection == "dense")):
        return [1]
    if isinstance(layer, Activation):
        return [0]
    return []


def estimate(network: Network, n: int, shared: bool | None = None) -> dict:
    """Elements, Gram and stored-input sizes of a run: ``{"elements", "bytes", "gram_bytes", "input_bytes"}``
    (an upper estimate: the Gram blocks counted with their spare capacity)."""
    shared = network.shared_weights if shared is None else shared
    depth = network.depth
    block = _atoms(network.block)
    edge = [k for part in (network.stem, network.final) for k in _atoms(part)]
    atoms = n * (1 + depth * sum(block) + sum(edge))
    gram = n * n + sum((n * k) ** 2 for k in edge)
    stored = 0
    if shared and depth > 1:
        gram += sum((depth * n * k) ** 2 for k in block)
        stored = len(block) * depth * n * atoms // 2
    else:
        gram += depth * sum((n * k) ** 2 for k in block)
    gram = 9 * gram // 4     # the Gram blocks grow by half when full: up to 2.25 times their size
    live = 16 * n * atoms
    return {"elements": atoms, "gram_bytes": 8 * gram, "input_bytes": 8 * stored,
            "bytes": 8 * (gram + stored + live)}


# ----------------------------------------------------------------------------------------------
# the walk


def propagate(network: Network, inputs: Inputs, *, record: str = "blocks", every: int = 1,
              keep_kernels: bool = True, spectral: bool | str = "auto", quad_nodes: int | None = None,
              progress: Callable[[int, int], None] | None = None, shared: bool | None = None,
              memory_limit: int | None = None):
    """Propagate the token kernel with the joint state (module docstring; docs/theory.md §13).

    ``shared``: reuse each block's weights in every block (default ``network.shared_weights``);
    ``shared=False`` gives every use its own matrix, which reproduces :func:`kernelprop.propagate`.
    Records, measures and errors as :func:`kernelprop.propagate`; ``meta["elements"]`` is the number
    of elements K. Refuses (``SpecError``) when :func:`estimate` exceeds ``memory_limit`` bytes
    (default 4 GiB), and layers without a rule here by name.
    """
    from .propagate import _checked, _finish
    shared = network.shared_weights if shared is None else bool(shared)
    plan = RecordPlan(network, record, every)
    n = inputs.n_tokens
    limit = DEFAULT_MEMORY if memory_limit is None else int(memory_limit)
    need = estimate(network, n, shared)
    if need["bytes"] > limit:
        raise SpecError("depth", network.depth,
                        f"the shared-weights interpreter would hold about {need['bytes'] / GIB:.1f} GiB "
                        f"({need['elements']:,} elements for {n} tokens: Gram blocks {need['gram_bytes'] / GIB:.1f} "
                        f"GiB, inputs of the shared matrices {need['input_bytes'] / GIB:.1f} GiB), more than "
                        f"{limit / GIB:.1f} GiB: lower the depth or the number of tokens, or raise memory_limit "
                        "(kernelprop.kernel.shared.propagate(..., memory_limit=bytes))")
    if spectral == "auto":
        spectral = max(inputs.segments) <= 512
    joint = Joint(n, inputs.segments, quad_nodes, shared)
    x = joint.input_stream(inputs)
    records, means, kernels, rows = [], [], [], []

    def keep(rec, sigma, s):
        records.append(rec)
        means.append(s.c.copy())
        if keep_kernels:
            kernels.append(sigma)
        row = M.compute(sigma, inputs.segments, s.c, spectral=spectral)
        row["quad_error"] = s.err
        rows.append(row)

    keep(INPUT, joint.kernel(x), x)
    for unit in units(network):
        joint.ctx.unit(unit.index)
        key: tuple = ("block",) if shared and unit.section == "block" else ("unit", unit.index)
        for i, part in enumerate(unit.parts):
            label = unit.part_label(i)
            x = joint.apply(part, x, _Where(label, key + (i,)))
            sigma = joint.kernel(x)
            _checked(KernelState(sigma, x.c, inputs.segments), label, part, flush=False)
            rec = plan.after(unit, i)
            if rec is not None:
                keep(rec, sigma, x)
        if unit.section == "block" and progress is not None:
            progress(unit.block, network.depth)
    return _finish(network, inputs, records, means, kernels, rows, keep_kernels,
                   meta={"interpreter": "shared weights" if shared else "joint state, unshared", "elements": joint.K})


__all__ = ["RULES", "Joint", "Stream", "estimate", "propagate"]
