"""Pure Flax linen modules of DETR (NHWC).  Imports nothing of data, training or evaluation."""
from detr_jax.models.detr import (DETR, MLP, ExtraQueries, MaskFeatures, abstract_variables, build_model,
                                  count_params, init_variables)

__all__ = ["DETR", "MLP", "ExtraQueries", "MaskFeatures", "abstract_variables", "build_model", "count_params", "init_variables"]
