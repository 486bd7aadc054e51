"""The layer protocol: a layer's description and every interpretation of it, in one class.

A layer type is a frozen dataclass whose fields describe it (numbers or depth expressions such as
``"1/sqrt(L)"``, checked on construction; every other field is checked against its annotation: ``bool``
takes only booleans, ``int`` only integers, ``str`` a string, ``Mapping`` a table, ``X | None`` also
None) and whose methods are its rules, one per interpreter:

=====================  ===========================================================================
``kernel_map``         infinite-width forward map on the engine state ``(Σ, m, …)``; returns the new
                       state and the layer's **backward rule**, a closure ``back(Π, grads) -> Π_x``
                       over what the forward computed (the backward pass never re-runs it)
``sample``             finite-width forward on features ``X`` (B, N, w) with random weights; when
                       ``ctx.tape`` it also returns the exact transpose ``pull(G, grads) -> G_X``
``symbolic_map``       the same map in sympy (:mod:`kernelprop.symbolic`)
``plan``               the Monte Carlo's shape and memory check (returns the output width)
``kernel_fields``      the numeric fields the wide-limit map reads (symbolic namespace, sweeps)
=====================  ===========================================================================

A rule a layer does not have is *refused by name*: the default methods raise
:class:`~kernelprop.errors.NotSupportedError` ("layer `foo` has no symbolic map: …"), with the reason
from the class's ``refusals`` table when it gives one. :func:`register_layer` makes a user-defined
type known to the spec loader (``type = "foo"`` in TOML) and to every interpreter.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import field
from typing import Any, ClassVar

import numpy as np

from ..errors import NotSupportedError, SpecError
from ..network import expressions

Param = float | int | expressions.Expr | str   # a number, or a depth expression (parsed on construction)

# constraints a numeric field can carry in its metadata
_CHECKS = {
    "nonneg": (lambda v: v >= 0, "must be a finite number >= 0"),
    "positive": (lambda v: v > 0, "must be a finite number > 0"),
    "real": (lambda v: True, "must be a finite real number"),
    "prob": (lambda v: 0 <= v < 1, "must be a probability in [0, 1)"),
}

# the rules, by method name, with the words used when one is missing
RULES = {
    "kernel_map": "kernel map",
    "kernel_backward": "backward rule",
    "sample": "finite-width rule",
    "sample_backward": "finite-width backward rule",
    "symbolic_map": "symbolic map",
}


UNIT = "unit"
"""Field value of a weight variance chosen from the data: the variance that gives the layer's output unit
mean second moment over the batch's tokens (layer-sequential unit variance, Mishkin & Matas 2016; the
per-layer init of DeepScaleLM, Kedia et al. 2024). Accepted by fields declared with ``num(..., unit=True)``."""


def num(default, check="real", doc="", *, kernel=True, unit=False):
    """A numeric (possibly depth-dependent) dataclass field with a validity check.

    ``kernel=False`` marks a field the wide-limit maps never read (e.g. a Monte Carlo width);
    ``unit=True`` lets the field take :data:`UNIT` (a variance chosen so that the output has unit variance).
    """
    return field(default=default, metadata={"numeric": check, "doc": doc, "kernel": kernel, "unit": unit})


class Grads(list):
    """What a backward rule reports besides the gradient kernel: the parameter-gradient norms (the list's items,
    ``(path, kind, value)``) and ``error``, the relative error of the gradient kernel Π being passed back
    (error of its largest entry / that entry; docs/theory.md §11.6). A plain list carries none."""

    def __init__(self, items=(), error: float = 0.0):
        super().__init__(items)
        self.error = float(error)


def carry(grads, own, out) -> None:
    """Add a backward rule's own error (``own``: on the largest entry of its output ``out``, e.g. the quadrature
    of E[φ'φ'] or the sampled score expectations) to the relative error of a :class:`Grads`; no-op on a plain
    list or when ``own`` is 0."""
    if not isinstance(grads, Grads) or not own:
        return
    top = float(np.max(np.abs(out))) if np.size(out) else 0.0
    grads.error += float(own) / top if top > 0 else float("inf")


def unit_scale(sigma: np.ndarray, offset: float, where: str) -> float:
    """The multiplier ``c`` of :data:`UNIT`: ``c · mean_i Σ_ii + offset = 1`` for the output kernel ``Σ``
    computed at unit variance (``offset``: what is added regardless, e.g. a bias variance)."""
    from ..errors import NumericalError
    if offset >= 1.0:
        raise SpecError(f"{where}", UNIT, f"needs the added variance (here {offset:g}) below 1: the output's "
                        "mean variance cannot be brought to 1")
    v = float(np.mean(np.diagonal(sigma))) if sigma.size else 0.0
    if not v > 0.0 or not math.isfinite(v):
        raise NumericalError(where, f"a unit-variance init needs an output of positive variance, got {v:.3g}",
                             "give the field a number instead of \"unit\"")
    return (1.0 - offset) / v


def choice(default, options, doc=""):
    """A field whose value must be one of ``options``."""
    return field(default=default, metadata={"choice": tuple(options), "doc": doc})


def check_number(where: str, v, check: str) -> None:
    """Raise a :class:`SpecError` unless ``v`` is a finite number passing ``check``."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise SpecError(where, v, "must be a number or an expression string such as \"1/sqrt(L)\"")
    ok, allowed = _CHECKS[check]
    if not math.isfinite(v) or not ok(v):
        raise SpecError(where, v, allowed)


def number_field(where: str, v) -> float | expressions.Expr:
    """A real number or a parsed expression (for composite layers' weights)."""
    if isinstance(v, str):
        return expressions.parse(v, where, known=None)
    if isinstance(v, expressions.Expr):
        return v
    check_number(where, v, "real")
    return float(v)


def resolved(v: Param) -> float:
    """The number a resolved layer holds in a numeric field (its rules run on resolved layers only)."""
    if isinstance(v, (expressions.Expr, str)):
        raise TypeError(f"the field value {v!s} is an unresolved expression: call layer.resolve(env) first")
    return float(v)


# ----------------------------------------------------------------------------------------------
# field types: every plain field is checked against its annotation (bool, int, float, str, Mapping,
# sequences, callables, None and unions of these), so a new layer type is covered without hand checks

_TYPES: dict[type, dict[str, Any]] = {}
_SEQUENCES = (tuple, list, collections.abc.Sequence)


def _field_types(cls: type) -> dict[str, Any]:
    """``{field: type}`` of a layer dataclass, its string annotations evaluated in the class's module;
    an annotation that does not evaluate (a name not importable there) is left unchecked (``Any``)."""
    if cls not in _TYPES:
        out: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            namespace = {**vars(sys.modules.get(klass.__module__, typing)), **dict(vars(klass))}
            for name, tp in vars(klass).get("__annotations__", {}).items():
                if isinstance(tp, str):
                    try:
                        tp = eval(tp, namespace)  # noqa: S307 - an annotation of a registered class
                    except Exception:  # noqa: BLE001 - unresolvable: not checked
                        tp = Any
                out[name] = tp
        _TYPES[cls] = out
    return _TYPES[cls]


def _members(tp) -> tuple:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(tp)
    return (tp,)


def _one_of(v, options) -> bool:
    """``v in options`` without taking ``True`` for ``1`` or comparing an array elementwise."""
    return any((type(v) is type(o) or isinstance(v, str) and isinstance(o, str)) and v == o for o in options)


def _conforms(v, tp) -> bool:
    """True when ``v`` is a value of the annotation ``tp`` (types it cannot judge accept anything)."""
    for t in _members(tp):
        origin = typing.get_origin(t) or t
        if t is Any or isinstance(t, typing.TypeVar):
            return True
        if t is type(None) or t is None:
            ok = v is None
        elif origin is typing.Literal:
            ok = _one_of(v, typing.get_args(t))
        elif origin is bool:
            ok = isinstance(v, (bool, np.bool_))
        elif origin is int:
            ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        elif origin is float:
            ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
        elif origin is str:
            ok = isinstance(v, str)
        elif origin in (Mapping, dict, collections.abc.MutableMapping):
            ok = isinstance(v, Mapping)
        elif origin in _SEQUENCES or origin is np.ndarray:   # arrays: TOML and Python lists too
            ok = isinstance(v, (list, tuple, np.ndarray))
        elif origin is collections.abc.Callable:
            ok = callable(v)
        elif isinstance(origin, type):
            ok = isinstance(v, origin)
        else:
            return True
        if ok:
            return True
    return False


_WORDS = {bool: "true or false (a boolean: a string such as \"false\" or a number is not one)",
          int: "a whole number (not a boolean, string or float)", float: "a real number", str: "a string",
          type(None): "omitted (None)", Mapping: "a table of name = value", dict: "a table of name = value",
          collections.abc.Callable: "a callable"}


def _describe(tp) -> list[str]:
    out = []
    for t in _members(tp):
        origin = typing.get_origin(t) or t
        if origin is typing.Literal:
            out.append(f"one of {list(typing.get_args(t))}")
        elif origin in _SEQUENCES or origin is np.ndarray:
            out.append("an array (list) of values")
        else:
            out.append(_WORDS.get(origin, getattr(origin, "__name__", str(origin))))
    return out


def _doc(f: dataclasses.Field) -> str:
    return f" ({f.metadata['doc']})" if f.metadata.get("doc") else ""


def refused(layer: Layer, rule: str) -> NotSupportedError:
    """The error for a rule ``layer`` does not have, with its reason if the class gives one."""
    what = RULES.get(rule, rule)
    reason = type(layer).refusals.get(rule) or (
        f"{type(layer).__name__} defines no `{rule}` (see docs/layers.md for how to add one)")
    return NotSupportedError(f"layer `{layer.kind}` has no {what}: {reason}")


class Layer:
    """Base of all layer descriptions; subclasses are frozen dataclasses (see the module docstring)."""

    kind: ClassVar[str] = "layer"
    refusals: ClassVar[Mapping[str, str]] = {}    # rule -> why the layer has none

    # ------------------------------------------------------------------------------------------
    # description

    def __post_init__(self):
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            where = f"{self.kind}.{f.name}"
            if "numeric" in f.metadata:
                if v == UNIT and isinstance(v, str):
                    if not f.metadata.get("unit"):
                        raise SpecError(where, v, "\"unit\" (a variance chosen so that the output has unit "
                                        "variance) is only for dense.weight_var and attention.out_var")
                elif isinstance(v, str):
                    object.__setattr__(self, f.name, expressions.parse(v, where, known=None))
                elif v is not None and not isinstance(v, expressions.Expr):
                    check_number(where, v, f.metadata["numeric"])
                elif v is None and f.default is not None:
                    raise SpecError(where, v, _CHECKS[f.metadata["numeric"]][1] + " or an expression string "
                                    "such as \"1/sqrt(L)\" (it cannot be omitted)")
            elif "choice" in f.metadata:
                if not _one_of(v, f.metadata["choice"]):
                    raise SpecError(where, v, f"must be one of {list(f.metadata['choice'])}")
            else:
                tp = _field_types(type(self)).get(f.name, Any)
                if not _conforms(v, tp):
                    raise SpecError(where, v, "must be " + " or ".join(_describe(tp)) + _doc(f))
                if isinstance(v, np.bool_):
                    object.__setattr__(self, f.name, bool(v))

    def resolve(self, env: Mapping[str, float]) -> Layer:
        """A copy with every expression evaluated in ``env`` (keys L, l and params) and checked."""
        changes = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, expressions.Expr):
                x = v(env)  # type: ignore[arg-type]
                check_number(f"{self.kind}.{f.name} = {v.text!r}", x, f.metadata["numeric"])
                changes[f.name] = x
        return dataclasses.replace(self, **changes) if changes else self  # type: ignore[type-var]

    def expressions(self) -> Iterator[tuple[str, expressions.Expr]]:
        """All expressions held by this layer and its children, with their field paths."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, expressions.Expr):
                yield f"{self.kind}.{f.name}", v

    def children(self) -> tuple:
        return ()

    def numeric_fields(self) -> Iterator[tuple[str, Any, str]]:
        """``(name, value, check)`` of every numeric field of this layer (not its children)."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if "numeric" in f.metadata:
                yield f.name, getattr(self, f.name), f.metadata["numeric"]

    def field_value(self, name: str):
        """The value of a field by name; ``"params.k"`` and ``"betas[i]"`` reach into those containers."""
        if name.startswith("params."):
            return self.params[name[7:]]  # type: ignore[attr-defined]
        if name.startswith("betas["):
            return self.betas[int(name[6:-1])]  # type: ignore[attr-defined]
        return getattr(self, name)

    def kernel_fields(self) -> tuple[str, ...]:
        """Names of the numeric fields the wide-limit maps read (inactive and Monte Carlo-only
        fields left out): the symbolic engine makes symbols of these, a sweep watches them."""
        return tuple(f.name for f in dataclasses.fields(self)  # type: ignore[arg-type]
                     if "numeric" in f.metadata and f.metadata.get("kernel", True) and getattr(self, f.name) != UNIT)

    def is_unit(self, name: str) -> bool:
        """True when the field ``name`` holds :data:`UNIT` (chosen from the data at map time)."""
        v = getattr(self, name)
        return isinstance(v, str) and v == UNIT

    # ------------------------------------------------------------------------------------------
    # rules: the defaults refuse by name

    def kernel_map(self, s, ctx):
        """Infinite-width forward: ``(state_out, back)`` with ``back(Π_out, grads) -> Π_in``."""
        raise refused(self, "kernel_map")

    def sample(self, x: np.ndarray, ctx) -> tuple[np.ndarray, Callable | None]:
        """Finite-width forward: ``(X_out, pull)``; ``pull(G_out, grads) -> G_in`` when ``ctx.tape``."""
        raise refused(self, "sample")

    def symbolic_map(self, s, ctx):
        """The kernel map in sympy."""
        raise refused(self, "symbolic_map")

    def plan(self, width: int, where: str, plan) -> int:
        """Check the Monte Carlo shapes, count weights and work into ``plan``; return the output width."""
        return width

    def no_backward(self) -> Callable:
        """A backward rule that refuses (for a layer with a forward map but no backward rule)."""
        def back(*_):
            raise refused(self, "kernel_backward")
        return back

    def no_pullback(self) -> Callable:
        """A finite-width backward rule that refuses."""
        def pull(*_):
            raise refused(self, "sample_backward")
        return pull


# ----------------------------------------------------------------------------------------------
# the registry

LAYERS: dict[str, type] = {}


def register_layer(cls: type | None = None, *, kind: str | None = None, replace: bool = False):
    """Register a layer type (a :class:`Layer` subclass) under ``kind`` (default ``cls.kind``).

    Use as ``@register_layer`` on the class. The spec loader then accepts ``type = "<kind>"`` tables
    whose keys are the dataclass fields, and ``propagate``, ``backpropagate``, ``simulate``, ``check``
    and the symbolic engine call the class's rules. ``replace=True`` allows re-registering a kind.
    """
    def wrap(c):
        if not (isinstance(c, type) and issubclass(c, Layer)):
            raise SpecError("register_layer", c, "must be a subclass of kernelprop.layers.Layer")
        name = kind or c.__dict__.get("kind")
        if not isinstance(name, str) or not name.isidentifier():
            raise SpecError(f"{getattr(c, '__name__', c)}.kind", name,
                            "must be set on the class to an identifier such as \"my_scale\"")
        if name in LAYERS and LAYERS[name] is not c and not replace:
            raise SpecError("register_layer", name, f"is already registered by {LAYERS[name].__name__}; "
                            "choose another kind or pass replace=True")
        if not dataclasses.is_dataclass(c) and not getattr(c, "composite", False):
            raise SpecError("register_layer", c.__name__, "must be a dataclass (decorate it with "
                            "@dataclass(frozen=True, eq=False) below @register_layer)")
        c.kind = name
        LAYERS[name] = c
        return c
    return wrap(cls) if cls is not None else wrap


def unregister_layer(kind: str) -> None:
    """Forget a registered layer type (for tests and interactive sessions)."""
    LAYERS.pop(kind, None)
