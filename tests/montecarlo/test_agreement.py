"""Theory against finite-width simulation, for every layer type and every bundled example.

Each case runs :func:`kernelprop.montecarlo.check` (Richardson pair of widths 256 and 128, 16 seeds
each, seed 0) and asserts agreement under the documented criterion: every kernel entry, token mean
and smooth measure within k standard errors, k from a Bonferroni bound at family-wise rate 0.01.
The simulation is independent of the engine: it multiplies random matrices and never calls a map.
"""

import numpy as np
import pytest

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop import montecarlo as mc
from kernelprop.network.layers import (
    Activation,
    Attention,
    Dense,
    Dropout,
    LayerNorm,
    Network,
    Parallel,
    Residual,
    RMSNorm,
)

EQ = I.equicorrelated(8, 1.0, 0.3)
TWO = I.equicorrelated(6, 1.0, 0.4, sequences=2, cross_rho=0.2)
TOKENS = I.tokens([[1, 2, 1, 3, 2, 1]], q=1.0, rho=0.2)
WITH_MEAN = I.Inputs(EQ.sigma + 0.25, EQ.segments, mean=np.full(8, 0.5))
WF = dict(values="identity", projection="identity")

# name: (block, input, depth, simulation options) — every layer type and option the engine knows
CASES = {
    "dense+bias": ([Dense(weight_var=1.5, bias_var=0.3)], EQ, 3, {}),
    "dense orthogonal, width 2d": ([Dense(weight_var=1.5, init="orthogonal", width_factor=2),
                                    Dense(weight_var=0.7, init="orthogonal")], EQ, 3, {}),
    "relu": ([Dense(weight_var=2.0), Activation("relu")], EQ, 4, {}),
    "gelu, scale": ([Dense(), Activation("gelu", scale=1.3)], EQ, 3, {}),
    "tanh (quadrature)": ([Dense(weight_var=1.2), Activation("tanh")], EQ, 3, {}),
    "leaky_relu": ([Dense(), Activation("leaky_relu", {"slope": 0.2})], EQ, 3, {}),
    "erf": ([Dense(), Activation("erf", {"a": 0.7})], EQ, 2, {}),
    "silu": ([Dense(), Activation("silu")], EQ, 2, {}),
    "abs": ([Dense(), Activation("abs")], EQ, 2, {}),
    "softplus": ([Dense(), Activation("softplus"), Dense()], EQ, 2, {}),
    "callable activation": ([Dense(), Activation(np.sin)], EQ, 2, {}),
    "layernorm after relu (centring)": ([Dense(), Activation("relu"), LayerNorm(gain=1.2, eps=0.1)], EQ, 3, {}),
    "layernorm without centring": ([Dense(), Activation("relu"), LayerNorm(centre=False)], EQ, 3, {}),
    "rmsnorm": ([Dense(), Activation("relu"), RMSNorm(gain=0.9, eps=0.05)], EQ, 3, {}),
    "dropout": ([Dense(), Activation("relu"), Dropout(0.2), Dense()], EQ, 3, {}),
    "attention uniform, 2 sequences": ([Attention(heads=2, value_var=1.2, out_var=0.9)], TWO, 3, {}),
    "attention uniform via random Q, K": ([Attention(heads=2, causal=True)], EQ, 3, {"scores": "independent"}),
    "attention causal alibi": ([Attention(heads=4, causal=True, bias="alibi")], TWO, 3, {}),
    "attention explicit bias": ([Attention(heads=2, bias=-0.3 * np.abs(np.subtract.outer(np.arange(8), np.arange(8))))],
                                EQ, 2, {}),
    "attention tied, 2 sequences": ([Attention(heads=2, scores="tied", qk_var=1.5, causal=True)], TWO, 3, {}),
    "attention tied + alibi": ([LayerNorm(), Attention(heads=4, scores="tied", bias="alibi", qk_var=2.0)], EQ, 3, {}),
    "standard 1/sqrt(d_k) scores (engine: score draws)": ([LayerNorm(), Attention(heads=2, scores="standard",
                                                                                  causal=True, qk_var=2.0)], EQ, 2, {}),
    "standard scores, weight-free in a residual": ([Residual(LayerNorm(), Attention(scores="standard", **WF),
                                                             beta=0.7)], EQ, 2, {}),
    "E-SPA (D·softmax(B + M))": ([Attention(spa="e-spa", causal=True), Dense(), Activation("relu"),
                                 Dense(weight_var=2.0)], I.identity(16), 4, {}),
    "U-SPA, value_skipinit": ([Attention(spa="u-spa", causal=True, heads=2, matrix="value_skipinit", beta=0.6)],
                              I.identity(16), 3, {}),
    "value_skipinit": ([Attention(matrix="value_skipinit", beta=0.5, scores="tied")], EQ, 3, {}),
    "shaped, weight-free": ([Attention(matrix="shaped", causal=True, scores="tied", beta=0.7, **WF)], EQ, 3, {}),
    "identity values": ([Attention(heads=2, values="identity", causal=True)], EQ, 3, {}),
    "identity projection": ([Attention(heads=2, projection="identity", scores="tied")], EQ, 3, {}),
    "residual MLP": ([Residual(Dense(), Activation("relu"), Dense(weight_var=2.0), alpha=0.8, beta=0.6)], EQ, 4, {}),
    "residual weight-free mixing": ([Residual(Attention(causal=True, **WF), alpha=0.7, beta=1.5)], EQ, 3, {}),
    "residual multi-head weight-free": ([Residual(LayerNorm(), Attention(heads=4, bias="alibi", **WF), beta=0.5),
                                         Dense()], EQ, 3, {}),
    "parallel": ([Parallel([LayerNorm(), Attention(heads=2, causal=True)],
                           [LayerNorm(), Dense(width_factor=2), Activation("relu"), Dense(weight_var=2.0)],
                           betas=[0.5, 0.5])], TWO, 3, {}),
    "parallel weight-free branches": ([Parallel([Attention(causal=True, **WF)], [Attention(**WF)], [Attention()],
                                                betas=[0.5, 0.25, 2.0])], EQ, 2, {}),
    "token inputs (repeated tokens)": ([Dense(), Activation("relu"), Dense(weight_var=2.0)], TOKENS, 3, {}),
    "inputs with a mean, layernorm": ([LayerNorm(), Dense(), Activation("relu")], WITH_MEAN, 2, {}),
    "sinusoidal positions, tied": ([Attention(scores="tied"), Dense(), Activation("relu")],
                                   EQ.with_positional("sinusoidal", 0.5, 16), 2, {}),
    "orthogonal everywhere, gaussian inputs": ([LayerNorm(), Attention(heads=2, scores="tied"), Dense(),
                                                Activation("relu")], EQ, 2,
                                               {"init": "orthogonal", "input_kind": "gaussian"}),
    "explicit weight matrices": ([LayerNorm(), Attention(heads=2, scores="tied"), Dense(width_factor=2),
                                  Activation("relu"), Dense()], EQ, 2, {"products": "explicit"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_layer_agrees_with_the_engine(name):
    block, x, depth, options = CASES[name]
    cmp, *_ = mc.check(Network(block=block, depth=depth), x, 256, 16, **options)
    assert cmp.n_tested > 100
    assert cmp.agree, (cmp.criterion(), cmp.failures[:3])


@pytest.mark.parametrize("example", ["vanilla", "relu_mlp", "pre_ln", "post_ln", "parallel"])
def test_bundled_example_agrees_with_the_engine(example):
    """Bundled examples at depth 6 (full depth is checked in docs/montecarlo.md: same verdict)."""
    s = kp.load(_example(example), depth=6)
    cmp, *_ = mc.check(s.network, s.inputs, 256, 16, record=s.record["mode"], every=s.record["every"])
    assert cmp.agree, (cmp.criterion(), cmp.failures[:3])


def _example(name):
    from pathlib import Path
    return Path(kp.__file__).parent / "examples" / f"{name}.toml"


@pytest.mark.parametrize("theory_block, sim_block", [
    # the kind of slip an engine map could make (docs/montecarlo.md lists the resolution)
    ([Dense(), Activation("relu"), LayerNorm(eps=0.0)], [Dense(), Activation("relu"), LayerNorm(eps=0.05)]),
    ([Dense(), Activation("relu"), LayerNorm()], [Dense(), Activation("relu"), LayerNorm(centre=False)]),
    ([LayerNorm(), Attention(scores="tied", qk_var=2.0, causal=True)],
     [LayerNorm(), Attention(scores="tied", qk_var=3.0, causal=True)]),
    ([Dense(), Activation("gelu")], [Dense(), Activation("silu")]),
    ([Attention()], [Attention(causal=True)]),
    ([Residual(Attention(causal=True, values="identity", projection="identity"), beta=0.5)],   # cross term lost
     [Residual(Attention(causal=True), beta=0.5)]),
])
def test_the_criterion_detects_a_wrong_map(theory_block, sim_block):
    """Power: the same statistics flag a theory that differs slightly from what is simulated."""
    theory = kp.propagate(Network(block=theory_block, depth=3), EQ)
    net = Network(block=sim_block, depth=3)
    sim = mc.simulate(net, EQ, 256, 16, dong=False, seed=np.random.SeedSequence([0, 0]))
    half = mc.simulate(net, EQ, 128, 16, dong=False, seed=np.random.SeedSequence([0, 1]))
    assert not mc.compare(theory, sim, half).agree


def test_sublayer_records_agree_and_match_the_engine_labels():
    s = kp.load(_example("pre_ln"), depth=4)
    cmp, theory, sim, half = mc.check(s.network, s.inputs, 256, 16, record="sublayers", every=2)
    assert sim.labels == theory.labels and "block 2 · 0:residual" in sim.labels
    assert cmp.agree, cmp.failures[:3]
