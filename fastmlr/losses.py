"""Training losses of the model zoo: multi-label binary cross-entropy on logits, and its weighted sums.

Every paper here trains with the per-class binary cross-entropy
``-Σ_c y_c log σ(ŷ_c) + (1 − y_c) log(1 − σ(ŷ_c))`` (SRDL eq. 11–12, LCE eq. 12, Deep-LIFT eq. 8).
The losses take logits (``binary_cross_entropy_with_logits``: no ``log(0)`` for saturated scores).
``reduction="sum"`` is the papers' sum over images and classes; ``"mean"`` (default) divides by ``B·C``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum")


def check_targets(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``targets`` in ``logits``' dtype; ValueError unless shaped like ``logits`` with values in [0, 1]."""
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets {tuple(targets.shape)} must have the shape of the scores {tuple(logits.shape)}"
        )
    targets = targets.to(logits.dtype)
    if ((targets < 0) | (targets > 1)).any():
        raise ValueError("targets must lie in [0, 1]")
    return targets


def multilabel_bce(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy of ``sigmoid(logits)`` against 0/1 ``targets`` (same shape ``[B, C]``)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return F.binary_cross_entropy_with_logits(logits, check_targets(logits, targets), reduction=reduction)


def weighted_bce(
    terms: Sequence[tuple[float, torch.Tensor]], targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """``Σ weight · multilabel_bce(logits, targets)`` over ``terms = [(weight, logits), ...]``
    (SRDL eq. 13 with weights 1, 1; LCE eq. 13 with α = 1.0, β = 0.1)."""
    if not terms:
        raise ValueError("weighted_bce needs at least one (weight, logits) term")
    return sum(weight * multilabel_bce(logits, targets, reduction) for weight, logits in terms)
