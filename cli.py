"""Command line of kernelprop: parse, call the library, print. Exit codes: 0 ok, 1 numerical
failure, 2 bad usage or spec, 3 theory and simulation disagree (``check``)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from pathlib import Path
from typing import Any, List, Optional, TypedDict

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
                  help="Infinite-width signal propagation through deep transformers at initialisation.")
out = Console()
err = Console(stderr=True)


def _version() -> str:
    """The installed distribution's version, else the imported package's."""
    from importlib import metadata
    try:
        return metadata.version("kernelprop")
    except metadata.PackageNotFoundError:
        from kernelprop import __version__
        return __version__


def _print_version(value: bool):
    if value:
        typer.echo(f"kernelprop {_version()}")
        raise typer.Exit()


@app.callback()
def _consoles(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
):
    """Infinite-width signal propagation through deep transformers at initialisation."""
    # (re)open the consoles at each invocation, so that they take the width (COLUMNS) of this one
    global out, err
    out, err = Console(), Console(stderr=True)
    import warnings
    warnings.showwarning = _warning     # one line on stderr (e.g. params no field uses), no source excerpt


def _warning(message, category, *_args, **_kwargs):
    err.print(f"warning: {message}", markup=False, highlight=False)


def _show(table):
    """Print a table whole: its lines may be longer than the console (report.fit), never cropped."""
    out.print(table, crop=False)


def _safe(text) -> str:
    from kernelprop.report import safe
    return safe(text)


# the library's argument -> the command-line option or argument that sets it (error messages name the option)
_FLAGS = {
    "spec": "SPEC", "overrides": "--set", "output": "--output", "figure": "--figure", "measure": "--measure",
    "output_grad": "--output-grad", "output_grad.rho": "--grad-rho", "width": "--width", "seeds": "--seeds",
    "seed": "--seed", "init": "--init", "input_kind": "--inputs", "scores": "--scores", "alpha": "--alpha",
    "symbols": "--symbol", "param": "--param", "at": "--at", "kind": "--kind", "labels": "--label",
    "depths": "--depths", "position": "--position", "x": "--x", "path": "RESULT", "paths": "RESULT",
    "workers": "--workers", "scheduler": "--scheduler", "cache": "--cache",
    **{f"options.{k}": f"--{k}" for k in ("tokens", "rho", "heads", "activation")}, "options.scores": "--preset-scores",
}


@contextlib.contextmanager
def _errors():
    from kernelprop.errors import NotSupportedError, NumericalError, SpecError
    try:
        yield
    except SpecError as e:
        if e.field in _FLAGS:
            e = SpecError(_FLAGS[e.field], e.value, e.allowed)
        err.print(f"[red]spec error:[/red] {_safe(e)}", highlight=False)
        raise typer.Exit(2) from None
    except NotSupportedError as e:
        err.print(f"[red]not supported:[/red] {_safe(e)}", highlight=False)
        raise typer.Exit(2) from None
    except NumericalError as e:
        err.print(f"[red]numerical failure:[/red] {_safe(e)}", highlight=False)
        raise typer.Exit(1) from None
    except UnicodeDecodeError as e:     # a binary or non-UTF-8 spec, config or table
        err.print(f"[red]spec error:[/red] an input file is not UTF-8 text ({_safe(e.reason)} at byte {e.start})",
                  highlight=False)
        raise typer.Exit(2) from None
    except RecursionError:              # e.g. a TOML document nested thousands of levels deep
        err.print("[red]spec error:[/red] the input nests too deeply to be read", highlight=False)
        raise typer.Exit(2) from None
    except MemoryError:
        err.print("[red]out of memory:[/red] the computation does not fit in memory; reduce the number of "
                  "tokens or the depth", highlight=False)
        raise typer.Exit(1) from None


def _preset_options(named: bool = True, scores_alias: bool = True):
    """Add the preset options to a command, passed to it as ``preset`` (the --preset NAME or None) and
    ``options`` (:class:`kernelprop.models.PresetOptions`).

    The preset's attention scores are ``--preset-scores`` in every command; ``scores_alias`` keeps
    ``--scores``, their former name, as a hidden alias (not where ``--scores`` sets the simulation's).
    ``named=False``: the options only (no ``--preset``)."""
    O = typer.Option
    options: list[tuple[str, object, Any]] = [
        ("tokens", int, O(32, "--tokens", help="Preset input: tokens T.")),
        ("rho", float, O(0.1, "--rho", help="Preset input: correlation of distinct tokens.")),
        ("heads", int, O(4, "--heads", help="Preset: attention heads.")),
        ("causal", bool, O(True, "--causal/--bidirectional", help="Preset: causal mask.")),
        ("scores", str, O("uniform", "--preset-scores",
                          help="Preset: attention scores, uniform (zero queries), tied or standard.")),
        ("activation", str, O("relu", "--activation", help="Preset: MLP activation.")),
    ]
    if scores_alias:
        options.append(("scores_alias", Optional[str], O(None, "--scores", hidden=True,
                                                         help="Former name of --preset-scores.")))
    if named:
        options.insert(0, ("name", Optional[str], O(None, "--preset", "-p", autocompletion=_complete_preset,
                                                    help="Run a named preset instead of a spec "
                                                         "(see `kernelprop presets`).")))

    def decorate(command):
        sig = inspect.signature(command, eval_str=True)
        extra = [inspect.Parameter(f"preset_{name}", inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
                 for name, kind, default in options]
        extra.append(inspect.Parameter("preset_context", inspect.Parameter.KEYWORD_ONLY, default=None,
                                       annotation=typer.Context))     # which options the command line set

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            from kernelprop.models import PresetOptions
            knobs = {name: kwargs.pop(f"preset_{name}") for name, _, _ in options}
            alias = knobs.pop("scores_alias", None)
            if alias is not None:
                if knobs["scores"] not in ("uniform", alias):
                    raise typer.BadParameter(f"--scores {alias} is the former name of --preset-scores, which says "
                                             f"{knobs['scores']}: give one of them", param_hint="'--scores'")
                knobs["scores"] = alias
            if named:
                kwargs["preset"] = knobs.pop("name")
            ctx = kwargs.pop("preset_context", None)
            given = frozenset(n for n in knobs if ctx is not None and n != "name" and getattr(
                ctx.get_parameter_source(f"preset_{n}"), "name", "") == "COMMANDLINE")
            if "scores_alias" in given:
                given = (given - {"scores_alias"}) | {"scores"}
            with _errors():        # the preset knobs are checked here, before the command's own wrapper
                chosen = PresetOptions(**knobs, given=given)
            return command(*args, options=chosen, **kwargs)

        hidden = ("preset", "options")
        wrapper.__signature__ = sig.replace(parameters=[q for q in sig.parameters.values() if q.name not in hidden]
                                            + extra)
        return wrapper
    return decorate


def _complete_spec(incomplete: str) -> list[str]:
    """Tab completion of SPEC: the bundled examples and the .toml files that start with ``incomplete``."""
    import glob

    from kernelprop.models import examples
    files = sorted(p for p in glob.glob(f"{glob.escape(incomplete)}*.toml") if Path(p).is_file())
    return [name for name in examples() if name.startswith(incomplete)] + files


def _complete_preset(incomplete: str) -> list[str]:
    """Tab completion of --preset NAME."""
    from kernelprop.methods.presets import PRESETS
    return [name for name in sorted(PRESETS) if name.startswith(incomplete)]


def _complete_example(incomplete: str) -> list[str]:
    from kernelprop.models import examples
    return [name for name in examples() if name.startswith(incomplete)]


KNOB_FLAGS = {"tokens": "--tokens", "rho": "--rho", "heads": "--heads", "causal": "--causal/--bidirectional",
              "scores": "--preset-scores", "activation": "--activation"}


def _load(spec, preset, options, depth, set_, allowed=()):
    """The Spec of SPEC (a file or bundled example) or of --preset NAME."""
    from kernelprop import models
    _spec_or_preset(spec, preset)
    if spec is not None:
        _refuse_knobs(spec, options, allowed)
        return models.load(spec, depth=depth, overrides=set_)
    return models.preset(preset, depth, overrides=set_, options=options)


def _refuse_knobs(spec, options, allowed=()):
    """A preset option given with a spec would be ignored (the spec sets its own input and layers): refuse it."""
    extra = sorted(set(getattr(options, "given", ())) - set(allowed)) if options is not None else []
    if extra:
        from kernelprop.errors import SpecError
        raise SpecError(KNOB_FLAGS.get(extra[0], extra[0]), getattr(options, extra[0]),
                        f"sets a preset's input or layers; the spec {spec} sets its own: edit the file (or its "
                        "[params] with --set NAME=VALUE), or use --preset NAME")


def _spec_or_preset(spec, preset):
    if (spec is None) == (preset is None):
        from kernelprop.errors import SpecError
        raise SpecError("SPEC", spec if spec is not None else "(none)",
                        "give either a spec (file or bundled example) or --preset NAME")


@app.command()
@_preset_options()
def run(
    spec: Optional[str] = typer.Argument(None, help="Spec file (.toml) or the name of a bundled example.",
                                         autocompletion=_complete_spec),
    config: Optional[Path] = typer.Option(None, "--config", help="Run a Hugging Face config.json instead of a spec "
                                          "(as `import-config` writes it; input: --tokens, --rho)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write results: .json, .csv, .npz, or "
                                          "labelled .nc / .zarr (xarray, with the kernels; kernelprop[xarray])."),
    depth: Optional[int] = typer.Option(None, "--depth", "-L", help="Override the depth."),
    set_: List[str] = typer.Option([], "--set", help="Override a param or preset knob: NAME=NUMBER (repeatable)."),
    every: Optional[int] = typer.Option(None, help="Record every k-th block (default: the spec's)."),
    sublayers: bool = typer.Option(False, help="Also record after each top-level layer of a block."),
    rows: int = typer.Option(24, help="Rows of the printed summary."),
    ntk: bool = typer.Option(False, "--ntk", help="Also propagate the neural tangent kernel Θ (NTK "
                             "parametrisation, docs/theory.md §14) and show its mean diagonal and condition number."),
    width: Optional[int] = typer.Option(None, "--width", help="Also predict finite width D: the limit beside D-wide "
                                        "networks drawn in Gram space (mean, s.d., bias; docs/finite-width.md). "
                                        "With a spec, --heads H sets every attention layer's heads (without "
                                        "--width: finite heads at infinite width, the chain of kernels); with "
                                        "--preset it is the preset's own knob."),
    samples: int = typer.Option(256, "--samples", help="Networks (or chains) drawn for the finite prediction."),
    measures: Optional[str] = typer.Option(None, "--measures", help="Compute only these measures, comma-separated "
                                           "(default: all): q_mean, q_min, q_max, cos_mean, cos_min, cross_cos_mean, "
                                           "rank_one_distance, stable_rank, effective_rank, eig_ratio, mean_abs, "
                                           "quad_error, cos_first, q_position (and ntk_mean, ntk_cond, ntk_error with "
                                           "--ntk). Spectra (stable_rank, effective_rank, eig_ratio) cost an "
                                           "eigendecomposition per record."),
    threads: Optional[int] = typer.Option(None, "--threads", help="BLAS threads (default: 1 below 512 tokens or "
                                          "on a busy machine, else all cores; env KERNELPROP_THREADS)."),
    preset: Optional[str] = None,
    options=None,
):
    """Propagate the token kernel of SPEC (or --preset NAME) through depth and summarise it."""
    with _errors():
        from kernelprop import io, propagate, report
        from kernelprop.kernel.propagate import check_tokens, measure_names
        names = None
        if measures is not None:
            names, _ = measure_names([m.strip() for m in measures.split(",") if m.strip()], ntk=ntk,
                                     field="--measures")
            if not names:
                from kernelprop.errors import SpecError
                raise SpecError("--measures", measures, "must name at least one measure, e.g. cos_mean,q_mean")
        if threads is not None:
            from kernelprop.kernel.threads import choose
            choose(0, threads, "--threads")          # checked before any work
        if config is not None or preset is not None:
            check_tokens(options.tokens, ntk=ntk, field="--tokens")   # before the preset's input kernel is built
        if config is not None:
            from kernelprop.io import hf
            if spec is not None or preset is not None:
                from kernelprop.errors import SpecError
                raise SpecError("--config", str(config), "give one of a spec, --preset NAME or --config FILE")
            _refuse_knobs(config, options, allowed=("tokens", "rho", "heads"))   # the config sets its layers
            s = hf.load(config, depth=depth, overrides=set_, tokens=options.tokens, rho=options.rho)
        else:
            s = _load(spec, preset, options, depth, set_, allowed=("heads",))   # --heads: the finite prediction's
        labelled = output is not None and output.suffix.lower() in (".nc", ".zarr")
        if output is not None and not labelled:
            io.check_format(output)
        # --heads with a spec: the finite prediction's heads (a preset takes it as its own knob)
        heads = options.heads if "heads" in options.given and preset is None else None
        if width is not None or heads is not None:     # the finite prediction beside the limit
            if labelled:
                from kernelprop.errors import SpecError
                raise SpecError("--output", str(output), "the finite prediction is written as .json, .csv or .npz")
            from kernelprop.finite.interface import predict
            pred = predict(s.network, s.inputs, width=width, heads=heads, samples=samples,
                           every=every or s.record["every"])
            out.print(f"{s.network.name or spec} — depth {s.network.depth}, {s.inputs.description}", highlight=False)
            for table in pred.tables(most=rows, width=out.width):
                _show(table)
            if output is not None:      # the finite samples' means and standard errors (montecarlo.simulate.write)
                from kernelprop.montecarlo.simulate import write
                write(pred.finite, output, spec_raw=s.raw)
                err.print(f"wrote {_safe(output)}", highlight=False)
            return
        traj = _with_progress(lambda cb: propagate(
            s.network, s.inputs, record="sublayers" if sublayers else s.record["mode"],
            every=every or s.record["every"], keep_kernels=output is not None and output.suffix in (".npz", ".nc",
                                                                                                   ".zarr"),
            progress=cb, ntk=ntk, measures=names, threads=threads), s.network.depth)
        title = f"{s.network.name or spec} — depth {s.network.depth}, {s.inputs.description}"
        columns = report.DEFAULT_COLUMNS + (("ntk_mean", "ntk_cond") if ntk else ())
        if names is not None:
            columns = tuple(n for n in names if getattr(traj.measures.get(n), "ndim", 0) == 1)
        _show(report.summary_table(traj, columns=columns, most=rows, title=title, width=out.width))
        if output is not None:
            if labelled:
                from kernelprop.io.results import write_dataset
                write_dataset(traj, output, spec_raw=s.raw)
            else:
                io.write(traj, output, spec_raw=s.raw)
            err.print(f"wrote {_safe(output)}", highlight=False)


@app.command()
@_preset_options()
def gradients(
    spec: Optional[str] = typer.Argument(None, help="Spec file (.toml) or the name of a bundled example.",
                                         autocompletion=_complete_spec),
    depth: Optional[int] = typer.Option(None, "--depth", "-L", help="Override the depth."),
    set_: List[str] = typer.Option([], "--set", help="Override a param or preset knob: NAME=NUMBER (repeatable)."),
    output_grad: str = typer.Option("identity", help="Output gradient kernel: identity or equicorrelated."),
    grad_rho: float = typer.Option(0.0, help="Correlation of the equicorrelated output gradient."),
    rows: int = typer.Option(16, help="Rows of the printed summary."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write per-block gradients as .csv."),
    preset: Optional[str] = None,
    options=None,
):
    """Backward pass: gradient-kernel norms per block, parameter-gradient norms, vanishing/exploding diagnosis.

    The diagnosis reads two rows the table always shows: R = grad norm² at the input / at the last
    block (as printed), per block R^(1/L); stable if the per-block factor lies within ×e^±0.01
    (≈ ×0.99 to ×1.01), exploding toward the input above, vanishing below. A NaN in the gradient
    measures is a numerical failure (exit 1) naming the block."""
    with _errors():
        from kernelprop import io, report
        from kernelprop.kernel.backward import backpropagate
        s = _load(spec, preset, options, depth, set_)
        if output is not None:
            io.check_format(output, (".csv",), "gradients")
        g = _with_progress(lambda cb: backpropagate(s.network, s.inputs, output_grad=output_grad,
                                                   rho=grad_rho, keep_kernels=False, progress=cb), s.network.depth,
                           "backpropagating")
        report.check_gradients(g)
        table = report.gradients_table(g, most=rows, title=f"gradients — {s.network.name or spec}, depth "
                                       f"{s.network.depth}; per-block parameter gradients ‖∂W‖²/d by kind",
                                       width=out.width)
        _show(table)
        out.print(f"diagnosis: {report.gradient_diagnosis(g, report.shown_digits(table))}", highlight=False)
        if output is not None:
            io.write_csv(output, *io.gradient_rows(g))
            err.print(f"wrote {_safe(output)}", highlight=False)


@app.command()
@_preset_options()
def moments(
    spec: Optional[str] = typer.Argument(None, help="Spec file (.toml) or the name of a bundled example.",
                                         autocompletion=_complete_spec),
    depth: Optional[int] = typer.Option(None, "--depth", "-L", help="Override the depth."),
    set_: List[str] = typer.Option([], "--set", help="Override a param or preset knob: NAME=NUMBER (repeatable)."),
    rows: int = typer.Option(16, help="Rows of the printed summary."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the moments as .csv."),
    preset: Optional[str] = None,
    options=None,
):
    """Moment view (Kedia et al. 2024): μ, σ², r forward and σ_g², r_g backward at every record."""
    with _errors():
        from kernelprop import io, report
        from kernelprop.kernel.backward import backpropagate
        from kernelprop.methods.moments import moment_view
        s = _load(spec, preset, options, depth, set_)
        if output is not None:
            io.check_format(output, (".csv",), "moments")
        g = _with_progress(lambda cb: backpropagate(s.network, s.inputs, progress=cb), s.network.depth,
                           "backpropagating")
        mv = moment_view(g)
        report.check_gradients(g)
        _show(report.moments_table(g, mv, most=rows, title=f"moments — {s.network.name or spec}, depth "
                                   f"{s.network.depth}", width=out.width))
        if output is not None:
            io.write_csv(output, *io.moment_rows(g, mv))
            err.print(f"wrote {_safe(output)}", highlight=False)


@app.command()
def presets():
    """List the named presets with their knobs and sources."""
    from kernelprop import report
    from kernelprop.methods.presets import PRESETS
    _show(report.presets_table(PRESETS.values()))


@app.command()
@_preset_options(named=False)
def compare(
    names: List[str] = typer.Argument(..., help="Presets to compare (see `kernelprop presets`).",
                                      autocompletion=_complete_preset),
    depth: int = typer.Option(48, "--depth", "-L", help="Depth of every preset."),
    measure: str = typer.Option("cos_mean", "--measure", "-m", help="Measure to tabulate (see docs/formats.md)."),
    rows: int = typer.Option(16, help="Rows (depths) of the printed table; the file gets every depth."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the comparison at every depth as .csv."),
    options=None,
):
    """Tabulate one measure against depth for several presets side by side."""
    with _errors():
        from kernelprop import io, models, report
        if output is not None:
            io.check_format(output, (".csv",), "compare")

        def each(callback):   # one preset at a time, so that the bar advances per preset
            trajs = {}
            for k, name in enumerate(names):
                trajs.update(models.compare([name], depth, measure=measure, options=options))
                if callback is not None:
                    callback(k + 1, len(names))
            return trajs
        trajs = _with_progress(each, len(names), "comparing")
        first = trajs[names[0]].measures.get(measure)
        if first is not None and len(first) and getattr(first[0], "ndim", 0):
            from kernelprop.errors import SpecError
            raise SpecError("--measure", measure, "is a per-position profile; compare tabulates one number per "
                            "depth (e.g. cos_mean, cos_min, q_mean)")
        picked = report.depth_rows(trajs[names[0]], rows)
        title = f"{measure} against depth, {options.inputs().description}"
        _show(report.comparison_table(trajs, measure, picked, title=title, names=names, width=out.width,
                                      total=len(trajs[names[0]].depth_records())))
        if output is not None:
            io.write_csv(output, *io.comparison_rows(trajs, measure, None, names))
            err.print(f"wrote {_safe(output)}", highlight=False)


def _with_progress(job, total, label="propagating"):
    """``job(callback)`` with a transient progress bar on stderr at any depth, if stderr is a terminal;
    ``job(None)`` otherwise (nothing in pipes and logs). The callback takes ``(done, total)``."""
    if not err.is_terminal:
        return job(None)
    from rich.progress import Progress
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task(label, total=total)
        return job(lambda done, of=None: bar.update(task, completed=done, total=of or total))


@app.command("import-config")
def import_config(
    config: Path = typer.Argument(..., help="A Hugging Face config.json: GPT-2, Llama/Mistral/Qwen2, GPT-NeoX, BERT."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the spec (.toml); default: print it."),
    tokens: int = typer.Option(32, "--tokens", help="Input: tokens T."),
    rho: float = typer.Option(0.1, "--rho", help="Input: correlation of distinct token embeddings (0: i.i.d. table)."),
):
    """Write the spec of a Hugging Face model config at initialisation, with its family's init (docs/inits.md)."""
    with _errors():
        from kernelprop.io import hf
        imp = hf.import_config(config, output, tokens=tokens, rho=rho)
        for note in imp.notes:
            err.print(f"[yellow]note:[/yellow] {_safe(note)}", highlight=False)
        if output is None:
            typer.echo(hf.to_toml(imp, config.name), nl=False)
        else:
            err.print(f"wrote {_safe(output)}", highlight=False)


@app.command("spec-reference")
def spec_reference():
    """Print the reference of every spec field (Markdown)."""
    from kernelprop.network.reference import reference
    typer.echo(reference())


@app.command()
def examples(
    show: Optional[str] = typer.Option(None, "--show", autocompletion=_complete_example,
                                       help="Print the bundled example NAME (TOML) to start from: "
                                       "`kernelprop examples --show pre_ln > my.toml`; where it lives goes to stderr."),
):
    """List the bundled example specs, or print one (--show NAME)."""
    from kernelprop import load, models
    if show is not None:
        with _errors():
            bundled = models.examples()
            name = show.removesuffix(".toml")
            if name not in bundled:
                from kernelprop.errors import SpecError
                raise SpecError("--show", show, f"must be a bundled example: {', '.join(bundled)}")
            err.print(f"[dim]# bundled example {_safe(name)}: {_safe(bundled[name])}[/dim]", highlight=False,
                      soft_wrap=True)
            typer.echo(bundled[name].read_text(encoding="utf-8"), nl=False)
        return
    for name, path in models.examples().items():
        out.print(f"[bold]{_safe(name):10s}[/bold] {_safe(load(path).network.name)}", highlight=False)
    err.print(f"[dim]bundled in {_safe(models.EXAMPLES)}; `kernelprop examples --show NAME > my.toml` copies one "
              "to start from[/dim]", highlight=False, soft_wrap=True)


@app.command()
@_preset_options(scores_alias=False)
def simulate(
    spec: Optional[str] = typer.Argument(None, help="Spec file (.toml) or the name of a bundled example.",
                                         autocompletion=_complete_spec),
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
    preset: Optional[str] = None,
    options=None,
):
    """Run SPEC (or --preset NAME) as finite-width numpy networks over many seeds; \
print seed means ± standard errors."""
    with _errors():
        from kernelprop import io
        from kernelprop import montecarlo as mc
        from kernelprop.montecarlo.tables import simulation_table
        s = _load(spec, preset, options, depth, set_)
        if output is not None:
            io.check_format(output)
        sim = _with_progress(lambda cb: mc.simulate(
            s.network, s.inputs, width, seeds, init=init, input_kind=inputs, scores=scores, seed=seed,
            record="sublayers" if sublayers else s.record["mode"], every=every or s.record["every"],
            keep_kernels=output is not None and output.suffix == ".npz", dong=dong, progress=cb), s.network.depth,
            "simulating")
        title = _safe(f"{s.network.name or spec} — width {width}, {seeds} seeds, {s.inputs.description}")
        _show(simulation_table(sim, most=rows, title=title, width=out.width))
        if output is not None:
            mc.write(sim, output, spec_raw=s.raw)
            err.print(f"wrote {_safe(output)}", highlight=False)


class _GradientOptions(TypedDict, total=False):
    """The backward-pass keywords ``check --gradients`` passes to :func:`kernelprop.montecarlo.check`."""

    gradients: bool
    output_grad: str
    rho: float


@app.command()
@_preset_options(scores_alias=False)
def check(
    spec: Optional[str] = typer.Argument(None, help="Spec file (.toml) or the name of a bundled example.",
                                         autocompletion=_complete_spec),
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
    preset: Optional[str] = None,
    options=None,
):
    """Compare the infinite-width theory of SPEC (or --preset NAME) with finite-width simulations; exit 3 if
    they disagree."""
    with _errors():
        from kernelprop import montecarlo as mc
        from kernelprop import report
        from kernelprop.montecarlo.tables import comparison_table, rows_table
        if not 0 < alpha < 1:
            from kernelprop.errors import SpecError
            raise SpecError("--alpha", alpha, "must lie in (0, 1)")
        s = _load(spec, preset, options, depth, set_)
        extra: _GradientOptions = {"gradients": True, "output_grad": output_grad, "rho": grad_rho} if gradients else {}
        cmp, *_ = _with_progress(lambda cb: mc.check(
            s.network, s.inputs, width, seeds, extrapolate=extrapolate, alpha=alpha, seed=seed,
            record="sublayers" if sublayers else s.record["mode"], every=every or s.record["every"],
            init=init, input_kind=inputs, scores=scores, progress=cb, **extra), s.network.depth, "checking")
        title = _safe(f"{s.network.name or spec} — theory vs simulation, {s.inputs.description}")
        if all_rows:
            _show(rows_table(cmp, width=out.width))
        elif gradients:
            _show(comparison_table(cmp.parts["forward"], most=rows, title=title, width=out.width))
            _show(mc.gradient_table(cmp.parts["gradients"], most=rows, title=_safe(
                f"{s.network.name or spec} — gradients, output gradient {output_grad}"), width=out.width))
        else:
            _show(comparison_table(cmp, most=rows, title=title, width=out.width))
        out.print(report.verdict(cmp))
        if not cmp.agree:
            raise typer.Exit(3)


@app.command()
def symbolic(
    spec: str = typer.Argument(..., help="Spec file (.toml) or the name of a bundled example.",
                                         autocompletion=_complete_spec),
    explicit: Optional[int] = typer.Option(None, "--explicit", "-T", help="Explicit T×T kernels for T tokens "
                                           "(small T) instead of (q, ρ)."),
    latex: bool = typer.Option(False, "--latex", help="Print LaTeX instead of text."),
    code: bool = typer.Option(False, "--code", help="Print the lambdified numpy source of the block map."),
    symbol: List[str] = typer.Option([], "--symbol", "-s", help="Make numeric fields symbols: FIELD or PATH[=NAME], "
                                     "e.g. value_var or block[0].beta=b (repeatable)."),
    opaque: bool = typer.Option(False, help="Keep activations without closed form as numerically evaluated functions."),
    depth: Optional[int] = typer.Option(None, "--depth", "-L", help="Override the spec's depth."),
    set_: List[str] = typer.Option([], "--set", help="Override a param: NAME=NUMBER (repeatable)."),
):
    """Derive SPEC's block map in closed form: (q, ρ) map, trajectory, C-map slope χ = C'(1), fixed points."""
    with _errors():
        from kernelprop import models
        from kernelprop import symbolic as sym
        from kernelprop.errors import NotSupportedError
        s = models.load(spec, depth=depth, overrides=set_)
        try:
            d = sym.derive(s, tokens=explicit, symbols=symbol, opaque=opaque)
        except NotSupportedError as e:
            tokens = _explicit_fallback(e, s, explicit)
            if tokens is None:
                raise
            err.print(f"[yellow]note:[/yellow] causal attention does not preserve equicorrelation, so this is the "
                      f"explicit mode with T = {tokens} tokens (the spec has {s.inputs.n_tokens}); "
                      f"--explicit T sets T (the derivation's time grows quickly with T)", highlight=False)
            d = sym.derive(s, tokens=tokens, symbols=symbol, opaque=opaque)
        text = sym.render_code(d) if code else sym.render_latex(d) if latex else sym.render_text(d)
        from kernelprop.report import printable
        out.print(printable(text), markup=False, highlight=False, soft_wrap=True)


_AUTO_TOKENS = 3    # the explicit mode's token count when `symbolic` picks it (T = 3: a few seconds for pre_ln)


def _explicit_fallback(error, spec, explicit) -> Optional[int]:
    """The token count of the explicit mode when the equicorrelated mode refused ``spec`` only because
    its attention is causal (no --explicit given), else None: min(spec's T, 3) for identity and
    equicorrelated inputs (the explicit mode may shrink them), the spec's T if other inputs have at most 3."""
    if explicit is not None or "does not preserve equicorrelation" not in str(error):
        return None
    n = spec.inputs.n_tokens
    if spec.raw.get("input", {}).get("kind") in ("identity", "equicorrelated"):
        return min(n, _AUTO_TOKENS)
    return n if n <= _AUTO_TOKENS else None


@app.command("sweep")
@_preset_options()
def sweep_command(
    spec: Optional[str] = typer.Argument(None, help="Spec file (.toml) or the name of a bundled example.",
                                         autocompletion=_complete_spec),
    param: List[str] = typer.Option([], "--param", help="NAME=START:STOP:N (N points) or NAME=V1,V2,…; NAME is a "
                                    "param of the spec, a preset knob, or L (depth). Append :log or :lin to a range "
                                    "to choose its spacing. Once or twice."),
    log: bool = typer.Option(False, "--log", help="Geometric spacing for every START:STOP:N range."),
    measure: List[str] = typer.Option(["cos_mean"], "--measure", "-m", help="Scalar measure(s) (see docs/formats.md); "
                                      "the figure shows the first."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the sweep: .csv, .json, .npz, or "
                                          "labelled .nc / .zarr (xarray; kernelprop[xarray])."),
    figure: Optional[Path] = typer.Option(None, "--figure", help="Heatmap file (.png, .pdf, .svg); default: next "
                                          "to -o with extension .png."),
    no_figure: bool = typer.Option(False, "--no-figure", help="Do not draw the heatmap."),
    at: str = typer.Option("block", help="Read the kernel after block L (block) or after the final layers (output)."),
    depth: Optional[int] = typer.Option(None, "--depth", "-L", help="Depth when L is not swept."),
    set_: List[str] = typer.Option([], "--set", help="Fix a param or preset knob: NAME=NUMBER (repeatable)."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Run on a local Dask cluster of N worker "
                                          "processes (0: one per core; 1: serially, the default). kernelprop[dask]."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Run on an existing Dask cluster: its "
                                            "scheduler address tcp://HOST:PORT (default: $KERNELPROP_SCHEDULER "
                                            "unless --workers is given)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache folder of finished runs, so an interrupted "
                                         "sweep resumes (default: .kernelprop-cache next to -o)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write a cache."),
    batch: bool = typer.Option(True, "--batch/--no-batch", help="Propagate networks that differ only in param "
                               "values and depth as one batch (default), or one run per network."),
    preset: Optional[str] = None,
    options=None,
):
    """Sweep a measure over one or two parameters (e.g. a residual weight × depth); write a table and a heatmap."""
    with _errors():
        from kernelprop import models
        from kernelprop import sweep as S
        from kernelprop.errors import SpecError
        from kernelprop.io.results import atomic_write
        from kernelprop.plotting import phase_diagram, render, style
        if not param or len(param) > 2:
            raise SpecError("--param", list(param), "give one or two --param NAME=START:STOP:N")
        axes = [S.parse_param(p, log) for p in param]
        swept = [name for name, _, _ in axes]
        if len(set(swept)) < len(axes):
            raise SpecError("--param", list(param), "each parameter can be swept once")
        if output is not None:
            S.check_format(output)
        fig_path = None if no_figure else figure or (output.with_suffix(".png") if output is not None else None)
        fig_format = style.check_format(fig_path) if fig_path is not None else None
        _spec_or_preset(spec, preset)
        if spec is not None:
            _refuse_knobs(spec, options)
        model, x, depth = models.sweep_model(spec, preset, depth=depth, overrides=set_, options=options)
        if scheduler is None and workers is None:
            scheduler = os.environ.get("KERNELPROP_SCHEDULER") or None
        if no_cache:
            cache = None
        elif cache is None and output is not None:
            cache = output.parent / ".kernelprop-cache"
        try:
            res = _sweep_progress(lambda cb: S.sweep(
                model, x, {n: v for n, v, _ in axes}, measure=measure, depth=depth, at=at,
                spacing={n: sp for n, _, sp in axes}, progress=cb, workers=workers, scheduler=scheduler,
                cache=cache, batch=batch))
        except SpecError as e:   # the sweep's params are --param, a preset's unknown knob --param or --set
            if e.field == "params" or e.field.startswith("params."):
                raise SpecError("--param", e.value, e.allowed) from None
            if preset is not None and e.field.startswith(f"{preset}."):
                knob = e.field.split(".", 1)[1]
                raise SpecError("--param" if knob in swept else "--set", knob, e.allowed) from None
            raise
        _show(S.summary_table(res))
        for line in res.plan:
            err.print(f"[dim]{_safe(line)}[/dim]", highlight=False)
        for line in res.failures:
            err.print(f"[yellow]failed:[/yellow] {_safe(line)}", highlight=False)
        payload = render(phase_diagram(res), fig_format) if fig_format is not None else None
        if output is not None:
            res.write(output)
            err.print(f"wrote {_safe(output)}", highlight=False)
        if fig_path is not None and payload is not None:
            atomic_write(fig_path, payload)
            err.print(f"wrote {_safe(fig_path)}", highlight=False)


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
        from kernelprop.io.results import atomic_write
        from kernelprop.plotting import plot_files, render, style
        fmt = style.check_format(output, "output")
        try:
            fig = plot_files(results, kind=kind, measure=measure, depths=depths, logx=logx, logy=logy,
                             labels=label or None, x=x, position=position)
        except IndexError as exc:
            if position is None:
                raise
            from kernelprop.errors import SpecError
            raise SpecError("--position", position, f"is not a token position of this result ({exc})") from None
        atomic_write(output, render(fig, fmt))
        err.print(f"wrote {_safe(output)}", highlight=False)


def main():
    app(prog_name="kernelprop")


if __name__ == "__main__":
    main()
