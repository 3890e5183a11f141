"""fastmlr.kernels — the hot paths of multi-label recognition, each a Triton kernel beside its torch
reference, behind one dispatcher (``backend="auto" | "torch" | "triton"``, :func:`use_backend`)."""

from ._dispatch import BACKENDS, interpreter_enabled, resolve_backend, triton_available, use_backend

__all__ = ["BACKENDS", "interpreter_enabled", "resolve_backend", "triton_available", "use_backend"]
