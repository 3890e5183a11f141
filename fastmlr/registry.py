"""Model registry in the style of timm: ``register_model``, ``create_model``, ``list_models``."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

from torch import nn

from fastmlr.checkpoint import STATE_OPTIONS, Checkpoint, check_config, load_checkpoint, read_checkpoint
from fastmlr.graph import RANDOM_EMBEDDINGS

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


def model_defaults(name: str) -> dict[str, Any]:
    """The options a registered model's constructor takes, with their defaults: ``backbone``,
    ``num_classes``, ``image_size``, ``backbone_weights`` and the architecture's own (e.g. MCAR's
    ``pooling``, ``topn``, ``threshold``)."""
    _import_models()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(_MODELS)}")
    options: dict[str, Any] = {}
    for cls in _MODELS[name].__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        for p in params:
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self":
                options.setdefault(p.name, p.default)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return options


def model_config(name: str, checkpoint: Checkpoint | None = None, **explicit: Any) -> dict[str, Any]:
    """The options ``create_model(name, checkpoint=checkpoint, **explicit)`` builds with, defaults
    left out: the explicit ones (``None`` values dropped) over those saved in a fastmlr checkpoint.

    ``ValueError`` for an option ``name`` does not take, a checkpoint of another model or with a
    contradicting value (:func:`fastmlr.checkpoint.check_config`), and an explicit option whose
    content a fastmlr checkpoint's weights hold (``label_embeddings``, ``adjacency``): the weights
    would silently replace it.
    """
    options = model_defaults(name)
    leave_out = ("backbone", "num_classes", "image_size")  # None: the checkpoint's value, else the default
    explicit = {k: v for k, v in explicit.items() if v is not None or k not in leave_out}
    unknown = sorted(set(explicit) - set(options))
    if unknown:
        raise ValueError(f"model {name!r} has no option {', '.join(unknown)}; its options: {sorted(options)}")
    if checkpoint is None or checkpoint.config is None:
        return explicit
    check_config(checkpoint, name, explicit)
    held = sorted(k for k in explicit if k in STATE_OPTIONS and k != "backbone_weights" and explicit[k] is not None)
    if held:
        raise ValueError(
            f"{', '.join(held)} would be replaced by the weights of checkpoint {checkpoint.path}, which hold it: "
            "leave it out"
        )
    saved = {k: v for k, v in checkpoint.config.items() if k in options and k not in STATE_OPTIONS}
    return {**saved, **explicit}


def create_model(
    name: str,
    *,
    backbone: str | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
    checkpoint: str | os.PathLike | Checkpoint | None = None,
    **cfg: Any,
) -> nn.Module:
    """Build a registered model with random weights, optionally loading ``checkpoint``.

    ``cfg`` holds the architecture's own options (e.g. MCAR's ``pooling``, ``topn``,
    ``threshold``) and ``backbone_weights=PATH``, a local torchvision weight file. ``checkpoint``
    is a fastmlr checkpoint or one of the formats the architecture knows (MCAR: the released code's
    ``{'state_dict': ...}``); see :func:`fastmlr.checkpoint.load_checkpoint`.

    **The configuration travels with the weights.** A fastmlr checkpoint holds the options it was
    saved with (``model.config``); the model is rebuilt with them. An option left out (``None`` for
    ``backbone``, ``num_classes``, ``image_size``) takes the checkpoint's value, else its default
    (``resnet101``, 80, 448, the architecture's own); an option given that contradicts the
    checkpoint raises a ``ValueError`` naming both values, and so does a checkpoint saved from
    another registered model. Options whose content the state dict holds (``label_embeddings``,
    ``adjacency``) and ``backbone_weights`` are not taken from the checkpoint. Foreign checkpoints
    carry no configuration: the options are the arguments and defaults.
    """
    if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
        checkpoint = read_checkpoint(checkpoint)
    options = model_defaults(name)
    kwargs = model_config(name, checkpoint, backbone=backbone, num_classes=num_classes, image_size=image_size, **cfg)
    for key in ("backbone", "num_classes", "image_size"):
        kwargs.setdefault(key, options[key])
    build = dict(kwargs)
    if checkpoint is not None and checkpoint.config is not None and "label_embeddings" in options:
        # The weights hold the word embeddings: build with the seeded stand-ins they replace (a class
        # count without a packaged graph has no default to build with).
        build.setdefault("label_embeddings", RANDOM_EMBEDDINGS)
    model = _MODELS[name](**build)
    model.config = {
        "name": name,
        **{k: os.fspath(v) if isinstance(v, os.PathLike) else v
           for k, v in {**options, **kwargs}.items() if k != "backbone_weights" and _is_plain(v)},
    }
    if getattr(model, "class_names", None) is not None:  # the resolved names, so checkpoints carry them
        model.config["class_names"] = list(model.class_names)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval()
