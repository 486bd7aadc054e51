"""Measures against the equicorrelated closed forms (THEORY §7)."""

import numpy as np
import pytest

from kernelprop import inputs as I
from kernelprop import measures as M


@pytest.mark.parametrize("t,q,rho", [(4, 1.0, 0.0), (16, 2.5, 0.3), (64, 0.7, 0.9), (8, 1.0, -0.1)])
def test_equicorrelated_measures(t, q, rho):
    m = M.compute(I.equicorrelated(t, q, rho).sigma, (t,))
    big, small = q * (1 - rho) + t * q * rho, q * (1 - rho)
    lam = np.array([big] + [small] * (t - 1))
    assert m["stable_rank"] == pytest.approx(t * q / max(big, small), rel=1e-12)
    assert m["eig_ratio"] == pytest.approx(min(big, small) / max(big, small), rel=1e-10)
    p = np.sqrt(lam) / np.sqrt(lam).sum()
    assert m["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-12)
    assert m["cos_mean"] == pytest.approx(rho, abs=1e-14)
    assert m["rank_one_distance"] == pytest.approx((1 - rho) * (t - 1) / t, rel=1e-12)
    np.testing.assert_allclose(m["cos_first"], [1.0] + [rho] * (t - 1), atol=1e-14)


def test_rank_one_kernel():
    v = np.array([1.0, 2.0, 3.0])
    m = M.compute(np.outer(v, v), (3,))
    assert m["stable_rank"] == pytest.approx(1.0)
    assert m["cos_min"] == pytest.approx(1.0)
    assert m["eig_ratio"] == pytest.approx(0.0, abs=1e-12)


def test_cross_sequence_cosine():
    m = M.compute(I.equicorrelated(3, 1.0, 0.5, sequences=2, cross_rho=0.2).sigma, (3, 3))
    assert m["cross_cos_mean"] == pytest.approx(0.2)
    assert m["cos_mean"] == pytest.approx(0.5)


def test_an_all_zero_sequence_has_rank_measures_zero_not_nan():
    """weight_var = 0 zeroes the stream: rank 0, so stable rank, distance to rank one, λ_min/λ_max and the
    effective rank are 0 (before: 0/0 = NaN with a RuntimeWarning)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = M.compute(np.zeros((3, 3)), (3,))
    for k in ("rank_one_distance", "stable_rank", "effective_rank"):
        assert m[k] == 0.0
