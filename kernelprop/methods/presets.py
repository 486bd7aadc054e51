"""Named networks: standard blocks, residual-scaling schemes and signal-preserving transformers.

Each preset builds a :class:`~kernelprop.network.layers.Network` from the same layers as a spec
file; its knobs are ``params`` of the network, so ``--set name=value`` (CLI) or
``net.with_params(...)`` changes them, and depth-dependent weights are expressions in ``L``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import SpecError
from ..kernel.activations import activation_kernel
from ..network.layers import Activation, Attention, Dense, LayerNorm, Network, Parallel, Residual
from . import dks


def he_gain(activation: str) -> float:
    """``1 / E[φ(u)²]`` for ``u ~ N(0, 1)``: the second weight variance that keeps an MLP at unit variance."""
    k, _, _ = activation_kernel(activation, np.ones((1, 1)))
    return float(1.0 / k[0, 0])


def mlp(activation="relu", scale=1.0, width_factor=4, out_var=None, in_var=1.0, init="gaussian"):
    """``Dense(σ²=in_var) → φ → Dense(σ² = out_var or 1/E[φ²])``."""
    return [Dense(weight_var=in_var, width_factor=width_factor, init=init), Activation(activation, scale=scale),
            Dense(weight_var=he_gain(activation) if out_var is None else out_var, init=init)]


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    source: str
    build: Callable
    knobs: dict = field(default_factory=dict)


def _attn(o, **kw):
    return Attention(heads=o["heads"], causal=o["causal"], scores=o["scores"], **kw)


def post_ln(o):
    return [Residual(_attn(o)), LayerNorm(), Residual(*mlp(o["activation"])), LayerNorm()], []


def pre_ln(o, beta=1.0):
    return [Residual(LayerNorm(), _attn(o), beta=beta),
            Residual(LayerNorm(), *mlp(o["activation"]), beta=beta)], [LayerNorm()]


def noci(o):
    return pre_ln(o, beta="1/sqrt(L)")


def depth_mup(o):
    return pre_ln(o, beta="a/sqrt(L)")


def deepnorm(o):
    # DeepNet (Wang et al. 2022), encoder: x ← LN(α x + f(x)), α = (2N)^{1/4}; v, out and FFN weights × β = (8N)^{-1/4}
    b2 = "(8*L)**(-0.5)"
    return [Residual(_attn(o, value_var=b2, out_var=b2), alpha="(2*L)**0.25"), LayerNorm(),
            Residual(Dense(weight_var=b2, width_factor=4), Activation(o["activation"]),
                     Dense(weight_var=f"{he_gain(o['activation'])}*{b2}"), alpha="(2*L)**0.25"), LayerNorm()], []


def rezero(o):
    return [Residual(_attn(o), beta="a"), Residual(*mlp(o["activation"]), beta="a")], []


def layerscale(o):
    return pre_ln(o, beta="eps")


def gpt2(o):
    # GPT-2: residual-branch output weights scaled by 1/sqrt(N), N = 2L residual layers
    return [Residual(LayerNorm(), _attn(o, out_var="1/(2*L)")),
            Residual(LayerNorm(), *mlp(o["activation"], out_var=f"{he_gain(o['activation'])}/(2*L)"))], [LayerNorm()]


def deepscalelm(o):
    # Kedia et al. 2024: x ← λx + βf(x), λ² + β² = 1, β² = k/L; each branch's last init (σ_o², the FFN's
    # second σ_w²) chosen from the propagated kernel so that the branch output has unit variance
    lam, beta = "sqrt(1 - k/L)", "sqrt(k/L)"
    return [Residual(LayerNorm(), _attn(o, out_var="unit"), alpha=lam, beta=beta),
            Residual(LayerNorm(), *mlp(o["activation"], out_var="unit"), alpha=lam, beta=beta)], [LayerNorm()]


def vanilla(o):
    return [_attn(o), *mlp(o["activation"])], []


def _tat_mlp(o):
    slope, scale = dks.tat_leaky_relu(o["depth"], o["eta"])
    return [Dense(width_factor=4, init="orthogonal"), Activation("leaky_relu", {"slope": slope}, scale=scale),
            Dense(init="orthogonal")]


def spa(kind):
    def build(o):
        return [Attention(heads=o["heads"], causal=o["causal"], spa=kind, spa_final=o["final"]),
                *_tat_mlp(o)], []
    return build


def value_skipinit(o):
    return [_attn(o, matrix="value_skipinit"), *_tat_mlp(o)], []


def _shaped(o):
    return Attention(heads=o["heads"], causal=o["causal"], scores=o["scores"], matrix="shaped",
                     values="identity", projection="identity")


def sas(o):
    return [LayerNorm(), _shaped(o), Residual(LayerNorm(), *mlp(o["activation"]), beta="beta_ff")], []


def sas_p(o):
    return [Parallel([LayerNorm(), _shaped(o)], [LayerNorm(), *mlp(o["activation"])], alpha=0.0,
                     betas=[1.0, "beta_ff"])], []


PRESETS = {p.name: p for p in [
    Preset("post_ln", "x ← LN(x + Attn(x)); x ← LN(x + MLP(x))", "Vaswani et al. 2017", post_ln),
    Preset("pre_ln", "x ← x + Attn(LN x); x ← x + MLP(LN x); final LN", "Xiong et al. 2020", pre_ln),
    Preset("noci", "Pre-LN with branch weight 1/sqrt(L)", "Noci et al. 2022", noci),
    Preset("depth_mup", "Pre-LN with branch multiplier a/sqrt(L) (same as noci at a = 1)",
           "Yang et al. 2023; Bordelon et al. 2023", depth_mup, {"a": 1.0}),
    Preset("deepnorm", "Post-LN, skip × (2L)^{1/4}, value/out/FFN weights × (8L)^{-1/4}", "Wang et al. 2022", deepnorm),
    Preset("rezero", "x ← x + a·f(x), no normalisation, a = 0 at init (identity)",
           "Bachlechner et al. 2021; De & Smith 2020 (SkipInit)", rezero, {"a": 0.0}),
    Preset("layerscale", "Pre-LN with branch weight eps (0.1 for L ≤ 18, 1e-5 for L ≤ 24, 1e-6 deeper)",
           "Touvron et al. 2021", layerscale, {"eps": None}),
    Preset("gpt2", "Pre-LN with residual output weights scaled by 1/sqrt(2L)", "Radford et al. 2019", gpt2),
    Preset("deepscalelm", "Pre-LN, x ← λx + βf(x), λ² + β² = 1, β² = k/L, unit-variance branches (σ_o² and the "
           "FFN's σ_w² set to \"unit\")", "Kedia et al. 2024", deepscalelm,
           {"k": 2.0}),
    Preset("vanilla", "no skips, no normalisation: x ← MLP(Attn(x))", "He et al. 2023", vanilla),
    Preset("e_spa", "vanilla with E-SPA attention and TAT leaky-ReLU MLP", "He et al. 2023", spa("e-spa"),
           {"final": 0.005, "eta": 0.9}),
    Preset("u_spa", "vanilla with U-SPA attention and TAT leaky-ReLU MLP", "He et al. 2023", spa("u-spa"),
           {"final": 0.8, "eta": 0.9}),
    Preset("value_skipinit", "vanilla with attention αI + βA (α = 1, β = 0) and TAT MLP", "He et al. 2023",
           value_skipinit, {"eta": 0.9}),
    Preset("sas", "Pre-LN, no attention skip, shaped attention with identity values/projection",
           "He & Hofmann 2024", sas, {"beta_ff": 0.1}),
    Preset("sas_p", "parallel SAS without skips: shaped Attn(LN x) + β_FF MLP(LN x)", "He & Hofmann 2024", sas_p,
           {"beta_ff": 0.1}),
]}
_STRUCTURAL = {"final", "eta"}   # knobs used while building (not expression params)


def layerscale_eps(depth: int) -> float:
    """CaiT's LayerScale initialisation: 0.1 up to 18 blocks, 1e-5 up to 24, 1e-6 beyond (Touvron et al. 2021)."""
    return 0.1 if depth <= 18 else 1e-5 if depth <= 24 else 1e-6


def build(name: str, depth: int, *, heads: int = 4, causal: bool = True, scores: str = "uniform",
          activation: str = "relu", **knobs) -> Network:
    """The preset ``name`` at ``depth`` blocks; ``knobs`` override the preset's own parameters."""
    if name not in PRESETS:
        raise SpecError("preset", name, f"must be one of {sorted(PRESETS)}")
    p = PRESETS[name]
    unknown = set(knobs) - set(p.knobs)
    if unknown:
        raise SpecError(f"{name}.{sorted(unknown)[0]}", knobs[sorted(unknown)[0]],
                        f"is not a knob of {name}; its knobs: {sorted(p.knobs) or 'none'}")
    values = {**p.knobs, **knobs}
    if name == "layerscale" and values["eps"] is None:
        values["eps"] = layerscale_eps(depth)
    o = {"depth": depth, "heads": heads, "causal": causal, "scores": scores, "activation": activation, **values}
    block, final = p.build(o)
    params = {k: float(v) for k, v in values.items() if k not in _STRUCTURAL}
    return Network(block=block, final=final, depth=depth, params=params, name=f"{name} ({p.source})")
