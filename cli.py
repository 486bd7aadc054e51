"""Command line of kernelprop: parse, call the library, print. Exit codes: 0 ok, 1 numerical
failure, 2 bad usage or spec, 3 theory and simulation disagree (``check``)."""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Infinite-width signal propagation through deep transformers at initialisation.")
out = Console()
err = Console(stderr=True)


# library fields that a command-line option sets directly: errors name the option
_OPTION_NAMES = {"output_gradient": "--output-grad", "output_gradient.rho": "--grad-rho"}


@contextlib.contextmanager
def _errors():
    from kernelprop.errors import NotSupportedError, NumericalError, SpecError
    try:
        yield
    except SpecError as e:
        if e.field in _OPTION_NAMES:
            e = SpecError(_OPTION_NAMES[e.field], e.value, e.allowed)
        err.print(f"[red]spec error:[/red] {e}", highlight=False)
        raise typer.Exit(2)
    except NotSupportedError as e:
        err.print(f"[red]not supported:[/red] {e}", highlight=False)
        raise typer.Exit(2)
    except NumericalError as e:
        err.print(f"[red]numerical failure:[/red] {e}", highlight=False)
        raise typer.Exit(1)


def _spec_path(spec: str) -> Path:
    import kernelprop
    p = Path(spec)
    if p.exists():
        return p
    bundled = Path(kernelprop.__file__).parent / "examples" / f"{spec.removesuffix('.toml')}.toml"
    if bundled.exists():
        return bundled
    from kernelprop.errors import SpecError
    names = sorted(f.stem for f in bundled.parent.glob("*.toml"))
    raise SpecError("SPEC", spec, f"is neither a file nor a bundled example ({', '.join(names)})")


def _params(items: List[str]) -> dict:
    from kernelprop.errors import SpecError
    out_ = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        try:
            out_[name.strip()] = float(value)
        except ValueError:
            raise SpecError("--set", item, "must be NAME=NUMBER, e.g. --set beta=0.5") from None
        if not sep:
            raise SpecError("--set", item, "must be NAME=NUMBER, e.g. --set beta=0.5")
    return out_


@dataclass(frozen=True)
class _Preset:
    """The preset options of a command: the name (None: a spec was given) and the generated network's knobs."""
    name: Optional[str]
    tokens: int
    rho: float
    heads: int
    causal: bool
    scores: str
    activation: str


def _preset_options(scores_flag: str = "--scores", named: bool = True):
    """Add the preset options to a command, passed to it as one ``preset: _Preset`` argument.

    ``scores_flag``: the option name of the preset's attention scores (``--preset-scores`` where
    ``--scores`` already overrides the simulation's). ``named=False``: the knobs only (no ``--preset``)."""
    O = typer.Option
    options = [
        ("tokens", int, O(32, "--tokens", help="Preset input: tokens T.")),
        ("rho", float, O(0.1, "--rho", help="Preset input: correlation of distinct tokens.")),
        ("heads", int, O(4, "--heads", help="Preset: attention heads.")),
        ("causal", bool, O(True, "--causal/--bidirectional", help="Preset: causal mask.")),
        ("scores", str, O("uniform", scores_flag,
                          help="Preset: attention scores, uniform (zero queries), tied or standard.")),
        ("activation", str, O("relu", "--activation", help="Preset: MLP activation.")),
    ]
    if named:
        options.insert(0, ("name", Optional[str], O(None, "--preset", "-p",
                                                    help="Run a named preset instead of a spec (see `kernelprop presets`).")))

    def decorate(command):
        sig = inspect.signature(command, eval_str=True)
        extra = [inspect.Parameter(f"preset_{name}", inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
                 for name, kind, default in options]

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            knobs = {name: kwargs.pop(f"preset_{name}") for name, _, _ in options}
            return command(*args, preset=_Preset(**{"name": None, **knobs}), **kwargs)

        wrapper.__signature__ = sig.replace(parameters=[q for q in sig.parameters.values() if q.name != "preset"] + extra)
        return wrapper
    return decorate


def _load(spec, preset: _Preset, depth, set_):
    """A Spec from a file/bundled example, or from a preset with a generated input."""
    from kernelprop import inputs, load
    from kernelprop.errors import SpecError
    from kernelprop.network.spec import Spec
    if (spec is None) == (preset.name is None):
        raise SpecError("SPEC", spec if spec is not None else "(none)",
                        "give either a spec (file or bundled example) or --preset NAME")
    if spec is not None:
        return load(_spec_path(spec), depth=depth, params=_params(set_))
    from kernelprop.methods import presets
    knobs = _params(set_)
    net = presets.build(preset.name, 48 if depth is None else depth, heads=preset.heads, causal=preset.causal,
                        scores=preset.scores, activation=preset.activation, **knobs)
    x = inputs.equicorrelated(preset.tokens, 1.0, preset.rho)
    raw = {"preset": preset.name, "depth": net.depth, "knobs": knobs, "heads": preset.heads, "causal": preset.causal,
           "scores": preset.scores, "activation": preset.activation,
           "input": {"kind": "equicorrelated", "tokens": preset.tokens, "rho": preset.rho}}
    return Spec(net, x, {"mode": "blocks", "every": 1}, raw)


def _check_output(output: Optional[Path], allowed, what: str) -> None:
    if output is not None and output.suffix.lower() not in allowed:
        from kernelprop.errors import SpecError
        raise SpecError("--output", str(output), f"{what} writes {' or '.join(allowed)}")


def _write_csv(output: Path, header: list, rows) -> None:
    """A small .csv written atomically (floats with full precision)."""
    from kernelprop.io.results import atomic_write
    cell = lambda v: repr(float(v)) if isinstance(v, (float, np.floating)) else str(v)   # noqa: E731
    lines = [",".join(header)] + [",".join(cell(v) for v in row) for row in rows]
    atomic_write(output, ("\n".join(lines) + "\n").encode())
    err.print(f"wrote {output}")


@app.command()
@_preset_options()
def run(
    spec: Optional[str] = typer.Argument(None, help="Spec file (.toml) or the name of a bundled example."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write results: .json, .csv or .npz."),
    depth: Optional[int] = typer.Option(None, "--depth", "-L", help="Override the depth."),
    set_: List[str] = typer.Option([], "--set", help="Override a param or preset knob: NAME=NUMBER (repeatable)."),
    every: Optional[int] = typer.Option(None, help="Record every k-th block (default: the spec's)."),
    sublayers: bool = typer.Option(False, help="Also record after each top-level layer of a block."),
    rows: int = typer.Option(24, help="Rows of the printed summary."),
    preset: _Preset = None,
):
    """Propagate the token kernel of SPEC (or --preset NAME) through depth and summarise it."""
    with _errors():
        from kernelprop import io, propagate, report
        s = _load(spec, preset, depth, set_)
        if output is not None and output.suffix.lower() not in io.FORMATS:
            from kernelprop.errors import SpecError
            raise SpecError("--output", str(output), f"extension must be one of {list(io.FORMATS)}")
        traj = _with_progress(lambda cb: propagate(
            s.network, s.inputs, record="sublayers" if sublayers else s.record["mode"],
            every=every or s.record["every"], keep_kernels=output is not None and output.suffix == ".npz",
            progress=cb), s.network.depth)
        title = f"{s.network.name or spec} — depth {s.network.depth}, {s.inputs.description}"
        out.print(report.summary_table(traj, most=rows, title=title))
        if output is not None:
            io.write(traj, output, spec_raw=s.raw)
            err.print(f"wrote {output}")


@app.command()
@_preset_options()
def gradients(
    spec: Optional[str] = typer.Argument(None, help="Spec file (.toml) or the name of a bundled example."),
    depth: Optional[int] = typer.Option(None, "--depth", "-L", help="Override the depth."),
    set_: List[str] = typer.Option([], "--set", help="Override a param or preset knob: NAME=NUMBER (repeatable)."),
    output_grad: str = typer.Option("identity", help="Output gradient kernel: identity or equicorrelated."),
    grad_rho: float = typer.Option(0.0, help="Correlation of the equicorrelated output gradient."),
    rows: int = typer.Option(16, help="Rows of the printed summary."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write per-block gradients as .csv."),
    preset: _Preset = None,
):
    """Backward pass: gradient-kernel norms per block, parameter-gradient norms, vanishing/exploding diagnosis."""
    with _errors():
        from rich.table import Table
        from kernelprop import report
        from kernelprop.kernel.backward import backpropagate
        s = _load(spec, preset, depth, set_)
        _check_output(output, (".csv",), "gradients")
        g = _with_progress(lambda cb: backpropagate(s.network, s.inputs, output_grad=output_grad,
                                                   rho=grad_rho, keep_kernels=False, progress=cb), s.network.depth)
        kinds = sorted({k for *_, k, _ in g.grads})
        per = {k: dict(zip(*g.grad_norms(k))) for k in kinds}
        table = Table(title=f"gradients — {s.network.name or spec}, depth {s.network.depth}; "
                      "per-block parameter gradients ‖∂W‖²/d by kind", header_style="bold")
        for c in ["record", "grad norm²", "grad cos", *kinds]:
            table.add_column(c, justify="right" if c != "record" else "left")
        rows_out = []
        for r in range(len(g.labels)):
            vals = [per[k].get(g.blocks[r], float("nan")) if g.labels[r].startswith("block") else float("nan")
                    for k in kinds]
            rows_out.append([g.labels[r], g.blocks[r], g["grad_q_mean"][r], g["grad_cos_mean"][r], *vals])
            if r in report.pick_rows(len(g.labels), rows):
                table.add_row(g.labels[r], f"{g['grad_q_mean'][r]:.5g}", f"{g['grad_cos_mean'][r]:.5g}",
                              *("" if v != v else f"{v:.4g}" for v in vals))
        out.print(table)
        out.print(f"diagnosis: {g.diagnosis()}")
        if output is not None:
            _write_csv(output, ["record", "block", "grad_q_mean", "grad_cos_mean", *(f"param_{k}" for k in kinds)],
                       rows_out)


@app.command()
@_preset_options()
def moments(
    spec: Optional[str] = typer.Argument(None, help="Spec file (.toml) or the name of a bundled example."),
    depth: Optional[int] = typer.Option(None, "--depth", "-L", help="Override the depth."),
    set_: List[str] = typer.Option([], "--set", help="Override a param or preset knob: NAME=NUMBER (repeatable)."),
    rows: int = typer.Option(16, help="Rows of the printed summary."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the moments as .csv."),
    preset: _Preset = None,
):
    """Moment view (Kedia et al. 2024): μ, σ², r forward and σ_g², r_g backward at every record."""
    with _errors():
        from rich.table import Table
        from kernelprop import report
        from kernelprop.kernel.backward import backpropagate
        from kernelprop.methods.moments import moment_view
        s = _load(spec, preset, depth, set_)
        _check_output(output, (".csv",), "moments")
        g = _with_progress(lambda cb: backpropagate(s.network, s.inputs, progress=cb), s.network.depth)
        mv = moment_view(g)
        names = ["mu", "var", "r", "var_g", "r_g"]
        table = Table(title=f"moments — {s.network.name or spec}, depth {s.network.depth}", header_style="bold")
        table.add_column("record")
        for c in ("μ", "σ²", "r", "σ_g²", "r_g"):
            table.add_column(c, justify="right")
        for r in report.pick_rows(len(g.labels), rows):
            table.add_row(g.labels[r], *(f"{mv[n][r]:.5g}" for n in names))
        out.print(table)
        if output is not None:
            _write_csv(output, ["record", "block", *names],
                       ([g.labels[r], g.blocks[r], *(mv[n][r] for n in names)] for r in range(len(g.labels))))


@app.command()
def presets():
    """List the named presets with their knobs and sources."""
    from rich.table import Table
    from kernelprop.methods.presets import PRESETS
    table = Table(header_style="bold")
    for c in ("preset", "what it is", "knobs", "source"):
        table.add_column(c)
    for p in PRESETS.values():
        knobs = ", ".join(f"{k}={v}" for k, v in p.knobs.items()) or "-"
        table.add_row(p.name, p.summary, knobs, p.source)
    out.print(table)


@app.command()
@_preset_options(named=False)
def compare(
    names: List[str] = typer.Argument(..., help="Presets to compare (see `kernelprop presets`)."),
    depth: int = typer.Option(48, "--depth", "-L", help="Depth of every preset."),
    measure: str = typer.Option("cos_mean", help="Measure to tabulate (see docs/formats.md)."),
    rows: int = typer.Option(16, help="Rows (depths) of the table."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the comparison as .csv."),
    preset: _Preset = None,
):
    """Tabulate one measure against depth for several presets side by side."""
    with _errors():
        from rich.table import Table
        from kernelprop import inputs, propagate, report
        from kernelprop.errors import SpecError
        from kernelprop.methods import presets as P
        _check_output(output, (".csv",), "compare")
        x = inputs.equicorrelated(preset.tokens, 1.0, preset.rho)
        trajs = {}
        for name in names:
            net = P.build(name, depth, heads=preset.heads, causal=preset.causal, scores=preset.scores,
                          activation=preset.activation)
            trajs[name] = propagate(net, x, keep_kernels=False)
            if measure not in trajs[name].measures:
                raise SpecError("--measure", measure, f"must be one of {sorted(trajs[name].measures)}")
        first = next(iter(trajs.values()))
        depth_records = [r for r, label in enumerate(first.labels) if label == "input" or label.startswith("block")]
        blocks = [depth_records[i] for i in report.pick_rows(len(depth_records), rows)]
        table = Table(title=f"{measure} against depth, {x.description}", header_style="bold")
        table.add_column("block")
        for name in names:
            table.add_column(name, justify="right")
        rows_out = []
        for r in blocks:
            vals = [trajs[n].measures[measure][r] for n in names]
            table.add_row(str(first.blocks[r]), *(f"{v:.5g}" for v in vals))
            rows_out.append([first.blocks[r], *vals])
        out.print(table)
        if output is not None:
            _write_csv(output, ["block", *names], rows_out)


def _with_progress(job, total):
    if total < 200 or not err.is_terminal:
        return job(None)
    from rich.progress import Progress
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("propagating", total=total)
        return job(lambda done, _: bar.update(task, completed=done))


@app.command("spec-reference")
def spec_reference():
    """Print the reference of every spec field (Markdown)."""
    from kernelprop.network.reference import reference
    typer.echo(reference())


@app.command()
def examples():
    """List the bundled example specs."""
    import kernelprop
    for f in sorted((Path(kernelprop.__file__).parent / "examples").glob("*.toml")):
        from kernelprop.network.spec import load
        out.print(f"[bold]{f.stem:10s}[/bold] {load(f).network.name}")


@app.command()
@_preset_options(scores_flag="--preset-scores")
def simulate(
    spec: Optional[str] = typer.Argument(None, help="Spec file (.toml) or the name of a bundled example."),
    width: int = typer.Option(256, "--width", "-d", help="Model width d (hidden widths are width_factor·d)."),
    seeds: int = typer.Option(16, "--seeds", "-S", help="Independent initialisations to average over."),
    init: Optional[str] = typer.Option(None, help="Override every weight: gaussian | orthogonal."),
    inputs: str = typer.Option("exact", help="Input features: exact (X Xᵀ/d = Σ⁰) | gaussian."),
    scores: Optional[str] = typer.Option(None, help="Attention scores: independent (random Q, K at 1/d_k for "
                                         "uniform layers) | standard (1/sqrt(d_k), all layers)."),
    seed: int = typer.Option(0, help="Random seed."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write results: .json, .csv or .npz."),
    depth: Optional[int] = typer.Option(None, "--depth", "-L", help="Override the spec's depth."),
    set_: List[str] = typer.Option([], "--set", help="Override a param: NAME=NUMBER (repeatable)."),
    every: Optional[int] = typer.Option(None, help="Record every k-th block (default: the spec's)."),
    sublayers: bool = typer.Option(False, help="Also record after each top-level layer of a block."),
    dong: bool = typer.Option(True, help="Also measure Dong et al.'s composite residual (an L-BFGS per record)."),
    rows: int = typer.Option(24, help="Rows of the printed summary."),
    preset: _Preset = None,
):
    """Run SPEC (or --preset NAME) as finite-width numpy networks over many seeds; print seed means ± standard errors."""
    with _errors():
        from kernelprop import io
        from kernelprop import montecarlo as mc
        from kernelprop.montecarlo.tables import simulation_table
        s = _load(spec, preset, depth, set_)
        if output is not None and output.suffix.lower() not in io.FORMATS:
            from kernelprop.errors import SpecError
            raise SpecError("--output", str(output), f"extension must be one of {list(io.FORMATS)}")
        sim = _with_progress(lambda cb: mc.simulate(
            s.network, s.inputs, width, seeds, init=init, input_kind=inputs, scores=scores, seed=seed,
            record="sublayers" if sublayers else s.record["mode"], every=every or s.record["every"],
            keep_kernels=output is not None and output.suffix == ".npz", dong=dong, progress=cb), s.network.depth)
        title = f"{s.network.name or spec} — width {width}, {seeds} seeds, {s.inputs.description}"
        out.print(simulation_table(sim, most=rows, title=title))
        if output is not None:
            mc.write(sim, output, spec_raw=s.raw)
            err.print(f"wrote {output}")


@app.command()
@_preset_options(scores_flag="--preset-scores")
def check(
    spec: Optional[str] = typer.Argument(None, help="Spec file (.toml) or the name of a bundled example."),
    width: int = typer.Option(256, "--width", "-d", help="Model width d of the simulation."),
    seeds: int = typer.Option(32, "--seeds", "-S", help="Seeds per width."),
    alpha: float = typer.Option(0.01, help="Family-wise false-alarm rate of the verdict."),
    extrapolate: bool = typer.Option(True, help="Remove the O(1/d) bias with a second run at width ≈ d/2."),
    init: Optional[str] = typer.Option(None, help="Override every weight: gaussian | orthogonal."),
    inputs: str = typer.Option("exact", help="Input features: exact | gaussian."),
    scores: Optional[str] = typer.Option(None, help="Attention scores: independent (random Q, K at 1/d_k)."),
    seed: int = typer.Option(0, help="Random seed."),
    depth: Optional[int] = typer.Option(None, "--depth", "-L", help="Override the spec's depth."),
    set_: List[str] = typer.Option([], "--set", help="Override a param: NAME=NUMBER (repeatable)."),
    every: Optional[int] = typer.Option(None, help="Record every k-th block (default: the spec's)."),
    sublayers: bool = typer.Option(False, help="Also record after each top-level layer of a block."),
    all_rows: bool = typer.Option(False, "--all", help="Print every comparison (long table)."),
    rows: int = typer.Option(24, help="Records in the printed summary (failing ones are always shown)."),
    gradients: bool = typer.Option(False, "--gradients", help="Also compare the backward pass: gradient kernels, "
                                   "grad_q_mean, grad_cos_mean and per-block parameter-gradient norms, against real "
                                   "backpropagation through the same finite networks (explicit weights)."),
    output_grad: str = typer.Option("identity", help="With --gradients: output gradient kernel, identity or "
                                    "equicorrelated."),
    grad_rho: float = typer.Option(0.0, help="With --gradients: correlation of the equicorrelated output gradient."),
    preset: _Preset = None,
):
    """Compare the infinite-width theory of SPEC (or --preset NAME) with finite-width simulations; exit 3 if
    they disagree."""
    with _errors():
        from kernelprop import montecarlo as mc
        from kernelprop.montecarlo.tables import comparison_table, rows_table
        if not 0 < alpha < 1:
            from kernelprop.errors import SpecError
            raise SpecError("--alpha", alpha, "must lie in (0, 1)")
        s = _load(spec, preset, depth, set_)
        extra = dict(gradients=True, output_grad=output_grad, rho=grad_rho) if gradients else {}
        cmp, *_ = _with_progress(lambda cb: mc.check(
            s.network, s.inputs, width, seeds, extrapolate=extrapolate, alpha=alpha, seed=seed,
            record="sublayers" if sublayers else s.record["mode"], every=every or s.record["every"],
            init=init, input_kind=inputs, scores=scores, progress=cb, **extra), s.network.depth)
        title = f"{s.network.name or spec} — theory vs simulation, {s.inputs.description}"
        if all_rows:
            out.print(rows_table(cmp))
        elif gradients:
            out.print(comparison_table(cmp.parts["forward"], most=rows, title=title))
            out.print(mc.gradient_table(cmp.parts["gradients"], most=rows,
                                        title=f"{s.network.name or spec} — gradients, output gradient {output_grad}"))
        else:
            out.print(comparison_table(cmp, most=rows, title=title))
        if cmp.agree:
            out.print(f"[green]AGREE[/green]: all {cmp.n_tested} comparisons within the criterion "
                      f"(max |z| = {cmp.max_abs_z:.2f}, k = {cmp.k:.2f})")
            return
        out.print(f"[red]DISAGREE[/red]: {len(cmp.failures)} of {cmp.n_tested} comparisons outside "
                  f"|z| <= {cmp.k:.2f}; first: {cmp.failures[0].label} {cmp.failures[0].measure} "
                  f"{cmp.failures[0].position} (theory {cmp.failures[0].theory:.6g}, "
                  f"simulation {cmp.failures[0].estimate:.6g} ± {cmp.failures[0].se:.2g})")
        raise typer.Exit(3)


@app.command()
def symbolic(
    spec: str = typer.Argument(..., help="Spec file (.toml) or the name of a bundled example."),
    explicit: Optional[int] = typer.Option(None, "--explicit", "-T", help="Explicit T×T kernels for T tokens (small T) instead of (q, ρ)."),
    latex: bool = typer.Option(False, "--latex", help="Print LaTeX instead of text."),
    code: bool = typer.Option(False, "--code", help="Print the lambdified numpy source of the block map."),
    symbol: List[str] = typer.Option([], "--symbol", "-s", help="Make numeric fields symbols: FIELD or PATH[=NAME], e.g. value_var or block[0].beta=b (repeatable)."),
    opaque: bool = typer.Option(False, help="Keep activations without closed form as numerically evaluated functions."),
    depth: Optional[int] = typer.Option(None, "--depth", "-L", help="Override the spec's depth."),
    set_: List[str] = typer.Option([], "--set", help="Override a param: NAME=NUMBER (repeatable)."),
):
    """Derive SPEC's block map in closed form: (q, ρ) map, trajectory, C-map slope χ = C'(1), fixed points."""
    with _errors():
        from kernelprop import load
        from kernelprop import symbolic as sym
        s = load(_spec_path(spec), depth=depth, params=_params(set_))
        d = sym.derive(s, tokens=explicit, symbols=symbol, opaque=opaque)
        text = sym.render_code(d) if code else sym.render_latex(d) if latex else sym.render_text(d)
        out.print(text, markup=False, highlight=False, soft_wrap=True)


@app.command("sweep")
@_preset_options()
def sweep_command(
    spec: Optional[str] = typer.Argument(None, help="Spec file (.toml) or the name of a bundled example."),
    param: List[str] = typer.Option([], "--param", help="NAME=START:STOP:N (N points) or NAME=V1,V2,…; NAME is a "
                                    "param of the spec, a preset knob, or L (depth). Append :log or :lin to a range "
                                    "to choose its spacing. Once or twice."),
    log: bool = typer.Option(False, "--log", help="Geometric spacing for every START:STOP:N range."),
    measure: List[str] = typer.Option(["cos_mean"], "--measure", "-m", help="Scalar measure(s) (see docs/formats.md); "
                                      "the figure shows the first."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the sweep: .csv, .json or .npz."),
    figure: Optional[Path] = typer.Option(None, "--figure", help="Heatmap file (.png, .pdf, .svg); default: next "
                                          "to -o with extension .png."),
    no_figure: bool = typer.Option(False, "--no-figure", help="Do not draw the heatmap."),
    at: str = typer.Option("block", help="Read the kernel after block L (block) or after the final layers (output)."),
    depth: Optional[int] = typer.Option(None, "--depth", "-L", help="Depth when L is not swept."),
    set_: List[str] = typer.Option([], "--set", help="Fix a param or preset knob: NAME=NUMBER (repeatable)."),
    preset: _Preset = None,
):
    """Sweep a measure over one or two parameters (e.g. a residual weight × depth); write a table and a heatmap."""
    with _errors():
        from kernelprop import inputs, load
        from kernelprop import sweep as S
        from kernelprop.errors import SpecError
        from kernelprop.plotting import phase_diagram, render, style
        if not param or len(param) > 2:
            raise SpecError("--param", list(param), "give one or two --param NAME=START:STOP:N")
        axes = [S.parse_param(p, log) for p in param]
        if len({name for name, _, _ in axes}) < len(axes):
            raise SpecError("--param", list(param), "each parameter can be swept once")
        if output is not None:
            S.check_format(output, "--output")
        fig_path = None if no_figure else figure or (output.with_suffix(".png") if output is not None else None)
        fig_format = style.check_format(fig_path, "--figure") if fig_path is not None else None
        if (spec is None) == (preset.name is None):
            raise SpecError("SPEC", spec if spec is not None else "(none)",
                            "give either a spec (file or bundled example) or --preset NAME")
        if spec is not None:
            model = load(_spec_path(spec), depth=depth, params=_params(set_))
            x = None
        else:
            from kernelprop.methods import presets
            model = functools.partial(presets.build, preset.name, heads=preset.heads, causal=preset.causal,
                                      scores=preset.scores, activation=preset.activation, **_params(set_))
            x = inputs.equicorrelated(preset.tokens, 1.0, preset.rho)
            depth = 48 if depth is None else depth
        try:
            res = _sweep_progress(lambda cb: S.sweep(
                model, x, {n: v for n, v, _ in axes}, measure=measure, depth=depth, at=at,
                spacing={n: sp for n, _, sp in axes}, progress=cb))
        except SpecError as e:   # name the command-line option
            if e.field == "params" or e.field.startswith("params."):
                raise SpecError("--param", e.value, e.allowed) from None
            if preset.name is not None and e.field.startswith(f"{preset.name}."):     # a preset's unknown knob
                knob = e.field.split(".", 1)[1]
                raise SpecError("--param" if knob in {n for n, _, _ in axes} else "--set", knob, e.allowed) from None
            if e.field in ("measure", "at"):
                raise SpecError(f"--{e.field}", e.value, e.allowed) from None
            raise
        out.print(S.summary_table(res))
        for line in res.plan:
            err.print(f"[dim]{line}[/dim]", highlight=False)
        for line in res.failures:
            err.print(f"[yellow]failed:[/yellow] {line}", highlight=False)
        payload = render(phase_diagram(res), fig_format) if fig_path is not None else None
        if output is not None:
            res.write(output)
            err.print(f"wrote {output}")
        if fig_path is not None:
            from kernelprop.io.results import atomic_write
            atomic_write(fig_path, payload)
            err.print(f"wrote {fig_path}")


def _sweep_progress(job):
    if not err.is_terminal:
        return job(None)
    from rich.progress import Progress
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("sweeping", total=None)
        return job(lambda done, total: bar.update(task, completed=done, total=total))


@app.command("plot")
def plot_command(
    results: List[Path] = typer.Argument(..., help="Result files (.json, .csv, .npz) written by run, simulate, "
                                         "compare or sweep; several run files are overlaid."),
    output: Path = typer.Option(..., "-o", "--output", help="Figure file: .pdf, .png or .svg."),
    kind: str = typer.Option("auto", help="auto | depth | kernels | spectrum | phase (auto: heatmaps for .npz "
                             "runs, phase diagram for sweeps, measure against depth otherwise)."),
    measure: Optional[str] = typer.Option(None, "--measure", "-m", help="Measure to draw (default cos_mean, or the "
                                          "sweep's first)."),
    depths: Optional[str] = typer.Option(None, help="Blocks for kernels/spectrum, comma-separated (0 = input)."),
    logx: bool = typer.Option(False, "--logx", help="Logarithmic x axis."),
    logy: bool = typer.Option(False, "--logy", help="Logarithmic y axis."),
    label: List[str] = typer.Option([], "--label", help="Curve labels, one per curve (repeatable)."),
    position: Optional[int] = typer.Option(None, help="Token position for profiles (cos_first, q_position)."),
    x: Optional[str] = typer.Option(None, "--x", help="Sweep axis on the x axis of a phase diagram."),
):
    """Draw a result file as a figure in the package style (column width, colour-blind-safe, fonts embedded)."""
    with _errors():
        from kernelprop.errors import SpecError
        from kernelprop.io.results import atomic_write
        from kernelprop.plotting import plot_files, render, style
        fmt = style.check_format(output, "--output")
        picks = None
        if depths is not None:
            try:
                picks = [int(d) for d in depths.split(",")]
            except ValueError:
                raise SpecError("--depths", depths, "must be comma-separated block indices, e.g. 0,4,32") from None
        try:
            fig = plot_files(results, kind=kind, measure=measure, depths=picks, logx=logx, logy=logy,
                             labels=label or None, x=x, position=position)
        except SpecError as e:
            if e.field in ("measure", "depths", "position", "x"):
                raise SpecError(f"--{e.field}", e.value, e.allowed) from None
            raise
        atomic_write(output, render(fig, fmt))
        err.print(f"wrote {output}")


def main():
    app()


if __name__ == "__main__":
    main()
