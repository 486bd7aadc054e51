"""Sympy symbols for one network description.

Every numeric field of a layer becomes a sympy expression: a plain number stays a number (exact
rational when it has a short decimal form), an expression string such as ``"beta/sqrt(L)"`` is
parsed with sympy into the symbols ``L`` (depth), ``l`` (block index) and the named params, and
fields chosen by the user (``symbols=["value_var", "block[0].beta=b"]``) become free symbols whose
values are kept for numeric evaluation. Field paths follow the spec's names: ``block[0].weight_var``,
``block[1].layers[2].value_var``, ``block[0].branches[1].beta``, ``stem[0].gain``.
"""

from __future__ import annotations

import ast
import math

import numpy as np
import sympy as sp
from sympy.printing.str import StrPrinter

from ..errors import SpecError
from ..network import expressions
from ..network import layers as NL

# state and structural symbols shared by every derivation
L = sp.Symbol("L", integer=True, positive=True)
l = sp.Symbol("l", integer=True, nonnegative=True)
T = sp.Symbol("T", integer=True, positive=True)
q = sp.Symbol("q", positive=True)
rho = sp.Symbol("rho", real=True)
mu = sp.Symbol("mu", real=True)
c = sp.Symbol("c", real=True)
RESERVED = {"L", "l", "T", "q", "rho", "mu", "c", "pi", "E", "I", "N", "S", "O", "Q"}

_FUNCTIONS = {"sqrt": sp.sqrt, "exp": sp.exp, "log": sp.log, "sin": sp.sin, "cos": sp.cos,
              "tanh": sp.tanh, "abs": sp.Abs, "min": sp.Min, "max": sp.Max, "pi": sp.pi, "e": sp.E}

# default symbol name (identifier) and LaTeX for a field, by field name
FIELD_SYMBOLS = {
    "weight_var": ("sigma_w2", r"\sigma_w^2"), "bias_var": ("sigma_b2", r"\sigma_b^2"),
    "value_var": ("sigma_v2", r"\sigma_v^2"), "out_var": ("sigma_o2", r"\sigma_o^2"),
    "qk_var": ("sigma_qk2", r"\sigma_{qk}^2"), "gain": ("g", "g"), "eps": ("epsilon", r"\epsilon"),
    "p": ("p", "p"), "scale": ("scale", r"s_\phi"), "alpha": ("alpha", r"\alpha"),
    "beta": ("beta", r"\beta"), "gamma": ("gamma", r"\gamma"), "alibi_scale": ("s_alibi", r"s_{\mathrm{alibi}}"),
    "slope": ("s", "s"), "a": ("a", "a"),
    "gate_var": ("sigma_g2", r"\sigma_g^2"), "up_var": ("sigma_u2", r"\sigma_u^2"),
    "down_var": ("sigma_d2", r"\sigma_d^2"),
}
_ASSUME = {"nonneg": dict(nonnegative=True), "positive": dict(positive=True), "prob": dict(nonnegative=True),
           "real": dict(real=True)}
# display names for plain-text output
DISPLAY = {"rho": "ρ", "mu": "μ", "sigma_w2": "σ_w²", "sigma_b2": "σ_b²", "sigma_v2": "σ_v²",
           "sigma_o2": "σ_o²", "sigma_qk2": "σ_qk²", "sigma_g2": "σ_g²", "sigma_u2": "σ_u²", "sigma_d2": "σ_d²",
           "alpha": "α", "beta": "β", "gamma": "γ",
           "epsilon": "ε", "chi": "χ", "lambda_a": "λ_a"}
LATEX = {"rho": r"\rho", "mu": r"\mu", "chi": r"\chi"}


_SUB = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def display(name: str) -> str:
    """Plain-text name of a symbol: ``rho`` → ``ρ``, ``rho_0`` → ``ρ₀``, ``sigma_v2`` → ``σ_v²``."""
    if name in DISPLAY:
        return DISPLAY[name]
    base, _, sub = name.rpartition("_")
    if base and sub.isdigit() and (base in DISPLAY or base in ("q", "x", "m")):
        return DISPLAY.get(base, base) + sub.translate(_SUB)
    return name


class _Text(StrPrinter):
    """sympy's str printer with Greek letters for the symbols and π."""

    def _print_Symbol(self, e):
        return display(e.name)

    def _print_Pi(self, e):
        return "π"


def text(e) -> str:
    """One-line Unicode form of a sympy expression."""
    return _Text({"order": None}).doprint(sp.sympify(e))


def number(v) -> sp.Expr:
    """A plain number as sympy: integers exact, short decimals as rationals (0.1 → 1/10), else a Float."""
    if isinstance(v, (bool, np.bool_)):
        raise SpecError("number", v, "must be a number")
    if isinstance(v, (int, np.integer)):
        return sp.Integer(int(v))
    v = float(v)
    if not math.isfinite(v):
        return sp.oo if v > 0 else -sp.oo if v < 0 else sp.nan
    r = sp.Rational(repr(v))
    return r if r.q <= 10 ** 6 and abs(r.p) <= 10 ** 12 else sp.Float(v)


def parse(text, names: dict) -> sp.Expr:
    """Convert an expression of :mod:`kernelprop.network.expressions` (an ``Expr`` or its text) to sympy.

    ``names`` maps identifiers (L, l, params) to sympy symbols; functions and constants are the
    ones :mod:`kernelprop.network.expressions` allows (sqrt, exp, log, sin, cos, tanh, abs, min, max,
    pi, e). Integers stay exact, short decimals become exact rationals (:func:`number`). The tree is
    converted node by node (no text is evaluated), so a param may be named like a sympy class
    (``Integer``), and the expression checks (bounded exponents, arity) apply as in the numeric engine.
    """
    unknown = set(expressions.FUNCTIONS) | set(expressions.CONSTANTS)
    missing = unknown - set(_FUNCTIONS)
    if missing:  # a function added to the expression language without a sympy counterpart
        from ..errors import NotSupportedError
        raise NotSupportedError(f"expression functions {sorted(missing)} have no sympy counterpart yet")
    e = text if isinstance(text, expressions.Expr) else expressions.parse(text, known=None)
    return _to_sympy(e.tree, names, e)


_SP_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
              ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a ** b}


def _to_sympy(node, names: dict, e) -> sp.Expr:
    if isinstance(node, ast.Constant):
        return number(node.value)
    if isinstance(node, ast.Name):
        if node.id in names:
            return names[node.id]
        if node.id in _FUNCTIONS:
            return _FUNCTIONS[node.id]
        raise SpecError(e.field, e.text, f"uses {node.id!r}, which has no value here (known: {sorted(names)})")
    if isinstance(node, ast.BinOp):
        return _SP_BINOPS[type(node.op)](_to_sympy(node.left, names, e), _to_sympy(node.right, names, e))
    if isinstance(node, ast.UnaryOp):
        v = _to_sympy(node.operand, names, e)
        return -v if isinstance(node.op, ast.USub) else v
    return _FUNCTIONS[node.func.id](*(_to_sympy(a, names, e) for a in node.args))


def _field_paths(serial: NL.Serial, prefix: str):
    """Yield ``(path, layer, field_name, value, check)`` for every numeric field, spec-style paths."""
    for i, layer in enumerate(serial.layers):
        where = f"{prefix}[{i}]"
        yield from _layer_fields(layer, where)


def _layer_fields(layer, where):
    """The numeric fields the wide-limit maps read (:meth:`~kernelprop.layers.Layer.kernel_fields`), then
    those of the children, with spec-style paths (``layers[i]``, ``branches[k].beta``, ``branches[k].layers[i]``)."""
    if isinstance(layer, NL.Serial):
        yield from _field_paths(layer, f"{where}.layers")
    elif isinstance(layer, NL.Residual):
        yield f"{where}.alpha", layer, "alpha", layer.alpha, "real"
        yield f"{where}.beta", layer, "beta", layer.beta, "real"
        yield from _field_paths(layer.branch, f"{where}.layers")
    elif isinstance(layer, NL.Parallel):
        yield f"{where}.alpha", layer, "alpha", layer.alpha, "real"
        for k, (b, br) in enumerate(zip(layer.betas, layer.branches)):
            yield f"{where}.branches[{k}].beta", layer, f"betas[{k}]", b, "real"
            yield from _field_paths(br, f"{where}.branches[{k}].layers")
    else:
        checks = {name: check for name, _, check in layer.numeric_fields()}
        for name in layer.kernel_fields():
            path = f"{where}.{name[7:] if name.startswith('params.') else name}"
            yield path, layer, name, layer.field_value(name), checks.get(name, "real")


class Namespace:
    """The sympy view of a network's numbers: ``value(layer, field)`` for the maps, ``values`` for evaluation.

    ``symbols``: field selectors, each ``FIELD`` (every layer with that field), ``PATH`` (one field,
    e.g. ``block[0].layers[1].value_var``) or either with ``=NAME`` to choose the symbol's name.
    Named params are always symbols (their values in ``values``); so are L, l and T.
    """

    def __init__(self, network: NL.Network, symbols=()):
        self.network = network
        taken = set(RESERVED)
        self.params = {}
        for name in network.params:
            sym_name = name if name not in taken else f"{name}_param"
            self.params[name] = sp.Symbol(sym_name, real=True)
            taken.add(sym_name)
        self.names = {"L": L, "l": l, **self.params}
        self.values = {L: sp.Integer(network.depth), **{self.params[k]: number(v) for k, v in network.params.items()}}
        self.latex = dict(LATEX)
        self.fields = {}     # (id(layer), field) -> symbol
        self.chosen = {}     # symbol -> (path, value expression)
        selectors = [_selector(s) for s in symbols]
        rows = []
        for part in ("stem", "block", "final"):
            rows += list(_field_paths(getattr(network, part), part))
        hits: dict[str, tuple[tuple, str | None]] = {}   # path -> (field row, chosen NAME)
        for sel, name in selectors:
            found = [r for r in rows if _matches(sel, r[0])]
            if not found:
                known = sorted({r[0].rsplit(".", 1)[1] for r in rows})
                raise SpecError("symbols", sel, f"matches no numeric field; fields of this network: {known} "
                                "(or a path such as block[0].weight_var)")
            for r in found:
                hits.setdefault(r[0], (r, name))
        # name the chosen fields: NAME if given, else the field's default; number duplicates
        wanted: dict[str, list[tuple[str, tuple, bool]]] = {}   # symbol name -> (path, row, named explicitly)
        for path, (r, name) in hits.items():
            fkey = path.rsplit(".", 1)[1]
            base = name or FIELD_SYMBOLS.get(fkey, (fkey, None))[0]
            wanted.setdefault(base, []).append((path, r, name is not None))
        for base, items in wanted.items():
            for k, (path, r, explicit) in enumerate(items):
                sym_name = base if len(items) == 1 else f"{base}_{k + 1}"
                while sym_name in taken:
                    sym_name += "_"
                taken.add(sym_name)
                _, layer, fname, value, check = r
                sym = sp.Symbol(sym_name, **_ASSUME.get(check, dict(real=True)))
                self.fields[(id(layer), fname)] = sym
                self.chosen[sym] = (path, self.convert(value))
                fkey = path.rsplit(".", 1)[1]
                if fkey in FIELD_SYMBOLS and not explicit:
                    tex = FIELD_SYMBOLS[fkey][1]
                    self.latex[sym_name] = tex if len(items) == 1 else f"{{{tex}}}_{{({k + 1})}}"

    def convert(self, v) -> sp.Expr:
        """A field value (number or :class:`~kernelprop.network.expressions.Expr`) as sympy."""
        if isinstance(v, expressions.Expr):
            return parse(v, self.names)
        if isinstance(v, sp.Basic):
            return v
        return number(v)

    def value(self, layer, name: str) -> sp.Expr:
        """The sympy value of ``layer.<name>`` (``"betas[1]"``, ``"params.slope"`` for the odd ones)."""
        sym = self.fields.get((id(layer), name))
        if sym is not None:
            return sym
        return self.convert(layer.field_value(name))

    def substitutions(self, at_l=None) -> dict:
        """``{symbol: value}`` for every chosen field, param and L (and l if given), fully numeric."""
        subs = {sym: val for sym, (_, val) in self.chosen.items()}
        base = dict(self.values)
        if at_l is not None:
            base[l] = sp.sympify(at_l)
        subs = {k: v.xreplace(base).xreplace(base) for k, v in subs.items()}
        return {**base, **subs}

    @property
    def symbols(self) -> list:
        """Every hyperparameter symbol: L, the params, the chosen fields."""
        return [L, *self.params.values(), *self.chosen]


def _selector(text: str):
    sel, _, given = str(text).partition("=")
    sel, name = sel.strip(), given.strip() or None
    if not sel or (name is not None and not name.isidentifier()):
        raise SpecError("symbols", text, "must be FIELD or PATH, optionally =NAME with NAME an identifier "
                        "(e.g. value_var, block[0].beta=b)")
    if name in RESERVED:
        raise SpecError("symbols", text, f"the name {name!r} is reserved ({sorted(RESERVED)})")
    return sel, name


def _matches(sel: str, path: str) -> bool:
    if "." in sel or "[" in sel:
        return path == sel
    return path.rsplit(".", 1)[1] == sel
