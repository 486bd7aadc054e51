"""Commands of the infinite-width engine: ``run``, ``gradients``, ``moments``, ``presets``, ``compare``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import core as ui
from .core import _errors, _safe, _show, _with_progress, app
from .options import _complete_preset, _complete_spec, _load, _preset_options, _refuse_knobs


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
            ui.out.print(f"{s.network.name or spec} — depth {s.network.depth}, {s.inputs.description}", highlight=False)
            for table in pred.tables(most=rows, width=ui.out.width):
                _show(table)
            if output is not None:      # the finite samples' means and standard errors (montecarlo.simulate.write)
                from kernelprop.montecarlo.simulate import write
                write(pred.finite, output, spec_raw=s.raw)
                ui.err.print(f"wrote {_safe(output)}", highlight=False)
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
        _show(report.summary_table(traj, columns=columns, most=rows, title=title, width=ui.out.width))
        if output is not None:
            if labelled:
                from kernelprop.io.results import write_dataset
                write_dataset(traj, output, spec_raw=s.raw)
            else:
                io.write(traj, output, spec_raw=s.raw)
            ui.err.print(f"wrote {_safe(output)}", highlight=False)


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
                                       width=ui.out.width)
        _show(table)
        ui.out.print(f"diagnosis: {report.gradient_diagnosis(g, report.shown_digits(table))}", highlight=False)
        if output is not None:
            io.write_csv(output, *io.gradient_rows(g))
            ui.err.print(f"wrote {_safe(output)}", highlight=False)


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
                                   f"{s.network.depth}", width=ui.out.width))
        if output is not None:
            io.write_csv(output, *io.moment_rows(g, mv))
            ui.err.print(f"wrote {_safe(output)}", highlight=False)


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
        _show(report.comparison_table(trajs, measure, picked, title=title, names=names, width=ui.out.width,
                                      total=len(trajs[names[0]].depth_records())))
        if output is not None:
            io.write_csv(output, *io.comparison_rows(trajs, measure, None, names))
            ui.err.print(f"wrote {_safe(output)}", highlight=False)
