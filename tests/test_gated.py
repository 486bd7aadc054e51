"""Gated MLP ``(φ(x W_g) ⊙ x W_u) W_d`` (SwiGLU, GeGLU, ReGLU), docs/theory.md §1.5.

Each wide-limit formula against an independent computation: 2-D adaptive quadrature (scipy dblquad)
of ``E[φ(g_i)φ(g_j)]``, the arc-cosine closed form for ReGLU (forward and backward), a brute-force
average over 10⁶ Gaussian draws; the whole layer against finite-width networks (forward, backward
and the three weight-gradient norms) under the Monte Carlo criterion of docs/theory.md §12.
"""

from dataclasses import dataclass

import numpy as np
import pytest
from scipy import integrate, stats
from scipy.special import expit, ndtr

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop import montecarlo as mc
from kernelprop import symbolic as S
from kernelprop.errors import NotSupportedError, NumericalError, SpecError
from kernelprop.kernel.maps import Context
from kernelprop.kernel.state import Dependence, KernelState
from kernelprop.montecarlo import sampler as MS
from kernelprop.network.layers import GatedMLP, LayerNorm, Network, Residual

EQ = I.equicorrelated(6, 1.0, 0.3)
TWO = I.equicorrelated(4, 1.0, 0.4, sequences=2, cross_rho=0.2)
SIGMA3 = np.array([[1.3, 0.4, -0.2], [0.4, 0.7, 0.3], [-0.2, 0.3, 1.1]])
VARS = dict(gate_var=1.4, up_var=0.8, down_var=1.7)

PHI = {"silu": lambda x: x * expit(x), "gelu": lambda x: x * ndtr(x), "relu": lambda x: max(x, 0.0)}


def _state(sigma, dep=None):
    sigma = np.asarray(sigma, dtype=float)
    return KernelState(sigma.copy(), np.zeros(len(sigma)), (len(sigma),), dep=dep)


def _gauss_pair(name, a, b, s):
    """``E[φ(u)φ(v)]``, ``(u, v) ~ N(0, [[a, s], [s, b]])``, by scipy's adaptive 2-D quadrature
    (``u = √a z₁``, ``v = √b (c z₁ + √(1 − c²) z₂)``; ReLU on the quadrant where both are positive)."""
    phi, c = PHI[name], s / np.sqrt(a * b)
    r = np.sqrt(1.0 - c * c)

    def f(z2, z1):
        return (phi(np.sqrt(a) * z1) * phi(np.sqrt(b) * (c * z1 + r * z2))
                * np.exp(-0.5 * (z1 * z1 + z2 * z2)) / (2 * np.pi))
    if name == "relu":
        return integrate.dblquad(f, 0.0, 12.0, lambda z1: -c * z1 / r, 12.0, epsabs=1e-12, epsrel=1e-11)[0]
    return integrate.dblquad(f, -12.0, 12.0, -12.0, 12.0, epsabs=1e-12, epsrel=1e-11)[0]


def _gauss_square(name, a):
    """``E[φ(u)²]``, ``u ~ N(0, a)``, by 1-D adaptive quadrature."""
    phi = PHI[name]
    return integrate.quad(lambda z: phi(np.sqrt(a) * z) ** 2 * stats.norm.pdf(z), -12.0, 12.0,
                          points=[0.0], epsabs=1e-13, epsrel=1e-12)[0]


# ----------------------------------------------------------------------------------------------
# the kernel against independent computations


@pytest.mark.parametrize("name", ["silu", "gelu", "relu"])
def test_kernel_is_the_gate_kernel_times_the_up_kernel_by_2d_quadrature(name):
    """``Σ'_ij = σ_d² E[φ(g_i)φ(g_j)] σ_u² Σ_ij``, ``g ~ N(0, σ_g² Σ)``: every entry of two 3×3 kernels
    (one near-collinear pair, c = 0.995) against dblquad."""
    near = np.array([[1.0, 0.995, 0.1], [0.995, 1.0, 0.12], [0.1, 0.12, 2.0]])
    for sigma in (SIGMA3, near):
        out, _ = GatedMLP(name, **VARS).kernel_map(_state(sigma), Context())
        g = VARS["gate_var"] * sigma
        ref = np.empty((3, 3))
        for i in range(3):
            ref[i, i] = _gauss_square(name, g[i, i])
            for j in range(i + 1, 3):
                ref[i, j] = ref[j, i] = _gauss_pair(name, g[i, i], g[j, j], g[i, j])
        ref *= VARS["down_var"] * VARS["up_var"] * sigma
        np.testing.assert_allclose(out.sigma, ref, rtol=1e-9, atol=1e-11)
        assert out.quad_error < 1e-9 and np.all(out.mean == 0) and out.gaussian


def _relu_pair(a, b, s):
    """Cho & Saul (2009) arc-cosine kernel of degree 1 and 0, written out here."""
    theta = np.arccos(np.clip(s / np.sqrt(a * b), -1, 1))
    k1 = np.sqrt(a * b) * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / (2 * np.pi)
    return k1, (np.pi - theta) / (2 * np.pi)


def test_reglu_forward_backward_and_gradient_norms_in_closed_form():
    """ReGLU: ``K = σ_g² J₁``, ``K' = J₀`` (arc-cosine), so Σ', Π_x and the three norms are closed forms."""
    vg, vu, vd = VARS["gate_var"], VARS["up_var"], VARS["down_var"]
    a = np.diag(SIGMA3)
    k1, k0 = _relu_pair(vg * a[:, None], vg * a[None, :], vg * SIGMA3)
    ctx = Context()
    ctx.path = "p"
    state = _state(SIGMA3).replace(width=1.5)
    out, back = GatedMLP("relu", width_factor=2.5, **VARS).kernel_map(state, ctx)
    np.testing.assert_allclose(out.sigma, vd * vu * k1 * SIGMA3, rtol=1e-13)
    np.testing.assert_allclose(np.diag(out.sigma), vd * vu * vg * a * a / 2, rtol=1e-13)
    pi = np.array([[1.0, 0.3, 0.1], [0.3, 0.8, -0.2], [0.1, -0.2, 1.2]])
    grads: list = []
    pi_x = back(pi, grads)
    pi_gate, pi_up = vu * vd * pi * SIGMA3 * k0, vd * pi * k1
    np.testing.assert_allclose(pi_x, vg * pi_gate + vu * pi_up, rtol=1e-13)
    norms = {path: v for path, kind, v in grads if kind == "dense"}
    np.testing.assert_allclose(norms["p/gate"], 1.5 * np.sum(SIGMA3 * pi_gate), rtol=1e-13)
    np.testing.assert_allclose(norms["p/up"], 1.5 * np.sum(SIGMA3 * pi_up), rtol=1e-13)
    np.testing.assert_allclose(norms["p/down"], 2.5 * np.sum(vu * k1 * SIGMA3 * pi), rtol=1e-13)
    assert out.width == 1.5


def test_swiglu_forward_and_backward_expectations_by_brute_force():
    """10⁶ draws of independent ``g ~ N(0, σ_g²Σ)``, ``u ~ N(0, σ_u²Σ)`` (3 tokens, seeded): the sample
    means of ``σ_d² h_i h_j`` (h = silu(g)·u) and of the backward integrand
    ``σ_d² Π_ij (σ_g² u_i u_j silu'(g_i) silu'(g_j) + σ_u² silu(g_i) silu(g_j))`` agree with the engine
    within 4.5 standard errors (Bonferroni over 12 entries at rate 1e-4)."""
    vg, vu, vd = VARS["gate_var"], VARS["up_var"], VARS["down_var"]
    rng = np.random.default_rng(20240613)
    chol = np.linalg.cholesky(SIGMA3)
    n = 10 ** 6
    g = np.sqrt(vg) * rng.standard_normal((n, 3)) @ chol.T
    u = np.sqrt(vu) * rng.standard_normal((n, 3)) @ chol.T
    sig = expit(g)
    phi, dphi = g * sig, sig * (1 + g * (1 - sig))
    pi = np.array([[1.0, 0.3, 0.1], [0.3, 0.8, -0.2], [0.1, -0.2, 1.2]])
    iu = np.triu_indices(3)
    h = phi * u
    fwd = vd * h[:, iu[0]] * h[:, iu[1]]
    bwd = vd * pi[iu] * (vg * (u * dphi)[:, iu[0]] * (u * dphi)[:, iu[1]] + vu * phi[:, iu[0]] * phi[:, iu[1]])
    out, back = GatedMLP("silu", **VARS).kernel_map(_state(SIGMA3), Context())
    pi_x = back(pi, [])
    k = stats.norm.isf(1e-4 / (2 * 12))
    for samples, engine in ((fwd, out.sigma[iu]), (bwd, pi_x[iu])):
        mean, se = samples.mean(axis=0), samples.std(axis=0, ddof=1) / np.sqrt(n)
        z = (mean - engine) / se
        assert np.all(np.abs(z) < k), z


# ----------------------------------------------------------------------------------------------
# against finite-width networks


def _pre_ln(act="silu", **kw):
    return Network(block=[Residual(LayerNorm(), GatedMLP(act, **kw), beta=0.7)], depth=2)


@pytest.mark.parametrize("x", [EQ, TWO], ids=["one_sequence", "two_sequences"])
def test_pre_ln_swiglu_block_agrees_with_the_monte_carlo_forward_and_backward(x):
    cmp, *_ = mc.check(_pre_ln(), x, 192, 16, gradients=True)
    assert cmp.n_tested > 200
    assert cmp.agree, (cmp.criterion(), cmp.failures[:3])


@pytest.mark.parametrize("init", ["gaussian", "orthogonal"])
def test_forward_by_projected_products_agrees_for_both_inits(init):
    """Forward only: the sampler draws ``X W`` in law (N < fan_in), Gaussian or scaled orthogonal weights."""
    net = Network(block=[Residual(LayerNorm(), GatedMLP("silu", init=init, down_var=2.8), beta=0.7)], depth=3)
    for x in (EQ, TWO):
        cmp, *_ = mc.check(net, x, 192, 16)
        assert cmp.agree, (init, x.segments, cmp.failures[:3])


def test_the_monte_carlo_check_rejects_a_backward_rule_without_the_gate_term():
    """The criterion has power here: dropping the gate path ``σ_g²σ_u² Π_h ⊙ Σ ⊙ K'`` from Π_x is caught."""

    @dataclass(frozen=True, eq=False)
    class UpPathOnly(GatedMLP):
        def kernel_map(self, s, ctx):
            out, back = super().kernel_map(s, ctx)
            return out, lambda pi, grads: back(pi, grads) - _gate_term(self, s.sigma, pi)

    net = Network(block=[Residual(LayerNorm(), UpPathOnly("silu"), beta=0.7)], depth=2)
    cmp, *_ = mc.check(net, EQ, 192, 16, gradients=True)
    assert cmp.parts["forward"].agree and not cmp.parts["gradients"].agree


def _gate_term(layer, sigma, pi):
    from kernelprop.kernel import activations as A
    kp_, _, _ = A.derivative_kernel(layer.activation, layer.gate_var * sigma)
    return layer.gate_var * layer.up_var * layer.down_var * pi * sigma * kp_


def test_each_weight_gradient_norm_agrees_with_real_backpropagation():
    """The three norms ``‖∂L/∂W‖²/d`` of gate, up and down separately (the check sums them per block):
    Richardson estimate from widths 256 and 128, 256 seeds each, Bonferroni over 3 at rate 0.01."""
    net = Network(block=[GatedMLP("gelu", gate_var=1.6, up_var=0.6, down_var=1.5, width_factor=2.0)], depth=1)
    x = I.equicorrelated(4, 1.2, 0.5)
    theory = {path.rsplit("/", 1)[1]: v for _, _, path, kind, v in kp.backpropagate(net, x).grads}
    seeds = 256
    sims = [mc.simulate_gradients(net, x, w, seeds, seed=s) for w, s in ((256, 11), (128, 12))]
    per = [{path.rsplit("/", 1)[1]: v for (_, _, path, _), v in sim.grad_samples.items()} for sim in sims]
    k = stats.t.isf(0.01 / 6, seeds - 1)
    assert set(theory) == set(per[0]) == {"gate", "up", "down"}
    for name, th in theory.items():
        a, b = per[0][name], per[1][name]
        est = (256 * a.mean() - 128 * b.mean()) / 128
        se = np.hypot(256 * a.std(ddof=1), 128 * b.std(ddof=1)) / np.sqrt(seeds) / 128
        assert abs(est - th) < k * se, (name, th, est, se)
        assert se < 0.03 * th       # each norm resolved to a few per cent


def test_plan_counts_three_weight_matrices_and_the_default_hidden_width():
    """Hidden width round(8/3 · d) by default (Llama); weights d·D + d·D + D·d per seed."""
    net = Network(block=[GatedMLP()], depth=1)
    p = MS.plan(net, 96, (6,), None, None, "explicit")
    assert p.weight_count == 3 * 96 * 256 and p.max_width == 256 and p.max_weight == 96 * 256
    y = mc.simulate(net, EQ, 96, 2)
    assert np.isfinite(y.kernels).all()


# ----------------------------------------------------------------------------------------------
# residual cross term, refusals, errors


def test_in_a_residual_branch_the_cross_term_vanishes():
    """Fresh W_d: ``y = x + β f(x)`` has ``Σ' = Σ + β² Σ_f`` exactly (ReGLU closed form for Σ_f)."""
    x = I.gram(SIGMA3)
    net = Network(block=[Residual(GatedMLP("relu", **VARS), beta=0.6)], depth=1)
    out = kp.propagate(net, x).kernels[-1]
    k1, _ = _relu_pair(VARS["gate_var"] * np.diag(SIGMA3)[:, None], VARS["gate_var"] * np.diag(SIGMA3)[None, :],
                       VARS["gate_var"] * SIGMA3)
    np.testing.assert_allclose(out, SIGMA3 + 0.36 * VARS["down_var"] * VARS["up_var"] * k1 * SIGMA3, rtol=1e-13)
    after, _ = GatedMLP("relu").kernel_map(_state(SIGMA3, dep=Dependence.identity(3)), Context())
    assert after.dep.kind == "zero"


def test_a_non_gaussian_input_is_accepted():
    """The gate and up projections are Gaussian given x: after a ReLU (mean ≠ 0) the map still holds;
    checked against the Monte Carlo."""
    from kernelprop.network.layers import Activation, Dense
    net = Network(block=[Dense(), Activation("relu"), GatedMLP("gelu", down_var=2.0)], depth=1)
    cmp, *_ = mc.check(net, EQ, 192, 16, gradients=True)
    assert cmp.agree, cmp.failures[:3]


def test_overflow_raises_a_numerical_error_naming_the_layer():
    ctx = Context()
    ctx.where = "block 1 · 0:gated_mlp"
    with pytest.raises(NumericalError, match="block 1 · 0:gated_mlp.*not finite"):
        GatedMLP("relu", gate_var=1e100, up_var=1e200, down_var=1e10).kernel_map(_state(SIGMA3), ctx)


def test_unknown_activation_and_parameter_are_spec_errors_naming_the_field():
    with pytest.raises(SpecError, match=r"gated_mlp\.activation = 'swish'.*unknown gate activation.*silu"):
        GatedMLP("swish")
    with pytest.raises(SpecError, match=r"gated_mlp\.params\.alpha"):
        GatedMLP("leaky_relu", params={"alpha": 0.1})
    with pytest.raises(SpecError, match=r"gated_mlp\.gate_var"):
        GatedMLP(gate_var=-1.0)
    with pytest.raises(SpecError, match=r"gated_mlp\.derivative.*only for a callable"):
        GatedMLP("silu", derivative=np.cos)


def test_a_callable_gate_agrees_with_the_monte_carlo():
    """φ(x) = sin(x) + x/2 (no closed form: quadrature) with its derivative, forward and backward."""
    def phi(x):
        return np.sin(x) + 0.5 * x

    def dphi(x):
        return np.cos(x) + 0.5
    net = Network(block=[Residual(LayerNorm(), GatedMLP(phi, derivative=dphi, down_var=1.5), beta=0.8)], depth=2)
    cmp, *_ = mc.check(net, EQ, 192, 16, gradients=True)
    assert cmp.agree, cmp.failures[:3]
    with pytest.raises(NotSupportedError, match="callable without derivative="):
        mc.simulate_gradients(Network(block=[GatedMLP(np.sin)], depth=1), EQ, 16, 2)


BASE = '\ndepth = 2\n[input]\nkind = "equicorrelated"\ntokens = 4\nrho = 0.4\n'


def test_toml_gated_mlp_loads_and_maps_as_the_python_description():
    spec = kp.loads(BASE + '[[block]]\ntype = "residual"\nbeta = 0.5\nlayers = [{ type = "rmsnorm" }, '
                    '{ type = "gated_mlp", activation = "leaky_relu", params = { slope = 0.2 }, '
                    'gate_var = "1/sqrt(L)", down_var = 2.0, width_factor = 4 }]\n')
    (_, _, blk), *_ = spec.network.layers()
    layer = blk.layers[0].branch.layers[1]
    assert isinstance(layer, GatedMLP) and layer.params == {"slope": 0.2} and layer.width_factor == 4
    assert layer.gate_var == pytest.approx(1 / np.sqrt(2))
    from kernelprop.network.layers import RMSNorm
    py = Network(block=[Residual(RMSNorm(), GatedMLP("leaky_relu", params={"slope": 0.2}, gate_var="1/sqrt(L)",
                                                     down_var=2.0), beta=0.5)], depth=2)
    np.testing.assert_array_equal(kp.propagate(spec.network, spec.inputs).kernels,
                                  kp.propagate(py, spec.inputs).kernels)


@pytest.mark.parametrize("table,field,words", [
    ('activation = "swish"', "block[0].activation", "unknown gate activation of gated_mlp"),
    ('activation = "relu"\nparams = { slope = 1 }', "block[0].params.slope", "not a parameter"),
    ("up_var = -2", "block[0].up_var", ">= 0"),
    ("hidden = 3", "block[0].hidden", "not a field of gated_mlp"),
])
def test_toml_errors_name_the_field(table, field, words):
    with pytest.raises(SpecError) as info:
        kp.loads(BASE + f'[[block]]\ntype = "gated_mlp"\n{table}\n')
    assert field in str(info.value) and words in str(info.value), str(info.value)


# ----------------------------------------------------------------------------------------------
# symbolic


@pytest.mark.parametrize("name", ["relu", "gelu"])
def test_symbolic_map_agrees_with_the_numeric_engine(name):
    net = Network(block=[Residual(LayerNorm(), GatedMLP(name, gate_var=1.3, up_var=0.7, down_var=1.9), beta=0.6)],
                  depth=3)
    x = I.equicorrelated(3, 1.0, 0.2)
    for bm in (S.block_map(net, mode="explicit", tokens=3), S.block_map(net)):
        np.testing.assert_allclose(S.evaluate(bm, x).kernels, kp.propagate(net, x).kernels, rtol=1e-11)


def test_symbolic_swiglu_is_refused_by_name_or_kept_opaque():
    net = Network(block=[Residual(LayerNorm(), GatedMLP("silu"), beta=0.6)], depth=2)
    with pytest.raises(NotSupportedError, match="layer `gated_mlp` has no symbolic map.*silu.*opaque=True"):
        S.block_map(net, mode="explicit", tokens=3)
    x = I.equicorrelated(3, 1.0, 0.2)
    bm = S.block_map(net, mode="explicit", tokens=3, opaque=True)
    np.testing.assert_allclose(S.evaluate(bm, x).kernels, kp.propagate(net, x).kernels, rtol=1e-10)
