"""Signal-preserving attention (He et al. 2023): the schedules and matrices live with the attention
layer (:mod:`kernelprop.layers.attention.spa`); re-exported here with the other methods."""

from ..layers.attention.spa import DEFAULT_FINAL, attention_matrix, final_value, softmax_form, target_kernel  # noqa: F401
