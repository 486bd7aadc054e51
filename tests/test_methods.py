"""C-maps/TAT and presets against closed forms and hand computations (issue: THEORY §3, §6, §8)."""

import numpy as np
import pytest
from scipy import optimize

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop.methods import cmaps, presets
from kernelprop.network.layers import Activation, Attention, Dense, Network

# SPA: tests/test_spa.py

# ---------------------------------------------------------------- C-maps and TAT

def leaky_c_map(c, s):
    """Normalised leaky-ReLU C-map, by hand: (s c + (1−s)² k(c)) / ((1+s²)/2),
    k(c) = (sqrt(1−c²) + (π − arccos c) c)/(2π)."""
    k = (np.sqrt(1 - c * c) + (np.pi - np.arccos(c)) * c) / (2 * np.pi)
    return (s * c + (1 - s) ** 2 * k) / ((1 + s * s) / 2)


def test_relu_c_map_values_and_slope():
    relu = [Activation("relu", scale=np.sqrt(2))]
    np.testing.assert_allclose(cmaps.c_map(relu, [0.0, 1.0, -1.0]), [1 / np.pi, 1.0, 0.0], atol=1e-14)
    assert cmaps.c_map_slope(relu) == pytest.approx(1.0, abs=1e-7)
    # erf: C'(1) = q E[φ'²]/E[φ²] = (4/(π sqrt(1+4q))) / ((2/π) arcsin(2q/(1+2q))) at q = 1
    expected = (4 / (np.pi * np.sqrt(5))) / ((2 / np.pi) * np.arcsin(2 / 3))
    assert cmaps.c_map_slope([Activation("erf")]) == pytest.approx(expected, rel=1e-7)


def test_c_map_of_a_dense_layer_with_bias():
    # Dense: C(c) = (σ_w² c + σ_b²)/(σ_w² + σ_b²) at q = 1
    np.testing.assert_allclose(cmaps.c_map([Dense(weight_var=2.0, bias_var=0.5)], [0.3]), [(0.6 + 0.5) / 2.5])
    with pytest.raises(kp.NotSupportedError, match="attention"):
        cmaps.c_map([Attention()], 0.5)


@pytest.mark.parametrize("depth,eta", [(1, 0.2), (12, 0.5), (48, 0.9), (200, 0.95)])
def test_tat_slope_against_an_independent_root_solve(depth, eta):
    def c_net0(s):
        c = 0.0
        for _ in range(depth):
            c = leaky_c_map(c, s)
        return c - eta
    s_ref = optimize.brentq(c_net0, 0, 1 - 1e-12, xtol=1e-15)
    s, scale = cmaps.tat_leaky_relu(depth, eta)
    assert s == pytest.approx(s_ref, abs=1e-10)
    assert scale == pytest.approx(np.sqrt(2 / (1 + s_ref ** 2)), rel=1e-12)


def test_tat_target_out_of_reach_is_a_clear_error():
    with pytest.raises(kp.SpecError, match="out of reach at depth 3"):
        cmaps.tat_leaky_relu(3, 0.99)


# ---------------------------------------------------------------- simplified blocks and presets

def test_sas_attention_sub_block_is_the_identity_and_sas_p_coincides_with_sas_at_init():
    x = I.equicorrelated(16, 1.0, 0.2)
    for causal in (True, False):
        shaped = Attention(matrix="shaped", causal=causal, values="identity", projection="identity", heads=4)
        tr = kp.propagate(Network(block=[shaped], depth=3), x)
        np.testing.assert_allclose(tr.kernels[-1], x.sigma, atol=1e-14)
        a = kp.propagate(presets.build("sas", 30, causal=causal), x)
        b = kp.propagate(presets.build("sas_p", 30, causal=causal), x)
        np.testing.assert_allclose(a.kernels, b.kernels, rtol=1e-12)


T = 5


def causal_a():
    a = np.tril(np.ones((T, T)))
    return a / a.sum(1, keepdims=True)


def relu_k(s):
    d = np.sqrt(np.diag(s))
    c = np.clip(s / np.outer(d, d), -1, 1)
    return np.outer(d, d) * (np.sqrt(1 - c * c) + (np.pi - np.arccos(c)) * c) / (2 * np.pi)


def ln(s):   # inputs here have zero feature mean (Gaussian streams)
    d = np.sqrt(np.diag(s))
    return s / np.outer(d, d)


def mlp(s):  # Dense(1) → ReLU → Dense(2): fresh weights, so no cross term with the skip
    return 2 * relu_k(s)


def unit(s):  # a "unit" last init: the branch's mean variance brought to 1
    return s / np.mean(np.diag(s))


def attn(s, value=1.0):
    a = causal_a()
    return value * a @ s @ a.T


HAND = {  # preset → (one block by hand, final map by hand), depth L = 6
    "post_ln": (lambda s, L: ln(ln(s + attn(s)) + mlp(ln(s + attn(s)))), None),
    "pre_ln": (lambda s, L: (lambda z: z + mlp(ln(z)))(s + attn(ln(s))), ln),
    "noci": (lambda s, L: (lambda z: z + mlp(ln(z)) / L)(s + attn(ln(s)) / L), ln),
    "deepnorm": (lambda s, L: (lambda z: ln(np.sqrt(2 * L) * z + mlp(ln(z) / (8 * L) ** 0.5) / (8 * L) ** 0.5))(
        ln(np.sqrt(2 * L) * s + attn(s) / (8 * L))), None),
    "gpt2": (lambda s, L: (lambda z: z + mlp(ln(z)) / (2 * L))(s + attn(ln(s)) / (2 * L)), ln),
    "deepscalelm": (lambda s, L: (lambda z: (1 - 2 / L) * z + 2 / L * unit(mlp(ln(z))))(
        (1 - 2 / L) * s + 2 / L * unit(attn(ln(s)))), ln),
    "vanilla": (lambda s, L: mlp(attn(s)), None),
    "rezero": (lambda s, L: s, None),
    "layerscale": (lambda s, L: (lambda z: z + 0.01 * mlp(ln(z)))(s + 0.01 * attn(ln(s))), ln),
    "sas": (lambda s, L: (lambda z: z + 0.01 * mlp(z))(ln(s)), None),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_preset_first_blocks_against_a_hand_computation(name):
    depth = 6
    x = I.equicorrelated(T, 1.3, 0.2)
    tr = kp.propagate(presets.build(name, depth, heads=1), x)
    block, final = HAND[name]
    s = x.sigma
    for l in (1, 2, 3):
        s = block(s, depth)
        np.testing.assert_allclose(tr.kernels[l], s, rtol=1e-12, err_msg=f"{name} block {l}")
    if final is not None:
        s = x.sigma
        for _ in range(depth):
            s = block(s, depth)
        np.testing.assert_allclose(tr.kernels[-1], final(s), rtol=1e-11)


def test_preset_builders_details():
    """Defaults and knobs the hand computations above do not reach: the MLP's defaults (ReLU, hidden width 4d,
    He gain 2), ReZero with a = 0.5 (x + 0.25·f(x) per branch, fresh weights: no cross term), the heads of
    the SPA presets, CaiT's LayerScale ε schedule, the network's name and the refusal of an unknown preset."""
    m = presets.mlp()
    assert (m[0].width_factor, m[1].name, m[2].weight_var) == (4, "relu", 2.0)
    x = I.equicorrelated(T, 1.3, 0.2)
    tr = kp.propagate(presets.build("rezero", 6, heads=1, a=0.5), x)
    s = x.sigma
    for l in (1, 2):
        s = s + 0.25 * attn(s)
        s = s + 0.25 * mlp(s)
        np.testing.assert_allclose(tr.kernels[l], s, rtol=1e-12, err_msg=f"block {l}")
    for name in ("e_spa", "u_spa"):
        assert presets.build(name, 16, heads=2).block.layers[0].heads == 2
    assert [presets.build("layerscale", d).params["eps"] for d in (18, 19, 24, 25)] == [0.1, 1e-5, 1e-5, 1e-6]
    assert presets.build("noci", 3).name == "noci (Noci et al. 2022)"
    with pytest.raises(kp.SpecError) as info:
        presets.build("resnet", 4)
    assert info.value.allowed == f"must be one of {sorted(presets.PRESETS)}"


def test_every_preset_runs_and_is_listed_with_a_source():
    x = I.equicorrelated(8, 1.0, 0.1)
    for name, p in presets.PRESETS.items():
        assert p.source and p.summary
        tr = kp.propagate(presets.build(name, 20), x, keep_kernels=False)
        assert np.all(np.isfinite(tr["cos_mean"]))
    with pytest.raises(kp.SpecError, match="knob"):
        presets.build("noci", 4, beta=2.0)
    with pytest.raises(kp.SpecError, match="preset"):
        presets.build("resnet", 4)


# ---------------------------------------------------------------- simulation

DEEP_PRESETS = ("e_spa", "u_spa", "value_skipinit")   # no skips, no normalisation: built for depth 16


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_agrees_with_the_simulator(name):
    """Theory against finite-width networks for the first blocks of every preset (criterion of
    kernelprop.montecarlo.check: Bonferroni at family-wise rate 0.01 on width-extrapolated estimates,
    widths 512 and 256; 320 seeds, or 128 for the depth-16 presets).

    Power: a deviation δ of cos_mean at the last record is flagged with probability ≥ 0.99 once
    |δ| ≥ (k + z_0.99)·SE. Measured at these settings (seed 1), as a fraction of the predicted value:
    gpt2 4.7 %, depth_mup and noci 4.5 %, value_skipinit 4.5 %, layerscale 3.5 %, deepnorm, pre_ln, sas,
    sas_p 2.8-2.9 %, u_spa and deepscalelm 1.5 %, post_ln 0.8 %, e_spa 0.4 %, vanilla 0.02 %, rezero
    exact. So a 5 % error in the correlations a block map predicts fails this test; the power is
    asserted, and so is the rejection of the theory with cos_mean moved by 5 %. (Before: width 128, 8
    seeds, k = 9.1-9.4: the same threshold was 144 % (gpt2), 124 % (noci), 85 %, 71 %, 68 %, 59 %, 52 %,
    38 %, 18 %, 13 %, 4.3 % and 1.2 % (vanilla).) q_mean of the unnormalised presets carries the product
    of every weight matrix's norm fluctuation: there only deviations above 25 % (vanilla) to 67 % (e_spa)
    are resolved."""
    import dataclasses

    from scipy import stats

    from kernelprop import montecarlo
    deep = name in DEEP_PRESETS
    depth = 16 if deep else 6
    net = presets.build(name, depth, heads=2)
    cmp, theory, sim, half = montecarlo.check(net, I.equicorrelated(8, 1.0, 0.2), width=512,
                                              seeds=128 if deep else 320, seed=1, every=depth // 3)
    assert cmp.agree, [(r.label, r.measure, r.z) for r in cmp.failures][:5]
    last = len(theory.labels) - 1
    row = next(r for r in cmp.rows if r.record == last and r.measure == "cos_mean")
    power = (cmp.k + stats.norm.isf(0.01)) * row.se / abs(row.theory)
    assert power <= 0.05, power
    cos = theory.measures["cos_mean"].copy()
    cos[last] *= 0.95
    moved = dataclasses.replace(theory, measures={**theory.measures, "cos_mean": cos})
    assert not montecarlo.compare(moved, sim, half).agree
