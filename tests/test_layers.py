"""The layer protocol: every registered layer type against every interpreter, and the new layers.

* Completeness: for each (layer type × interpreter) the rule either runs or refuses with a
  :class:`NotSupportedError` that names the layer ("layer `kind` has no …") or gives its reason. A
  registered type without an entry in ``EXAMPLES`` fails here, so a new layer cannot skip it.
* Every layer that has both a kernel map and a finite-width rule is checked against the Monte Carlo,
  forward and backward, with the documented criterion (Bonferroni k at family-wise rate 0.01).
* ``Scale(c)`` and identity attention (``attention = "identity"``, Hron et al. 2020) against closed
  forms, the Monte Carlo and the symbolic engine.
"""

import numpy as np
import pytest

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop import montecarlo as mc
from kernelprop import symbolic as S
from kernelprop.errors import NotSupportedError, SpecError
from kernelprop.kernel.maps import Context
from kernelprop.kernel.state import KernelState
from kernelprop.layers import (
    LAYERS,
    RULES,
    Activation,
    Attention,
    Dense,
    Dropout,
    LayerNorm,
    Parallel,
    Residual,
    RMSNorm,
    Scale,
    Serial,
)
from kernelprop.montecarlo import sampler as MS
from kernelprop.network.layers import Network

EQ = I.equicorrelated(6, 1.0, 0.3)
TWO = I.equicorrelated(4, 1.0, 0.4, sequences=2, cross_rho=0.2)
WF = dict(values="identity", projection="identity")

# one representative per registered kind: the layers to wrap it in (so it sees a Gaussian stream)
EXAMPLES = {
    "dense": [Dense(weight_var=1.5, bias_var=0.2)],
    "activation": [Dense(), Activation("tanh", scale=1.2)],
    "layernorm": [Dense(), Activation("relu"), LayerNorm(gain=1.1, eps=0.05)],
    "rmsnorm": [Dense(), Activation("relu"), RMSNorm(gain=0.9)],
    "dropout": [Dense(), Activation("relu"), Dropout(0.2), Dense()],
    "attention": [LayerNorm(), Attention(heads=2, scores="tied", causal=True, qk_var=1.5, rope_theta=100.0,
                                         qk_norm="rmsnorm", value_bias_var=0.2, out_bias_var=0.1)],
    "gated_mlp": [Residual(RMSNorm(), kp.GatedMLP("gelu", gate_var=1.2, up_var=0.8, down_var=2.0), beta=0.6)],
    "scale": [Residual(LayerNorm(), Scale(0.7), Dense(), Activation("relu"), Scale(-1.3), beta=0.5)],
    "serial": [Serial(Dense(), Activation("relu"))],
    "residual": [Residual(Dense(), Activation("relu"), Dense(weight_var=2.0), alpha=0.8, beta=0.6)],
    "parallel": [Parallel([LayerNorm(), Attention(heads=2, causal=True)], [Dense(), Activation("relu"), Dense()],
                          betas=[0.5, 0.7])],
}
# rules a built-in layer refuses, with (part of) the reason it must give
REFUSALS = {"activation": "has no closed-form kernel"}


def _refusal_is_named(exc, kind):
    msg = str(exc)
    return f"layer `{kind}` has no" in msg or REFUSALS.get(kind, "\0") in msg


def test_every_registered_kind_has_an_example():
    builtin = {k for k, c in LAYERS.items() if c.__module__.startswith("kernelprop.")}
    assert builtin == set(EXAMPLES), f"add an EXAMPLES entry for {sorted(builtin - set(EXAMPLES))}"


def _net(kind, depth=2):
    return Network(block=EXAMPLES[kind], depth=depth)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_every_rule_exists_or_refuses_by_name(kind):
    net = _net(kind, depth=1)
    ran = {}
    for rule, run in {
        "kernel_map": lambda: kp.propagate(net, EQ),
        "kernel_backward": lambda: kp.backpropagate(net, EQ),
        "sample": lambda: mc.simulate(net, EQ, 16, 2),
        "sample_backward": lambda: mc.simulate_gradients(net, EQ, 16, 2),
        "symbolic_map": lambda: S.block_map(net, mode="explicit", tokens=3),
    }.items():
        try:
            run()
            ran[rule] = True
        except NotSupportedError as exc:
            assert _refusal_is_named(exc, kind), f"{kind}.{rule} refused without naming the layer: {exc}"
            ran[rule] = False
    assert set(ran) == set(RULES)
    assert ran["kernel_map"] and ran["sample"], "every built-in layer has a kernel map and a finite-width rule"


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_every_layer_with_both_rules_agrees_with_the_monte_carlo(kind):
    """Forward and backward together: kernel entries, means, smooth measures, gradient kernels and
    parameter-gradient norms within the Bonferroni threshold (Richardson pair of widths 192 and 96)."""
    for x in (EQ, TWO):
        cmp, *_ = mc.check(_net(kind), x, 192, 16, gradients=True)
        assert cmp.n_tested > 100
        assert cmp.agree, (kind, x.segments, cmp.criterion(), cmp.failures[:3])


def test_a_layer_without_rules_is_refused_by_name_in_every_interpreter():
    from dataclasses import dataclass

    from kernelprop.layers import Layer

    @dataclass(frozen=True, eq=False)
    class Bare(Layer):
        kind = "bare"
    net = Network(block=[Bare()], depth=1)
    for run, what in [(lambda: kp.propagate(net, EQ), "kernel map"),
                      (lambda: mc.simulate(net, EQ, 16, 2), "finite-width rule"),
                      (lambda: S.block_map(net), "symbolic map")]:
        with pytest.raises(NotSupportedError, match=f"layer `bare` has no {what}"):
            run()


# ----------------------------------------------------------------------------------------------
# Scale(c)


def _state(x):
    return KernelState(x.sigma.copy(), x.mean.copy(), x.segments)


def test_scale_is_c_squared_sigma_exactly():
    x = I.gram(np.array([[2.0, 0.3, -0.1], [0.3, 1.0, 0.2], [-0.1, 0.2, 0.5]]))
    out, back = Scale(-1.7).kernel_map(_state(x), Context())
    assert np.array_equal(out.sigma, 1.7 ** 2 * x.sigma)
    pi = np.eye(3) + 0.25
    assert np.array_equal(back(pi, []), 1.7 ** 2 * pi)


def test_scale_in_a_residual_keeps_the_cross_term():
    """``y = x + β·c·x = (1 + βc) x``: Σ' = (1 + βc)² Σ, Π_x = (1 + βc)² Π (closed form)."""
    x = I.gram(np.array([[1.5, 0.4], [0.4, 0.8]]))
    net = Network(block=[Residual(Scale(0.6), beta=-0.5)], depth=3)
    t = kp.propagate(net, x)
    np.testing.assert_allclose(t.kernels[-1], (1 - 0.3) ** 6 * x.sigma, rtol=1e-14)
    g = kp.backpropagate(net, x)
    np.testing.assert_allclose(g.kernels[0], (1 - 0.3) ** 6 * np.eye(2), rtol=1e-14)


def test_scale_symbolic_agrees():
    net = Network(block=[Residual(LayerNorm(), Scale(0.7), Dense(weight_var=1.3), beta=0.4), Scale(1.1)], depth=4)
    x = I.equicorrelated(3, 1.0, 0.2)
    bm = S.block_map(net, mode="explicit", tokens=3)
    sym, ref = S.evaluate(bm, x), kp.propagate(net, x)
    np.testing.assert_allclose(sym.kernels, ref.kernels, rtol=1e-12)


def test_scale_from_a_spec():
    spec = kp.loads('depth = 2\n[input]\nkind = "identity"\ntokens = 3\n[[block]]\ntype = "scale"\nc = "1/sqrt(L)"\n')
    np.testing.assert_allclose(kp.propagate(spec.network, spec.inputs).kernels[-1], 0.25 * np.eye(3), rtol=1e-15)
    with pytest.raises(SpecError, match="scale.c"):
        Scale("nope(")


# ----------------------------------------------------------------------------------------------
# identity attention A = S (Hron et al. 2020)


def test_identity_attention_with_tied_scores_is_sigma_cubed():
    """Bidirectional, tied 1/d scores: A = σ_qk² Σ, so Σ' = σ_v²σ_o² σ_qk⁴ Σ³ (closed form)."""
    rng = np.random.default_rng(3)
    f = rng.standard_normal((5, 5))
    x = I.gram(f @ f.T / 5)
    layer = Attention(attention="identity", scores="tied", qk_var=0.6, value_var=1.3, out_var=0.8)
    out, _ = layer.kernel_map(_state(x), Context())
    s = x.sigma
    np.testing.assert_allclose(out.sigma, 1.3 * 0.8 * 0.36 * s @ s @ s, rtol=1e-13)


def test_identity_attention_causal_is_the_masked_score_matrix():
    s = I.equicorrelated(4, 1.5, 0.3).sigma
    layer = Attention(attention="identity", scores="tied", qk_var=0.5, causal=True, **WF)
    out, _ = layer.kernel_map(_state(I.gram(s)), Context())
    a = np.array([[0.5 * s[i, j] if j <= i else 0.0 for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(out.sigma, a @ s @ a.T, rtol=1e-14)


@pytest.mark.parametrize("layer", [
    Attention(attention="identity", scores="tied", qk_var=0.5, heads=2),
    Attention(attention="identity", scores="tied", qk_var=0.5, heads=2, causal=True, bias="alibi"),
    Attention(attention="identity", bias=0.1 * np.ones((6, 6))),
], ids=["tied", "tied causal alibi", "bias only"])
def test_identity_attention_agrees_with_the_monte_carlo(layer):
    """Two layers in a row, forward and backward (query-gradient norms included). A LayerNorm directly
    after identity attention is left out: its x̂-projection, O(1/d) per gradient entry, adds up
    coherently in the score gradient G·Vᵀ (see docs/theory.md §11)."""
    for x in (EQ, TWO):
        cmp, *_ = mc.check(Network(stem=[LayerNorm()], block=[layer], depth=2), x, 192, 16, gradients=True)
        assert cmp.agree, (x.segments, cmp.criterion(), cmp.failures[:3])


def test_identity_attention_symbolic_agrees():
    net = Network(block=[Residual(LayerNorm(), Attention(attention="identity", scores="tied", qk_var=0.5,
                                                        causal=True), beta=0.5)], depth=3)
    x = I.equicorrelated(3, 1.0, 0.2)
    sym, ref = S.evaluate(S.block_map(net, mode="explicit", tokens=3), x), kp.propagate(net, x)
    np.testing.assert_allclose(sym.kernels, ref.kernels, rtol=1e-12)
    bidirectional = Network(block=[LayerNorm(), Attention(attention="identity", scores="tied", qk_var=0.5)], depth=3)
    sym, ref = S.evaluate(S.block_map(bidirectional), x), kp.propagate(bidirectional, x)
    np.testing.assert_allclose(sym.kernels, ref.kernels, rtol=1e-12)


@pytest.mark.parametrize("kw, field", [
    (dict(scores="standard"), "attention.scores"),
    (dict(matrix="shaped"), "attention.attention"),
    (dict(bias=np.where(np.eye(3) > 0, -np.inf, 0.0)), "attention.bias"),
])
def test_identity_attention_refuses_what_it_cannot_mean(kw, field):
    with pytest.raises(SpecError, match=field):
        Attention(attention="identity", **kw)


def test_plan_counts_the_same_weights_as_the_layers_draw():
    """The Monte Carlo plan of each layer: one weight matrix per Dense, values/output (+ queries and
    keys for non-uniform scores) per attention layer."""
    net = Network(block=[LayerNorm(), Attention(heads=2, scores="standard"), Dense(width_factor=2),
                         Activation("relu"), Dense(), Scale(0.5)], depth=3)
    p = MS.plan(net, 32, (6,), None, None, "explicit")
    assert p.weight_count == 3 * (32 * 32 * 4 + 32 * 64 * 2)
