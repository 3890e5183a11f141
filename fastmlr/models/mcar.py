"""MCAR — Learning to Discover Multi-Class Attentional Regions (Gao & Zhou, TIP 2021).

Two streams share one backbone and one 1×1 classifier. The global stream scores the whole image;
the global-to-local step turns the top-N class activation maps into boxes (max-marginals, eq. 5–7,
exactly as ``shared/docs/mcar-localization.md`` states the released code's behaviour), crops and
resizes them to the input size, and the local stream scores every region. The final score is the
per-class max of the two streams. The state-dict layout is the released code's (``features.0..7``,
``convclass``), so its checkpoints load unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastmlr import kernels
from fastmlr.checks import check_memory, check_threshold, check_topn, is_exporting
from fastmlr.models.base import MLRModel
from fastmlr.models.baseline import check_pooling, global_pool
from fastmlr.registry import register_model


class MCARStages(NamedTuple):
    """Everything one MCAR forward computes (eval mode).

    ``global_scores`` and ``local_scores`` are ``[B, C]`` probabilities (eq. 2 and eq. 3),
    ``probs`` their per-class max; ``indices`` ``[B, N]`` the selected classes, best first;
    ``boxes`` ``[B, N, 4]`` int64 ``(x1, y1, x2, y2)``, half-open, in input pixels;
    ``cam_logits`` ``[B, C, h, w]`` the class activation maps before the sigmoid (eq. 4), from which
    the boxes are localized.
    """

    probs: torch.Tensor
    global_scores: torch.Tensor
    local_scores: torch.Tensor
    indices: torch.Tensor
    boxes: torch.Tensor
    cam_logits: torch.Tensor


def select_top_classes(global_scores: torch.Tensor, topn: int) -> torch.Tensor:
    """``[B, C] -> [B, topn]`` class indices ranked by score, descending; ties keep the lower index."""
    return torch.sort(global_scores, dim=1, descending=True, stable=True).indices[:, :topn]


#: Live activations of the backbone per input pixel, in elements, at the peak of one forward:
#: ``(without autograd, with autograd)``. Measured on CPU in float32 (peak resident memory of MCAR
#: forwards and backbone forwards at 512-1024 px, ``bench/results/mcar_memory.md``: the model is
#: within 0.89-1.09 of the measured MCAR peaks).
ACTIVATIONS_PER_PIXEL = {"mobilenet_v2": (66, 400), "resnet50": (66, 440), "resnet101": (66, 660)}


def forward_bytes(
    batch: int, topn: int, height: int, width: int, backbone: str, element_size: int = 4, grad: bool = False
) -> int:
    """The memory model of an MCAR forward: about how many bytes it allocates (the input excluded).

    ``bytes ≈ e·B·H·W·N·(3 + a)`` without autograd: the ``B·N`` crops, each resized to the full
    ``H×W`` (``3·B·N·H·W`` elements), and the local stream's live activations on them (``a`` elements
    per pixel, :data:`ACTIVATIONS_PER_PIXEL`); the global stream (``a·B·H·W``) has finished by then.
    With autograd every activation is kept for the backward pass: ``e·B·H·W·(3·N + (1 + N)·a_grad)``.
    ``e`` is the element size (4 for float32). The cost is linear in ``B``, ``N`` and ``H·W``:
    resnet101 at 448², ``B = 1``, ``N = 4`` needs about 0.2 GiB; at 4096², 17 GiB.
    """
    inference, training = ACTIVATIONS_PER_PIXEL.get(backbone, max(ACTIVATIONS_PER_PIXEL.values()))
    pixels = batch * height * width
    if grad:
        return element_size * pixels * (3 * topn + (1 + topn) * training)
    return element_size * pixels * topn * (3 + inference)


def mcar_loss(
    global_probs: torch.Tensor, local_probs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """The pair loss ``L = L_g + L_l`` (eq. 8), each a binary cross-entropy over images and classes
    (eq. 9). ``reduction="sum"`` is eq. 9 to the letter; ``"mean"`` divides each term by ``M·C``."""
    if global_probs.shape != targets.shape or local_probs.shape != targets.shape:
        raise ValueError(
            f"mcar_loss: probabilities {tuple(global_probs.shape)} / {tuple(local_probs.shape)} "
            f"and targets {tuple(targets.shape)} must have the same shape"
        )
    targets = targets.to(global_probs.dtype)
    return F.binary_cross_entropy(global_probs, targets, reduction=reduction) + F.binary_cross_entropy(
        local_probs, targets, reduction=reduction
    )


@register_model("mcar")
class MCAR(MLRModel):
    """MCAR with options ``pooling`` (``"gwp"``: eq. 15 with λ = 0.5; or ``"avg"``, ``"max"``),
    ``topn`` (classes localized per image, 4) and ``threshold`` (τ of eq. 7, 0.5).

    Eval: ``model(images) -> [B, C]`` final probabilities; :meth:`forward_stages` returns every stage.
    Train: ``model(images) -> (global_probs, local_probs)`` for :func:`mcar_loss`.
    """

    onnx_min_opset = 11  # the interval search's CumSum and the stable sort's TopK(largest=...)

    def __init__(self, *, pooling: str = "gwp", topn: int = 4, threshold: float = 0.5, **kw) -> None:
        super().__init__(**kw)
        self.pooling = check_pooling(pooling)
        self.topn = check_topn(topn, self.num_classes)
        self.threshold = check_threshold(threshold)
        self.convclass = nn.Conv2d(self.spec.out_channels, self.num_classes, kernel_size=1)

    def global_stream(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images -> (global_scores [B, C], cam_logits [B, C, h, w])``.

        Scores are eq. 1–2 on the pooled features; the class activation maps are eq. 4, the same
        classifier applied at every position (before the sigmoid).
        """
        feats = self.features(images)
        scores = torch.sigmoid(self.convclass(global_pool(feats, self.pooling)).flatten(1))
        return scores, self.convclass(feats)

    def global_to_local(
        self, images: torch.Tensor, global_scores: torch.Tensor, cam_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Select the top-N classes, localize one box per class (eq. 5–7) and crop-resize the regions
        to the input size: ``-> (indices [B, N], boxes [B, N, 4], regions [B·N, 3, H, W])``."""
        indices = select_top_classes(global_scores.detach(), self.topn)
        size = tuple(images.shape[-2:])
        boxes = kernels.localize_regions(cam_logits.detach(), indices, size, self.threshold)
        regions = kernels.crop_resize(images, boxes, size).flatten(0, 1)
        if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
            regions = regions.contiguous(memory_format=torch.channels_last)  # keep the caller's NHWC layout
        return indices, boxes, regions

    def local_stream(self, regions: torch.Tensor, batch: int) -> torch.Tensor:
        """``[B·N, 3, H, W] -> [B, C]``: the shared backbone and classifier on every region, sigmoid,
        then the per-class max over each image's N regions (eq. 3)."""
        feats = self.features(regions)
        probs = torch.sigmoid(self.convclass(global_pool(feats, self.pooling)).flatten(1))
        return probs.view(batch, -1, self.num_classes).amax(dim=1)

    #: Bytes a forward may be expected to need before it is refused (:meth:`check_memory`); ``None``:
    #: ``$FASTMLR_MEMORY_LIMIT`` or the machine's memory.
    memory_limit: float | None = None

    def check_memory(self, images: torch.Tensor) -> None:
        """``ValueError`` before the forward of ``images`` allocates anything when its
        :func:`forward_bytes` exceeds the memory limit (:attr:`memory_limit`)."""
        if is_exporting():
            return
        batch, _, height, width = images.shape
        weight = next(self.parameters())
        grad = torch.is_grad_enabled() and (images.requires_grad or weight.requires_grad)  # activations kept
        needed = forward_bytes(batch, self.topn, height, width, self.backbone_name, images.element_size(), grad)
        check_memory(needed, f"MCAR ({self.backbone_name}, N = {self.topn}) on {batch}x3x{height}x{width} images"
                     f"{' with autograd' if grad else ''}", images.device, self.memory_limit)

    def _streams(self, images: torch.Tensor):
        self.check_input(images)
        self.check_memory(images)
        global_scores, cam_logits = self.global_stream(images)
        indices, boxes, regions = self.global_to_local(images, global_scores, cam_logits)
        local_scores = self.local_stream(regions, images.shape[0])
        return global_scores, local_scores, indices, boxes, cam_logits

    def forward_stages(self, images: torch.Tensor) -> MCARStages:
        """Every stage of the two-stream forward (see :class:`MCARStages`)."""
        global_scores, local_scores, indices, boxes, cam_logits = self._streams(images)
        return MCARStages(torch.maximum(global_scores, local_scores), global_scores, local_scores, indices, boxes,
                          cam_logits)

    def forward(self, images: torch.Tensor):
        """Eval: final probabilities ``[B, C]``. Train: ``(global_probs, local_probs)``."""
        global_scores, local_scores, *_ = self._streams(images)
        if self.training:
            return global_scores, local_scores
        return torch.maximum(global_scores, local_scores)
