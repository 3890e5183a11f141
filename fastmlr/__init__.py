"""fastmlr — fast, exported, measured multi-label image recognition."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastmlr.registry import create_model, list_models, register_model

__version__ = "0.1.0"

__all__ = ["create_model", "list_models", "register_model", "__version__"]


def __getattr__(name: str):  # noqa: ANN202 - the named object
    # Imported on first use, so that ``import fastmlr`` does not import PyTorch: a server's ONNX Runtime
    # path (``fastmlr.serve``, ``fastmlr.export.precision``) runs without it.
    import importlib

    if name in ("create_model", "list_models", "register_model"):
        value = getattr(importlib.import_module("fastmlr.registry"), name)
        globals()[name] = value
        return value
    if name in ("kernels", "export"):
        return importlib.import_module(f"fastmlr.{name}")
    raise AttributeError(f"module 'fastmlr' has no attribute {name!r}")
