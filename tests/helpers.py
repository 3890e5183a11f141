"""Small helpers shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batch: torch.Tensor) -> nn.Module:
    """Set every backbone BatchNorm's running statistics to those of ``batch`` (one cumulative pass)
    and return the model in eval mode.

    A freshly initialised backbone in eval mode (running statistics 0 and 1) shrinks its features to
    ~1e-9 (mobilenet_v2), so every image would score the same and per-image bugs would pass
    unseen; after this, outputs depend on the image.
    """
    norms = [m for m in model.features.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.features.train()
    model.features(batch)
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()
