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
    return {(name, depth): backpropagate(presets.build(name, depth, heads=1), x, keep_kernels=False)
            for name in ("pre_ln", "deepscalelm") for depth in (192, 1000)}


@pytest.mark.parametrize("depth", [192, 1000])
def test_pre_ln_variance_grows_linearly_and_parameter_gradients_fall_like_one_over_sqrt_layer(runs, depth):
    g = runs[("pre_ln", depth)]
    q = block_series(g, g.forward["q_mean"])
    l = np.arange(1, depth + 1)
    slope, _ = np.polyfit(np.log(l[10:]), np.log(q[10:]), 1)
    assert slope == pytest.approx(1.0, abs=0.05)               # q_l ∝ l
    _, dense = g.grad_norms("dense")
    slope, _ = np.polyfit(np.log(l[10:]), np.log(np.sqrt(dense[10:])), 1)
    assert slope == pytest.approx(-0.5, abs=0.08)              # ‖∂W_l‖ ∝ 1/sqrt(l)


@pytest.mark.parametrize("depth", [192, 1000])
def test_deepscalelm_keeps_variance_and_gradients_flat(runs, depth):
    g = runs[("deepscalelm", depth)]
    q = block_series(g, g.forward["q_mean"])
    assert q.max() / q.min() < 1.5
    _, dense = g.grad_norms("dense")
    assert dense.max() / dense.min() < 1.6
    assert 0.5 < g.measures["grad_q_mean"][0] / g.measures["grad_q_mean"][-1] < 2.0
