"""The whole network: a stem, a block repeated ``depth`` times, and final layers."""

from __future__ import annotations

import dataclasses
import math
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..errors import SpecError
from ..layers.base import Layer
from ..layers.composite import Serial
from . import expressions

MAX_DEPTH = 100_000      # blocks; see Network.__post_init__


_SHAPE_FIELDS = ("width_factor", "key_width")   # numeric fields that set a weight matrix's shape
_copying = threading.local()   # set while with_depth/with_params copy a network (its unused params were reported)


class UnusedParamsWarning(UserWarning):
    """A ``params`` entry that no expression of the network uses (a typo, or a leftover)."""


def expression_names(*parts: Layer) -> set[str]:
    """The param names the expressions of ``parts`` (and their sub-layers) use (not L, l, pi, e)."""
    return {n for part in parts for _, e in part.expressions() for n in e.names} \
        - {"L", "l"} - set(expressions.CONSTANTS)


@dataclass(frozen=True, eq=False)
class Network:
    """``final ∘ block_L ∘ … ∘ block_1 ∘ stem``: a stem, a block repeated ``depth`` times, a head.

    Expressions in any layer may use ``L`` (= ``depth``), ``l`` (the block index, 1…L; 0 in the
    stem, L+1 in ``final``) and the names in ``params``. ``shared_weights``: every block reuses the
    first block's weights and biases (torch's ``nn.TransformerEncoder`` clones, ALBERT, Universal
    Transformers); the stem and final layers keep their own (docs/theory.md §13).
    """

    block: Serial
    depth: int
    stem: Serial = field(default_factory=Serial)
    final: Serial = field(default_factory=Serial)
    params: Mapping = field(default_factory=dict)
    name: str = ""
    shared_weights: bool = False

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
        if self.depth > MAX_DEPTH:      # the walk, the records and the backward tape grow with the depth
            raise SpecError("depth", self.depth, f"must be at most {MAX_DEPTH} blocks (a run keeps a record and the "
                            "backward pass a unit per block: 20 000 blocks take about 0.2 GB)")
        params = dict(self.params)
        for k, v in params.items():
            if not k.isidentifier() or k in ("L", "l") or k in expressions.FUNCTIONS or k in expressions.CONSTANTS:
                raise SpecError(f"params.{k}", v,
                                "name must be an identifier other than L, l, pi, e and function names")
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(v):
                raise SpecError(f"params.{k}", v, "must be a finite number (not a boolean or a string)")
        object.__setattr__(self, "params", params)
        for part in ("stem", "block", "final"):
            for where, e in getattr(self, part).expressions():
                unknown = e.names - {"L", "l"} - set(expressions.CONSTANTS) - set(params)
                if unknown:
                    raise SpecError(f"{part}.{where}", e.text,
                                    f"uses unknown name(s) {sorted(unknown)}; allowed are L, l, pi, e "
                                    f"and the params {sorted(params) or '(none defined)'}")

        if not isinstance(self.name, str):
            raise SpecError("name", self.name, "must be a string")
        unused = self.unused_params()
        if unused and not getattr(_copying, "active", False):
            warnings.warn(UnusedParamsWarning(
                f"params {unused}{f' of network {self.name!r}' if self.name else ''} "
                f"{'is' if len(unused) == 1 else 'are'} used by no expression of its layers: setting "
                f"{'it' if len(unused) == 1 else 'them'} changes nothing (a misspelt name?)"), stacklevel=3)
        if not isinstance(self.shared_weights, (bool, np.bool_)):
            raise SpecError("shared_weights", self.shared_weights, "must be true or false")
        object.__setattr__(self, "shared_weights", bool(self.shared_weights))
        if self.shared_weights:
            self._check_shared_shapes()

    def _check_shared_shapes(self) -> None:
        """Shared weights need the same shapes in every block: no width may vary with ``l``."""
        for where, e in self.block.expressions():
            if where.rsplit(".", 1)[-1] not in _SHAPE_FIELDS or "l" not in e.names:
                continue
            values = {e(self.env(l)) for l in range(1, self.depth + 1)}
            if len(values) > 1:
                raise SpecError(f"block.{where}", e.text,
                                "varies with the block index l, but shared_weights = true reuses the first block's "
                                "weights, which need the same shape in every block: give a width that does not "
                                "depend on l")

    def env(self, l: int) -> dict:
        return {**self.params, "L": float(self.depth), "l": float(l)}

    def with_depth(self, depth: int) -> Network:
        return self._replace(depth=depth)

    def with_params(self, **params) -> Network:
        """A copy with ``params`` replaced; a name that is neither a param nor used by an expression is a
        :class:`SpecError` (it would change nothing)."""
        known = set(self.params) | expression_names(self.stem, self.block, self.final)
        for k, v in params.items():
            if k not in known:
                raise SpecError(f"params.{k}", v, f"is not a param of the network; known params: "
                                f"{sorted(known) or '(none)'}")
        return self._replace(params={**self.params, **params})

    def _replace(self, **changes) -> Network:
        """A copy with ``changes``; unused params were already reported when this network was made."""
        _copying.active = True
        try:
            return dataclasses.replace(self, **changes)
        finally:
            _copying.active = False

    def unused_params(self) -> list[str]:
        """The names in ``params`` that no expression of the layers uses, sorted."""
        return sorted(set(self.params) - expression_names(self.stem, self.block, self.final))

    def layers(self):
        """Yield ``(section, l, resolved_layer)`` in order: stem (l=0), blocks 1…L, final (l=L+1)."""
        from .walk import units
        for unit in units(self):
            yield unit.section, unit.block, unit.layer
