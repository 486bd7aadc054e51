"""The Typer app, its consoles and what every command shares: error handling (exit 1 numerical failure, 2 bad
usage or spec), progress bars, printing tables whole. The commands are in the sibling modules."""

from __future__ import annotations

import contextlib

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


def _with_progress(job, total, label="propagating"):
    """``job(callback)`` with a transient progress bar on stderr at any depth, if stderr is a terminal;
    ``job(None)`` otherwise (nothing in pipes and logs). The callback takes ``(done, total)``."""
    if not err.is_terminal:
        return job(None)
    from rich.progress import Progress
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task(label, total=total)
        return job(lambda done, of=None: bar.update(task, completed=done, total=of or total))



def main():
    app(prog_name="kernelprop")
