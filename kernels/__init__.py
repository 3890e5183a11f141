"""fastmlr.kernels — the hot paths of multi-label recognition, each a Triton kernel beside its torch
reference, behind one dispatcher (``backend="auto" | "torch" | "triton"``, :func:`use_backend`)."""

from ._dispatch import BACKENDS, interpreter_enabled, resolve_backend, use_backend
from .category_attention import (
    softmax_attention_pool,
    softmax_attention_pool_reference,
    srdl_max_pool,
    srdl_max_pool_reference,
    tanh_attention_scores,
    tanh_attention_scores_reference,
)
from .crop_resize import crop_resize
from .interval_search import interval_search
from .lift_attention import lift_attention_pool, lift_attention_pool_reference
from .localize import localize_regions

__all__ = [
    "BACKENDS",
    "interpreter_enabled",
    "resolve_backend",
    "use_backend",
    "crop_resize",
    "interval_search",
    "localize_regions",
    "lift_attention_pool",
    "lift_attention_pool_reference",
    "softmax_attention_pool",
    "softmax_attention_pool_reference",
    "srdl_max_pool",
    "srdl_max_pool_reference",
    "tanh_attention_scores",
    "tanh_attention_scores_reference",
]
