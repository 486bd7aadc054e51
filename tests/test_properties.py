"""Generic properties of every forward map under hypothesis-generated inputs.

The layer table is listed once; every property test runs over all of it. Maps must return a
symmetric PSD kernel (up to float error), unit diagonal after a normalisation, and a diagonal
that follows the layer's variance rule.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernelprop as kp
from kernelprop import inputs as I
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
    Serial,
)

WF = dict(values="identity", projection="identity")
LAYERS = {
    "dense": Dense(weight_var=1.5, bias_var=0.2),
    "relu": Serial(Dense(), Activation("relu")),
    "leaky": Serial(Dense(), Activation("leaky_relu", {"slope": 0.2})),
    "abs": Serial(Dense(), Activation("abs")),
    "erf": Serial(Dense(), Activation("erf", {"a": 1.5})),
    "gelu": Serial(Dense(), Activation("gelu")),
    "tanh": Serial(Dense(), Activation("tanh")),
    "layernorm": Serial(Dense(), Activation("relu"), LayerNorm()),
    "rmsnorm": RMSNorm(gain=0.7),
    "dropout": Dropout(0.3),
    "uniform": Attention(heads=2),
    "causal": Attention(causal=True, value_var=2.0),
    "tied": Attention(scores="tied", qk_var=2.0),
    "alibi": Serial(Attention(causal=True, bias="alibi", heads=3, **WF), Dense()),
    "shaped": Attention(matrix="shaped", causal=True, scores="tied", **WF),
    "skipinit": Attention(matrix="value_skipinit", beta=0.5, **WF),
    "preln": Residual(LayerNorm(), Attention(causal=True, **WF), beta=0.8),
    "mlp-res": Residual(RMSNorm(), Dense(), Activation("gelu"), Dense(), alpha=0.9, beta=0.4),
    "parallel": Parallel([LayerNorm(), Attention(**WF)], [Dense(), Activation("relu"), Dense()], betas=[0.5, 0.5]),
}
NORMALISED = {"layernorm"}


@st.composite
def gram_matrices(draw):
    n = draw(st.integers(2, 6))
    d = draw(st.integers(1, 8))
    x = np.array(draw(st.lists(st.floats(-3, 3, allow_nan=False), min_size=n * d, max_size=n * d))).reshape(n, d)
    s = x @ x.T / d + draw(st.floats(0.05, 1.0)) * np.eye(n)    # keep every token's norm positive
    return s


@pytest.mark.parametrize("name", sorted(LAYERS))
@settings(max_examples=25, deadline=None, derandomize=True)
@given(s=gram_matrices())
def test_maps_return_symmetric_psd_kernels(name, s):
    tr = kp.propagate(Network(block=[LAYERS[name]], depth=2), I.gram(s), spectral=False)
    k = tr.kernels[-1]
    scale = np.abs(np.diag(k)).max()
    np.testing.assert_allclose(k, k.T, atol=1e-12 * scale)
    assert np.linalg.eigvalsh((k + k.T) / 2).min() >= -1e-10 * scale
    if name in NORMALISED:
        np.testing.assert_allclose(np.diag(k), 1.0, rtol=1e-12)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(s=gram_matrices(), p=st.floats(0.0, 0.9))
def test_dropout_scales_only_the_diagonal(s, p):
    k = kp.propagate(Network(block=[Dropout(p)], depth=1), I.gram(s)).kernels[-1]
    np.testing.assert_allclose(np.diag(k), np.diag(s) / (1 - p), rtol=1e-14)
    off = ~np.eye(len(s), dtype=bool)
    np.testing.assert_array_equal(k[off], s[off])


@settings(max_examples=25, deadline=None, derandomize=True)
@given(s=gram_matrices(), w=st.floats(1e-3, 4.0), b=st.floats(0.0, 2.0))
def test_dense_is_affine_in_the_kernel(s, w, b):
    k = kp.propagate(Network(block=[Dense(weight_var=w, bias_var=b)], depth=1), I.gram(s)).kernels[-1]
    np.testing.assert_allclose(k, w * s + b, rtol=1e-14, atol=1e-300)
