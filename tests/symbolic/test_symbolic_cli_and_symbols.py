"""`kernelprop symbolic` end to end, and how spec numbers and expressions become sympy symbols."""

import numpy as np
import pytest
import sympy as sp
from typer.testing import CliRunner

import kernelprop as kp
from kernelprop import symbolic as S
from kernelprop.cli import app
from kernelprop.network import expressions
from kernelprop.network.layers import Attention, Dense, Network, Residual
from kernelprop.symbolic.symbols import L, Namespace, l, number, parse

runner = CliRunner()


def test_cli_prints_map_trajectory_c_map_and_fixed_points():
    res = runner.invoke(app, ["symbolic", "relu_mlp"])
    assert res.exit_code == 0, res.output
    for piece in ("1:activation  q' = q/2", "ρ' = (ρ*(π - acos(ρ)) + sqrt(1 - ρ**2))/π",
                  "trajectory: no closed form found", "but q_l = q₀", "χ = C'(1) = 1",
                  "1 − ρ_l ≈ 9*π**2/(2*l**2)", "ρ* = 1  [exact]  marginal"):
        assert piece in res.stdout, piece


def test_cli_latex_and_code(tmp_path):
    res = runner.invoke(app, ["symbolic", "relu_mlp", "--latex"])
    assert res.exit_code == 0 and r"\begin{align*}" in res.stdout and r"\chi = C'(1) &= 1" in res.stdout
    res = runner.invoke(app, ["symbolic", "relu_mlp", "--code"])
    assert res.exit_code == 0 and "def _lambdifygenerated(q, rho, l, L, T):" in res.stdout
    # the printed source is the function: run it and compare with the arc-cosine map
    space = {"numpy": np}
    exec(res.stdout, space)  # noqa: S102 - our own generated code
    q1, rho1, mu1 = space["_lambdifygenerated"](1.0, 0.3, 1, 100, 8)
    assert q1 == 1.0 and mu1 == pytest.approx(1 / np.sqrt(np.pi), rel=1e-15)
    assert rho1 == pytest.approx((np.sqrt(1 - 0.09) + (np.pi - np.arccos(0.3)) * 0.3) / np.pi, rel=1e-15)


def test_cli_turns_to_the_explicit_mode_for_causal_attention_and_solves_it_explicitly():
    res = runner.invoke(app, ["symbolic", "vanilla"])   # the (q, ρ) mode refuses: 3 tokens, with a note
    assert res.exit_code == 0, res.output
    assert "causal attention does not preserve equicorrelation" in res.stderr and "--explicit" in res.stderr
    assert "explicit kernel of 3 tokens" in res.stdout
    res = runner.invoke(app, ["symbolic", "vanilla", "--explicit", "3", "--depth", "4"])
    assert res.exit_code == 0, res.output
    assert "explicit kernel of 3 tokens" in res.stdout and "S_1_3' = (S_1_1 + S_1_2 + S_1_3)/3" in res.stdout


def test_cli_symbol_option_and_its_errors(tmp_path):
    spec = tmp_path / "noci.toml"
    spec.write_text('depth = 20\n[input]\nkind = "equicorrelated"\ntokens = 8\n'
                    '[[block]]\ntype = "residual"\nbeta = "1/sqrt(L)"\nlayers = [{ type = "attention" }]\n')
    res = runner.invoke(app, ["symbolic", str(spec), "-s", "beta", "-s", "value_var=s_v"])
    assert res.exit_code == 0, res.output
    assert "symbol β = block[0].beta = 1/sqrt(L)" in res.stdout
    assert "m' = m*(β**2*s_v + 1)   ⇒   m_l = m₀*(β**2*s_v + 1)**l" in res.stdout
    assert "χ = C'(1) = 1/(β**2*s_v + 1)" in res.stdout
    res = runner.invoke(app, ["symbolic", str(spec), "-s", "gain"])
    assert res.exit_code == 2 and "matches no numeric field" in res.output
    res = runner.invoke(app, ["symbolic", str(spec), "-s", "beta=L"])
    assert res.exit_code == 2 and "reserved" in res.output


def test_expressions_parse_to_exact_sympy():
    names = {"L": L, "l": l, "b": sp.Symbol("b", real=True)}
    assert parse("b/sqrt(L) + l/100", names) == names["b"] / sp.sqrt(L) + l / 100
    assert (parse("0.1*max(1, abs(b)) + e**2 - pi", names)
            == sp.Rational(1, 10) * sp.Max(1, sp.Abs(names["b"])) + sp.E ** 2 - sp.pi)
    assert number(2.0) == 2 and number(0.005) == sp.Rational(1, 200) and isinstance(number(1 / 3), sp.Float)
    # every function of the expression language has a sympy counterpart
    for name in expressions.FUNCTIONS:
        assert parse(f"{name}(L, l)" if name in ("min", "max") else f"{name}(L)", names) is not None


def test_field_selection_names_duplicates_and_skips_unused_fields():
    net = Network(block=[Residual(Attention(), beta=0.5), Residual(Dense(1.0), Dense(2.0, width_factor=4), beta="1/L")],
                  depth=3)
    ns = Namespace(net, ["beta", "weight_var", "block[1].layers[1].bias_var=b2"])
    chosen = {str(sym): path for sym, (path, _) in ns.chosen.items()}
    # attention.beta is inactive for matrix = "softmax", so only the residual weights are chosen
    assert chosen == {"beta_1": "block[0].beta", "beta_2": "block[1].beta",
                      "sigma_w2_1": "block[1].layers[0].weight_var", "sigma_w2_2": "block[1].layers[1].weight_var",
                      "b2": "block[1].layers[1].bias_var"}
    with pytest.raises(kp.SpecError, match="matches no numeric field"):   # Monte Carlo only: not in the map
        Namespace(net, ["block[1].layers[1].width_factor"])


def test_explicit_mode_rejects_large_token_counts():
    with pytest.raises(kp.SpecError, match="small T"):
        S.block_map(Network(block=[Attention()], depth=1), mode="explicit", tokens=40)
