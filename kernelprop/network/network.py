"""The whole network: a stem, a block repeated ``depth`` times, and final layers."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..errors import SpecError
from ..layers.base import Layer
from ..layers.composite import Serial
from . import expressions


@dataclass(frozen=True, eq=False)
class Network:
    """``final ∘ block_L ∘ … ∘ block_1 ∘ stem``: a stem, a block repeated ``depth`` times, a head.

    Expressions in any layer may use ``L`` (= ``depth``), ``l`` (the block index, 1…L; 0 in the
    stem, L+1 in ``final``) and the names in ``params``.
    """

    block: Serial
    depth: int
    stem: Serial = field(default_factory=Serial)
    final: Serial = field(default_factory=Serial)
    params: Mapping = field(default_factory=dict)
    name: str = ""

    def __post_init__(self):
        for part in ("block", "stem", "final"):
            v = getattr(self, part)
            if isinstance(v, Layer) and not isinstance(v, Serial):
                object.__setattr__(self, part, Serial(v))
            elif isinstance(v, (list, tuple)):
                object.__setattr__(self, part, Serial(*v))
            elif not isinstance(v, Serial):
                raise SpecError(part, v, "must be a layer or a list of layers")
        if isinstance(self.depth, bool) or not isinstance(self.depth, (int, np.integer)) or self.depth < 0:
            raise SpecError("depth", self.depth, "must be a whole number >= 0")
        params = dict(self.params)
        for k, v in params.items():
            if not k.isidentifier() or k in ("L", "l") or k in expressions.FUNCTIONS or k in expressions.CONSTANTS:
                raise SpecError(f"params.{k}", v,
                                "name must be an identifier other than L, l, pi, e and function names")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SpecError(f"params.{k}", v, "must be a finite number")
        object.__setattr__(self, "params", params)
        for part in ("stem", "block", "final"):
            for where, e in getattr(self, part).expressions():
                unknown = e.names - {"L", "l"} - set(expressions.CONSTANTS) - set(params)
                if unknown:
                    raise SpecError(f"{part}.{where}", e.text,
                                    f"uses unknown name(s) {sorted(unknown)}; allowed are L, l, pi, e "
                                    f"and the params {sorted(params) or '(none defined)'}")

    def env(self, l: int) -> dict:
        return {**self.params, "L": float(self.depth), "l": float(l)}

    def with_depth(self, depth: int) -> Network:
        return dataclasses.replace(self, depth=depth)

    def with_params(self, **params) -> Network:
        return dataclasses.replace(self, params={**self.params, **params})

    def layers(self):
        """Yield ``(section, l, resolved_layer)`` in order: stem (l=0), blocks 1…L, final (l=L+1)."""
        from .walk import units
        for unit in units(self):
            yield unit.section, unit.block, unit.layer
