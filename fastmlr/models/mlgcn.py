"""ML-GCN — Multi-Label Image Recognition with Graph Convolutional Networks (Chen et al., CVPR 2019),
the "ML-GCN" peer of SRDL's Tables 1–4 and its inference-time Table 3.

Two graph convolutions over the label graph turn the ``C`` word embeddings into per-class
classifiers ``W ∈ R^{C×D}`` (300 → 1024 → D, LeakyReLU 0.2 between, none after the last, as the
released code); the image is the global max pooling of the backbone map; ``logits = GMP(F) Wᵀ``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from fastmlr.graph import (
    LEAKY_SLOPE,
    WORD_EMBEDDING_DIM,
    GraphConvolution,
    adjacency_matrix,
    label_embedding_matrix,
)
from fastmlr.models.base import LogitModel
from fastmlr.registry import register_model


@register_model("mlgcn")
class MLGCN(LogitModel):
    """ML-GCN with options ``label_embeddings`` (``[C, 300]`` tensor/ndarray or ``.npy`` path; a
    seeded random stand-in when ``None``, see :func:`fastmlr.graph.label_embedding_matrix`) and
    ``adjacency`` (``[C, C]``, e.g. :func:`fastmlr.graph.cooccurrence_adjacency` of the training
    labels; the identity when ``None``).

    Eval: ``model(images) -> [B, C]`` probabilities. Train: ``model(images) -> [B, C]`` logits for
    :meth:`loss` (binary cross-entropy).
    """

    def __init__(
        self,
        *,
        label_embeddings: torch.Tensor | np.ndarray | str | os.PathLike | None = None,
        adjacency: torch.Tensor | np.ndarray | None = None,
        **kw,
    ) -> None:
        super().__init__(**kw)
        self.register_buffer("word_embeddings", label_embedding_matrix(label_embeddings, self.num_classes))
        self.register_buffer("adjacency", adjacency_matrix(adjacency, self.num_classes))
        self.gc1 = GraphConvolution(WORD_EMBEDDING_DIM, 1024)
        self.gc2 = GraphConvolution(1024, self.spec.out_channels)

    def classifiers(self) -> torch.Tensor:
        """``[C, D]``: the graph-generated per-class classifiers."""
        hidden = F.leaky_relu(self.gc1(self.word_embeddings, self.adjacency), LEAKY_SLOPE)
        return self.gc2(hidden, self.adjacency)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, C]`` logits (no input checks)."""
        pooled = F.adaptive_max_pool2d(self.features(images), 1).flatten(1)  # GMP
        return pooled @ self.classifiers().T
