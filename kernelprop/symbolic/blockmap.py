"""The symbolic block map of a network and its numeric evaluation.

:func:`block_map` composes the symbolic layer maps of the repeated block (and of the stem and the
head) into expressions of the state: ``(q, ρ[, μ]) ↦ (q', ρ', μ')`` in the equicorrelated mode
(``Σ = q[(1−ρ)I + ρ11ᵀ]`` on T tokens, per-token mean μ), or the entries of an explicit N×N kernel
and mean vector in the explicit mode. Each top-level layer of the block is one readable *step*;
the block map is their composition. :func:`evaluate` iterates the lambdified maps from an input
kernel, recording what :func:`kernelprop.propagate` records.
"""

from __future__ import annotations

import inspect
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import sympy as sp
from sympy.printing.numpy import NumPyPrinter

from ..errors import NotSupportedError, SpecError
from ..inputs import Inputs
from ..network.layers import Network
from . import algebra
from . import symbols as S
from .maps import Context, State, apply


class _TimeUp(Exception):
    pass


def guarded(f, e, seconds: float = 1.0):
    """``f(e)``, or None when it takes longer than ``seconds``.

    sympy's polynomial algorithms can take minutes on innocent-looking input (``exp(−1/16)`` and
    ``exp(−1/256)`` become powers of one generator of degree 256). The limit uses ``SIGALRM`` in the
    main thread when no other interval timer is running; elsewhere only small inputs are tried.
    """
    if (threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer")
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0):
        return f(e) if len(dag_nodes([e])) <= 40 else None

    def alarm(signum, frame):
        raise _TimeUp

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return f(e)
    except _TimeUp:
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def dag_subs(exprs, rule: dict) -> list:
    """``[e.xreplace(rule) for e in exprs]`` visiting each distinct subexpression once.

    Composed maps share subexpressions heavily; sympy's tree walks (``xreplace``,
    ``free_symbols``, ``count_ops``) revisit every copy and take exponential time in the depth of
    the composition.
    """
    memo = dict(rule)

    def go(node):
        hit = memo.get(node)
        if hit is not None:
            return hit
        if not node.args:
            memo[node] = node
            return node
        args = [go(a) for a in node.args]
        res = node if all(a is b for a, b in zip(args, node.args)) else node.func(*args)
        memo[node] = res
        return res

    return [go(sp.sympify(e)) for e in exprs]


def dag_nodes(exprs) -> set:
    """The distinct subexpressions of ``exprs``."""
    seen, stack = set(), [sp.sympify(e) for e in exprs]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.args)
    return seen


def dag_free_symbols(exprs) -> set:
    return {n for n in dag_nodes(exprs) if n.is_Symbol}


def tidy(e, budget: int = 120, seconds: float = 0.5, clock: dict | None = None):
    """The shortest of ``e``, ``cancel(e)``, ``factor(e)``, ``simplify(e)``.

    Tried below ``budget`` operations, each for at most ``seconds`` (see :func:`guarded`); ``clock``
    (``{"left": seconds}``) is a total allowance shared by many calls, after which ``e`` is kept as built.
    """
    e = sp.sympify(e)
    if len(dag_nodes([e])) > 2 * budget or sp.count_ops(e) > budget or (clock is not None and clock["left"] <= 0):
        return e
    start = time.perf_counter()
    try:
        return _tidy(e, seconds)
    finally:
        if clock is not None:
            clock["left"] -= time.perf_counter() - start


def _tidy(e, seconds):
    cands = [e]
    for f in (sp.cancel, sp.factor, sp.simplify):
        try:
            r = guarded(f, e, seconds)
        except Exception:  # noqa: BLE001 - a failed simplification just keeps the other forms
            r = None
        if r is None:
            break
        cands.append(r)
    return min(cands, key=lambda x: (sp.count_ops(x), len(str(x))))


# ----------------------------------------------------------------------------------------------
# state coordinates


class EquiCoder:
    """State ``(q, ρ, μ)``: ``Σ = q[(1−ρ)I + ρ11ᵀ]``, mean ``μ1``."""

    mode = "equicorrelated"
    names = ("q", "rho", "mu")

    def __init__(self):
        self.fam = algebra.Equi(S.T)
        self.symbols = (S.q, S.rho, S.mu)

    def state(self, mean_zero, gaussian):
        return State(algebra.EqMatrix(S.q, S.q * S.rho, S.T), algebra.EqVector(0 if mean_zero else S.mu), gaussian)

    def read(self, s: State):
        assert isinstance(s.sigma, algebra.EqMatrix) and isinstance(s.mean, algebra.EqVector)
        d, o = s.sigma.d, s.sigma.o
        return (d, o / d, s.mean.v)

    def mean_symbols(self):
        return (S.mu,)

    def numeric_state(self, inputs: Inputs):
        if len(inputs.segments) != 1:
            raise NotSupportedError(f"the input has {len(inputs.segments)} sequences; the (q, ρ) mode describes one "
                                    "sequence of T tokens: use the explicit mode")
        s, m = inputs.sigma, inputs.mean
        t = s.shape[0]
        q0 = s[0, 0]
        rho0 = s[0, 1] / q0 if t > 1 else 0.0
        ref = q0 * ((1 - rho0) * np.eye(t) + rho0)
        if not np.allclose(s, ref, rtol=1e-13, atol=1e-13 * q0) or not np.allclose(m, m[0], rtol=1e-13, atol=0):
            raise NotSupportedError(f"the input kernel ({inputs.description}) is not equicorrelated "
                                    "(q[(1−ρ)I + ρ11ᵀ] with a uniform mean); use the explicit mode")
        return np.array([q0, rho0, m[0]]), {S.T: t}

    def kernel(self, x, values):
        t = int(values[S.T])
        q, rho, mu = x
        return q * ((1 - rho) * np.eye(t) + rho), np.full(t, mu)


class ExplicitCoder:
    """State: the upper triangle ``S_i_j`` (i ≤ j, 1-based) of Σ and the means ``m_i``."""

    mode = "explicit"

    def __init__(self, segments):
        self.fam = algebra.Explicit(segments)
        n = self.n = self.fam.n
        self.pairs = [(i, j) for i in range(n) for j in range(i, n)]
        self.sig = {(i, j): sp.Symbol(f"S_{i + 1}_{j + 1}", positive=True) if i == j else
                    sp.Symbol(f"S_{i + 1}_{j + 1}", real=True) for i, j in self.pairs}
        self.means = tuple(sp.Symbol(f"m_{i + 1}", real=True) for i in range(n))
        self.symbols = tuple(self.sig[p] for p in self.pairs) + self.means
        self.names = tuple(str(s) for s in self.symbols)

    def matrix(self):
        return sp.Matrix(self.n, self.n, lambda i, j: self.sig[(min(i, j), max(i, j))])

    def state(self, mean_zero, gaussian):
        mean = sp.zeros(self.n, 1) if mean_zero else sp.Matrix(self.means)
        return State(algebra.ExMatrix(self.matrix()), algebra.ExVector(mean), gaussian)

    def read(self, s: State):
        assert isinstance(s.sigma, algebra.ExMatrix) and isinstance(s.mean, algebra.ExVector)
        return tuple(s.sigma.m[i, j] for i, j in self.pairs) + tuple(s.mean.v)

    def mean_symbols(self):
        return self.means

    def numeric_state(self, inputs: Inputs):
        if tuple(inputs.segments) != self.fam.segments:
            raise SpecError("tokens", list(inputs.segments),
                            f"the explicit map was built for sequences {list(self.fam.segments)}")
        s = inputs.sigma
        return np.array([s[i, j] for i, j in self.pairs] + list(inputs.mean)), {}

    def kernel(self, x, values):
        n = self.n
        k = np.zeros((n, n))
        for v, (i, j) in zip(x, self.pairs):
            k[i, j] = k[j, i] = v
        return k, np.asarray(x[len(self.pairs):], dtype=float)


# ----------------------------------------------------------------------------------------------
# sections and the block map


@dataclass(frozen=True, eq=False)
class Step:
    """One top-level layer: ``outputs`` (new state) as expressions of the state symbols."""

    label: str
    outputs: tuple


@dataclass(frozen=True, eq=False)
class SectionMap:
    """The composed map of a section (stem, block or final) and its steps."""

    name: str
    steps: tuple
    outputs: tuple
    gaussian_in: bool
    mean_zero_in: bool
    gaussian_out: bool
    mean_zero_out: bool


@dataclass(frozen=True, eq=False)
class BlockMap:
    """Symbolic maps of a network: ``block`` (blocks l ≥ 2), ``first`` (block 1), ``stem``, ``final``.

    ``state`` are the state symbols the maps read (``q, rho[, mu]`` or ``S_i_j[, m_i]``),
    ``coder.symbols`` all of them (outputs always include the means). Hyperparameters are the
    symbols ``L``, ``l``, ``T`` (equicorrelated mode), the named params and chosen fields of
    ``namespace``; ``namespace.substitutions()`` gives their values.
    """

    network: Network
    mode: str
    coder: EquiCoder | ExplicitCoder
    namespace: S.Namespace
    block: SectionMap | None
    first: SectionMap | None
    stem: SectionMap | None
    final: SectionMap | None
    state: tuple
    opaque: bool = False
    input_mean_zero: bool = True

    @property
    def tokens(self):
        return S.T if self.mode == "equicorrelated" else self.coder.fam.segments

    def outputs(self, section: str = "block") -> dict:
        """``{name: expression}`` of a section's composed map."""
        sec = getattr(self, section)
        return dict(zip(self.coder.names, sec.outputs))

    @property
    def hyper(self) -> list:
        """Hyperparameter symbols in argument order: l, L, [T,] params, chosen fields."""
        extra = [S.T] if self.mode == "equicorrelated" else []
        return [S.l, S.L, *extra, *self.namespace.params.values(), *self.namespace.chosen]


def block_map(network: Network, *, mode: str = "equicorrelated", tokens=None, symbols=(),
              opaque: bool = False, input_mean_zero: bool = True, simplify_seconds: float | None = None) -> BlockMap:
    """Compose the symbolic maps of ``network`` (docs/theory.md §1-2).

    ``mode``: ``"equicorrelated"`` (state q, ρ, μ on T tokens, T a symbol) or ``"explicit"``
    (``tokens`` = T or a tuple of sequence lengths; N×N sympy matrices). ``symbols``: numeric
    fields to turn into symbols (see :class:`~kernelprop.symbolic.symbols.Namespace`).
    ``opaque``: keep activations without closed form as numerically evaluated sympy functions
    instead of refusing them. ``simplify_seconds``: total time spent simplifying the steps (the
    expressions are exact either way; only their readability depends on it; default 10 s in the
    equicorrelated mode, 4 s in the explicit mode). Raises :class:`~kernelprop.errors.NotSupportedError`
    naming the layer when a layer has no symbolic map in this mode.
    """
    if getattr(network, "shared_weights", False):
        from ..errors import NotSupportedError
        raise NotSupportedError("shared_weights = true: the block map of a shared matrix depends on every earlier "
                                "use of it (docs/theory.md §13), which the symbolic state does not carry; use the "
                                "numeric engine")
    coder: EquiCoder | ExplicitCoder
    if mode == "equicorrelated":
        coder = EquiCoder()
    elif mode == "explicit":
        if tokens is None:
            raise SpecError("tokens", None, "the explicit mode needs the number of tokens T (or sequence lengths)")
        segs = (tokens,) if isinstance(tokens, (int, np.integer)) else tuple(tokens)
        if not segs or any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1 for t in segs):
            raise SpecError("tokens", tokens, "must be a whole number >= 1 or a list of them")
        if sum(segs) > 12:
            raise SpecError("tokens", tokens, "the explicit symbolic mode is meant for small T (at most 12 tokens)")
        coder = ExplicitCoder(segs)
    else:
        raise SpecError("mode", mode, "must be \"equicorrelated\" or \"explicit\"")
    ns = S.Namespace(network, symbols)
    ctx = Context(coder.fam, ns, opaque)
    ctx.clock = {"left": simplify_seconds if simplify_seconds is not None
                 else 10.0 if mode == "equicorrelated" else 4.0}
    flags = (True, input_mean_zero)
    stem = final = first = block = None
    if network.stem.layers:
        stem = _section("stem", network.stem.layers, coder, ctx, *flags, at_l=0)
        flags = (stem.gaussian_out, stem.mean_zero_out)
    if network.block.layers and network.depth >= 1:
        first = _section("block", network.block.layers, coder, ctx, *flags)
        block = first
        seen = [flags]
        flags = (first.gaussian_out, first.mean_zero_out)
        while flags not in seen and network.depth >= 2:  # flags of blocks l >= 2 (a fixed point: <= 4 tries)
            seen.append(flags)
            block = _section("block", network.block.layers, coder, ctx, *flags)
            flags = (block.gaussian_out, block.mean_zero_out)
    if network.final.layers:
        final = _section("final", network.final.layers, coder, ctx, *flags, at_l=S.L + 1)
    used = dag_free_symbols([e for sec in (block, first, stem, final) if sec is not None for e in sec.outputs])
    means = set(coder.mean_symbols())
    state = tuple(s for s in coder.symbols if s not in means or s in used)
    return BlockMap(network, coder.mode, coder, ns, block, first, stem, final, state, opaque, input_mean_zero)


def _section(name, layers, coder, ctx, gaussian, mean_zero, at_l=None) -> SectionMap:
    current = list(coder.symbols)
    if mean_zero:
        zero = set(coder.mean_symbols())
        current = [sp.Integer(0) if s in zero else s for s in current]
    g_in, mz_in = gaussian, mean_zero
    steps = []
    for i, layer in enumerate(layers):
        ctx.where = f"{name}[{i}] ({layer.kind})"
        out = apply(layer, coder.state(mean_zero, gaussian), ctx)
        outs = coder.read(out)
        if at_l is not None:
            outs = tuple(sp.sympify(e).xreplace({S.l: at_l}) for e in outs)
        outs = tuple(tidy(e, clock=ctx.clock) for e in outs)
        steps.append(Step(f"{i}:{layer.kind}", outs))
        current = dag_subs(outs, dict(zip(coder.symbols, current)))
        gaussian, mean_zero = out.gaussian, out.mean.is_zero()
    composed = tuple(tidy(e, budget=60, clock=ctx.clock) for e in current)
    return SectionMap(name, tuple(steps), composed, g_in, mz_in, gaussian, mean_zero)


# ----------------------------------------------------------------------------------------------
# numeric evaluation


class _Printer(NumPyPrinter):
    """NumPy printer that clips arccos/arcsin arguments to [−1, 1] and square-root arguments at 0.

    Every square root in the maps is of a quantity that is ≥ 0 on positive semi-definite kernels
    (a variance, ``Σ_iiΣ_jj − Σ_ij²``, ``1 − c²``); near collapse round-off can push it below 0, so
    the generated code clamps it, as the numeric engine does.
    """

    def _print_Pow(self, e, rational=False):
        if e.exp == sp.S.Half and not e.base.is_number:
            return f"numpy.sqrt(numpy.maximum({self._print(e.base)}, 0.0))"
        return super()._print_Pow(e, rational=rational)

    def _print_acos(self, e):
        return f"numpy.arccos(numpy.clip({self._print(e.args[0])}, -1.0, 1.0))"

    def _print_asin(self, e):
        return f"numpy.arcsin(numpy.clip({self._print(e.args[0])}, -1.0, 1.0))"


def _safe(sym):
    name = str(sym)
    return sym if name.isidentifier() else sp.Symbol("".join(ch if ch.isalnum() else "_" for ch in name))


def lambdify(bmap: BlockMap, section: str = "block", *, substitute_fields: bool = True):
    """``(function, source)``: the section map as numpy code (``sympy.lambdify(..., cse=True)``).

    Arguments: the state symbols, then l, L, [T,] the params and (unless ``substitute_fields``)
    the chosen field symbols; returns the new state (all coordinates, means included).
    """
    sec = getattr(bmap, section)
    if sec is None:
        raise SpecError("section", section, "this network has no such section")
    exprs = list(sec.outputs)
    args = list(bmap.state) + bmap.hyper
    chosen = {sym: val for sym, (_, val) in bmap.namespace.chosen.items()} if substitute_fields else {}
    args = [a for a in args if a not in chosen]
    rename = {a: _safe(a) for a in args}
    exprs = dag_subs(exprs, {**chosen, **rename})
    if chosen:
        exprs = dag_subs(exprs, rename)
    fn = numpy_function([rename[a] for a in args], exprs)
    return fn, inspect.getsource(fn)


def opaque_functions(exprs) -> dict:
    """``{name: implementation}`` of the opaque (numerically implemented) functions in ``exprs``."""
    return {str(f.func): f.func._imp_ for f in dag_nodes(exprs) if hasattr(f.func, "_imp_")}


def numpy_function(args, exprs):
    """``sympy.lambdify(args, exprs, cse=True)`` with the clipping printer and opaque implementations."""
    impl = opaque_functions(exprs if isinstance(exprs, (list, tuple)) else [exprs])
    printer = _Printer({"fully_qualified_modules": True, "inline": True, "allow_unknown_functions": True,
                        "user_functions": {k: k for k in impl}})
    return sp.lambdify(args, exprs, modules=[impl, "numpy"], printer=printer, cse=True, docstring_limit=0,
                       use_imps=False)


@dataclass(frozen=True, eq=False)
class SymbolicTrajectory:
    """Kernels and means per record, as :class:`kernelprop.Trajectory` records them (every block)."""

    labels: list
    kernels: np.ndarray
    means: np.ndarray
    states: np.ndarray | None = field(default=None)


def evaluate(bmap: BlockMap, inputs: Inputs) -> SymbolicTrajectory:
    """Iterate the lambdified maps from ``inputs``; labels as :func:`kernelprop.propagate` (``record="blocks"``)."""
    coder, ns, net = bmap.coder, bmap.namespace, bmap.network
    x, extra = coder.numeric_state(inputs)
    if bmap.input_mean_zero and np.any(inputs.mean != 0):
        raise SpecError("inputs.mean", "non-zero", "the map was built for a zero input mean: "
                        "build it with block_map(..., input_mean_zero=False)")
    index = {s: i for i, s in enumerate(coder.symbols)}
    pick = [index[s] for s in bmap.state]
    fns = {}

    def step(section, x, l_value):
        key = id(getattr(bmap, section))
        if key not in fns:
            fns[key] = lambdify(bmap, section)[0]
        values = {**ns.substitutions(), **extra}
        hyper = [l_value, net.depth] + ([values[S.T]] if bmap.mode == "equicorrelated" else []) + \
                [float(values[p]) for p in ns.params.values()]
        out = fns[key](*[x[i] for i in pick], *hyper)
        return np.array([float(np.real_if_close(v)) for v in np.broadcast_arrays(*out)], dtype=float)

    labels, states = ["input"], [x]
    if bmap.stem is not None:
        x = step("stem", x, 0)
        labels.append("stem")
        states.append(x)
    for lv in range(1, net.depth + 1):
        x = step("first" if lv == 1 else "block", x, lv)
        labels.append(f"block {lv}")
        states.append(x)
    if bmap.final is not None:
        x = step("final", x, net.depth + 1)
        labels.append("final")
        states.append(x)
    values = {**ns.substitutions(), **extra}
    ks, ms = zip(*(coder.kernel(s, values) for s in states))
    return SymbolicTrajectory(labels, np.stack(ks), np.stack(ms), np.stack(states))
