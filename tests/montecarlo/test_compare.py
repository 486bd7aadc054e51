"""The comparison's bookkeeping, recomputed here from its documented definition (docs/montecarlo.md,
kernelprop.montecarlo.compare): the engine's error allowance of gradient rows, the joint labels, the
gradient-only comparison, and the refusals. Written for mutants that survived the suite (docs/testing.md)."""

import importlib
import math

import numpy as np
import pytest

from kernelprop import inputs as I
from kernelprop import montecarlo as mc
from kernelprop.errors import KernelpropError, SpecError
from kernelprop.kernel.backward import backpropagate
from kernelprop.network.layers import Attention, Dense, LayerNorm, Network

CM = importlib.import_module("kernelprop.montecarlo.compare")   # the module (the package exports a function `compare`)
EQ = I.equicorrelated(6, 1.0, 0.3)
STANDARD = Network(block=[LayerNorm(), Attention(heads=2, scores="standard", qk_var=2.0, score_samples=8)], depth=1)


def _z(row, engine_error):
    """z of a row from its definition: (|estimate − theory| − floor) / hypot(SE, engine error), signed."""
    diff = row.estimate - row.theory
    excess = max(0.0, abs(diff) - (CM.ATOL + CM.RTOL * abs(row.theory)))
    return math.copysign(excess / math.hypot(row.se, engine_error), diff)


def test_gradient_rows_allow_for_the_engines_error_in_proportion():
    """Standard scores: the engine's error ε = max_r quad_error_r/q_mean_r (forward) is allowed on every
    gradient quantity in proportion: ε·|grad_q_mean| on Π entries and grad_q_mean, ε on correlations,
    ε·|norm| on parameter-gradient norms; plus the record's own gradient error g (docs/theory.md §11.6):
    g·max|Π| on Π entries and grad_q_mean, 2g on correlations."""
    cmp, th, *_ = mc.check(STANDARD, EQ, 64, 8, gradients=True)
    fwd = th.forward.measures
    eps = float(np.max(fwd["quad_error"] / fwd["q_mean"]))
    assert eps > 1e-3
    rows = cmp.parts["gradients"].rows
    checked = 0
    assert np.all(th.measures["grad_error"][:-1] > 1e-4)
    for row in rows:
        own = 0.0
        if row.record < len(th.labels):
            g = float(th.measures["grad_error"][row.record])
            own = g * float(np.max(np.abs(th.kernels[row.record])))
        if row.measure in ("grad_kernel", "grad_q_mean"):
            allowed = eps * abs(float(th.measures["grad_q_mean"][row.record])) + own
        elif row.measure.startswith("grad_cos"):
            allowed = eps + 2.0 * g
        elif row.measure.startswith("norm_"):
            allowed = eps * abs(row.theory)
        else:
            continue
        assert row.z == pytest.approx(_z(row, allowed), rel=1e-9, abs=1e-12), (row.measure, row.position)
        checked += 1
    assert checked > 20 and any(r.measure.startswith("norm_") for r in rows)


def test_joint_check_labels_and_the_gradient_only_comparison():
    net = Network(block=[LayerNorm(), Dense(), Attention(heads=2, causal=True)], depth=2)
    cmp, th, sim, half = mc.check(net, EQ, 64, 6, gradients=True)
    assert cmp.labels == cmp.parts["forward"].labels + cmp.parts["gradients"].labels
    assert cmp.labels[:len(th.forward.labels)] == list(th.forward.labels)
    alone = mc.compare_gradients(th, sim, half)
    assert alone.n_tested == sum(r.tested for r in cmp.parts["gradients"].rows) < cmp.n_tested
    assert [r.estimate for r in alone.rows] == [r.estimate for r in cmp.parts["gradients"].rows]
    assert mc.compare_gradients(th, sim, half, alpha=0.2).k < alone.k
    with pytest.raises(KernelpropError, match=r"keep_kernels=True"):
        mc.compare_gradients(backpropagate(net, EQ, keep_kernels=False), sim, half)


def test_gradient_table_has_a_column_per_quantity():
    net = Network(block=[Dense(), Attention(heads=2, causal=True)], depth=1)
    cmp, *_ = mc.check(net, EQ, 32, 4, gradients=True)
    table = mc.gradient_table(cmp.parts["gradients"])
    headers = [c.header for c in table.columns]
    assert headers[:3] == ["record", "Π\n|z|", "grad\nq mean\n|z|"] and "∂W\nvalues\n|z|" in headers


def test_check_computes_spectral_measures_for_short_sequences():
    cmp, th, sim, _ = mc.check(Network(block=[Dense()], depth=1), EQ, 32, 4)
    assert "stable_rank" in th.measures and any(r.measure == "stable_rank" and not r.tested for r in cmp.rows)


def test_check_refusals_name_the_field_and_the_reason():
    with pytest.raises(SpecError) as info:
        mc.check(Network(block=[Dense()], depth=1), EQ, 32, 4, gradients=True, products="auto")
    assert info.value.field == "products" and "explicit weight matrices" in info.value.allowed
    with pytest.raises(SpecError) as info:      # width 12 is enough for 6 tokens; its half, 6, is not
        mc.check(Network(block=[Dense()], depth=1), EQ, 12, 4)
    assert info.value.field == "width" and info.value.value == 12
    assert info.value.allowed.startswith("the bias correction also simulates width 6, where: ")
    assert info.value.allowed.endswith("(raise --width, or use --no-extrapolate)")
