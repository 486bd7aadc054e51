"""Signal-preserving attention (He et al. 2023 §3; docs/theory.md §3) against references built here.

References, none of which calls kernelprop's SPA code:

* the schedule from the paper's relations, evaluated with mpmath at 50 digits: E-SPA
  ``1 − e^{−2γ_l} = (1 − e^{−2γ_L})^{l/L}``, U-SPA ``1 − ρ_l = (1 − ρ_L)^{l/L}``;
* dense targets ``Σ_l`` and ``A_l = F_l F_{l−1}^{-1}`` from :func:`numpy.linalg.cholesky` (causal) or an
  eigendecomposition square root (bidirectional) and a general inverse;
* the AR(1) closed form of causal E-SPA, derived by hand;
* the finite-width network with orthogonal weights, whose realised ``D softmax(B + M)`` comes from
  :mod:`kernelprop.montecarlo.spa` (closed forms), so an engine slip no longer cancels out.
"""

import mpmath
import numpy as np
import pytest

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop import montecarlo as mc
from kernelprop.layers.attention import spa as engine_spa
from kernelprop.montecarlo import spa as sim_spa
from kernelprop.network.layers import Attention, Network

FINAL = {"e-spa": 0.005, "u-spa": 0.8}     # documented defaults (docs/theory.md §3)


def schedule_mp(kind, l, depth, final):
    """ρ_l at 50 digits: E-SPA e^{−γ_l}, U-SPA the shared correlation."""
    with mpmath.workdps(50):
        if l == 0:
            return mpmath.mpf(0)
        if kind == "e-spa":
            one_minus = (1 - mpmath.exp(-2 * mpmath.mpf(final))) ** (mpmath.mpf(l) / depth)
            gamma = -mpmath.log(1 - one_minus) / 2
            return mpmath.exp(-gamma)
        return 1 - (1 - mpmath.mpf(final)) ** (mpmath.mpf(l) / depth)


def target(kind, t, l, depth, final):
    rho = float(schedule_mp(kind, l, depth, final))
    if kind == "e-spa":
        d = np.abs(np.subtract.outer(np.arange(t), np.arange(t)))
        return np.where(d == 0, 1.0, rho ** d)
    return (1 - rho) * np.eye(t) + rho * np.ones((t, t))


def sym_sqrt(s):
    w, v = np.linalg.eigh(s)
    return v @ np.diag(np.sqrt(w)) @ v.T


def dense_reference(kind, t, l, depth, final, causal):
    """A_l = F_l F_{l−1}^{-1} from numpy's Cholesky (causal) or the symmetric square root, general inverse."""
    if l == 0:
        return np.eye(t)
    factor = np.linalg.cholesky if causal else sym_sqrt
    return factor(target(kind, t, l, depth, final)) @ np.linalg.inv(factor(target(kind, t, l - 1, depth, final)))


CASES = [("e-spa", True, 24, None), ("e-spa", False, 24, None), ("u-spa", True, 24, None),
         ("u-spa", False, 24, None), ("e-spa", True, 10, 0.3), ("u-spa", True, 10, 0.5), ("u-spa", False, 6, 0.2)]


@pytest.mark.parametrize("kind,causal,depth,final", CASES)
def test_engine_and_simulator_matrices_equal_the_dense_cholesky_reference(kind, causal, depth, final):
    """Every step of the schedule; tolerance 1e-10 relative to the largest entry (measured worst 7.5e-13: the
    reference inverts an ill-conditioned factor at γ_L = 0.005)."""
    t = 32
    fin = FINAL[kind] if final is None else final
    for l in range(depth + 1):
        ref = dense_reference(kind, t, l, depth, fin, causal)
        for name, mod in (("engine", engine_spa), ("simulator", sim_spa)):
            a = mod.attention_matrix(kind, t, l, depth, final, causal=causal)
            np.testing.assert_allclose(a, ref, rtol=0, atol=1e-10 * np.abs(ref).max(), err_msg=f"{name} step {l}")


@pytest.mark.parametrize("kind", ["e-spa", "u-spa"])
def test_schedule_against_the_papers_relation_at_50_digits(kind):
    """The engine's Σ_l[0, 1] and the simulator's ρ_l equal the paper's schedule to 1e-14; the final target
    is the documented one (E-SPA e^{−0.005|i−j|}, U-SPA 0.2 I + 0.8 11ᵀ)."""
    depth, t = 12, 5
    for l in range(depth + 1):
        want = float(schedule_mp(kind, l, depth, FINAL[kind]))
        assert engine_spa.target_kernel(kind, t, l, depth)[0, 1] == pytest.approx(want, abs=1e-14)
        assert sim_spa.correlation(kind, l, depth) == pytest.approx(want, abs=1e-14)
    d = np.abs(np.subtract.outer(np.arange(t), np.arange(t)))
    final = np.exp(-0.005 * d) if kind == "e-spa" else 0.2 * np.eye(t) + 0.8
    np.testing.assert_allclose(engine_spa.target_kernel(kind, t, depth, depth), final, rtol=1e-14)
    # literal values of the paper's E-SPA relation (mpmath, 50 digits): γ_1 for L = 12 and γ_L = 0.005
    if kind == "e-spa":
        assert -np.log(sim_spa.correlation(kind, 1, 12)) == pytest.approx(
            float(-mpmath.log(schedule_mp(kind, 1, 12, 0.005))), rel=1e-13)


def ar1_attention(t, rho1, rho0):
    """E-SPA causal A_l = F_l F_{l−1}^{-1} for AR(1) Cholesky factors, derived by hand:
    A[0,0] = 1, A[i,i] = s1/s0, A[i,j] = (s1/s0) ρ1^{i−j−1}(ρ1 − ρ0) (i > j ≥ 1), A[i,0] = ρ1^{i−1}(ρ1 − s1ρ0/s0)."""
    s1, s0 = np.sqrt(1 - rho1 ** 2), np.sqrt(1 - rho0 ** 2)
    a = np.zeros((t, t))
    a[0, 0] = 1
    for i in range(1, t):
        a[i, i] = s1 / s0
        a[i, 0] = rho1 ** (i - 1) * (rho1 - s1 * rho0 / s0)
        for j in range(1, i):
            a[i, j] = s1 / s0 * rho1 ** (i - j - 1) * (rho1 - rho0)
    return a


@pytest.mark.parametrize("depth,gamma_final", [(10, 0.005), (64, 0.005), (100, 0.05)])
def test_e_spa_matrix_is_the_ar1_closed_form_positive_with_the_stated_diagonal(depth, gamma_final):
    t = 128
    for l in (1, 2, depth // 2, depth):
        rho1, rho0 = (float(schedule_mp("e-spa", k, depth, gamma_final)) for k in (l, l - 1))
        want = ar1_attention(t, rho1, rho0)
        for mod in (engine_spa, sim_spa):
            a = mod.attention_matrix("e-spa", t, l, depth, gamma_final, causal=True)
            np.testing.assert_allclose(a, want, rtol=1e-9, atol=1e-300)
        lower = a[np.tril_indices(t)]
        assert lower.min() > 0                                   # entrywise positive: softmax-realisable
        diag = (1 - np.exp(-2 * gamma_final)) ** (1 / (2 * depth))
        np.testing.assert_allclose(np.diag(a)[1:], diag, rtol=1e-12)


@pytest.mark.parametrize("kind,causal", [("e-spa", True), ("u-spa", True), ("e-spa", False), ("u-spa", False)])
def test_realised_softmax_form_composes_to_the_targets(kind, causal):
    """Σ_l = (A_l ⋯ A_1)(A_l ⋯ A_1)ᵀ for the realised D softmax(B + M) of both constructions, against the
    50-digit schedule's dense targets; and the engine's (D, B) rebuild its own A."""
    depth, t = 12, 40
    for mod in (engine_spa, sim_spa):
        prod = np.eye(t)
        for l in range(1, depth + 1):
            if mod is sim_spa:
                a = sim_spa.realised(kind, t, l, depth, causal=causal)
            else:
                d, b = engine_spa.softmax_form(engine_spa.attention_matrix(kind, t, l, depth, causal=causal), causal)
                z = np.exp(b - b.max(1, keepdims=True))
                a = d[:, None] * z / z.sum(1, keepdims=True)
            if causal:
                assert np.all(a[np.triu_indices(t, 1)] == 0)   # the mask holds exactly
            prod = a @ prod
            np.testing.assert_allclose(prod @ prod.T, target(kind, t, l, depth, FINAL[kind]), rtol=0, atol=1e-11,
                                       err_msg=f"{mod.__name__} step {l}")


@pytest.mark.parametrize("mod", [engine_spa, sim_spa], ids=["engine", "simulator"])
@pytest.mark.parametrize("kind,step,final,field,allowed", [
    ("u-spa", 1, 1.5, "attention.spa_final", "U-SPA needs a final correlation ρ_L in [0, 1)"),
    ("u-spa", 1, -0.1, "attention.spa_final", "U-SPA needs a final correlation ρ_L in [0, 1)"),
    ("e-spa", 1, 0.0, "attention.spa_final", "E-SPA needs a final decay γ_L > 0"),
    ("e-spa", 3, None, "attention.spa_step", "must lie in [0, spa_layers = 2]"),
    ("x-spa", 1, 0.5, "attention.spa", "must be one of ['e-spa', 'u-spa']"),
])
def test_spa_bad_parameters_are_spec_errors(mod, kind, step, final, field, allowed):
    with pytest.raises(kp.SpecError) as info:
        mod.attention_matrix(kind, 4, step, 2, final)
    assert info.value.field == field and info.value.allowed == allowed
    if kind != "x-spa":
        assert info.value.value == (step if "step" in field else final)


def test_spa_bad_parameters_in_a_network_are_spec_errors():
    with pytest.raises(kp.SpecError, match="spa_final"):
        kp.propagate(Network(block=[Attention(spa="u-spa", spa_final=1.5)], depth=2), I.identity(4))
    with pytest.raises(kp.SpecError, match="scores"):
        Attention(spa="e-spa", scores="tied")


@pytest.mark.parametrize("mod", [engine_spa, sim_spa], ids=["engine", "simulator"])
def test_u_spa_with_final_correlation_zero_keeps_the_identity(mod):
    """ρ_L = 0 is allowed: every target is I and every A_l the identity."""
    for causal in (True, False):
        np.testing.assert_allclose(mod.attention_matrix("u-spa", 5, 2, 3, 0.0, causal=causal), np.eye(5), atol=1e-15)


def test_softmax_form_bias_is_the_log_of_the_normalised_rows():
    """B = log(D⁻¹A): each row of exp(B) sums to 1 (not only up to a row shift)."""
    a = engine_spa.attention_matrix("e-spa", 16, 3, 12)
    d, b = engine_spa.softmax_form(a, True)
    np.testing.assert_allclose(d, a.sum(1), rtol=1e-15)
    np.testing.assert_allclose(np.exp(b).sum(1), 1.0, rtol=1e-13)


@pytest.mark.parametrize("mod", [engine_spa, sim_spa], ids=["engine", "simulator"])
def test_a_matrix_with_negative_entries_is_refused(mod, monkeypatch):
    """No schedule of the package reaches it (searched: E-SPA γ_L in [1e-3, 50], U-SPA ρ_L in [0.1, 0.999],
    T ≤ 64, L ≤ 8, half steps); a decreasing correlation does: U-SPA bidirectional from ρ = 0.9 to 0.45 has
    off-diagonal entries (c − sqrt(0.55/0.1))/T < 0, c = sqrt((0.55 + 0.45T)/(0.1 + 0.9T))."""
    if mod is engine_spa:
        monkeypatch.setattr(engine_spa, "target_kernel",
                            lambda kind, t, step, layers, final=None: (1 - 0.9 / step) * np.eye(t) + 0.9 / step)
    else:
        monkeypatch.setattr(sim_spa, "correlation", lambda kind, step, layers, final=None: 0.9 / step)
    with pytest.raises(kp.SpecError) as info:
        mod.attention_matrix("u-spa", 6, 2, 9, causal=False)
    assert info.value.field == "attention.spa" and "negative entry" in info.value.allowed
    assert "use causal = true" in info.value.allowed


@pytest.mark.parametrize("kind", ["e-spa", "u-spa"])
def test_attention_only_spa_stack_reproduces_the_targets_exactly(kind):
    depth, t = 40, 48
    for causal in (True, False):
        tr = kp.propagate(Network(block=[Attention(spa=kind, causal=causal)], depth=depth), I.identity(t))
        for l in range(depth + 1):
            np.testing.assert_allclose(tr.kernels[l], target(kind, t, l, depth, FINAL[kind]), atol=1e-11)


@pytest.mark.parametrize("kind", ["e-spa", "u-spa"])
def test_attention_only_spa_stack_is_exact_at_finite_width_with_orthogonal_values(kind):
    """He et al. 2023: with orthogonal value/output weights and exact orthogonal inputs, the realised
    D_l softmax(B_l + M) attention maps the finite-width kernel onto the target to float precision."""
    depth, t = 24, 32
    net = Network(block=[Attention(spa=kind, causal=True)], depth=depth)
    sim = mc.simulate(net, I.identity(t), width=2 * t, seeds=2, init="orthogonal", seed=0, dong=False)
    for l in range(depth + 1):
        np.testing.assert_allclose(sim.kernels[l], target(kind, t, l, depth, FINAL[kind]), atol=1e-11)


def test_the_simulator_sees_a_slip_in_the_engines_spa(monkeypatch):
    """An engine whose A_l is 1 % off in one entry now disagrees with the exact finite-width network
    (measured 3.1e-2 on Σ_L); before, the simulator called the same function and agreed to 1e-15."""
    depth, t = 6, 12
    net = Network(block=[Attention(spa="e-spa", causal=True)], depth=depth)
    sim = mc.simulate(net, I.identity(t), width=2 * t, seeds=2, init="orthogonal", seed=0, dong=False)
    good = kp.propagate(net, I.identity(t))
    assert np.abs(good.kernels - sim.kernels).max() < 1e-11
    original = engine_spa.attention_matrix

    def slipped(*args, **kw):
        a = original(*args, **kw).copy()
        a[-1, -1] *= 1.01
        return a

    monkeypatch.setattr(engine_spa, "attention_matrix", slipped)
    bad = kp.propagate(net, I.identity(t))
    again = mc.simulate(net, I.identity(t), width=2 * t, seeds=2, init="orthogonal", seed=0, dong=False)
    np.testing.assert_allclose(again.kernels, sim.kernels, rtol=0, atol=1e-14)     # the simulator is unmoved
    assert np.abs(bad.kernels[-1] - sim.kernels[-1]).max() > 1e-2
