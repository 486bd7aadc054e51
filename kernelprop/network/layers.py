"""The layer descriptions, re-exported: each layer type lives in :mod:`kernelprop.layers` with its
rules, and the whole network in :mod:`kernelprop.network.network`."""

from ..layers import (
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
                      choice,
                      num,
                      walk,
)
from .network import Network

__all__ = ["Activation", "Attention", "Dense", "Dropout", "GatedMLP", "Layer", "LayerNorm", "Network", "Parallel",
           "RMSNorm", "Residual", "Scale", "Serial", "choice", "num", "walk"]
