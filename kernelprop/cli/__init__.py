"""The ``kernelprop`` command (Typer): parse, call the library, print. Exit codes: 0 ok, 1 numerical failure,
2 bad usage or spec, 3 theory and simulation disagree (``check``).

core.py holds the app, its consoles and the shared error handling; options.py the preset options, completions
and spec loading; the commands: engine.py (run, gradients, moments, presets, compare), montecarlo.py
(simulate, check), symbolic.py, sweep.py, files.py (import-config, spec-reference, examples, plot).
"""

# isort: off
# each module registers its commands on ``app``, in the order ``kernelprop --help`` lists them
from . import engine, montecarlo, symbolic, sweep, files  # noqa: F401
from .core import app, main
# isort: on

__all__ = ["app", "main"]
