"""The tanh-approximate GELU (GPT-2's gelu_new): derivatives and kernel against independent references."""

import numpy as np
import pytest
from scipy import integrate

from kernelprop.kernel import activations as A

SPEC = A.ACTIVATIONS["gelu_tanh"]


def test_derivatives_are_those_of_phi():
    x = np.linspace(-5.0, 5.0, 41)
    h = 1e-6
    assert np.max(np.abs((SPEC.phi(x + h) - SPEC.phi(x - h)) / (2 * h) - SPEC.dphi(x))) < 1e-9
    assert np.max(np.abs((SPEC.dphi(x + h) - SPEC.dphi(x - h)) / (2 * h) - SPEC.d2phi(x))) < 1e-9


@pytest.mark.parametrize("sigma", [[[1.0, 0.6], [0.6, 2.0]], [[0.3, -0.2], [-0.2, 4.0]]])
def test_kernel_against_adaptive_2d_quadrature(sigma):
    """E[φ(u)φ(v)] by scipy dblquad on the Cholesky form; the reported error bounds the difference."""
    s = np.array(sigma)
    k, _, err = A.activation_kernel("gelu_tanh", s)
    c = np.linalg.cholesky(s)

    def f(z2, z1):
        return (SPEC.phi(c[0, 0] * z1) * SPEC.phi(c[1, 0] * z1 + c[1, 1] * z2)
                * np.exp(-(z1 * z1 + z2 * z2) / 2) / (2 * np.pi))
    ref, tol = integrate.dblquad(f, -12, 12, -12, 12, epsabs=1e-13, epsrel=1e-13)
    assert abs(k[0, 1] - ref) <= err + tol + 1e-15
    assert err < 1e-10


def test_it_differs_from_the_exact_gelu_by_the_approximation():
    """The two GELUs differ by at most ~5e-4 pointwise; their kernels at q = 1 by ~2e-5, not 0."""
    s = np.array([[1.0, 0.6], [0.6, 2.0]])
    diff = A.activation_kernel("gelu_tanh", s)[0] - A.activation_kernel("gelu", s)[0]
    assert 1e-6 < np.max(np.abs(diff)) < 1e-3
