"""The fast paths of the numeric engine give the same numbers as the direct formulas, and the options that
select work (measures, threads) and the lazy imports do what they say. No timings here (benchmarks/)."""

import subprocess
import sys

import numpy as np
import pytest
from threadpoolctl import threadpool_info
from typer.testing import CliRunner

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop import measures as M
from kernelprop.cli import app
from kernelprop.errors import SpecError
from kernelprop.kernel import threads as TH
from kernelprop.kernel.state import KernelState
from kernelprop.layers.attention import matrices as MX
from kernelprop.methods.presets import build
from kernelprop.network import walk as W
from kernelprop.network.layers import Attention, Network, Residual

runner = CliRunner()


def _psd(n, seed):
    x = np.random.default_rng(seed).standard_normal((n, n + 3))
    return x @ x.T / (n + 3)


def _tied_softmax(sigma, qk, causal, flush=True):
    """The tied 1/d attention matrix written out: softmax(σ_qk² Σ + mask), weights below e^-700 set to 0."""
    z = qk * sigma.copy()
    if causal:
        z[np.triu_indices(len(z), 1)] = -np.inf
    z -= z.max(axis=1, keepdims=True)
    if flush:
        z[z < -700] = -np.inf
    a = np.exp(z)
    return a / a.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# attention fast paths


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t", [37, 520])       # 520: the dense product by the split Σ = L + Lᵀ
def test_tied_mixing_equals_the_written_out_product(causal, t):
    sigma = _psd(t, 1)
    layer = Attention(scores="tied", causal=causal, qk_var=0.7)
    (w, m), = MX.head_mixings(layer, sigma, (t,), {})
    a = _tied_softmax(sigma, 0.7, causal)
    out = m.kernel(sigma)
    np.testing.assert_allclose(out, a @ sigma @ a.T, rtol=1e-13, atol=1e-14)
    assert np.array_equal(out, out.T)                      # exactly symmetric
    collapsed = 0.999 + 0.001 * sigma                      # near rank one: no cancellation in the split
    np.testing.assert_allclose(m.kernel(collapsed), a @ collapsed @ a.T, rtol=1e-13)
    assert w == 1.0 and m.lower == causal


@pytest.mark.parametrize("n", [5, 200, 530])      # 530: tile by tile, a partial last tile
def test_symmetrised_is_bitwise_the_plain_formula(n):
    x = np.random.default_rng(n).standard_normal((n, n))
    np.testing.assert_array_equal(MX.symmetrised(x.copy()), (x + x.T) * 0.5)
    np.testing.assert_array_equal(MX.symmetrised(x.copy(), average=False), x + x.T)
    f = np.asfortranarray(x)
    out = MX.symmetrised(f.copy(order="F"))
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, (x + x.T) * 0.5)


def test_tied_causal_with_two_sequences_takes_the_general_product():
    sigma = _psd(20, 2)
    layer = Attention(scores="tied", causal=True)
    (_, m), = MX.head_mixings(layer, sigma, (12, 8), {})
    a1, a2 = _tied_softmax(sigma[:12, :12], 1.0, True), _tied_softmax(sigma[12:, 12:], 1.0, True)
    full = np.zeros((20, 20))
    full[:12, :12], full[12:, 12:] = a1, a2
    expect = full @ sigma @ full.T
    np.testing.assert_allclose(m.kernel(sigma), expect, rtol=1e-13, atol=1e-15)


def test_underflow_flush_is_skipped_only_when_nothing_can_underflow():
    sigma = np.eye(6) + 0.2
    assert not MX._flush_needed(Attention(scores="tied", qk_var=100.0), sigma)        # gap ≤ 2·100·1.2 < 700
    assert MX._flush_needed(Attention(scores="tied", qk_var=400.0), sigma)            # gap may exceed 700
    assert MX._flush_needed(Attention(scores="tied", bias="alibi", heads=2), sigma)   # a bias widens the gap
    # where it is needed the flush still acts: weights below e^-700 are exactly 0
    layer = Attention(scores="tied", qk_var=800.0)
    (_, m), = MX.head_mixings(layer, sigma, (6,), {})
    a = m.blocks[0]
    np.testing.assert_array_equal(a, _tied_softmax(sigma, 800.0, False))
    assert np.all(a[~np.eye(6, dtype=bool)] == 0.0)


def test_offsets_are_built_once_per_run_and_read_only():
    cache: dict = {}
    layer = Attention(causal=True, bias="alibi", heads=2)
    first = MX.cached_offsets(layer, 9, "attention", cache)
    assert MX.cached_offsets(layer, 9, "attention", cache) is first and not first.flags.writeable
    np.testing.assert_array_equal(first, MX.logit_offsets(layer, 9, "attention"))


# ----------------------------------------------------------------------------------------------
# the walk and the state


def test_a_block_without_l_is_resolved_once_and_gives_the_per_block_result():
    net = Network(block=[Residual(Attention(scores="tied", causal=True), beta="1/sqrt(L)")], depth=6)
    blocks = [u.layer for u in W.units(net, kernel_only=True) if u.section == "block"]
    assert all(b is blocks[0] for b in blocks)
    # the same network written with a term in l that is always 0 is resolved block by block
    per_block = Network(block=[Residual(Attention(scores="tied", causal=True), beta="1/sqrt(L) + 0*l")], depth=6)
    layers = [u.layer for u in W.units(per_block) if u.section == "block"]
    assert len({id(b) for b in layers}) == 6
    x = I.equicorrelated(24, 1.0, 0.2)
    np.testing.assert_array_equal(kp.propagate(net, x).kernels, kp.propagate(per_block, x).kernels)


def test_a_block_with_l_is_resolved_at_every_index():
    net = Network(block=[Residual(Attention(), beta="1/sqrt(l)")], depth=4)
    betas = [u.layer.layers[0].beta for u in W.units(net, kernel_only=True) if u.section == "block"]
    np.testing.assert_allclose(betas, 1 / np.sqrt([1, 2, 3, 4]), rtol=1e-15)


def test_state_replace_keeps_fields_and_refuses_unknown_ones():
    s = KernelState(np.eye(2), np.zeros(2), (2,), quad_error=0.5)
    r = s.replace(width=2.0)
    assert r.width == 2.0 and r.quad_error == 0.5 and r.sigma is s.sigma and s.width == 1.0
    with pytest.raises(TypeError, match="widht"):
        s.replace(widht=2.0)


# ----------------------------------------------------------------------------------------------
# measures only where asked


def test_selected_measures_are_the_full_ones(monkeypatch):
    sigma = _psd(10, 3)
    full = M.compute(sigma, (6, 4), np.arange(10.0))
    calls = []
    real = np.linalg.eigvalsh
    monkeypatch.setattr(np.linalg, "eigvalsh", lambda a: calls.append(1) or real(a))
    some = M.compute(sigma, (6, 4), np.arange(10.0), names=("cos_min", "rank_one_distance", "cross_cos_mean"))
    assert set(some) == {"cos_min", "rank_one_distance", "cross_cos_mean"} and not calls    # no spectrum
    for k, v in some.items():
        assert v == full[k]
    spec = M.compute(sigma, (6, 4), names=("eig_ratio",))
    assert set(spec) == {"eig_ratio"} and spec["eig_ratio"] == full["eig_ratio"] and len(calls) == 2


def test_off_diagonal_cosines_match_the_written_out_average():
    sigma = _psd(11, 4)
    d = np.sqrt(np.diag(sigma))
    cos = sigma / np.outer(d, d)
    blocks = [cos[:7, :7], cos[7:, 7:]]
    off = [b[~np.eye(len(b), dtype=bool)] for b in blocks]
    m = M.compute(sigma, (7, 4), names=("cos_mean", "cos_min", "cos_first"))
    np.testing.assert_allclose(m["cos_mean"], np.mean([o.mean() for o in off]), rtol=1e-14)
    np.testing.assert_allclose(m["cos_min"], min(o.min() for o in off), rtol=1e-15)
    np.testing.assert_allclose(m["cos_first"], cos[:7, 0], rtol=1e-15)     # the diagonal is left as it was


def test_propagate_computes_only_the_measures_asked(monkeypatch):
    net, x = build("pre_ln", 4), I.equicorrelated(16, 1.0, 0.3)
    full = kp.propagate(net, x)
    calls = []
    real = np.linalg.eigvalsh
    monkeypatch.setattr(np.linalg, "eigvalsh", lambda a: calls.append(1) or real(a))
    r = kp.propagate(net, x, measures=("cos_mean", "q_mean"))
    assert set(r.measures) == {"cos_mean", "q_mean"} and not calls
    np.testing.assert_array_equal(r["cos_mean"], full["cos_mean"])
    np.testing.assert_array_equal(r.kernels, full.kernels)
    assert kp.propagate(net, x, measures=()).measures == {}
    # a spectral measure asked by name is computed even where "auto" would skip spectra
    big = kp.propagate(Network(block=[Residual(Attention())], depth=1), I.equicorrelated(520, 1.0, 0.3),
                       keep_kernels=False, measures=("stable_rank",))
    np.testing.assert_allclose(big["stable_rank"][0], 520 / (1 + 519 * 0.3), rtol=1e-10)   # docs/theory.md §7


def test_bad_measure_names_are_spec_errors():
    net, x = build("pre_ln", 2), I.equicorrelated(8, 1.0, 0.3)
    with pytest.raises(SpecError, match="allowed: q_mean") as e:
        kp.propagate(net, x, measures=("cos_mean", "cos_maen"))
    assert e.value.field == "measures"
    with pytest.raises(SpecError, match="spectral"):
        kp.propagate(net, x, measures=("stable_rank",), spectral=False)
    with pytest.raises(SpecError):
        kp.propagate(net, x, measures="cos_mean")          # a string, not a list of names
    with pytest.raises(SpecError, match="one"):
        kp.propagate(net, x, measures=("cross_cos_mean",))   # one sequence: nothing to compare
    with pytest.raises(SpecError, match="ntk"):
        kp.propagate(net, x, measures=("ntk_mean",))       # only with ntk=True
    r = kp.propagate(net, x, ntk=True, measures=("ntk_mean",))
    assert set(r.measures) == {"ntk_mean"}


def test_cli_run_measures(tmp_path):
    out = tmp_path / "r.csv"
    res = runner.invoke(app, ["run", "--preset", "pre_ln", "-L", "3", "--tokens", "8", "--measures", "q_mean,cos_min",
                              "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert {line.split(",")[3] for line in out.read_text().splitlines()[1:]} == {"q_mean", "cos_min"}
    bad = runner.invoke(app, ["run", "--preset", "pre_ln", "-L", "3", "--tokens", "8", "--measures", "cosmean"])
    assert bad.exit_code == 2 and "--measures" in bad.output and "rank_one_distance" in bad.output
    assert runner.invoke(app, ["run", "--preset", "pre_ln", "--tokens", "8", "--threads", "0"]).exit_code == 2


# ----------------------------------------------------------------------------------------------
# BLAS threads


def test_thread_choice(monkeypatch):
    monkeypatch.delenv(TH.ENV, raising=False)
    monkeypatch.setattr(TH, "cores", lambda: 4)
    monkeypatch.setattr(TH.os, "getloadavg", lambda: (0.3, 0.3, 0.3))
    assert TH.choose(64) == 1 and TH.choose(TH.PARALLEL_TOKENS) == 4
    monkeypatch.setattr(TH.os, "getloadavg", lambda: (3.6, 3.0, 3.0))      # busy: one thread
    assert TH.choose(4096) == 1
    monkeypatch.setenv(TH.ENV, "3")
    assert TH.choose(64) == 3 and TH.choose(64, threads=2) == 2              # argument > environment > rule
    monkeypatch.setenv(TH.ENV, "many")
    with pytest.raises(SpecError, match=TH.ENV):
        TH.choose(64)
    for bad in (0, -1, 1.5, True, "x"):
        with pytest.raises(SpecError):
            TH.choose(64, threads=bad)


def test_propagate_runs_under_the_thread_limit():
    seen = []

    def progress(done, total):
        seen.extend(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
    kp.propagate(build("pre_ln", 2), I.equicorrelated(8, 1.0, 0.3), threads=1, progress=progress)
    assert seen and set(seen) == {1}


@pytest.mark.parametrize("threads", [1, 2])
def test_backpropagate_runs_under_the_thread_limit(threads):
    from kernelprop.kernel.backward import backpropagate
    seen = []

    def progress(done, total):
        seen.extend(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
    before = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    backpropagate(build("pre_ln", 2), I.equicorrelated(8, 1.0, 0.3), threads=threads, progress=progress)
    assert seen and set(seen) == {threads}
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == before   # restored
    with pytest.raises(SpecError, match="threads"):
        backpropagate(build("pre_ln", 2), I.equicorrelated(8, 1.0, 0.3), threads=0)


# ----------------------------------------------------------------------------------------------
# lazy imports


def test_import_kernelprop_is_lazy():
    code = ("import sys, kernelprop as kp\n"
            "heavy = ['scipy.stats', 'kernelprop.montecarlo', 'sympy', 'scipy.optimize']\n"
            "print([m for m in heavy if m in sys.modules])\n"
            "from kernelprop import inputs as I\n"
            "from kernelprop.methods.presets import build\n"
            "kp.propagate(build('pre_ln', 2), I.equicorrelated(8, 1.0, 0.3))\n"
            "print([m for m in heavy[:3] if m in sys.modules])\n"
            "print(all(getattr(kp, n) is not None for n in kp.__all__), set(kp.__all__) <= set(dir(kp)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]", out         # import kernelprop: no Monte Carlo, scipy.stats, sympy
    assert out[1] == "[]", out         # nor after a propagate
    assert out[2] == "True True"
    with pytest.raises(AttributeError):
        kp.no_such_name  # noqa: B018


def test_the_three_lists_of_public_names_agree():
    """kernelprop/__init__ names its public names three times (the lazy table, ``__all__``, the imports the type
    checker sees) and network/layers.py re-exports the layers: a name added to one list only is caught here."""
    import ast
    import inspect

    import kernelprop.network.layers as NL
    tree = ast.parse(inspect.getsource(kp))
    checked = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    typed = {a.asname or a.name for node in checked.body for a in node.names}
    errors = {"KernelpropError", "NotSupportedError", "NumericalError", "SpecError"}
    assert typed == set(kp._LAZY)
    assert set(kp.__all__) == set(kp._LAZY) | errors | {"__version__"}
    layers = {n for n in kp._LAZY if kp._LAZY[n][0] == "kernelprop.layers"}
    assert set(NL.__all__) - {"Network", "choice", "num", "walk"} == layers - {"LAYERS", "register_layer",
                                                                               "unregister_layer"}
