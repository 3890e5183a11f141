"""ONNX Runtime sessions: the one place that chooses execution providers, threads and graph
optimisation, used by the benchmarks, evaluation, export validation and serving."""

from __future__ import annotations

import os
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
    idle_spinning: bool = True,
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session on ``model`` (an ``.onnx`` path or the serialised graph's bytes).

    ``device="cpu"`` runs on the CPU execution provider only; ``"cuda"`` on the CUDA execution provider
    with the CPU provider for the nodes CUDA does not implement, and raises ``RuntimeError`` when the
    installed ONNX Runtime has no CUDA provider (rather than silently running on the CPU). ``threads``
    sets the intra-op thread count (``None``: ONNX Runtime's default, one per physical core).
    ``optimization`` is the graph optimisation level: ``"disabled"``, ``"basic"``, ``"extended"`` or
    ``"all"``. ``idle_spinning=False`` makes the intra-op threads stop spinning as soon as ``run``
    returns (they still spin within a run): ONNX Runtime's default keeps them spinning for a while
    after it, which is fastest when runs come back to back, but takes the CPUs from whatever else must
    run between them, such as a server's request handling on the same cores. Bad arguments raise
    ``ValueError``; a missing file ``FileNotFoundError``.
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
    if not idle_spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(source, options, providers=list(PROVIDERS[device]))
