"""The vectorised route of the quadrature: Mehler's expansion in the correlation with a bound
(docs/theory.md §1.3), against independent references.

References: closed forms (``E[e^u e^v] = exp((a + b + 2s)/2)``, ``E[sin(ωu) sin(ωv)]``),
``scipy.integrate.quad`` for single coefficients, and the battery's nested scipy references
(``battery.py``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kernelprop.errors import SpecError
from kernelprop.kernel import quadrature as quad
from kernelprop.kernel.maps import Context
from kernelprop.kernel.state import KernelState
from kernelprop.layers import Activation, Dense, GatedMLP

from . import battery as B

pytestmark = pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")  # the references' own
BY_NAME = {h.name: h for h in B.BATTERY}
TOL = quad.DEFAULT_TOL


def _npdf(z):
    return math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _h(k, z):
    """Orthonormal Hermite function He_k(z)/sqrt(k!) by scipy's physicists' polynomials."""
    from scipy.special import eval_hermitenorm
    return float(eval_hermitenorm(k, z)) / math.sqrt(math.factorial(k))


# --- the 1-D coefficients ----------------------------------------------------------------------

@pytest.mark.parametrize("f,fs,kinks,a", [
    (lambda x: np.tanh(8.0 * x), lambda x: math.tanh(8.0 * x), (), 1.0),
    (np.exp, math.exp, (), 4.0),
    (lambda x: np.maximum(x - 0.33, 0.0), lambda x: max(x - 0.33, 0.0), (0.33,), 2.0),
    (lambda x: np.where(x > -0.4, 1.0, 0.0), lambda x: 1.0 if x > -0.4 else 0.0, (-0.4,), 0.5),
])
def test_coefficients_against_scipy(f, fs, kinks, a):
    """Each coefficient (k ≤ 32, the coarsest panels) of ``f(sqrt(a) z)`` on ``|z| ≤ 12`` within its
    reported error of scipy's quad, split at the kink; for the sharp tanh(8x) the Gauss–Kronrod
    difference is the dominant term of the error."""
    c, err, energy, energy_err = quad.hermite_coefficients(f, [a], 32, kinks)
    sa = math.sqrt(a)
    pts = sorted({k / sa for k in kinks} | {0.0})
    for k in range(33):
        ref, ref_err = B.quad_split(lambda z, k=k: fs(sa * z) * _h(k, z) * _npdf(z), -12.0, 12.0, pts, eps=1e-16)
        assert abs(c[0, k] - ref) <= err[0, k] + ref_err, k
    ref = B.quad_split(lambda z: fs(sa * z) ** 2 * _npdf(z), -12.0, 12.0, pts, eps=1e-16)[0]
    assert abs(energy[0] - ref) <= energy_err[0]
    if f is not np.exp and not kinks:
        assert err[0].max() > 1e3 * quad._ROUND_OFF  # the quadrature term is what the bound rests on here


# --- the bound of the expansion ----------------------------------------------------------------

@pytest.mark.parametrize("a,b,r", [(1.0, 1.0, 0.2), (0.3, 0.3, 0.05), (1.0, 1.0, 0.5), (0.5, 2.0, 0.9),
                                   (1.0, 1.0, -0.6), (2.0, 2.0, 0.99), (1.0, 1.0, 1.0), (1.0, 4.0, 0.0)])
@pytest.mark.parametrize("grouped", [True, False])
def test_exponential_pair_is_bounded_and_tight(a, b, r, grouped, monkeypatch):
    """``E[e^u e^v] = exp((a + b + 2s)/2)``. Where the truncation dominates (small ρ > 0, f = g) the
    Cauchy–Schwarz bound is nearly attained: reported/true ≤ 3 (a bound one power of |ρ| looser fails).
    Both ways of choosing the order: thresholds per variance pair, and entry by entry."""
    if not grouped:
        monkeypatch.setattr(quad, "_MEHLER_GROUPS", 0)
    s = r * math.sqrt(a * b)
    exact = math.exp(0.5 * (a + b + 2 * s))
    for margin in (quad._MEHLER_MARGIN, 1.0):  # 1.0: the smallest order meeting the tolerance
        v, e, done = quad.mehler_pairs(np.exp, np.exp, [a], [b], [s], same=False, margin=margin)
        assert done[0]
        true = abs(v[0] - exact)
        assert true <= e[0] <= TOL * math.exp(a + b)
        if margin == 1.0 and (a, b, r) in ((1.0, 1.0, 0.2), (0.3, 0.3, 0.05)):
            assert e[0] <= 3.0 * true, (e[0], true)


@pytest.mark.parametrize("name", ["tanh", "gelu", "erf(3x)", "sin(2x)", "leaky-tat", "elu", "selu",
                                  "hard-tanh", "relu-undeclared", "step-undeclared", "d-selu", "relu6"])
def test_battery_entries_are_bounded(name):
    """Battery × second moments (unequal variances, ρ = 0.5, −0.7, 0, near ±1, exactly 1): every entry
    the expansion resolves is within its reported error of the reference, that error ≤ tol; smooth
    members are resolved everywhere; the full route (expansion, then per-entry rules) bounds every
    entry of a 2×2 kernel."""
    h = BY_NAME[name]
    pairs = B.PAIRS + [(1.0, 2.5, 0.0)]
    a, b, s = np.array(pairs).T
    kinks = h.kinks_for_quadrature
    cuts = kinks if kinks is not None else quad._fallback_kinks(h, h, np.sqrt(a), np.sqrt(b))
    v, e, done = quad.mehler_pairs(h, h, a, b, s, kinks=cuts, same=False)
    if not h.kinks:
        assert done.all()
    assert done.sum() >= 5
    for key, val, err, ok in zip(pairs, v, e, done):
        if not ok:
            continue
        ref, ref_err = B.reference_pair(h, *key)
        scale = math.sqrt(B.reference_mean(_Square(h), key[0])[0] * B.reference_mean(_Square(h), key[1])[0])
        assert abs(val - ref) - ref_err <= err <= TOL * scale * (1 + 1e-12), (key, val, ref, err)
    for key in pairs[3:6]:
        S = np.array([[key[0], key[2]], [key[2], key[1]]])
        K, err = quad.gauss_hermite_kernel(h, h, S, kinks=kinks)
        for (i, j), kk in zip(((0, 1), (0, 0), (1, 1)), (key, (key[0],) * 3, (key[1],) * 3)):
            ref, ref_err = B.reference_pair(h, *kk)
            assert abs(K[i, j] - ref) - ref_err <= err, (key, i, j)


class _Square:
    """``h²`` with ``h``'s cuts, for the reference scale ``E h²``."""

    def __init__(self, h):
        self.h, self.kinks, self.features = h, h.kinks, getattr(h, "features", ())

    def scalar(self, x):
        return self.h.scalar(x) ** 2


def test_kernel_with_unequal_diagonals_against_closed_form():
    """``E[sin(ωu) sin(ωv)] = e^{−ω²(a+b)/2} sinh(ω² s)`` on a 7-token kernel with unequal variances,
    ρ = 0, ρ within 1e-9 of ±1 (a duplicated and a negated token): every entry within the reported bound."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 5)) * np.array([1.0, 0.5, 2.0, 0.3, 1.0])
    x[5] = x[0] * (1 + 1e-9)
    x[6] = -x[1]
    x[4] = x[4] - x[4] @ x[3] / (x[3] @ x[3]) * x[3]  # ρ = 0 with token 3
    S = x @ x.T / 5
    for w in (1.0, 2.5):
        f = (lambda z, w=w: np.sin(w * z))
        K, err = quad.gauss_hermite_kernel(f, f, S)
        d = np.diag(S)
        exact = np.exp(-0.5 * w * w * (d[:, None] + d[None, :])) * np.sinh(w * w * S)
        assert np.abs(K - exact).max() <= err < TOL
        assert abs(S[3, 4]) < 1e-15


def test_many_variances_against_closed_form():
    """300 tokens, each its own variance (the order chosen entry by entry), through sin(1.5x): every
    entry within the reported bound of ``e^{−ω²(a+b)/2} sinh(ω² s)``."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 40)) * np.sqrt(rng.uniform(0.2, 3.0, size=(300, 1)))
    x[1] = x[0]
    S = x @ x.T / 40
    f = (lambda z: np.sin(1.5 * z))
    assert np.unique(np.diag(S)).size ** 2 > quad._MEHLER_GROUPS
    K, err = quad.gauss_hermite_kernel(f, f, S)
    d = np.diag(S)
    exact = np.exp(-0.5 * 2.25 * (d[:, None] + d[None, :])) * np.sinh(2.25 * S)
    assert np.abs(K - exact).max() <= err < TOL


def test_kinked_entries_near_one_fall_back():
    """ELU at ρ = ±0.99999: the expansion cannot meet the tolerance (slow coefficient decay) and leaves
    the entry to the per-entry rule; the kernel is still within the bound."""
    h = BY_NAME["elu"]
    S = np.array([[1.0, 0.99999, -0.99999], [0.99999, 1.0, -0.99999], [-0.99999, -0.99999, 1.0]])
    v, e, done = quad.mehler_pairs(h, h, [1.0, 1.0], [1.0, 1.0], [0.99999, 0.3], kinks=h.kinks)
    assert not done[0] and done[1]
    K, err = quad.gauss_hermite_kernel(h, h, S, kinks=h.kinks)
    ref, ref_err = B.reference_pair(h, 1.0, 1.0, 0.99999)
    assert abs(K[0, 1] - ref) - ref_err <= err < 1e-10


def test_declared_smooth_but_kinked_is_not_trusted():
    """A kink declared away (``kinks=()``) inside a panel: the Gauss–Kronrod differences of the
    coefficients are large, so the expansion does not claim the entries at the tolerance, and the
    kernel's reported error still bounds its distance to the battery's reference."""
    h = B.Piecewise("relu-shifted", [(-B.INF, 0.3333, 0, 0, 0, 0), (0.3333, B.INF, -0.3333, 1, 0, 0)])
    c, err, *_ = quad.hermite_coefficients(h, [1.0], 32, ())
    assert err[0].max() > 1e-8
    rhos = [0.5, -0.2, 0.9]
    v, e, done = quad.mehler_pairs(h, h, [1.0] * 3, [1.0] * 3, rhos, kinks=())
    for r, val, bound, ok in zip(rhos, v, e, done):
        ref, ref_err = B.reference_pair(h, 1.0, 1.0, r)
        assert not ok or abs(val - ref) - ref_err <= bound
    S = np.array([[1.0, 0.5], [0.5, 1.0]])
    K, kerr = quad.gauss_hermite_kernel(h, h, S, kinks=())
    ref, ref_err = B.reference_pair(h, 1.0, 1.0, 0.5)
    assert abs(K[0, 1] - ref) - ref_err <= kerr


def test_method_argument():
    S = np.array([[1.0, 0.3], [0.3, 2.0]])
    k1, e1 = quad.gauss_hermite_kernel(np.tanh, np.tanh, S)
    k2, e2 = quad.gauss_hermite_kernel(np.tanh, np.tanh, S, method="adaptive")
    assert np.abs(k1 - k2).max() <= e1 + e2
    with pytest.raises(SpecError):
        quad.gauss_hermite_kernel(np.tanh, np.tanh, S, method="fast")


def test_many_tokens_resolved_by_the_expansion():
    """A 256-token LayerNorm-like kernel through SiLU: every entry resolved by the expansion itself
    (no per-entry fallback), bound ≤ tol; spot entries against the per-entry rule."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((256, 32)) + 0.7 * rng.standard_normal(32)
    x -= x.mean(1, keepdims=True)
    x /= np.sqrt((x * x).mean(1, keepdims=True))
    S = x @ x.T / 32
    silu = (lambda z: z / (1.0 + np.exp(-z)))
    ii, jj = np.triu_indices(256)
    v, e, done = quad.mehler_pairs(silu, silu, S[ii, ii], S[jj, jj], S[ii, jj], kinks=())
    assert done.all() and e.max() < TOL * 0.8  # E silu(z)² ≈ 0.36
    pick = rng.choice(ii.size, 12, replace=False)
    ref, ref_err = quad.pair_expectations(silu, silu, S[ii, ii][pick], S[jj, jj][pick], S[ii, jj][pick])
    assert np.all(np.abs(v[pick] - ref) <= e[pick] + ref_err)


# --- through the layers -------------------------------------------------------------------------

def _run(layers, sigma, monkeypatch=None, method="auto"):
    if monkeypatch is not None:
        original = quad.gauss_hermite_kernel

        def forced(*args, **kw):
            kw["method"] = method
            return original(*args, **kw)
        monkeypatch.setattr(quad, "gauss_hermite_kernel", forced)
    s = KernelState(sigma.copy(), np.zeros(sigma.shape[0]), (sigma.shape[0],))
    ctx = Context(None)
    backs = []
    for layer in layers:
        s, back = layer.kernel_map(s, ctx)
        backs.append(back)
    pi = np.eye(sigma.shape[0])
    for back in reversed(backs):
        pi = back(pi, [])
    if monkeypatch is not None:
        monkeypatch.setattr(quad, "gauss_hermite_kernel", original)
    return s, pi


def test_layers_unchanged_within_the_bound(monkeypatch):
    """A Dense → gelu_tanh → Dense → SwiGLU chain (and its backward pass) by the expansion equals the
    per-entry route within the sum of the two reported errors."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((6, 4)) * np.array([1.0, 0.7, 1.3, 0.5])
    sigma = x @ x.T / 4
    layers = [Dense(weight_var=1.5, bias_var=0.1), Activation("gelu_tanh"), Dense(weight_var=2.0),
              GatedMLP("silu"), Activation(np.tanh, derivative=lambda z: 1 - np.tanh(z) ** 2)]
    new, pi_new = _run(layers, sigma)
    old, pi_old = _run(layers, sigma, monkeypatch, "adaptive")
    assert 0 < new.quad_error < 1e-9
    assert np.abs(new.sigma - old.sigma).max() <= new.quad_error + old.quad_error
    assert np.abs(pi_new - pi_old).max() <= 1e-9 * np.abs(pi_old).max()


def test_propagate_unchanged_within_the_bound(monkeypatch):
    """``propagate`` through a 3-block GPT-2-style network (tied causal attention, LayerNorm, gelu_tanh
    MLP and a SwiGLU branch) at T = 12: the expansion and the per-entry route agree within the sum of
    their accumulated ``quad_error``."""
    import kernelprop as kp
    from kernelprop import inputs as I
    from kernelprop.network.layers import Attention, LayerNorm, Network, Residual, Serial

    mlp = Serial([LayerNorm(), Dense(), Activation("gelu_tanh"), Dense()])
    net = Network(block=[Residual(Attention(scores="tied", causal=True), beta="1/sqrt(L)"),
                         Residual(mlp, beta="1/sqrt(L)"), Residual(Serial([LayerNorm(), GatedMLP("silu")]))],
                  depth=3)
    x = I.equicorrelated(12, 1.0, 0.3)
    new = kp.propagate(net, x, every=3)
    original = quad.gauss_hermite_kernel

    def forced(*args, **kw):
        kw["method"] = "adaptive"
        return original(*args, **kw)
    monkeypatch.setattr(quad, "gauss_hermite_kernel", forced)
    old = kp.propagate(net, x, every=3)
    err_new, err_old = new.final["quad_error"], old.final["quad_error"]
    assert 0 < err_new < 1e-10
    assert np.abs(np.asarray(new.kernels[-1]) - np.asarray(old.kernels[-1])).max() <= err_new + err_old
