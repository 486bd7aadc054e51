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
    shifted = Network(block=[Dense(), _layer("tanh-shifted"), Dense()], depth=2)
    with pytest.raises(NotSupportedError, match="input_shift β = 2/5 has no closed-form kernel"):
        S.block_map(shifted)
    sym = S.evaluate(S.block_map(shifted, opaque=True), x)
    ref = kp.propagate(shifted, x)
    assert np.abs(sym.kernels - ref.kernels).max() <= max(1e-13, ref["quad_error"].max())
