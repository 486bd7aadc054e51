"""Finite-width forward pass: the same layer descriptions, interpreted with random weights.

Features are a float64 array ``X`` of shape ``(B, N, w)``: B seeds of a batch, N tokens (all
sequences stacked), width w. Every seed has its own random stream, so a seed's network does not
depend on how seeds are batched. The kernel of a seed is ``Σ̂ = X Xᵀ / w`` and its token means
``m̂ = X 1 / w`` (docs/theory.md §0); as ``w → ∞`` they converge to the engine's ``(Σ, m)``.

This module holds what every layer's finite-width rule shares: the seeds' random streams
(:class:`Context`), weight draws (Gaussian or scaled orthogonal, explicit or projected in law), input
features with exactly the requested kernel, and the plan that checks shapes and memory before any
draw. The rules themselves live with each layer (:meth:`kernelprop.layers.Layer.sample`, in
:mod:`kernelprop.layers`): Dense ``X W + 1bᵀ``; ``scale·φ(X)``; LayerNorm/RMSNorm over features;
inverted dropout masks; attention per head with the engine's matrices (docs/theory.md §2); the actual
residual and parallel sums. With ``ctx.tape`` each rule also returns its exact transpose.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import NotSupportedError, SpecError

INITS = ("gaussian", "orthogonal")
INPUT_KINDS = ("exact", "gaussian")
SCORE_OVERRIDES = ("independent", "standard")
GIB = 2**30
DEFAULT_MEMORY = 24 * GIB
BATCH_BUDGET = 128 * 2**20  # bytes of live arrays a batch of seeds may use (auto batching)
WEIGHT_BUDGET = 8 * 2**20   # bytes of one stacked weight array: beyond this, batching only costs cache


def segment_slices(segments):
    start = 0
    for t in segments:
        yield slice(start, start + t), t
        start += t


# ----------------------------------------------------------------------------------------------
# context: random streams and options of one batch


@dataclass
class Context:
    """Options and the random streams of one batch of seeds."""

    gens: list
    width: int
    segments: tuple
    init: str | None = None          # global weight-distribution override
    scores: str | None = None        # attention-score override ("independent" | "standard")
    products: str = "auto"           # "explicit" weight matrices, or "auto": project when N < fan_in
    where: str = "?"
    cache: dict = field(default_factory=dict)
    tape: bool = False               # also build each layer's backward rule (explicit weights)
    path: str = ""                   # layer path, for parameter-gradient names
    bctx: Context | None = None    # the backward stream (virtual keys of zero-query layers), or None
    shared: dict | None = None       # weights shared across blocks: the first block's draws, by key
    share_key: tuple | None = None   # the running part's key in ``shared`` (None: draw afresh)
    share_calls: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return len(self.gens)

    def share(self, key: tuple | None) -> None:
        """Start a part whose weights are shared under ``key`` (None: its own weights)."""
        self.share_key = key
        self.share_calls = {}

    def normal(self, shape) -> np.ndarray:
        """``(B, *shape)`` standard normals, seed b drawn from its own stream.

        Inside a shared part (:meth:`share`) the k-th draw of the layer at ``path`` is the first block's
        k-th draw there: every weight matrix and bias is reused by every block (docs/theory.md §13)."""
        if self.shared is None or self.share_key is None:
            return _fill(self.gens, shape, "standard_normal")
        k = self.share_calls.get(self.path, 0)
        self.share_calls[self.path] = k + 1
        key = (self.share_key, self.path, k, tuple(shape))
        draw = self.shared.get(key)
        if draw is None:
            draw = self.shared[key] = _fill(self.gens, shape, "standard_normal")
        return draw.copy()

    def uniform(self, shape) -> np.ndarray:
        """``(B, *shape)`` uniforms on [0, 1), seed b drawn from its own stream."""
        return _fill(self.gens, shape, "random")


_POOL = None
_THREADED = 1 << 16   # entries per seed above which the streams are filled in parallel threads


def _fill(gens, shape, method):
    """Fill ``(B, *shape)`` from the B streams; large draws use one thread per core (numpy's
    generators release the GIL while filling an array, and each stream stays in its own thread)."""
    global _POOL
    out = np.empty((len(gens), *shape))
    if len(gens) > 1 and math.prod(shape) >= _THREADED and (os.cpu_count() or 1) > 1:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor
            _POOL = ThreadPoolExecutor(max_workers=os.cpu_count())
        list(_POOL.map(lambda b: getattr(gens[b], method)(out=out[b]), range(len(gens))))
    else:
        for b, g in enumerate(gens):
            getattr(g, method)(out=out[b])
    return out


def weights(ctx: Context, fan_in: int, fan_out: int, var: float, init: str = "gaussian") -> np.ndarray:
    """``(B, fan_in, fan_out)`` weights with ``E[W Wᵀ] = var · (fan_out/fan_in) I``.

    Gaussian: i.i.d. ``N(0, var/fan_in)``. Orthogonal: Haar frame from the QR of a Gaussian matrix
    with the signs of ``diag R`` fixed (Mezzadri 2007), scaled by ``sqrt(var · max(1, fan_out/fan_in))``
    so that ``W Wᵀ = var (fan_out/fan_in) I`` exactly when ``fan_out ≥ fan_in``.
    """
    init = ctx.init or init
    if init == "gaussian":
        w = ctx.normal((fan_in, fan_out))
        w *= math.sqrt(var / fan_in)
        return w
    tall = fan_in >= fan_out
    g = ctx.normal((fan_in, fan_out) if tall else (fan_out, fan_in))
    q, r = np.linalg.qr(g)
    q *= np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    w = q if tall else np.swapaxes(q, -1, -2)
    w *= math.sqrt(var * max(1.0, fan_out / fan_in))
    return w


def project(ctx: Context, x: np.ndarray, fan_out: int, var: float, init: str = "gaussian") -> np.ndarray:
    """``X W`` for fresh weights ``W`` (fan_in × fan_out) drawn as :func:`weights`, exact in law.

    Each weight matrix multiplies one ``X`` only, so ``X W`` may be drawn directly (with weights shared
    across blocks it does not: :func:`~kernelprop.montecarlo.simulate` then forms them explicitly). With the thin QR
    ``Xᵀ = U R`` (U: fan_in × N, orthonormal columns), ``X W = Rᵀ (Uᵀ W)``, and by rotation invariance
    ``Uᵀ W`` is i.i.d. ``N(0, var/fan_in)`` for Gaussian W; for scaled orthogonal W (the first rows or
    columns of a Haar matrix O of size m = max(fan_in, fan_out)) it is ``c·P[:, :fan_out]`` with P
    (N × m) a Haar frame of orthonormal rows and ``c = sqrt(var · max(1, fan_out/fan_in))``. Cost
    O(N²(fan_in + fan_out)) and N·max(fan_in, fan_out) random numbers instead of O(N fan_in fan_out) and
    fan_in·fan_out; used when ``N < fan_in`` (``ctx.products == "auto"``), else the explicit product.
    """
    b, n, fan_in = x.shape
    init = ctx.init or init
    if ctx.products == "explicit" or n >= fan_in:
        return np.matmul(x, weights(ctx, fan_in, fan_out, var, init))
    r = np.swapaxes(np.linalg.qr(np.swapaxes(x, -1, -2), mode="r"), -1, -2)     # (B, N, N) = Rᵀ
    if init == "gaussian":
        g = ctx.normal((n, fan_out))
        g *= math.sqrt(var / fan_in)
        return np.matmul(r, g)
    q, rr = np.linalg.qr(ctx.normal((max(fan_in, fan_out), n)))
    q *= np.sign(np.diagonal(rr, axis1=-2, axis2=-1))[:, None, :]
    q = q[:, :fan_out, :] * math.sqrt(var * max(1.0, fan_out / fan_in))
    return np.matmul(r, np.swapaxes(q, -1, -2))


# ----------------------------------------------------------------------------------------------
# inputs


def sample_inputs(inputs, width: int, gens, kind: str = "exact") -> np.ndarray:
    """Features ``X`` (B, N, d) whose kernel is the input kernel ``Σ⁰`` with token means ``m``.

    ``X = m 1ᵀ + F P sqrt(d)`` with ``F Fᵀ = Σ⁰ − m mᵀ`` (eigen-factor, so repeated tokens stay
    identical) and, for ``"exact"``, ``P`` N×d with orthonormal rows orthogonal to ``1`` (Haar):
    then ``X Xᵀ/d = Σ⁰`` and ``X 1/d = m`` exactly (needs ``d ≥ N + 1``). ``"gaussian"``: ``P`` i.i.d.
    ``N(0, 1/d)``, so only ``E[X Xᵀ/d] = Σ⁰`` and ``E[X 1/d] = m``.
    """
    sigma, m = inputs.sigma, inputs.mean
    centred = sigma - np.outer(m, m)
    lam, vec = np.linalg.eigh(centred)
    if lam[0] < -1e-10 * max(lam[-1], 1e-300):
        raise SpecError("input.mean", "means larger than the token norms",
                        "Σ⁰ − m mᵀ must be positive semi-definite (a token's squared mean cannot exceed Σ⁰_ii)")
    factor = vec * np.sqrt(np.clip(lam, 0.0, None))
    n = sigma.shape[0]
    ctx = Context(list(gens), width, inputs.segments)
    if kind == "exact":
        g = ctx.normal((width, n))
        g -= g.mean(axis=1, keepdims=True)          # Gaussian in the complement of 1
        q, r = np.linalg.qr(g)
        q *= np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
        p = np.swapaxes(q, -1, -2) * math.sqrt(width)  # (B, N, d): P Pᵀ = d I, P 1 = 0
    else:
        p = ctx.normal((n, width))
    x = np.matmul(factor, p)
    x += m[:, None]
    return x


# ----------------------------------------------------------------------------------------------
# layers: each layer's finite-width rule lives with the layer (:meth:`kernelprop.layers.Layer.sample`)


def forward(layer, x: np.ndarray, ctx: Context) -> np.ndarray:
    """Apply one resolved layer to features ``x`` (B, N, w)."""
    return sample(layer, x, ctx)[0]


def sample(layer, x: np.ndarray, ctx: Context):
    """``(X_out, pull)`` of one resolved layer (its :meth:`~kernelprop.layers.Layer.sample`), refusals named."""
    try:
        return layer.sample(x, ctx)
    except NotSupportedError as exc:
        if str(exc).startswith(ctx.where):
            raise
        raise NotSupportedError(f"{ctx.where}: {exc}") from None


def gram_dot(x, g):
    """``‖xᵀ g‖_F²`` per seed, as ``⟨x xᵀ, g gᵀ⟩`` (cheap when N ≪ width)."""
    return np.einsum("bij,bij->b", np.matmul(x, np.swapaxes(x, -1, -2)), np.matmul(g, np.swapaxes(g, -1, -2)))


# ----------------------------------------------------------------------------------------------
# planning: shapes, validity and memory, before any random number is drawn


@dataclass
class Plan:
    """What a simulation will allocate: widths, weight sizes, attention shapes, records. Layers add
    to it in their :meth:`~kernelprop.layers.Layer.plan` (shapes checked before any random number)."""

    width: int = 0             # the model width d
    segments: tuple = ()
    init: str | None = None    # global weight-distribution override
    scores: str | None = None  # attention-score override
    products: str = "auto"
    max_width: int = 0
    max_weight: int = 0        # largest fan_in · fan_out
    max_scores: int = 0        # largest H · t² (per seed)
    max_nesting: int = 0
    weight_count: int = 0      # weight entries per seed over the whole network
    flops: float = 0.0         # multiply-adds of the matrix products per seed
    records: int = 0
    orthogonal: bool = False
    nesting: int = 0
    shapes: list = field(default_factory=list)   # (fan_in, fan_out) of every weight, in order
    shared_weights: int = 0    # weight entries per seed kept for reuse across blocks

    def enter(self) -> None:
        """Into a residual or parallel branch (one more live stream)."""
        self.nesting += 1
        self.max_nesting = max(self.max_nesting, self.nesting)

    def leave(self) -> None:
        self.nesting -= 1

    def add_weight(self, fan_in: int, fan_out: int, kind: str) -> None:
        """Count one weight matrix (its size as drawn: explicit, or the projected form when N < fan_in)."""
        n = sum(self.segments)
        self.shapes.append((fan_in, fan_out))
        explicit = self.products == "explicit" or n >= fan_in
        size = fan_in * fan_out if explicit else n * max(fan_in, fan_out)
        self.max_weight = max(self.max_weight, size)
        self.weight_count += size
        self.flops += n * fan_in * fan_out if explicit else n * n * (fan_in + fan_out)
        self.orthogonal |= kind == "orthogonal"

    def batch_bytes(self, batch: int, n: int, t_max: int) -> int:
        live = 4 + 2 * self.max_nesting
        per_seed = (n * self.max_width * live + self.max_weight * (3 if self.orthogonal else 1)
                    + 4 * self.max_scores + 6 * t_max * self.max_width + 3 * n * n + self.shared_weights)
        return 8 * batch * per_seed

    def auto_batch(self, seeds: int, n: int, t_max: int) -> int:
        """Seeds per batch: stacking pays while the arrays stay small (many short numpy calls); a
        stacked explicit weight array beyond a few MiB only adds memory traffic."""
        by_total = BATCH_BUDGET // max(1, self.batch_bytes(1, n, t_max))
        by_weight = WEIGHT_BUDGET // max(1, 8 * self.max_weight)
        return int(max(1, min(seeds, by_total, by_weight)))

    def stored_bytes(self, seeds: int, n: int, t0: int, keep_kernels: bool) -> int:
        kernels = 2 * self.records * n * n if keep_kernels else 0
        return 8 * (kernels + 2 * self.records * n + seeds * self.records * (16 + 2 * t0))


def plan(network, width: int, segments, init: str | None, scores: str | None,
         products: str = "auto", *, shared: bool = False) -> Plan:
    """Walk every resolved layer once: check the widths and attention shapes, count the work.

    A network with ``shared_weights`` needs ``shared=True`` (the forward simulation reuses the first
    block's draws; the backward simulation does not) and the same weight shapes in every block."""
    from ..network.walk import units
    if getattr(network, "shared_weights", False) and not shared:
        raise NotSupportedError("the finite-width backward pass with shared_weights = true is not implemented: "
                                "the gradient of each shared matrix would be the sum over its uses in every block; "
                                "simulate and check run the forward pass")
    p = Plan(width=width, segments=tuple(segments), init=init, scores=scores, products=products, max_width=width)
    w = width
    first: list | None = None
    for unit in units(network):
        where = f"block {unit.block}" if unit.section == "block" else unit.section
        start = len(p.shapes)
        w = unit.layer.plan(w, where, p)
        if shared and unit.section == "block":
            mine = p.shapes[start:]
            if first is None:
                first = mine
                p.shared_weights = sum(a * b for a, b in mine)
            elif mine != first:
                raise SpecError("shared_weights", True, f"block {unit.block} needs weight shapes {mine} but block 1 "
                                f"has {first}: shared weights need the same shapes in every block (the block must "
                                "map the stream width to itself)")
    return p


def machine_memory() -> int:
    """Physical memory in bytes (24 GiB if the system does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return DEFAULT_MEMORY
