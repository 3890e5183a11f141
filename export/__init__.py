"""fastmlr.export — ONNX and TensorRT export with validation against the PyTorch reference.

- :func:`to_onnx`: every registered model to one ONNX graph (MCAR with its global-to-local step),
  validated in ONNX Runtime on real and random images before it is written; ``precision="fp16" |
  "bf16" | "int8"`` converts it (:mod:`fastmlr.export.precision`: calibrated INT8 Q/DQ, fp16/bf16
  casts, MCAR's decision path kept float32) and validates it again at the precision's tolerance;
- :func:`check_tensorrt_ops`: is every op one TensorRT's ONNX parser supports (``tensorrt_onnx_ops.json``);
- :func:`build_engine`, :func:`export_engine`, :class:`TRTRunner`, :func:`engine_cache_key`: strongly
  typed TensorRT engines, their precision the graph's (needs ``tensorrt`` >= 10.12 and a GPU; imported
  lazily);
- :func:`compile_torch_tensorrt`: torch-tensorrt with fastmlr's Triton kernels kept as plugins;
- :func:`write_triton_repository`: an NVIDIA Triton Inference Server model repository.
"""

import importlib
from typing import TYPE_CHECKING

#: Each public name → the submodule that defines it. They are imported on first use, so that a process
#: that needs one light submodule (a server's ONNX Runtime session: :mod:`.precision`) does not import
#: PyTorch through the others.
_SOURCES = {
    "output_names": "onnx_export", "to_onnx": "onnx_export", "validate_onnx": "onnx_export",
    "TRTRunner": "tensorrt", "build_engine": "tensorrt", "engine_cache_key": "tensorrt",
    "export_engine": "tensorrt", "validate_engine": "tensorrt",
    "TensorRTCompatibilityError": "tensorrt_ops", "check_tensorrt_ops": "tensorrt_ops",
    "compile_torch_tensorrt": "torch_trt",
    "write_triton_repository": "triton_server",
    "TOLERANCES": "validation", "ExportValidationError": "validation",
}

if TYPE_CHECKING:
    from .onnx_export import output_names, to_onnx, validate_onnx
    from .tensorrt import TRTRunner, build_engine, engine_cache_key, export_engine, validate_engine
    from .tensorrt_ops import TensorRTCompatibilityError, check_tensorrt_ops
    from .torch_trt import compile_torch_tensorrt
    from .triton_server import write_triton_repository
    from .validation import TOLERANCES, ExportValidationError


def __getattr__(name: str):  # noqa: ANN202 - the named object
    if name in _SOURCES:
        value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SOURCES})


__all__ = [
    "TOLERANCES",
    "ExportValidationError",
    "TRTRunner",
    "TensorRTCompatibilityError",
    "build_engine",
    "check_tensorrt_ops",
    "compile_torch_tensorrt",
    "engine_cache_key",
    "export_engine",
    "output_names",
    "to_onnx",
    "validate_engine",
    "validate_onnx",
    "write_triton_repository",
]
