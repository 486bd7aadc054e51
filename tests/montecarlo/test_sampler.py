"""The finite-width sampler: exact inputs, exact orthogonal maps, reproducibility, records, bad input."""

import numpy as np
import pytest

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop import montecarlo as mc
from kernelprop.errors import NotSupportedError, SpecError
from kernelprop.montecarlo import sampler as S
from kernelprop.network.layers import Activation, Attention, Dense, Dropout, LayerNorm, Network, Residual, Serial


def gens(n, seed=0):
    return [np.random.default_rng([seed, i]) for i in range(n)]


@pytest.mark.parametrize("x", [
    I.equicorrelated(6, 1.3, 0.4, sequences=2, cross_rho=-0.2),
    I.tokens([[3, 1, 3, 3], [1, 2]], q=2.0, rho=0.3),                      # singular: repeated tokens
    I.Inputs(I.identity(5).sigma + 0.5, (5,), mean=np.full(5, 0.6)),       # nonzero token means
])
def test_exact_inputs_reproduce_the_input_kernel_and_means(x):
    feats = S.sample_inputs(x, 40, gens(3), "exact")
    assert feats.shape == (3, x.n_tokens, 40)
    k = feats @ np.swapaxes(feats, -1, -2) / 40
    np.testing.assert_allclose(k, np.broadcast_to(x.sigma, k.shape), atol=1e-13)
    np.testing.assert_allclose(feats.mean(-1), np.broadcast_to(x.mean, (3, x.n_tokens)), atol=1e-13)
    assert not np.allclose(feats[0], feats[1])                              # a random rotation per seed


def test_gaussian_inputs_have_the_input_kernel_in_expectation():
    x = I.equicorrelated(4, 1.0, 0.5)
    feats = S.sample_inputs(x, 64, gens(400), "gaussian")
    k = feats @ np.swapaxes(feats, -1, -2) / 64
    se = k.std(0) / np.sqrt(400)
    assert np.all(np.abs(k.mean(0) - x.sigma) < 5 * se + 1e-12)
    assert np.abs(k[0] - x.sigma).max() > 0.05                              # but not per seed


@pytest.mark.parametrize("products", ["auto", "explicit"])
def test_orthogonal_dense_layers_map_the_kernel_exactly_per_seed(products):
    """Scaled orthogonal W with fan_out >= fan_in: X W Wᵀ Xᵀ/fan_out = σ_w² X Xᵀ/fan_in exactly."""
    x = I.equicorrelated(6, 1.0, 0.3)
    net = Network(block=[Dense(weight_var=1.7, init="orthogonal", width_factor=2),
                         Dense(weight_var=0.5, init="orthogonal", width_factor=2)], depth=2)
    sim = mc.simulate(net, x, 32, 3, products=products, dong=False)
    theory = kp.propagate(net, x)
    np.testing.assert_allclose(sim.kernels, theory.kernels, rtol=1e-12, atol=1e-13)
    assert np.nanmax(sim.kernel_stderr) < 1e-13


@pytest.mark.parametrize("init", ["gaussian", "orthogonal"])
def test_projected_products_have_the_law_of_explicit_weights(init):
    """``X W`` drawn from the QR of X has the law of an explicit product: compare two-sample z-scores
    (up- and down-projections, so both orthogonal cases fan_out ≷ fan_in are exercised)."""
    x = I.equicorrelated(6, 1.0, 0.3)
    net = Network(block=[Dense(weight_var=2.0, width_factor=2), Activation("relu"), Dense(), LayerNorm(),
                         Attention(scores="tied", heads=2)], depth=2)
    a = mc.simulate(net, x, 48, 400, products="auto", init=init, dong=False, seed=1)
    b = mc.simulate(net, x, 48, 400, products="explicit", init=init, dong=False, seed=2)
    z = (a.kernels - b.kernels) / np.sqrt(a.kernel_stderr ** 2 + b.kernel_stderr ** 2 + 1e-300)
    assert np.abs(z[1:]).max() < 4.5                      # 63 entries × 2 records, two-sided 1e-5 level
    # and the spread agrees too: the ratio of per-seed variances of each distinct entry is F(399, 399) under
    # the null; two-sided Bonferroni bounds at family-wise rate 0.01 over the 42 entries (0.69, 1.45).
    # Measured: 0.91-1.16 (gaussian), 0.95-1.02 (orthogonal). Before: 0.8 < median ratio of SEs < 1.25.
    from scipy import stats
    iu = np.triu_indices(6)
    var_ratio = (a.kernel_stderr[1:][:, iu[0], iu[1]] / b.kernel_stderr[1:][:, iu[0], iu[1]]) ** 2
    n = var_ratio.size
    lo, hi = stats.f.ppf(0.005 / n, 399, 399), stats.f.isf(0.005 / n, 399, 399)
    assert lo < var_ratio.min() and var_ratio.max() < hi, (var_ratio.min(), var_ratio.max(), lo, hi)


def test_results_do_not_depend_on_the_batching_of_seeds():
    """Means and standard errors (batches merged with Chan et al.'s pairwise update) do not depend on
    how the seeds are batched: 4 seeds in batches of 1, 2 and 4."""
    s = kp.load(_example("parallel"), depth=2)
    runs = [mc.simulate(s.network, s.inputs, 64, 4, batch=b, dong=False, seed=7) for b in (1, 2, 4)]
    all_ = runs[-1]
    for one in runs[:-1]:
        np.testing.assert_allclose(one.kernels, all_.kernels, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(one.kernel_stderr, all_.kernel_stderr, rtol=1e-8, atol=1e-13)
        for k in one.samples:
            np.testing.assert_allclose(one.samples[k], all_.samples[k], rtol=1e-10, atol=1e-13)


def test_progress_settings_and_a_single_seed():
    """progress(done, total) counts blocks over every batch; the settings are recorded; one seed has no
    standard error (NaN), not an error."""
    net = Network(block=[Dense(), Activation("relu")], depth=3)
    calls = []
    sim = mc.simulate(net, I.identity(4), 16, 4, batch=2, every=2, dong=False,
                      progress=lambda done, total: calls.append((done, total)))
    assert calls == [(d, 6) for d in range(1, 7)]
    assert sim.meta["every"] == 2 and sim.meta["batch"] == 2 and sim.meta["seeds"] == 4
    one = mc.simulate(net, I.identity(4), 16, 1, dong=False)
    assert np.isnan(one.stderr["q_mean"]).all() and np.isfinite(one.measures["q_mean"]).all()


def test_zero_query_attention_is_exact_at_any_width():
    """Uniform (zero-query), weight-free single-head attention is a fixed mixing: simulation = map.

    (With several heads of different matrices each head mixes its own d/H features, whose Gram matrix
    equals Σ only on average: that case is statistical, see test_agreement.)"""
    x = I.equicorrelated(7, 1.0, 0.2, sequences=2)
    net = Network(block=[Residual(Attention(heads=1, causal=True, bias="alibi", values="identity",
                                            projection="identity"), alpha=0.9, beta=0.6)], depth=3)
    sim = mc.simulate(net, x, 16, 2, dong=False)
    np.testing.assert_allclose(sim.kernels, kp.propagate(net, x).kernels, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("record, every", [("blocks", 1), ("blocks", 3), ("sublayers", 2)])
def test_records_have_the_engine_labels(record, every):
    net = Network(block=[LayerNorm(), Attention(), Dense(), Activation("relu")], depth=7,
                  stem=[Dense(), LayerNorm()], final=[Dense()])
    x = I.identity(5)
    sim = mc.simulate(net, x, 8, 2, record=record, every=every, dong=False)
    theory = kp.propagate(net, x, record=record, every=every)
    assert sim.labels == theory.labels
    np.testing.assert_array_equal(sim.blocks, theory.blocks)
    assert set(theory.measures) - {"quad_error"} <= set(sim.measures)
    assert sim.measures["q_mean"].shape == theory.measures["q_mean"].shape
    assert sim.measures["cos_first"].shape == theory.measures["cos_first"].shape


def test_dropout_masks_are_fresh_per_seed_and_inverted():
    """Inverted dropout at p = 1/2 on orthonormal Gaussian tokens: E Σ' = I/(1 − p) = 2I. Every entry
    within k standard errors, k = Student t (31 dof) at family-wise rate 0.01 over the 10 entries (3.6;
    ±0.05-0.08 on the diagonal). Before: diagonal within rtol 0.1 of 2 over 3 seeds, off-diagonals unchecked."""
    from scipy import stats
    x = I.identity(4)
    net = Network(block=[Dropout(0.5)], depth=1)
    sim = mc.simulate(net, x, 2000, 32, dong=False, input_kind="gaussian", seed=4)
    iu = np.triu_indices(4)
    k = stats.t.isf(0.01 / (2 * len(iu[0])), 31)
    err = np.abs(sim.kernels[1] - 2.0 * np.eye(4))[iu]
    assert np.all(err <= k * sim.kernel_stderr[1][iu]), (err, sim.kernel_stderr[1][iu])
    assert np.abs(sim.samples["q_mean"][:, 1] - sim.samples["q_mean"][0, 1]).max() > 0


# --- bad input: a clear message before any work ------------------------------------------------

def _example(name):
    from pathlib import Path
    return Path(kp.__file__).parent / "examples" / f"{name}.toml"


NET = Network(block=[Dense(), Activation("relu")], depth=2)
X8 = I.identity(8)


@pytest.mark.parametrize("kwargs, field, text", [
    (dict(width=8), "width", "9 features for the 8 tokens"),     # exact inputs need d > N
    (dict(width=6, input_kind="gaussian", init="orthogonal"), "width", "width >= N = 8"),
    (dict(seeds=0), "seeds", ">= 1"),
    (dict(seeds=2.5), "seeds", ">= 1"),
    (dict(width=0), "width", ">= 1"),
    (dict(init="xavier"), "init", "gaussian"),
    (dict(input_kind="sphere"), "input_kind", "exact"),
    (dict(scores="sqrt"), "scores", "standard"),
    (dict(width=10**8), "width", "GiB"),                         # one seed's features exceed the machine
    (dict(width=60000, products="explicit"), "width", "GiB"),    # one explicit 60000×240000 weight matrix
    (dict(width=4096, seeds=4096, batch=4096, memory_limit=2**30), "batch", "GiB"),
])
def test_bad_arguments_fail_before_any_work(kwargs, field, text):
    args = dict(width=64, seeds=4)
    args.update(kwargs)
    width, seeds = args.pop("width"), args.pop("seeds")
    with pytest.raises(SpecError, match=text) as info:
        mc.simulate(Network(block=[Dense(width_factor=4), Activation("relu"), Dense()], depth=2), X8, width, seeds,
                    **args)
    assert info.value.field == field


def test_memory_estimate_counts_seeds_tokens_width_and_weights():
    plan = S.plan(Network(block=[Dense(width_factor=4), Dense()], depth=1), 1000, (8,), None, None, "explicit")
    assert plan.max_width == 4000 and plan.max_weight == 4 * 10**6
    one, ten = plan.batch_bytes(1, 8, 8), plan.batch_bytes(10, 8, 8)
    assert ten == 10 * one and one >= 8 * (8 * 4000 + 4 * 10**6)


def test_stored_results_count_two_kernels_per_record():
    """Kept kernels cost their mean and standard error per record: 2·R·N² floats of 8 bytes."""
    plan = S.plan(Network(block=[Dense(width_factor=4), Dense()], depth=2), 100, (8,), None, None, "explicit")
    plan.records = 3
    kept, dropped = plan.stored_bytes(4, 8, 8, True), plan.stored_bytes(4, 8, 8, False)
    assert kept - dropped == 8 * 2 * 3 * 64 and dropped >= 8 * 4 * 3 * 16


def test_a_shape_error_names_the_block_and_layer():
    with pytest.raises(SpecError, match="multiple of 3") as info:
        mc.simulate(Network(block=[Dense(), Attention(heads=3)], depth=2), X8, 64, 2)
    assert info.value.field == "block 1/1:attention.heads"


@pytest.mark.parametrize("net, text", [
    (Network(block=[Attention(heads=3)], depth=1), "multiple of 3"),
    (Network(block=[Residual(Dense(width_factor=2))], depth=1), "branch maps width 64 to 128"),
    (Network(block=[Attention(bias=np.zeros((4, 4)))], depth=1), "cover the longest sequence"),
])
def test_shapes_the_sampler_cannot_build_are_spec_errors(net, text):
    with pytest.raises(SpecError, match=text):
        mc.simulate(net, X8, 64, 2)


def test_a_fully_masked_row_is_a_spec_error():
    bias = np.zeros((8, 8))
    bias[3] = -np.inf
    with pytest.raises(SpecError, match="row 3"):
        mc.simulate(Network(block=[Attention(bias=bias)], depth=1), X8, 64, 2)


def test_unknown_layer_types_are_refused():
    """A layer type without a finite-width rule is refused by name, before or while sampling."""
    from dataclasses import dataclass

    from kernelprop.layers import Layer

    @dataclass(frozen=True, eq=False)
    class Conv(Layer):
        kind = "conv"
    with pytest.raises(NotSupportedError, match="layer `conv` has no finite-width rule"):
        mc.simulate(Network(block=Serial(Conv()), depth=1), X8, 64, 2)


def test_check_refuses_a_score_override_the_theory_would_not_see():
    with pytest.raises(NotSupportedError, match="set scores"):
        mc.check(Network(block=[Attention()], depth=1), X8, 64, 4, scores="standard")


def test_standard_scores_are_simulated_and_stay_random():
    """The override ``scores="standard"`` on a zero-score layer simulates 1/sqrt(d_k) scores: its cos_mean
    agrees with the engine's standard-score limit (score draws; measured 0.556 ± 0.013 against 0.533 ±
    0.005) and is 33 SE from the uniform one (1.0). ``scores="independent"`` (1/d scaling) tends to the
    uniform limit: its O(1/d) bias (0.0018 at width 512) is removed by the Richardson pair 512/256 and
    the rest is within k SE. k: Student t, 7 dof, family-wise 0.01 over the two comparisons (4.0).
    Before: |independent − uniform| < 0.02 and uniform − standard > 0.1."""
    from scipy import stats
    x = I.equicorrelated(8, 1.0, 0.0)
    wf = dict(values="identity", projection="identity")
    net = Network(block=[Attention(**wf)], depth=1)
    k = stats.t.isf(0.01 / 4, 7)
    std = mc.simulate(net, x, 512, 8, scores="standard", dong=False)
    limit = kp.propagate(Network(block=[Attention(scores="standard", score_samples=400, **wf)], depth=1), x)
    se = np.hypot(std.stderr["cos_mean"][1], limit["quad_error"][1])
    assert abs(std.measures["cos_mean"][1] - limit.measures["cos_mean"][1]) <= k * se
    uniform = kp.propagate(net, x).measures["cos_mean"][1]
    assert uniform - std.measures["cos_mean"][1] > 20 * se
    ind, ind_half = (mc.simulate(net, x, w, 8, scores="independent", dong=False, seed=w) for w in (512, 256))
    est = 2 * ind.measures["cos_mean"][1] - ind_half.measures["cos_mean"][1]
    se = np.hypot(2 * ind.stderr["cos_mean"][1], ind_half.stderr["cos_mean"][1])
    assert abs(est - uniform) <= k * se, (est, uniform, se)


def test_numerical_blow_up_names_the_layer():
    net = Network(block=[Dense(weight_var=1e30)], depth=40)
    with pytest.raises(kp.NumericalError, match="block"):
        mc.simulate(net, I.identity(4), 16, 2, dong=False)
