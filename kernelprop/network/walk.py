"""One walk over a network, shared by every interpreter: its units and where records are taken.

A network is run unit by unit: each stem layer, each repeated block (resolved at its index l), each
final layer. Inside a unit the interpreters apply its *parts* (a block's top-level layers; a stem or
final unit is its own single part). A :class:`Record` is a point where a result is kept; it carries
structured fields, so callers select records without parsing labels::

    [r for r in traj.records if r.section == "block" and r.part is None]   # one per recorded block

The label strings (``"input"``, ``"stem"``, ``"block 3"``, ``"block 3 · 0:residual"``, ``"final"``)
stay as human-readable names in tables and files.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from ..errors import SpecError

if TYPE_CHECKING:
    from ..layers.base import Layer
    from .network import Network

RECORD_MODES = ("blocks", "sublayers")


@dataclass(frozen=True)
class Unit:
    """One step of the walk: a stem layer, a block at index ``block`` (1…L) or a final layer."""

    index: int
    section: str          # "stem" | "block" | "final"
    block: int            # l: 0 in the stem, 1…L for blocks, L+1 in the final layers
    layer: Layer        # resolved at ``block``
    last_of_section: bool
    position: int = 0     # index within the stem or the final layers

    @property
    def label(self) -> str:
        """``"block 3"``, or ``"stem · dense"`` for a stem/final layer (error messages, gradient paths)."""
        return f"block {self.block}" if self.section == "block" else f"{self.section} · {self.layer.kind}"

    @cached_property
    def parts(self) -> tuple:
        """The layers applied one by one: a block's top-level layers, or the unit's own layer."""
        return tuple(self.layer.children()) if self.section == "block" else (self.layer,)

    def part_label(self, i: int) -> str:
        """Where part ``i`` runs, for messages: ``"block 3 · 0:residual"`` or ``"stem · dense"``."""
        part = self.parts[i]
        return f"block {self.block} · {i}:{part.kind}" if self.section == "block" else self.label

    def part_path(self, i: int) -> str:
        """Root of the layer paths of part ``i``: ``"block 3/0:residual"`` or ``"stem · dense"``."""
        part = self.parts[i]
        return f"block {self.block}/{i}:{part.kind}" if self.section == "block" else self.label


@dataclass(frozen=True)
class Record:
    """A recorded point: ``section`` (input, stem, block, final), block index ``block``, ``part`` (the
    position of the top-level layer just applied, for sub-layer records; None at a unit's or
    section's end), the layer ``path`` and its ``kind`` (the layer kind, or the section name)."""

    label: str
    section: str
    block: int
    part: int | None = None
    path: str = ""
    kind: str = ""

    @property
    def is_block(self) -> bool:
        """A whole-block record (or the input): the points of a depth plot."""
        return self.section == "input" or (self.section == "block" and self.part is None)


INPUT = Record("input", "input", 0, None, "input", "input")


def units(network: Network, kernel_only: bool = False) -> Iterator[Unit]:
    """The network's units in order, each layer resolved at its block index.

    A block whose expressions do not use ``l`` resolves to the same layer at every index: it is resolved
    (and checked) once, at l = 1, and that one resolved layer serves every block. ``kernel_only`` (the
    kernel engine): only the fields the wide-limit maps read decide that."""
    stem, final = network.stem.layers, network.final.layers
    idx = 0
    for i, layer in enumerate(stem):
        yield Unit(idx, "stem", 0, layer.resolve(network.env(0)), i + 1 == len(stem), i)
        idx += 1
    same = _independent_of_l(network.block, kernel_only)
    block = None
    for l in range(1, network.depth + 1):
        if block is None or not same:
            block = network.block.resolve(network.env(l))
        yield Unit(idx, "block", l, block, l == network.depth)
        idx += 1
    for i, layer in enumerate(final):
        env = network.env(network.depth + 1)
        yield Unit(idx, "final", network.depth + 1, layer.resolve(env), i + 1 == len(final), i)
        idx += 1


def _independent_of_l(block: Layer, kernel_only: bool) -> bool:
    """True when no expression of ``block`` uses ``l`` and every layer in it resolves by the stock rule
    (a layer class with its own ``resolve`` may read the block index in ways expressions do not show).
    ``kernel_only``: only the fields the wide-limit maps read count (:meth:`Layer.kernel_fields`; e.g. the
    default ``spa_step = "l"`` of an attention without SPA does not)."""
    import dataclasses

    from ..layers.base import Layer as Base
    from ..layers.composite import Parallel, Residual, Serial, walk
    from .expressions import Expr
    stock = {Base.resolve, Serial.resolve, Residual.resolve, Parallel.resolve}
    for _, layer in walk(block):
        if type(layer).resolve not in stock:
            return False
        if isinstance(layer, Serial):
            continue
        if isinstance(layer, (Residual, Parallel)):
            own = [layer.alpha, getattr(layer, "beta", None), *getattr(layer, "betas", ())]
        else:
            used = set(layer.kernel_fields()) if kernel_only else None
            own = [getattr(layer, f.name) for f in dataclasses.fields(layer)  # type: ignore[arg-type]
                   if used is None or f.name in used]
        if any(isinstance(v, Expr) and "l" in v.names for v in own):
            return False
    return True


class RecordPlan:
    """Where a run keeps records: the input, then ``after(unit, i)`` for part ``i`` of each unit.

    ``"blocks"``: every ``every``-th block (and the last), and the end of the stem and of the final
    layers. ``"sublayers"``: also after each top-level layer of a recorded block but the last, and
    after each stem and final layer but the last of its section.
    """

    def __init__(self, network: Network, record: str = "blocks", every: int = 1):
        if record not in RECORD_MODES:
            raise SpecError("record", record, "must be \"blocks\" or \"sublayers\"")
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
            raise SpecError("every", every, "must be a whole number >= 1")
        self.depth = network.depth
        self.record, self.every = record, int(every)

    def recorded(self, unit: Unit) -> bool:
        return unit.section != "block" or unit.block % self.every == 0 or unit.block == self.depth

    def after(self, unit: Unit, i: int) -> Record | None:
        """The record taken after part ``i`` of ``unit``, or None."""
        last = i + 1 == len(unit.parts)
        if unit.section == "block":
            if not self.recorded(unit):
                return None
            if last:
                return Record(unit.label, "block", unit.block, None, unit.label, "block")
            if self.record == "sublayers":
                return Record(unit.part_label(i), "block", unit.block, i, unit.part_path(i), unit.parts[i].kind)
            return None
        if unit.last_of_section:
            return Record(unit.section, unit.section, unit.block, None, unit.label, unit.section)
        if self.record == "sublayers":
            return Record(f"{unit.section} · {unit.position}:{unit.layer.kind}", unit.section, unit.block,
                          unit.position, unit.label, unit.layer.kind)
        return None

    def after_unit(self, unit: Unit) -> Record | None:
        """The record at the output of a whole unit (the backward pass records only there)."""
        if unit.section == "block":
            return Record(unit.label, "block", unit.block, None, unit.label, "block") if self.recorded(unit) else None
        return Record(unit.section, unit.section, unit.block, None, unit.label, unit.section) \
            if unit.last_of_section else None

    def all(self, network: Network) -> list:
        """Every record of a forward run, in order, without running anything."""
        out = [INPUT]
        for unit in units(network):
            for i in range(len(unit.parts)):
                r = self.after(unit, i)
                if r is not None:
                    out.append(r)
        return out
