"""Spec files: the same network description as TOML (reference: docs/spec-reference.md).

A spec has top-level ``name``, ``description``, ``depth``, ``shared_weights`` (every block reuses the
first block's weights); tables ``[params]`` (named constants for
expressions), ``[input]``, ``[record]``; and arrays of layer tables ``[[stem]]``, ``[[block]]``
(repeated ``depth`` times) and ``[[final]]``. A layer table has a ``type`` and that layer's fields;
``residual`` and ``parallel`` hold sub-layers in ``layers`` (``branches = [{beta=…, layers=[…]}]``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .. import inputs as I
from ..errors import SpecError
from ..layers import LAYERS
from . import layers as L
from .network import expression_names

COMPOSITES = ("residual", "parallel", "serial")


def primitives() -> dict:
    """``kind -> class`` of every registered layer type that a spec table can name directly."""
    return {k: c for k, c in LAYERS.items() if k not in COMPOSITES}
TOP_KEYS = {"name", "description", "depth", "params", "input", "record", "stem", "block", "final", "shared_weights"}
INPUT_KEYS = {
    "identity": {"tokens", "q", "sequences"},
    "equicorrelated": {"tokens", "q", "rho", "sequences", "cross_rho"},
    "gram": {"matrix", "file", "sequences"},
    "tokens": {"ids", "q", "rho", "pad_id", "attention_mask"},
}
POSITIONAL_KEYS = {"positional", "positional_var", "positional_dim"}
RECORD_KEYS = {"mode": ("blocks", "sublayers"), "every": None}


@dataclass(frozen=True, eq=False)
class Spec:
    """A loaded spec: the network, its input, recording options and the raw TOML table."""

    network: L.Network
    inputs: I.Inputs
    record: dict = field(default_factory=lambda: {"mode": "blocks", "every": 1})
    raw: dict = field(default_factory=dict)
    path: str | None = None


def load(path, *, depth: int | None = None, params: dict | None = None) -> Spec:
    """Read a TOML spec file; ``depth`` and ``params`` override the file's values."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError("spec", str(path), f"cannot be read ({exc.strerror})") from None
    return loads(text, base=path.parent, depth=depth, params=params, path=str(path))


def loads(text: str, *, base=".", depth=None, params=None, path=None) -> Spec:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError("spec", path or "<text>", f"is not valid TOML ({exc})") from None
    return from_dict(raw, base=base, depth=depth, params=params, path=path)


def from_dict(raw: dict, *, base=".", depth=None, params=None, path=None) -> Spec:
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise SpecError(sorted(unknown)[0], raw[sorted(unknown)[0]],
                        f"is not a spec field; allowed: {sorted(TOP_KEYS)}")
    if "block" not in raw and "stem" not in raw:
        raise SpecError("block", None, "a spec needs [[block]] layers (repeated `depth` times) or [[stem]] layers")
    for key in ("name", "description"):
        if not isinstance(raw.get(key, ""), str):
            raise SpecError(key, raw[key], "must be a string")
    d = raw.get("depth", 1) if depth is None else depth
    p = raw.get("params", {})
    if not isinstance(p, dict):
        raise SpecError("params", p, "must be a table of name = number")
    p = dict(p)
    stem, block, final = (_layers(raw.get(part, []), part) for part in ("stem", "block", "final"))
    if params:
        check_overrides(params, p, stem, block, final)
        p.update(params)
    net = L.Network(block=block, stem=stem, final=final, depth=d, params=p, name=raw.get("name", ""),
                    shared_weights=raw.get("shared_weights", False))
    record = _record(raw.get("record", {}))
    inputs = _inputs(raw.get("input"), Path(base))
    return Spec(net, inputs, record, raw, path)


def check_overrides(overrides, params, *parts) -> None:
    """Refuse an override (``--set NAME=VALUE``) that names neither a ``[params]`` entry nor a name an
    expression of ``parts`` uses: it would change nothing."""
    known = set(params) | expression_names(*parts)
    for k, v in overrides.items():
        if k not in known:
            raise SpecError(f"params.{k}", v, "is not a param of this spec (neither in its params table nor "
                            f"used by an expression); known params: {sorted(known) or '(none)'}")


def _record(r):
    if not isinstance(r, dict):
        raise SpecError("record", r, "must be a table with `mode` and `every`")
    out = {"mode": r.get("mode", "blocks"), "every": r.get("every", 1)}
    for k in r:
        if k not in RECORD_KEYS:
            raise SpecError(f"record.{k}", r[k], f"is not a record field; allowed: {sorted(RECORD_KEYS)}")
    if out["mode"] not in RECORD_KEYS["mode"]:
        raise SpecError("record.mode", out["mode"], f"must be one of {list(RECORD_KEYS['mode'])}")
    if isinstance(out["every"], bool) or not isinstance(out["every"], int) or out["every"] < 1:
        raise SpecError("record.every", out["every"], "must be a whole number >= 1")
    return out


def _layers(items, where) -> L.Serial:
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        raise SpecError(where, items, "must be a list of layer tables")
    return L.Serial(*(_layer(t, f"{where}[{i}]") for i, t in enumerate(items)))


def _layer(t, where) -> L.Layer:
    if not isinstance(t, dict):
        raise SpecError(where, t, "must be a layer table with a `type` field")
    t = dict(t)
    kind = t.pop("type", None)
    if not isinstance(kind, str):
        raise SpecError(f"{where}.type", kind, "must be a string naming a layer type or an activation")
    from ..layers.activation import activations as _activations
    ACTIVATIONS = _activations.ACTIVATIONS
    prims = primitives()
    if kind in ACTIVATIONS and kind not in prims:  # sugar: {type = "relu"}
        t["name"] = kind
        kind = "activation"
    try:
        if kind in COMPOSITES:
            return _composite(kind, t, where)
        if kind not in prims:
            raise SpecError(f"{where}.type", kind, f"must be one of {sorted(prims) + list(COMPOSITES)} "
                            f"or an activation name {sorted(ACTIVATIONS)}")
        cls = prims[kind]
        names = {f.name for f in dataclasses.fields(cls)} - {"derivative"}
        if cls is L.Activation:   # the activation's parameters: keys of the table, or a `params` table
            given = t.pop("params", {})
            if not isinstance(given, dict):
                raise SpecError(f"{where}.params", given, "must be a table of name = number (or give the "
                                "activation's parameters as keys of the layer table, e.g. slope = 0.2)")
            act_params = {k: t.pop(k) for k in list(t) if k not in names}
            for k in sorted(set(given) & set(act_params)):
                raise SpecError(f"{where}.{k}", act_params[k], f"is also given in {where}.params: give it once")
            t["params"] = {**given, **act_params}
        else:
            for k in t:
                if k not in names:
                    raise SpecError(f"{where}.{k}", t[k], f"is not a field of {kind}; allowed: {sorted(names)}")
        return cls(**t)
    except SpecError as exc:
        if exc.field.startswith(where):
            raise
        field_name = exc.field.split(".", 1)[1] if "." in exc.field else exc.field
        raise SpecError(f"{where}.{field_name}", exc.value, exc.allowed) from None


def _composite(kind, t, where):
    allowed = {"residual": {"alpha", "beta", "layers"}, "parallel": {"alpha", "branches"}, "serial": {"layers"}}[kind]
    for k in t:
        if k not in allowed:
            raise SpecError(f"{where}.{k}", t[k], f"is not a field of {kind}; allowed: {sorted(allowed)}")
    if kind == "serial":
        return _layers(t.get("layers", []), f"{where}.layers")
    if kind == "residual":
        return L.Residual(_layers(t.get("layers", []), f"{where}.layers"),
                          alpha=t.get("alpha", 1.0), beta=t.get("beta", 1.0))
    branches = t.get("branches")
    if not isinstance(branches, list) or not branches:
        raise SpecError(f"{where}.branches", branches, "must be a list of {beta = …, layers = [...]} tables")
    bs, ws = [], []
    for i, b in enumerate(branches):
        if not isinstance(b, dict) or set(b) - {"beta", "layers"}:
            raise SpecError(f"{where}.branches[{i}]", b, "must be a table with `beta` and `layers`")
        bs.append(_layers(b.get("layers", []), f"{where}.branches[{i}].layers"))
        ws.append(b.get("beta", 1.0))
    return L.Parallel(*bs, alpha=t.get("alpha", 1.0), betas=ws)


def _inputs(t, base: Path) -> I.Inputs:
    if t is None:
        raise SpecError("input", None,
                        "a spec needs an [input] table (kind = identity | equicorrelated | gram | tokens)")
    if not isinstance(t, dict):
        raise SpecError("input", t, "must be a table")
    t = dict(t)
    kind = t.pop("kind", None)
    if not isinstance(kind, str) or kind not in INPUT_KEYS:
        raise SpecError("input.kind", kind, f"must be one of {sorted(INPUT_KEYS)}")
    pos = {k: t.pop(k) for k in list(t) if k in POSITIONAL_KEYS}
    for k in t:
        if k not in INPUT_KEYS[kind]:
            raise SpecError(f"input.{k}", t[k], f"is not a field of input kind {kind!r}; allowed: "
                            f"{sorted(INPUT_KEYS[kind] | POSITIONAL_KEYS)}")
    for k in ("q", "rho", "cross_rho", "positional_var"):
        if k in t or k in pos:
            v = t[k] if k in t else pos[k]
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise SpecError(f"input.{k}", v, "must be a real number (not a boolean or a string)")
    if "matrix" in t and _has_bool(t["matrix"]):
        raise SpecError("input.matrix", t["matrix"], "must be a square array of numbers (not booleans)")
    n_tok, n_seq = t.get("tokens", 16), t.get("sequences", 1)
    if kind in ("identity", "equicorrelated") and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                      for v in (n_tok, n_seq)):
        from ..kernel.propagate import check_tokens
        check_tokens(n_tok * n_seq, field="input.tokens")   # before the N×N input kernel is built
    if kind == "identity":
        x = I.identity(t.get("tokens", 16), t.get("q", 1.0), t.get("sequences", 1))
    elif kind == "equicorrelated":
        x = I.equicorrelated(t.get("tokens", 16), t.get("q", 1.0), t.get("rho", 0.5), t.get("sequences", 1),
                             t.get("cross_rho", 0.0))
    elif kind == "tokens":
        if "ids" not in t:
            raise SpecError("input.ids", None, "token inputs need ids = [[...], ...]")
        x = I.tokens(t["ids"], t.get("q", 1.0), t.get("rho", 0.0), pad_id=t.get("pad_id"),
                     attention_mask=t.get("attention_mask"))
    else:
        if ("matrix" in t) == ("file" in t):
            raise SpecError("input.matrix", None,
                            "a gram input needs exactly one of matrix = [[...]] or file = \"x.npy\"")
        if "file" in t:
            f = base / t["file"]
            try:
                m = np.loadtxt(f, delimiter=",") if f.suffix == ".csv" else np.load(f)
            except (OSError, ValueError) as exc:
                raise SpecError("input.file", t["file"], f"cannot be read as .npy or .csv ({exc})") from None
        else:
            try:
                m = np.array(t["matrix"], dtype=float)
            except (TypeError, ValueError):
                raise SpecError("input.matrix", t["matrix"], "must be a square array of numbers") from None
        x = I.gram(m, t.get("sequences"))
    if pos and pos.get("positional", "none") != "none":
        x = x.with_positional(pos["positional"], pos.get("positional_var", 1.0), pos.get("positional_dim", 512))
    return x


def _has_bool(x) -> bool:
    """True when a (nested) list holds a boolean, which numpy would silently read as 0 or 1."""
    if isinstance(x, (list, tuple)):
        return any(_has_bool(e) for e in x)
    return isinstance(x, (bool, np.bool_))
