"""The symbolic maps, lambdified, reproduce the numeric engine (kernelprop.propagate) to 1e-12.

Every bundled example is either reduced to (q, ρ) and checked, or refused with the reason listed
here, so a new example (or a new layer without a symbolic map) makes this file fail until someone
decides which it is.
"""

import copy
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop import symbolic as S
from kernelprop.network.layers import (
    Activation,
    Attention,
    Dense,
    Dropout,
    LayerNorm,
    Network,
    Parallel,
    Residual,
    RMSNorm,
)
from kernelprop.network.spec import from_dict

EXAMPLES = sorted((Path(kp.__file__).parent / "examples").glob("*.toml"))
CAUSAL = "causal attention does not preserve equicorrelation"
STANDARD = "standard 1/sqrt(d_k) scores stay random"
REFUSED = {  # example -> why the (q, ρ) mode refuses it (the causal three are checked in the explicit mode below)
    "parallel": CAUSAL,
    "pre_ln": CAUSAL,
    "vanilla": CAUSAL,
    "bert": STANDARD,        # the real-model examples use real models' independent Q, K at 1/sqrt(d_k)
    "gpt2": STANDARD,
    "llama": STANDARD,
    "torch_encoder": STANDARD,
    "torch_encoder_cloned": "shared_weights = true",
}
RTOL = 1e-12


def assert_agree(sym, ref):
    """|ΔΣ_ij| ≤ 1e-12 sqrt(Σ_ii Σ_jj) at every record, means to 1e-12 of their scale."""
    assert sym.labels == ref.labels
    d = np.sqrt(np.einsum("kii->ki", ref.kernels))
    scale = d[:, :, None] * d[:, None, :]
    err = np.abs(sym.kernels - ref.kernels) / scale
    assert err.max() <= RTOL, (f"max relative difference {err.max():.3g} "
                               f"at record {ref.labels[np.argmax(err.max((1, 2)))]}")
    np.testing.assert_allclose(sym.means, ref.means, rtol=RTOL, atol=RTOL * max(1.0, np.abs(ref.means).max()))


def run_both(net, x, **kw):
    bm = S.block_map(net, input_mean_zero=not np.any(x.mean), **kw)
    return bm, S.evaluate(bm, x), kp.propagate(net, x)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_bundled_example_agrees_or_is_refused_with_its_reason(path):
    spec = kp.load(path)
    try:
        bm = S.block_map(spec.network)
    except kp.NotSupportedError as exc:
        assert path.stem in REFUSED, f"{path.stem} is refused but not listed in REFUSED: {exc}"
        assert REFUSED[path.stem] in str(exc)
        return
    assert path.stem not in REFUSED, f"{path.stem} now reduces to (q, ρ): remove it from REFUSED"
    assert_agree(S.evaluate(bm, spec.inputs), kp.propagate(spec.network, spec.inputs))


def with_tokens(name, t):
    raw = copy.deepcopy(kp.load(Path(kp.__file__).parent / "examples" / f"{name}.toml").raw)
    raw["input"]["tokens"] = t
    return from_dict(raw)


@pytest.mark.parametrize("name,t", [("vanilla", 3), ("vanilla", 4), ("pre_ln", 3), ("pre_ln", 4), ("parallel", 3)])
def test_explicit_mode_handles_causal_examples_exactly(name, t):
    """Causal uniform and causal tied attention, LayerNorm, ReLU and GELU MLPs: T×T sympy matrices."""
    spec = with_tokens(name, t)
    bm = S.block_map(spec.network, mode="explicit", tokens=t)
    assert_agree(S.evaluate(bm, spec.inputs), kp.propagate(spec.network, spec.inputs))


def test_every_layer_map_in_the_equicorrelated_mode():
    """Means through ReLU/RMSNorm/LayerNorm centring, biases, dropout, every closed-form activation,
    tied bidirectional softmax, shaped and Value-SkipInit matrices, weight-free parallel branches."""
    x = I.equicorrelated(6, 1.3, 0.2)
    mlp = [Dense(1.5, 0.3), Activation("relu"), RMSNorm(gain=1.2, eps=0.1), Dense(2.0), Activation("abs", scale=0.7),
           LayerNorm(gain=0.9, eps=0.05), Dense(1.0, 0.2), Activation("leaky_relu", {"slope": 0.2}), Dropout(0.1),
           Dense(1.0), Activation("erf", {"a": 0.8}), Dense(1.3, 0.1), Activation("gelu")]
    assert_agree(*run_both(Network(block=mlp, depth=4), x)[1:])
    mixing = [Residual(Dense(1.0), Activation("relu"), Dense(2.0), alpha=0.8, beta=0.6),
              Residual(Attention(values="identity", projection="identity"), beta=0.5),
              Residual(LayerNorm(), Attention(matrix="shaped", values="identity", projection="identity", beta=0.7,
                                              gamma=0.4), beta=0.3),
              Parallel([LayerNorm(), Attention(scores="tied", qk_var=0.7, heads=2)],
                       [Dense(1.0), Activation("relu"), Dense(2.0)],
                       [Attention(matrix="value_skipinit", beta=0.5, values="identity", projection="identity")],
                       alpha=0.9, betas=[0.3, "1/sqrt(L)", 0.2]),
              LayerNorm()]
    assert_agree(*run_both(Network(block=mixing, depth=6), x)[1:])


def test_a_nonzero_mean_enters_the_state_and_the_cross_terms():
    """A ReLU stem leaves a mean μ; weight-free mixing carries it and RMSNorm rescales it, so (q, ρ, μ)."""
    x = I.equicorrelated(5, 1.0, 0.3)
    net = Network(block=[Residual(Attention(values="identity", projection="identity"), beta=0.5), RMSNorm()],
                  depth=5, stem=[Dense(1.0), Activation("relu")], final=[LayerNorm()])
    bm, sym, ref = run_both(net, x)
    assert bm.state == (S.symbols.q, S.symbols.rho, S.symbols.mu)
    assert_agree(sym, ref)


def test_explicit_mode_with_several_sequences_alibi_and_shaped_attention():
    s = np.array([[1.0, 0.3, 0.2, 0.1], [0.3, 1.2, 0.0, 0.1], [0.2, 0.0, 1.1, 0.5], [0.1, 0.1, 0.5, 1.0]])
    x = I.gram(s, sequences=(2, 2))
    net = Network(block=[Residual(LayerNorm(), Attention(causal=True, bias="alibi", heads=2), beta=0.5),
                         Residual(Attention(matrix="shaped", causal=True, values="identity", projection="identity",
                                            beta=0.8, gamma=0.5)),
                         Residual(Dense(1.0), Activation("gelu"), Dense(1.0), beta=0.3)], depth=3)
    assert_agree(*run_both(net, x, mode="explicit", tokens=(2, 2))[1:])


def test_a_branch_through_rmsnorm_and_mixing_keeps_its_exact_cross_term():
    """Residual(RMSNorm, weight-free causal mixing): the branch is linear in x after the row scaling, so the
    cross term of the sum is exact in both engines (the RMSNorm passes the dependence on)."""
    s = np.array([[1.0, 0.3, 0.2, 0.1], [0.3, 1.5, 0.0, 0.1], [0.2, 0.0, 0.8, 0.5], [0.1, 0.1, 0.5, 1.2]])
    net = Network(block=[Residual(RMSNorm(gain=0.8, eps=0.1), Attention(causal=True, values="identity",
                                                                         projection="identity"), alpha=0.9, beta=0.7)],
                  depth=2)
    assert_agree(*run_both(net, I.gram(s), mode="explicit", tokens=4)[1:])


def test_noci_closed_form_trajectory_matches_the_engine_at_depth_50():
    """THEORY §4: x = q(1−ρ) is invariant and the mean entry m grows by (1 + β²σ_v²) per block."""
    spec = kp.loads("""
        depth = 50
        [params]
        sv = 1.7
        [input]
        kind = "equicorrelated"
        tokens = 10
        q = 1.3
        rho = 0.2
        [[block]]
        type = "residual"
        beta = "1/sqrt(L)"
        layers = [{ type = "attention", value_var = "sv", out_var = 0.5 }]
    """)
    d = S.derive(spec)
    assert d.trajectory.found
    (_, x_l, _), (_, m_l, _) = d.trajectory.coordinates["x"], d.trajectory.coordinates["m"]
    L, sv = sp.Symbol("L", integer=True, positive=True), sp.Symbol("sv", real=True)
    x0, m0 = sp.symbols("x_0 m_0", real=True)
    assert sp.simplify(x_l - x0) == 0
    assert sp.simplify(m_l - m0 * (1 + sv / (2 * L)) ** S.symbols.l) == 0       # β²σ_v²σ_o² = sv/(2L)
    names = [S.symbols.l, S.symbols.L, S.symbols.T, sp.Symbol("sv", real=True),
             sp.Symbol("q_0", positive=True), sp.Symbol("rho_0", real=True)]
    q_l = sp.lambdify(names, d.trajectory.solution["q"])
    rho_l = sp.lambdify(names, d.trajectory.solution["rho"])
    ref = kp.propagate(spec.network, spec.inputs)
    l = np.arange(51.0)
    np.testing.assert_allclose(q_l(l, 50, 10, 1.7, 1.3, 0.2), ref.kernels[:, 0, 0], rtol=RTOL)
    np.testing.assert_allclose(rho_l(l, 50, 10, 1.7, 1.3, 0.2), ref.kernels[:, 0, 1] / ref.kernels[:, 0, 0], rtol=RTOL)


def test_general_skip_weight_scales_the_centred_part_by_alpha_squared():
    net = Network(block=[Residual(Attention(), alpha="a", beta="b")], depth=30, params={"a": 0.9, "b": 0.5})
    d = S.derive(net, I.equicorrelated(7, 1.0, 0.4))
    a, b = sp.Symbol("a", real=True), sp.Symbol("b", real=True)
    x0, m0 = sp.symbols("x_0 m_0", real=True)
    assert sp.simplify(d.trajectory.coordinates["x"][1] - x0 * (a ** 2) ** S.symbols.l) == 0
    assert sp.simplify(d.trajectory.coordinates["m"][1] - m0 * (a ** 2 + b ** 2) ** S.symbols.l) == 0


def test_explicit_closed_form_of_causal_residual_attention_matches_the_engine():
    """A linear map on the T(T+1)/2 kernel entries: solved by the matrix power, checked at depth 20."""
    x = I.gram(np.array([[1.0, 0.2, 0.1], [0.2, 0.8, 0.3], [0.1, 0.3, 1.2]]))
    net = Network(block=[Residual(Attention(causal=True, value_var=0.8), beta=0.5)], depth=20)
    d = S.derive(net, x, mode="explicit")
    assert d.trajectory.found
    ref = kp.propagate(net, x)
    init = {sp.Symbol(f"S_{i + 1}_{j + 1}_0", **({"positive": True} if i == j else {"real": True})): x.sigma[i, j]
            for i in range(3) for j in range(i, 3)}
    for name, e in d.trajectory.solution.items():
        i, j = (int(v) - 1 for v in name.split("_")[1:])
        f = sp.lambdify(S.symbols.l, e.xreplace(init))
        np.testing.assert_allclose(f(np.arange(21.0)), ref.kernels[:, i, j], rtol=RTOL)


def test_activation_without_closed_form_is_refused_or_kept_opaque():
    x = I.equicorrelated(5, 1.0, 0.3)
    net = Network(block=[Dense(1.5, 0.1), Activation("tanh"),
                         Residual(Dense(1.0), Activation("silu"), Dense(1.0), beta=0.5)], depth=4)
    with pytest.raises(kp.NotSupportedError, match=r"block\[1\] \(activation\): activation 'tanh' has no closed-form"):
        S.block_map(net)
    bm, sym, ref = run_both(net, x, opaque=True)
    # the opaque functions call the engine's own quadrature, so they agree far below its error estimate
    assert np.abs(sym.kernels - ref.kernels).max() <= max(1e-13, ref["quad_error"].max())


def test_depth_dependent_expressions_and_chosen_symbols_evaluate_per_block():
    x = I.equicorrelated(4, 1.0, 0.1)
    net = Network(block=[Residual(LayerNorm(), Attention(value_var="1 + l/10"), beta="1/sqrt(L) + l/100"),
                         Residual(Dense(1.0), Activation("relu"), Dense("w"), beta=0.5)], depth=7, params={"w": 2.0})
    bm, sym, ref = run_both(net, x, symbols=["beta", "value_var=s_v"])
    assert {str(s) for s in bm.namespace.chosen} == {"beta_1", "beta_2", "s_v"}
    assert_agree(sym, ref)
