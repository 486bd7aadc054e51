"""Composition: Serial, Residual ``αx + βf(x)`` and Parallel ``αx + Σ_b β_b f_b(x)`` — every rule.

Kernel map of a sum of streams (docs/theory.md §1, residual and parallel rows):
``Σ' = Σ_a w_a² Σ_a + Σ_{a<b} w_a w_b (C_ab + C_abᵀ)``, with the cross kernel ``C_ab = E[f_a f_bᵀ]``
exact through each stream's linear dependence on the branch input
(:class:`~kernelprop.kernel.state.Dependence`): zero after fresh zero-mean weights, ``P_a Σ P_bᵀ``
after weight-free token mixing or normalisation, plus the mean terms.
Backward: ``Π_x = α²Π + Σ_b β_b² B_b(Π) + Σ_{pairs} w_a w_b (P_aᵀΠP_b + P_bᵀΠP_a)``.
"""

from __future__ import annotations

import numpy as np

from ..errors import NotSupportedError, SpecError
from ..kernel.state import UNKNOWN, Dependence, KernelState, is_one, nonzero, per
from ..network import expressions
from .base import Grads, Layer, number_field, register_layer

_SKIP_NONLINEAR = ("a residual branch ends in a nonlinearity of the skip stream (e.g. an activation with no Dense "
                   "layer after it); its cross kernel with the skip has no closed form here: end the branch with a "
                   "Dense layer or attention with value weights")


class _Composite(Layer):
    composite = True

    def branch_list(self) -> list:
        return []

    def weight_list(self) -> list:
        return []

    def batch_refusal(self) -> str | None:
        """None: the sum of streams broadcasts over a batch of kernels (the children answer for themselves)."""
        return None


@register_layer
class Serial(_Composite):
    """Layers applied one after another."""

    kind = "serial"

    def __init__(self, *layers):
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise SpecError(f"{self.kind}.layers[{i}]", layer, "must be a layer (Dense, Activation, ...)")
        self.layers = tuple(layers)

    def children(self):
        return self.layers

    def resolve(self, env):
        return type(self)(*(layer.resolve(env) for layer in self.layers))

    def expressions(self):
        for i, layer in enumerate(self.layers):
            for where, e in layer.expressions():
                yield f"layers[{i}].{where}", e

    def numeric_fields(self):
        return iter(())

    def kernel_fields(self):
        return ()

    def __len__(self):
        return len(self.layers)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(map(repr, self.layers))})"

    # --- rules ---------------------------------------------------------------------------------

    def kernel_map(self, s, ctx):
        return self._chain(s, ctx, lambda child: child.kernel_map)

    def _chain(self, s, ctx, rule):
        """Apply ``rule(child)(s, ctx)`` child by child; the backward rule runs theirs in reverse."""
        backs, path = [], ctx.path
        for i, child in enumerate(self.layers):
            ctx.path = f"{path}/{i}:{child.kind}"
            s, b = rule(child)(s, ctx)
            backs.append(b)
        ctx.path = path

        def back(pi, grads):
            for b in reversed(backs):
                pi = b(pi, grads)
            return pi
        return s, back

    def sample(self, x, ctx):
        where, path, pulls = ctx.where, ctx.path, []
        for i, child in enumerate(self.layers):
            ctx.where, ctx.path = f"{where}/{i}:{child.kind}", f"{path}/{i}:{child.kind}"
            x, pull = child.sample(x, ctx)
            pulls.append(pull)
        ctx.where, ctx.path = where, path
        if not ctx.tape:
            return x, None

        def pull(g, grads):
            for p in reversed(pulls):
                g = p(g, grads)
            return g
        return x, pull

    def symbolic_map(self, s, ctx, prefix: str | None = None):
        outer = ctx.where
        for j, child in enumerate(self.layers):
            if prefix is not None:
                ctx.where = f"{prefix}.layers[{j}] ({child.kind})"
            s = child.symbolic_map(s, ctx)
        ctx.where = outer
        return s

    def plan(self, width, where, plan):
        for i, child in enumerate(self.layers):
            width = child.plan(width, f"{where}/{i}:{child.kind}", plan)
        return width

    def ntk_map(self, s, ctx):
        """NTK (docs/theory.md §14): each child's NTK map in turn."""
        from ..kernel import ntk as N
        return self._chain(s, ctx, lambda child: N.rule(child, ctx.where))


def _branches_of(layers) -> Serial:
    return layers[0] if len(layers) == 1 and isinstance(layers[0], Serial) else Serial(*layers)


class _Sum(_Composite):
    """``y = α x + Σ_b β_b f_b(x)``: the rules shared by Residual and Parallel."""

    alpha: float | expressions.Expr

    def kernel_map(self, s, ctx):
        branches, betas, path = self.branch_list(), self.weight_list(), ctx.path
        outs, backs = [], []
        for b, branch in enumerate(branches):
            ctx.path = f"{path}/branch{b}" if len(branches) > 1 else path
            o, back_b = branch.kernel_map(branch_input(s), ctx)
            outs.append(o)
            backs.append(back_b)
        ctx.path = path
        y = combine(s, self.alpha, outs, betas, ctx)
        deps, alpha, n = [o.dep for o in outs], self.alpha, s.n

        def back(pi, grads):
            return _back_sum(alpha, betas, backs, deps, n, pi, grads)
        return y, back

    def sample(self, x, ctx):
        alpha, branches, betas, path = self.alpha, self.branch_list(), self.weight_list(), ctx.path
        y = alpha * x if alpha != 1 else x.copy()
        pulls = []
        for b, (branch, beta) in enumerate(zip(branches, betas)):
            if beta != 0:
                ctx.path = f"{path}/branch{b}" if len(branches) > 1 else path
                f, pull = branch.sample(x, ctx)
                y += beta * f
                pulls.append((beta, pull))
        ctx.path = path
        if not ctx.tape:
            return y, None

        def pull(g, grads):
            out = alpha * g
            for beta, p in pulls:
                out = out + p(beta * g, grads)
            return out
        return y, pull

    def symbolic_map(self, s, ctx):
        alpha = ctx.value(self, "alpha")
        betas = [ctx.value(self, name) for name in self.weight_names()]
        return symbolic_combine(s, alpha, self.branch_list(), betas, ctx, parallel=isinstance(self, Parallel))

    def plan(self, width, where, plan):
        plan.enter()
        for i, br in enumerate(self.branch_list()):
            w2 = br.plan(width, f"{where}/{i}:branch", plan)
            if w2 != width:
                raise SpecError(f"{where}", f"a branch maps width {width} to {w2}",
                                "the Monte Carlo adds the branch to its input, so the branch must return "
                                "to the stream width: set the last dense layer's width_factor accordingly")
        plan.leave()
        return width

    def weight_names(self) -> list:
        return []

    def ntk_map(self, s, ctx):
        """NTK of ``y = α x + Σ_b β_b f_b(x)`` (docs/theory.md §14): ``Θ' = Σ_s w_s² Θ_s + Σ_{s<t} w_s w_t
        (P_s Θ P_tᵀ + P_t Θ P_sᵀ)`` over the skip (P = I) and the branches (P their linear dependence on
        the branch input, §1.4); the forward state is :meth:`kernel_map`'s."""
        from ..kernel import ntk as N
        branches, betas, path = self.branch_list(), self.weight_list(), ctx.path
        outs, backs = [], []
        for b, branch in enumerate(branches):
            ctx.path = f"{path}/branch{b}" if len(branches) > 1 else path
            o, back_b = N.rule(branch, ctx.where)(branch_input(s).replace(ntk_error=0.0), ctx)
            outs.append(o)
            backs.append(back_b)
        ctx.path = path
        y = combine(s, self.alpha, outs, betas, ctx)
        theta, err = N.combine(s, self.alpha, outs, betas)
        deps, alpha, n = [o.dep for o in outs], self.alpha, s.n

        def back(pi, grads):
            return _back_sum(alpha, betas, backs, deps, n, pi, grads)
        return y.replace(ntk=theta, ntk_error=err), back


@register_layer
class Residual(_Sum):
    """``y = α x + β f(x)`` with branch ``f`` = the given layers (docs/theory.md §1).

    ``Σ' = α²Σ + β²Σ_f + αβ(Σ_xf + Σ_xfᵀ)``; the cross kernel ``Σ_xf`` is tracked exactly (zero
    after a fresh zero-mean weight matrix, ``Σ Mᵀ`` after a weight-free token mixing ``M``).
    """

    kind = "residual"

    def __init__(self, *layers, alpha=1.0, beta=1.0):
        self.branch = _branches_of(layers)
        self.alpha = number_field("residual.alpha", alpha)
        self.beta = number_field("residual.beta", beta)

    def children(self):
        return (self.branch,)

    def branch_list(self):
        return [self.branch]

    def weight_list(self):
        return [self.beta]

    def weight_names(self):
        return ["beta"]

    def numeric_fields(self):
        yield "alpha", self.alpha, "real"
        yield "beta", self.beta, "real"

    def kernel_fields(self):
        return ("alpha", "beta")

    def resolve(self, env):
        return Residual(self.branch.resolve(env), alpha=expressions.value(self.alpha, env),
                        beta=expressions.value(self.beta, env))

    def expressions(self):
        for name in ("alpha", "beta"):
            if isinstance(getattr(self, name), expressions.Expr):
                yield f"residual.{name}", getattr(self, name)
        for where, e in self.branch.expressions():
            yield f"residual.{where}", e

    def __repr__(self):
        return f"Residual({self.branch!r}, alpha={self.alpha}, beta={self.beta})"


@register_layer
class Parallel(_Sum):
    """``y = α x + Σ_b β_b f_b(x)`` (parallel / GPT-J block, He & Hofmann 2024 SAS-P).

    Branches that end in fresh weights are mutually uncorrelated; weight-free branches are
    correlated exactly through their linear part.
    """

    kind = "parallel"

    def __init__(self, *branches, alpha=1.0, betas=None):
        if not branches:
            raise SpecError("parallel.branches", [], "needs at least one branch")
        self.branches = tuple(b if isinstance(b, Serial) else Serial(*b) if isinstance(b, (list, tuple)) else Serial(b)
                              for b in branches)
        betas = [1.0] * len(self.branches) if betas is None else list(betas)
        if len(betas) != len(self.branches):
            raise SpecError("parallel.betas", betas, f"needs one weight per branch ({len(self.branches)})")
        self.alpha = number_field("parallel.alpha", alpha)
        self.betas = tuple(number_field(f"parallel.betas[{i}]", b) for i, b in enumerate(betas))

    def children(self):
        return self.branches

    def branch_list(self):
        return list(self.branches)

    def weight_list(self):
        return list(self.betas)

    def weight_names(self):
        return [f"betas[{i}]" for i in range(len(self.branches))]

    def numeric_fields(self):
        yield "alpha", self.alpha, "real"
        for i, b in enumerate(self.betas):
            yield f"betas[{i}]", b, "real"

    def kernel_fields(self):
        return ("alpha", *self.weight_names())

    def resolve(self, env):
        return Parallel(*(b.resolve(env) for b in self.branches), alpha=expressions.value(self.alpha, env),
                        betas=[expressions.value(b, env) for b in self.betas])

    def expressions(self):
        if isinstance(self.alpha, expressions.Expr):
            yield "parallel.alpha", self.alpha
        for i, b in enumerate(self.betas):
            if isinstance(b, expressions.Expr):
                yield f"parallel.betas[{i}]", b
        for i, br in enumerate(self.branches):
            for where, e in br.expressions():
                yield f"parallel.branches[{i}].{where}", e

    def __repr__(self):
        return f"Parallel({', '.join(map(repr, self.branches))}, alpha={self.alpha}, betas={list(self.betas)})"


def walk(layer: Layer, prefix: str = ""):
    """Yield ``(path, layer)`` for a layer and all its descendants, depth first."""
    yield prefix or layer.kind, layer
    for i, child in enumerate(layer.children()):
        yield from walk(child, f"{prefix or layer.kind}/{i}:{child.kind}")


# ----------------------------------------------------------------------------------------------
# the numeric sum of streams


def branch_input(s: KernelState) -> KernelState:
    """The state entering a residual/parallel branch: its dependence on the branch input is the identity."""
    return s.replace(dep=Dependence.identity(s.n), quad_error=np.zeros(s.batch) if s.batch else 0.0)


def _apply_dep(d: Dependence, v):
    if d.kind == "diag":
        return d.p * v
    if d.kind == "dense":
        return (d.p @ v[..., :, None])[..., 0]
    return np.zeros_like(v)


def _cross(a: Dependence, ma, b: Dependence, mb, sigma, m):
    """E[f_a f_bᵀ] for two streams ``f = P x + z`` with x-independent parts z from disjoint weights.

    ``= P_a Σ P_bᵀ + (P_a m) r_bᵀ + r_a (P_b m)ᵀ + r_a r_bᵀ`` with ``r = m_f − P m`` (derived).
    Returns None when the cross term is exactly zero.
    """
    if a.kind == "unknown" or b.kind == "unknown":
        raise NotSupportedError(_SKIP_NONLINEAR)
    if (a.kind == "zero" and not ma.any()) or (b.kind == "zero" and not mb.any()):
        return None          # P = 0 and m_f = 0 on one side (a fresh weight matrix, no bias): every term vanishes
    n = sigma.shape[-1]
    pm_a, pm_b = _apply_dep(a, m), _apply_dep(b, m)
    ra, rb = ma - pm_a, mb - pm_b
    out = None
    if a.kind == "zero" or b.kind == "zero":
        pass
    elif a.kind == "diag" and b.kind == "diag":
        out = sigma * a.p[..., :, None]
        out *= b.p[..., None, :]
    else:
        out = a.matrix(n) @ sigma @ np.swapaxes(b.matrix(n), -1, -2)
    for u, v in ((pm_a, rb), (ra, pm_b), (ra, rb)):
        if u.any() and v.any():
            uv = u[..., :, None] * v[..., None, :]
            out = uv if out is None else out + uv
    return out


def axpy(y, a, x):
    """``y += a·x`` in place (y is owned by the caller), without a temporary when a == 1; ``a`` a number or
    one per batch member (shape (B,) against kernels (B, N, N))."""
    if is_one(a):
        y += x
    else:
        y += per(a, x.ndim - 1) * x
    return y


def combine(s: KernelState, alpha: float, outs, betas, ctx) -> KernelState:
    """``y = α x + Σ_b β_b f_b(x)`` from the branch outputs ``outs`` (states that started at
    :func:`branch_input`), with every cross term."""
    streams = [(Dependence.identity(s.n), s.mean, s.sigma, alpha)]
    streams += [(o.dep, o.mean, o.sigma, b) for o, b in zip(outs, betas)]
    headwise = [d.headwise for d, _, _, w in streams[1:] if nonzero(w) and d.kind != "zero"]
    if sum(headwise) > 1:
        raise NotSupportedError(f"{ctx.where}: two parallel branches that are both multi-head weight-free "
                                "mixings; their cross kernel needs per-head tracking")
    sigma = None
    for _, _, sig, w in streams:
        if nonzero(w):
            sigma = per(w * w, 2) * sig if sigma is None else axpy(sigma, w * w, sig)
    if sigma is None:
        sigma = np.zeros_like(s.sigma)
    for i in range(len(streams)):
        for j in range(i + 1, len(streams)):
            da, ma, _, wa = streams[i]
            db, mb, _, wb = streams[j]
            if not (nonzero(wa) and nonzero(wb)):
                continue
            c = _cross(da, ma, db, mb, s.sigma, s.mean)
            if c is not None:
                c += np.swapaxes(c, -1, -2)
                sigma = axpy(sigma, wa * wb, c)
    mean = sum(per(w, 1) * m for _, m, _, w in streams)
    gaussian = s.gaussian and all(o.gaussian for o, b in zip(outs, betas) if nonzero(b))
    quad = alpha * alpha * s.quad_error + sum(b * b * o.quad_error for o, b in zip(outs, betas))
    dep = s.dep if s.dep is None else _compose(s.dep, alpha, [o.dep for o in outs], betas, s.n)
    head_blocks = s.head_blocks or any(o.head_blocks for o, b in zip(outs, betas) if nonzero(b))
    return s.replace(sigma=sigma, mean=mean, gaussian=gaussian, dep=dep, quad_error=quad, head_blocks=head_blocks)


def _compose(outer: Dependence, alpha, inner, betas, n) -> Dependence:
    """Linear part of ``α x + Σ β_b f_b(x)`` in the outer branch input, given x's own dependence."""
    if outer.kind in ("zero", "unknown"):
        return outer
    live = [(d, b) for d, b in zip(inner, betas) if nonzero(b) and d.kind != "zero"]
    if any(d.kind == "unknown" for d, _ in live):
        return UNKNOWN
    if all(d.kind == "diag" for d, _ in live) and outer.kind == "diag":
        p = per(alpha, 1) + sum(per(b, 1) * d.p for d, b in live)
        return Dependence("diag", p * outer.p, outer.headwise)
    p = per(alpha, 2) * np.eye(n) + sum(per(b, 2) * d.matrix(n) for d, b in live)
    return Dependence("dense", p @ outer.matrix(n), outer.headwise or any(d.headwise for d, _ in live))


def _back_sum(alpha, betas, backs, deps, n, pi, grads):
    """``Π_x = α²Π + Σ_b β_b² B_b(Π) + Σ_{s<t} w_s w_t (P_sᵀ Π P_t + h.c.)``. With a :class:`Grads` ledger
    (relative error e coming in, e_b out of branch b) the sum's relative error is
    ``(α² m(Π) e + Σ_b β_b² m(B_b) e_b + m(cross) e) / m(Π_x)``, m the largest |entry|: a sum that cancels
    raises it (docs/theory.md §11.6)."""
    out = (alpha * alpha) * pi
    e = grads.error if isinstance(grads, Grads) else None
    top = (lambda x: float(np.max(np.abs(x))) if np.size(x) else 0.0)     # noqa: E731
    err = 0.0 if not e else abs(alpha * alpha) * top(pi) * e
    for beta, back in zip(betas, backs):
        if beta != 0:
            branch_grads: list = [] if e is None else Grads(error=e)
            part = back(pi, branch_grads)
            out = out + (beta * beta) * part
            grads.extend((p, kind, beta * beta * v) for p, kind, v in branch_grads)
            if e is not None and branch_grads.error:
                err += beta * beta * top(part) * branch_grads.error
    streams = [("diag", np.ones(n), alpha)] + [(dep.kind, dep.p, b) for dep, b in zip(deps, betas)]
    for i in range(len(streams)):
        for j in range(i + 1, len(streams)):
            (ka, pa, wa), (kb, pb, wb) = streams[i], streams[j]
            if wa == 0 or wb == 0 or "zero" in (ka, kb):
                continue
            if "unknown" in (ka, kb):
                raise NotSupportedError("backward cross term of a branch that ends in a nonlinearity of the skip")
            c = _pt_pi_p(ka, pa, pi, kb, pb)
            out = out + (wa * wb) * (c + c.T)
            if e:
                err += 2.0 * abs(wa * wb) * top(c) * e
    if e is not None:
        t = top(out)
        grads.error = 0.0 if not err else (err / t if t > 0 else float("inf"))
    return out


def _pt_pi_p(ka, pa, pi, kb, pb):
    """``P_aᵀ Π P_b`` for diagonal (vector) or dense linear parts."""
    left = pa[:, None] * pi if ka == "diag" else pa.T @ pi
    return left * pb[None, :] if kb == "diag" else left @ pb


# ----------------------------------------------------------------------------------------------
# the symbolic sum of streams


def symbolic_combine(s, alpha, branches, betas, ctx, parallel=False):
    """``y = α x + Σ_b β_b f_b(x)``: ``Σ' = Σ_b w_b² Σ_b + Σ_{a<b} w_a w_b (C_ab + C_abᵀ)`` with exact cross terms."""
    from ..symbolic.maps import UNKNOWN as SUNKNOWN
    from ..symbolic.maps import Dep, nonzero, second_moment, total
    fam = ctx.fam
    eye = Dep("matrix", fam.eye())
    base = ctx.where.split(" (")[0]
    outs = [branch.symbolic_map(s.replace(dep=eye), ctx,
                                f"{base}.branches[{k}]" if len(branches) > 1 or parallel else base)
            for k, branch in enumerate(branches)]
    streams = [(eye, s.mean, s.sigma, alpha)] + [(o.dep, o.mean, o.sigma, b) for o, b in zip(outs, betas)]
    for i, (da, *_) in enumerate(streams[1:]):
        for db, *_ in streams[i + 2:]:
            if da.headwise and db.headwise:
                raise NotSupportedError(f"{ctx.where}: two parallel branches that are both multi-head weight-free "
                                        "mixings; their cross kernel needs per-head tracking")
    sigma = total(sig * w ** 2 for _, _, sig, w in streams)
    for i in range(len(streams)):
        for j in range(i + 1, len(streams)):
            da, ma, _, wa = streams[i]
            db, mb, _, wb = streams[j]
            if not (nonzero(wa) and nonzero(wb)):
                continue
            cm = second_moment(da, ma, db, mb, s.sigma, s.mean, fam)
            sigma = sigma + (cm + cm.t) * (wa * wb)
    mean = total(m * w for _, m, _, w in streams)
    gaussian = s.gaussian and all(o.gaussian for o, b in zip(outs, betas) if nonzero(b))
    dep = s.dep
    if dep is not None and dep.kind not in ("zero", "unknown"):
        live = [(o.dep, b) for o, b in zip(outs, betas) if nonzero(b) and o.dep.kind != "zero"]
        if any(d.kind == "unknown" for d, _ in live):
            dep = SUNKNOWN
        else:
            p = total([fam.eye() * alpha] + [d.p * b for d, b in live])
            dep = Dep("matrix", p @ dep.p, dep.headwise or any(d.headwise for d, _ in live))
    return s.replace(sigma=sigma, mean=mean, gaussian=gaussian, dep=dep)


__all__ = ["Parallel", "Residual", "Serial", "axpy", "branch_input", "combine", "symbolic_combine", "walk"]
