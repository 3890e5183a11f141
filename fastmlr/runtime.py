"""ONNX Runtime sessions: the one place that chooses execution providers, threads and graph
optimisation, used by the benchmarks, evaluation, export validation and serving."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnxruntime

#: ``device`` → execution providers, in ONNX Runtime's order of preference.
PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
}

#: ``optimization`` → the name of ONNX Runtime's ``GraphOptimizationLevel`` member.
OPTIMIZATION_LEVELS = {
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

ONNXRUNTIME_MISSING = 'ONNX Runtime is not installed: pip install -e ".[onnx]"'

#: Whether the sessions :func:`ort_session` opens let idle intra-op threads spin (:func:`intra_op_spinning`).
_INTRA_OP_SPINNING: ContextVar[bool] = ContextVar("intra_op_spinning", default=True)


@contextlib.contextmanager
def intra_op_spinning(enabled: bool) -> Iterator[None]:
    """Within the block, :func:`ort_session` opens sessions whose intra-op threads spin (busy-wait for the
    next parallel section before they sleep: ONNX Runtime's default) or, with ``enabled=False``, sleep as
    soon as they run out of work (``session.intra_op.allow_spinning = 0``).

    Spinning saves a thread wake-up per operator when the session has the cores to itself. A process
    that shares its cores with busy threads of other work (a server's own front end and clients, other
    jobs) runs faster without it: a thread that spins at an operator's barrier holds a core that the
    thread it waits for, or the next request, needs. A context rather than an argument, so that it
    reaches :func:`ort_session` through the wrappers that open sessions (``precision_session``).
    """
    token = _INTRA_OP_SPINNING.set(bool(enabled))
    try:
        yield
    finally:
        _INTRA_OP_SPINNING.reset(token)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:
        raise RuntimeError(ONNXRUNTIME_MISSING) from err
    return onnxruntime


def ort_cuda_available() -> bool:
    """True when the installed ONNX Runtime has the CUDA execution provider (``onnxruntime-gpu``)."""
    return "CUDAExecutionProvider" in _onnxruntime().get_available_providers()


def ort_session(
    model: str | os.PathLike | bytes,
    *,
    device: str = "cpu",
    threads: int | None = None,
    optimization: str = "all",
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session on ``model`` (an ``.onnx`` path or the serialised graph's bytes).

    ``device="cpu"`` runs on the CPU execution provider only; ``"cuda"`` on the CUDA execution provider
    with the CPU provider for the nodes CUDA does not implement, and raises ``RuntimeError`` when the
    installed ONNX Runtime has no CUDA provider (rather than silently running on the CPU). ``threads``
    sets the intra-op thread count (``None``: ONNX Runtime's default, one per physical core).
    ``optimization`` is the graph optimisation level: ``"disabled"``, ``"basic"``, ``"extended"`` or
    ``"all"``. Its intra-op threads spin unless opened inside :func:`intra_op_spinning` ``(False)``. Bad
    arguments raise ``ValueError``; a missing file ``FileNotFoundError``.
    """
    if device not in PROVIDERS:
        raise ValueError(f"unknown device {device!r}; choose one of {sorted(PROVIDERS)}")
    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"unknown optimization {optimization!r}; choose one of {list(OPTIMIZATION_LEVELS)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    if isinstance(model, (bytes, bytearray)):
        source: str | bytes = bytes(model)
    elif isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"ONNX model not found: {source}")
    else:
        raise ValueError(f"model must be a path or the graph's bytes, got {type(model).__name__}")
    ort = _onnxruntime()
    if device == "cuda" and not ort_cuda_available():
        raise RuntimeError(
            "device='cuda' needs ONNX Runtime's CUDA execution provider (pip install onnxruntime-gpu); "
            f"this installation has {ort.get_available_providers()}"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[optimization])
    if threads is not None:
        options.intra_op_num_threads = threads
    if not _INTRA_OP_SPINNING.get():
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(source, options, providers=list(PROVIDERS[device]))
