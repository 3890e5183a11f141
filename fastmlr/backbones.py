"""torchvision backbones as stride-32 feature extractors.

ResNets are laid out exactly as the released MCAR code lays them out: an ``nn.Sequential`` whose
children ``0..7`` are ``conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4``, so a released
state dict's ``features.N.*`` keys load unchanged. MobileNetV2 is torchvision's ``features``
(19 children, last one the 1×1 conv to 1280 channels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torchvision
from torch import nn


@dataclass(frozen=True)
class BackboneSpec:
    """What a model needs to know about a backbone.

    ``out_channels`` is the width of the stride-32 map. ``levels`` are the indices into the
    ``nn.Sequential`` whose outputs are the stride-8, stride-16 and stride-32 maps, and
    ``level_channels`` their widths (LCE's multi-level fusion uses them).
    """

    name: str
    out_channels: int
    levels: tuple[int, int, int]
    level_channels: tuple[int, int, int]


BACKBONES: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec("resnet50", 2048, (5, 6, 7), (512, 1024, 2048)),
    "resnet101": BackboneSpec("resnet101", 2048, (5, 6, 7), (512, 1024, 2048)),
    "mobilenet_v2": BackboneSpec("mobilenet_v2", 1280, (6, 13, 18), (32, 96, 1280)),
}


def backbone_spec(name: str) -> BackboneSpec:
    """The :class:`BackboneSpec` of ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name]


def _load_torchvision_weights(model: nn.Module, path: str | os.PathLike) -> None:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weight file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - report any unpickling failure with the file name
        raise ValueError(f"cannot read backbone weight file {path}: {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"backbone weight file {path} holds a {type(state).__name__}, not a state dict")
    result = model.load_state_dict(state, strict=False)
    # The classifier head (fc / classifier) is not used; everything else must be there.
    missing = [k for k in result.missing_keys if not k.startswith(("fc.", "classifier."))]
    if missing:
        raise ValueError(f"backbone weight file {path} lacks {len(missing)} keys, e.g. {missing[:5]}")


def build_backbone(name: str, weights: str | os.PathLike | None = None) -> nn.Sequential:
    """A stride-32 feature extractor ``[B, 3, H, W] -> [B, D, H/32, W/32]``.

    ``weights`` is a local torchvision weight file (e.g. ``resnet101-63fe2227.pth``); without it
    the backbone is randomly initialised. Nothing is downloaded.
    """
    backbone_spec(name)
    model = getattr(torchvision.models, name)(weights=None)
    if weights is not None:
        _load_torchvision_weights(model, weights)
    if name.startswith("resnet"):
        return nn.Sequential(
            model.conv1, model.bn1, model.relu, model.maxpool,
            model.layer1, model.layer2, model.layer3, model.layer4,
        )
    return model.features


def multilevel_features(features: nn.Sequential, spec: BackboneSpec, x: torch.Tensor) -> list[torch.Tensor]:
    """Run ``features`` once and return the stride-8, -16 and -32 maps named by ``spec.levels``."""
    out = []
    for i, layer in enumerate(features):
        x = layer(x)
        if i in spec.levels:
            out.append(x)
    return out
