"""P-GCN — prediction learning GCN, from "Learning Graph Convolutional Networks for Multi-Label
Recognition and Applications" (Chen, Wei, Wang, Guo, TPAMI 45(6), 2023), the "P-GCN" row of SRDL's
Tables 1–4 and of its inference-time Table 3 (32.33 ms, RTX 3070, ResNet-101, 448×448).

The paper's abstract states the design: the image's visual representation is decomposed into a set
of label-aware features, one per class, and a GCN over the class graph (the co-occurrence
correlation matrix of ML-GCN) encodes them into inter-dependent image-level prediction scores. No
code was released; the choices below are fastmlr's (README, "P-GCN"):

- **label-aware features**: a 1×1 convolution ``D → C`` gives one class-specific activation map per
  class (as CAM does); soft-maxed over the ``HW`` positions, map ``c`` pools the backbone map into
  ``v_c = Σ_p softmax_p(M_c)[p] F_p`` — :func:`fastmlr.kernels.softmax_attention_pool`, so the
  ``[B, C, HW, D]`` product is never formed;
- **graph**: ML-GCN's correlation matrix (:func:`fastmlr.graph.mlgcn_correlation`, the released
  ``gen_A``, τ = 0.4) normalised at run time as ML-GCN does (:func:`fastmlr.graph.mlgcn_propagation`);
- **GCN**: two graph convolutions ``D → 1024 → 1`` over the ``C`` nodes (ML-GCN's layer, hidden
  width and LeakyReLU 0.2 between them); the second one's width-1 output *is* each class's score,
  so every score is the graph-weighted sum of its neighbours' evidence — plus one learnable bias
  per class (the class prior a width-1 graph convolution without bias cannot express).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastmlr import kernels
from fastmlr.graph import (
    LEAKY_SLOPE,
    GraphConvolution,
    adjacency_matrix,
    mlgcn_correlation,
    mlgcn_propagation,
    require_positive_row_sums,
)
from fastmlr.models.base import LogitModel
from fastmlr.registry import register_model

#: Width of the hidden graph layer (ML-GCN's).
HIDDEN_DIM = 1024


@register_model("pgcn")
class PGCN(LogitModel):
    """P-GCN with option ``adjacency``: ``"coco"`` / ``"voc"`` (:func:`fastmlr.graph.mlgcn_correlation`
    of the packaged co-occurrence statistics), or the correlation matrix ``A`` as a ``[C, C]``
    tensor/ndarray or ``.npy`` path (non-negative, every row sum positive — e.g.
    ``mlgcn_correlation(*cooccurrence_statistics(train_labels))``); ``None`` = the packaged graph for
    80 or 20 classes, the identity otherwise. Kept as the buffer ``correlation`` and normalised at
    run time. P-GCN's nodes are image features, so it takes no word embeddings.

    Eval: ``model(images) -> [B, C]`` probabilities. Train: ``[B, C]`` logits for :meth:`loss`
    (binary cross-entropy).
    """

    def __init__(
        self,
        *,
        adjacency: torch.Tensor | np.ndarray | str | os.PathLike | None = None,
        **kw,
    ) -> None:
        super().__init__(**kw)
        correlation = require_positive_row_sums(
            adjacency_matrix(adjacency, self.num_classes, mlgcn_correlation),
            "the graph is normalised by its row sums (mlgcn_correlation adds the identity)",
        )
        self.register_buffer("correlation", correlation)
        self.class_maps = nn.Conv2d(self.spec.out_channels, self.num_classes, kernel_size=1)
        self.gc1 = GraphConvolution(self.spec.out_channels, HIDDEN_DIM)
        self.gc2 = GraphConvolution(HIDDEN_DIM, 1)
        # ML-GCN's initialisation bound 1/sqrt(out_features) is 1 for this width-1 layer and starts
        # training from saturated scores; a linear layer's 1/sqrt(in_features) keeps them O(1).
        nn.init.uniform_(self.gc2.weight, -(HIDDEN_DIM**-0.5), HIDDEN_DIM**-0.5)
        self.bias = nn.Parameter(torch.zeros(self.num_classes))

    def label_features(self, feature_map: torch.Tensor) -> torch.Tensor:
        """``[B, D, h, w] -> [B, C, D]``: ``v_c = Σ_p softmax_p(M_c)[p] F_p``, ``M = class_maps(F)``."""
        tokens = feature_map.flatten(2).transpose(1, 2)  # [B, HW, D]
        activation = self.class_maps(feature_map).flatten(2)  # [B, C, HW]
        return kernels.softmax_attention_pool(tokens, activation)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, C]`` logits (no input checks)."""
        nodes = self.label_features(self.features(images))
        propagation = mlgcn_propagation(self.correlation)
        hidden = F.leaky_relu(self.gc1(nodes, propagation), LEAKY_SLOPE)
        return self.gc2(hidden, propagation).squeeze(-1) + self.bias
