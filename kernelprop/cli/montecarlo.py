"""Commands of the finite-width Monte Carlo: ``simulate`` and ``check`` (exit 3 when theory and simulation
disagree)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, TypedDict

import typer

from . import core as ui
from .core import _errors, _safe, _show, _with_progress, app
from .options import _complete_spec, _load, _preset_options


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
        _show(simulation_table(sim, most=rows, title=title, width=ui.out.width))
        if output is not None:
            mc.write(sim, output, spec_raw=s.raw)
            ui.err.print(f"wrote {_safe(output)}", highlight=False)


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
            _show(rows_table(cmp, width=ui.out.width))
        elif gradients:
            _show(comparison_table(cmp.parts["forward"], most=rows, title=title, width=ui.out.width))
            _show(mc.gradient_table(cmp.parts["gradients"], most=rows, title=_safe(
                f"{s.network.name or spec} — gradients, output gradient {output_grad}"), width=ui.out.width))
        else:
            _show(comparison_table(cmp, most=rows, title=title, width=ui.out.width))
        ui.out.print(report.verdict(cmp))
        if not cmp.agree:
            raise typer.Exit(3)
