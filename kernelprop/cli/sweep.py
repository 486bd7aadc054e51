"""The ``sweep`` command: a grid of parameter values, batched, on Dask workers or a cluster, resumable."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from . import core as ui
from .core import _errors, _safe, _show, app
from .options import _complete_spec, _preset_options, _refuse_knobs, _spec_or_preset


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
            ui.err.print(f"[dim]{_safe(line)}[/dim]", highlight=False)
        for line in res.failures:
            ui.err.print(f"[yellow]failed:[/yellow] {_safe(line)}", highlight=False)
        payload = render(phase_diagram(res), fig_format) if fig_format is not None else None
        if output is not None:
            res.write(output)
            ui.err.print(f"wrote {_safe(output)}", highlight=False)
        if fig_path is not None and payload is not None:
            atomic_write(fig_path, payload)
            ui.err.print(f"wrote {_safe(fig_path)}", highlight=False)


def _sweep_progress(job):
    if not ui.err.is_terminal:
        return job(None)
    from rich.progress import Progress
    with Progress(console=ui.err, transient=True) as bar:
        task = bar.add_task("sweeping", total=None)
        return job(lambda done, total: bar.update(task, completed=done, total=total))
