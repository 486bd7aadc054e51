"""The standard-score estimator (kernelprop/layers/attention/standard.py) where mutation testing found it
unchecked: the modified mixings ``M = αI + βA − γC`` (value-skipinit, shaped), the reported errors' size
(not only that they cover the distance) and the order-2 closed form alone.

References, all independent of the estimator: T = 2 Gauss–Hermite integrals over the two score differences
(each softmax row is a logistic function of one difference, ``Cov(d_i, d_k) = v K_ik (K_00 + K_11 − 2K_01)``;
the quadrature's error is its distance to half the nodes), and the spread of the estimates over independent
seeds for the errors."""

import numpy as np
import pytest
from test_standard_scores import quadrature_t2  # the T = 2 Gauss–Hermite reference

from kernelprop.layers.attention import Attention
from kernelprop.layers.attention.standard import Estimator

KERNEL = np.array([[1.0, 0.4], [0.4, 1.5]])
PI = np.array([[1.2, 0.3], [0.3, 0.7]])
VARIANTS = {"bidirectional": {}, "causal": {"causal": True}, "alibi": {"bias": "alibi", "heads": 2}}
MATRICES = {"value_skipinit": {"matrix": "value_skipinit", "alpha": 0.7, "beta": 1.3},
            "shaped": {"matrix": "shaped", "alpha": 0.8, "beta": 1.2, "gamma": 0.5}}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mname", list(MATRICES))
@pytest.mark.parametrize("v", [0.3, 2.0])
def test_modified_mixings_two_tokens_against_quadrature(mname, variant, v):
    """``M = αI + βA (− γC)`` with standard scores at T = 2: ``E[MΣMᵀ]`` and ``E[MᵀΠM]`` within their
    reported errors (plus the quadrature's) of the exact integrals; ``E[M]`` within β times the tolerance
    the softmax case is held to (no error reported for it)."""
    opts, mopts = VARIANTS[variant], MATRICES[mname]
    fwd, bwd, mean = quadrature_t2(KERNEL, PI, v, opts, 120, mopts)
    rough = quadrature_t2(KERNEL, PI, v, opts, 60, mopts)
    qerr = [float(np.max(np.abs(a - b))) + 1e-14 for a, b in zip((fwd, bwd, mean), rough)]
    est = Estimator(Attention(scores="standard", qk_var=v, **opts, **mopts), KERNEL, (2,), {}, seed=(3,))
    (got,), got_mean, (err,) = est.forward([KERNEL], want_mean=True)
    back = est.backward(PI)[0]
    assert np.max(np.abs(got - fwd)) <= err + qerr[0], (np.max(np.abs(got - fwd)), err)
    assert np.max(np.abs(back - bwd)) <= est.back_error + qerr[1], (np.max(np.abs(back - bwd)), est.back_error)
    be = mopts["beta"]
    assert np.max(np.abs(got_mean - mean)) <= be * (1e-2 * v ** 2 + 1e-3 * v) + qerr[2]
    assert err <= 2.0 * be * be * v ** 2 and est.back_error <= 2.0 * be * be * v ** 2


def test_reported_errors_are_the_spread_over_seeds():
    """The errors are ``q · max_entry SE`` (q the Student-t quantile of :meth:`Estimator.quantile`): over
    1500 seeds (two antithetic pairs each, four ALiBi heads weighted 1/4), the mean of ``(error/q)²`` must
    lie between the largest per-entry variance of the estimates over the seeds (``E max ≥ max E``) and the
    sum over the three distinct entries (``E max ≤ Σ E``), within 4 standard errors (delta method; 4 so
    that each one-sided comparison has a false-alarm rate below 1e-4). A variance weighted by 1/H instead
    of 1/H², or divided by k(k + 1) instead of k(k − 1), is outside. The same for the score path of the backward
    (``score_error``, docs/theory.md §11.6), under a QK-norm rescaling."""
    layer = Attention(scores="standard", qk_var=1.0, score_samples=3, bias="alibi", heads=4)
    fwd, bwd, score, xf, xb, xs = [], [], [], [], [], []
    iu = np.triu_indices(2)
    rescale = np.array([1.3, 0.8])       # QK-norm's 1/√Σ_ii: the score path's error scales by max r²
    for seed in range(1500):
        est = Estimator(layer, KERNEL, (2,), {}, seed=(seed,))
        q = est.quantile()
        (k,), _, (e,) = est.forward([KERNEL])
        fwd.append(k[iu])
        xf.append((e / q) ** 2)
        back, _, extra = est.backward(PI, KERNEL, {"keys": KERNEL, "rescale": rescale})
        bwd.append(back[iu])
        xb.append((est.back_error / q) ** 2)
        score.append(extra[iu])
        xs.append((est.score_error / q) ** 2)
    for values, x in ((np.array(fwd), np.array(xf)), (np.array(bwd), np.array(xb)), (np.array(score), np.array(xs))):
        n = len(x)
        dev2 = (values - values.mean(axis=0)) ** 2
        var = dev2.sum(axis=0) / (n - 1)
        top = int(np.argmax(var))
        rel = np.hypot(x.std(ddof=1) / np.sqrt(n) / x.mean(), dev2[:, top].std(ddof=1) / np.sqrt(n) / var[top])
        ratio = x.mean() / var[top]
        assert 1.0 - 4.0 * rel * ratio <= ratio <= var.sum() / var[top] + 4.0 * rel * ratio, (ratio, rel)


def test_order_two_closed_form_alone_is_second_order_accurate():
    """:meth:`Estimator.expansion` (no draws): its distance to the exact T = 2 integral is ``c v² + O(v³)``
    (the odd orders vanish by symmetry), so halving σ_qk² divides it by 4 (within 10 %), and it is below
    ``2 v²``; two ALiBi heads and the shaped mixing, causal and bidirectional."""
    for opts in ({"bias": "alibi", "heads": 2}, {"causal": True}):
        mopts = MATRICES["shaped"]
        gaps = []
        for v in (0.04, 0.02):
            est = Estimator(Attention(scores="standard", qk_var=v, **opts, **mopts), KERNEL, (2,), {}, seed=(0,))
            fwd = quadrature_t2(KERNEL, PI, v, opts, 80, mopts)[0]
            gaps.append(float(np.max(np.abs(est.expansion(KERNEL) - fwd))))
            assert gaps[-1] <= 2.0 * v ** 2
        assert 3.6 <= gaps[0] / gaps[1] <= 4.4, gaps
