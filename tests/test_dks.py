"""Activations in the DKS/TAT form ``γ(φ(αx + β) + δ)`` and the DKS/TAT parameter solver (docs/dks.md).

* The layer's kernel map, mean and backward rule against adaptive Gauss–Kronrod quadrature
  (scipy ``quad``, split at the kinks) and against the Monte Carlo, forward and backward; TOML
  loading, validation, the non-zero output mean, the symbolic map.
* The solver: each solved transform re-measured through the engine's own ``Activation`` layer
  (q-map, C-map, backward rule), compared with the published values of the reference
  implementation of Martens et al. (2021) / Zhang et al. (2022), and refusals of infeasible targets.
"""

import math

import numpy as np
import pytest
from scipy import integrate

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop import montecarlo as mc
from kernelprop import symbolic as S
from kernelprop.errors import NotSupportedError, SpecError
from kernelprop.kernel.activations import ACTIVATIONS
from kernelprop.kernel.maps import Context
from kernelprop.kernel.state import KernelState
from kernelprop.network.layers import Activation, Dense, Network

SIGMA = np.array([[1.3, 0.5], [0.5, 0.8]])
LIM = 12.0  # integration range in standard deviations (the Gaussian tail beyond is < 1e-32)


def _elu(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0.0)))


def _delu(x):
    return np.where(x > 0, 1.0, np.exp(np.minimum(x, 0.0)))


def _normal_pdf(z):
    return np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _quad(f, points=()):
    pts = sorted(p for p in points if -LIM < p < LIM)
    val, _ = integrate.quad(f, -LIM, LIM, points=pts or None, epsabs=1e-14, epsrel=1e-13, limit=400)
    return val


def gauss_pair(f, g, a, b, s, kinks=()):
    """``E[f(u) g(v)]`` for ``(u, v) ~ N(0, [[a, s], [s, b]])`` by nested adaptive quadrature:
    ``u = √a z₁``, ``v = (s/√a) z₁ + r z₂``, each integral split where its argument crosses a kink."""
    ra = math.sqrt(a)
    c = s / ra
    r = math.sqrt(max(b - c * c, 0.0))

    def inner(z1):
        fu = f(ra * z1)
        if r == 0.0:
            return fu * g(c * z1)
        return fu * _quad(lambda z2: g(c * z1 + r * z2) * _normal_pdf(z2), [(k - c * z1) / r for k in kinks])
    return _quad(lambda z1: inner(z1) * _normal_pdf(z1), [k / ra for k in kinks] + [k / c for k in kinks if c])


def gauss_mean(f, a, kinks=()):
    ra = math.sqrt(a)
    return _quad(lambda z: f(ra * z) * _normal_pdf(z), [k / ra for k in kinks])


# name, params, (γ, α, β, δ), kinks of φ in its argument, derivative of a callable
CASES = {
    "tanh-shifted": ("tanh", {}, (1.7, 0.6, 0.4, -0.3), (), None),
    "softplus-shifted": ("softplus", {}, (2.0, 0.3, 0.7, -1.1), (), None),
    "erf-closed": ("erf", {"a": 0.8}, (1.3, 0.6, 0.0, -0.3), (), None),
    "gelu-closed-negative-alpha": ("gelu", {}, (1.1, -1.4, 0.0, 0.2), (), None),
    "relu-closed": ("relu", {}, (1.1, 0.9, 0.0, 0.2), (0.0,), None),
    "leaky-shifted": ("leaky_relu", {"slope": 0.2}, (0.9, 1.3, -0.5, 0.1), (0.0,), None),
    "elu-callable-shifted": (_elu, {}, (1.2, 0.8, 0.3, -0.2), (0.0,), _delu),
}


def _layer(case):
    name, params, (g, a, b, d), _, deriv = CASES[case]
    return Activation(name, params, scale=g, input_scale=a, input_shift=b, offset=d, derivative=deriv)


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_mean_and_backward_rule_against_adaptive_quadrature(case):
    """Σ', m' and the backward rule's ``γ²α² E[φ'φ']`` on a 2-token Σ, against scipy quad of the
    transformed φ̂ itself. Closed forms and smooth quadrature agree to ≤ 1e-10; a kinked φ with a
    shift (β ≠ 0) to within the error estimate the engine reports (the kink splitting of the
    quadrature makes that small; without it Gauss–Hermite converges algebraically)."""
    layer = _layer(case)
    _, _, (g, a, b, d), kinks, _ = CASES[case]
    phi, dphi = layer.pointwise(), layer.derivative_fn()
    moved = [(k - b) / a for k in kinks]

    def f(x):
        return g * (phi(a * x + b) + d)

    def df(x):
        return g * a * dphi(a * x + b)
    out, back = layer.kernel_map(KernelState(SIGMA, np.zeros(2), (2,)), Context())
    pi = back(np.ones((2, 2)), {})
    _, _, dk_err = layer.inner_derivative_kernel(SIGMA)
    smooth = not kinks or (b == 0.0 and not callable(layer.name))
    tol, dtol = (1e-10, 1e-10) if smooth else (max(out.quad_error, 1e-10), max((g * a) ** 2 * dk_err, 1e-10))
    for i, j in [(0, 0), (0, 1), (1, 1)]:
        ref = gauss_pair(f, f, SIGMA[i, i], SIGMA[j, j], SIGMA[i, j], moved)
        assert abs(out.sigma[i, j] - ref) <= tol, (i, j, out.sigma[i, j], ref, tol)
        dref = gauss_pair(df, df, SIGMA[i, i], SIGMA[j, j], SIGMA[i, j], moved)
        assert abs(pi[i, j] - dref) <= dtol, (i, j, pi[i, j], dref, dtol)
    for i in range(2):
        assert abs(out.mean[i] - gauss_mean(f, SIGMA[i, i], moved)) <= tol
    assert not out.gaussian   # φ̂ of a Gaussian is not Gaussian (the identity is the exception)


EQ = I.equicorrelated(6, 1.0, 0.3)
TWO = I.equicorrelated(4, 1.0, 0.4, sequences=2, cross_rho=0.2)


@pytest.mark.parametrize("case", ["tanh-shifted", "gelu-closed-negative-alpha", "leaky-shifted"])
def test_transformed_activation_agrees_with_the_monte_carlo_forward_and_backward(case):
    """Kernel entries, means (non-zero here: δ and β move them), gradient kernels and parameter-gradient
    norms of Dense → φ̂ → Dense, within the Bonferroni criterion of ``montecarlo.check`` (seeded)."""
    net = Network(block=[Dense(), _layer(case), Dense()], depth=2)
    for x in (EQ, TWO):
        cmp, *_ = mc.check(net, x, 192, 16, gradients=True, seed=7, record="sublayers")
        assert cmp.n_tested > 100
        assert cmp.agree, (case, x.segments, cmp.criterion(), cmp.failures[:3])


def test_output_mean_is_carried_and_a_following_activation_waits_for_a_dense_layer():
    """``m' = γ(E[φ(αu + β)] + δ)`` is non-zero, so the state says so: a second activation right after
    is refused, after a Dense layer it runs."""
    shifted = Activation("tanh", scale=1.5, input_scale=0.7, input_shift=0.4, offset=0.25)
    traj = kp.propagate(Network(block=[Dense(), shifted], depth=1), EQ)
    m = traj.means[-1]
    ref = gauss_mean(lambda x: 1.5 * (np.tanh(0.7 * x + 0.4) + 0.25), 1.0)
    np.testing.assert_allclose(m, ref, rtol=1e-12)
    with pytest.raises(NotSupportedError, match="not zero-mean Gaussian"):
        kp.propagate(Network(block=[Dense(), shifted, Activation("relu")], depth=1), EQ)
    kp.propagate(Network(block=[Dense(), shifted, Dense(), Activation("relu")], depth=1), EQ)
    # δ alone (β = 0, odd φ) also moves the mean: erf has E[erf(αu)] = 0, so m' = γδ exactly
    traj = kp.propagate(Network(block=[Dense(), Activation("erf", scale=2.0, input_scale=0.5, offset=-0.3)], depth=1),
                        EQ)
    np.testing.assert_allclose(traj.means[-1], -0.6, rtol=1e-15)


def test_the_identity_stays_gaussian_with_the_shifted_mean():
    """``γ(αx + β + δ)`` of a Gaussian is Gaussian: Σ' = γ²(α²Σ + (β + δ)²), m' = γ(β + δ)."""
    layer = Activation("identity", scale=1.2, input_scale=0.5, input_shift=0.3, offset=-0.1)
    out, _ = layer.kernel_map(KernelState(SIGMA, np.zeros(2), (2,)), Context())
    np.testing.assert_allclose(out.sigma, 1.44 * (0.25 * SIGMA + 0.04), rtol=1e-13)
    np.testing.assert_allclose(out.mean, 1.2 * 0.2, rtol=1e-13)
    assert out.gaussian


@pytest.mark.parametrize("field", ["input_scale", "input_shift", "offset"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, "1/"])
def test_bad_transform_fields_are_refused_naming_the_field(field, bad):
    with pytest.raises(SpecError, match=f"activation.{field}"):
        Activation("tanh", **{field: bad})


def test_transform_fields_take_depth_expressions():
    layer = Activation("tanh", input_scale="1/sqrt(L)", input_shift="l/10", offset="-0.5").resolve({"L": 4.0, "l": 2.0})
    assert layer.transform() == (1.0, 0.5, 0.2, -0.5)
    assert set(layer.kernel_fields()) >= {"scale", "input_scale", "input_shift", "offset"}


def test_toml_loads_the_transform_fields_next_to_the_activation_parameters():
    spec = kp.loads("""
depth = 2
[input]
kind = "equicorrelated"
tokens = 4
rho = 0.3
[[block]]
type = "dense"
[[block]]
type = "erf"
a = 0.8
scale = 1.3
input_scale = "0.6"
offset = -0.3
[[block]]
type = "dense"
[[block]]
type = "activation"
name = "tanh"
input_scale = 0.6
input_shift = 0.4
offset = -0.3
scale = 1.7
""")
    erf, tanh = spec.network.block.layers[1], spec.network.block.layers[3]
    assert erf.params == {"a": 0.8} and erf.resolve({}).transform() == (1.3, 0.6, 0.0, -0.3)
    assert tanh.params == {} and tanh.transform() == (1.7, 0.6, 0.4, -0.3)
    ref = Network(block=[Dense(), Activation("erf", {"a": 0.8}, scale=1.3, input_scale=0.6, offset=-0.3), Dense(),
                         _layer("tanh-shifted")], depth=2)
    a, b = kp.propagate(spec.network, spec.inputs), kp.propagate(ref, spec.inputs)
    np.testing.assert_array_equal(a.kernels, b.kernels)
    with pytest.raises(SpecError, match=r"block\[0\]\.input_shift"):
        kp.loads('[input]\nkind = "identity"\n[[block]]\ntype = "tanh"\ninput_shift = nan\n')


def test_symbolic_map_uses_the_closed_forms_on_alpha_squared_sigma_and_refuses_a_shift():
    x = I.equicorrelated(5, 1.0, 0.3)
    net = Network(block=[Dense(1.5, 0.1), Activation("relu", scale=1.2, input_scale=0.7, offset=-0.4), Dense(),
                         Activation("erf", {"a": 0.9}, input_scale=-1.3, offset=0.2), Dense()], depth=3)
    bm = S.block_map(net)
    sym, ref = S.evaluate(bm, x), kp.propagate(net, x)
    np.testing.assert_allclose(sym.kernels, ref.kernels, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(sym.means, ref.means, rtol=1e-12, atol=1e-13)
    # with α and δ as symbols, the ReLU's q-map is γ²(α²q/2 + 2δ|α|sqrt(q/(2π)) + δ²) (by hand)
    import sympy as sp
    bm = S.block_map(Network(block=[Dense(), Activation("relu", scale=1.2, input_scale=0.7, offset=-0.4), Dense()],
                             depth=1), symbols=["input_scale", "offset"])
    q_out = bm.block.steps[1].outputs[0]
    a, d = sp.Symbol("input_scale", real=True), sp.Symbol("offset", real=True)
    q = next(s for s in q_out.free_symbols if s.name == "q")
    hand = sp.Rational(36, 25) * (a ** 2 * q / 2 + 2 * d * sp.Abs(a) * sp.sqrt(q / (2 * sp.pi)) + d ** 2)
    assert sp.simplify(q_out - hand) == 0
    shifted = Network(block=[Dense(), _layer("tanh-shifted"), Dense()], depth=2)
    with pytest.raises(NotSupportedError, match="input_shift β = 2/5 has no closed-form kernel"):
        S.block_map(shifted)
    sym = S.evaluate(S.block_map(shifted, opaque=True), x)
    ref = kp.propagate(shifted, x)
    assert np.abs(sym.kernels - ref.kernels).max() <= max(1e-13, ref["quad_error"].max())


# ----------------------------------------------------------------------------------------------
# the DKS/TAT solver, re-measured through the engine's own Activation layer

from scipy import optimize  # noqa: E402

from kernelprop.methods import cmaps, dks  # noqa: E402

SMOOTH = ["tanh", "softplus", "silu", "gelu", "erf"]
ONE = KernelState(np.ones((1, 1)), np.zeros(1), (1,))


def _q_slope(layer, h=3e-3):
    """``Q'(1)`` from the engine's q-map: 6th-order central difference (truncation ~h⁶, noise ~1e-15/h)."""
    q = cmaps.q_map([layer], 1.0 + h * np.array([-3, -2, -1, 1, 2, 3]))
    return (45.0 * (q[3] - q[2]) - 9.0 * (q[4] - q[1]) + (q[5] - q[0])) / (60.0 * h)


def engine_maps(layer):
    """Q(1), Q'(1), C(0) from the q- and C-maps; C'(1) = γ²α² E[φ'²]/Q(1) from the layer's backward rule."""
    q1 = float(cmaps.q_map([layer], 1.0)[0])
    _, back = layer.kernel_map(ONE, Context())
    return {"Q(1)": q1, "Q'(1)": _q_slope(layer), "C(0)": float(cmaps.c_map([layer], 0.0)[0]),
            "C'(1)": float(back(np.ones((1, 1)), {})[0, 0]) / q1}


def engine_curvature(tr, dphi, d2phi):
    """``C''(1) = γ²α⁴ E[φ''(αz + β)²]/Q(1)`` from the backward rule of the Activation layer of φ'
    (Price's theorem twice), with the same α, β and output scale γα."""
    layer = Activation(dphi, scale=tr.gamma * tr.alpha, input_scale=tr.alpha, input_shift=tr.beta, derivative=d2phi)
    _, back = layer.kernel_map(ONE, Context())
    return float(back(np.ones((1, 1)), {})[0, 0]) / float(cmaps.q_map([tr.activation()], 1.0)[0])


def fitted_curvature(layer):
    """``C''(1)`` from the C-map alone: a degree-5 polynomial fit of ``C(1 − h)``, h ∈ [1e-3, 0.05]."""
    h = np.linspace(1e-3, 0.05, 30)
    coef = np.polynomial.polynomial.polyfit(h, cmaps.c_map([layer], 1.0 - h), 5)
    return 2.0 * coef[2]


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("depth", [2, 30])
def test_dks_transform_meets_its_conditions_through_the_engine_layer(name, depth):
    """Q(1) = 1, Q'(1) = 1, C(0) = 0 and C'(1) = ζ^(1/D) (ζ = 1.5) to ≤ 1e-10 through the engine's layer
    (β ≠ 0: its quadrature path); the slope also from ``c_map_slope``'s fit of the C-map (to 1e-6)."""
    tr = dks.dks_transform(name, depth)
    xi = 1.5 ** (1.0 / depth)
    m = engine_maps(tr.activation())
    for key, target in {"Q(1)": 1.0, "Q'(1)": 1.0, "C(0)": 0.0, "C'(1)": xi}.items():
        assert abs(m[key] - target) <= 1e-10, (key, m[key], target)
        assert abs(tr.achieved[key] - target) <= 1e-12
    assert abs(tr.achieved["C'_net(1)"] - 1.5) <= 1e-12 and tr.quad_error <= 1e-10
    assert tr.alpha > 0 and tr.beta != 0.0
    assert cmaps.c_map_slope([tr.activation()]) == pytest.approx(xi, abs=1e-6)


def test_dks_network_slope_of_the_chain_is_zeta():
    """``C'_net(1) = ζ`` for Dense → φ̂ repeated D times (the engine's C-map of the whole chain)."""
    depth = 3
    tr = dks.dks_transform("gelu", depth, zeta=2.0)
    chain = [Dense(), tr.activation()] * depth
    assert cmaps.c_map_slope(chain) == pytest.approx(2.0, abs=1e-6)
    np.testing.assert_allclose(cmaps.q_map(chain, 1.0), 1.0, rtol=1e-12)
    np.testing.assert_allclose(cmaps.c_map(chain, 0.0), 0.0, atol=1e-12)


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("depth", [1, 30])
def test_tat_transform_meets_its_conditions_through_the_engine_layer(name, depth):
    """Q(1) = Q'(1) = C'(1) = 1 and C''(1) = τ/D (τ = 0.3): the first three through the engine's layer,
    C''(1) through the backward rule of the layer of φ' (≤ 1e-10) and a fit of the C-map (≤ 1e-6)."""
    tr = dks.tat_transform(name, depth)
    m = engine_maps(tr.activation())
    for key in ("Q(1)", "Q'(1)", "C'(1)"):
        assert abs(m[key] - 1.0) <= 1e-10, (key, m[key])
    curv = engine_curvature(tr, ACTIVATIONS[name].dphi, dks.SECOND_DERIVATIVES[name])
    assert abs(curv - 0.3 / depth) <= 1e-10
    assert fitted_curvature(tr.activation()) == pytest.approx(0.3 / depth, abs=1e-6)
    assert tr.alpha * tr.gamma < 2.0 and max(abs(r) for r in tr.residuals.values()) <= 1e-12


def _datan(x):
    return 1.0 / (1.0 + x * x)


def _d2atan(x):
    return -2.0 * x / (1.0 + x * x) ** 2


def test_a_callable_with_its_derivative_is_solved_and_phi_second_defaults_to_a_difference():
    tr = dks.dks_transform(np.arctan, 5, derivative=_datan)
    m = engine_maps(tr.activation())
    assert abs(m["Q'(1)"] - 1.0) <= 1e-10 and abs(m["C'(1)"] - 1.5 ** 0.2) <= 1e-10 and abs(m["C(0)"]) <= 1e-10
    exact = dks.tat_transform(np.arctan, 5, derivative=_datan, second_derivative=_d2atan)
    diff = dks.tat_transform(np.arctan, 5, derivative=_datan)
    np.testing.assert_allclose(diff.parameters, exact.parameters, rtol=1e-10)
    assert abs(engine_curvature(exact, _datan, _d2atan) - 0.06) <= 1e-10


def _resnet_max(x, r, w=0.6):
    """The maximal-C function of the modified ResNet-101 of Martens et al. (2021) used in the tests of
    their reference implementation: groups of (3, 4, 23, 3) blocks, residual branches of three
    nonlinear layers, a nonlinear shortcut in each group's first block, weights w² and 1 − w², a
    final nonlinear layer; the maximum over subnetworks also includes one branch alone."""
    branch = r(r(r(x)))
    for blocks in (3, 4, 23, 3):
        for j in range(blocks):
            shortcut = r(x) if j == 0 else x
            x = w * w * shortcut + (1.0 - w * w) * r(r(r(x)))
    return max(r(x), branch)


# parameters published by the reference implementation (github.com/google-deepmind/dks,
# tests/test_activation_transform.py) for that network with ζ = 1.2, τ = 0.2, η = 0.75:
# (input_scale α, input_shift β, output_shift δ, output_scale γ)
PUBLISHED = {
    ("dks", "tanh"): (0.07461073057540868, 0.5566915199964182, -0.5034378768692127, 18.002635964442558),
    ("dks", "softplus"): (0.18761008168267976, 0.40688063442262007, -0.9213466151411376, 8.878672543665223),
    ("dks", "gelu"): (0.07043253126531114, 0.259489297927707, -0.15815378961903598, 20.21158902315857),
    ("tat", "tanh"): (0.0580205218578313, 0.5218639804099805, -0.4796430704354356, 22.36066261763117),
    ("tat", "softplus"): (0.15011489794748328, 0.5374599901127068, -0.996481014465811, 10.54880187880574),
}


@pytest.mark.parametrize("method,name", sorted(PUBLISHED))
def test_published_transforms_of_the_reference_implementation(method, name):
    """The per-layer targets follow from the network's maximal slope / curvature functions
    (C'_max(ξ) = ζ with composition replaced by products, C''_max(κ) = τ with sums); the solver then
    reproduces the published (α, β, δ, γ) to 1e-7 relative (measured: ≤ 2.5e-8; the reference solves
    with scipy's hybr at its default xtol = 1.49e-8, this solver at 1e-14)."""
    if method == "dks":
        xi = optimize.brentq(lambda v: _resnet_max(1.0, lambda y: v * y) - 1.2, 1.0, 2.0, xtol=1e-15)
        tr = dks.dks_transform(name, local_slope=xi)
    else:
        kappa = optimize.brentq(lambda v: _resnet_max(0.0, lambda y: v + y) - 0.2, 0.0, 1.0, xtol=1e-15)
        tr = dks.tat_transform(name, local_curvature=kappa)
    a, b, d, g = PUBLISHED[method, name]
    np.testing.assert_allclose([tr.alpha, tr.beta, tr.delta, tr.gamma], [a, b, d, g], rtol=1e-7)


def test_published_tat_leaky_relu_slope_of_the_reference_implementation():
    """η = 0.75 for the same network: C_max(0) with the leaky ReLU C-map gives s = 0.6291800290346146."""
    s = optimize.brentq(lambda v: _resnet_max(0.0, lambda c: float(dks.leaky_relu_c_map(c, v))) - 0.75, 0.0, 1.0,
                        xtol=1e-15)
    assert s == pytest.approx(0.6291800290346146, abs=1e-9)
    assert math.sqrt(2.0 / (1.0 + s * s)) == pytest.approx(1.196996549778802, abs=1e-9)


@pytest.mark.parametrize("depth,eta", [(1, 0.2), (12, 0.5), (48, 0.9), (200, 0.95)])
def test_tat_leaky_relu_reaches_eta_through_the_engine(depth, eta):
    slope, scale = dks.tat_leaky_relu(depth, eta)
    layer = Activation("leaky_relu", {"slope": slope}, scale=scale)
    assert abs(cmaps.network_c_map([layer], depth, 0.0)[0] - eta) <= 1e-12
    assert abs(cmaps.q_map([layer], 1.0)[0] - 1.0) <= 1e-14
    tr = dks.tat_transform("leaky_relu", depth, eta=eta)
    assert tr.params == {"slope": slope} and tr.parameters == (1.0, 0.0, scale, 0.0)
    assert abs(tr.residuals["C_net(0)"]) <= 1e-12 and abs(tr.achieved["C'(1)"] - 1.0) <= 1e-15


def test_tat_leaky_relu_generalises_the_c_map_module_version():
    """Same slopes as :func:`kernelprop.methods.cmaps.tat_leaky_relu` (root of the engine's C_net(0)) on
    its domain η ∈ (0, 1)."""
    for depth, eta in [(3, 0.4), (50, 0.9)]:
        np.testing.assert_allclose(dks.tat_leaky_relu(depth, eta), cmaps.tat_leaky_relu(depth, eta), rtol=1e-10)


def test_tat_leaky_relu_eta_zero_is_the_linear_network():
    assert dks.tat_leaky_relu(7, 0.0) == (1.0, 1.0)
    layer = dks.tat_transform("leaky_relu", 7, eta=0.0).activation()
    np.testing.assert_allclose(cmaps.network_c_map([layer], 7, [0.0, 0.3]), [0.0, 0.3], atol=1e-15)
    # a tiny η gives a slope just below 1, continuously
    s, _ = dks.tat_leaky_relu(7, 1e-6)
    assert 0.999 < s < 1.0


@pytest.mark.parametrize("call,field,words", [
    (lambda: dks.tat_leaky_relu(3, 0.99), "eta", "out of reach at depth 3"),
    (lambda: dks.tat_leaky_relu(3, 1.0), "eta", "[0, 1)"),
    (lambda: dks.tat_leaky_relu(3, -0.1), "eta", "[0, 1)"),
    (lambda: dks.tat_leaky_relu(0, 0.5), "depth", ">= 1"),
    (lambda: dks.tat_leaky_relu(True, 0.5), "depth", "whole number"),
    (lambda: dks.dks_transform("tanh", 4, zeta=1.0), "zeta", "> 1"),
    (lambda: dks.dks_transform("tanh", 4, zeta=0.8), "zeta", "> 1"),
    (lambda: dks.dks_transform("tanh", 2.5), "depth", "whole number"),
    (lambda: dks.dks_transform("tanh"), "depth", "give the depth"),
    (lambda: dks.dks_transform("tanh", 3, local_slope=1.1), "local_slope", "not both"),
    (lambda: dks.dks_transform("relu", 3), "phi", "not smooth"),
    (lambda: dks.tat_transform("abs", 3), "phi", "not smooth"),
    (lambda: dks.dks_transform("identity", 3), "phi", "linear"),
    (lambda: dks.dks_transform(np.arctan, 3), "derivative", "derivative="),
    (lambda: dks.tat_transform("tanh", 3, tau=0.0), "tau", "> 0"),
    (lambda: dks.tat_transform("tanh", 3, tau=float("nan")), "tau", "> 0"),
    (lambda: dks.tat_transform("leaky_relu", 3, params={"slope": 0.1}), "params", "no params"),
])
def test_bad_targets_are_refused_naming_the_field(call, field, words):
    with pytest.raises(SpecError) as info:
        call()
    assert info.value.field == field and words in str(info.value)


def test_a_slope_softplus_cannot_reach_is_refused_with_what_is_reachable():
    """ζ = 1.5 in one softplus layer: refused, naming the largest C'(1) found; that slope is reachable,
    and so is ζ = 1.5 at the depth the message names."""
    with pytest.raises(SpecError, match="out of reach for 'softplus'") as info:
        dks.dks_transform("softplus", 1)
    msg = str(info.value)
    top = float(msg.split("is C'(1) = 1.5, but the largest C'(1) found with Q'(1) = 1, C(0) = 0 is ")[1].split()[0])
    assert 1.3 < top < 1.5
    assert abs(dks.dks_transform("softplus", local_slope=0.999 * top).achieved["C'(1)"] - 0.999 * top) <= 1e-12
    need = int(msg.split("ζ = 1.5 at depth >= ")[1].split()[0])
    dks.dks_transform("softplus", need)


def test_a_non_smooth_callable_is_refused_when_the_quadrature_cannot_resolve_it():
    with pytest.raises(SpecError, match="not resolved by the Gauss–Hermite quadrature"):
        dks.dks_transform(_elu, 2, derivative=_delu)
