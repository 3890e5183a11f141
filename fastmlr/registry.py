"""Model registry in the style of timm: ``register_model``, ``create_model``, ``list_models``."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[type], type]:
    """Class decorator registering a model under ``name``."""

    def wrap(cls: type) -> type:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = cls
        cls.model_name = name
        return cls

    return wrap


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    _import_models()
    return sorted(_MODELS)


def _import_models() -> None:
    from fastmlr import models  # noqa: F401  (registers every architecture)


def _is_plain(value: Any) -> bool:
    """Options kept in ``model.config`` (and so in checkpoints): plain values and paths. Tensors and
    arrays (label embeddings, adjacency) are left out — models keep them as buffers in the state dict."""
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool, os.PathLike))


def create_model(
    name: str,
    *,
    backbone: str = "resnet101",
    num_classes: int = 80,
    image_size: int = 448,
    checkpoint: str | os.PathLike | None = None,
    **cfg: Any,
) -> nn.Module:
    """Build a registered model with random weights, optionally loading ``checkpoint``.

    ``cfg`` holds the architecture's own options (e.g. MCAR's ``pooling``, ``topn``,
    ``threshold``) and ``backbone_weights=PATH``, a local torchvision weight file. ``checkpoint``
    is a fastmlr checkpoint or one of the formats the architecture knows (MCAR: the released code's
    ``{'state_dict': ...}``); see :func:`fastmlr.checkpoint.load_checkpoint`.
    """
    _import_models()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(_MODELS)}")
    model = _MODELS[name](backbone=backbone, num_classes=num_classes, image_size=image_size, **cfg)
    model.config = {
        "name": name, "backbone": backbone, "num_classes": num_classes, "image_size": image_size,
        **{k: os.fspath(v) if isinstance(v, os.PathLike) else v
           for k, v in cfg.items() if k != "backbone_weights" and _is_plain(v)},
    }
    if checkpoint is not None:
        from fastmlr.checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint)
    return model.eval()
