"""Commands around files: ``import-config``, ``spec-reference``, ``examples``, ``plot``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import core as ui
from .core import _errors, _safe, app
from .options import _complete_example


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
            ui.err.print(f"[yellow]note:[/yellow] {_safe(note)}", highlight=False)
        if output is None:
            typer.echo(hf.to_toml(imp, config.name), nl=False)
        else:
            ui.err.print(f"wrote {_safe(output)}", highlight=False)


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
            ui.err.print(f"[dim]# bundled example {_safe(name)}: {_safe(bundled[name])}[/dim]", highlight=False,
                      soft_wrap=True)
            typer.echo(bundled[name].read_text(encoding="utf-8"), nl=False)
        return
    for name, path in models.examples().items():
        ui.out.print(f"[bold]{_safe(name):10s}[/bold] {_safe(load(path).network.name)}", highlight=False)
    ui.err.print(f"[dim]bundled in {_safe(models.EXAMPLES)}; `kernelprop examples --show NAME > my.toml` copies one "
              "to start from[/dim]", highlight=False, soft_wrap=True)



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
        ui.err.print(f"wrote {_safe(output)}", highlight=False)
