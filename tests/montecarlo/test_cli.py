"""`kernelprop simulate` and `kernelprop check` end to end (typer CliRunner)."""

import json

import numpy as np
from typer.testing import CliRunner

from kernelprop.cli import app

runner = CliRunner()


def test_simulate_writes_means_and_standard_errors_in_every_format(tmp_path):
    base = ["simulate", "vanilla", "-L", "3", "--width", "64", "--seeds", "4"]
    js, cs, nz = tmp_path / "s.json", tmp_path / "s.csv", tmp_path / "s.npz"
    res = runner.invoke(app, base + ["-o", str(js)])
    assert res.exit_code == 0, res.output
    assert "cos mean" in res.stdout and "±" in res.stdout and "dong residual" in res.stdout
    data = json.loads(js.read_text())
    assert [r["label"] for r in data["records"]] == ["input", "block 1", "block 2", "block 3"]
    rec = data["records"][-1]
    assert {"cos_mean", "cos_mean_se", "dong_residual", "dong_residual_se", "mean_se"} <= set(rec)
    assert data["simulation"]["width"] == 64 and data["simulation"]["seeds"] == 4
    assert runner.invoke(app, base + ["--no-dong", "-o", str(cs)]).exit_code == 0
    header, *rows = cs.read_text().splitlines()
    assert header == "record,label,block,measure,position,value"
    assert any(r.startswith("3,block 3,3,q_mean_se,,") for r in rows)
    assert runner.invoke(app, base + ["--init", "orthogonal", "-o", str(nz)]).exit_code == 0
    z = np.load(nz)
    assert z["kernels"].shape == z["measure_kernel_se"].shape == (4, 32, 32)
    np.testing.assert_allclose(z["kernels"][0], np.eye(32), atol=1e-13)      # exact inputs: Σ⁰ = I


def test_check_agrees_on_a_bundled_example_and_prints_the_criterion():
    res = runner.invoke(app, ["check", "pre_ln", "-L", "4", "--width", "128", "--seeds", "16"])
    assert res.exit_code == 0, res.output
    assert "AGREE" in res.stdout and "Bonferroni" in res.stdout and "Richardson" in res.stdout
    res = runner.invoke(app, ["check", "relu_mlp", "-L", "3", "--width", "64", "--seeds", "8", "--all"])
    assert res.exit_code == 0, res.output
    assert "info" in res.stdout and "eig_ratio" in res.stdout          # non-smooth measures shown, not judged


def test_presets_run_through_simulate_and_check_like_specs(tmp_path):
    """`--preset NAME` builds the same network as `presets.build`: the simulation's input record is the
    preset's equicorrelated input, and check judges theory against it (a wrong preset knob is exit 2)."""
    out = tmp_path / "s.json"
    res = runner.invoke(app, ["simulate", "--preset", "sas", "-L", "2", "--tokens", "6", "--rho", "0.3",
                              "--width", "32", "--seeds", "4", "--no-dong", "-o", str(out)])
    assert res.exit_code == 0, res.output
    first = json.loads(out.read_text())["records"][0]
    assert abs(first["cos_mean"] - 0.3) < 1e-12 and abs(first["q_mean"] - 1.0) < 1e-12   # exact inputs
    res = runner.invoke(app, ["check", "--preset", "noci", "-L", "3", "--tokens", "6", "--heads", "1",
                              "--bidirectional", "--width", "64", "--seeds", "8", "--gradients"])
    assert res.exit_code == 0, res.output
    assert "AGREE" in res.stdout and "gradients" in res.stdout
    res = runner.invoke(app, ["check", "--preset", "noci", "--set", "bogus=1", "-L", "2", "--tokens", "6"])
    assert res.exit_code == 2 and "bogus" in res.output
    res = runner.invoke(app, ["check", "pre_ln", "--preset", "noci"])
    assert res.exit_code == 2 and "either a spec" in res.output


def test_check_exits_3_when_the_finite_width_bias_is_not_removed(tmp_path):
    """Tied attention with a large score scale is biased by O(1/d); without the Richardson pair the
    raw width-32 means disagree with the infinite-width theory — exit code 3."""
    spec = tmp_path / "tied.toml"
    spec.write_text('depth = 1\n[input]\nkind = "equicorrelated"\ntokens = 8\nrho = 0.2\n'
                    '[[block]]\ntype = "attention"\nscores = "tied"\nqk_var = 6.0\n'
                    'values = "identity"\nprojection = "identity"\n')
    res = runner.invoke(app, ["check", str(spec), "--width", "32", "--seeds", "256", "--no-extrapolate"])
    assert res.exit_code == 3, res.output
    assert "DISAGREE" in res.stdout
    res = runner.invoke(app, ["check", str(spec), "--width", "64", "--seeds", "256"])
    assert res.exit_code == 0, res.output


def test_bad_input_exits_2_with_a_message():
    res = runner.invoke(app, ["simulate", "vanilla", "--width", "16", "--seeds", "2"])
    assert res.exit_code == 2 and "33 features for the 32 tokens" in res.output
    res = runner.invoke(app, ["simulate", "vanilla", "--seeds", "0"])
    assert res.exit_code == 2 and "--seeds" in res.output
    res = runner.invoke(app, ["check", "vanilla", "--scores", "standard"])
    assert res.exit_code == 2 and "set scores" in res.output
    res = runner.invoke(app, ["simulate", "vanilla", "-L", "1", "--width", "64", "-S", "2", "-o", "x.txt"])
    assert res.exit_code == 2 and "extension" in res.output
    res = runner.invoke(app, ["check", "vanilla", "--width", "40", "--seeds", "4"])   # the d/2 run is too narrow
    assert res.exit_code == 2 and "bias correction also simulates width 20" in res.output
    res = runner.invoke(app, ["check", "vanilla", "--seeds", "1"])
    assert res.exit_code == 2 and ">= 2" in res.output
