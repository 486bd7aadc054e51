"""Sweeps against an independent reference: one ``propagate`` run per grid point at those values."""

import functools
import json

import numpy as np
import pytest

import kernelprop as kp
from kernelprop import inputs
from kernelprop.errors import NumericalError, SpecError
from kernelprop.methods import presets
from kernelprop.network.layers import Activation, Attention, Dense, LayerNorm, Network, Residual
from kernelprop.sweep import load, parse_param, sweep

X = inputs.equicorrelated(8, 1.0, 0.2)


def reference(net, x, measure="cos_mean", label=None):
    """The measure of an independent run of ``net``, after block L (or at ``label``)."""
    traj = kp.propagate(net, x)
    return traj[measure][traj.labels.index(label or f"block {net.depth}")]


def pre_ln_block(beta):
    return [Residual(LayerNorm(), Attention(heads=2, causal=True, scores="tied"), beta=beta),
            Residual(LayerNorm(), Dense(width_factor=2), Activation("relu"), Dense(weight_var=2.0), beta=beta)]


def test_one_param_sweep_matches_individual_runs():
    spec = kp.load(kp.__path__[0] + "/examples/pre_ln.toml", depth=6)
    x = inputs.equicorrelated(8, 1.0, 0.1)
    betas = [0.25, 1.0, 3.0]
    res = sweep(spec, x, {"beta": betas}, measure=["cos_mean", "stable_rank"])
    assert res.shape == (3,) and res.runs == 3
    for i, b in enumerate(betas):
        net = spec.network.with_params(beta=b)
        assert res["cos_mean"][i] == pytest.approx(reference(net, x), rel=1e-13)
        assert res["stable_rank"][i] == pytest.approx(reference(net, x, "stable_rank"), rel=1e-12)
    assert res["cos_mean"][0] < res["cos_mean"][1] < res["cos_mean"][2]   # larger branches mix more


def test_depth_sweep_with_L_in_an_expression_reruns_every_depth():
    """beta = 1/sqrt(L): block l of a depth-4 network differs from block l of a depth-12 one."""
    net = Network(block=pre_ln_block("1/sqrt(L)"), final=[LayerNorm()], depth=12)
    depths = [2, 4, 12]
    res = sweep(net, X, {"L": depths})
    assert res.runs == 3 and "rerun" in " ".join(res.plan)
    deep = kp.propagate(net, X)
    for j, d in enumerate(depths):
        want = reference(net.with_depth(d), X)
        assert res["cos_mean"][j] == pytest.approx(want, rel=1e-13)
        if d < 12:   # reading the deepest run's records would have been wrong
            assert abs(deep["cos_mean"][deep.labels.index(f"block {d}")] - want) > 1e-4


def test_two_param_sweep_weight_by_depth_with_L_expression():
    net = Network(block=pre_ln_block("b/sqrt(L)"), depth=4, params={"b": 1.0})
    res = sweep(net, X, {"b": [0.5, 2.0], "depth": [3, 5]}, measure="q_mean")
    assert res.shape == (2, 2) and res.runs == 4
    for i, b in enumerate([0.5, 2.0]):
        for j, d in enumerate([3, 5]):
            want = reference(net.with_params(b=b).with_depth(d), X, "q_mean")
            assert res["q_mean"][i, j] == pytest.approx(want, rel=1e-13)


def test_depth_sweep_without_L_shares_one_run_per_weight():
    net = Network(block=pre_ln_block("b"), final=[LayerNorm()], depth=2, params={"b": 1.0})
    weights, depths = [0.3, 1.0, 2.0], [1, 3, 6, 9]
    res = sweep(net, X, {"L": depths, "b": weights}, measure=["cos_mean", "q_mean"])
    assert res.shape == (4, 3) and res.runs == 3            # one run per weight, not one per point
    assert "share one run at L=9" in res.plan[0]
    for j, b in enumerate(weights):
        for i, d in enumerate(depths):
            ref = net.with_params(b=b).with_depth(d)
            assert res["cos_mean"][i, j] == pytest.approx(reference(ref, X), rel=1e-13)
            assert res["q_mean"][i, j] == pytest.approx(reference(ref, X, "q_mean"), rel=1e-13)


def test_output_reads_after_the_final_layers():
    net = Network(block=pre_ln_block("b"), final=[Dense(weight_var=3.0)], depth=2, params={"b": 1.0})
    res = sweep(net, X, {"L": [1, 3]}, measure="q_mean", at="output")
    assert res.runs == 2                                     # the head acts on each depth's kernel
    for j, d in enumerate([1, 3]):
        assert res["q_mean"][j] == pytest.approx(reference(net.with_depth(d), X, "q_mean", "final"), rel=1e-13)
    blocks = sweep(net, X, {"L": [1, 3]}, measure="q_mean")
    assert blocks.runs == 1 and not np.allclose(blocks["q_mean"], res["q_mean"])


def test_builder_that_builds_depth_in_is_rerun():
    """E-SPA: the TAT slope and the SPA schedule depend on the depth the preset is built for."""
    build = functools.partial(presets.build, "e_spa", heads=1, eta=0.5)
    res = sweep(build, X, {"L": [6, 10]}, depth=10)
    assert res.runs == 2
    for j, d in enumerate([6, 10]):
        assert res["cos_mean"][j] == pytest.approx(reference(build(d), X), rel=1e-13)


def test_builder_knob_and_shared_depths():
    build = functools.partial(presets.build, "layerscale", heads=1)
    res = sweep(build, X, {"eps": [0.1, 1.0], "L": [2, 5]}, depth=5)
    assert res.runs == 2
    for i, eps in enumerate([0.1, 1.0]):
        for j, d in enumerate([2, 5]):
            assert res["cos_mean"][i, j] == pytest.approx(reference(build(d, eps=eps), X), rel=1e-13)


def test_unused_param_is_computed_once():
    with pytest.warns(UserWarning, match="unused"):          # a param no field uses is warned about
        net = Network(block=pre_ln_block(0.5), depth=3, params={"unused": 1.0})
    res = sweep(net, X, {"unused": [1.0, 2.0, 3.0]})
    assert res.runs == 1 and np.all(res["cos_mean"] == res["cos_mean"][0])
    assert "used by no expression" in " ".join(res.plan)


def test_numerical_failure_is_nan_beyond_the_failing_block():
    net = Network(block=[Residual(Dense(weight_var=1.0), Activation("relu"), Dense(weight_var=2.0), beta="a")],
                  depth=2, params={"a": 1.0})
    # a = 30: each block multiplies the variance by ~901, so 1e150 is passed at block 51
    res = sweep(net, X, {"a": [0.5, 30.0], "L": [10, 40, 60]}, measure="q_mean")
    assert np.all(np.isfinite(res["q_mean"][0]))
    assert np.isfinite(res["q_mean"][1, :2]).all() and np.isnan(res["q_mean"][1, 2])
    assert res["q_mean"][1, 1] == pytest.approx(reference(net.with_params(a=30.0).with_depth(40), X, "q_mean"),
                                                rel=1e-13)
    assert len(res.failures) == 1 and "exploded" in res.failures[0]
    with pytest.raises(NumericalError):
        sweep(net, X, {"a": [30.0]}, depth=60)


@pytest.mark.parametrize("suffix", [".csv", ".json", ".npz"])
def test_write_and_read_back(tmp_path, suffix):
    net = Network(block=pre_ln_block("b"), depth=2, params={"b": 1.0})
    res = sweep(net, X, {"b": [0.5, 1.0, 2.0], "L": [1, 2]}, measure=["cos_mean", "q_mean"])
    path = res.write(tmp_path / f"s{suffix}")
    back = load(path)
    assert back.names == ["b", "L"] and back.measures == ["cos_mean", "q_mean"]
    np.testing.assert_array_equal(back.axis("L").values, [1, 2])
    for m in res.measures:
        np.testing.assert_array_equal(back[m], res[m])
    if suffix == ".csv":
        header, first, *_ = path.read_text().splitlines()
        assert header == "b,L,measure,value" and first.startswith("0.5,1,cos_mean,")
    if suffix == ".json":
        data = json.loads(path.read_text())
        assert data["runs"] == 3 and data["versions"]["numpy"] == np.__version__ and data["at"] == "block"


@pytest.mark.parametrize("kwargs,field", [
    ({"params": {"nope": [1, 2]}}, "params"),
    ({"params": {"b": [1, 2], "L": [1, 2], "c": [1]}}, "params"),
    ({"params": {"L": [1.5, 2]}}, "params.L"),
    ({"params": {"b": [1, 1]}}, "params.b"),
    ({"params": {"b": [1, 2]}, "measure": "nope"}, "measure"),
    ({"params": {"b": [1, 2]}, "measure": "cos_first"}, "measure"),
    ({"params": {"b": [1, 2]}, "measure": "cross_cos_mean"}, "measure"),
    ({"params": {"b": [1, 2]}, "at": "middle"}, "at"),
])
def test_bad_sweeps_name_the_field(kwargs, field):
    net = Network(block=pre_ln_block("b"), depth=2, params={"b": 1.0})
    with pytest.raises(SpecError) as exc:
        sweep(net, X, **kwargs)
    assert exc.value.field == field


@pytest.mark.parametrize("item,name,values,spacing", [
    ("beta=0:1:3", "beta", [0, 0.5, 1], "linear"),
    ("beta=1:100:3:log", "beta", [1, 10, 100], "log"),
    ("L=1:100:5:log", "L", [1, 3, 10, 32, 100], "log"),
    ("L=1:4:10", "L", [1, 2, 3, 4], "linear"),
    ("L=8,16,32", "L", [8, 16, 32], "list"),
])
def test_parse_param(item, name, values, spacing):
    n, v, sp = parse_param(item)
    assert n == name and sp == spacing
    np.testing.assert_allclose(v, values)


@pytest.mark.parametrize("item", ["beta", "beta=", "beta=1:2", "beta=1:2:0", "beta=1:2:x", "beta=a,b",
                                  "beta=0:1:3:log", "L=0:4:3", "L=1.5,2", "2x=1:2:3", "beta=1,1"])
def test_parse_param_rejects(item):
    with pytest.raises(SpecError) as exc:
        parse_param(item)
    assert exc.value.field == "param"


def test_shared_depth_run_with_sampled_scores_matches_individual_runs():
    """Standard (random) scores are seeded per block index, so sharing one run stays exact."""
    net = Network(block=[Residual(LayerNorm(), Attention(heads=2, causal=True, scores="standard", score_samples=8),
                                  beta=0.7)], depth=6)
    res = sweep(net, X, {"L": [2, 6]})
    assert res.runs == 1
    for j, d in enumerate([2, 6]):
        assert res["cos_mean"][j] == pytest.approx(reference(net.with_depth(d), X), rel=1e-13)
