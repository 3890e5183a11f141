"""Deep-LIFT — Deep Label-Specific Feature Learning for image annotation (Li et al., TIP).

A graph network re-embeds the ``C`` label word vectors into ``L ∈ R^{C×D}`` (AGCN, eq. 3, or RGCN,
eq. 4); the LIFT map ``A = L F`` (eq. 5) correlates every label with every position of the
backbone map; the channel attention module weighs its label channels, ``A_att = M(A) ⊙ A``
(eq. 6–7); the head reads ``[avg_xy A_att ‖ max_xy A_att]`` (2C) through an MLP with one hidden
layer of width 2C to the ``C`` logits, trained with binary cross-entropy (eq. 8). Eq. 5–7 and the
pooling run fused in :func:`fastmlr.kernels.lift_attention_pool`.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from fastmlr import kernels
from fastmlr.graph import (
    WORD_EMBEDDING_DIM,
    AttentionGraphLayer,
    ResidualGCN,
    adjacency_matrix,
    label_embedding_matrix,
)
from fastmlr.models.base import LogitModel
from fastmlr.registry import register_model

GCN_VARIANTS = ("agcn", "rgcn")


class AttentionGCN(nn.Module):
    """Deep-LIFT's AGCN: two attention graph layers ``300 → 1024 → out`` (eq. 3)."""

    def __init__(self, in_features: int = WORD_EMBEDDING_DIM, out_features: int = 2048) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [AttentionGraphLayer(in_features, 1024), AttentionGraphLayer(1024, out_features)]
        )

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, adjacency)
        return x


@register_model("deeplift")
class DeepLIFT(LogitModel):
    """Deep-LIFT with options ``gcn`` (``"agcn"``, default, or ``"rgcn"``), ``label_embeddings``
    (``[C, 300]`` tensor/ndarray or ``.npy`` path; a seeded random stand-in when ``None``, see
    :func:`fastmlr.graph.label_embedding_matrix`) and ``adjacency`` (``[C, C]``, from
    :func:`fastmlr.graph.cooccurrence_adjacency` with τ = 0.5; the identity when ``None``).

    The CAM's MLP is ``C → max(1, C/4) → C`` with ReLU (CBAM); the head's MLP ``2C → 2C → C`` with ReLU.
    Eval: ``model(images) -> [B, C]`` probabilities. Train: ``[B, C]`` logits for :meth:`loss`.
    """

    def __init__(
        self,
        *,
        gcn: str = "agcn",
        label_embeddings: torch.Tensor | np.ndarray | str | os.PathLike | None = None,
        adjacency: torch.Tensor | np.ndarray | None = None,
        **kw,
    ) -> None:
        super().__init__(**kw)
        if gcn not in GCN_VARIANTS:
            raise ValueError(f"unknown gcn {gcn!r}; choose one of {GCN_VARIANTS}")
        self.gcn_variant = gcn
        C, D = self.num_classes, self.spec.out_channels
        self.register_buffer("word_embeddings", label_embedding_matrix(label_embeddings, C))
        self.register_buffer("adjacency", adjacency_matrix(adjacency, C))
        graph_network = AttentionGCN if gcn == "agcn" else ResidualGCN
        self.gcn = graph_network(WORD_EMBEDDING_DIM, D)
        cam_hidden = max(1, C // 4)
        self.cam_hidden = nn.Linear(C, cam_hidden)
        self.cam_out = nn.Linear(cam_hidden, C)
        self.head = nn.Sequential(nn.Linear(2 * C, 2 * C), nn.ReLU(inplace=True), nn.Linear(2 * C, C))

    def reembedded_labels(self) -> torch.Tensor:
        """``L [C, D]``: the graph re-embedded labels (eq. 3 or 4)."""
        return self.gcn(self.word_embeddings, self.adjacency)

    def pooled_lift(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 2C]``: ``[avg_xy A_att ‖ max_xy A_att]`` of eq. 5–7 (no input checks)."""
        tokens = self.features(images).flatten(2).transpose(1, 2)  # F as [B, HW, D]
        return kernels.lift_attention_pool(
            self.reembedded_labels()[None], tokens,
            self.cam_hidden.weight, self.cam_hidden.bias, self.cam_out.weight, self.cam_out.bias,
        )

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, C]`` logits (no input checks)."""
        return self.head(self.pooled_lift(images))
