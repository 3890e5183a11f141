"""What every fastmlr model shares: a backbone, the class count, the image size, input checks."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from fastmlr.backbones import backbone_spec, build_backbone
from fastmlr.checks import check_image_size, check_images, check_int
from fastmlr.data import check_class_names
from fastmlr.losses import multilabel_bce


class MLRModel(nn.Module):
    """Base class. Subclasses build their head on ``self.features`` (a stride-32 backbone).

    ``fixed_size`` is True for models whose layer widths depend on the image size (LCE): their
    inputs must be exactly ``image_size`` square.
    """

    model_name = "?"
    fixed_size = False

    def __init__(
        self,
        backbone: str = "resnet101",
        num_classes: int = 80,
        image_size: int = 448,
        backbone_weights: str | os.PathLike | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        num_classes = check_int(num_classes, "num_classes")
        check_image_size(image_size, "image_size")
        self.spec = backbone_spec(backbone)
        self.backbone_name = backbone
        self.num_classes = int(num_classes)
        #: Output ``k`` is class ``class_names[k]``; default :func:`fastmlr.data.class_names` (COCO's
        #: 80 in the released codes' order, VOC's 20). Saved in fastmlr checkpoints' configuration.
        self.class_names = check_class_names(class_names, self.num_classes)
        self.image_size = int(image_size)
        self.features = build_backbone(backbone, backbone_weights)
        self.config: dict = {}

    @property
    def feature_size(self) -> int:
        """Side of the stride-32 map for ``image_size`` inputs."""
        return self.image_size // 32

    def check_input(self, images: torch.Tensor) -> None:
        weight = next(self.parameters(), None)
        check_images(images, self.image_size if self.fixed_size else None,
                     weight.dtype if weight is not None else None)

    @staticmethod
    def remap_checkpoint_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a foreign checkpoint's keys onto this model's (identity by default)."""
        return state_dict


class LogitModel(MLRModel):
    """A model whose head gives one ``[B, C]`` logit tensor (baseline, ML-GCN, SSGRL, Deep-LIFT):
    subclasses define ``logits(images)``; eval returns probabilities, training the logits for
    :meth:`loss` (binary cross-entropy)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Eval: ``[B, C]`` probabilities. Train: ``[B, C]`` logits."""
        self.check_input(images)
        logits = self.logits(images)
        return logits if self.training else torch.sigmoid(logits)

    @staticmethod
    def loss(outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Binary cross-entropy of the training logits against 0/1 ``targets`` ``[B, C]``."""
        return multilabel_bce(outputs, targets, reduction)
