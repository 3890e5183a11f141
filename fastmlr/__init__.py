"""fastmlr — fast, exported, measured multi-label image recognition."""

from fastmlr.registry import create_model, list_models, register_model

__version__ = "0.1.0"

__all__ = ["create_model", "list_models", "register_model", "__version__"]


def __getattr__(name: str):
    # ``from fastmlr import kernels`` / ``fastmlr.export`` without importing them eagerly.
    if name in ("kernels", "export"):
        import importlib

        return importlib.import_module(f"fastmlr.{name}")
    raise AttributeError(f"module 'fastmlr' has no attribute {name!r}")
