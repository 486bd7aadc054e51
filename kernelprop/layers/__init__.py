"""Layer types, one home each: a layer's description and all its rules (kernel map and backward
rule, finite-width forward and its transpose, symbolic map, Monte Carlo plan) live in one module.

==================  ==========================================================
:mod:`.dense`       ``Dense``
:mod:`.activation`  ``Activation`` (closed forms and quadrature in :mod:`kernelprop.kernel.activations`)
:mod:`.gated`       ``GatedMLP`` (SwiGLU, GeGLU, ReGLU)
:mod:`.norm`        ``LayerNorm``, ``RMSNorm``
:mod:`.dropout`     ``Dropout``
:mod:`.scale`       ``Scale``
:mod:`.attention`   ``Attention`` and the attention matrices
:mod:`.composite`   ``Serial``, ``Residual``, ``Parallel``
==================  ==========================================================

:func:`register_layer` adds a user-defined type (see docs/layers.md); :data:`LAYERS` maps each
``kind`` (the ``type`` of a spec table) to its class.
"""

# registration order is the order of the spec reference: keep it
from .base import LAYERS, RULES, Layer, choice, num, register_layer, unregister_layer  # noqa: I001
from .dense import Dense
from .activation import Activation
from .gated import GatedMLP
from .norm import LayerNorm, RMSNorm
from .dropout import Dropout
from .attention import Attention
from .scale import Scale
from .composite import Parallel, Residual, Serial, walk

__all__ = ["Activation", "Attention", "Dense", "Dropout", "GatedMLP", "LAYERS", "Layer", "LayerNorm", "Parallel",
           "RMSNorm", "RULES", "Residual", "Scale", "Serial", "choice", "num", "register_layer", "unregister_layer",
           "walk"]
