"""The ``symbolic`` command: closed forms, fixed points and LaTeX from the symbolic engine."""

from __future__ import annotations

from typing import List, Optional

import typer

from . import core as ui
from .core import _errors, app
from .options import _complete_spec


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
            ui.err.print(f"[yellow]note:[/yellow] causal attention does not preserve equicorrelation, so this is the "
                      f"explicit mode with T = {tokens} tokens (the spec has {s.inputs.n_tokens}); "
                      f"--explicit T sets T (the derivation's time grows quickly with T)", highlight=False)
            d = sym.derive(s, tokens=tokens, symbols=symbol, opaque=opaque)
        text = sym.render_code(d) if code else sym.render_latex(d) if latex else sym.render_text(d)
        from kernelprop.report import printable
        ui.out.print(printable(text), markup=False, highlight=False, soft_wrap=True)


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
