"""The gradient kernel's error (docs/theory.md §11.6): zero where every backward map is exact, at least the
true error where the maps are approximate (quadrature of E[φ'φ'], sampled standard scores), shrinking with
the draws, and a residual sum that cancels raises it exactly as stated."""

import numpy as np
import pytest
from scipy.special import erf

from kernelprop import inputs as I
from kernelprop.kernel.backward import backpropagate
from kernelprop.kernel.maps import Context
from kernelprop.kernel.state import KernelState
from kernelprop.layers.base import Grads, carry
from kernelprop.methods.presets import build
from kernelprop.network.layers import Activation, Attention, Dense, LayerNorm, Network, Residual, Scale


def _relative(g, ref):
    return np.abs(g.kernels - ref.kernels).max(axis=(1, 2)) / np.abs(ref.kernels).max(axis=(1, 2))


@pytest.mark.parametrize("preset", ["pre_ln", "post_ln", "vanilla"])
def test_exact_backward_maps_report_no_error(preset):
    g = backpropagate(build(preset, 3), I.equicorrelated(6, 1.0, 0.3))
    np.testing.assert_array_equal(g.measures["grad_error"], 0.0)


def _erf_callable(**kw):
    f = lambda z: erf(z)                                            # noqa: E731 - no closed form: quadrature
    f.__name__ = "erf_by_quadrature"
    return Activation(f, derivative=lambda z: 2.0 / np.sqrt(np.pi) * np.exp(-z * z), **kw)


@pytest.mark.parametrize("nodes", [8, 16])
def test_quadrature_error_of_the_derivative_kernel_covers_the_true_error(nodes):
    net = lambda act: Network(block=[Residual(LayerNorm(), Dense(), act, Dense())], depth=4)    # noqa: E731
    x = I.equicorrelated(16, 1.0, 0.3)
    ref = backpropagate(net(Activation("erf")), x)                  # closed-form K' (Williams 1997)
    g = backpropagate(net(_erf_callable()), x, quad_nodes=nodes)
    true, reported = _relative(g, ref), g.measures["grad_error"]
    assert np.all(true[:-1] > 1e-5)                                 # the coarse rule is visibly off …
    assert np.all(true <= reported)                                 # … and the report covers it
    assert np.all(reported[:-1] <= 200.0 * true[:-1])              # without being vacuous
    assert reported[-1] == 0.0                                      # the output gradient is exact


def _standard(samples, causal, qk_norm="none"):
    pre = [] if qk_norm != "none" else [LayerNorm()]        # QK-norm: its rescaling 1/√Σ_ii is not 1
    blk = [Residual(*pre, Attention(scores="standard", heads=2, qk_var=0.5, causal=causal, qk_norm=qk_norm,
                                    score_samples=samples)),
           Residual(LayerNorm(), Dense(), Activation("relu"), Dense())]
    return Network(block=blk, depth=2)


@pytest.mark.parametrize("causal,qk_norm", [(True, "none"), (False, "none"), (False, "layernorm")])
def test_standard_score_error_covers_an_independent_reference_and_shrinks_with_draws(causal, qk_norm, monkeypatch):
    z = np.random.default_rng(5).standard_normal((6, 10)) * np.array([0.6, 1.0, 1.4, 0.8, 1.2, 0.9])[:, None]
    x = I.gram(z @ z.T / 10)                                        # unequal variances
    seed = Context.next_seed
    monkeypatch.setattr(Context, "next_seed", lambda self: (7919, *seed(self)))     # draws of its own
    ref = backpropagate(_standard(4000, causal, qk_norm), x)
    monkeypatch.setattr(Context, "next_seed", seed)
    reported = {}
    for n in (16, 256):
        g = backpropagate(_standard(n, causal, qk_norm), x)
        true = _relative(g, ref)
        bound = g.measures["grad_error"] + ref.measures["grad_error"]
        assert np.all(true <= bound), (n, true, bound)
        reported[n] = g.measures["grad_error"][0]
    # the spread shrinks like sqrt(8/128) pairs, the Bonferroni t quantile from 8.85 (7 dof) to 4.21 (127): 0.119
    from scipy import stats
    m = 6 * 7 // 2
    expected = np.sqrt(8 / 128) * stats.t.isf(0.0005 / m, 127) / stats.t.isf(0.0005 / m, 7)
    assert expected / 2.5 < reported[256] / reported[16] < 2.5 * expected


def test_a_residual_sum_that_cancels_raises_the_relative_error_as_stated():
    # y = x + β c x with β c = −0.9: Π_x = (1 + βc)² Π = 0.01 Π; streams: skip α² Π, branch β²c² Π, cross 2αβc Π
    layer = Residual(Scale(c=3.0), beta=-0.3)
    s = KernelState(np.eye(3) + 0.2, np.zeros(3), (3,))
    _, back = layer.kernel_map(s, Context())
    pi = np.array([[2.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 1.5]])
    grads = Grads(error=1e-6)
    out = back(pi, grads)
    np.testing.assert_allclose(out, 0.01 * pi, rtol=1e-12)
    assert grads.error == pytest.approx((1.0 + 0.81 + 2 * 0.9) * 1e-6 / 0.01, rel=1e-12)
    plain: list = []
    np.testing.assert_array_equal(back(pi, plain), out)              # a plain list carries no error


def test_the_ledger_adds_each_rules_own_error_relative_to_its_output():
    g = Grads(error=0.1)
    carry(g, 0.0, np.zeros((2, 2)))                                   # nothing of its own: unchanged
    assert g.error == 0.1
    carry(g, 0.03, np.array([[2.0, -3.0], [-3.0, 1.0]]))              # 0.03 on an output whose top is 3
    assert g.error == pytest.approx(0.11, rel=1e-15)
    carry(g, 0.03, np.zeros((2, 2)))                                  # an error on a zero output: unbounded
    assert g.error == np.inf
    plain: list = []
    carry(plain, 1.0, np.ones((2, 2)))
    assert plain == []


def test_an_activation_adds_its_quadrature_bound_scaled_like_its_map():
    act = _erf_callable(scale=1.7, input_scale=0.6)
    sigma = np.array([[1.0, 0.3, -0.2], [0.3, 0.8, 0.1], [-0.2, 0.1, 1.2]])
    _, back = act.kernel_map(KernelState(sigma, np.zeros(3), (3,)), Context(quad_nodes=8))
    kp, _, kerr = act.inner_derivative_kernel(sigma, 8)
    assert kerr > 1e-6
    pi = np.array([[2.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 1.5]])
    g = Grads(error=0.2)
    out = back(pi, g)
    f2 = (1.7 * 0.6) ** 2
    np.testing.assert_allclose(out, f2 * pi * kp, rtol=1e-14)
    assert g.error == pytest.approx(0.2 + f2 * kerr * 2.0 / np.max(np.abs(out)), rel=1e-12)


@pytest.mark.parametrize("weight_free", [False, True])
def test_standard_scores_add_both_estimates_errors_scaled_like_the_map(weight_free):
    from kernelprop.layers.attention.standard import Estimator
    kw = dict(values="identity", projection="identity") if weight_free else dict(value_var=1.3, out_var=0.7)
    layer = Attention(scores="standard", heads=2, qk_var=0.5, score_samples=8, causal=True, **kw)
    sigma = np.array([[1.0, 0.3, -0.2], [0.3, 0.8, 0.1], [-0.2, 0.1, 1.2]])
    ctx = Context()
    _, back = layer.kernel_map(KernelState(sigma, np.zeros(3), (3,)), ctx)
    pi = np.array([[2.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 1.5]])
    g = Grads(error=0.2)
    out = back(pi, g)
    est = Estimator(layer, sigma, (3,), {}, seed=(0, 1))              # the layer's own draws, again
    est.forward([sigma], want_mean=weight_free)
    sv_so = 1.0 if weight_free else 1.3 * 0.7
    est.backward(pi, sv_so / 0.7 * sigma if not weight_free else sigma, layer.score_options(sigma, (3,)))
    assert est.back_error > 0 and est.score_error > 0
    own = sv_so * est.back_error + 0.5 * (1.0 if weight_free else 0.7) * est.score_error
    assert g.error == pytest.approx(0.2 + own / np.max(np.abs(out)), rel=1e-12)


def test_a_gated_mlp_adds_the_quadrature_bounds_of_both_its_kernels():
    from kernelprop.kernel import activations
    from kernelprop.network.layers import GatedMLP
    f = lambda z: z * (1.0 + erf(z)) / 2.0                          # noqa: E731 - an erf-GELU by quadrature
    df = lambda z: (1.0 + erf(z)) / 2.0 + z * np.exp(-z * z) / np.sqrt(np.pi)     # noqa: E731
    layer = GatedMLP(activation=f, derivative=df, gate_var=0.9, up_var=1.3, down_var=0.8)
    sigma = np.array([[1.0, 0.3, -0.2], [0.3, 0.8, 0.1], [-0.2, 0.1, 1.2]])
    _, back = layer.kernel_map(KernelState(sigma, np.zeros(3), (3,)), Context(quad_nodes=8))
    _, _, err = activations.activation_kernel(f, 0.9 * sigma, nodes=8)
    _, _, kerr = activations.derivative_kernel(f, 0.9 * sigma, derivative=df, nodes=8)
    assert err > 1e-8 and kerr > 1e-8
    pi = np.array([[2.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 1.5]])
    g = Grads(error=0.2)
    out = back(pi, g)
    own = 0.8 * 2.0 * (0.9 * 1.3 * 1.2 * kerr + 1.3 * err)          # σ_d² max|Π| (σ_g²σ_u² max|Σ| e_K' + σ_u² e_K)
    assert g.error == pytest.approx(0.2 + own / np.max(np.abs(out)), rel=1e-12)
