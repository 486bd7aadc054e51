"""Derivations from a block map: closed-form trajectories, the C-map, fixed points and their stability.

* Closed form (docs/theory.md §4): in the equicorrelated mode the block map is rewritten in the coordinates
  ``x = q(1−ρ)`` (eigenvalue of Σ on 1^⊥) and ``m = q(ρ + (1−ρ)/T)`` (mean entry, eigenvalue on 1
  over T). Blocks built from Dense layers, attention, residual and parallel sums and dropout are
  affine there — uniform attention multiplies m only — so the recursion ``s_l = M s_{l−1} + b``
  is solved exactly (``rsolve`` per decoupled coordinate, or ``M^l`` by diagonalisation). For the
  residual uniform-attention block of Noci et al. (2022) this gives ``x_l = x_0`` and
  ``m_l = (1 + β²σ_v²σ_o²)^l m_0``. Nonlinear blocks get the coordinates that decouple (e.g.
  ``q_l = (σ_w²/2)^l q_0`` for a ReLU MLP); the rest is reported as "no closed form found".
* C-map (docs/theory.md §8, DKS: Martens et al. 2021): ``C(c) = ρ'(q = 1, ρ = c, μ = 0)``, its slope
  ``χ = C'(1)`` and the angle exponent ``λ_a = ½ ln χ`` (Cowsik et al. 2024). At a marginal fixed
  point (χ = 1) with ``C(1 − ε) = 1 − ε + k ε^s + …`` the approach is a power law,
  ``1 − ρ_l ≈ ((s − 1) k l)^{−1/(s−1)}`` (for ReLU: ``9π²/(2l²)``, Hayou et al. 2019).
* Fixed points of ``(q, ρ) ↦ (q', ρ')``: ρ* = 1 exactly when C(1) = 1; q* from the q-map when it
  does not depend on ρ; other roots numerically for the spec's values; stability from the slope
  (or the Jacobian's eigenvalues).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from . import symbols as S
from .activations import explicit
from .blockmap import BlockMap, guarded, numpy_function, opaque_functions, tidy

x_, m_ = sp.symbols("x m", real=True)
k_ = sp.Symbol("k", integer=True, positive=True)


def initial(sym):
    """The initial-value symbol ``q_0`` of a state symbol ``q``."""
    return sp.Symbol(f"{sym.name}_0", **sym.assumptions0)


def _is(e, k: int) -> bool:
    """``e`` is the number ``k`` exactly, as an Integer or a Float (since SymPy 1.13 ``Float(1.0) == 1`` is
    False, so specs with float weights such as ``alpha = 1.0`` need this test, not ``==``)."""
    e = sp.sympify(e) - k
    return e == 0 or e.is_zero is True


def _values(bm: BlockMap, tokens=None) -> dict:
    vals = bm.namespace.substitutions()
    if tokens is not None:
        vals[S.T] = sp.Integer(tokens)
    return vals


def _num(e, vals):
    try:
        v = complex(sp.N(explicit(e).xreplace(vals).xreplace(vals)))
    except (TypeError, ValueError):
        return None
    return v.real if abs(v.imag) < 1e-12 * max(1.0, abs(v.real)) else None


# ----------------------------------------------------------------------------------------------
# closed-form trajectories


@dataclass(frozen=True, eq=False)
class ClosedForm:
    """``solution[name]`` = value after block l as an expression of l and the initial values ``name_0``.

    ``found``: every state coordinate solved; otherwise ``solution`` holds the ones that decouple and
    ``reason`` says why the rest has none. ``valid_from``: the block index from which the formula holds.
    """

    found: bool
    solution: dict
    reason: str = ""
    method: str = ""
    valid_from: dict = field(default_factory=dict)
    coordinates: dict = field(default_factory=dict)


def _affine(exprs, variables):
    """``(M, b)`` with ``exprs = M variables + b`` if every expression is affine, else None."""
    rows, consts = [], []
    for e in exprs:
        e = guarded(lambda v: sp.expand(sp.cancel(sp.together(v))), e, 5.0)
        if e is None:
            return None
        try:
            p = sp.Poly(e, *variables)
        except sp.PolynomialError:
            return None
        if p.total_degree() > 1:
            return None
        if any(v in c.free_symbols for c in p.coeffs() for v in variables):
            return None
        rows.append([p.coeff_monomial(v) for v in variables])
        consts.append(p.coeff_monomial(1))
    return sp.Matrix(rows), sp.Matrix(consts)


def _scalar_recursion(a, b, u0):
    """``u_l = a(l) u_{l−1} + b(l)``, ``u_0`` given: sympy ``rsolve``, else the product/sum formula."""
    l = S.l
    if _is(a, 0):
        return b
    if not (a.has(l) or b.has(l)):
        if _is(a, 1):
            return u0 + b * l
        u = sp.Function("u")
        try:
            sol = guarded(lambda e: sp.rsolve(e, u(l), {u(0): u0}), u(l) - a * u(l - 1) - b, 10.0)
            if sol is not None:
                return sol
        except Exception:  # noqa: BLE001 - fall back to the explicit formula
            pass
        return a ** l * u0 + b * (a ** l - 1) / (a - 1)
    j = sp.Symbol("j", integer=True, positive=True)

    def product_sum(_):
        prod = sp.product(a.subs(l, k_), (k_, 1, l))
        tail = sp.summation(b.subs(l, j) * sp.product(a.subs(l, k_), (k_, j + 1, l)), (j, 1, l))
        return prod * u0 + tail
    return guarded(product_sum, sp.Integer(0), 20.0)


def _solve_linear(M, b, u0):
    """``s_l = M s_{l−1} + b``: diagonal M by scalar recursions, constant M by ``M^l`` (Jordan form),
    l-dependent triangular M coordinate by coordinate."""
    n = M.rows
    l = S.l
    if M.is_diagonal():
        sol = [_scalar_recursion(M[i, i], b[i], u0[i]) for i in range(n)]
        return None if any(s is None for s in sol) else sol
    if not (M.has(l) or b.has(l)):
        aug = sp.zeros(n + 1, n + 1)
        aug[:n, :n] = M
        aug[:n, n] = b
        aug[n, n] = 1
        try:
            power = aug ** l
        except Exception:  # noqa: BLE001 - not diagonalisable in closed form
            return None
        vec = power * sp.Matrix(list(u0) + [1])
        return [_collect_powers(vec[i]) for i in range(n)]
    order = _triangular_order(M)
    if order is None:
        return None
    sol = {}
    for i in order:
        forcing = b[i] + sum((M[i, j] * sol[j].subs(l, l - 1) for j in range(n) if j != i and not _is(M[i, j], 0)),
                             sp.Integer(0))
        sol[i] = _scalar_recursion(M[i, i], forcing, u0[i])
        if sol[i] is None:
            return None
    return [sol[i] for i in range(n)]


def _collect_powers(e):
    """A sum of geometric modes ``Σ_k λ_k^l (…)``, grouped by ``λ_k^l``."""
    e = sp.powsimp(sp.expand(e), combine="base", force=True)
    e = sp.expand(e)
    powers = sorted({p for p in e.atoms(sp.Pow) if p.exp.has(S.l)}, key=sp.default_sort_key)
    return sp.collect(e, powers) if powers else e


def _triangular_order(M):
    """An order in which each coordinate depends only on itself and earlier ones, or None."""
    n = M.rows
    deps = {i: {j for j in range(n) if j != i and not _is(M[i, j], 0)} for i in range(n)}
    order, done = [], set()
    while len(order) < n:
        ready = [i for i in range(n) if i not in done and deps[i] <= done]
        if not ready:
            return None
        order += ready
        done |= set(ready)
    return order


def closed_form(bm: BlockMap) -> ClosedForm:
    """Solve the block recursion exactly where it is solvable (see the module docstring)."""
    if bm.block is None:
        return ClosedForm(False, {}, "the network has no repeated block")
    out = bm.outputs("block")
    names = [str(s) for s in bm.state]
    exprs = [out[n] for n in names]
    inits = {s: initial(s) for s in bm.state}
    if bm.mode == "equicorrelated":
        res = _closed_equi(bm, out, inits)
        if res is not None:
            return res
    else:
        aff = _affine(exprs, bm.state)
        if aff is not None:
            M, b = aff
            sol = _solve_linear(M, b, [inits[s] for s in bm.state])
            if sol is not None:
                return ClosedForm(True, dict(zip(names, sol)),
                                  method="linear recursion on the kernel entries (matrix power)",
                                  valid_from={n: 0 for n in names})
    return _decoupled(bm, out, names, inits)


def _closed_equi(bm, out, inits):
    T, q, rho, mu = S.T, S.q, S.rho, S.mu
    has_mu = mu in bm.state
    qx = m_ + x_ * (1 - 1 / T)
    sub = {q: qx, rho: (m_ - x_ / T) / qx}
    qn = explicit(out["q"]).xreplace(sub)
    rn = explicit(out["rho"]).xreplace(sub)
    new = [qn * (1 - rn), qn * (rn + (1 - rn) / T)]
    variables = [x_, m_]
    if has_mu:
        new.append(explicit(out["mu"]).xreplace(sub))
        variables.append(mu)
    aff = _affine(new, variables)
    if aff is None:
        return None
    aff = (aff[0].applyfunc(_readable), aff[1].applyfunc(_readable))
    q0, r0 = inits[q], inits[rho]
    x0, m0 = sp.Symbol("x_0", real=True), sp.Symbol("m_0", real=True)
    u0 = [x0, m0] + ([inits[mu]] if has_mu else [])
    sol = _solve_linear(*aff, u0)
    if sol is None:
        return None
    sol = [_readable_powers(e) for e in sol]
    start = {x0: q0 * (1 - r0), m0: q0 * (r0 + (1 - r0) / T)}
    xl, ml = sol[0], sol[1]
    ql = ml + xl * (1 - 1 / T)
    # written through x_l and m_l: multiplying out (1 + a)^l into L^l-type powers overflows numerically
    solution = {"q": ql.xreplace(start), "rho": ((ml - xl / T) / ql).xreplace(start)}
    if has_mu:
        solution["mu"] = tidy(sol[2].xreplace(start), 400)
    elif "mu" in out and not _is(out["mu"], 0):
        solution["mu"] = tidy(explicit(out["mu"]).xreplace({q: solution["q"].subs(S.l, S.l - 1),
                                                           rho: solution["rho"].subs(S.l, S.l - 1)}), 400)
    M, b = aff
    coords = {"x": (M[0, 0] * x_ + M[0, 1] * m_ + b[0], xl, start[x0]),
              "m": (M[1, 0] * x_ + M[1, 1] * m_ + b[1], ml, start[m0])}
    note = ("linear recursion in x = q(1−ρ) (eigenvalue on 1⊥) and m = q(ρ + (1−ρ)/T) (mean entry); "
            "q_l = m_l + (1 − 1/T) x_l, ρ_l = (m_l − x_l/T)/q_l")
    return ClosedForm(True, solution, method=note, valid_from={k: 0 for k in solution}, coordinates=coords)


def _readable_powers(e):
    """``((L + σ)/L)**l`` → ``(1 + σ/L)**l``."""
    return e.replace(lambda p: p.is_Pow and p.exp.has(S.l), lambda p: _readable(p.base) ** p.exp)


def _readable(e):
    """A coefficient in its most readable form: ``(L + σ)/L`` → ``1 + σ/L``."""
    e = sp.cancel(e)
    ex = sp.expand(e)
    return ex if sp.count_ops(ex) <= sp.count_ops(e) else e


def _decoupled(bm, out, names, inits):
    """Coordinates whose update depends only on themselves (affinely) and on already solved ones."""
    l = S.l
    solved, valid = {}, {}
    targets = list(zip(names, bm.state))
    if "mu" in out and "mu" not in names and not _is(out["mu"], 0):
        targets.append(("mu", None))     # the mean as an output of the solved coordinates
    progress = True
    while progress:
        progress = False
        for n, s in targets:
            if n in solved:
                continue
            e = explicit(out[n])
            deps = e.free_symbols & set(bm.coder.symbols)
            others = deps - {s}
            if any(str(o) not in solved for o in others):
                continue
            prev = {o: solved[str(o)].subs(l, l - 1) for o in others}
            start = 1 + max((valid[str(o)] for o in others), default=0)    # others are used at l − 1
            if s is None or s not in deps:
                solved[n], valid[n] = tidy(e.xreplace(prev), 400), start
                progress = True
                continue
            aff = _affine([e], [s])
            if aff is None or start > 1:      # a recursion from u_0 needs the others from l = 0 on
                continue
            a, b = aff[0][0, 0].xreplace(prev), aff[1][0].xreplace(prev)
            sol = _scalar_recursion(a, b, inits[s])
            if sol is None:
                continue
            solved[n], valid[n] = tidy(sol, 400), 0
            progress = True
    rest = [n for n in names if n not in solved]
    reason = ("the block map is not affine in the state (normalisation or activation maps), and "
              f"{', '.join(rest)} {'does' if len(rest) == 1 else 'do'} not decouple") if rest else ""
    method = "decoupled coordinates solved one by one" if solved else ""
    return ClosedForm(not rest, solved, reason, method, valid)


# ----------------------------------------------------------------------------------------------
# C-map and fixed points


@dataclass(frozen=True, eq=False)
class CMap:
    """``C(c) = ρ'(q=1, ρ=c, μ=0)``; ``chi = C'(1)``, ``lambda_a = ½ ln χ``; ``*_value`` at the spec's values.

    ``q_free``: ρ' does not depend on q (the block is scale-invariant in the correlation).
    ``asymptotic``: ``1 − ρ_l`` for large l at a marginal fixed point ρ* = 1 (χ = 1), else None.
    """

    c_map: sp.Expr
    q_free: bool
    c0: sp.Expr
    c1: sp.Expr
    chi: sp.Expr
    lambda_a: sp.Expr
    chi_value: float | None
    lambda_a_value: float | None
    asymptotic: sp.Expr | None = None


def c_map(bm: BlockMap, tokens=None) -> CMap | None:
    """The block's C-map on normalised inputs and its slope at 1 (docs/theory.md §8). Equicorrelated mode only."""
    if bm.mode != "equicorrelated" or bm.block is None:
        return None
    out = bm.outputs("block")
    rho_out = out["rho"]
    q_free = S.q not in explicit(rho_out).free_symbols
    C = tidy(rho_out.xreplace({S.q: sp.Integer(1), S.rho: S.c, S.mu: sp.Integer(0)}), 200)
    vals = _values(bm, tokens)
    if opaque_functions([C]):
        return _numeric_c_map(C, q_free, vals)
    c1 = tidy(explicit(C).subs(S.c, 1))
    c0 = tidy(C.subs(S.c, 0))
    dC = sp.diff(C, S.c)
    chi = explicit(dC.subs(S.c, 1))
    if chi.has(sp.zoo, sp.nan, sp.oo, -sp.oo):
        chi = guarded(lambda e: sp.limit(e, S.c, 1, "-"), explicit(dC), 20.0)
    chi = tidy(sp.simplify(chi)) if chi is not None else sp.nan
    lam = tidy(sp.log(chi) / 2)
    chi_v = _num(chi, vals)
    lam_v = 0.5 * np.log(chi_v) if chi_v is not None and chi_v > 0 else None
    asym = None
    if _is(sp.simplify(chi - 1), 0) and _is(sp.simplify(c1 - 1), 0):
        asym = _power_law(C)
    return CMap(C, q_free, c0, c1, chi, lam, chi_v, lam_v, asym)


def _numeric_c_map(C, q_free, vals):
    """C-map with opaque activations: values and slope at 1 numerically (Richardson, one-sided)."""
    f = numpy_function([S.c], C.xreplace(vals).xreplace(vals))
    c1, c0 = float(f(1.0)), float(f(0.0))
    h = 1e-3
    d1 = (f(1.0) - f(1.0 - h)) / h
    d2 = (f(1.0) - f(1.0 - h / 2)) / (h / 2)
    chi = float(2 * d2 - d1)
    lam = 0.5 * np.log(chi) if chi > 0 else None
    return CMap(C, q_free, sp.Float(c0, 12), sp.Float(c1, 12), sp.Float(chi, 8),
                sp.Float(lam, 8) if lam is not None else sp.nan, chi, lam)


def _power_law(C):
    """``1 − ρ_l`` at a marginal fixed point: ``C(1 − ε) = 1 − ε + k ε^s`` gives ``((s−1) k l)^{−1/(s−1)}``."""
    t = sp.Symbol("t", positive=True)
    try:
        ser = guarded(lambda e: sp.series(e, t, 0, 7).removeO(), 1 - explicit(C).subs(S.c, 1 - t ** 2) - t ** 2, 20.0)
    except Exception:  # noqa: BLE001 - no series expansion
        return None
    if ser is None:
        return None
    ser = sp.expand(ser)
    terms = sorted(sp.Add.make_args(ser), key=lambda e: sp.degree(e, t) if e.is_polynomial(t) else 99)
    for term in terms:
        if _is(term, 0):
            continue
        coeff, power = term.as_coeff_exponent(t)
        if power <= 2:
            return None
        k = sp.simplify(-coeff)
        s = power / 2
        if not (k.is_positive or (k.is_number and float(k) > 0)):
            return None
        return sp.simplify(((s - 1) * k * S.l) ** (-1 / (s - 1)))
    return None


@dataclass(frozen=True, eq=False)
class FixedPoint:
    """A fixed point of the block map: ``values`` (exact expressions or floats), the slope(s) there
    (``eigenvalues``: of the Jacobian, or the 1-D slope), ``stability`` for the spec's values, ``note``."""

    values: dict
    eigenvalues: tuple
    stability: str
    exact: bool
    note: str = ""


def _stability(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "unknown"
    top = max(abs(v) for v in vals)
    if abs(top - 1) < 1e-9:
        return "marginal"
    return "stable" if top < 1 else "unstable"


def fixed_points(bm: BlockMap, tokens=None) -> list:
    """Fixed points of the equicorrelated block map (see the module docstring); [] in the explicit mode.

    ``tokens``: the number of tokens T for numeric roots (without it only exact fixed points are given).
    """
    if bm.mode != "equicorrelated" or bm.block is None:
        return []
    vals = _values(bm, tokens)
    numeric = tokens is not None      # without a token count only exact fixed points are reported
    out = bm.outputs("block")
    q, rho, mu = S.q, S.rho, S.mu
    qmap, rmap = out["q"], out["rho"]
    if (mu in bm.state or opaque_functions(list(out.values()))) and not numeric:
        return []
    if mu in bm.state or opaque_functions(list(out.values())):
        return _numeric_2d(bm, out, vals, note="the mean μ is part of the state" if mu in bm.state
                           else "opaque activations")
    tmin = -1.0 / (float(vals[S.T]) - 1) if S.T in vals and float(vals[S.T]) > 1 else -1.0
    points = []
    q_free = q not in rmap.free_symbols
    qstar = None
    if q_free:
        rfun = rmap
        qnote = _q_behaviour(qmap, vals)
        if rho not in qmap.free_symbols and len(_q_fixed(qmap, vals)) == 1:
            qstar = _q_fixed(qmap, vals)[0]
            qnote = ""
    elif rho not in qmap.free_symbols:
        qstars = _q_fixed(qmap, vals)
        if len(qstars) != 1:
            return _numeric_2d(bm, out, vals, note="ρ' depends on q") if numeric else []
        qstar = qstars[0]
        rfun = rmap.subs(q, qstar)
        qnote = ""
    else:
        return _numeric_2d(bm, out, vals, note="q' and ρ' depend on each other") if numeric else []
    # ρ* = 1 exactly? (or to round-off, when weights are given as floats: 0.9² + 0.19 = 1 + 2e-16)
    one = tidy(sp.simplify(explicit(rfun.subs(rho, 1))))
    slope = sp.diff(rfun, rho)
    if _is(one, 1) or _is_one_to_roundoff(one, vals):
        s1 = explicit(slope.subs(rho, 1))
        if s1.has(sp.zoo, sp.nan, sp.oo, -sp.oo):
            s1 = guarded(lambda e: sp.limit(e, rho, 1, "-"), explicit(slope), 20.0)
        s1 = tidy(sp.simplify(s1)) if s1 is not None else sp.nan
        sv = _num(s1, vals)
        shown = S.text(s1) + (f" = {sv:.6g}" if sv is not None and not s1.is_number else "")
        at = {"q": qstar} if qstar is not None else {}
        points.append(FixedPoint({**at, "rho": sp.Integer(1)}, (s1,), _stability([sv]), True,
                                 f"slope {shown}" + (f"; {qnote}" if qnote else "")))
    if not numeric:
        return points
    # other roots of ρ' = ρ for the spec's values
    f = numpy_function([rho], (rfun - rho).xreplace(vals).xreplace(vals))
    df = numpy_function([rho], slope.xreplace(vals).xreplace(vals))
    grid = np.linspace(tmin, 1.0, 4001)[:-1]
    with np.errstate(all="ignore"):
        fv = np.array([_safe_call(f, g) for g in grid])
    from scipy.optimize import brentq
    for a, b, fa, fb in zip(grid[:-1], grid[1:], fv[:-1], fv[1:]):
        if np.isfinite(fa) and np.isfinite(fb) and fa * fb < 0 or fa == 0:
            root = a if fa == 0 else brentq(f, a, b, xtol=1e-15)
            if abs(root - 1) < 1e-9:
                continue
            sv = float(np.real(_safe_call(df, root)))
            at = {"q": _num(qstar, vals)} if qstar is not None else {}
            points.append(FixedPoint({**at, "rho": float(root)}, (sv,), _stability([sv]), False,
                                     f"slope {sv:.6g}" + (f"; {qnote}" if qnote else "")))
    return points


def _is_one_to_roundoff(e, vals, tol: float = 1e-12) -> bool:
    """``e`` (ρ' at ρ = 1) equals 1 to ``tol`` for the spec's values and at several q: float weights
    (``alpha = 0.9``, ``beta = 0.4359``) leave ``1.0000000000000002`` where exact weights give 1."""
    e = explicit(e).xreplace(vals).xreplace(vals)
    free = sorted(e.free_symbols, key=str)
    points = [{}] if not free else [{s: v for s in free} for v in (sp.Rational(1, 3), sp.Integer(1), sp.Integer(7))]
    for at in points:
        try:
            v = complex(sp.N(e.xreplace(at)))
        except (TypeError, ValueError):
            return False
        if not abs(v - 1) <= tol:
            return False
    return True


def _safe_call(f, x):
    try:
        v = complex(f(x))
    except (ZeroDivisionError, ValueError, TypeError):
        return np.nan
    return v.real if abs(v.imag) < 1e-12 else np.nan


def _q_behaviour(qmap, vals):
    """A sentence on the q-map: its fixed point, or the growth factor per block at ρ = 1."""
    q, rho = S.q, S.rho
    if rho not in qmap.free_symbols:
        stars = _q_fixed(qmap, vals)
        if len(stars) == 1:
            return f"q* = {S.text(stars[0])}"
    at1 = tidy(sp.simplify(qmap.subs(rho, 1)))
    aff = _affine([at1], [q])
    if aff is not None and _is(aff[1][0], 0):
        kappa = _readable(aff[0][0, 0])
        kv = _num(kappa, vals)
        if _is(kappa, 1):
            return "at ρ = 1, q' = q"
        return (f"at ρ = 1, q' = ({S.text(kappa)})·q"
                + (f" = {kv:.6g}·q" if kv is not None and not kappa.is_number else ""))
    return "the q-map has no simple form at ρ = 1"


def _q_fixed(qmap, vals):
    q = S.q
    if q not in qmap.free_symbols:
        return [tidy(qmap)]
    aff = _affine([qmap], [q])
    if aff is not None:
        a, b = aff[0][0, 0], aff[1][0]
        if _is(b, 0):
            return []
        return [tidy(b / (1 - a))]
    try:
        sols = sp.solve(sp.Eq(qmap, q), q)
    except (NotImplementedError, Exception):  # noqa: BLE001
        return []
    return [s for s in sols if _num(s, vals) is not None and _num(s, vals) > 0]


def _numeric_2d(bm, out, vals, note):
    """Fixed points of the full state map for the spec's values (scipy ``fsolve`` from a grid of starts);
    roots with ρ outside ``[−1/(T−1), 1]`` (no equicorrelated kernel has them) are dropped."""
    t = vals.get(S.T)
    rho_min = -1.0 / (float(t) - 1) if t is not None and float(t) > 1 else -1.0
    from scipy.optimize import fsolve
    names = [str(s) for s in bm.state]
    exprs = [out[n].xreplace(vals).xreplace(vals) for n in names]
    F = numpy_function([bm.state], [e - s for e, s in zip(exprs, bm.state)])
    if opaque_functions(exprs):
        G = numpy_function([bm.state], exprs)

        def J(v, h=1e-6):
            v = np.asarray(v, dtype=float)
            cols = []
            for i in range(len(v)):
                e = np.zeros_like(v)
                e[i] = h * max(1.0, abs(v[i]))
                cols.append((np.asarray(G(v + e), dtype=float) - np.asarray(G(v - e), dtype=float)) / (2 * e[i]))
            return np.array(cols).T
    else:
        J = numpy_function([bm.state], sp.Matrix(exprs).jacobian(bm.state))
    found = []
    starts = [(qq, rr) + (0.0,) * (len(names) - 2) for qq in (0.5, 1.0, 2.0) for rr in (0.0, 0.5, 0.9, 0.999)]
    for x0 in starts:
        with np.errstate(all="ignore"):
            try:
                sol, info, ier, _ = fsolve(lambda v: np.real(F(v)), x0, full_output=True, xtol=1e-13)
            except Exception:  # noqa: BLE001
                continue
        if ier != 1 or sol[0] <= 1e-12 or not np.all(np.isfinite(sol)) or np.max(np.abs(np.real(F(sol)))) > 1e-10:
            continue
        if "rho" in names and not rho_min - 1e-9 <= sol[names.index("rho")] <= 1.0 + 1e-9:
            continue          # outside the PSD range of an equicorrelated kernel: not a state, not a fixed point
        if any(np.allclose(sol, f, rtol=1e-7, atol=1e-9) for f in found):
            continue
        found.append(sol)
    pts = []
    for sol in found:
        with np.errstate(all="ignore"):
            jac = np.array(J(sol), dtype=float)
        if not np.all(np.isfinite(jac)):   # e.g. q* = 0, where ρ is undefined
            continue
        ev = np.linalg.eigvals(jac)
        pts.append(FixedPoint(dict(zip(names, map(float, sol))), tuple(complex(e) if abs(e.imag) > 0 else float(e.real)
                                                                         for e in ev),
                              _stability([abs(e) for e in ev]), False,
                              f"numeric, for the spec's values ({note}); Jacobian eigenvalues "
                              + ", ".join(f"{abs(e):.6g}" for e in ev)))
    return pts


# ----------------------------------------------------------------------------------------------
# everything at once


@dataclass(frozen=True, eq=False)
class Derivation:
    """:func:`derive`'s result: the block map and what could be derived from it."""

    map: BlockMap
    trajectory: ClosedForm
    c_map: CMap | None
    fixed_points: list
    tokens: int | None
    title: str = ""


def derive(spec_or_network, inputs=None, *, mode: str | None = None, tokens=None, symbols=(),
           opaque: bool = False) -> Derivation:
    """Block map, closed-form trajectory, C-map and fixed points of a spec (or network + inputs).

    ``mode``: ``"equicorrelated"`` (default) or ``"explicit"`` (default when ``tokens`` is given;
    ``tokens`` = T replaces the spec's token count for identity/equicorrelated inputs).
    """
    from ..network.spec import Spec, from_dict
    net, title = spec_or_network, ""
    if isinstance(spec_or_network, Spec):
        spec = spec_or_network
        if tokens is not None and spec.raw.get("input", {}).get("kind") in ("identity", "equicorrelated"):
            import copy
            raw = copy.deepcopy(spec.raw)
            raw["input"]["tokens"] = int(tokens)
            spec = from_dict(raw, depth=spec.network.depth, params=dict(spec.network.params), path=spec.path)
        elif tokens is not None and spec.inputs.n_tokens != tokens:
            from ..errors import SpecError
            raise SpecError("tokens", tokens, f"the spec's {spec.raw.get('input', {}).get('kind')} input has "
                            f"{spec.inputs.n_tokens} tokens; the explicit mode uses them as given")
        net, inputs, title = spec.network, spec.inputs, spec.network.name
    mode = mode or ("explicit" if tokens is not None else "equicorrelated")
    mean_zero = inputs is None or not np.any(inputs.mean != 0)
    if mode == "explicit":
        segs = tuple(inputs.segments) if inputs is not None else (tokens,)
        bm = _block_map(net, mode, segs, symbols, opaque, mean_zero)
        t_value = None
    else:
        bm = _block_map(net, mode, None, symbols, opaque, mean_zero)
        t_value = inputs.segments[0] if inputs is not None and len(set(inputs.segments)) == 1 else None
    traj = closed_form(bm)
    cm = c_map(bm, t_value)
    fps = fixed_points(bm, t_value)
    return Derivation(bm, traj, cm, fps, t_value, title)


def _block_map(net, mode, tokens, symbols, opaque, mean_zero):
    from .blockmap import block_map
    return block_map(net, mode=mode, tokens=tokens, symbols=symbols, opaque=opaque, input_mean_zero=mean_zero)
