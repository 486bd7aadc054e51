"""Gaussian expectations of elementwise functions: Gauss–Hermite, and Gauss–Kronrod split at kinks.

For a zero-mean Gaussian pair ``(u, v)`` with second moments ``Σii, Σjj, Σij`` the conditional form

    u = sqrt(Σii) z1,   v = sqrt(Σjj) (c z1 + sqrt(1 − c²) z2),   c = Σij / sqrt(Σii Σjj),

with ``z1, z2`` independent standard normals, turns ``E[f(u) g(v)]`` into an iterated integral over
``z1`` (outer) and ``z2`` (inner). It stays well conditioned as ``c → ±1`` (``1 − c² ≤ 16 eps`` is
taken as exactly ``c = ±1``: no inner integral, ``v = ±sqrt(Σjj) z1``) and for a zero-variance token
(``c`` is set to 0, so the entry is ``f(0) E[g(v)]``). docs/theory.md §1.3.

A whole kernel (:func:`gauss_hermite_kernel`) is first evaluated at once by **Mehler's expansion**
in the correlation (:func:`mehler_pairs`): ``E[f(u) g(v)] = Σ_k c_k(a) d_k(b) ρ^k`` with Hermite
coefficients computed once per distinct variance (:func:`hermite_coefficients`), truncated per entry
with a Cauchy–Schwarz/Parseval bound that carries the coefficients' own quadrature errors. Entries it
cannot resolve within ``tol`` (kinked functions at ``|ρ|`` near 1, unresolved sharp features) go to
two per-entry rules:

* **Gauss–Hermite** (smooth f and g, the default for them): the double sum
  ``Σ_a Σ_b w_a w_b f(u_a) g(v_ab)`` over probabilists' Hermite nodes (weights normalised to 1;
  nodes with ``w·max(1, z⁴) < 1e-20`` dropped, so ``n = 64 … 1024`` cost ``m²`` evaluations,
  ``m ≈ 48 … 200``). Estimate ``d_n = |K_n − K_{n/2}|``, inflated to ``max(d_n, d_{n/2})`` times a
  geometric tail factor when the differences decay slowly (``d_n/d_{n/2} ≥ 0.1``); adaptive per
  entry, ``n = 64, 128, …, 1024``, until it is below ``tol·sqrt(E f(u)² E g(v)²)``. For analytic f, g
  convergence is geometric in ``sqrt(n)`` and ``d_n`` over-estimates the error by orders of
  magnitude. An entry not converged by 1024 nodes (a sharp or kinked function) is recomputed by the
  split rule below, which is kept when its estimate is smaller.
* **Split Gauss–Kronrod** (when there are kinks, declared or found): each variable is truncated
  to ``|z| ≤ Z_MAX = 10`` (outside mass 1.5e-23) and cut into panels at a fixed grid
  (±0.8, ±2.5, ±4.5) and at the kinks: the outer variable at ``z1 = k/sa`` (kinks of f) and at
  ``z1 = k/(sb c)`` (where the inner kink crosses ``z2 = 0``; ``E[g(v) | z1]`` turns there over a
  width ``σ = r/|c|``, so for ``σ < 1`` also at ``± σ, ± 3σ, ± 8σ`` around it), the inner variable
  at the ``z1``-dependent points ``z2 = (k/sb − c z1)/r``. Each panel gets the 21-point Kronrod
  rule and the embedded 10-point Gauss rule; a panel is accepted when ``|K21 − G10|`` is within
  its share of the tolerance, and bisected otherwise (at most 50 times), so a sharp smooth
  feature is still located, at a higher cost. The inner integrals get the tolerance of their
  outer node divided by ``|f(u) ϕ(z1)|``. Error of an entry: the sum over outer panels of
  ``|K21 − G10|``, plus the inner errors weighted by ``|f(u)| ϕ(z1)``, plus round-off
  (``200 eps Σ|values|``, and ``128 eps`` of the largest value per unit length for values
  computed with absolute round-off), plus ``1e-16 sqrt(E f² E g²)`` for the truncation. On each
  smooth piece K21 converges much faster than G10, so this is an upper bound in practice:
  tests/kernel/test_quadrature_bounds.py checks it against scipy's ``quad`` split at the kinks
  over a battery of kinked, jumping, sharp and smooth functions (reported/true ≥ 27 over 364
  entries). ``nodes`` does not apply to it.

Kinks that are not declared (``kinks=None`` for a callable) are looked for (:func:`find_kinks`:
outliers of second and third differences and steep features, zoomed in to round-off) and used as
cuts; ``kinks=()`` declares a function smooth. A kink between the nodes of every rule is otherwise
invisible to both the Gauss–Hermite and the Kronrod estimates (a sliver of a panel beyond its last
node, or a jump narrower than the node spacing as ``c → ±1``).

Limitations: f and g must be bounded by a polynomial times ``exp(x²/(4 max Σii))`` or so (the
truncation; ``|φ|`` growing like ``e^{|x|}`` at variance 10 is fine). A fixed rule (``nodes=n``)
is plain Gauss–Hermite for functions without declared kinks (nothing is looked for), with the
heuristic estimate against ``n/2``; it and ``method="adaptive"`` skip the expansion. The expansion
integrates its coefficients over ``|z| ≤ 12`` on fixed panels, under the same growth condition; a
sharp feature the panels do not resolve shows in the coefficients' Gauss–Kronrod errors and sends
the entries to the per-entry rules.
Cost: the expansion evaluates a dense 256-token kernel of tanh, SiLU or gelu_tanh in ~10 ms and a
2048-token one in 1–2 s on a shared 2-core machine (benchmarks/bench_quadrature.py). By the per-entry rules, a
distinct off-diagonal entry of tanh at variance 1 takes ~0.05 ms by Gauss–Hermite; a kinked
entry by the split rule ~0.5–1 ms (ELU on a dense 64-token kernel, 2080 distinct entries: ~1.2 s;
Gauss–Hermite took 2.2 s there for a 1e-5 error), a sharp one such as tanh(20x) ~2 ms.

Only the upper triangle is computed when ``f is g``, and only once per distinct triple
``(Σii, Σjj, Σij)`` (equicorrelated kernels have two), in chunks that keep the temporary arrays
below about 200 MB.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Iterable

import numpy as np

from ..errors import SpecError

__all__ = [
    "DEFAULT_TOL", "MIN_NODES", "MAX_NODES", "Z_MAX", "check_nodes", "check_kinks", "hermite_rule",
    "kronrod_rule", "find_kinks", "gauss_hermite_kernel", "gauss_hermite_mean", "pair_expectations",
    "single_expectations", "hermite_coefficients", "mehler_pairs",
]

DEFAULT_TOL = 1e-11
"""Target for the error estimate relative to ``sqrt(E f(u)² E g(v)²)``."""
MIN_NODES = 64
"""First adaptive rule (compared with ``MIN_NODES // 2``, which is compared with ``MIN_NODES // 4``)."""
MAX_NODES = 1024
"""Last Gauss–Hermite rule; entries not converged by then go to the split rule."""
Z_MAX = 10.0
"""Truncation of each standard-normal variable in the split rule (``P(|Z| > 10) = 1.5e-23``)."""
_PRUNE = 1e-20
_MEMORY_BYTES = 160 * 2**20
_TRIPLE_BLOCK = 2**17  # distinct triples handled together (per-triple arrays of 1 MB)
_TEMPORARIES = 8  # (P, m, m) float64 arrays alive at once inside a chunk, generous for f, g
_EPS = np.finfo(np.float64).eps
_SNAP = 16.0 * _EPS
_KRONROD = 10  # Gauss points of the Gauss–Kronrod pair (21 Kronrod points)
_GRID = np.array([-Z_MAX, -4.5, -2.5, -0.8, 0.8, 2.5, 4.5, Z_MAX])
_NEAR = 0.3  # grid points closer than this to a breakpoint are dropped
_GRADING = (1.0, 3.0, 8.0)  # extra outer cuts at the inner kink's shadow, in units of its width
_ROUNDS = 50  # bisections of a panel at most
_PANELS = 256  # open panels of one line at most (beyond: accepted with their estimates)
_ROUND_OFF = 200.0 * _EPS
_NOISE = 128.0 * _EPS  # a value's absolute round-off, relative to the line's largest value
_INNER_EVALS = 2**21  # inner evaluations per chunk of inner lines
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TAIL = 1e-16  # truncation allowance, relative to sqrt(E f² E g²): 1e7 × P(|Z| > Z_MAX)


def check_kinks(kinks) -> tuple[float, ...]:
    """``kinks`` as a sorted tuple of distinct floats: ``None`` → ``()``; otherwise an iterable of
    finite real numbers (points in φ's argument where φ or φ' is not smooth), else :class:`SpecError`."""
    if kinks is None:
        return ()
    allowed = ("must be a sequence of finite real numbers: the points in φ's argument where φ or φ' "
               "is not smooth (a kink or a jump), e.g. kinks=(0.0,)")
    if isinstance(kinks, (str, bytes)) or not isinstance(kinks, Iterable):
        raise SpecError("kinks", kinks, allowed)
    out = []
    for k in kinks:
        if isinstance(k, bool) or not isinstance(k, numbers.Real) or not math.isfinite(float(k)):
            raise SpecError("kinks", kinks, allowed)
        out.append(float(k))
    return tuple(sorted(set(out)))


@functools.cache
def kronrod_rule(n: int = _KRONROD) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gauss–Kronrod pair on [-1, 1]: ``(x, w_kronrod, gauss_index, w_gauss)``, 2n+1 and n points.

    The n + 1 new points are the zeros of the Stieltjes polynomial ``E_{n+1}`` (Kronrod 1965), the
    degree-(n+1) polynomial orthogonal to ``P_n x^k``, k ≤ n, found in the Legendre basis; the
    weights make the rule exact for the Legendre polynomials of degree ≤ 2n (the rule is then exact
    to degree 3n + 1, checked in the tests). Arrays are read-only.
    """
    from numpy.polynomial import legendre as leg

    eye = np.eye(2 * n + 2)
    xq, wq = leg.leggauss(2 * n + 2)  # exact for the degree ≤ 3n + 1 products below
    p = np.array([leg.legval(xq, eye[j]) for j in range(n + 2)])
    m = np.einsum("q,q,jq,kq->kj", wq, p[n], p, p[: n + 1])
    coef = np.append(np.linalg.solve(m[:, : n + 1], -m[:, n + 1]), 1.0)
    xg, wg = leg.leggauss(n)
    x = np.sort(np.concatenate([xg, np.sort(leg.legroots(coef).real)]))
    v = np.array([leg.legval(x, eye[j]) for j in range(2 * n + 1)])
    rhs = np.zeros(2 * n + 1)
    rhs[0] = 2.0
    wk = np.linalg.solve(v, rhs)
    gi = np.array([int(np.argmin(np.abs(x - t))) for t in xg])
    out = (x, wk, gi, wg)
    for a in out:
        a.flags.writeable = False
    return out


@functools.cache
def hermite_rule(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilists' Gauss–Hermite rule with ``n`` nodes: ``E[h(Z)] ≈ Σ w_k h(z_k)``, ``Σ w_k = 1``.

    Uses ``numpy.polynomial.hermite_e.hermegauss`` (its recurrence overflows beyond about 300
    nodes, where ``scipy.special.roots_hermitenorm`` is used instead); nodes with
    ``w·max(1, z⁴) < 1e-20`` are dropped. The arrays are read-only.
    """
    n = int(n)
    z = w = None
    if n <= 256:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            z, w = np.polynomial.hermite_e.hermegauss(n)
        if not (np.all(np.isfinite(z)) and np.all(np.isfinite(w))):
            z = w = None
    if z is None or w is None:
        from scipy.special import roots_hermitenorm

        z, w = roots_hermitenorm(n)
    w = w / w.sum()
    keep = w * np.maximum(1.0, z**4) >= _PRUNE
    z, w = np.ascontiguousarray(z[keep]), np.ascontiguousarray(w[keep])
    z.flags.writeable = False
    w.flags.writeable = False
    return z, w


def check_nodes(nodes) -> None:
    """Raise :class:`SpecError` unless ``nodes`` is ``None`` (adaptive) or an integer ≥ 2."""
    if nodes is None:
        return
    if isinstance(nodes, bool) or not isinstance(nodes, numbers.Integral) or nodes < 2:
        raise SpecError("nodes", nodes, "must be an integer ≥ 2 (number of Gauss–Hermite nodes), "
                        "or omitted for the adaptive rule")


def _levels(nodes) -> list[int]:
    """Node counts to try, each compared with the previous one (the first with half of itself)."""
    check_nodes(nodes)
    if nodes is None:
        out, n = [], MIN_NODES
        while n <= MAX_NODES:
            out.append(n)
            n *= 2
        return out
    return [int(nodes)]


def _apply(f, x: np.ndarray) -> np.ndarray:
    """Evaluate a vectorised callable, broadcasting a constant result to ``x``'s shape."""
    y = np.asarray(f(x), dtype=np.float64)
    if y.shape != x.shape:
        y = np.broadcast_to(y, x.shape)
    return y


def _second_moment(f, variances: np.ndarray) -> np.ndarray:
    """``E[f(sqrt(a) Z)²]`` by a 128-node rule: only used as a scale for tolerances."""
    z, w = hermite_rule(128)
    out = np.empty(variances.shape)
    step = max(1, int(_MEMORY_BYTES // (_TEMPORARIES * 8 * z.size)))
    for lo in range(0, variances.size, step):
        x = np.sqrt(variances[lo:lo + step])[:, None] * z
        out[lo:lo + step] = _apply(f, x) ** 2 @ w
    return out


def _pair_sum(f, g, sa, sb, c, r, n):
    """``Σ_a Σ_b w_a w_b f(sa z_a) g(sb (c z_a + r z_b))`` for 1-D arrays of triples, in chunks."""
    z, w = hermite_rule(n)
    m = z.size
    out = np.empty(sa.shape)
    step = max(1, int(_MEMORY_BYTES // (_TEMPORARIES * 8 * m * m)))
    for lo in range(0, sa.size, step):
        sl = slice(lo, lo + step)
        fu = _apply(f, sa[sl, None] * z)                                       # (P, m)
        along = (sb[sl] * c[sl])[:, None] * z                                   # (P, m)
        across = (sb[sl] * r[sl])[:, None] * z                                  # (P, m)
        inner = _apply(g, along[:, :, None] + across[:, None, :]) @ w           # (P, m)
        out[sl] = (fu * inner) @ w
    return out, m


def _single_sum(f, sa, n):
    z, w = hermite_rule(n)
    out = np.empty(sa.shape)
    step = max(1, int(_MEMORY_BYTES // (_TEMPORARIES * 8 * z.size)))
    for lo in range(0, sa.size, step):
        out[lo:lo + step] = _apply(f, sa[lo:lo + step, None] * z) @ w
    return out, z.size


def _adaptive(evaluate, scale, levels, tol):
    """Run ``evaluate(index, n) -> (values, m)`` over the levels; returns (values, errors).

    With ``d_n = |K_n − K_{n/2}|`` and ``ρ = d_n / d_{n/2}``, the error of the ``n``-node value is
    ``d_n`` when ``ρ < 0.1`` (analytic integrands: geometric convergence, ``d_n`` over-estimates the
    error) and otherwise ``max(d_n, d_{n/2}) · min(10, max(1, ρ/(1 − ρ)))`` (kinks and jumps:
    slow, oscillating convergence; ``ρ/(1 − ρ)`` is the tail of a geometric series of
    differences). A round-off floor ``16 eps m scale`` is added.
    """
    size = scale.shape[0]
    first = levels[0]
    idx = np.arange(size)
    quarter, _ = evaluate(idx, max(1, first // 4))
    prev, _ = evaluate(idx, max(1, first // 2))
    prev_diff = np.abs(prev - quarter)
    value, errs = np.empty(size), np.empty(size)
    active = idx
    for k, n in enumerate(levels):
        fine, m = evaluate(active, n)
        diff = np.abs(fine - prev)
        with np.errstate(divide="ignore", invalid="ignore"):
            rho = np.where(diff > 0, diff / prev_diff, 0.0)
            factor = np.where(rho < 10.0 / 11.0, rho / (1.0 - rho), 10.0)
        # geometric regime (ρ < 0.1): d_n; otherwise max(d_n, d_{n/2}) · tail factor, since
        # the differences of a kinked integrand decay slowly and oscillate.
        estimate = np.where(rho < 0.1, diff, np.maximum(diff, prev_diff) * np.clip(factor, 1.0, 10.0))
        value[active] = fine
        errs[active] = estimate + 16.0 * _EPS * m * scale[active]
        if k == len(levels) - 1:
            break
        again = ~(estimate <= tol * scale[active])
        active, prev, prev_diff = active[again], fine[again], diff[again]
        if active.size == 0:
            break
    return value, errs


def _as_kernel(sigma) -> np.ndarray:
    s = np.asarray(sigma, dtype=np.float64)
    if s.ndim < 2 or s.shape[-1] != s.shape[-2]:
        raise SpecError("sigma", getattr(s, "shape", s), "must be a (..., N, N) array of second moments")
    return s


def _pair_indices(n: int, symmetric: bool):
    """Token pairs to compute: the upper triangle (``symmetric``) or all pairs, as int32 arrays."""
    if symmetric:
        ii, jj = np.triu_indices(n)
    else:
        ii, jj = (x.ravel() for x in np.indices((n, n)))
    return ii.astype(np.int32), jj.astype(np.int32)


def _unique_triples(flat, ii, jj, symmetric):
    """Distinct ``(Σii, Σjj, Σij)`` over the pairs ``(ii, jj)`` of every batch element of ``flat``.

    Returns ``(variances, ia, ib, s, inverse)``: the distinct variances, indices into them for the
    two members of each distinct triple, its ``Σij``, and ``inverse`` mapping the flattened
    ``(B, P)`` pairs to the distinct triples; for ``symmetric`` the pair is unordered
    (``ia ≤ ib``). Uses integer keys and 1-D ``np.unique``, so N in the thousands stays fast and
    lean in memory.
    """
    diag = np.clip(np.diagonal(flat, axis1=-2, axis2=-1), 0.0, None)
    dvals, did = np.unique(diag, return_inverse=True)
    did = did.reshape(diag.shape).astype(np.int64)
    svals, sid = np.unique(flat[:, ii, jj].ravel() + 0.0, return_inverse=True)  # -0.0 → 0.0
    nd, ns = dvals.size, svals.size
    ia, ib = did[:, ii].ravel(), did[:, jj].ravel()
    if symmetric:  # E[f(u) f(v)] is symmetric in (Σii, Σjj): keep each unordered pair once
        lo = np.minimum(ia, ib)
        np.maximum(ia, ib, out=ib)
        ia = lo
    if float(nd) * nd * ns < 2.0**62:
        key = ia
        key *= nd
        key += ib
        del ib
        key *= ns
        key += sid.ravel()
        del sid
        ukey, inverse = np.unique(key, return_inverse=True)
        del key
        sid_u, rest = ukey % ns, ukey // ns
        ia_u, ib_u = rest // nd, rest % nd
    else:  # pragma: no cover - only for enormous batches
        rows, inverse = np.unique(np.stack([ia, ib, sid.ravel()], axis=1), axis=0, return_inverse=True)
        ia_u, ib_u, sid_u = rows.T
    return dvals, ia_u, ib_u, svals[sid_u], inverse.ravel()


# --- the split Gauss–Kronrod rule ------------------------------------------------------------

def _npdf(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _initial_panels(cuts: np.ndarray):
    """Panels ``(line, lo, hi)`` of every line: the fixed grid (points within ``_NEAR`` of a cut
    dropped) and the line's own cuts (non-finite ones ignored), inside ``[-Z_MAX, Z_MAX]``."""
    n = cuts.shape[0]
    cuts = np.where(np.isfinite(cuts), cuts, -Z_MAX)
    cuts = np.clip(cuts, -Z_MAX, Z_MAX)
    grid = np.broadcast_to(_GRID, (n, _GRID.size))
    if cuts.shape[1]:
        inner = np.abs(grid) < Z_MAX
        near = np.abs(grid[:, :, None] - cuts[:, None, :]).min(axis=2) < _NEAR
        grid = np.where(inner & near, -Z_MAX, grid)
    pts = np.sort(np.concatenate([grid, cuts], axis=1), axis=1)
    lo, hi = pts[:, :-1], pts[:, 1:]
    keep = hi > lo
    line = np.broadcast_to(np.arange(n)[:, None], lo.shape)[keep]
    return line, lo[keep], hi[keep]


def _gk_lines(integrand, cuts: np.ndarray, tol: np.ndarray):
    """``∫_{-Z}^{Z} F_l(x) dx`` for many lines l at once, by adaptive Gauss–Kronrod.

    ``integrand(line, x) -> (F, F_err)``: values at the points ``x`` (P, 2n+1) of panels of lines
    ``line`` (P,), and an absolute error of each value (or None). ``cuts`` (L, K): each line's
    breakpoints; ``tol`` (L,): absolute tolerances (``inf`` accepts the first pass). A panel is
    accepted when its estimate ``|K − G|`` (+ round-off + the values' own errors) is at most
    ``tol·length/2Z``, or when its line's total is below ``tol``; else it is bisected.
    Returns ``(values, errors)``.
    """
    x0, wk, gi, wg = kronrod_rule()
    both = np.stack([wk, wk], axis=1)  # columns: Kronrod weights, Kronrod − Gauss weights
    both[gi, 1] -= wg
    n_lines = cuts.shape[0]
    value, error = np.zeros(n_lines), np.zeros(n_lines)
    top = np.zeros(n_lines)  # largest |value| seen on each line: the scale of its values' own noise
    line, lo, hi = _initial_panels(cuts)
    span = 2.0 * Z_MAX
    for rnd in range(_ROUNDS + 1):
        if line.size == 0:
            break
        half = 0.5 * (hi - lo)
        x = (0.5 * (hi + lo))[:, None] + half[:, None] * x0
        y, y_err = integrand(line, x)
        ay = np.abs(y)
        starts = np.flatnonzero(np.diff(line, prepend=-1))  # panels are kept sorted by line
        top[line[starts]] = np.maximum(top[line[starts]], np.maximum.reduceat(ay.max(axis=1), starts))
        sums = y @ both
        kv = half * sums[:, 0]
        diff = np.abs(half * sums[:, 1])
        # round-off: relative to the values, and absolute (a value computed as 1 − t² near t = ±1
        # carries ~eps of the function's scale even where it is tiny)
        floor = half * (_ROUND_OFF * (ay @ wk) + _NOISE * top[line])
        est = diff + floor
        if y_err is not None:
            est += half * (y_err @ wk)
        total = error + np.bincount(line, est, n_lines)
        crowded = np.bincount(line, minlength=n_lines) > _PANELS
        done = (total <= tol)[line] | (est * (span / (hi - lo)) <= tol[line]) | (rnd == _ROUNDS)
        done |= (diff <= floor) | (half <= 1e-14 * Z_MAX) | crowded[line]  # round-off level, or too many
        value += np.bincount(line[done], kv[done], n_lines)
        error += np.bincount(line[done], est[done], n_lines)
        keep = ~done
        line, lo, hi = line[keep], lo[keep], hi[keep]
        mid = 0.5 * (lo + hi)  # children next to each other, so the panels stay sorted by line
        line = np.repeat(line, 2)
        lo, hi = np.stack([lo, mid], axis=1).ravel(), np.stack([mid, hi], axis=1).ravel()
    return value, error


def _inner(g, a: np.ndarray, b: np.ndarray, kinks: np.ndarray, tol: np.ndarray):
    """``E[g(a + b Z)]`` for flat arrays ``a``, ``b > 0`` (one line each), cut where ``a + b z`` is a kink."""
    value, error = np.empty(a.shape), np.empty(a.shape)
    per_line = (_GRID.size + kinks.size) * (2 * _KRONROD + 1)
    step = max(1, _INNER_EVALS // per_line)
    for lo in range(0, a.size, step):
        sl = slice(lo, lo + step)
        aa, bb = a[sl], b[sl]
        cuts = (kinks[None, :] - aa[:, None]) / bb[:, None]

        def integrand(line, x, aa=aa, bb=bb):
            return _apply(g, aa[line, None] + bb[line, None] * x) * _npdf(x), None

        value[sl], error[sl] = _gk_lines(integrand, cuts, tol[sl])
    return value, error


def _split_pairs(f, g, sa, sb, c, r, kinks: tuple, tol: np.ndarray):
    """``E[f(sa z1) g(sb (c z1 + r z2))]`` per triple by the split rule; returns ``(values, errors)``."""
    k = np.asarray(kinks, dtype=np.float64)
    along, across = sb * c, sb * r            # v = along·z1 + across·z2
    with np.errstate(divide="ignore", invalid="ignore"):
        own = k[None, :] / sa[:, None]        # kinks of f(sa z1)
        shadow = k[None, :] / along[:, None]  # where the inner kink crosses z2 = 0
        width = np.abs(across / along)        # width of the turn of E[g(v) | z1] there
    width = np.where(width < 1.0, width, np.nan)[:, None]
    parts = [own, shadow] + [shadow + s * d * width for d in _GRADING for s in (-1.0, 1.0)]
    cuts = np.concatenate(parts, axis=1)
    direct = across == 0.0
    span = 2.0 * Z_MAX

    def outer(line, x):
        w = _apply(f, sa[line, None] * x) * _npdf(x)
        mean_v = along[line, None] * x
        h, h_err = np.empty(x.shape), np.zeros(x.shape)
        d = np.broadcast_to(direct[line, None], x.shape)
        if d.any():
            h[d] = _apply(g, mean_v[d])
        nd = ~d
        if nd.any():
            aw = np.abs(w[nd])
            with np.errstate(divide="ignore", over="ignore"):  # inf: a node that contributes nothing
                tol_in = np.where(aw > 0, 0.5 * np.broadcast_to(tol[line, None], x.shape)[nd] / (span * aw), np.inf)
            h[nd], h_err[nd] = _inner(g, mean_v[nd], np.broadcast_to(across[line, None], x.shape)[nd], k, tol_in)
        return w * h, np.abs(w) * h_err

    return _gk_lines(outer, cuts, tol)


def _split_single(f, sa, kinks: tuple, tol: np.ndarray):
    """``E[f(sa Z)]`` per entry of ``sa`` by the split rule (cut at ``z = k/sa``)."""
    k = np.asarray(kinks, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        cuts = k[None, :] / sa[:, None]

    def integrand(line, x):
        return _apply(f, sa[line, None] * x) * _npdf(x), None

    return _gk_lines(integrand, cuts, tol)


def find_kinks(f, lo: float, hi: float, n: int = 4096) -> tuple[float, ...]:
    """Points of ``[lo, hi]`` where ``f`` looks non-smooth: a jump, a kink (φ' jumps), a jump of φ''
    or a feature narrower than about ``60 (hi − lo)/n``; located to ~1e-12 by zooming in.

    On a grid of ``n`` cells (offset, so that a feature centred at 0 is not sampled symmetrically)
    a point is suspect when a second difference exceeds 16× those three cells away on both sides
    (jumps, kinks), a third difference 16× those four cells away (jumps of φ''), or a second
    difference exceeds 1e-3 of the range of f (a steep smooth feature). A suspect point is refined
    on finer grids while it stays so (a genuine kink or jump does at every scale; a smooth feature
    stops at its own width, which still makes a useful cut). A heuristic, used for callables
    without declared kinks: cuts make the split rule cheap and its estimate reliable, and stop
    Gauss–Hermite from missing what falls between its nodes.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return ()
    h = (hi - lo) / n
    x = lo + (np.arange(n + 1) + 0.318309886) * h
    y = _apply(f, x)
    if not np.all(np.isfinite(y)):
        return ()
    top = max(float(np.abs(y).max()), np.finfo(np.float64).tiny)
    floor = 1e-12 * top
    d2 = np.abs(np.diff(y, 2))
    d3 = np.abs(np.diff(y, 3))
    found = []
    for d, dist, order in ((d2, 3, 2), (d3, 4, 3)):
        pad = np.concatenate([np.zeros(dist), d, np.zeros(dist)])
        far = np.maximum(pad[:-2 * dist], pad[2 * dist:])
        near = np.maximum.reduce([pad[dist - k:pad.size - dist - k] for k in range(-dist + 1, dist) if k])
        hit = (d >= near) & (d > 16.0 * far) & (d > floor)
        if order == 2:  # steep smooth features: one candidate per run of large second differences
            steep = d > 1e-3 * (float(y.max() - y.min()))
            edges = np.flatnonzero(np.diff(np.concatenate([[0], steep.astype(np.int8), [0]])))
            for a, b in zip(edges[::2], edges[1::2]):
                hit[a + int(np.argmax(d[a:b]))] = True
        for i in np.flatnonzero(hit)[:32]:
            found.append(_zoom(f, x[i + 1] + (0.5 * h if order == 3 else 0.0), 2.0 * h, order, 64.0 * _EPS * top,
                               1e-4 * (hi - lo)))
    out: list[float] = []
    for x0 in sorted(found):
        if not out or x0 - out[-1] > 1e-9 * max(1.0, abs(x0)):
            out.append(x0)
    return tuple(out)


def _zoom(f, x0: float, w: float, order: int, floor: float, unit: float) -> float:
    """Refine a suspect point: re-grid ``[x0 − w, x0 + w]`` finer while the largest difference of
    ``order`` stands out (16× the median), down to round-off of ``max(|x0|, unit)``."""
    for _ in range(24):
        xs = np.linspace(x0 - w, x0 + w, 33)
        ys = _apply(f, xs)
        if not np.all(np.isfinite(ys)):
            break
        d = np.abs(np.diff(ys, order))
        j = int(np.argmax(d))
        if d[j] <= 16.0 * float(np.median(d)) + floor:
            break  # smooth at this scale
        x0 = float(xs[j + 1]) if order == 2 else 0.5 * float(xs[j + 1] + xs[j + 2])
        w = 2.0 * float(xs[1] - xs[0])
        if w <= 4.0 * _EPS * max(abs(x0), unit):
            break
    return float(x0)


def _fallback_kinks(f, g, sa, sb) -> tuple[float, ...]:
    """Suspect points of f over ``|u| ≤ Z sa`` and of g over ``|v| ≤ Z sb`` (see :func:`find_kinks`)."""
    pts = set(find_kinks(f, -Z_MAX * float(sa.max()), Z_MAX * float(sa.max())))
    if g is not f or sb.max() != sa.max():
        pts |= set(find_kinks(g, -Z_MAX * float(sb.max()), Z_MAX * float(sb.max())))
    return tuple(sorted(pts))


# --- the Mehler (Hermite) expansion in the correlation -----------------------------------------

_MEHLER_Z = 12.0  # the coefficients' integrals over |z| ≤ 12 (outside mass 1.8e-33)
_MEHLER_ORDERS = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""Truncation orders K tried per entry (the smallest whose bound meets the tolerance is used)."""
_MEHLER_KMAX = _MEHLER_ORDERS[-1]
_MEHLER_MARGIN = 2.0**-10
"""An order meeting the tolerance is raised (within those computed) until its truncation term is below
this fraction of the tolerance: a truncation error ~1e-14 relative costs a few more terms of the sums."""
_MEHLER_GROUPS = 2**16  # variance pairs up to which the order is chosen by thresholds in |ρ| per pair
_MEHLER_BLOCK = 2**20  # entries per block of the Horner sums
_MEHLER_COEF_BYTES = 64 * 2**20  # per-panel error estimates of the coefficients, per chunk


def _mehler_panels(k_max: int, cuts: np.ndarray):
    """Nodes ``x`` (P, 21) and weights ``(w_kronrod, w_kronrod − w_gauss)`` (P, 21), Gaussian density
    included, of a composite Gauss–Kronrod rule on ``[-Z, Z]`` with panels of width ``3.2/sqrt(K)``
    (the Hermite function ``h_K ϕ`` then has at most ~1 oscillation per panel) cut at ``cuts``."""
    h = 3.2 / math.sqrt(max(k_max, 64))
    n = int(math.ceil(2.0 * _MEHLER_Z / h))
    edges = np.linspace(-_MEHLER_Z, _MEHLER_Z, n + 1)
    inside = cuts[np.isfinite(cuts) & (np.abs(cuts) < _MEHLER_Z)]
    if inside.size:
        edges = np.unique(np.concatenate([edges, inside]))
    x0, wk, gi, wg = kronrod_rule()
    lo, hi = edges[:-1], edges[1:]
    half = 0.5 * (hi - lo)
    x = (0.5 * (hi + lo))[:, None] + half[:, None] * x0
    dens = _npdf(x)
    wdiff = wk.copy()
    wdiff[gi] -= wg
    return x, half[:, None] * wk * dens, half[:, None] * wdiff * dens


@functools.cache
def _smooth_hermite_grid(k_max: int):
    """The kink-free composite rule of :func:`_mehler_panels` and ``h_k(x)``, ``k ≤ k_max`` (cached)."""
    x, w, wd = _mehler_panels(k_max, np.zeros(0))
    hk = _hermite_functions(x.ravel(), k_max)
    for a in (x, w, wd, hk):
        a.flags.writeable = False
    return x, w, wd, hk


def _hermite_functions(x: np.ndarray, k_max: int) -> np.ndarray:
    """``h_k(x) = He_k(x)/sqrt(k!)``, ``k = 0 … k_max``, as a (k_max + 1, len(x)) array, by
    ``h_{k+1} = (x h_k − sqrt(k) h_{k−1})/sqrt(k + 1)`` (orthonormal under the standard normal)."""
    out = np.empty((k_max + 1, x.size))
    out[0] = 1.0
    if k_max >= 1:
        out[1] = x
    for k in range(1, k_max):
        np.multiply(x, out[k], out=out[k + 1])
        out[k + 1] -= math.sqrt(k) * out[k - 1]
        out[k + 1] *= 1.0 / math.sqrt(k + 1)
    return out


def hermite_coefficients(f, variances, k_max: int = _MEHLER_KMAX, kinks=()):
    """Hermite coefficients ``c_k(a) = E[f(sqrt(a) Z) h_k(Z)]``, ``h_k = He_k/sqrt(k!)``, ``k ≤ k_max``,
    with error bounds, for each variance ``a``; returns ``(c, c_err, energy, energy_err)``.

    Composite 21-point Gauss–Kronrod on ``|z| ≤ 12`` (panels of width ``3.2/sqrt(k_max)``, cut at the
    kinks ``k/sqrt(a)``); ``c_err`` is the sum over panels of ``|K21 − G10|`` plus round-off
    ``200 eps sqrt(energy)``, ``energy = E[f(sqrt(a) Z)²]`` by the same rule with its own
    ``|K21 − G10|`` estimate (plus round-off). Shapes ``(n, k_max + 1)`` and ``(n,)``.
    """
    a = np.clip(np.asarray(variances, dtype=np.float64).ravel(), 0.0, None)
    ks = np.asarray(kinks, dtype=np.float64)
    n = a.size
    c, c_err = np.empty((n, k_max + 1)), np.empty((n, k_max + 1))
    energy, energy_err = np.empty(n), np.empty(n)
    if ks.size == 0:
        x, w, wd, hk = _smooth_hermite_grid(k_max)
        groups = [(np.arange(n), x, w, wd, hk)]
    else:
        groups = []
        for i in range(n):
            with np.errstate(divide="ignore"):
                cuts = ks / math.sqrt(a[i]) if a[i] > 0 else np.zeros(0)
            x, w, wd = _mehler_panels(k_max, cuts)
            groups.append((np.array([i]), x, w, wd, _hermite_functions(x.ravel(), k_max)))
    for idx, x, w, wd, hk in groups:
        p, q = x.shape
        step = max(1, int(_MEMORY_BYTES // (8 * x.size)))
        for lo in range(0, idx.size, step):
            sel = idx[lo:lo + step]
            fx = _apply(f, np.sqrt(a[sel])[:, None, None] * x)                  # (m, P, 21)
            fw = (fx * w).reshape(sel.size, -1)
            c[sel] = fw @ hk.T
            f2 = fx * fx
            energy[sel] = (f2 * w).sum(axis=(1, 2))
            energy_err[sel] = np.abs((f2 * wd).sum(axis=2)).sum(axis=1) + _ROUND_OFF * energy[sel]
            # per-panel |K21 − G10| of every coefficient, in chunks of panels
            fd = fx * wd                                                         # (m, P, 21)
            hk3 = hk.reshape(k_max + 1, p, q)
            acc = np.zeros((sel.size, k_max + 1))
            chunk = max(1, int(_MEHLER_COEF_BYTES // (8 * sel.size * (k_max + 1))))
            for plo in range(0, p, chunk):
                ps = slice(plo, plo + chunk)
                d = np.matmul(fd[:, ps].transpose(1, 0, 2), hk3[:, ps].transpose(1, 2, 0))  # (p, m, K+1)
                acc += np.abs(d).sum(axis=0)
            c_err[sel] = acc + _ROUND_OFF * np.sqrt(np.abs(energy[sel]))[:, None]
    return c, c_err, energy, energy_err


class _Expansion:
    """Per variance: Hermite coefficients and the quantities the entry bounds need, at the orders K
    of ``_MEHLER_ORDERS`` up to ``k_max``: ``tail[:, o]`` ≥ ``Σ_{k>K} c_k²`` (Parseval:
    ``E f² + its error − Σ_{k≤K} (|ĉ_k| − err_k)₊²``, plus the summation's round-off),
    ``cerr[:, o] = sqrt(Σ_{k≤K} err_k²)``, ``norm[:, o] = sqrt(Σ_{k≤K} ĉ_k²)``; ``top = sqrt(E f² + err)``."""

    def __init__(self, f, variances, k_max, kinks):
        c, e, en, en_err = hermite_coefficients(f, variances, k_max, kinks)
        self.c = c
        self.finite = np.all(np.isfinite(c), axis=1) & np.all(np.isfinite(e), axis=1) & np.isfinite(en) \
            & np.isfinite(en_err)
        self.energy = en
        orders = [k for k in _MEHLER_ORDERS if k <= k_max]
        self.orders = orders
        cap = en + en_err
        low = np.maximum(np.abs(c) - e, 0.0)
        cum_low = np.cumsum(low * low, axis=1)
        cum_e = np.cumsum(e * e, axis=1)
        cum_c = np.cumsum(c * c, axis=1)
        idx = np.array(orders)
        rnd = 4.0 * _EPS * (idx[None, :] + 10.0) * np.abs(cap)[:, None]
        self.tail = np.maximum(cap[:, None] - cum_low[:, idx], 0.0) + rnd
        self.converged = self.tail <= 2.0 * rnd  # the tail is at round-off: more terms cannot help
        self.cerr = np.sqrt(cum_e[:, idx])
        self.norm = np.sqrt(cum_c[:, idx])
        self.top = np.sqrt(np.abs(cap))


def _fixed_terms(ef, eg, i, j, o, k, scale):
    """The order-K error terms that do not depend on ρ: the coefficients' quadrature errors
    (Cauchy–Schwarz over k ≤ K), Horner's round-off and the truncation of z."""
    return (ef.cerr[i, o] * eg.norm[j, o] + ef.norm[i, o] * eg.cerr[j, o] + ef.cerr[i, o] * eg.cerr[j, o]
            + ((2 * k + 2) * _EPS + _TAIL) * scale)


def _thresholds(ef, eg, gi, gj, tol, margin):
    """Per variance pair ``(gi, gj)`` and order: the truncation factor ``A = sqrt(T_f T_g)``, the fixed
    terms ``F``, and the largest ``|ρ|`` for which ``A |ρ|^{K+1} + F ≤ tol·scale`` (good) and for which
    ``A |ρ|^{K+1} ≤ margin·tol·scale`` or the tails are at round-off (tight); −1 when none."""
    scale = ef.top[gi] * eg.top[gj]
    target = tol * np.maximum(scale, np.finfo(np.float64).tiny)
    n_o = len(ef.orders)
    trunc, fixed = np.empty((gi.size, n_o)), np.empty((gi.size, n_o))
    good, tight = np.empty((gi.size, n_o)), np.empty((gi.size, n_o))
    ok = ef.finite[gi] & eg.finite[gj]
    for o, k in enumerate(ef.orders):
        a = np.sqrt(ef.tail[gi, o] * eg.tail[gj, o])
        fx = _fixed_terms(ef, eg, gi, gj, o, k, scale)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            room = np.where(target > fx, (target - fx) / a, -1.0)
            good[:, o] = np.where(room >= 0, np.where(a > 0, room, np.inf) ** (1.0 / (k + 1)), -1.0)
            t = np.where(a > 0, (margin * target / a) ** (1.0 / (k + 1)), np.inf)
        tight[:, o] = np.where(ef.converged[gi, o] & eg.converged[gj, o], np.inf, t)
        trunc[:, o], fixed[:, o] = a, fx
    good[~ok] = -1.0
    return trunc, fixed, good, tight


def _choose_grouped(pid, arho, active, orders, trunc, fixed, good, tight):
    """Per entry: the first order that is good and tight at its ``|ρ|``, else the last good one
    (``-1``: none); and its bound ``A |ρ|^{K+1} + F``."""
    best = np.full(arho.size, -1)
    found = ~active
    for o in range(len(orders)):
        g = good[:, o][pid]
        is_good = arho <= g
        is_tight = is_good & (arho <= tight[:, o][pid])
        best[is_good & ~found] = o
        found |= is_tight
    bound = np.full(arho.size, np.inf)
    for o, k in enumerate(orders):
        sel = np.flatnonzero(best == o)
        p = pid[sel]
        bound[sel] = trunc[p, o] * arho[sel] ** (k + 1) + fixed[p, o]
    return best, bound


def _choose(ef, eg, ia, ib, arho, scale, target, active, margin):
    """:func:`_choose_grouped` entry by entry (many variance pairs); also which entries are settled
    (an order both good and tight: a higher one would not help)."""
    best = np.full(arho.size, -1)
    bound = np.full(arho.size, np.inf)
    pending = active.copy()  # no order meets the tolerance yet
    loose = np.zeros(arho.size, dtype=bool)  # one does, but its truncation term is not yet negligible
    for o, k in enumerate(ef.orders):
        if not (pending.any() or loose.any()):
            break
        sel = np.flatnonzero(pending | loose)
        i, j = ia[sel], ib[sel]
        fixed = _fixed_terms(ef, eg, i, j, o, k, scale[sel])
        trunc = np.sqrt(ef.tail[i, o] * eg.tail[j, o]) * arho[sel] ** (k + 1)
        bd = trunc + fixed
        good = bd <= target[sel]
        best[sel[good]] = o
        bound[sel[good]] = bd[good]
        pending[sel[good]] = False
        tight = good & ((trunc <= margin * target[sel]) | (ef.converged[i, o] & eg.converged[j, o]))
        loose[sel[good]] = True
        loose[sel[tight]] = False
    return best, bound, active & ~pending & ~loose


def _horner(cf, cg, ia, ib, rho, k):
    """``Σ_{j≤k} cf[ia, j] cg[ib, j] ρ^j`` per entry (Horner; scalar coefficients when ia, ib are constant)."""
    if np.all(ia == ia[0]) and np.all(ib == ib[0]):
        p = cf[ia[0], :k + 1] * cg[ib[0], :k + 1]
        acc = np.full(rho.shape, p[k])
        for j in range(k - 1, -1, -1):
            acc *= rho
            acc += p[j]
        return acc
    acc = cf[ia, k] * cg[ib, k]
    for j in range(k - 1, -1, -1):
        acc *= rho
        acc += cf[ia, j] * cg[ib, j]
    return acc


def mehler_pairs(f, g, a, b, s, *, tol: float = DEFAULT_TOL, kinks=(), same: bool | None = None,
                 margin: float = _MEHLER_MARGIN):
    """``E[f(u) g(v)]`` for 1-D arrays ``a = E u²``, ``b = E v²``, ``s = E uv`` by Mehler's expansion;
    returns ``(values, errors, done)``; entries with ``done`` False were not resolved (the caller uses
    the adaptive rule there). docs/theory.md §1.3.

    With ``ρ = s/sqrt(ab)`` and the Hermite coefficients ``c_k(a)`` of f, ``d_k(b)`` of g
    (:func:`hermite_coefficients`), ``E[f(u) g(v)] = Σ_k c_k(a) d_k(b) ρ^k`` (Mehler 1866). Truncated
    at K (the smallest order of ``_MEHLER_ORDERS`` meeting ``tol·sqrt(E f² E g²)``), the error is at
    most, by Cauchy–Schwarz and Parseval,
    ``sqrt(T_f T_g) |ρ|^{K+1}`` (tail energies ``T = E f² − Σ_{k≤K} c_k²``, computed from the
    coefficients' lower bounds ``|ĉ_k| − err_k`` and ``E f²``'s upper bound) ``+ ‖err_c‖ ‖d̂‖ +
    ‖ĉ‖ ‖err_d‖ + ‖err_c‖ ‖err_d‖`` (the coefficients' quadrature errors, Cauchy–Schwarz over
    k ≤ K) ``+ (2K + 2) eps sqrt(E f² E g²)`` (Horner's round-off) ``+ 1e-16 sqrt(E f² E g²)``
    (truncation of z at ±12). When ``same`` (f is g and the entry is a variance), the value is
    ``E f²`` itself with its own error. Past the tolerance, K is raised until the truncation term is
    below ``margin·tol`` (or the tails are at round-off), within the orders computed for the others.
    """
    a, b, s = (np.asarray(x, dtype=np.float64).ravel() for x in (a, b, s))
    a, b = np.clip(a, 0.0, None), np.clip(b, 0.0, None)
    dv, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    return _mehler(f, g, dv, inv[:a.size], inv[a.size:], s, tol, check_kinks(kinks), f is g if same is None else same,
                   margin)


def _mehler(f, g, dv, ia, ib, s, tol, ks, same, margin):
    """:func:`mehler_pairs` for entries given as indices ``ia, ib`` into the distinct variances ``dv``."""
    values, errs = np.zeros(s.size), np.full(s.size, np.inf)
    done = np.zeros(s.size, dtype=bool)
    if s.size == 0:
        return values, errs, done
    prod = np.sqrt(dv[ia] * dv[ib])
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.clip(np.where(prod > 0, s / prod, 0.0), -1.0, 1.0)
    del prod
    diag_same = same & (ia == ib) & (rho == 1.0)
    arho = np.abs(rho)
    nd = dv.size
    if nd * nd <= _MEHLER_GROUPS:  # few variance pairs: thresholds in |ρ| per pair and order
        pid = ia.astype(np.int64) * nd + ib
        off = ~diag_same
        rmax = np.full(nd * nd, -1.0)
        np.maximum.at(rmax, pid[off], arho[off])
        gi, gj = np.divmod(np.arange(nd * nd), nd)
    k_max = _MEHLER_ORDERS[3]
    stages = []  # (expansions, entries, their orders, their bounds) of each k_max
    remaining = ~diag_same
    while True:  # raise the order only while some entry needs it
        ef = _Expansion(f, dv, k_max, ks)
        eg = ef if same else _Expansion(g, dv, k_max, ks)
        last = k_max >= _MEHLER_KMAX
        if nd * nd <= _MEHLER_GROUPS:
            trunc_g, fixed_g, good_g, tight_g = _thresholds(ef, eg, gi, gj, tol, margin)
            worst = rmax[:, None]
            need = (rmax >= 0) & ef.finite[gi] & eg.finite[gj] & ~np.any((worst <= good_g) & (worst <= tight_g),
                                                                          axis=1)
            if not need.any() or last:
                ok = ef.finite[ia] & eg.finite[ib]
                best, bound = _choose_grouped(pid, arho, ok & off, ef.orders, trunc_g, fixed_g, good_g, tight_g)
                idx = np.flatnonzero(best >= 0)
                stages.append((ef, eg, idx, best[idx], bound[idx]))
                break
        else:  # entries settled at this k_max keep its coefficients; the others try the next one
            idx = np.flatnonzero(remaining)
            i, j = ia[idx], ib[idx]
            scale = ef.top[i] * eg.top[j]
            target = tol * np.maximum(scale, np.finfo(np.float64).tiny)
            ok = ef.finite[i] & eg.finite[j]
            best, bound, final = _choose(ef, eg, i, j, arho[idx], scale, target, ok, margin)
            last = last or not np.any(ok & ~final)
            if last:
                final = best >= 0
            stages.append((ef, eg, idx[final], best[final], bound[final]))
            remaining[idx[final]] = False
            if last:
                break
        k_max = min(_MEHLER_KMAX, 4 * k_max)
    if np.any(diag_same):
        d = np.flatnonzero(diag_same)
        d = d[ef.finite[ia[d]]]
        top2 = ef.top[ia[d]] ** 2
        bd = (top2 - ef.energy[ia[d]]) + _TAIL * top2
        fine = bd <= tol * np.maximum(top2, np.finfo(np.float64).tiny)
        d, bd = d[fine], bd[fine]
        values[d] = ef.energy[ia[d]]
        errs[d] = bd
        done[d] = True
    for ef, eg, idx, best, bound in stages:
        for o, k in enumerate(ef.orders):
            sel = idx[best == o]
            for lo in range(0, sel.size, _MEHLER_BLOCK):
                blk = sel[lo:lo + _MEHLER_BLOCK]
                values[blk] = _horner(ef.c, eg.c, ia[blk], ib[blk], rho[blk], k)
        errs[idx] = bound
        done[idx] = True
    return values, errs, done


# --- public functions ------------------------------------------------------------------------

def pair_expectations(f, g, a, b, s, nodes=None, *, tol: float = DEFAULT_TOL, kinks=None, moments=None):
    """``E[f(u) g(v)]`` per entry for 1-D arrays of second moments ``a = E u²``, ``b = E v²``,
    ``s = E uv`` (``u, v`` zero-mean jointly Gaussian); returns ``(values, errors)`` per entry.

    ``nodes``, ``tol``, ``kinks`` as in :func:`gauss_hermite_kernel`; ``moments``: optional
    ``(E f(u)², E g(v)²)`` arrays (the scale of ``tol``), estimated by a 128-node rule otherwise.
    """
    declared = None if kinks is None else check_kinks(kinks)
    levels = _levels(nodes)
    a, b, s = (np.asarray(x, dtype=np.float64).ravel() for x in (a, b, s))
    if a.size == 0:
        return np.zeros(0), np.zeros(0)
    if moments is None:
        moments = (_second_moment(f, np.clip(a, 0.0, None)), _second_moment(g, np.clip(b, 0.0, None)))
    sa, sb = np.sqrt(np.clip(a, 0.0, None)), np.sqrt(np.clip(b, 0.0, None))
    prod = sa * sb
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(prod > 0, s / prod, 0.0)
    c = np.clip(c, -1.0, 1.0)
    r2 = 1.0 - c * c
    r = np.sqrt(np.where(r2 <= _SNAP, 0.0, r2))  # |c| within round-off of 1 is taken as ±1
    c = np.where(r == 0, np.sign(c), c)
    scale = np.sqrt(moments[0] * moments[1])
    floor = np.maximum(scale, np.finfo(np.float64).tiny)
    cuts = declared if declared is not None else _fallback_kinks(f, g, sa, sb) if nodes is None else ()
    if cuts:  # declared kinks always, found ones with the adaptive rule
        values, errs = _split_pairs(f, g, sa, sb, c, r, cuts, tol * floor)
        return values, errs + _TAIL * scale

    def evaluate(index, n):
        return _pair_sum(f, g, sa[index], sb[index], c[index], r[index], n)

    values, errs = _adaptive(evaluate, scale, levels, tol)
    if nodes is None:  # not converged by Gauss–Hermite: the split rule locates what it missed
        bad = np.flatnonzero(errs > tol * floor)
        if bad.size:
            cuts = _fallback_kinks(f, g, sa[bad], sb[bad]) if declared is not None else ()
            v2, e2 = _split_pairs(f, g, sa[bad], sb[bad], c[bad], r[bad], cuts, tol * floor[bad])
            e2 += _TAIL * scale[bad]
            better = e2 < errs[bad]
            values[bad[better]] = v2[better]
            errs[bad[better]] = e2[better]
    return values, errs


def single_expectations(f, a, nodes=None, *, tol: float = DEFAULT_TOL, kinks=None):
    """``E[f(u)]``, ``u ~ N(0, a)``, per entry of the 1-D array ``a``; returns ``(values, errors)``.

    ``nodes``, ``tol``, ``kinks`` as in :func:`gauss_hermite_kernel` (1-D rules).
    """
    declared = None if kinks is None else check_kinks(kinks)
    levels = _levels(nodes)
    a = np.clip(np.asarray(a, dtype=np.float64).ravel(), 0.0, None)
    if a.size == 0:
        return np.zeros(0), np.zeros(0)
    sa = np.sqrt(a)
    scale = np.sqrt(_second_moment(f, a))
    floor = np.maximum(scale, np.finfo(np.float64).tiny)
    cuts = declared if declared is not None else _fallback_kinks(f, f, sa, sa) if nodes is None else ()
    if cuts:
        values, errs = _split_single(f, sa, cuts, tol * floor)
        return values, errs + _TAIL * scale

    def evaluate(index, n):
        return _single_sum(f, sa[index], n)

    values, errs = _adaptive(evaluate, scale, levels, tol)
    if nodes is None:
        bad = np.flatnonzero(errs > tol * floor)
        if bad.size:
            cuts = _fallback_kinks(f, f, sa[bad], sa[bad]) if declared is not None else ()
            v2, e2 = _split_single(f, sa[bad], cuts, tol * floor[bad])
            e2 += _TAIL * scale[bad]
            better = e2 < errs[bad]
            values[bad[better]] = v2[better]
            errs[bad[better]] = e2[better]
    return values, errs


def gauss_hermite_kernel(f, g, sigma, nodes=None, *, tol: float = DEFAULT_TOL, kinks=None, method: str = "auto"):
    """``K[..., i, j] = E[f(u_i) g(u_j)]`` for ``u ~ N(0, sigma)``; returns ``(K, err)``.

    ``f``, ``g``: vectorised callables on float64 arrays. ``sigma``: ``(..., N, N)`` symmetric PSD.
    ``kinks``: points in the argument of f and g where either is not smooth (kink or jump); with
    kinks the split Gauss–Kronrod rule is used (``nodes`` does not apply). Without kinks, ``nodes``
    is an int for a fixed Gauss–Hermite rule (error estimated against ``nodes // 2``) or ``None``
    for the adaptive rule (64 … 1024 nodes, then the split rule for entries not converged). ``tol``:
    target relative to ``sqrt(E f(u_i)² E g(u_j)²)``. ``err`` bounds ``max |K − K_exact|`` in
    practice (see the module docstring). Entries are computed once per distinct
    ``(Σii, Σjj, Σij)``; when ``f is g`` only the upper triangle is computed and mirrored.
    ``method``: ``"auto"`` (adaptive rule only) evaluates every entry at once by Mehler's expansion
    (:func:`mehler_pairs`, all entries together) and the entries it cannot resolve within ``tol``
    by the per-entry rules; ``"adaptive"`` uses the per-entry rules everywhere.
    """
    kinks = None if kinks is None else check_kinks(kinks)
    if method not in ("auto", "adaptive"):
        raise SpecError("method", method, 'must be "auto" (Mehler expansion, then per-entry rules) or "adaptive"')
    s = _as_kernel(sigma)
    _levels(nodes)
    batch, n_tok = s.shape[:-2], s.shape[-1]
    if s.size == 0:
        return np.zeros(s.shape), 0.0
    flat = s.reshape(-1, n_tok, n_tok)
    symmetric = f is g
    ii, jj = _pair_indices(n_tok, symmetric)
    if nodes is None and method == "auto":
        values, err = _mehler_kernel(f, g, flat, ii, jj, symmetric, tol, kinks)
    else:
        values, err = _per_entry_kernel(f, g, flat, ii, jj, symmetric, nodes, tol, kinks)
    out = np.empty(flat.shape)
    for k in range(flat.shape[0]):  # loop over batch elements only
        entries = values[k * ii.size:(k + 1) * ii.size]
        out[k, ii, jj] = entries
        if symmetric:
            out[k, jj, ii] = entries
    return out.reshape(batch + (n_tok, n_tok)), err


def _per_entry_kernel(f, g, flat, ii, jj, symmetric, nodes, tol, kinks):
    """Entries ``(ii, jj)`` of every batch element by the per-entry rules, once per distinct triple;
    returns ``(values (B·P,), err)``."""
    dvals, ia, ib, us, inverse = _unique_triples(flat, ii, jj, symmetric)
    values, err = _per_entry(f, g, dvals, ia, ib, us, nodes, tol, kinks, symmetric)
    return values[inverse], err


def _per_entry(f, g, dvals, ia, ib, us, nodes, tol, kinks, symmetric):
    moment_f = _second_moment(f, dvals)
    moment_g = moment_f if symmetric else _second_moment(g, dvals)
    values = np.empty(us.shape)
    err = 0.0
    for lo in range(0, us.size, _TRIPLE_BLOCK):  # bounded memory for the per-triple bookkeeping
        blk = slice(lo, lo + _TRIPLE_BLOCK)
        values[blk], errs = pair_expectations(f, g, dvals[ia[blk]], dvals[ib[blk]], us[blk], nodes, tol=tol,
                                              kinks=kinks, moments=(moment_f[ia[blk]], moment_g[ib[blk]]))
        err = max(err, float(errs.max()))
    return values, err


def _mehler_kernel(f, g, flat, ii, jj, symmetric, tol, kinks):
    """Entries ``(ii, jj)`` of every batch element by :func:`_mehler` (no search for repeated entries:
    the sums cost less than finding them), the unresolved ones by the per-entry rules once per
    distinct triple; returns ``(values (B·P,), err)``."""
    diag = np.clip(np.diagonal(flat, axis1=-2, axis2=-1), 0.0, None)
    dvals, did = np.unique(diag, return_inverse=True)
    did = did.reshape(diag.shape)
    ia, ib = did[:, ii].ravel(), did[:, jj].ravel()
    us = flat[:, ii, jj].ravel() + 0.0  # -0.0 → 0.0
    sd = np.sqrt(dvals)
    cuts = kinks if kinks is not None else _fallback_kinks(f, g, sd, sd)
    values, errs, done = _mehler(f, g, dvals, ia, ib, us, tol, cuts, symmetric, _MEHLER_MARGIN)
    err = float(errs[done].max()) if done.any() else 0.0
    todo = np.flatnonzero(~done)
    if todo.size:
        ta, tb, ts = ia[todo], ib[todo], us[todo]
        if symmetric:  # E[f(u) f(v)] is symmetric in (Σii, Σjj)
            ta, tb = np.minimum(ta, tb), np.maximum(ta, tb)
        rows, inverse = np.unique(np.stack([ta.astype(np.float64), tb.astype(np.float64), ts], axis=1), axis=0,
                                  return_inverse=True)
        ua, ub = rows[:, 0].astype(np.int64), rows[:, 1].astype(np.int64)
        v2, e2 = _per_entry(f, g, dvals, ua, ub, rows[:, 2], None, tol, kinks, symmetric)
        values[todo] = v2[inverse.ravel()]
        err = max(err, e2)
    return values, err


def gauss_hermite_mean(f, diag, nodes=None, *, tol: float = DEFAULT_TOL, kinks=None):
    """``mean[..., i] = E[f(u_i)]``, ``u_i ~ N(0, diag[..., i])``; returns ``(mean, err)``.

    ``nodes``, ``tol`` and ``kinks`` as in :func:`gauss_hermite_kernel` (1-D rules).
    """
    d = np.asarray(diag, dtype=np.float64)
    check_kinks(kinks)
    _levels(nodes)
    if d.size == 0:
        return np.zeros(d.shape), 0.0
    values_in, inverse = np.unique(np.clip(d, 0.0, None).ravel(), return_inverse=True)
    values, errs = single_expectations(f, values_in, nodes, tol=tol, kinks=kinks)
    return values[inverse.ravel()].reshape(d.shape), float(errs.max())
