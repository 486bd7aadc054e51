"""Networks by name (kernelprop.models), output checks and the small .csv tables (kernelprop.io)."""

import numpy as np
import pytest

from kernelprop import io, models
from kernelprop.errors import SpecError
from kernelprop.plotting import plot_files


def test_bundled_examples_are_found_by_name_with_or_without_suffix(tmp_path):
    names = models.examples()
    assert {"pre_ln", "post_ln", "vanilla", "parallel", "relu_mlp"} <= set(names)
    assert models.example_path("pre_ln") == models.example_path("pre_ln.toml") == names["pre_ln"]
    own = tmp_path / "pre_ln"          # an existing file wins over the bundled example of that name
    own.write_text("")
    assert models.example_path(own) == own


def test_an_unknown_spec_names_the_field_and_lists_the_examples():
    with pytest.raises(SpecError) as info:
        models.example_path("no_such_example")
    assert info.value.field == "spec" and info.value.value == "no_such_example"
    assert "neither a file nor a bundled example" in info.value.allowed and "pre_ln" in info.value.allowed


@pytest.mark.parametrize("items,expected", [
    ({"beta": 1}, {"beta": 1.0}), (["beta=0.5", "a = 2"], {"beta": 0.5, "a": 2.0}), ("beta=3", {"beta": 3.0}),
    ((), {}), (None, {}),
])
def test_overrides_from_a_mapping_or_name_equals_number(items, expected):
    assert models.parse_overrides(items) == expected


@pytest.mark.parametrize("item", ["beta", "beta=", "beta=x", "=1e"])
def test_bad_overrides_name_the_field(item):
    with pytest.raises(SpecError) as info:
        models.parse_overrides([item])
    assert info.value.field == "overrides" and info.value.value == item and "NAME=NUMBER" in info.value.allowed


def test_load_overrides_depth_and_params():
    s = models.load("pre_ln", depth=3, overrides=["beta=0.5"])
    assert s.network.depth == 3 and s.network.params["beta"] == 0.5


def test_preset_network_input_and_description():
    opts = models.PresetOptions(tokens=6, rho=0.3, heads=2, causal=False)
    s = models.preset("depth_mup", 5, overrides={"a": 2.0}, options=opts)
    assert s.network.depth == 5 and s.network.params["a"] == 2.0
    assert s.inputs.segments == (6,) and np.isclose(s.inputs.sigma[0, 1], 0.3)
    assert s.raw == {"preset": "depth_mup", "depth": 5, "knobs": {"a": 2.0}, "heads": 2, "causal": False,
                     "scores": "uniform", "activation": "relu",
                     "input": {"kind": "equicorrelated", "tokens": 6, "rho": 0.3}}
    assert models.preset("noci").network.depth == models.DEFAULT_DEPTH
    build = models.preset_builder("depth_mup", overrides=["a=2"], options=opts)
    assert repr(build(5)) == repr(s.network)


def test_preset_errors_name_the_preset_or_knob():
    with pytest.raises(SpecError) as info:
        models.preset("no_such_preset")
    assert info.value.field == "preset"
    with pytest.raises(SpecError) as info:
        models.preset("rezero", overrides={"eps": 1})
    assert info.value.field == "rezero.eps"


def test_compare_propagates_each_preset_on_one_input_and_checks_the_measure():
    trajs = models.compare(["post_ln", "noci"], 6, options=models.PresetOptions(tokens=4))
    assert list(trajs) == ["post_ln", "noci"] and all(t.inputs.segments == (4,) for t in trajs.values())
    with pytest.raises(SpecError) as info:
        models.compare(["post_ln"], 3, measure="nope")
    assert info.value.field == "measure" and "cos_mean" in info.value.allowed


@pytest.mark.parametrize("path,formats,writer,words", [
    ("x.txt", io.FORMATS, None, "extension must be one of"),
    ("x.json", (".csv",), "gradients", "gradients writes .csv"),
])
def test_output_formats_are_checked_before_any_work(path, formats, writer, words):
    assert io.check_format("x.CSV", (".csv",)) == ".csv"
    with pytest.raises(SpecError) as info:
        io.check_format(path, formats, writer)
    assert info.value.field == "output" and words in info.value.allowed


def test_small_csv_tables_keep_full_precision_and_leave_no_partial_file(tmp_path):
    path = io.write_csv(tmp_path / "t.csv", ["record", "x"], [["input", 1 / 3], ["block 1", np.float64(2 / 3)]])
    assert path.read_text() == f"record,x\ninput,{1 / 3!r}\nblock 1,{2 / 3!r}\n"

    def failing_rows():
        yield ["input", 1.0]
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError):
        io.write_csv(tmp_path / "u.csv", ["record", "x"], failing_rows())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]


def test_gradient_rows_have_parameter_norms_only_at_whole_blocks():
    from kernelprop.kernel.backward import backpropagate
    s = models.preset("pre_ln", 3, options=models.PresetOptions(tokens=4))
    g = backpropagate(s.network, s.inputs, keep_kernels=False)
    header, rows = io.gradient_rows(g)
    assert header[:5] == ["record", "block", "grad_q_mean", "grad_cos_mean", "grad_error"] and header[5:]
    for row in rows:
        assert row[4] == 0.0            # tied scores, ReLU: every backward map is exact
        params = np.array(row[5:], dtype=float)
        assert np.all(np.isfinite(params)) == row[0].startswith("block ")


def test_plot_depths_as_text_are_parsed_or_named(tmp_path):
    with pytest.raises(SpecError) as info:
        plot_files([tmp_path / "r.npz"], depths="0,x")
    assert info.value.field == "depths" and "comma-separated" in info.value.allowed


def test_sweep_model_is_a_spec_or_a_preset_builder():
    spec, x, depth = models.sweep_model("pre_ln", depth=4, overrides={"beta": 0.5})
    assert x is None and depth == 4 and spec.network.depth == 4 and spec.network.params["beta"] == 0.5
    build, x, depth = models.sweep_model(None, "depth_mup", options=models.PresetOptions(tokens=5))
    assert depth == models.DEFAULT_DEPTH and x.segments == (5,) and build(3, a=2.0).params["a"] == 2.0
