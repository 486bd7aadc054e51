"""Batched sweeps against independent runs: every grid point of a batched sweep equals its own ``propagate``
run (the unbatched engine, one network at a time) to 1e-12 relative, on networks that use every batched
map; layers that cannot batch are refused by name and their sweeps fall back to the per-point runs."""

import math
from dataclasses import dataclass

import numpy as np
import pytest

import kernelprop as kp
from kernelprop import inputs
from kernelprop.errors import SpecError
from kernelprop.layers import Layer
from kernelprop.network import expressions
from kernelprop.network.layers import (
    Activation,
    Attention,
    Dense,
    Dropout,
    GatedMLP,
    LayerNorm,
    Network,
    Parallel,
    Residual,
    RMSNorm,
    Scale,
)
from kernelprop.sweep import batch as B
from kernelprop.sweep import compute, sweep

MEASURES = ["cos_mean", "q_mean", "stable_rank", "rank_one_distance", "mean_abs", "quad_error"]


def reference(net, x, measure, at="block"):
    """The measure of ``net``'s own run: after block L, or the output after the final layers."""
    traj = kp.propagate(net, x)
    return traj[measure][len(traj.labels) - 1 if at == "output" else traj.labels.index(f"block {net.depth}")]


def no_single_runs(monkeypatch):
    """Make any fallback to one run per network fail the test (the batch must carry every point)."""
    def refuse(*_):
        raise AssertionError("a batched sweep fell back to a single run")
    monkeypatch.setattr(compute, "_execute", refuse)


def check_against_runs(res, make, grid, x, measures=MEASURES, at="block", rel=1e-12):
    names = list(grid)
    for index in np.ndindex(*res.shape):
        point = {n: grid[n][i] for n, i in zip(names, index)}
        depth = int(point.pop("L"))
        net = make(depth, point)
        for m in measures:
            want = reference(net, x, m, at)
            got = res[m][index]
            assert got == pytest.approx(want, rel=rel, abs=1e-300 if m != "quad_error" else 1e-15), (point, depth, m)


def network_model(net):
    def make(depth, point):
        return net.with_params(**point).with_depth(depth)
    return make


def pre_ln(beta, attention):
    return [Residual(LayerNorm(), attention, beta=beta),
            Residual(LayerNorm(), Dense(width_factor=2), Activation("relu"), Dense(weight_var=2.0), beta=beta)]


CASES = {
    # depth expressions in the branch weights, causal zero-score attention, final LayerNorm
    "pre_ln_depth_mup": (Network(block=pre_ln("a/sqrt(L)", Attention(heads=2, causal=True)), final=[LayerNorm()],
                                 depth=3, params={"a": 1.0}),
                         {"a": [0.3, 1.0, 4.0], "L": [1, 3, 8, 17]}, inputs.equicorrelated(6, 1.0, 0.2)),
    # tied scores (one softmax matrix per member), ALiBi, RMSNorm, dropout, scale by l
    "tied_alibi": (Network(block=[Residual(RMSNorm(gain="g"), Attention(heads=4, scores="tied", bias="alibi",
                                                                          qk_var="g*g"), beta="1/sqrt(L)"),
                                  Residual(LayerNorm(), Dense(width_factor=2), Activation("gelu"),
                                           Dense(weight_var=2.0), Dropout(0.1), beta="1/sqrt(L)"),
                                  Scale("1 + 0.01*l/L")],
                           depth=4, params={"g": 1.0}),
                   {"g": [0.5, 1.0, 2.0], "L": [2, 5, 9]}, inputs.equicorrelated(5, 1.0, 0.3)),
    # several sequences, a param in weight_var, bias variance, a parallel block with a weight-free branch
    "sequences_weight_var": (Network(block=[Parallel([LayerNorm(), Attention(heads=1, causal=True, values="identity",
                                                                             projection="identity")],
                                                     [LayerNorm(), Dense(weight_var="w", bias_var=0.1),
                                                      Activation("erf"), Dense(weight_var=2.0)],
                                                     alpha=1.0, betas=["0.5", "b"])],
                                     depth=3, params={"w": 1.0, "b": 0.5}),
                             {"w": [0.5, 1.5, 3.0], "L": [1, 4, 6]}, inputs.equicorrelated(4, 1.0, 0.1, sequences=3,
                                                                                             cross_rho=0.05)),
    # a gated MLP (SiLU: quadrature) with a swept gate variance
    "gated_silu": (Network(block=[Residual(RMSNorm(), Attention(heads=2, causal=True), beta="1/sqrt(L)"),
                                  Residual(RMSNorm(), GatedMLP("silu", gate_var="v", down_var=2.8), beta="1/sqrt(L)")],
                           depth=2, params={"v": 1.0}),
                   {"v": [0.5, 1.0, 2.0], "L": [1, 3, 6]}, inputs.equicorrelated(5, 1.0, 0.2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_batched_sweep_equals_the_run_of_every_grid_point(case, monkeypatch):
    net, grid, x = CASES[case]
    assert B.refusal(net) is None
    no_single_runs(monkeypatch)
    res = sweep(net, x, grid, measure=MEASURES)
    monkeypatch.undo()
    assert res.runs == sweep(net, x, grid, measure="q_mean", batch=False).runs
    exact = [m for m in MEASURES if m != "quad_error"]
    check_against_runs(res, network_model(net), grid, x, exact)
    # the error estimate: a member's own where every map is exact (0) or the batch shares its quadrature
    # rule; else the largest over its batch, still a bound (at least the member's own)
    own = {index: reference(network_model(net)(int(grid["L"][index[1]]), {list(grid)[0]: grid[list(grid)[0]][
        index[0]]}), x, "quad_error") for index in np.ndindex(*res.shape)}
    for index, e in own.items():
        assert res["quad_error"][index] >= e * (1 - 1e-12)
        assert res["quad_error"][index] <= max(own.values()) * (1 + 1e-12) + 1e-300


def test_a_batched_sweep_reads_the_output_after_each_members_final_layers(monkeypatch):
    net, grid, x = CASES["pre_ln_depth_mup"]
    no_single_runs(monkeypatch)
    res = sweep(net, x, grid, measure=["cos_mean", "q_mean"], at="output")
    monkeypatch.undo()
    check_against_runs(res, network_model(net), grid, x, ["cos_mean", "q_mean"], at="output")


def test_a_shared_depth_axis_is_read_from_each_members_deep_run(monkeypatch):
    """No L in the blocks: each param value is one deep run read at every depth, batched over the values."""
    net = Network(block=pre_ln("b", Attention(heads=2, causal=True, scores="tied")), depth=4, params={"b": 1.0})
    grid = {"b": [0.2, 0.7, 1.3], "L": [2, 4, 10]}
    x = inputs.equicorrelated(5, 1.0, 0.2)
    no_single_runs(monkeypatch)
    res = sweep(net, x, grid, measure=MEASURES)
    assert res.runs == 3
    monkeypatch.undo()
    check_against_runs(res, network_model(net), grid, x)


@pytest.mark.parametrize("beta", ["1", "1/sqrt(L)"])
def test_members_that_fail_leave_the_batch_with_the_message_of_their_own_run(beta, monkeypatch):
    """No normalisation: the variance explodes at the large weight variances, at a depth that depends on w
    (a shared depth run keeps the depths before the failure; a rerun depth fails whole)."""
    net = Network(block=[Dense(weight_var="w"), Activation("relu"), Scale(beta), Dense(weight_var=2.0)], depth=4,
                  params={"w": 1.0})
    x = inputs.equicorrelated(4, 1.0, 0.2)
    grid = {"w": [1.0, 1e3, 1e6], "L": [5, 30, 60]}
    no_single_runs(monkeypatch)
    batched = sweep(net, x, grid, measure="q_mean")
    monkeypatch.undo()
    single = sweep(net, x, grid, measure="q_mean", batch=False)
    assert batched.failures == single.failures and len(batched.failures) >= 1
    assert batched.runs == single.runs
    assert np.array_equal(np.isnan(batched["q_mean"]), np.isnan(single["q_mean"]))
    ok = ~np.isnan(single["q_mean"])
    assert np.allclose(batched["q_mean"][ok], single["q_mean"][ok], rtol=1e-12, atol=0)
    assert batched["q_mean"][0, 2] == pytest.approx(reference(net.with_depth(60), x, "q_mean"), rel=1e-12)


def test_batches_bounded_in_memory_give_the_same_grid(monkeypatch):
    net, grid, x = CASES["pre_ln_depth_mup"]
    whole = sweep(net, x, grid, measure=MEASURES)
    monkeypatch.setattr(B, "BATCH_BYTES", 5 * 16 * 8 * 36)        # five members per batch
    assert B.batch_size(6) == 5
    cut = sweep(net, x, grid, measure=MEASURES)
    for m in MEASURES:
        assert np.array_equal(whole[m], cut[m]), m


# ----------------------------------------------------------------------------------------------
# refusals and the fallback


@dataclass(frozen=True, eq=False)
class Halve(Layer):
    """A user layer without a batched map: Σ' = Σ/2 (its own rule takes one kernel)."""

    kind = "halve_for_batch_test"

    def kernel_map(self, s, ctx):
        assert s.sigma.ndim == 2, "called on a batch"
        return s.replace(sigma=0.5 * s.sigma, quad_error=0.5 * s.quad_error), lambda pi, grads: 0.5 * pi


def test_layers_that_cannot_batch_are_refused_by_name_and_run_one_by_one():
    x = inputs.equicorrelated(4, 1.0, 0.2)
    grid = {"b": [0.5, 2.0], "L": [2, 3]}
    standard = Network(block=pre_ln("b/sqrt(L)", Attention(heads=2, scores="standard", score_samples=4)), depth=2,
                       params={"b": 1.0})
    user = Network(block=pre_ln("b/sqrt(L)", Attention(heads=2)) + [Halve()], depth=2, params={"b": 1.0})
    unit = Network(block=[Residual(LayerNorm(), Dense(weight_var="unit"), Activation("relu"), Dense(weight_var=2.0),
                                   beta="b/sqrt(L)")], depth=2, params={"b": 1.0})
    assert "layer `attention`: scores = \"standard\"" in B.refusal(standard)
    assert "layer `halve_for_batch_test` has no batched kernel map" in B.refusal(user)
    assert "layer `dense`: weight_var = \"unit\"" in B.refusal(unit)
    shared = Network(block=pre_ln("b/sqrt(L)", Attention(heads=2)), depth=2, params={"b": 1.0}, shared_weights=True)
    assert "shared_weights" in B.refusal(shared)
    for net in (standard, user, unit):
        res = sweep(net, x, grid, measure=["cos_mean", "q_mean"])
        check_against_runs(res, network_model(net), grid, x, ["cos_mean", "q_mean"], rel=1e-15)


def test_a_batch_that_a_map_refuses_for_one_member_is_split_down_to_that_members_single_run(monkeypatch):
    """weight_var = 0 collapses two members' kernels to 0, and the LayerNorm after it raises for the whole batch:
    the batch is halved until those two run alone; they fail, as in the per-point sweep, the others stay
    batched."""
    net = Network(block=[Residual(Dense(weight_var="w"), LayerNorm(), Dense(), beta="1/sqrt(L)")], depth=2,
                  params={"w": 1.0})
    x = inputs.equicorrelated(4, 1.0, 0.2)
    grid = {"w": [0.5, 1.0, 0.0, 2.0], "L": [2, 3]}
    calls = []
    original = compute._execute

    def counted(job, *args):
        calls.append(job)
        return original(job, *args)

    monkeypatch.setattr(compute, "_execute", counted)
    res = sweep(net, x, grid, measure="cos_mean")
    assert sorted(job.network.params["w"] for job in calls) == [0.0, 0.0]       # 8 points: 6 batched, 2 alone
    monkeypatch.undo()
    single = sweep(net, x, grid, measure="cos_mean", batch=False)
    assert res.failures == single.failures and "zero variance" in res.failures[0]
    assert np.array_equal(res["cos_mean"], single["cos_mean"], equal_nan=True)
    assert np.isnan(res["cos_mean"][2]).all() and not np.isnan(res["cos_mean"][[0, 1, 3]]).any()


def test_batch_must_be_a_boolean():
    net, grid, x = CASES["pre_ln_depth_mup"]
    with pytest.raises(SpecError, match="batch"):
        sweep(net, x, grid, batch="yes")


# ----------------------------------------------------------------------------------------------
# expressions over a batch


@pytest.mark.parametrize("text", ["a/sqrt(L)", "(2*L)**0.25 * a", "exp(-a*l/L) + log(1 + L)", "max(a, 1/L, 0.3)",
                                  "min(abs(a - 1), tanh(l))", "sin(a)**2 + cos(pi*l/L)", "-a + e"])
def test_an_expression_over_a_batch_equals_its_value_per_member(text):
    e = expressions.parse(text, known=None)
    a = np.array([0.1, 0.7, 1.0, 3.5])
    depth = np.array([1.0, 4.0, 9.0, 100.0])
    got = e.over({"a": a, "L": depth, "l": 2.0})
    assert got.shape == (4,)
    for k in range(4):
        want = e({"a": float(a[k]), "L": float(depth[k]), "l": 2.0})
        assert got[k] == pytest.approx(want, rel=1e-15, abs=1e-300)
    assert e.over({"a": 0.5, "L": 3.0, "l": 2.0}) == e({"a": 0.5, "L": 3.0, "l": 2.0})   # no array: a number


def test_an_expression_undefined_at_one_member_names_that_member():
    e = expressions.parse("1/sqrt(L - 3)", "block.beta", known=None)
    with pytest.raises(SpecError, match=r"block.beta") as err:
        e.over({"L": np.array([4.0, 3.0, 9.0]), "l": 1.0})
    assert "L=3.0" in str(err.value)
    assert math.isfinite(e.over({"L": np.array([4.0, 9.0]), "l": 1.0})[1])


def test_members_report_progress_as_they_leave_the_batch_and_a_raising_callback_stops_the_sweep(monkeypatch):
    net, grid, x = CASES["pre_ln_depth_mup"]
    seen = []
    no_single_runs(monkeypatch)
    sweep(net, x, grid, measure="q_mean", progress=lambda done, total: seen.append((done, total)))
    assert seen == [(k, 12) for k in range(1, 13)]

    def stop(done, total):
        if done == 4:
            raise RuntimeError("stopped by the callback")

    with pytest.raises(RuntimeError, match="stopped by the callback"):
        sweep(net, x, grid, measure="q_mean", progress=stop)


def test_the_command_line_batches_by_default_and_no_batch_gives_the_same_file(tmp_path):
    from typer.testing import CliRunner

    from cli import app
    runner = CliRunner()
    args = ["sweep", "--preset", "depth_mup", "--tokens", "8", "--param", "L=1:50:5:log", "--param", "a=0.1:10:3:log",
            "--no-figure", "--no-cache"]
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "b.csv")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "batched: 15 run(s) as 1 propagation(s)" in res.stderr
    res = runner.invoke(app, [*args, "--no-batch", "-o", str(tmp_path / "n.csv")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "batched" not in res.stderr
    assert (tmp_path / "b.csv").read_bytes() == (tmp_path / "n.csv").read_bytes()
