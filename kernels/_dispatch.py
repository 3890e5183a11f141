"""Backend selection shared by every dispatching op in ``fastmlr.kernels``.

Each op takes ``backend="auto" | "torch" | "triton"``, with one meaning for every op:

- ``"torch"`` runs the op's PyTorch path: plain torch ops on any device, differentiable, and what the
  exporters trace. It computes the op's exact semantics — for the G-to-L ops it is their
  ``*_reference`` function; the attention ops compute their ``*_reference`` formula without its
  ``[B, C, HW, D]`` broadcast (in (batch, class) chunks of bounded memory where one would be needed),
  equal to it up to floating-point summation order.
- ``"triton"`` runs the op's Triton kernel. Triton needs CUDA tensors, or CPU tensors with
  ``TRITON_INTERPRET=1`` set before :mod:`fastmlr.kernels` is imported (how CI tests the kernels).
  When it cannot run, the op falls back to ``"torch"`` and says so once per op through :mod:`logging`.
- ``"auto"`` runs the Triton kernel when every tensor is on CUDA; otherwise the op's fastest CPU
  path, which is the ``"torch"`` path for every op but :func:`~fastmlr.kernels.crop_resize` (one torch
  bilinear call per region, bit-identical to the released code). ``fastmlr.export`` traces every op
  under ``use_backend("torch")``; the attention ops also take their ``"torch"`` path by themselves
  while any tracer runs (:func:`~fastmlr.kernels._utils.is_exporting`).

Every op's ``<op>_reference`` function is its test oracle: the formula as written, not dispatched.
Each op's docstring lists its paths.

``use_backend(name)`` forces one backend for every dispatching op inside the ``with`` block, whatever
the ``backend=`` argument says (benchmarks and parity tests use it).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "torch", "triton")
logger = logging.getLogger("fastmlr.kernels")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastmlr_backend", default=None)
_warned: set[str] = set()


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` (``"torch"`` or ``"triton"``) for every dispatching op inside the block."""
    if name not in ("torch", "triton"):
        raise ValueError(f"use_backend takes 'torch' or 'triton', got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> str | None:
    """The backend :func:`use_backend` forces here, or ``None`` outside such a block."""
    return _forced.get()


def _triton_can_run(tensors: tuple[torch.Tensor, ...]) -> str | None:
    """``None`` when Triton can run on ``tensors``, else the reason it cannot."""
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"}:
        return None
    if devices == {"cpu"} and interpreter_enabled():
        return None
    return f"tensors are on {sorted(devices)} and TRITON_INTERPRET is not set (Triton needs CUDA tensors)"


def resolve_backend(op: str, backend: str, *tensors: torch.Tensor) -> str:
    """The backend ``op`` runs with: ``"torch"`` or ``"triton"`` (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    backend = forced_backend() or backend
    if backend == "torch":
        return "torch"
    reason = _triton_can_run(tensors)
    if backend == "auto":
        return "triton" if reason is None and all(t.is_cuda for t in tensors) else "torch"
    if reason is not None:
        if op not in _warned:
            _warned.add(op)
            logger.warning("%s: Triton backend requested but %s; falling back to torch", op, reason)
        return "torch"
    return "triton"
