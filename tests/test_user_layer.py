"""A user-defined layer type (docs/layers.md): registered once, known to the spec loader and to
every interpreter, checked against the Monte Carlo, and refused by name where it has no rule."""

from dataclasses import dataclass

import numpy as np
import pytest

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop import symbolic
from kernelprop.errors import NotSupportedError, SpecError
from kernelprop.kernel.state import Dependence
from kernelprop.layers import Layer, register_layer


@dataclass(frozen=True, eq=False)
class MovingAverage(Layer):
    """Causal moving average over the last ``k`` tokens of each sequence: ``y = M x``."""

    k: int = 2
    kind = "moving_average"
    refusals = {"symbolic_map": "the moving average is defined for numeric kernels only"}

    def matrix(self, segments):
        n = sum(segments)
        m, start = np.zeros((n, n)), 0
        for t in segments:
            for i in range(t):
                lo = max(0, i - self.k + 1)
                m[start + i, start + lo:start + i + 1] = 1.0 / (i + 1 - lo)
            start += t
        return m

    def kernel_map(self, s, ctx):
        m = self.matrix(s.segments)
        dep = s.dep
        if dep is not None and dep.kind in ("diag", "dense"):
            dep = Dependence("dense", m @ dep.matrix(s.n), dep.headwise)
        out = s.replace(sigma=m @ s.sigma @ m.T, mean=m @ s.mean, dep=dep)
        return out, lambda pi, grads: m.T @ pi @ m

    def sample(self, x, ctx):
        m = self.matrix(ctx.segments)
        y = np.einsum("ij,bjk->bik", m, x)
        return y, ((lambda g, grads: np.einsum("ji,bjk->bik", m, g)) if ctx.tape else None)


SPEC = """
depth = 3
[input]
kind = "equicorrelated"
tokens = 5
rho = 0.2
sequences = 2
cross_rho = 0.1

[[block]]
type = "residual"
beta = 0.5
layers = [{ type = "moving_average", k = 3 }]

[[block]]
type = "residual"
layers = [{ type = "layernorm" }, { type = "dense" }, { type = "relu" }, { type = "dense", weight_var = 2.0 }]
"""


@pytest.fixture
def registered():
    register_layer(MovingAverage)
    yield MovingAverage
    kp.unregister_layer("moving_average")


def test_a_user_layer_runs_in_every_interpreter_and_agrees_with_the_monte_carlo(registered):
    spec = kp.loads(SPEC)
    traj = kp.propagate(spec.network, spec.inputs)
    grads = kp.backpropagate(spec.network, spec.inputs)
    assert np.isfinite(traj.kernels).all() and np.isfinite(grads.kernels).all()
    cmp, *_ = kp.montecarlo.check(spec.network, spec.inputs, 128, 16, gradients=True)
    assert cmp.n_tested > 300
    assert cmp.agree, (cmp.criterion(), cmp.failures[:3])
    with pytest.raises(NotSupportedError, match="layer `moving_average` has no symbolic map: the moving average"):
        symbolic.block_map(spec.network, mode="explicit", tokens=(5, 5))


def test_the_residual_cross_term_of_a_user_mixing_is_exact(registered):
    """``y = x + β M x = (I + βM) x``: Σ' = (I + βM) Σ (I + βM)ᵀ, a closed form the map must reproduce."""
    x = I.equicorrelated(4, 1.0, 0.3)
    net = kp.Network(block=[kp.Residual(MovingAverage(k=2), beta=0.5)], depth=1)
    p = np.eye(4) + 0.5 * MovingAverage(k=2).matrix((4,))
    np.testing.assert_allclose(kp.propagate(net, x).kernels[-1], p @ x.sigma @ p.T, rtol=1e-14)


def test_an_unregistered_type_is_a_spec_error_and_a_kind_is_registered_once():
    with pytest.raises(SpecError, match="block\\[0\\].layers\\[0\\].type"):
        kp.loads(SPEC)
    register_layer(MovingAverage)
    try:
        @dataclass(frozen=True, eq=False)
        class Other(Layer):
            kind = "moving_average"
        with pytest.raises(SpecError, match="already registered"):
            register_layer(Other)
        with pytest.raises(SpecError, match="subclass"):
            register_layer(int)
    finally:
        kp.unregister_layer("moving_average")


def test_a_layer_without_a_backward_rule_is_refused_by_name_in_the_backward_pass_only():
    @dataclass(frozen=True, eq=False)
    class Forward(Layer):
        kind = "forward_only"
        refusals = {"kernel_backward": "no derivative is known"}

        def kernel_map(self, s, ctx):
            return s.replace(sigma=2.0 * s.sigma), self.no_backward()

    net = kp.Network(block=[Forward()], depth=2)
    x = I.equicorrelated(3, 1.0, 0.2)
    np.testing.assert_allclose(kp.propagate(net, x).kernels[-1], 4.0 * x.sigma, rtol=1e-15)
    with pytest.raises(NotSupportedError, match="layer `forward_only` has no backward rule: no derivative is known"):
        kp.backpropagate(net, x)
