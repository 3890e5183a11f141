"""Baseline: backbone → global pooling → 1×1 conv classifier → sigmoid (the "ResNet-101" rows)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastmlr.models.base import LogitModel
from fastmlr.registry import register_model

POOLINGS = ("avg", "max", "gwp")


def global_pool(x: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[B, D, h, w] -> [B, D, 1, 1]``: average, max, or GWP = (avg + max) / 2 (MCAR eq. 15)."""
    if pooling == "avg":
        return F.adaptive_avg_pool2d(x, 1)
    if pooling == "max":
        return F.adaptive_max_pool2d(x, 1)
    if pooling == "gwp":
        return 0.5 * (F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1))
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
    return pooling


@register_model("baseline")
class Baseline(LogitModel):
    """``pooling`` is ``"avg"``, ``"max"`` or ``"gwp"`` (default ``"avg"``, the tables' plain ResNet)."""

    def __init__(self, *, pooling: str = "avg", **kw) -> None:
        super().__init__(**kw)
        self.pooling = check_pooling(pooling)
        # Named as in MCAR so that a baseline is exactly MCAR's global stream.
        self.convclass = nn.Conv2d(self.spec.out_channels, self.num_classes, kernel_size=1)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, C]`` logits (no input checks)."""
        return self.convclass(global_pool(self.features(images), self.pooling)).flatten(1)
