"""Depth-dependent parameter values such as ``beta = "1/sqrt(L)"``.

A parameter of a layer is a number or an expression string. Expressions may use the depth ``L``
(number of repeated blocks), the 1-based block index ``l``, any constant in the description's
``params`` table, the functions ``sqrt, exp, log, sin, cos, tanh, abs`` (one argument), ``min, max``
(one or more) and the constants ``pi, e``. They are parsed once (so a typo is a spec error before any
work starts) and evaluated per block in float64; the symbolic engine converts the same tree to sympy.

The work is bounded: a constant exponent must satisfy ``|p| <= MAX_EXPONENT`` (the symbolic engine
computes integer powers exactly), the text is at most ``MAX_LENGTH`` characters, and every
intermediate value must be a finite real number, otherwise a :class:`SpecError` names the field.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np

from ..errors import SpecError

FUNCTIONS = {
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "sin": math.sin, "cos": math.cos,
    "tanh": math.tanh, "abs": abs, "min": lambda *a: min(a), "max": lambda *a: max(a),
}
VARIADIC = frozenset({"min", "max"})    # one or more arguments; the others take exactly one
CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_EXPONENT = 1e4      # bound on a constant exponent (exact integer powers in the symbolic engine)
MAX_LENGTH = 1000       # characters of an expression
MAX_DEPTH = 50          # nesting of the expression tree
_BINOPS = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.Pow: math.pow,
}
_UNARY = {ast.USub: lambda a: -a, ast.UAdd: lambda a: a}


@dataclass(frozen=True)
class Expr:
    """A parsed arithmetic expression in the depth ``L``, block index ``l`` and named params."""

    text: str
    names: frozenset
    field: str = dataclasses.field(default="expression", compare=False)

    def __call__(self, env: dict) -> float:
        """The value in float64 at ``env``; a :class:`SpecError` naming the field if it is not a finite real."""
        return _run(ast.parse(self.text, mode="eval").body, env, self.field, self.text)

    def over(self, env: dict):
        """The value over a batch: ``env`` maps names to numbers or to arrays of shape (B,) (one value per
        batch member); a number when no name used here is an array, else an array of shape (B,). The same
        arithmetic in float64, elementwise (numpy's functions for math's); a member whose value is not a
        finite real is a :class:`SpecError` naming the field and that member's values."""
        if not any(np.ndim(env.get(k, 0.0)) for k in self.names):
            return self(env)
        with np.errstate(all="ignore"):
            try:
                v = np.asarray(_array_step(self.tree, env), dtype=np.float64)
            except ZeroDivisionError:
                v = np.array([np.nan])
        size = max(np.size(env[k]) for k in self.names if np.ndim(env.get(k, 0.0)))
        v = np.broadcast_to(v, (size,)).copy()
        bad = np.flatnonzero(~np.isfinite(v))
        if bad.size:    # the member's own message, from the scalar evaluator
            member = {k: (float(np.asarray(x)[bad[0]]) if np.ndim(x) else x) for k, x in env.items()}
            self(member)
            raise SpecError(self.field, self.text, f"is not a finite real number at {member}")
        return v

    @property
    def tree(self) -> ast.expr:
        """The checked syntax tree (for the symbolic engine's conversion to sympy)."""
        return ast.parse(self.text, mode="eval").body

    def __str__(self) -> str:
        return self.text


def _describe(env: dict) -> str:
    at = ", ".join(f"{k}={v}" for k, v in env.items() if k in ("L", "l"))
    return f" at {at}" if at else ""


def parse(text: str, field: str = "expression", known: frozenset | set | None = frozenset()) -> Expr:
    """Parse ``text`` into an :class:`Expr`; names other than L, l, functions, constants and
    ``known`` are a :class:`SpecError` naming ``field`` (``known=None``: names are checked later)."""
    source = str(text).strip()
    if len(source) > MAX_LENGTH:
        raise SpecError(field, f"{source[:40]}...", f"is {len(source)} characters long; an expression has at most "
                        f"{MAX_LENGTH}")
    try:
        tree = ast.parse(source, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise SpecError(field, text, "does not parse as an arithmetic expression "
                        "(use numbers, + - * / **, sqrt/exp/log, L for depth, l for block index)") from None
    names: set[str] = set()
    _check(tree, field, text, names, 0)
    _constant_parts(tree, field, text)
    if known is not None:
        unknown = names - {"L", "l"} - set(CONSTANTS) - set(known)
        if unknown:
            raise SpecError(field, text, f"uses unknown name(s) {sorted(unknown)}; allowed are L (depth), "
                            f"l (block index, 1-based), pi, e and the params {sorted(known) or '(none defined)'}")
    return Expr(source, frozenset(names), field)


def _check(node, field, text, names, depth):
    if depth > MAX_DEPTH:
        raise SpecError(field, text, f"nests deeper than {MAX_DEPTH} levels")
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return
    if isinstance(node, ast.Name):
        names.add(node.id)
        return
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        _check(node.left, field, text, names, depth + 1)
        _check(node.right, field, text, names, depth + 1)
        return
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        _check(node.operand, field, text, names, depth + 1)
        return
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS
            and not node.keywords and not any(isinstance(a, ast.Starred) for a in node.args)):
        name, n = node.func.id, len(node.args)
        if (n != 1 and name not in VARIADIC) or n == 0:
            raise SpecError(field, text, f"calls {name} with {n} argument(s); {name} takes "
                            f"{'one or more' if name in VARIADIC else 'exactly one'}")
        for arg in node.args:
            _check(arg, field, text, names, depth + 1)
        return
    raise SpecError(field, text, f"contains {ast.unparse(node)!r}, which is not allowed; "
                    f"use numbers, + - * / **, functions {sorted(FUNCTIONS)}, L, l and params")


def _free(node) -> bool:
    """Whether ``node`` uses no name other than the constants (its value is known at parse time)."""
    funcs = {id(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)}
    return all(n.id in CONSTANTS for n in ast.walk(node) if isinstance(n, ast.Name) and id(n) not in funcs)


def _constant_parts(node, field, text):
    """Evaluate the name-free parts now (so 2**1024 or (-1)**0.5 is refused before any work) and bound
    every constant exponent by ``MAX_EXPONENT``."""
    if _free(node):
        _run(node, {}, field, text)
    for n in ast.walk(node):
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow) and _free(n.right):
            p = _run(n.right, {}, field, text)
            if abs(p) > MAX_EXPONENT:
                raise SpecError(field, text, f"raises to the power {p:g}; exponents are bounded by "
                                f"{MAX_EXPONENT:g} in absolute value")
        elif isinstance(n, ast.Call) and _free(n):
            _run(n, {}, field, text)


def _run(node, env, field, text) -> float:
    try:
        return _evaluate(node, env)
    except ZeroDivisionError:
        raise SpecError(field, text, f"divides by zero{_describe(env)}") from None
    except _Undefined as exc:
        raise SpecError(field, text, f"{exc}{_describe(env)}; use an expression with a finite real value") from None
    except (ValueError, OverflowError, TypeError) as exc:
        raise SpecError(field, text, f"is undefined{_describe(env)} ({exc}); use an expression with a finite "
                        "real value") from None


class _Undefined(ArithmeticError):
    pass


def _real(v, node) -> float:
    v = float(v)
    if not math.isfinite(v):
        raise _Undefined(f"{ast.unparse(node)!r} is not a finite number")
    return v


def _evaluate(node, env) -> float:
    """The value of a checked tree in float64; every intermediate value is a finite real."""
    return _real(_step(node, env), node)


def _step(node, env):
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        if node.id in env:
            return env[node.id]
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        raise _Undefined(f"{node.id!r} has no value here (known: {sorted(env)})")
    if isinstance(node, ast.BinOp):
        return _BINOPS[type(node.op)](_evaluate(node.left, env), _evaluate(node.right, env))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand, env))
    return FUNCTIONS[node.func.id](*(_evaluate(a, env) for a in node.args))


_ARRAY_FUNCTIONS = {
    "sqrt": np.sqrt, "exp": np.exp, "log": np.log, "sin": np.sin, "cos": np.cos, "tanh": np.tanh,
    "abs": np.abs, "min": lambda *a: functools.reduce(np.minimum, a), "max": lambda *a: functools.reduce(np.maximum, a),
}


def _array_step(node, env):
    """:func:`_step` over arrays (numpy's elementwise functions; a non-finite value propagates as NaN/inf)."""
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        if node.id in env:
            return env[node.id]
        return CONSTANTS[node.id]
    if isinstance(node, ast.BinOp):
        a, b = _array_step(node.left, env), _array_step(node.right, env)
        if isinstance(node.op, ast.Pow):
            return np.power(np.asarray(a, dtype=np.float64), b)
        if isinstance(node.op, ast.Div):
            return np.true_divide(np.asarray(a, dtype=np.float64), b)
        return _BINOPS[type(node.op)](a, b)
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_array_step(node.operand, env))
    return _ARRAY_FUNCTIONS[node.func.id](*(np.asarray(_array_step(a, env), dtype=np.float64) for a in node.args))


def value(x, env: dict) -> float:
    """Resolve a parameter that is a number or an :class:`Expr` in ``env``."""
    return x(env) if isinstance(x, Expr) else x
