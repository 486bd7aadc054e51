"""Monte Carlo cross-check: finite-width numpy networks built from the same layer descriptions.

:func:`simulate` draws ``seeds`` networks of width ``d`` (Gaussian or scaled orthogonal weights,
inputs with exactly the requested kernel), records the empirical kernel, means and every measure
at the engine's record points, and returns a :class:`Simulation` (means and standard errors) that
:func:`write` stores in the formats of ``kernelprop run``. :func:`check` compares it with
:func:`kernelprop.propagate` under a stated statistical criterion (:mod:`.compare`).
:func:`simulate_gradients` backpropagates by hand through the same networks (:mod:`.backward`), and
``check(..., gradients=True)`` compares it with :func:`kernelprop.kernel.backward.backpropagate`.
"""

from .backward import GradientSimulation, sample_output_gradient, simulate_gradients
from .compare import Comparison, Row, check, compare, compare_gradients, gradient_table, half_width
from .residual import composite_norm, dong_residual, residual_centre
from .sampler import Context, forward, plan, project, sample_inputs, weights
from .simulate import SAMPLE_MEASURES, Simulation, simulate, write

__all__ = [
    "Comparison", "Context", "GradientSimulation", "Row", "SAMPLE_MEASURES", "Simulation", "check", "compare",
    "compare_gradients", "composite_norm", "dong_residual", "forward", "gradient_table", "half_width", "plan",
    "project", "residual_centre", "sample_inputs", "sample_output_gradient", "simulate",
    "simulate_gradients", "weights", "write",
]
