"""What the command line prints and writes is right: every number printed reads back to the value
(to the digits shown) at 80 and 200 columns, never cut; the last block is a row and sampled rows are
said; the gradient diagnosis follows from the rows shown and a NaN is an error; user text is printed
literally; files hold every record and `plot` reads each kind the package writes."""

import csv
import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

import kernelprop as kp
from kernelprop import report
from kernelprop.cli import app

runner = CliRunner()
NUMBER = re.compile(r"^-?(\d+)(?:\.(\d+))?(?:e(-?\d+))?$")


def invoke(args, columns=200):
    return runner.invoke(app, args, env={"COLUMNS": str(columns)})


def agrees(cell: str, value) -> bool:
    """``cell`` (a printed number) equals ``value`` to the digits it shows: within half a unit of
    its last digit (computed from the text, not from the formatter)."""
    if value is None or not np.isfinite(value):
        return cell in ("nan", "inf", "-inf") and (value is None or str(float(value)) == cell)
    m = NUMBER.match(cell)
    assert m, f"not a number: {cell!r}"
    decimals = len(m.group(2) or "")
    exponent = int(m.group(3) or 0)
    half = 0.5 * 10.0 ** (exponent - decimals)
    return abs(float(cell) - value) <= half * (1 + 1e-9) + 1e-300


def table_rows(text: str) -> dict:
    """``{label: [cells]}`` of the data rows of a printed table (labels input, final, block N)."""
    rows = {}
    for line in text.splitlines():
        tokens = line.replace("│", " ").split()
        if not tokens:
            continue
        if tokens[0] == "block" and len(tokens) > 1 and tokens[1].isdigit():
            label, cells = f"block {tokens[1]}", tokens[2:]
        elif tokens[0] in ("input", "final"):
            label, cells = tokens[0], tokens[1:]
        else:
            continue
        if cells and all(NUMBER.match(c) or c in ("nan", "inf", "-inf") for c in cells):
            rows[label] = cells
    return rows


def test_num_keeps_the_exponent_and_parses_back():
    assert report.num(2.2253e-14) == "2.2253e-14"
    assert report.num(1e5) == "1e5" and report.num(123456.0) == "1.2346e5"
    assert report.num(0.00012345678, 4) == "0.0001235"
    assert (report.num(float("nan")), report.num(float("inf")), report.num(-float("inf"))) == ("nan", "inf", "-inf")
    rng = np.random.default_rng(0)
    for v in rng.standard_normal(200) * 10.0 ** rng.integers(-300, 300, 200):
        for d in (3, 4, 5):
            assert agrees(report.num(v, d), v)


@pytest.mark.parametrize("columns", [80, 200, 40])
@pytest.mark.parametrize("args,last_block,total", [
    # tiny distances (3.1441e-8) and large NTK condition numbers (5.1145e5); before, at 80 columns:
    # "3.144…", "5.11…", "1.00…" and labels wrapped to "block" / "40"
    (["--preset", "post_ln", "-L", "40", "--tokens", "8", "--ntk"], "block 40", 41),
    (["pre_ln", "-L", "60", "--ntk"], "block 60", 62),                          # 9 columns, block 60 then final
])
def test_run_table_numbers_are_whole_and_right(tmp_path, columns, args, last_block, total):
    out = tmp_path / "r.json"
    res = invoke(["run", *args, "-o", str(out)], columns)
    assert res.exit_code == 0, res.output
    assert "…" not in res.stdout
    records = {r["label"]: r for r in json.loads(out.read_text())["records"]}
    rows = table_rows(res.stdout)
    assert last_block in rows and "input" in rows
    assert f"of {total} records shown" in res.stdout      # sampled, and said
    columns_shown = [*report.DEFAULT_COLUMNS, *(("ntk_mean", "ntk_cond") if "--ntk" in args else ())]
    if any((r.get("quad_error") or 0) > 0 for r in records.values()):
        columns_shown.append("quad_error")
    checked = 0
    for label, cells in rows.items():
        assert len(cells) == len(columns_shown), (label, cells)
        for name, cell in zip(columns_shown, cells):
            assert agrees(cell, records[label][name]), (label, name, cell, records[label][name])
            checked += 1
    assert checked >= 8 * len(columns_shown)
    if "post_ln" in args:
        assert any("e-" in c for cells in rows.values() for c in cells)   # the exponent is printed
    width = max(len(line) for line in res.stdout.splitlines())
    if columns >= 80:
        assert width <= columns      # fitted: fewer digits or an open layout, not cut
    else:
        assert width > columns       # nothing fits 40 columns: longer lines, still whole numbers


def test_rows_keep_the_last_block_before_final():
    picked = report.pick_rows(62, 24, keep=[60])
    assert {0, 60, 61} <= set(picked) and len(picked) <= 24
    assert report.pick_rows(10, 24) == list(range(10))
    assert report.sampled(10, 10) is None and "22 of 62" in report.sampled(22, 62)


def _gradient_file(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    return rows[0], {r[0]: r for r in rows[1:]}


@pytest.mark.parametrize("preset", ["vanilla", "pre_ln", "post_ln"])
@pytest.mark.parametrize("depth", [10, 500])
def test_gradient_diagnosis_follows_from_the_rows_shown(tmp_path, preset, depth):
    out = tmp_path / "g.csv"
    res = invoke(["gradients", "--preset", preset, "-L", str(depth), "--tokens", "8", "-o", str(out)], 80)
    if preset == "vanilla" and depth == 500:
        # causal uniform attention: the later tokens' gradients shrink geometrically going back and
        # underflow to 0; their cosines are 0/0 (checked against the library's own measures below)
        assert res.exit_code == 1 and not out.exists()
        assert "block 314" in res.stderr and "below 186" in res.stderr and "nan" not in res.stdout
        from kernelprop import models
        from kernelprop.kernel.backward import backpropagate
        from kernelprop.models import PresetOptions
        s = models.preset("vanilla", 500, options=PresetOptions(tokens=8))
        with pytest.raises(kp.NumericalError, match="block 314"):       # the library raises the same error
            backpropagate(s.network, s.inputs, keep_kernels=False)
        assert invoke(["gradients", "--preset", "vanilla", "-L", "185", "--tokens", "8"]).exit_code == 0
        assert invoke(["gradients", "--preset", "vanilla", "-L", "186", "--tokens", "8"]).exit_code == 1
        return
    assert res.exit_code == 0, res.output
    assert "…" not in res.stdout and "nan" not in res.stdout
    header, full = _gradient_file(out)
    rows = table_rows(res.stdout)
    last = f"block {depth}"
    assert "input" in rows and last in rows
    for label, cells in rows.items():
        assert agrees(cells[0], float(full[label][2])) and agrees(cells[1], float(full[label][3]))
    # the rule stated in the help text, applied to the two printed cells
    q_in, q_last = float(rows["input"][0]), float(rows[last][0])
    rate = (q_in / q_last) ** (1 / depth)
    want = ("stable" if abs(np.log(rate)) <= 0.01 else "exploding" if rate > 1 else "vanishing")
    line = next(x for x in res.stdout.split("diagnosis:")[1:])
    assert line.strip().startswith(want), line
    flat = " ".join(line.split())
    assert f"×{report.num(rate, 4)} per block" in flat and f"at {last}" in flat


def test_vanilla_at_depth_10_is_not_called_exploding():
    # before: "exploding … ×1.167 per block, ×0.9352 overall" (the median of hidden per-block rates)
    res = invoke(["gradients", "--preset", "vanilla", "-L", "10"])
    line = " ".join(res.stdout.split("diagnosis:")[1].split())
    assert line.startswith("stable: grad norm² 0.93522 at the input / 1 at block 10 = ×0.93522 over 10 blocks")


def _spec(tmp_path, name, body='depth = 2\n[input]\nkind = "identity"\ntokens = 4\n[[block]]\ntype = "dense"\n'):
    path = tmp_path / "s.toml"
    path.write_text(f"name = {json.dumps(name)}\n{body}" if name is not None else body)
    return path


@pytest.mark.parametrize("name,printed", [
    ("Pre-LN [ablation]", "Pre-LN [ablation] —"),
    ("x [/]", "x [/] —"),
    ("x \x1b[31mred\x07", "x \\x1b[31mred\\x07 —"),
])
def test_spec_text_is_printed_literally(tmp_path, name, printed):
    res = invoke(["run", str(_spec(tmp_path, name))])
    assert res.exit_code == 0, res.output
    assert printed in res.stdout and "\x1b" not in res.stdout and "\x07" not in res.stdout


def test_messages_keep_their_brackets(tmp_path):
    res = invoke(["run", str(_spec(tmp_path, None, 'depth = 2\n[input]\nkind = "identity"\ntokens = 4\n'))])
    assert res.exit_code == 2 and "[[block]]" in res.stderr and "[[stem]]" in res.stderr
    res = invoke(["run", str(tmp_path / "no [red]such[/red] \x1b[2J file.toml")])
    assert res.exit_code == 2 and "no [red]such[/red] \\x1b[2J file.toml" in res.stderr and "\x1b" not in res.stderr


def test_compare_file_holds_every_depth(tmp_path):
    out = tmp_path / "c.csv"
    res = invoke(["compare", "post_ln", "pre_ln", "-L", "100", "--tokens", "8", "--rows", "16", "-o", str(out)], 80)
    assert res.exit_code == 0, res.output
    header, *rows = out.read_text().splitlines()
    assert header == "block,post_ln,pre_ln" and [int(r.split(",")[0]) for r in rows] == list(range(101))
    from kernelprop import inputs as I
    from kernelprop import propagate
    from kernelprop.methods import presets
    for j, name in enumerate(("post_ln", "pre_ln"), start=1):
        t = propagate(presets.build(name, 100, heads=4, causal=True), I.equicorrelated(8, 1.0, 0.1))
        want = [t["cos_mean"][r] for r in t.depth_records()]
        np.testing.assert_allclose([float(r.split(",")[j]) for r in rows], want, rtol=1e-12)
    printed = {}
    for line in res.stdout.splitlines():
        tokens = line.replace("│", " ").split()
        if len(tokens) == 3 and tokens[0].isdigit():
            printed[int(tokens[0])] = tokens[1:]
    assert {0, 100} <= set(printed) and len(printed) <= 16 and "of 101 depths shown" in res.stdout
    for block, cells in printed.items():
        assert all(agrees(c, float(v)) for c, v in zip(cells, rows[block].split(",")[1:]))


def test_plot_reads_every_file_the_package_writes(tmp_path):
    from kernelprop.plotting.files import read
    made = {}
    for kind, args in {
        "run.json": ["run", "pre_ln", "-L", "4"], "run.csv": ["run", "pre_ln", "-L", "4"],
        "sim.json": ["simulate", "--preset", "pre_ln", "-L", "2", "--tokens", "6", "-d", "16", "-S", "2", "--no-dong"],
        "sim.csv": ["simulate", "--preset", "pre_ln", "-L", "2", "--tokens", "6", "-d", "16", "-S", "2", "--no-dong"],
        "grad.csv": ["gradients", "--preset", "post_ln", "-L", "6", "--tokens", "6"],
        "mom.csv": ["moments", "--preset", "post_ln", "-L", "6", "--tokens", "6"],
        "cmp.csv": ["compare", "post_ln", "noci", "-L", "6", "--tokens", "6"],
        "sweep.csv": ["sweep", "--preset", "post_ln", "--param", "L=2,4", "--tokens", "6", "--no-figure"],
        "sweep.json": ["sweep", "--preset", "post_ln", "--param", "L=2,4", "--tokens", "6", "--no-figure"],
    }.items():
        path = tmp_path / kind
        res = invoke([*args, "-o", str(path)])
        assert res.exit_code == 0, (kind, res.output)
        made[kind] = path
        measure = {"grad.csv": "grad_q_mean", "mom.csv": "r_g"}.get(kind)
        fig = tmp_path / f"{path.stem}_{path.suffix[1:]}.png"
        res = invoke(["plot", str(path), "-o", str(fig), *(["-m", measure] if measure else [])])
        assert res.exit_code == 0, (kind, res.output)
        assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the per-record tables read back to the library's values at full precision
    from kernelprop import models
    from kernelprop.kernel.backward import backpropagate
    from kernelprop.models import PresetOptions
    s = models.preset("post_ln", 6, options=PresetOptions(tokens=6))
    g = backpropagate(s.network, s.inputs)
    kind, rec = read(made["grad.csv"])
    assert kind == "run" and rec.labels == g.labels
    np.testing.assert_array_equal(rec.measures["grad_q_mean"], g["grad_q_mean"])
    np.testing.assert_array_equal(rec.measures["grad_cos_mean"], g["grad_cos_mean"])


@pytest.mark.parametrize("columns", [80, 200])
@pytest.mark.parametrize("command", ["moments", "gradients"])
def test_per_record_tables_read_back_to_their_files(tmp_path, columns, command):
    out = tmp_path / "t.csv"
    res = invoke([command, "--preset", "pre_ln", "-L", "40", "--tokens", "8", "-o", str(out)], columns)
    assert res.exit_code == 0, res.output
    assert "…" not in res.stdout and max(len(line) for line in res.stdout.splitlines()) <= columns
    header, full = _gradient_file(out)
    rows = table_rows(res.stdout)
    assert {"input", "block 40", "final"} <= set(rows) and "of 42 records shown" in res.stdout
    hidden = set() if "rel. error" in res.stdout else {"grad_error"}    # an all-zero error column is not shown
    for label, cells in rows.items():
        values = [float(v) for h, v in zip(header[2:], full[label][2:]) if h not in hidden]
        if command == "gradients" and len(cells) < len(values):       # no parameter norms off whole blocks
            assert all(v != v for v in values[len(cells):])
        assert len(cells) >= 2
        assert all(agrees(c, v) for c, v in zip(cells, values)), (label, cells, values)


@pytest.mark.parametrize("columns", [80, 200])
def test_simulation_and_check_tables_fit_without_cutting(tmp_path, columns):
    # before: headers cut to "rank_one_d…", "stable_ra…" at 80 columns
    out = tmp_path / "s.json"
    res = invoke(["simulate", "pre_ln", "-L", "3", "--width", "64", "--seeds", "4", "-o", str(out)], columns)
    assert res.exit_code == 0, res.output
    assert "…" not in res.stdout and max(len(line) for line in res.stdout.splitlines()) <= columns
    assert "rank one" in res.stdout and "stable" in res.stdout
    records = {r["label"]: r for r in json.loads(out.read_text())["records"]}
    from kernelprop.montecarlo.tables import SIM_COLUMNS
    seen = 0
    for line in res.stdout.splitlines():
        line = line.replace("│", " ").strip()
        label = " ".join(line.split()[:2]) if line.startswith("block") else line.split()[0] if line.split() else ""
        if label not in records:
            continue
        pairs = re.findall(r"(\S+) ± (\S+)", line)
        assert len(pairs) == len(SIM_COLUMNS), line
        for (mean, se), m in zip(pairs, SIM_COLUMNS):
            assert agrees(mean, records[label][m]) and agrees(se, records[label][m + "_se"]), (label, m, mean, se)
        seen += 1
    assert seen == len(records)
    res = invoke(["check", "pre_ln", "-L", "2", "--width", "96", "--seeds", "4", "--gradients"], columns)
    assert res.exit_code in (0, 3), res.output
    assert "…" not in res.stdout and max(len(line) for line in res.stdout.splitlines()) <= columns


def test_finite_prediction_tables_fit_the_terminal():
    res = invoke(["run", "relu_mlp", "-L", "3", "--width", "32", "--samples", "6"], 80)
    assert res.exit_code == 0, res.output
    assert "…" not in res.stdout and max(len(line) for line in res.stdout.splitlines()) <= 80
    assert "q_mean: finite prediction (gram, width 32, 6 samples)" in res.stdout and "bias ± se" in res.stdout
