"""Moment view and DeepScaleLM (Kedia et al. 2024) against Pre-LN, at 192 and 1000 layers."""

import numpy as np
import pytest

from kernelprop import inputs as I
from kernelprop.kernel.backward import backpropagate
from kernelprop.methods import presets
from kernelprop.methods.moments import forward_moments


def test_moment_view_of_an_equicorrelated_kernel():
    x = I.equicorrelated(6, 2.5, 0.3)
    m = forward_moments(x.sigma + 0.25, np.full(6, 0.5), x.segments)   # adding μ² = 0.25 everywhere
    assert m == pytest.approx({"mu": 0.5, "var": 2.5, "r": 0.3})


def block_series(g, values):
    idx = [i for i, lab in enumerate(g.labels) if lab.startswith("block")]
    return np.asarray(values)[idx]


@pytest.fixture(scope="module")
def runs():
    ids = np.random.default_rng(0).integers(0, 10, 16)      # repeated tokens give embedding correlation
    x = I.tokens([list(ids)])
    return {(name, depth, causal): backpropagate(presets.build(name, depth, heads=1, causal=causal), x,
                                                 keep_kernels=False)
            for name in ("pre_ln", "deepscalelm") for depth in (192, 1000) for causal in (True, False)
            if causal or name == "deepscalelm"}


@pytest.mark.parametrize("depth", [192, 1000])
def test_pre_ln_variance_grows_linearly_and_parameter_gradients_fall_like_one_over_sqrt_layer(runs, depth):
    """Each Pre-LN block adds the FFN's variance (1 − O(ε): a He-scaled ReLU MLP on a unit LayerNorm output)
    and the attention's (a convex mixing of unit tokens: between 0 and 1), so 1 − 1e-4 ≤ Δq_l ≤ 2 and
    q_l/l → 2 as the tokens align; the weight gradients go like 1/q_l (LayerNorm's backward divides by
    the stream variance), so ‖∂W_l‖²·q_l stays within a factor 1.7 while ‖∂W_l‖² spans ~1/L."""
    g = runs[("pre_ln", depth, True)]
    q = block_series(g, g.forward["q_mean"])
    dq = np.diff(np.concatenate([[1.0], q]))
    assert 1.0 - 1e-4 <= dq.min() and dq.max() <= 2.0
    assert 1.85 < q[-1] / depth < 2.0                          # 1.894 at L = 192, 1.945 at L = 1000
    _, dense = g.grad_norms("dense")
    assert (dense * q).max() / (dense * q).min() < 1.7
    assert dense.max() / dense.min() > depth / 4


def test_pre_ln_variance_approaches_two_per_block(runs):
    """q_l/l rises towards 2 with depth (the attention branch's variance tends to 1 as ρ → 1)."""
    q192, q1000 = (block_series(g, g.forward["q_mean"])[-1] / d
                   for d, g in ((192, runs[("pre_ln", 192, True)]), (1000, runs[("pre_ln", 1000, True)])))
    assert q192 < q1000 < 2.0


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("depth", [192, 1000])
def test_deepscalelm_keeps_the_stream_variance_at_one(runs, depth, causal):
    """Kedia et al. 2024: with λ² + β² = 1 and unit-variance branches (σ_o² and the FFN's last σ_w² set to
    "unit", i.e. chosen from the propagated kernel), the stream's mean variance stays 1 (before, with the
    branch variance ≈ r: 0.79 at block 100 of 192). Non-causal uniform attention gives every token the same
    variance, so there it holds token by token."""
    g = runs[("deepscalelm", depth, causal)]
    q = block_series(g, g.forward["q_mean"])
    assert np.max(np.abs(q - 1.0)) <= 1e-12 * (1 if depth == 192 else 100)


@pytest.mark.parametrize("depth", [192, 1000])
def test_deepscalelm_keeps_gradients_flat_where_pre_ln_spreads_them(runs, depth):
    """Weight-gradient norms over the depth: within 1.35× of each other (measured 1.30) under DeepScaleLM,
    against a spread ≥ L/4 under Pre-LN; the input gradient stays within 0.7–0.75 of the output's (0.72)."""
    g = runs[("deepscalelm", depth, True)]
    _, dense = g.grad_norms("dense")
    assert dense.max() / dense.min() < 1.35
    assert 0.70 < g.measures["grad_q_mean"][0] / g.measures["grad_q_mean"][-1] < 0.75


def test_unit_variance_init_agrees_with_the_monte_carlo():
    """weight_var = "unit" / out_var = "unit" at finite width: chosen from the batch at hand (the wide limit of
    that choice is the engine's); forward and backward within the Bonferroni threshold."""
    import kernelprop as kp
    from kernelprop import montecarlo as mc
    from kernelprop.layers import Activation, Attention, Dense, LayerNorm, Residual
    net = kp.Network(block=[
        Residual(LayerNorm(), Attention(heads=2, causal=True, out_var="unit"), alpha="sqrt(1-2/L)", beta="sqrt(2/L)"),
        Residual(LayerNorm(), Dense(), Activation("gelu"), Dense(weight_var="unit", bias_var=0.1),
                 alpha="sqrt(1-2/L)", beta="sqrt(2/L)")], depth=3)
    cmp, *_ = mc.check(net, I.equicorrelated(6, 1.0, 0.3), 192, 16, gradients=True)
    assert cmp.n_tested > 250 and cmp.agree, (cmp.criterion(), cmp.failures[:3])


def test_unit_is_refused_where_it_has_no_meaning():
    from kernelprop.errors import NotSupportedError, SpecError
    from kernelprop.layers import Dense, LayerNorm
    with pytest.raises(SpecError, match="only for dense.weight_var and attention.out_var"):
        LayerNorm(gain="unit")
    with pytest.raises(SpecError, match="added variance"):
        import kernelprop as kp
        kp.propagate(kp.Network(block=[Dense(weight_var="unit", bias_var=1.5)], depth=1), I.identity(3))
    from kernelprop.symbolic import derive
    with pytest.raises(NotSupportedError, match="unit"):
        import kernelprop as kp
        derive(kp.Network(block=[Dense(weight_var="unit")], depth=1), I.equicorrelated(3, 1.0, 0.2))


@pytest.mark.parametrize("layer", ["dense", "attention"])
def test_unit_variance_init_gives_unit_variance_at_finite_width(layer):
    """The finite-width choice: mean variance 1 per network, up to the bias draw (σ_b² = 0.1 over 256
    features: SE ~ 0.002); a choice that ignored the bias would give 1.1."""
    import kernelprop as kp
    from kernelprop import montecarlo as mc
    from kernelprop.layers import Activation, Attention, Dense
    last = Dense(weight_var="unit", bias_var=0.1) if layer == "dense" else Attention(heads=2, out_var="unit")
    net = kp.Network(block=[Dense(weight_var=2.0), Activation("relu"), last], depth=1)
    sim = mc.simulate(net, I.equicorrelated(6, 1.0, 0.3), 256, 16, seed=3)
    q, se = sim.measures["q_mean"][-1], sim.stderr["q_mean"][-1]
    assert kp.propagate(net, I.equicorrelated(6, 1.0, 0.3)).measures["q_mean"][-1] == pytest.approx(1.0, abs=1e-14)
    assert abs(q - 1.0) <= 4 * se + 1e-12
