"""Hugging Face ``config.json`` → spec, without torch or transformers (docs/inits.md).

:func:`from_config` reads the fields of a GPT-2, Llama / Mistral / Qwen2, GPT-NeoX or BERT config and
builds the spec of that architecture *at initialisation*, with each family's init written as
kernelprop variances (σ² = weight variance × fan-in):

* every linear weight ``normal(0, initializer_range)`` (transformers' ``_init_weights``) ⇒
  ``σ² = initializer_range² · fan_in``; GPT-2's ``c_proj`` weights (attention output and MLP
  output) use ``initializer_range/sqrt(2·n_layer)``, written as an expression in the depth ``L`` so
  ``-L`` keeps the rule; every bias is zeroed (``bias_var = 0``); norms start at gain 1, bias 0;
* queries and keys are independent at 1/sqrt(head_dim) scaling: ``scores = "standard"`` with
  ``qk_var = σ_q² σ_k²`` (docs/montecarlo.md);
* the token embedding ``normal(0, initializer_range)`` gives the input ``q = initializer_range²``;
  learned positions add ``positional_var = initializer_range²`` with ``R = I``; BERT's token-type
  embedding (one shared vector) adds ``initializer_range²`` to every entry.

Dropout (evaluation mode) and the output head are left out. What the wide-limit spec cannot say is
returned in :attr:`Imported.notes` (written as comments into the TOML and printed by the command line).
An unknown ``model_type``, a missing required field or a field of the wrong type is a
:class:`~kernelprop.errors.SpecError` naming the JSON field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from ..errors import SpecError

#: Hugging Face activation names (``ACT2FN`` keys) → kernelprop activation names
ACTIVATIONS = {
    "gelu": "gelu", "gelu_python": "gelu",                       # erf GELU x·Φ(x)
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",   # tanh approximation
    "relu": "relu", "silu": "silu", "swish": "silu", "tanh": "tanh",
}
DEFAULT_TOKENS = 32
DEFAULT_RHO = 0.1
_REQUIRED = object()


@dataclass(frozen=True)
class Imported:
    """A spec built from a config: ``spec`` (a dict for :func:`kernelprop.network.spec.from_dict`, or TOML
    through :func:`to_toml`), the ``family`` it was read as and ``notes`` on what the spec leaves out."""

    annotated: dict
    family: str
    notes: tuple[str, ...] = ()

    @property
    def spec(self) -> dict:
        """The spec without the per-layer provenance comments."""
        return _strip(self.annotated)


class _Config:
    """Typed access to a config's fields; errors name the JSON field."""

    def __init__(self, cfg: Mapping, family: str):
        self.cfg, self.family = cfg, family
        self.defaulted: list[str] = []

    def _get(self, name, default, aliases=()):
        for key in (name, *aliases):
            if key in self.cfg and self.cfg[key] is not None:
                return key, self.cfg[key]
        if default is _REQUIRED:
            raise SpecError(name, None, f"is missing from the {self.family} config (a required field)")
        if default is not None:
            self.defaulted.append(f"{name} = {default!r}")
        return name, default

    def whole(self, name, default=_REQUIRED, minimum=1, aliases=()) -> int:
        key, v = self._get(name, default, aliases)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise SpecError(key, v, f"must be a whole number >= {minimum}")
        return v

    def number(self, name, default=_REQUIRED, *, positive=False) -> float:
        key, v = self._get(name, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                or (positive and v == 0):
            raise SpecError(key, v, f"must be a finite number {'> 0' if positive else '>= 0'}")
        return float(v)

    def flag(self, name, default=_REQUIRED) -> bool:
        key, v = self._get(name, None if default is False else default)
        v = False if v is None else v
        if not isinstance(v, bool):
            raise SpecError(key, v, "must be true or false")
        return v

    def text(self, name, default=_REQUIRED) -> str:
        key, v = self._get(name, default)
        if not isinstance(v, str):
            raise SpecError(key, v, "must be a string")
        return v

    def activation(self, name, default) -> str:
        act = self.text(name, default)
        if act not in ACTIVATIONS:
            raise SpecError(name, act, f"is not an activation the importer knows; allowed: {sorted(ACTIVATIONS)}")
        return ACTIVATIONS[act]

    def std(self) -> Fraction:
        """``initializer_range`` as the exact decimal written in the file."""
        return _exact(self.number("initializer_range", 0.02, positive=True))


def _exact(x: float) -> Fraction:
    return Fraction(repr(float(x)))


def _num(x: Fraction | float) -> float:
    return float(x)


def _why(layer: dict, text: str) -> dict:
    layer["_why"] = text
    return layer


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k != "_why"}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# pieces shared by the families


def _input(std: Fraction, tokens: int, rho: float, *, positions: bool, token_types: bool = False) -> dict:
    """The embedding as an input kernel: word embeddings N(0, std²) with correlation ``rho`` between
    distinct tokens; a shared token-type vector adds std² everywhere; learned positions std² I."""
    q, r = std * std, _exact(rho)
    if token_types:                       # q(1 − ρ)I + qρ11ᵀ + q11ᵀ = 2q[(1 − ρ')I + ρ'11ᵀ], ρ' = (1 + ρ)/2
        q, r = 2 * q, (1 + r) / 2
    t = {"kind": "equicorrelated", "tokens": tokens, "q": _num(q), "rho": _num(r)}
    if positions:
        t.update(positional="random", positional_var=_num(std * std))
    return t


def _attention(d: int, heads: int, std: Fraction, *, causal: bool, head_dim: int | None = None,
               out_var: Any = None, qk_scale: str | None = None, rope_theta: float | None = None,
               why: str | None = None) -> dict:
    """Independent Q, K, V ~ N(0, std²) of fan-in d at 1/sqrt(head_dim): scores "standard",
    qk_var = σ_q²σ_k² = (std² d)², value_var = std² d, out_var = std² · (heads · head_dim)."""
    s2 = std * std
    head_dim = d // heads if head_dim is None else head_dim
    qk = _num((s2 * d) ** 2)
    layer: dict = {"type": "attention", "heads": heads, "causal": causal, "scores": "standard",
                   "qk_var": qk if qk_scale is None else f"{qk!r}{qk_scale}",
                   "value_var": _num(s2 * d), "out_var": _num(s2 * heads * head_dim) if out_var is None else out_var}
    if head_dim * heads != d:
        layer["key_width"] = _num(Fraction(head_dim * heads, d))
    if rope_theta is not None:
        layer["rope_theta"] = rope_theta
    return _why(layer, (why or f"q, k, v, o: normal(0, {float(std)!r})") + f"; scores at 1/sqrt({head_dim})")


def _mlp(d: int, inner: int, std: Fraction, act: str, out_var: Any = None, names=("up", "down"),
         down: str | None = None) -> list:
    s2, s = std * std, float(std)
    return [_why({"type": "dense", "weight_var": _num(s2 * d), "width_factor": _num(Fraction(inner, d))},
                 f"{names[0]}: normal(0, {s!r}), fan-in {d}"),
            {"type": act},
            _why({"type": "dense", "weight_var": _num(s2 * inner) if out_var is None else out_var},
                 f"{names[1]}: {down or f'normal(0, {s!r})'}, fan-in {inner}")]


def _rope(c: _Config, theta_key: str = "rope_theta", default: float = 10000.0) -> float:
    """RoPE base from ``rope_theta`` (or the newer ``rope_parameters`` table)."""
    params = c.cfg.get("rope_parameters")
    if theta_key not in c.cfg and isinstance(params, Mapping) and "rope_theta" in params:
        return _Config(params, c.family).number("rope_theta", positive=True)
    return c.number(theta_key, default, positive=True)


def _dropout_note(c: _Config, keys: Sequence[str]) -> list:
    on = {k: c.cfg[k] for k in keys if isinstance(c.cfg.get(k), (int, float)) and c.cfg[k]}
    if not on:
        return []
    return ["dropout " + ", ".join(f"{k} = {v!r}" for k, v in on.items()) + " left out (evaluation mode); add "
            "{ type = \"dropout\", p = … } layers for the training-mode kernel"]


# ----------------------------------------------------------------------------------------------
# families


def _gpt2(c: _Config, tokens: int, rho: float):
    depth, d, heads = c.whole("n_layer"), c.whole("n_embd"), c.whole("n_head")
    if d % heads:
        raise SpecError("n_head", heads, f"must divide n_embd = {d}")
    inner = c.whole("n_inner", 4 * d)
    act = c.activation("activation_function", "gelu_new")
    eps = c.number("layer_norm_epsilon", 1e-5)
    std = c.std()
    if not c.flag("scale_attn_weights", True):
        raise SpecError("scale_attn_weights", False, "must be true: unscaled scores q·k grow like d_k and have no "
                        "infinite-width limit")
    by_layer = c.flag("scale_attn_by_inverse_layer_idx", False)
    if c.flag("add_cross_attention", False):
        raise SpecError("add_cross_attention", True, "must be false: cross-attention needs an encoder stream")
    s = float(std)
    proj = "/(2*L)"     # c_proj std = initializer_range/sqrt(2 n_layer): σ² = std² fan_in / (2L)
    scaled = f"normal(0, {s!r}/sqrt(2·n_layer))"
    attn = _attention(d, heads, std, causal=True, out_var=f"{s!r}**2*{d}{proj}",
                      qk_scale="/l**2" if by_layer else None,
                      why=f"c_attn (q, k, v): normal(0, {s!r}); c_proj: {scaled}" + (
                          "; scores divided by the layer index" if by_layer else ""))
    mlp = _mlp(d, inner, std, act, out_var=f"{s!r}**2*{inner}{proj}", names=("c_fc", "c_proj"), down=scaled)
    ln = {"type": "layernorm", "eps": eps}
    spec = {
        "name": f"GPT-2 (n_layer {depth}, n_embd {d}, n_head {heads})",
        "description": "Pre-LN, causal, learned positions, tanh-GELU MLP, final LayerNorm; transformers' "
                       f"GPT-2 init: normal(0, {s!r}), c_proj scaled by 1/sqrt(2·n_layer), biases 0.",
        "depth": depth,
        "input": _input(std, tokens, rho, positions=True),
        "block": [{"type": "residual", "layers": [dict(ln), attn]},
                  {"type": "residual", "layers": [dict(ln), *mlp]}],
        "final": [dict(ln)],
    }
    return spec, _dropout_note(c, ("resid_pdrop", "embd_pdrop", "attn_pdrop"))


def _llama(c: _Config, tokens: int, rho: float):
    family = c.family
    depth, d, heads = c.whole("num_hidden_layers"), c.whole("hidden_size"), c.whole("num_attention_heads")
    inner = c.whole("intermediate_size")
    kv = c.whole("num_key_value_heads", heads)
    if heads % kv:
        raise SpecError("num_key_value_heads", kv, f"must divide num_attention_heads = {heads}")
    head_dim = c.whole("head_dim", None) if c.cfg.get("head_dim") is not None else None
    if head_dim is None and d % heads:
        raise SpecError("num_attention_heads", heads, f"must divide hidden_size = {d} (or give head_dim)")
    act = c.activation("hidden_act", "silu")
    eps = c.number("rms_norm_eps", 1e-6)
    theta = _rope(c)
    std = c.std()
    s2, s = std * std, float(std)
    notes = []
    if kv < heads:
        notes.append(f"grouped-query attention ({kv} key/value heads for {heads} query heads) leaves the "
                     "infinite-width kernel unchanged: each head's mixing has the same law, and heads enter "
                     "the kernel only through their average")
    scaling = c.cfg.get("rope_scaling")
    if scaling is None and isinstance(c.cfg.get("rope_parameters"), Mapping):
        kind = c.cfg["rope_parameters"].get("rope_type", "default")
        scaling = None if kind == "default" else dict(c.cfg["rope_parameters"])
    if scaling:
        notes.append(f"rope_scaling = {scaling!r} is not modelled: the spec rotates with the plain frequencies "
                     f"theta^(-2k/head_dim), theta = {theta:g}")
    window = c.cfg.get("sliding_window")
    windowed = family == "mistral" or (family == "qwen2" and c.cfg.get("use_sliding_window") is True)
    if windowed and window is not None:
        window = c.whole("sliding_window")
        if tokens > window:
            raise SpecError("sliding_window", window, f"is shorter than the {tokens} input tokens: the spec "
                            "models full causal attention; use at most sliding_window tokens")
    if family == "qwen2" or c.cfg.get("attention_bias") is True or c.cfg.get("mlp_bias") is True:
        notes.append("the linear biases (q/k/v in Qwen2, or attention_bias / mlp_bias) are zeroed at "
                     "initialisation: no bias term in the kernel")
    attn = _attention(d, heads, std, causal=True, head_dim=head_dim, rope_theta=theta)
    mlp = _why({"type": "gated_mlp", "activation": act, "gate_var": _num(s2 * d), "up_var": _num(s2 * d),
                "down_var": _num(s2 * inner), "width_factor": _num(Fraction(inner, d))},
               f"gate, up: normal(0, {s!r}), fan-in {d}; down: fan-in {inner}")
    norm = {"type": "rmsnorm", "eps": eps}
    label = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[family]
    spec = {
        "name": f"{label} (layers {depth}, hidden {d}, heads {heads})",
        "description": f"Pre-RMSNorm, causal, RoPE (theta {theta:g}), gated MLP ({act}), final RMSNorm; "
                       f"transformers' init: every linear normal(0, {s!r}), biases 0.",
        "depth": depth,
        "input": _input(std, tokens, rho, positions=False),
        "block": [{"type": "residual", "layers": [dict(norm), attn]},
                  {"type": "residual", "layers": [dict(norm), mlp]}],
        "final": [dict(norm)],
    }
    return spec, notes + _dropout_note(c, ("attention_dropout",))


def _dims(c: _Config) -> tuple[int, int, int, int]:
    """``(layers, hidden size, heads, MLP width)`` of a config named the transformers way; heads must divide
    the hidden size."""
    depth, d, heads = c.whole("num_hidden_layers"), c.whole("hidden_size"), c.whole("num_attention_heads")
    if d % heads:
        raise SpecError("num_attention_heads", heads, f"must divide hidden_size = {d}")
    return depth, d, heads, c.whole("intermediate_size")


def _neox(c: _Config, tokens: int, rho: float):
    depth, d, heads, inner = _dims(c)
    act = c.activation("hidden_act", "gelu")
    eps = c.number("layer_norm_eps", 1e-5)
    found = c.cfg.get("rope_parameters")
    params: Mapping = found if isinstance(found, Mapping) else {}
    if "rotary_emb_base" in c.cfg or "rope_theta" not in params:
        theta = c.number("rotary_emb_base", 10000.0, positive=True)
    else:
        theta = _Config(params, c.family).number("rope_theta", positive=True)
    if "rotary_pct" in c.cfg or "partial_rotary_factor" not in params:
        pct = c.number("rotary_pct", 0.25, positive=True)
    else:
        pct = _Config(params, c.family).number("partial_rotary_factor", positive=True)
    if pct > 1:
        raise SpecError("rotary_pct", pct, "must lie in (0, 1]")
    parallel = c.flag("use_parallel_residual", True)
    std = c.std()
    s = float(std)
    notes = []
    if pct < 1:
        notes.append(f"rotary_pct = {pct:g}: the model rotates {pct:g} of each head's query/key dimensions; the "
                     "spec's rope_theta rotates all of them (no field for a partial rotation)")
    attn = _attention(d, heads, std, causal=True, rope_theta=theta)
    mlp = _mlp(d, inner, std, act)
    ln = {"type": "layernorm", "eps": eps}
    if parallel:    # x + attn(ln1 x) + mlp(ln2 x)
        block = [{"type": "parallel", "alpha": 1.0,
                  "branches": [{"beta": 1.0, "layers": [dict(ln), attn]}, {"beta": 1.0, "layers": [dict(ln), *mlp]}]}]
    else:
        block = [{"type": "residual", "layers": [dict(ln), attn]}, {"type": "residual", "layers": [dict(ln), *mlp]}]
    spec = {
        "name": f"GPT-NeoX (layers {depth}, hidden {d}, heads {heads})",
        "description": f"{'Parallel' if parallel else 'Sequential'} Pre-LN residual, causal, RoPE (theta {theta:g}, "
                       f"rotary_pct {pct:g}), {act} MLP, final LayerNorm; transformers' init: every linear "
                       f"normal(0, {s!r}), biases 0.",
        "depth": depth,
        "input": _input(std, tokens, rho, positions=False),
        "block": block,
        "final": [dict(ln)],
    }
    return spec, notes + _dropout_note(c, ("attention_dropout", "hidden_dropout"))


def _bert(c: _Config, tokens: int, rho: float):
    depth, d, heads, inner = _dims(c)
    act = c.activation("hidden_act", "gelu")
    eps = c.number("layer_norm_eps", 1e-12)
    kind = c.text("position_embedding_type", "absolute")
    if kind != "absolute":
        raise SpecError("position_embedding_type", kind, "must be \"absolute\" (learned positions); relative "
                        "position scores are not modelled")
    types = c.whole("type_vocab_size", 2, minimum=0)
    causal = c.flag("is_decoder", False)
    if c.flag("add_cross_attention", False):
        raise SpecError("add_cross_attention", True, "must be false: cross-attention needs an encoder stream")
    std = c.std()
    s = float(std)
    ln = {"type": "layernorm", "eps": eps}
    spec = {
        "name": f"BERT (layers {depth}, hidden {d}, heads {heads})",
        "description": f"Post-LN, {'causal' if causal else 'bidirectional'}, embeddings (word + learned position"
                       f"{' + token type' if types else ''}) through a LayerNorm, {act} MLP; transformers' init: "
                       f"every linear and embedding normal(0, {s!r}), biases 0.",
        "depth": depth,
        "input": _input(std, tokens, rho, positions=True, token_types=types > 0),
        "stem": [_why(dict(ln), "embedding LayerNorm")],
        "block": [{"type": "residual", "layers": [_attention(d, heads, std, causal=causal)]},
                  dict(ln),
                  {"type": "residual", "layers": _mlp(d, inner, std, act)},
                  dict(ln)],
    }
    return spec, _dropout_note(c, ("hidden_dropout_prob", "attention_probs_dropout_prob"))


FAMILIES = {"gpt2": _gpt2, "llama": _llama, "mistral": _llama, "qwen2": _llama, "gpt_neox": _neox, "bert": _bert}


# ----------------------------------------------------------------------------------------------
# entry points


def read_config(path) -> dict:
    """The JSON object in ``path``; :class:`SpecError` naming ``config`` if it cannot be read or parsed."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SpecError("config", str(path), f"cannot be read ({exc.strerror})") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError("config", str(path), f"is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise SpecError("config", str(path), "must hold a JSON object of config fields")
    return cfg


def from_config(config, *, tokens: int = DEFAULT_TOKENS, rho: float = DEFAULT_RHO) -> Imported:
    """The spec of the model a Hugging Face config describes, at its initialisation.

    ``config``: a mapping or the path of a ``config.json``. The input is ``tokens`` embedded tokens whose
    distinct embeddings have correlation ``rho`` (0 for an i.i.d. embedding table; > 0 models the
    repeated tokens of real text, Kedia et al. 2024's r₀)."""
    cfg = read_config(config) if isinstance(config, (str, Path)) else config
    if not isinstance(cfg, Mapping):
        raise SpecError("config", type(cfg).__name__, "must be a mapping of config fields or a config.json path")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise SpecError("input.tokens", tokens, "must be a whole number >= 1")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 <= rho <= 1:
        raise SpecError("input.rho", rho, "must lie in [0, 1] (correlation of distinct token embeddings)")
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise SpecError("model_type", family, f"must be one of {sorted(FAMILIES)}")
    c = _Config(cfg, family)
    spec, notes = FAMILIES[family](c, tokens, rho)
    if c.defaulted:
        notes = [f"not set in the config, so transformers' {family} default is used: {', '.join(c.defaulted)}",
                 *notes]
    return Imported(spec, family, tuple(notes))


def load(config, *, depth: int | None = None, overrides=(), tokens: int = DEFAULT_TOKENS, rho: float = DEFAULT_RHO):
    """The :class:`~kernelprop.network.spec.Spec` of a config (:func:`from_config`), ``depth`` and params
    overridden as in :func:`kernelprop.models.load`."""
    from ..models import parse_overrides
    from ..network.spec import from_dict
    imp = from_config(config, tokens=tokens, rho=rho)
    path = str(config) if isinstance(config, (str, Path)) else None
    return from_dict(imp.spec, depth=depth, params=parse_overrides(overrides), path=path)


# ----------------------------------------------------------------------------------------------
# TOML


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise SpecError("spec", v, "only finite numbers are written")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)    # a TOML basic string: JSON's escapes are TOML's
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_scalar(x)}" for k, x in v.items() if k != "_why") + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _layer_lines(layer: dict, indent: str) -> list:
    """One layer as an inline table (nested layer lists span lines), with its provenance comment."""
    why = f"  # {layer['_why']}" if layer.get("_why") else ""
    nested = {k: v for k, v in layer.items() if k in ("layers", "branches")}
    if not nested:
        return [f"{indent}{_scalar(layer)},{why}"]
    head = ", ".join(f"{k} = {_scalar(v)}" for k, v in layer.items() if k not in nested and k != "_why")
    lines = [f"{indent}{{ {head}{', ' if head else ''}"]
    for key, items in nested.items():
        lines[-1] += f"{key} = ["
        for item in items:
            lines += _layer_lines(item, indent + "  ")
        lines.append(f"{indent}] }},{why}")
    return lines


def to_toml(imported: Imported, source: str | None = None) -> str:
    """The spec as TOML text, with the notes and each layer's init as comments."""
    spec = imported.annotated
    out = [f"# {imported.family} config{f' {source}' if source else ''}, imported by `kernelprop import-config`"
           " (docs/inits.md)"]
    out += [f"# note: {n}" for n in imported.notes]
    for k in ("name", "description", "depth", "shared_weights"):
        if k in spec:
            out.append(f"{k} = {_scalar(spec[k])}")
    for table in ("params", "input", "record"):
        if table in spec:
            out += ["", f"[{table}]"] + [f"{k} = {_scalar(v)}" for k, v in spec[table].items()]
    for section in ("stem", "block", "final"):
        for layer in spec.get(section, []):
            out += ["", f"[[{section}]]"]
            for k, v in layer.items():
                if k == "_why":
                    continue
                if k in ("layers", "branches"):
                    out.append(f"{k} = [")
                    for item in v:
                        out += _layer_lines(item, "  ")
                    out.append("]")
                else:
                    out.append(f"{k} = {_scalar(v)}")
            if layer.get("_why"):
                out[-1] += f"  # {layer['_why']}"
    return "\n".join(out) + "\n"


def write(text: str, output) -> None:
    """Write ``text`` to ``output`` (``.toml``) atomically: no partial file on failure."""
    from .results import atomic_write
    output = Path(output)
    if output.suffix != ".toml":
        raise SpecError("output", str(output), "must end in .toml (a spec file)")
    atomic_write(output, text.encode())


def import_config(config, output=None, *, tokens: int = DEFAULT_TOKENS, rho: float = DEFAULT_RHO) -> Imported:
    """Read ``config`` (a ``config.json`` path), build its spec and, if ``output`` is given, write it as TOML."""
    if output is not None and Path(output).suffix != ".toml":
        raise SpecError("output", str(output), "must end in .toml (a spec file)")
    imp = from_config(config, tokens=tokens, rho=rho)
    if output is not None:
        write(to_toml(imp, Path(config).name), output)
    return imp


__all__ = ["ACTIVATIONS", "FAMILIES", "Imported", "from_config", "import_config", "load", "read_config", "to_toml",
           "write"]
