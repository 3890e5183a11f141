"""Helpers shared by every op in ``fastmlr.kernels``: export detection, tensor checks and size parsing.

Every op module imports these from here; none defines its own. Export detection itself
(:func:`~fastmlr.checks.is_exporting`) lives in :mod:`fastmlr.checks`, below the kernels, because the
models' input checks need it too; it is re-exported here for the ops.
"""

from __future__ import annotations

import torch

from fastmlr.checks import is_exporting

__all__ = ["check_same_device_dtype", "check_tensor", "is_exporting", "size_pair", "traced_size"]


def traced_size(size: object) -> object:
    """``size`` with the traced sizes made ints: while :func:`is_exporting`, a 0-dim integer tensor
    (what ``tensor.shape`` entries are under ``torch.jit``'s tracer), alone or in a tuple/list, becomes
    a Python int, fixed in the traced graph (fastmlr's exports fix the image size; only the batch axis
    is dynamic). Anything else, and everything outside tracing, is returned unchanged, for the size
    checks to judge."""
    if not is_exporting():
        return size

    def as_int(value: object) -> object:
        traced = isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point()
        return int(value) if traced and value.dtype != torch.bool else value

    return type(size)(as_int(v) for v in size) if isinstance(size, (tuple, list)) else as_int(size)


def size_pair(size: object, op: str, name: str, minimum: int = 1) -> tuple[int, int]:
    """``(height, width)`` from an int (a square) or a pair of ints, each at least ``minimum``; traced
    sizes are read as ints (:func:`traced_size`). ``ValueError`` naming ``op`` and ``name`` otherwise."""
    size = traced_size(size)
    pair = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= minimum for s in pair):
        raise ValueError(f"{op}: {name} must be an int or (height, width) of ints >= {minimum}, got {size!r}")
    return pair  # type: ignore[return-value]


def check_tensor(op: str, name: str, tensor: object, shape: tuple[int | None, ...]) -> None:
    """Raise ``ValueError`` unless ``tensor`` is a floating tensor of ``shape`` (``None`` = any size)."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating tensor, got dtype {tensor.dtype}")
    expected = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    sizes_differ = any(s is not None and s != t for s, t in zip(shape, tensor.shape, strict=False))
    if tensor.dim() != len(shape) or sizes_differ:
        raise ValueError(f"{op}: {name} must have shape {expected}, got {list(tensor.shape)}")


def check_same_device_dtype(op: str, **tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` unless all ``tensors`` share one device and one dtype."""
    devices = {t.device for t in tensors.values()}
    dtypes = {t.dtype for t in tensors.values()}
    if len(devices) > 1 or len(dtypes) > 1:
        found = ", ".join(f"{n}: {t.dtype} on {t.device}" for n, t in tensors.items())
        raise ValueError(f"{op}: tensors must share one device and dtype, got {found}")
