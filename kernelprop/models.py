"""Networks and their inputs by name: a spec file, a bundled example, or a preset with its knobs.

* :func:`load` — a spec file or the name of a bundled example (:func:`examples`), with the depth
  and params overridden;
* :func:`preset` — a named preset (:data:`kernelprop.methods.presets.PRESETS`) at some depth, its
  knobs overridden, on an equicorrelated input (:class:`PresetOptions`); :func:`preset_builder` — the
  same as a builder ``build(depth, **knobs)`` for sweeps (:func:`sweep_model`: either kind, ready for
  :func:`kernelprop.sweep.sweep`); :func:`compare` — several presets propagated on the same input.

Both return a :class:`~kernelprop.network.spec.Spec` (network, inputs, recording options, the raw
description written into result files). Overrides are a mapping ``{name: number}`` or strings
``"NAME=NUMBER"`` (:func:`parse_overrides`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import inputs as I
from .errors import SpecError
from .network.spec import Spec
from .network.spec import load as load_spec

EXAMPLES = Path(__file__).parent / "examples"
DEFAULT_DEPTH = 48       # a preset's depth when none is given


def examples() -> dict:
    """``{name: path}`` of the bundled example specs, sorted by name."""
    return {f.stem: f for f in sorted(EXAMPLES.glob("*.toml"))}


def example_path(spec) -> Path:
    """``spec`` itself if it is an existing file, else the bundled example of that name (``.toml`` optional)."""
    p = Path(spec)
    if p.exists():
        return p
    bundled = EXAMPLES / f"{str(spec).removesuffix('.toml')}.toml"
    if bundled.exists():
        return bundled
    raise SpecError("spec", str(spec), f"is neither a file nor a bundled example ({', '.join(examples())})")


def parse_overrides(overrides) -> dict:
    """``{name: float}`` from a mapping or from strings ``"NAME=NUMBER"``; :class:`SpecError` naming
    ``overrides`` otherwise."""
    if isinstance(overrides, Mapping):
        for k, v in overrides.items():
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise SpecError(f"overrides.{k}", v, "must be a number (not a boolean or a string)")
        return {str(k): float(v) for k, v in overrides.items()}
    if isinstance(overrides, str):
        overrides = [overrides]
    out: dict[str, float] = {}
    for item in overrides or []:
        name, sep, value = str(item).partition("=")
        try:
            number = float(value)
        except ValueError:
            raise SpecError("overrides", item, "must be NAME=NUMBER, e.g. --set beta=0.5") from None
        if not sep:
            raise SpecError("overrides", item, "must be NAME=NUMBER, e.g. --set beta=0.5")
        if name.strip() in out:
            raise SpecError("overrides", item, f"sets {name.strip()} a second time (it is "
                            f"{out[name.strip()]:g} already): give each name once")
        out[name.strip()] = number
    return out


def load(spec, *, depth: int | None = None, overrides: Mapping | Sequence[str] = ()) -> Spec:
    """The spec file ``spec`` (or the bundled example of that name); ``depth`` and the params in
    ``overrides`` replace the file's."""
    path = example_path(spec)
    return load_spec(path, depth=depth, params=parse_overrides(overrides))


@dataclass(frozen=True)
class PresetOptions:
    """What every preset shares: its input (``tokens`` T, correlation ``rho`` of distinct tokens, unit
    norm) and its attention and MLP choices (``heads``, ``causal``, ``scores``: uniform, tied or
    standard, ``activation``)."""

    tokens: int = 32
    rho: float = 0.1
    heads: int = 4
    causal: bool = True
    scores: str = "uniform"
    activation: str = "relu"
    #: the options set explicitly (on the command line); a spec file has its own input and layers and refuses them
    given: frozenset = field(default=frozenset(), compare=False, repr=False)

    def __post_init__(self):
        for name in ("tokens", "heads"):
            v = getattr(self, name)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
                raise SpecError(f"options.{name}", v, "must be a whole number >= 1")
        if isinstance(self.rho, (bool, np.bool_)) or not isinstance(self.rho, (int, float, np.integer, np.floating)):
            raise SpecError("options.rho", self.rho, "must be a real number (not a boolean or a string)")
        if not isinstance(self.causal, (bool, np.bool_)):
            raise SpecError("options.causal", self.causal, "must be True or False (a string such as \"false\" "
                            "or a number is not a boolean)")
        object.__setattr__(self, "causal", bool(self.causal))
        for name in ("scores", "activation"):
            if not isinstance(getattr(self, name), str):
                raise SpecError(f"options.{name}", getattr(self, name), "must be a string")

    def inputs(self) -> I.Inputs:
        """The equicorrelated input kernel ``q = 1``, ``rho``, over ``tokens`` tokens (memory checked first)."""
        from .kernel.propagate import check_tokens
        check_tokens(self.tokens, field="options.tokens")
        return I.equicorrelated(self.tokens, 1.0, self.rho)

    def raw(self) -> dict:
        """The options as written into result files."""
        return {"heads": self.heads, "causal": self.causal, "scores": self.scores, "activation": self.activation,
                "input": {"kind": "equicorrelated", "tokens": self.tokens, "rho": self.rho}}


def preset_builder(name: str, *, overrides: Mapping | Sequence[str] = (),
                   options: PresetOptions = PresetOptions()):
    """The preset ``name`` as a builder ``build(depth, **knobs) -> Network`` (for
    :func:`kernelprop.sweep.sweep`), with ``overrides`` fixing some of its knobs."""
    from .methods import presets
    return functools.partial(presets.build, name, heads=options.heads, causal=options.causal, scores=options.scores,
                             activation=options.activation, **parse_overrides(overrides))


def sweep_model(spec=None, preset_name: str | None = None, *, depth: int | None = None,
                overrides: Mapping | Sequence[str] = (), options: PresetOptions = PresetOptions()):
    """``(model, inputs, depth)`` for :func:`kernelprop.sweep.sweep`: the spec ``spec`` (its own input,
    ``inputs`` None), or the builder of the preset ``preset_name`` (:func:`preset_builder`, its knobs
    sweepable) on ``options.inputs()`` at ``depth`` (default 48) when L is not swept."""
    if spec is not None:
        return load(spec, depth=depth, overrides=overrides), None, depth
    if preset_name is None:   # the error the builder would raise when the sweep first calls it
        from .methods.presets import PRESETS
        raise SpecError("preset", None, f"must be one of {sorted(PRESETS)}")
    builder = preset_builder(preset_name, overrides=overrides, options=options)
    return builder, options.inputs(), DEFAULT_DEPTH if depth is None else depth


def preset(name: str, depth: int | None = None, *, overrides: Mapping | Sequence[str] = (),
           options: PresetOptions = PresetOptions()) -> Spec:
    """The preset ``name`` at ``depth`` blocks (default 48) on ``options.inputs()``; ``overrides``
    replace its knobs (:func:`kernelprop.methods.presets.build` says which it has)."""
    from .methods import presets
    knobs = parse_overrides(overrides)
    net = presets.build(name, DEFAULT_DEPTH if depth is None else depth, heads=options.heads,
                        causal=options.causal, scores=options.scores, activation=options.activation, **knobs)
    x = options.inputs()
    raw = {"preset": name, "depth": net.depth, "knobs": knobs, **options.raw()}
    return Spec(net, x, {"mode": "blocks", "every": 1}, raw)


def compare(names: Sequence[str], depth: int = DEFAULT_DEPTH, *, measure: str = "cos_mean",
            options: PresetOptions = PresetOptions()) -> dict:
    """``{name: Trajectory}``: each preset of ``names`` propagated at ``depth`` on the same input
    (kernels not kept). :class:`SpecError` naming ``measure`` if the trajectories lack it."""
    from .kernel.propagate import propagate
    from .methods import presets
    x = options.inputs()
    trajs = {}
    for name in names:
        net = presets.build(name, depth, heads=options.heads, causal=options.causal, scores=options.scores,
                            activation=options.activation)
        trajs[name] = propagate(net, x, keep_kernels=False)
        if measure not in trajs[name].measures:
            raise SpecError("measure", measure, f"must be one of {sorted(trajs[name].measures)}")
    return trajs
