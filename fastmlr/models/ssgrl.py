"""SSGRL — Learning Semantic-Specific Graph Representation for Multi-Label Image Recognition
(Chen et al., ICCV 2019), the "SSGRL" peer of SRDL's Tables 1–4 and its inference-time Table 3.

Semantic decoupling: for every class ``c``, attention logits ``f_a(tanh(f_1(F_xy) ⊙ f_2(x_c)))``
over the positions (``x_c`` the class word embedding, widths D → 1024, 300 → 1024, 1024 → 1),
soft-maxed over positions, pool the backbone map into ``f_c = Σ_xy a_c,xy F_xy``
(:func:`fastmlr.kernels.tanh_attention_scores` then :func:`fastmlr.kernels.softmax_attention_pool`,
never forming ``B×C×HW×D``). A gated graph network (3 steps) propagates the ``C`` class features
over the label graph; as in the released code the output is ``tanh(Linear([h_c ‖ f_c]))`` (2D → D)
scored by one linear classifier per class.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from fastmlr import kernels
from fastmlr.graph import (
    WORD_EMBEDDING_DIM,
    ClassWiseLinear,
    GatedGraphNetwork,
    adjacency_matrix,
    label_embedding_matrix,
)
from fastmlr.models.base import LogitModel
from fastmlr.registry import register_model

ATTENTION_DIM = 1024


@register_model("ssgrl")
class SSGRL(LogitModel):
    """SSGRL with options ``label_embeddings`` (``[C, 300]`` tensor/ndarray or ``.npy`` path; a
    seeded random stand-in when ``None``, see :func:`fastmlr.graph.label_embedding_matrix`),
    ``adjacency`` (``[C, C]`` non-negative: the GGNN's incoming matrix, its transpose the outgoing
    one — e.g. :func:`fastmlr.graph.cooccurrence_adjacency`; the identity when ``None``) and
    ``steps`` (GGNN time steps, 3).

    Eval: ``model(images) -> [B, C]`` probabilities. Train: ``[B, C]`` logits for :meth:`loss`.
    """

    def __init__(
        self,
        *,
        label_embeddings: torch.Tensor | np.ndarray | str | os.PathLike | None = None,
        adjacency: torch.Tensor | np.ndarray | None = None,
        steps: int = 3,
        **kw,
    ) -> None:
        super().__init__(**kw)
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps}")
        C, D = self.num_classes, self.spec.out_channels
        self.register_buffer("word_embeddings", label_embedding_matrix(label_embeddings, C))
        self.register_buffer("adjacency", adjacency_matrix(adjacency, C))
        self.f_1 = nn.Linear(D, ATTENTION_DIM, bias=False)
        self.f_2 = nn.Linear(WORD_EMBEDDING_DIM, ATTENTION_DIM, bias=False)
        self.f_a = nn.Linear(ATTENTION_DIM, 1)
        self.ggnn = GatedGraphNetwork(D, int(steps))
        self.output = nn.Linear(2 * D, D)
        self.classifier = ClassWiseLinear(C, D)

    def semantic_decoupling(self, tokens: torch.Tensor) -> torch.Tensor:
        """``F [B, HW, D] -> f [B, C, D]``: ``f_c = Σ_xy softmax_xy(f_a(tanh(f_1(F) ⊙ f_2(x_c)))) F_xy``."""
        scores = kernels.tanh_attention_scores(
            self.f_1(tokens), self.f_2(self.word_embeddings), self.f_a.weight[0], self.f_a.bias
        )
        return kernels.softmax_attention_pool(tokens, scores)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, C]`` logits (no input checks)."""
        tokens = self.features(images).flatten(2).transpose(1, 2)  # F as [B, HW, D]
        semantic = self.semantic_decoupling(tokens)
        propagated = self.ggnn(semantic, self.adjacency)
        return self.classifier(torch.tanh(self.output(torch.cat([propagated, semantic], dim=-1))))
