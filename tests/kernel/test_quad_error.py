"""The accumulated error estimate ``quad_error`` through Dense and Dropout (docs/theory.md §1.3).

A coarse fixed rule (16 Gauss–Hermite nodes) makes the activation's error visible; the reference is
the same chain with the default adaptive rule (errors ~1e-12, far below the ones tested).
"""

from __future__ import annotations

import numpy as np
import pytest

from kernelprop.kernel.maps import Context
from kernelprop.kernel.state import KernelState
from kernelprop.layers import Activation, Dense, Dropout

SIGMA = np.array([[1.0, 0.6, -0.2], [0.6, 2.0, 0.3], [-0.2, 0.3, 0.5]])


def run(layers, nodes):
    s = KernelState(SIGMA.copy(), np.zeros(3), (3,))
    ctx = Context(nodes)
    for layer in layers:
        s, _ = layer.kernel_map(s, ctx)
    return s


@pytest.mark.parametrize("layer,factor", [(Dense(weight_var=50.0, bias_var=0.3), 50.0), (Dropout(p=0.98), 50.0),
                                          (Dense(weight_var=0.25), 0.25)])
def test_dense_and_dropout_scale_the_error(layer, factor):
    coarse = run([Activation(np.tanh)], 16)
    assert coarse.quad_error > 1e-6  # the coarse rule's error is visible
    after = run([Activation(np.tanh), layer], 16)
    assert after.quad_error == pytest.approx(factor * coarse.quad_error, rel=1e-15)
    fine = run([Activation(np.tanh), layer], None)
    assert fine.quad_error < 1e-10
    true = np.abs(after.sigma - fine.sigma).max()
    assert true <= after.quad_error + fine.quad_error
    if factor > 1:  # the unscaled estimate would not bound it
        assert true > coarse.quad_error


def test_error_through_a_deeper_chain_bounds_the_truth():
    layers = [Activation(np.tanh), Dense(weight_var=4.0), Dropout(p=0.5), Dense(weight_var=2.0), Activation("tanh"),
              Dense(weight_var=3.0), Dropout(p=0.8)]
    coarse, fine = run(layers, 16), run(layers, None)
    assert np.abs(coarse.sigma - fine.sigma).max() <= coarse.quad_error + fine.quad_error
