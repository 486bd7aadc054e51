"""Self-attention: the layer (:mod:`.layer`) and the attention matrices its rules share (:mod:`.matrices`)."""

from .layer import Attention, score_terms
from .matrices import Combination, Mixing, Uniform, alibi_slopes, head_mixings, logit_offsets, softmax

__all__ = ["Attention", "Combination", "Mixing", "Uniform", "alibi_slopes", "head_mixings", "logit_offsets",
           "score_terms", "softmax"]
