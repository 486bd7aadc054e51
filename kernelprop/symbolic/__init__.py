"""Symbolic engine: the kernel maps of :mod:`kernelprop.kernel` in sympy (docs/theory.md §1-4, §8).

One network description, read by a third interpreter: :func:`block_map` composes the layer maps
of :mod:`kernelprop.symbolic.maps` into the block map ``(q, ρ[, μ]) ↦ (q', ρ', μ')`` of the
equicorrelated family, or into explicit N×N kernels for small N; :func:`derive` adds the closed-form
trajectory, the C-map, its slope χ = C'(1), the angle exponent and the fixed points;
:func:`render_text`, :func:`render_latex` and :func:`render_code` print them; :func:`evaluate`
iterates the lambdified maps so they can be checked against :func:`kernelprop.propagate`.
"""

from .activations import CLOSED_FORMS, J1
from .blockmap import BlockMap, SectionMap, Step, SymbolicTrajectory, block_map, evaluate, lambdify, tidy
from .derive import ClosedForm, CMap, Derivation, FixedPoint, c_map, closed_form, derive, fixed_points
from .render import render_code, render_latex, render_text
from .symbols import Namespace

__all__ = [
    "BlockMap", "CLOSED_FORMS", "CMap", "ClosedForm", "Derivation", "FixedPoint", "J1", "Namespace",
    "SectionMap", "Step", "SymbolicTrajectory", "block_map", "c_map", "closed_form", "derive", "evaluate",
    "fixed_points", "lambdify", "render_code", "render_latex", "render_text", "tidy",
]
