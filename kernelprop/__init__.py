"""kernelprop: infinite-width signal propagation through deep transformers at initialisation.

Describe a network once (:mod:`kernelprop.network`), choose an input kernel
(:mod:`kernelprop.inputs`), and propagate its token kernel through depth with
:func:`propagate`; measures of rank collapse are in :mod:`kernelprop.measures`.

The package's names are imported on first use (module ``__getattr__``): ``import kernelprop`` loads
only the error classes, so a command line or a script that needs one part does not pay for the Monte
Carlo, scipy.stats or the symbolic engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import KernelpropError, NotSupportedError, NumericalError, SpecError

__version__ = "0.1.0"

# public name -> (module, attribute or None for the module itself)
_LAZY = {
    "inputs": ("kernelprop.inputs", None),
    "montecarlo": ("kernelprop.montecarlo", None),
    "GradientTrajectory": ("kernelprop.kernel.backward", "GradientTrajectory"),
    "backpropagate": ("kernelprop.kernel.backward", "backpropagate"),
    "Trajectory": ("kernelprop.kernel.propagate", "Trajectory"),
    "propagate": ("kernelprop.kernel.propagate", "propagate"),
    "Network": ("kernelprop.network.network", "Network"),
    "Spec": ("kernelprop.network.spec", "Spec"),
    "load": ("kernelprop.network.spec", "load"),
    "loads": ("kernelprop.network.spec", "loads"),
    **{name: ("kernelprop.layers", name) for name in (
        "LAYERS", "Activation", "Attention", "Dense", "Dropout", "GatedMLP", "Layer", "LayerNorm", "Parallel",
        "Residual", "RMSNorm", "Scale", "Serial", "register_layer", "unregister_layer")},
}

__all__ = [
    "Activation", "Attention", "Dense", "Dropout", "GatedMLP", "GradientTrajectory", "KernelpropError", "LAYERS",
    "Layer", "LayerNorm", "Network", "NotSupportedError", "NumericalError", "Parallel", "RMSNorm", "Residual", "Scale",
    "Serial", "Spec", "SpecError", "Trajectory", "backpropagate", "inputs", "load", "loads", "montecarlo",
    "propagate", "register_layer", "unregister_layer", "__version__",
]


def __getattr__(name: str):
    """Import a public name on first access and keep it in the module's namespace."""
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'kernelprop' has no attribute {name!r}") from None
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:     # the names as the type checker and IDEs see them
    from . import inputs, montecarlo
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
