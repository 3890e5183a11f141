"""SRDL — Semantic Representation and Dependency Learning for multi-label recognition (Pu et al.).

CAR module (eq. 3–6): a label graph with a learnable adjacency (eq. 3) turns the ``C`` word
embeddings into contextualized embeddings ``x_c``; with them, per class, a channel attention
``CA_c = σ(f_c(tanh(f_ca(GMP(F)) ⊙ f_w(x_c))))`` (eq. 4, ``[D]``) and a spatial attention
``SA_c,xy = σ(f_s(tanh(f_sa(F_xy) ⊙ f_w(x_c))))`` (eq. 5, one value per position); the
category-specific feature ``f_c = GMP_xy(0.5·F⊙SA_c + 0.5·F⊙CA_c)`` (eq. 6 and its GMP) is scored
by one linear classifier per class, then a sigmoid (eq. 2). Eq. 5 and eq. 6 + GMP run fused in
:func:`fastmlr.kernels.tanh_attention_scores` and :func:`fastmlr.kernels.srdl_max_pool` (never
forming ``B×C×HW×D``).

OE module (training only, §3.3): the top-K classes by probability each get their SA map decomposed
into the marginal max profiles along rows and columns (eq. 7–8), the interval search of MCAR picks
one box (eq. 9–10, threshold α), the attention inside that box is set to 0, and the erased
attention gives a second prediction ``p̂``; the loss is ``L_ori + L_era`` (eq. 11–13).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from fastmlr import kernels
from fastmlr.checks import check_threshold, check_topn
from fastmlr.graph import (
    WORD_EMBEDDING_DIM,
    ClassWiseLinear,
    LearnedAdjacencyGraph,
    label_embedding_matrix,
)
from fastmlr.losses import weighted_bce
from fastmlr.models.base import MLRModel
from fastmlr.models.mcar import select_top_classes
from fastmlr.registry import register_model


def erasing_boxes(attention_maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """OE localization (eq. 7–10): ``[B, K, h, w]`` attention maps → ``[B, K, 4]`` int64 boxes
    ``(x1, y1, x2, y2)``, half-open, in feature-map cells.

    The column profile ``m_x[x] = max_y SA[y, x]`` (eq. 7) and the row profile
    ``m_y[y] = max_x SA[y, x]`` (eq. 8) each go through :func:`fastmlr.kernels.interval_search`
    (min-max normalisation, threshold, the interval of the global peak — MCAR's search).
    """
    columns = kernels.interval_search(attention_maps.amax(dim=2), threshold=threshold)  # [B, K, 2]
    rows = kernels.interval_search(attention_maps.amax(dim=3), threshold=threshold)
    return torch.stack([columns[..., 0], rows[..., 0], columns[..., 1], rows[..., 1]], dim=-1)


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[..., 4]`` half-open boxes ``(x1, y1, x2, y2)`` → ``[..., height, width]`` bool, True inside."""
    ys = torch.arange(height, device=boxes.device)[:, None]
    xs = torch.arange(width, device=boxes.device)[None, :]
    x1, y1, x2, y2 = (boxes[..., i, None, None] for i in range(4))
    return (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)


def object_erasing(
    attention: torch.Tensor, probs: torch.Tensor, topk: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SRDL's OE module on spatial attention ``[B, C, h, w]`` given class probabilities ``[B, C]``.

    Selects the ``topk`` classes by probability (descending; ties keep the lower index), finds one
    box per selected class on its (detached) attention map with :func:`erasing_boxes`, and returns
    ``(erased [B, C, h, w], classes [B, K], boxes [B, K, 4])``: ``attention`` with the values inside
    each selected class's box set to 0 (a multiplicative mask, so gradients reach the rest) and
    every other class's map unchanged.
    """
    B, C, h, w = attention.shape
    classes = select_top_classes(probs.detach(), topk)
    selected = attention.detach().gather(1, classes[:, :, None, None].expand(-1, -1, h, w))
    boxes = erasing_boxes(selected, threshold)
    keep = torch.ones_like(attention)
    keep.scatter_(1, classes[:, :, None, None].expand(-1, -1, h, w), (~box_masks(boxes, h, w)).to(keep.dtype))
    return attention * keep, classes, boxes


def srdl_loss(
    outputs: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Eq. 13, ``L = L_ori + L_era``: binary cross-entropy (eq. 11–12) of the original and the
    erased logits ``outputs = (logits, erased_logits)`` against 0/1 ``targets`` ``[B, C]``."""
    logits, erased_logits = outputs
    return weighted_bce([(1.0, logits), (1.0, erased_logits)], targets, reduction)


@register_model("srdl")
class SRDL(MLRModel):
    """SRDL with options ``label_embeddings`` (``"coco"``/``"voc"``, ``"random"``, a ``[C, 300]``
    tensor/ndarray or ``.npy`` path; the packaged GloVe vectors of 80 or 20 classes when ``None``, see
    :func:`fastmlr.graph.label_embedding_matrix`),
    ``topk`` (classes erased per image in training, 3) and ``threshold`` (α of eq. 9–10, 0.5).

    Widths: graph 300→300→300; ``f_w`` 300→D, ``f_ca``, ``f_sa``, ``f_c`` D→D, ``f_s`` D→1
    (models.md; D = 2048 for ResNets).
    Eval: ``model(images) -> [B, C]`` probabilities (no OE). Train: ``(logits, erased_logits)``,
    both ``[B, C]``, for :meth:`loss` (:func:`srdl_loss`).
    """

    def __init__(
        self,
        *,
        label_embeddings: torch.Tensor | np.ndarray | str | os.PathLike | None = None,
        topk: int = 3,
        threshold: float = 0.5,
        **kw,
    ) -> None:
        super().__init__(**kw)
        C, D = self.num_classes, self.spec.out_channels
        try:
            self.topk = check_topn(topk, C)
        except ValueError:
            raise ValueError(f"topk must be an integer in 1..{C} (num_classes), got {topk}") from None
        self.threshold = check_threshold(threshold)
        self.register_buffer("word_embeddings", label_embedding_matrix(label_embeddings, C))
        self.graph = LearnedAdjacencyGraph(C, (WORD_EMBEDDING_DIM,) * 3)
        self.f_w = nn.Linear(WORD_EMBEDDING_DIM, D)
        self.f_ca = nn.Linear(D, D)
        self.f_c = nn.Linear(D, D)
        self.f_sa = nn.Linear(D, D)
        self.f_s = nn.Linear(D, 1)
        self.classifier = ClassWiseLinear(C, D)

    def attention(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``F [B, HW, D] -> (SA [B, C, HW], CA [B, C, D])``, both after the sigmoid (eq. 4–5)."""
        embedded = self.f_w(self.graph(self.word_embeddings))  # f_w(x_c), x_c from eq. 3: [C, D]
        pooled = self.f_ca(tokens.amax(dim=1))  # f_ca(GMP(F)): [B, D]
        channel = torch.sigmoid(self.f_c(torch.tanh(pooled[:, None, :] * embedded[None])))  # eq. 4
        spatial = torch.sigmoid(  # eq. 5
            kernels.tanh_attention_scores(self.f_sa(tokens), embedded, self.f_s.weight[0], self.f_s.bias)
        )
        return spatial, channel

    def classify(self, tokens: torch.Tensor, spatial: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` logits: eq. 6 + GMP (fused), then the per-class linear classifier of eq. 2."""
        return self.classifier(kernels.srdl_max_pool(tokens, spatial, channel))

    def forward(self, images: torch.Tensor):
        """Eval: ``[B, C]`` probabilities. Train: ``(logits, erased_logits)`` (OE applied)."""
        self.check_input(images)
        feats = self.features(images)
        h, w = feats.shape[-2:]
        tokens = feats.flatten(2).transpose(1, 2)  # F as [B, HW, D]
        spatial, channel = self.attention(tokens)
        logits = self.classify(tokens, spatial, channel)
        if not self.training:
            return torch.sigmoid(logits)
        if h < 2 or w < 2:
            raise ValueError(
                f"SRDL's object erasing needs a feature map of at least 2x2 (images of at least 64x64), "
                f"got {h}x{w} from {tuple(images.shape[-2:])} images"
            )
        maps = spatial.unflatten(2, (h, w))
        erased, _, _ = object_erasing(maps, torch.sigmoid(logits), self.topk, self.threshold)
        return logits, self.classify(tokens, erased.flatten(2), channel)

    @staticmethod
    def loss(outputs: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor, reduction: str = "mean"):
        """:func:`srdl_loss`."""
        return srdl_loss(outputs, targets, reduction)
