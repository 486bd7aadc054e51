"""Distributed sweeps on a real local Dask cluster, the sweep cache, and labelled (xarray) results.

The reference of every distributed result is the serial sweep (itself tested against independent
runs in test_sweep.py): equal bit for bit, every array. The worker-loss test kills a worker process
for real (SIGKILL from inside its task, once) and checks the sweep completes unchanged.
"""

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import kernelprop as kp
from kernelprop import inputs
from kernelprop.layers import Layer
from kernelprop.network.layers import Activation, Attention, Dense, LayerNorm, Network, Residual
from kernelprop.sweep import sweep
from kernelprop.sweep.parallel import Cache, MissingExtraError

X = inputs.equicorrelated(8, 1.0, 0.2)


def pre_ln_block(beta):
    return [Residual(LayerNorm(), Attention(heads=2, causal=True, scores="tied"), beta=beta),
            Residual(LayerNorm(), Dense(width_factor=2), Activation("relu"), Dense(weight_var=2.0), beta=beta)]


def net_with(*extra, depth=4):
    return Network(block=pre_ln_block("b/sqrt(L)") + list(extra), depth=depth, params={"b": 1.0})


GRID = {"b": [0.3, 1.0, 2.5], "L": [2, 4]}
MEASURES = ["cos_mean", "q_mean", "stable_rank"]


def assert_identical(a, b, meta=True):
    assert a.measures == b.measures and a.names == b.names
    for x, y in zip(a.axes, b.axes):
        assert np.array_equal(x.values, y.values)
    for m in a.measures:
        assert a[m].dtype == b[m].dtype == np.float64
        assert np.array_equal(a[m], b[m], equal_nan=True), m
    if meta:
        assert a.runs == b.runs and a.failures == b.failures


# ----------------------------------------------------------------------------------------------
# layers that act on the process running them (identity maps otherwise); the worker processes import
# this module to unpickle them


@dataclass(frozen=True, eq=False)
class DieOnce(Layer):
    """Identity; the first process to apply it on a Dask worker (marker file absent) kills itself."""

    marker: str = ""
    kind = "test_die_once"

    def kernel_map(self, s, ctx):
        if _on_worker():
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return s, lambda pi, grads: pi


@dataclass(frozen=True, eq=False)
class FailUnless(Layer):
    """Identity while the file ``allow`` exists; raises (an unexpected error, not a numerical one) otherwise,
    counting its calls in ``allow + ".calls"``."""

    allow: str = ""
    kind = "test_fail_unless"

    def kernel_map(self, s, ctx):
        with open(self.allow + ".calls", "a") as f:
            f.write("x\n")
        if not os.path.exists(self.allow):
            raise RuntimeError("interrupted on purpose")
        return s, lambda pi, grads: pi


def _on_worker():
    try:
        from distributed import get_worker
        get_worker()
        return True
    except (ImportError, ValueError):
        return False


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    sys.path.insert(0, str(Path(__file__).parent))      # the workers import this module by name
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


# ----------------------------------------------------------------------------------------------
# distributed = serial, bit for bit


def test_local_cluster_sweep_equals_the_serial_sweep_bit_for_bit(client):
    net = net_with()
    serial = sweep(net, X, GRID, measure=MEASURES)
    assert serial.runs == 6
    for chunk in (1, 4):
        dist = sweep(net, X, GRID, measure=MEASURES, scheduler=client, chunk=chunk)
        assert_identical(serial, dist)
        assert dist.plan == serial.plan


def test_failures_and_shared_depth_runs_come_back_in_the_serial_order(client):
    """A shared depth run (no L in the blocks) whose deeper part explodes: partial NaN, failure text."""
    net = Network(block=[Residual(Dense(weight_var=30.0), Activation("relu"), beta="b")], depth=3, params={"b": 1.0})
    grid = {"b": [0.5, 2.0, 40.0], "L": [1, 5, 200]}
    serial = sweep(net, X, grid, measure="q_mean")
    assert serial.failures and np.isnan(serial["q_mean"]).any() and np.isfinite(serial["q_mean"]).any()
    dist = sweep(net, X, grid, measure="q_mean", scheduler=client, chunk=1)
    assert_identical(serial, dist)


def test_a_killed_worker_is_replaced_and_the_sweep_completes_unchanged(client, tmp_path):
    marker = tmp_path / "killed"
    net = net_with(DieOnce(str(marker)))
    before = set(client.scheduler_info()["workers"])
    dist = sweep(net, X, GRID, measure=MEASURES, scheduler=client, chunk=1)
    assert marker.exists()                                # a worker process did kill itself
    assert_identical(sweep(net, X, GRID, measure=MEASURES), dist)
    client.wait_for_workers(2, timeout=60)                # the nanny restarted it (under a new address)
    assert set(client.scheduler_info()["workers"]) != before


# ----------------------------------------------------------------------------------------------
# the cache: an interrupted sweep resumes


def test_an_interrupted_serial_sweep_resumes_from_its_cache(tmp_path):
    net = net_with()
    cache = tmp_path / "cache"
    reference = sweep(net, X, GRID, measure=MEASURES)

    def stop_after_three(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep(net, X, GRID, measure=MEASURES, cache=cache, progress=stop_after_three)
    assert len(list(cache.glob("*/*.json"))) == 3
    seen = []
    resumed = sweep(net, X, GRID, measure=MEASURES, cache=cache, progress=lambda d, t: seen.append(d))
    assert resumed.cached == 3 and seen == [3, 4, 5, 6]      # three read back, three computed
    assert_identical(reference, resumed)
    again = sweep(net, X, GRID, measure=MEASURES, cache=cache)
    assert again.cached == 6
    assert_identical(reference, again)


def test_a_chunk_that_raises_on_the_cluster_is_retried_then_the_rerun_computes_only_what_is_missing(client, tmp_path):
    allow = tmp_path / "allow"
    calls = tmp_path / "allow.calls"
    net = net_with()
    cache = tmp_path / "cache"

    def make(depth, b=1.0):
        """b = 2.5 carries the failing layer: one chunk of the grid raises."""
        base = net.with_params(b=b).with_depth(depth)
        if b == 2.5:
            base = Network(block=list(base.block.layers) + [FailUnless(str(allow))], depth=depth, params={"b": b})
        return base

    grid = {"b": [0.3, 1.0, 2.5]}
    with pytest.raises(RuntimeError, match="interrupted on purpose"):
        sweep(make, X, grid, measure=MEASURES, depth=4, scheduler=client, chunk=1, cache=cache)
    assert len(calls.read_text().split()) == 3              # tried three times (retries=2), then raised
    kept = len(list(cache.glob("*/*.json")))                 # the chunks that had finished
    assert kept <= 2
    allow.touch()
    calls.unlink()
    resumed = sweep(make, X, grid, measure=MEASURES, depth=4, scheduler=client, chunk=1, cache=cache)
    assert resumed.cached == kept and len(calls.read_text().split()) == 4   # the failed run once, 4 blocks
    assert_identical(sweep(make, X, grid, measure=MEASURES, depth=4), resumed)


def test_the_cache_key_changes_with_the_input_the_measures_and_the_version(tmp_path, monkeypatch):
    net = net_with()
    cache = tmp_path / "c"
    sweep(net, X, {"b": [1.0]}, cache=cache)
    assert sweep(net, X, {"b": [1.0]}, cache=cache).cached == 1
    assert sweep(net, inputs.equicorrelated(8, 1.0, 0.3), {"b": [1.0]}, cache=cache).cached == 0
    assert sweep(net, X, {"b": [1.0]}, measure="q_mean", cache=cache).cached == 0
    monkeypatch.setattr(kp, "__version__", "0.0.0-other")
    assert sweep(net, X, {"b": [1.0]}, cache=cache).cached == 0


def test_an_unreadable_cache_entry_is_computed_again(tmp_path):
    net = net_with()
    cache = tmp_path / "c"
    first = sweep(net, X, {"b": [1.0, 2.0]}, cache=cache)
    for p in cache.glob("*/*.json"):
        p.write_text("{not json")
    again = sweep(net, X, {"b": [1.0, 2.0]}, cache=cache)
    assert again.cached == 0
    assert_identical(first, again)
    assert Cache(cache).get("0" * 64) is None


# ----------------------------------------------------------------------------------------------
# argument errors


@pytest.mark.parametrize("kw, field", [({"workers": -1}, "workers"), ({"workers": 1.5}, "workers"),
                                       ({"chunk": 0}, "chunk"), ({"workers": 2, "scheduler": "tcp://x:1"}, "workers")])
def test_bad_distribution_arguments_name_the_field(kw, field):
    with pytest.raises(kp.errors.SpecError) as e:
        sweep(net_with(), X, {"b": [1.0]}, **kw)
    assert e.value.field == field


def test_a_missing_extra_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)     # import distributed -> ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'kernelprop\[dask\]'"):
        sweep(net_with(), X, {"b": [1.0, 2.0]}, workers=2)


def test_importing_kernelprop_imports_neither_dask_nor_xarray():
    import subprocess
    code = ("import sys, kernelprop, kernelprop.sweep, kernelprop.io; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed', 'xarray', 'h5netcdf')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------
# labelled results (xarray)


def test_a_sweep_as_netcdf_opens_in_xarray_with_named_axes_equal_to_the_csv(tmp_path):
    xr = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    net = Network(block=[Residual(Dense(weight_var=30.0), Activation("relu"), beta="b")], depth=3, params={"b": 1.0})
    res = sweep(net, X, {"b": [0.5, 2.0, 40.0], "L": [1, 5, 200]}, measure=["q_mean", "cos_mean"])
    assert np.isnan(res["q_mean"]).any()                       # NaNs survive too
    res.write(tmp_path / "s.nc")
    res.write(tmp_path / "s.csv")
    with xr.open_dataset(tmp_path / "s.nc", engine="h5netcdf") as ds:
        assert list(ds["q_mean"].dims) == ["b", "L"] and ds["L"].dtype.kind == "i"
        assert ds["b"].attrs["spacing"] == res.axis("b").spacing
        rows = (tmp_path / "s.csv").read_text().splitlines()[1:]
        assert len(rows) == 18
        for line in rows:                                       # every CSV row is the Dataset's value
            b, L, m, v = line.split(",")
            got = float(ds[m].sel(b=float(b), L=int(L)))
            assert (np.isnan(got) and v == "nan") or got == float(v)
    back = kp.sweep.load(tmp_path / "s.nc")
    assert_identical(res, back)
    assert back.plan == res.plan and [a.label for a in back.axes] == [a.label for a in res.axes]


def test_a_run_as_netcdf_has_records_labels_measures_and_kernels(tmp_path):
    xr = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    from kernelprop.io.results import write, write_dataset
    spec = kp.load(kp.__path__[0] + "/examples/pre_ln.toml", depth=3)
    traj = kp.propagate(spec.network, spec.inputs, ntk=False)
    write_dataset(traj, tmp_path / "r.nc", spec_raw=spec.raw)
    write(traj, tmp_path / "r.csv")
    with xr.open_dataset(tmp_path / "r.nc", engine="h5netcdf") as ds:
        assert list(ds["label"].values) == list(traj.labels)
        assert np.array_equal(ds["kernel"].values, traj.kernels)
        assert ds["cos_mean"].dims == ("record",)
        for line in (tmp_path / "r.csv").read_text().splitlines()[1:]:
            r, label, block, m, pos, v = line.split(",")
            got = ds[m].values[int(r)] if pos == "" else ds[m].values[int(r), int(pos)]
            assert ds["label"].values[int(r)] == label and int(ds["block"].values[int(r)]) == int(block)
            assert (np.isnan(got) and v == "nan") or got == float(v)
        assert "versions" in ds.attrs["kernelprop"]


def test_zarr_needs_zarr_and_a_missing_xarray_names_the_pip_command(tmp_path, monkeypatch):
    res = sweep(net_with(), X, {"b": [1.0, 2.0]})
    try:
        import zarr  # noqa: F401
    except ImportError:
        with pytest.raises(MissingExtraError, match=r"kernelprop\[xarray\]"):
            res.write(tmp_path / "s.zarr")
        assert not (tmp_path / "s.zarr").exists()
    else:
        res.write(tmp_path / "s.zarr")
        res.write(tmp_path / "s.zarr")                          # replaced, not merged
        assert_identical(res, kp.sweep.load(tmp_path / "s.zarr"))
    monkeypatch.setitem(sys.modules, "xarray", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'kernelprop\[xarray\]'"):
        res.write(tmp_path / "t.nc")
    assert not (tmp_path / "t.nc").exists()


# ----------------------------------------------------------------------------------------------
# the command line


def _cli():
    from typer.testing import CliRunner

    from cli import app
    return CliRunner(), app


def test_cli_sweep_on_a_cluster_from_the_environment_writes_netcdf_equal_to_the_serial_csv(client, tmp_path,
                                                                                            monkeypatch):
    pytest.importorskip("xarray")
    runner, app = _cli()
    args = ["sweep", "pre_ln", "--param", "beta=0.5:2:3", "--param", "L=2,4", "-m", "cos_mean", "-m", "q_mean",
            "--no-figure"]
    serial = runner.invoke(app, [*args, "-o", str(tmp_path / "serial.csv"), "--no-cache"])
    assert serial.exit_code == 0, serial.output
    assert not (tmp_path / ".kernelprop-cache").exists()
    monkeypatch.setenv("KERNELPROP_SCHEDULER", client.scheduler.address)
    dist = runner.invoke(app, [*args, "-o", str(tmp_path / "d" / "dist.nc")])
    assert dist.exit_code == 0, dist.output
    # the CSV keeps values only
    assert_identical(kp.sweep.load(tmp_path / "serial.csv"), kp.sweep.load(tmp_path / "d" / "dist.nc"), meta=False)
    assert len(list((tmp_path / "d" / ".kernelprop-cache").glob("*/*.json"))) == 6   # the default cache
    again = runner.invoke(app, [*args, "-o", str(tmp_path / "d" / "again.csv")])
    assert again.exit_code == 0 and "6 of 6 run(s) read from the cache" in again.output
    assert (tmp_path / "d" / "again.csv").read_text() == (tmp_path / "serial.csv").read_text()


def test_cli_workers_starts_a_local_cluster_and_bad_values_exit_2(tmp_path):
    runner, app = _cli()
    args = ["sweep", "pre_ln", "--param", "beta=0.5,2", "-L", "3", "--no-figure"]
    res = runner.invoke(app, [*args, "--workers", "2", "-o", str(tmp_path / "w.csv")])
    assert res.exit_code == 0, res.output
    ref = runner.invoke(app, [*args, "-o", str(tmp_path / "s.csv"), "--no-cache"])
    assert ref.exit_code == 0 and (tmp_path / "w.csv").read_text() == (tmp_path / "s.csv").read_text()
    bad = runner.invoke(app, [*args, "--workers", "-2"])
    assert bad.exit_code == 2 and "--workers" in bad.output
    both = runner.invoke(app, [*args, "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"])
    assert both.exit_code == 2 and "--workers" in both.output


def test_cli_run_writes_a_labelled_netcdf(tmp_path):
    xr = pytest.importorskip("xarray")
    runner, app = _cli()
    res = runner.invoke(app, ["run", "vanilla", "-L", "3", "-o", str(tmp_path / "r.nc")])
    assert res.exit_code == 0, res.output
    traj = kp.propagate(kp.load(kp.__path__[0] + "/examples/vanilla.toml", depth=3).network,
                        kp.load(kp.__path__[0] + "/examples/vanilla.toml", depth=3).inputs)
    with xr.open_dataset(tmp_path / "r.nc", engine="h5netcdf") as ds:
        assert ds["kernel"].shape == (len(traj.labels), 32, 32)
        assert np.array_equal(ds["kernel"].values, traj.kernels)
        assert np.array_equal(ds["cos_mean"].values, traj["cos_mean"])
