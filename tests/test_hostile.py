"""Ordinary mistakes end in one line on stderr and exit 1/2, never a traceback (issue 14, items 7 and 8)."""

import numpy as np
import pytest
from typer.testing import CliRunner

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop.cli import app
from kernelprop.kernel.propagate import RecordPlan, check_memory
from kernelprop.network import expressions as E

runner = CliRunner()
WIDE = {"COLUMNS": "400"}
MLP = ('depth = 3\n[params]\nInteger = 2.0\n[input]\nkind = "equicorrelated"\ntokens = 4\nrho = 0.2\n'
       '[[block]]\ntype = "dense"\nweight_var = {w}\n[[block]]\ntype = "relu"\n')


def _clean(res, code):
    assert res.exit_code == code, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.parametrize("text,words", [
    ("10**10**10", "10**10**10"), ("2**1024", "range error"), ("min()", "min with 0 argument"),
    ("sqrt(1,2)", "sqrt with 2 argument"), ("(-1)**0.5", "domain error"), ("L**20000", "bounded by 10000"),
    ("1e400", "not a finite number"), ("9" * 1200, "at most 1000"), ("sqrt(-1)", "domain error"),
])
def test_bad_expressions_are_spec_errors_naming_the_field(text, words):
    with pytest.raises(kp.SpecError, match="block") as info:
        E.parse(text, "block[0].beta", known=None)
    assert words in str(info.value)


def test_expressions_evaluate_in_floats():
    assert E.parse("max(1)", known=None)({}) == 1.0
    assert E.parse("2**L + min(l, 3, 7)", known=None)({"L": 10, "l": 2}) == 1026.0
    assert E.parse("1/sqrt(L)", known=None)({"L": 4, "l": 1}) == 0.5
    with pytest.raises(kp.SpecError, match="x = 'sqrt\\(L - 5\\)'.*at L=4"):
        E.parse("sqrt(L - 5)", "x", known=None)({"L": 4, "l": 1})


@pytest.mark.parametrize("command", [["run"], ["symbolic"]])
@pytest.mark.parametrize("text,code", [("10**10**10", 2), ("2**1024", 2), ("min()", 2), ("sqrt(1,2)", 2),
                                       ("max(1)", 0), ("(-1)**0.5", 2)])
def test_expressions_from_the_issue_on_the_command_line(tmp_path, command, text, code):
    spec = tmp_path / "s.toml"
    spec.write_text(MLP.format(w=repr(text)))
    res = runner.invoke(app, [*command, str(spec)], env=WIDE)
    if code:
        _clean(res, code)
        assert "block[0].weight_var" in res.stderr
    else:
        assert res.exit_code == 0, res.output


def test_param_named_like_a_sympy_class_in_symbolic(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(MLP.format(w='"Integer / 2 + 1/2"'))
    res = runner.invoke(app, ["symbolic", str(spec)], env=WIDE)
    assert res.exit_code == 0, res.output
    # σ_w² = Integer/2 + 1/2 = 3/2 with Integer = 2: the ReLU block maps q to σ_w² q / 2 = 3q/4
    assert "Integer" in res.stdout
    from kernelprop import symbolic as S
    spec_ = kp.load(spec)
    q = np.einsum("rii->ri", S.evaluate(S.block_map(spec_.network), spec_.inputs).kernels).mean(axis=1)
    np.testing.assert_allclose(q, 0.75 ** np.arange(4), rtol=1e-14)      # the closed form, block by block


def test_output_path_mistakes(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    adir = tmp_path / "adir.json"
    adir.mkdir()
    for out, words in [(afile / "r.json", "is a file, not a directory"), (adir, "is a directory")]:
        res = runner.invoke(app, ["run", "vanilla", "-L", "2", "-o", str(out)], env=WIDE)
        _clean(res, 2)
        assert words in res.stderr and "--output" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.json", "afile"] and not list(adir.iterdir())


def test_unwritable_output_directory(tmp_path, monkeypatch):
    import os
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real(p, mode))
    res = runner.invoke(app, ["run", "vanilla", "-L", "2", "-o", str(ro / "r.json")], env=WIDE)
    _clean(res, 2)
    assert "not writable" in res.stderr and not list(ro.iterdir())


def test_binary_spec_and_deep_toml(tmp_path):
    binary = tmp_path / "b.toml"
    binary.write_bytes(b"\xff\xfe\x00\x01name")
    _clean(runner.invoke(app, ["run", str(binary)], env=WIDE), 2)
    deep = tmp_path / "d.toml"
    deep.write_text("x = " + "[" * 3000 + "]" * 3000 + "\n")
    res = runner.invoke(app, ["run", str(deep)], env=WIDE)
    _clean(res, 2)
    assert "nests too deeply" in res.stderr


def test_npz_gram_file(tmp_path):
    np.savez(tmp_path / "g.npz", a=np.eye(3))
    spec = tmp_path / "g.toml"
    spec.write_text('depth = 2\n[input]\nkind = "gram"\nfile = "g.npz"\n[[block]]\ntype = "relu"\n')
    res = runner.invoke(app, ["run", str(spec)], env=WIDE)
    _clean(res, 2)
    assert "input.file" in res.stderr and ".npy" in res.stderr
    with pytest.raises(kp.SpecError, match="input.matrix"):
        I.gram([["a", "b"], ["c", "d"]])


def test_compare_profile_measure_and_plot_position(tmp_path):
    res = runner.invoke(app, ["compare", "vanilla", "pre_ln", "-L", "3", "--measure", "cos_first"], env=WIDE)
    _clean(res, 2)
    assert "--measure = 'cos_first'" in res.stderr and "per-position profile" in res.stderr
    out = tmp_path / "v.json"
    assert runner.invoke(app, ["run", "vanilla", "-L", "2", "-o", str(out)]).exit_code == 0
    fig = tmp_path / "p.png"
    res = runner.invoke(app, ["plot", str(out), "-m", "cos_first", "--position", "999", "-o", str(fig)], env=WIDE)
    _clean(res, 2)
    assert "--position = 999" in res.stderr and not fig.exists()


def test_memory_estimate_refuses_before_any_work():
    s = kp.models.load("vanilla", depth=2)
    x = I.identity(64)
    plan = RecordPlan(s.network, "blocks", 1)
    # 8 N² (16 + 3 kept records) bytes for N = 64
    assert check_memory(s.network, x, plan, keep_kernels=True) == 8 * 64 * 64 * (16 + 3)
    assert check_memory(s.network, x, plan, keep_kernels=False, ntk=True) == 8 * 64 * 64 * 16 * 2
    with pytest.raises(kp.SpecError, match="tokens = 64: 64 tokens need about"):
        kp.propagate(s.network, x, memory_limit=10_000)


def test_bad_preset_knob_is_a_one_line_error():
    res = runner.invoke(app, ["gradients", "relu_mlp", "--tokens", "0"], env=WIDE)
    _clean(res, 2)
    assert "--tokens = 0" in res.stderr


def test_run_refuses_too_many_tokens_up_front(monkeypatch):
    # 8 · 20000² · 16 bytes ≈ 47.7 GiB of working kernels, more than half of a 16 GiB machine: refused
    # before the input kernel is built
    from kernelprop.montecarlo import sampler
    monkeypatch.setattr(sampler, "machine_memory", lambda: 16 * 2 ** 30)
    res = runner.invoke(app, ["run", "--preset", "noci", "--tokens", "20000"], env=WIDE)
    _clean(res, 2)
    assert "--tokens = 20000" in res.stderr and "47.7 GiB" in res.stderr and "8.0 GiB allowed" in res.stderr


@pytest.mark.parametrize("kind", ["identity", "equicorrelated"])
def test_spec_file_refuses_too_many_tokens_before_building_the_input(monkeypatch, tmp_path, kind):
    # 10000 tokens × 2 sequences: 8 · 20000² · 16 bytes ≈ 47.7 GiB, refused before the 3.2 GB input kernel exists
    from kernelprop.montecarlo import sampler
    monkeypatch.setattr(sampler, "machine_memory", lambda: 16 * 2 ** 30)
    built = []
    monkeypatch.setattr(I, kind, lambda *a, **k: built.append(a))
    f = tmp_path / "big.toml"
    f.write_text(f'[input]\nkind = "{kind}"\ntokens = 10000\nsequences = 2\n[[block]]\ntype = "dense"\n')
    res = runner.invoke(app, ["run", str(f)], env=WIDE)
    _clean(res, 2)
    assert "input.tokens = 20000" in res.stderr and "47.7 GiB" in res.stderr and not built


@pytest.mark.parametrize("raw", [
    {"input": {"kind": [1], "tokens": 3}, "block": [{"type": "dense"}]},
    {"input": {"kind": "identity", "tokens": 3}, "block": [{"type": [1]}]},
])
def test_a_list_where_a_kind_or_type_name_belongs_is_a_spec_error(raw):
    """Found by a longer fuzzer run: an unhashable `kind`/`type` raised TypeError."""
    from kernelprop.network.spec import from_dict
    with pytest.raises(kp.SpecError, match=r"input\.kind|block\[0\]\.type"):
        from_dict(raw)


@pytest.mark.parametrize("args,flag", [
    (["run", "pre_ln", "-L", "2", "--tokens", "8"], "--tokens = 8"),
    (["simulate", "relu_mlp", "-L", "2", "--rho", "0.3", "--width", "64"], "--rho = 0.3"),
    (["gradients", "pre_ln", "-L", "2", "--preset-scores", "tied"], "--preset-scores = 'tied'"),
    (["sweep", "pre_ln", "--param", "beta=1,2", "--bidirectional", "--no-figure"], "--causal/--bidirectional"),
])
def test_a_preset_option_given_with_a_spec_is_refused_not_ignored(args, flag):
    # before: silently ignored (the spec's own 32 tokens, rho, scores and mask were used)
    res = runner.invoke(app, args, env=WIDE)
    _clean(res, 2)
    assert flag in res.stderr and "sets its own" in res.stderr


def test_run_heads_with_a_spec_is_the_finite_prediction_not_a_refusal():
    args = ["run", "relu_mlp", "-L", "1", "--heads", "2", "--width", "16", "--samples", "2"]
    res = runner.invoke(app, args, env=WIDE)
    assert res.exit_code == 0, res.output


def test_run_heads_with_a_preset_is_the_presets_knob_not_the_finite_prediction():
    res = runner.invoke(app, ["run", "--preset", "pre_ln", "-L", "2", "--tokens", "8", "--heads", "2"], env=WIDE)
    assert res.exit_code == 0, res.output
    assert "finite prediction" not in res.stdout and "block 2" in res.stdout


def test_huge_heads_and_tokens_of_a_preset_are_refused_up_front():
    # before: numpy's "Maximum allowed dimension exceeded" traceback (found by the fuzzer)
    res = runner.invoke(app, ["run", "--preset", "pre_ln", "-L", "2", "--heads", "99999999999999999999"], env=WIDE)
    _clean(res, 2)
    assert "attention.heads" in res.stderr and "at most 65536" in res.stderr
    res = runner.invoke(app, ["gradients", "--preset", "vanilla", "-L", "2", "--tokens", "99999999999999999999"],
                        env=WIDE)
    _clean(res, 2)
    assert "--tokens = 99999999999999999999" in res.stderr


def test_a_depth_beyond_the_limit_is_refused_before_any_work():
    # before: gradients --depth 999999 grew to 21 GB building the backward tape (found by a 5000-example fuzz run)
    res = runner.invoke(app, ["gradients", "--preset", "vanilla", "--tokens", "4", "--depth", "999999"], env=WIDE)
    _clean(res, 2)
    assert "depth = 999999" in res.stderr and "at most 100000" in res.stderr
    with pytest.raises(kp.SpecError, match="at most 100000"):
        kp.Network(block=[kp.Dense()], depth=100_001)
    assert kp.Network(block=[kp.Dense()], depth=100_000).depth == 100_000
