"""ML-GCN — Multi-Label Image Recognition with Graph Convolutional Networks (Chen et al., CVPR 2019),
the "ML-GCN" peer of SRDL's Tables 1–4 and its inference-time Table 3.

The function of the authors' released code (Megvii-Nanjing/ML_GCN, ``models.py``), so its checkpoints
load and give its probabilities:

- the label graph: the correlation matrix ``A`` of :func:`fastmlr.graph.mlgcn_correlation` (the released
  ``gen_A`` with τ = 0.4), stored with the model, and turned into the propagation matrix
  ``Â = D Aᵀ D`` (:func:`fastmlr.graph.mlgcn_propagation`, the released ``gen_adj``) at every forward;
- two graph convolutions turn the ``C`` word embeddings into per-class classifiers
  ``W = Â (LeakyReLU_0.2(Â (X W₁))) W₂ ∈ R^{C×D}`` (300 → 1024 → D; no bias, no activation after the
  second, eq. 2–4);
- the image feature is the max over the backbone map, and ``logits = x Wᵀ`` (eq. 5).
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
    mlgcn_correlation,
    mlgcn_propagation,
    require_positive_row_sums,
)
from fastmlr.models.base import LogitModel
from fastmlr.registry import register_model

#: The released checkpoints' key of the correlation matrix (``GCNResnet.A``, a parameter outside the
#: optimiser) and this model's buffer holding it.
RELEASED_CORRELATION_KEY = "A"


@register_model("mlgcn")
class MLGCN(LogitModel):
    """ML-GCN as released. Options:

    - ``label_embeddings``: ``"coco"`` / ``"voc"`` (the GloVe vectors the released code feeds), a
      ``[C, 300]`` tensor/ndarray or ``.npy`` path, ``"random"`` for seeded stand-ins; ``None`` = the
      packaged vectors for 80 or 20 classes (:func:`fastmlr.graph.label_embedding_matrix`);
    - ``adjacency``: ``"coco"`` / ``"voc"`` (:func:`fastmlr.graph.mlgcn_correlation` of the packaged
      co-occurrence statistics, τ = 0.4), or the correlation matrix ``A`` itself as a ``[C, C]``
      tensor/ndarray or ``.npy`` path (non-negative, every row sum positive — e.g.
      ``mlgcn_correlation(*cooccurrence_statistics(train_labels))``); ``None`` = the packaged graph for
      80 or 20 classes, the identity otherwise.

    The matrix is kept as the buffer ``correlation`` and normalised at run time, as the released code
    keeps its parameter ``A`` and applies ``gen_adj(A)`` in ``forward``.

    **Released checkpoints** (``{'state_dict': ...}``, with or without ``module.``) load through
    ``create_model("mlgcn", checkpoint=PATH)``: :meth:`remap_checkpoint_keys` renames ``A`` to
    ``correlation``; they carry no word vectors (the released code passes them as an input), so
    ``word_embeddings`` come from ``label_embeddings`` — by default the packaged GloVe vectors it uses.

    **Pooling.** The released code pools with ``nn.MaxPool2d(14, 14)``. At 448 px, the size its
    checkpoints were trained and evaluated at, the ResNet map is 14×14 and that is exactly global max
    pooling, which this model computes at every size. At other sizes the released layer is a quirk
    rather than a design: below 448 px it fails (map smaller than the window), from 480 to 864 px it
    pools only the top-left 14×14 block, from 896 px it gives several windows and the product with
    the classifiers fails.

    Eval: ``model(images) -> [B, C]`` probabilities. Train: ``[B, C]`` logits for :meth:`loss`.
    """

    def __init__(
        self,
        *,
        label_embeddings: torch.Tensor | np.ndarray | str | os.PathLike | None = None,
        adjacency: torch.Tensor | np.ndarray | str | os.PathLike | None = None,
        **kw,
    ) -> None:
        super().__init__(**kw)
        correlation = require_positive_row_sums(
            adjacency_matrix(adjacency, self.num_classes, mlgcn_correlation),
            "ML-GCN normalises by the row sums (the released gen_A adds the identity)",
        )
        self.register_buffer("word_embeddings", label_embedding_matrix(label_embeddings, self.num_classes))
        self.register_buffer("correlation", correlation)
        self.gc1 = GraphConvolution(WORD_EMBEDDING_DIM, 1024)
        self.gc2 = GraphConvolution(1024, self.spec.out_channels)

    def remap_checkpoint_keys(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A released checkpoint (it has ``A``) in this model's layout: ``A`` → ``correlation``, and
        this model's ``word_embeddings`` added. Other state dicts are returned unchanged."""
        if RELEASED_CORRELATION_KEY not in state_dict:
            return state_dict
        state = {k: v for k, v in state_dict.items() if k != RELEASED_CORRELATION_KEY}
        state["correlation"] = state_dict[RELEASED_CORRELATION_KEY]
        state.setdefault("word_embeddings", self.word_embeddings.clone())
        return state

    def classifiers(self) -> torch.Tensor:
        """``[C, D]``: the graph-generated per-class classifiers (eq. 2–4)."""
        propagation = mlgcn_propagation(self.correlation)
        hidden = F.leaky_relu(self.gc1(self.word_embeddings, propagation), LEAKY_SLOPE)
        return self.gc2(hidden, propagation)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, C]`` logits (no input checks)."""
        pooled = F.adaptive_max_pool2d(self.features(images), 1).flatten(1)
        return pooled @ self.classifiers().T
