"""Figures: labelled axes, the expected artists, legends off the data, embedded TrueType fonts; the
sweep and plot commands end to end."""

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import kernelprop as kp  # noqa: E402
from kernelprop import inputs, plotting  # noqa: E402
from kernelprop.cli import app  # noqa: E402
from kernelprop.methods import presets  # noqa: E402
from kernelprop.network.layers import Dense, LayerNorm, Network, Residual  # noqa: E402
from kernelprop.sweep import sweep  # noqa: E402

runner = CliRunner()
X = inputs.equicorrelated(8, 1.0, 0.1)


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def trajs():
    return {name: kp.propagate(presets.build(name, 12, heads=1), X) for name in ("post_ln", "pre_ln", "noci")}


def _labelled(ax):
    return ax.get_xlabel().strip() and ax.get_ylabel().strip()


def test_depth_plot_lines_labels_and_legend_above_the_data(trajs):
    fig = plotting.depth_plot(trajs, "cos_mean")
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 3 and _labelled(ax)
    assert "cosine" in ax.get_ylabel() and "block" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["post_ln", "pre_ln", "noci"]
    fig.canvas.draw()
    legend_box = ax.get_legend().get_window_extent()
    assert legend_box.y0 >= ax.get_window_extent().y1 - 1      # above the axes: covers no data
    x, y = ax.get_lines()[1].get_data()
    np.testing.assert_array_equal(x, np.arange(13))             # input (0) and blocks 1..12
    np.testing.assert_array_equal(y, trajs["pre_ln"]["cos_mean"][:13])
    assert abs(fig.get_figwidth() - plotting.COLUMN_WIDTH) < 1e-9


def test_depth_plot_log_x_drops_the_input_and_overlays_simulations(trajs):
    t = trajs["noci"]
    depth, mean = np.arange(1, 13), t["cos_mean"][1:13] + 0.01
    fig = plotting.depth_plot({"noci": t}, "cos_mean", logx=True,
                              simulations={"noci": (depth, mean, np.full(12, 0.005))})
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and len(ax.get_lines()[0].get_xdata()) == 12
    assert len(ax.containers) == 1                             # one errorbar container
    assert ax.containers[0].lines[0].get_color() == ax.get_lines()[0].get_color()   # same colour as theory
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["noci", "noci (simulation), ±1 s.e."]


@pytest.mark.parametrize("record,every", [("blocks", 1), ("sublayers", 2)])
def test_series_reads_the_block_records_of_a_trajectory_or_of_its_file(tmp_path, record, every):
    """The structured records of a trajectory and the labels of its file pick the same points:
    the stem output at depth 0, then every whole block; no sub-layer or head records."""
    from kernelprop.plotting.files import read
    net = Network(stem=[Dense(), LayerNorm()], block=[Residual(Dense()), Residual(LayerNorm(), Dense())],
                  final=[LayerNorm()], depth=5)
    traj = kp.propagate(net, inputs.equicorrelated(6, 1.0, 0.2), record=record, every=every)
    depth, vals, _ = plotting.series(traj, "q_mean")
    expected = [0, *range(every, 6, every)] + ([5] if 5 % every else [])
    assert depth.tolist() == expected
    kp.io.write(traj, tmp_path / "t.json")
    _, back = read(tmp_path / "t.json")
    depth_f, vals_f, _ = plotting.series(back, "q_mean")
    assert depth_f.tolist() == expected
    np.testing.assert_allclose(vals_f, vals, rtol=1e-12)


def test_errorbars_into_a_given_axes():
    fig, ax = plt.subplots()
    out = plotting.errorbars(ax, [1, 2, 3], [0.1, 0.2, 0.3], [0.01, 0.02, 0.03], label="sim")
    assert out is fig and len(ax.containers) == 1


def test_kernel_heatmaps_from_a_trajectory_and_from_npz(tmp_path, trajs):
    fig = plotting.kernel_heatmaps(trajs["post_ln"], depths=[0, 1, 12])
    panels = [a for a in fig.axes if a.images]
    assert len(panels) == 3 and [a.get_title() for a in panels] == ["input", "block $l$ = 1", "block $l$ = 12"]
    assert all(_labelled(a) or a.get_xlabel() for a in panels)
    assert any("cosine" in a.get_ylabel() for a in fig.axes if not a.images)   # the colour bar
    np.testing.assert_allclose(panels[0].images[0].get_array(), (0.9 * np.eye(8) + 0.1))
    path = tmp_path / "v.npz"
    assert runner.invoke(app, ["run", "vanilla", "-L", "4", "-o", str(path)]).exit_code == 0
    fig = plotting.kernel_heatmaps(str(path))                  # default: four depths spread over the run
    assert len([a for a in fig.axes if a.images]) == 4
    fig, axes = plt.subplots(1, 2)
    assert plotting.kernel_heatmaps(str(path), depths=[0, 4], ax=axes) is fig


def test_spectrum_plot(trajs):
    fig = plotting.spectrum_plot(trajs["post_ln"], depths=[0, 3, 12])
    ax = fig.axes[0]
    lines = [l for l in ax.get_lines() if l.get_label() and not l.get_label().startswith("rounding")]
    assert len(lines) == 3 and ax.get_yscale() == "log" and _labelled(ax)
    lam = lines[0].get_ydata()
    np.testing.assert_allclose(lam.sum(), 1.0)                 # eigenvalues / trace
    np.testing.assert_allclose(lam[0], (1 + 7 * 0.1) / 8)      # equicorrelated: q(1-ρ) + Tqρ over Tq


def test_phase_diagram_two_and_one_axis():
    net = Network(block=[Residual(LayerNorm(), Dense(), beta="b")], depth=2, params={"b": 1.0})
    res = sweep(net, X, {"L": [1, 2, 4, 8], "b": [0.1, 0.5, 1.0]})
    fig = plotting.phase_diagram(res)
    ax = fig.axes[0]
    assert len(ax.collections) >= 1 and ax.collections[0].get_array().size == 12
    assert ax.get_xscale() == "log" and "depth" in ax.get_xlabel() and ax.get_ylabel().startswith("b")
    assert "cosine" in fig.axes[1].get_ylabel()                # the colour bar
    one = sweep(net, X, {"b": [0.1, 0.5, 1.0]})
    fig = plotting.phase_diagram(one)
    assert len(fig.axes[0].get_lines()) == 1 and _labelled(fig.axes[0])


def test_pdf_embeds_truetype_fonts(tmp_path, trajs):
    path = plotting.save(plotting.depth_plot(trajs, "cos_mean"), tmp_path / "f.pdf")
    data = path.read_bytes()
    assert b"/FontFile2" in data and b"/Type3" not in data


def test_saving_to_an_unsupported_format_writes_nothing(tmp_path, trajs):
    with pytest.raises(kp.SpecError):
        plotting.save(plotting.depth_plot(trajs), tmp_path / "f.jpg")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# command line


def test_sweep_command_writes_table_and_heatmap(tmp_path):
    out = tmp_path / "s.csv"
    res = runner.invoke(app, ["sweep", "pre_ln", "--param", "beta=0.5:2:3", "--param", "L=2,4", "-o", str(out)])
    assert res.exit_code == 0, res.output
    header, *rows = out.read_text().splitlines()
    assert header == "beta,L,measure,value" and len(rows) == 6
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    spec = kp.load(kp.__path__[0] + "/examples/pre_ln.toml")
    beta, depth, measure, value = rows[-1].split(",")
    traj = kp.propagate(spec.network.with_params(beta=float(beta)).with_depth(int(depth)), spec.inputs)
    assert float(value) == pytest.approx(traj["cos_mean"][traj.labels.index(f"block {depth}")], rel=1e-13)
    fig = tmp_path / "phase.pdf"
    res = runner.invoke(app, ["sweep", "--preset", "layerscale", "--tokens", "8", "--param", "eps=0.1:1:3:log",
                              "--param", "L=1:8:4", "--measure", "stable_rank", "-o", str(tmp_path / "p.json"),
                              "--figure", str(fig)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["runs"] == 3 and [a["spacing"] for a in data["axes"]] == ["log", "linear"]
    assert b"/FontFile2" in fig.read_bytes()


@pytest.mark.parametrize("args,words", [
    (["--param", "nope=1:2:3"], "--param = 'nope'"),
    (["--param", "beta=1:2"], "NAME=START:STOP:N"),
    (["--param", "beta=0:2:3", "--log"], "START > 0"),
    (["--param", "beta=1:2:3", "--measure", "nope"], "--measure = 'nope'"),
    (["--param", "beta=1:2:3", "--measure", "cos_first"], "profile"),
    (["--param", "L=1:2:3", "--param", "beta=1:2:3", "--param", "beta=1,2"], "one or two"),
    (["--param", "beta=1:2:3", "--figure", "{tmp}/f.jpg"], "--figure"),
    (["--param", "beta=1:2:3", "--at", "middle"], "--at"),
])
def test_sweep_command_bad_input_exits_2_without_files(tmp_path, args, words):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = runner.invoke(app, ["sweep", "pre_ln", *args, "-o", str(tmp_path / "s.csv")])
    assert res.exit_code == 2, res.output
    assert words in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_sweep_command_unsupported_output_extension(tmp_path):
    res = runner.invoke(app, ["sweep", "pre_ln", "--param", "beta=1:2:3", "-o", str(tmp_path / "s.txt")])
    assert res.exit_code == 2 and "--output" in res.stderr and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("results")
    for args in (["run", "vanilla", "-L", "4", "-o", str(d / "v.npz")],
                 ["run", "vanilla", "-L", "4", "-o", str(d / "v.json")],
                 ["run", "vanilla", "-L", "4", "-o", str(d / "v.nc")],
                 ["sweep", "pre_ln", "--param", "beta=0.5:2:3", "--no-figure", "-o", str(d / "s.nc")],
                 ["run", "pre_ln", "-L", "4", "-o", str(d / "p.csv")],
                 ["compare", "post_ln", "noci", "-L", "6", "--tokens", "8", "-o", str(d / "c.csv")],
                 ["sweep", "pre_ln", "--param", "beta=0.5:2:3", "--no-figure", "-o", str(d / "s.npz")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
    return d


@pytest.mark.parametrize("files,extra,lines", [
    (["v.json"], [], 1),
    (["p.csv"], ["--measure", "q_mean"], 1),
    (["v.json", "p.csv"], [], 2),
    (["c.csv"], ["--measure", "cos_mean", "--logx"], 2),
    (["v.npz"], [], None),
    (["v.npz"], ["--kind", "spectrum", "--depths", "0,4"], 2),
    (["s.npz"], [], 1),
    (["v.nc"], [], None),
    (["v.nc"], ["--measure", "cos_mean"], 1),
    (["v.nc", "v.json"], [], 2),
    (["s.nc"], [], 1),
])
def test_plot_command_draws_every_result(results, tmp_path, files, extra, lines):
    out = tmp_path / "fig.png"
    res = runner.invoke(app, ["plot", *(str(results / f) for f in files), "-o", str(out), *extra])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:4] == b"\x89PNG"
    fig = plotting.plot_files([results / f for f in files], **_kw(extra))
    ax = fig.axes[0]
    if lines is None:     # heatmap panels share axes: labels on the outer row and column
        assert any(a.get_xlabel() for a in fig.axes) and any(a.get_ylabel() for a in fig.axes)
    else:
        assert _labelled(ax)
    if lines is not None:
        assert len([l for l in ax.get_lines() if not l.get_label().startswith(("_", "rounding"))]) == lines


def test_labelled_run_reads_back_as_its_json(results):
    from kernelprop.plotting.files import read
    (k1, nc), (k2, js) = read(results / "v.nc"), read(results / "v.json")
    assert k1 == k2 == "run" and nc.labels == js.labels and nc.name == js.name == "Skipless (vanilla) transformer"
    np.testing.assert_array_equal(nc.blocks, js.blocks)
    assert nc.kernels.shape == (len(nc.labels), 32, 32) and set(js.measures) <= set(nc.measures)
    for m, v in js.measures.items():
        np.testing.assert_allclose(nc.measures[m], v, rtol=1e-15, atol=0, err_msg=m)
    _, s_nc = read(results / "s.nc")
    _, s_npz = read(results / "s.npz")
    for m, v in s_npz.values.items():
        np.testing.assert_array_equal(s_nc.values[m], v)


def _kw(extra):
    kw = {}
    for flag, value in zip(extra, extra[1:] + [None]):
        if flag == "--measure":
            kw["measure"] = value
        elif flag == "--kind":
            kw["kind"] = value
        elif flag == "--depths":
            kw["depths"] = [int(v) for v in value.split(",")]
        elif flag == "--logx":
            kw["logx"] = True
    return kw


def test_plot_command_draws_simulation_error_bars(tmp_path):
    rows = [{"record": r, "label": "input" if r == 0 else f"block {r}", "block": r,
             "cos_mean": 0.1 * r, "cos_mean_se": 0.01} for r in range(4)]
    path = tmp_path / "sim.json"
    path.write_text(json.dumps({"spec": {"name": "toy"}, "simulation": {"width": 64}, "records": rows}))
    fig = plotting.plot_files([path])
    assert len(fig.axes[0].containers) == 1
    res = runner.invoke(app, ["plot", str(path), "-o", str(tmp_path / "sim.pdf")])
    assert res.exit_code == 0


@pytest.mark.parametrize("args,words", [
    (["missing.json"], "does not exist"),
    (["{res}/c.csv", "-o", "{tmp}/f.jpg"], "--output"),
    (["{res}/v.json", "--measure", "nope"], "--measure = 'nope'"),
    (["{res}/v.json", "--kind", "kernels"], "write the run as .npz"),
    (["{res}/v.npz", "--depths", "0,99"], "--depths = 99"),
    (["{res}/v.json", "--kind", "bogus"], "--kind"),
    (["{res}/s.npz", "{res}/v.json"], "sweep"),
])
def test_plot_command_bad_input_exits_2_without_files(results, tmp_path, args, words):
    args = [a.replace("{res}", str(results)).replace("{tmp}", str(tmp_path)) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "f.png")]
    res = runner.invoke(app, ["plot", *args])
    assert res.exit_code == 2, res.output
    assert words in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_plot_command_rejects_a_file_that_is_not_a_result(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    res = runner.invoke(app, ["plot", str(bad), "-o", str(tmp_path / "f.png")])
    assert res.exit_code == 2 and "not a result" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.csv"]


def test_paper_style_keeps_an_interactive_switch_made_inside():
    """Jupyter's inline backend turns interactive mode on with the first figure; if that figure is made
    inside the style context, restoring the old rcParams must not switch it off again (figures vanish)."""
    import matplotlib as mpl

    from kernelprop.plotting.style import RC, paper_style
    before = mpl.is_interactive()
    key = next(iter(RC))
    outside = mpl.rcParams[key]
    try:
        mpl.interactive(False)
        with paper_style():
            assert np.allclose(mpl.rcParams[key], RC[key])
            mpl.interactive(True)
        assert mpl.is_interactive()
        assert mpl.rcParams[key] == outside
    finally:
        mpl.interactive(before)
