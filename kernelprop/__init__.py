"""kernelprop: infinite-width signal propagation through deep transformers at initialisation.

Describe a network once (:mod:`kernelprop.network`), choose an input kernel
(:mod:`kernelprop.inputs`), and propagate its token kernel through depth with
:func:`propagate`; measures of rank collapse are in :mod:`kernelprop.measures`.
"""

__version__ = "0.1.0"

from . import inputs, montecarlo
from .errors import KernelpropError, NotSupportedError, NumericalError, SpecError
from .kernel.backward import GradientTrajectory, backpropagate
from .kernel.propagate import Trajectory, propagate
from .layers import (
                     LAYERS,
                     Activation,
                     Attention,
                     Dense,
                     Dropout,
                     GatedMLP,
                     Layer,
                     LayerNorm,
                     Parallel,
                     Residual,
                     RMSNorm,
                     Scale,
                     Serial,
                     register_layer,
                     unregister_layer,
)
from .network.network import Network
from .network.spec import Spec, load, loads

__all__ = [
    "Activation", "Attention", "Dense", "Dropout", "GatedMLP", "GradientTrajectory", "KernelpropError", "LAYERS",
    "Layer", "LayerNorm", "Network", "NotSupportedError", "NumericalError", "Parallel", "RMSNorm", "Residual", "Scale",
    "Serial", "Spec", "SpecError", "Trajectory", "backpropagate", "inputs", "load", "loads", "montecarlo",
    "propagate", "register_layer", "unregister_layer", "__version__",
]
