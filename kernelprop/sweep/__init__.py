"""Sweeps: a measure of the output kernel over a grid of one or two parameters.

An axis is a param of the network's ``params`` table (``beta``, ``a``, ``eps``, …) or the depth
(``L`` or ``depth``). Each grid point is the network at those values; its value is a scalar measure
(:data:`kernelprop.measures.SCALAR_MEASURES`) of the kernel after block ``L`` (``at="block"``) or of
the network's output after its ``final`` layers (``at="output"``).

**What is shared and what is rerun.** Each distinct network is one *run*; the sweep saves work
where runs are provably identical:

* *Depth axis, shared*: when no expression of the stem or blocks uses ``L`` (and, for a builder,
  the network it builds does not change with depth), block ``l`` of a depth-``d`` network is block
  ``l`` of the deepest one, so a single run at the largest depth, recorded every ``gcd(depths)``
  blocks, gives every depth. Fields the engine ignores are not counted (Monte Carlo-only fields,
  SPA schedule fields of attention without SPA). Sampled attention scores (``scores="standard"``)
  are seeded by block index alone, so the shared run draws what each shorter run would.
* *Depth axis, rerun*: expressions in ``L`` (``beta = "1/sqrt(L)"``, SPA schedules) or builders that
  build depth into the network (TAT slopes, LayerScale's default eps) change every block with the
  depth, so each depth is its own run. So does ``at="output"`` with ``final`` layers (the head acts
  on each depth's kernel; applying it to stored kernels is not done).
* *Params*: each value of a param that some expression uses is its own run; values of a param no
  expression uses give the same network and are computed once (networks are compared by their
  description).
* Each run records only the blocks it reads (``every``), keeps no kernels and skips eigenvalues
  unless a spectral measure is asked for.

**Batched runs.** Runs whose networks differ only in their params' values and their depth are
computed together, as one propagation of a batch of kernels (:mod:`kernelprop.sweep.batch`,
docs/theory.md §15): each member stops at its own depth, so the work is the sum of the depths, and the
results equal the single runs' to rounding. Layers that cannot batch (sampled standard scores, shared
weights, ``"unit"`` variances, layer types without a batched map) run one network at a time;
``sweep(..., batch=False)`` always does.

A grid point whose run fails numerically (variance explodes or vanishes) is ``NaN`` and listed in
``failures``; in a shared depth run, the depths before the failing block are still read (from a
second run stopping there). The sweep raises only when every point fails.
"""

from __future__ import annotations

from .compute import AT, depth_dependence, network_expressions, param_uses, parse_param, sweep
from .files import DEPTH_NAMES, RESULT_FORMATS, Axis, SweepResult, check_format, load
from .report import summary_table

__all__ = [
    "AT", "Axis", "DEPTH_NAMES", "RESULT_FORMATS", "SweepResult", "check_format", "depth_dependence", "load",
    "network_expressions", "param_uses", "parse_param", "summary_table", "sweep",
]
