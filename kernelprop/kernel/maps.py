"""The numeric engine's per-run context and the entry point to one layer's kernel map.

Each layer's infinite-width map lives with the layer (:meth:`kernelprop.layers.Layer.kernel_map`):
it maps the state before a resolved layer to the state after it and returns the layer's backward
rule as a closure. Inside a residual or parallel branch the state also carries the branch's linear
dependence on the branch input (:class:`~kernelprop.kernel.state.Dependence`), so the cross kernel
``Σ_xf`` of the residual sum is exact (docs/theory.md §1).
"""

from __future__ import annotations

from .state import KernelState


class Context:
    """Per-run settings and caches shared by the maps: quadrature nodes, a cache of fixed attention
    matrices, where the run is (``where`` for messages, ``path`` for parameter-gradient names) and the
    seeds of random attention scores."""

    def __init__(self, quad_nodes: int | None = None):
        self.quad_nodes = quad_nodes
        self.cache: dict = {}
        self.where = "?"
        self.path = ""
        self.unit_key: tuple = (0,)
        self.counter = 0

    def unit(self, index: int) -> None:
        """Start a unit (block or stem/final layer): random attention scores are seeded per unit
        index and per attention layer within it, so every pass over a unit draws the same."""
        self.unit_key = (int(index),)
        self.counter = 0

    def next_seed(self) -> tuple:
        self.counter += 1
        return (*self.unit_key, self.counter)


def apply(layer, state: KernelState, ctx: Context) -> KernelState:
    """The state after ``layer`` (its kernel map, without keeping the backward rule)."""
    return layer.kernel_map(state, ctx)[0]
