"""Options shared by the commands: the preset options (``--preset NAME`` and its knobs), completions, loading a
spec or preset with ``--depth`` and ``--set``."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, Optional

import typer

from .core import _errors


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
