"""Depth-dependent parameter values such as ``beta = "1/sqrt(L)"``.

A parameter of a layer is a number or an expression string. Expressions may use the depth ``L``
(number of repeated blocks), the 1-based block index ``l``, any constant in the description's
``params`` table, the functions ``sqrt, exp, log, sin, cos, tanh, abs, min, max`` and the
constants ``pi, e``. They are parsed once (so a typo is a spec error before any work starts) and
evaluated per block; the symbolic engine reads the same text with sympy.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass

from ..errors import SpecError

FUNCTIONS = {
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "sin": math.sin, "cos": math.cos,
    "tanh": math.tanh, "abs": abs, "min": min, "max": max,
}
CONSTANTS = {"pi": math.pi, "e": math.e}
_BINOPS = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a ** b,
}
_UNARY = {ast.USub: lambda a: -a, ast.UAdd: lambda a: a}


@dataclass(frozen=True)
class Expr:
    """A parsed arithmetic expression in the depth ``L``, block index ``l`` and named params."""

    text: str
    names: frozenset

    def __call__(self, env: dict) -> float:
        try:
            value = _evaluate(ast.parse(self.text, mode="eval").body, env)
        except ZeroDivisionError:
            raise SpecError("expression", self.text, f"divides by zero at {_describe(env)}") from None
        except (ValueError, OverflowError) as exc:
            raise SpecError("expression", self.text, f"is undefined at {_describe(env)} ({exc})") from None
        return float(value)

    def __str__(self) -> str:
        return self.text


def _describe(env: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in env.items() if k in ("L", "l")) or "these values"


def parse(text: str, field: str = "expression", known: frozenset | set | None = frozenset()) -> Expr:
    """Parse ``text`` into an :class:`Expr`; names other than L, l, functions, constants and
    ``known`` are a :class:`SpecError` naming ``field`` (``known=None``: names are checked later)."""
    try:
        tree = ast.parse(str(text).strip(), mode="eval").body
    except SyntaxError:
        raise SpecError(field, text, "does not parse as an arithmetic expression "
                        "(use numbers, + - * / **, sqrt/exp/log, L for depth, l for block index)") from None
    names: set[str] = set()
    _check(tree, field, text, names)
    if known is not None:
        unknown = names - {"L", "l"} - set(CONSTANTS) - set(known)
        if unknown:
            raise SpecError(field, text, f"uses unknown name(s) {sorted(unknown)}; allowed are L (depth), "
                            f"l (block index, 1-based), pi, e and the params {sorted(known) or '(none defined)'}")
    return Expr(str(text).strip(), frozenset(names))


def _check(node, field, text, names):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return
    if isinstance(node, ast.Name):
        names.add(node.id)
        return
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        _check(node.left, field, text, names)
        _check(node.right, field, text, names)
        return
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        _check(node.operand, field, text, names)
        return
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS
            and not node.keywords):
        for arg in node.args:
            _check(arg, field, text, names)
        return
    raise SpecError(field, text, f"contains {ast.unparse(node)!r}, which is not allowed; "
                    f"use numbers, + - * / **, functions {sorted(FUNCTIONS)}, L, l and params")


def _evaluate(node, env):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in env:
            return env[node.id]
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        raise SpecError("expression", node.id, f"has no value here (known: {sorted(env)})")
    if isinstance(node, ast.BinOp):
        return _BINOPS[type(node.op)](_evaluate(node.left, env), _evaluate(node.right, env))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand, env))
    return FUNCTIONS[node.func.id](*(_evaluate(a, env) for a in node.args))


def value(x, env: dict) -> float:
    """Resolve a parameter that is a number or an :class:`Expr` in ``env``."""
    return x(env) if isinstance(x, Expr) else x
