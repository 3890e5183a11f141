"""SSGRL — Learning Semantic-Specific Graph Representation for Multi-Label Image Recognition
(Chen et al., ICCV 2019), the "SSGRL" peer of SRDL's Tables 1–4 and its inference-time Table 3.

fastmlr computes the function of the authors' released code (HCPLab-SYSU/SSGRL), so that its
checkpoints load (:meth:`SSGRL.remap_checkpoint_keys`) and give its probabilities:

1. Backbone: the stride-32 map, then a 2×2 average pooling with stride 2 (the released ResNet ends
   with ``AvgPool2d(2, 2)`` after layer4: 7×7 at 448, 9×9 at the released 576 test crop; an odd
   side drops its last row/column, as ``AvgPool2d`` does).
2. Semantic decoupling: for every class ``c``, attention logits ``f_a(tanh(f_1(F_xy) ⊙ f_2(x_c)))``
   over the positions (``x_c`` the class word vector; widths D → 1024, 300 → 1024, 1024 → 1),
   soft-maxed over positions, pool the map into ``f_c = Σ_xy a_c,xy F_xy``
   (:func:`fastmlr.kernels.tanh_attention_scores` then :func:`fastmlr.kernels.softmax_attention_pool`,
   never forming ``B×C×HW×D``). The released code applies one more linear layer ``fc_3``
   (1024 → 1024) between the tanh and ``fc_a``; with no activation between them the two compose
   into one affine map, so a released checkpoint's ``fc_a ∘ fc_3`` is folded into ``f_a`` on load.
3. A gated graph network (:class:`SSGRLGatedGraph`, 3 steps) propagates the ``C`` class features
   over the label graph.
4. Output ``tanh(Linear([h_c ‖ f_c]))`` (2D → D), scored by one linear classifier per class.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastmlr import kernels
from fastmlr.checkpoint import rename_keys
from fastmlr.graph import (
    WORD_EMBEDDING_DIM,
    ClassWiseLinear,
    adjacency_matrix,
    conditional_probability,
    label_embedding_matrix,
)
from fastmlr.models.base import LogitModel
from fastmlr.registry import register_model

ATTENTION_DIM = 1024

#: Released SSGRL parameter names -> fastmlr's (prefixes, :func:`fastmlr.checkpoint.rename_keys`).
#: ``word_semantic.fc_3`` and ``word_semantic.fc_a`` fold into ``f_a``; ``graph_net.fc_eq4_u`` is
#: never used by the released forward and is dropped (see :class:`SSGRLGatedGraph`).
RELEASED_KEY_MAP: dict[str, str] = {
    "resnet_101.conv1.": "features.0.",
    "resnet_101.bn1.": "features.1.",
    "resnet_101.layer1.": "features.4.",
    "resnet_101.layer2.": "features.5.",
    "resnet_101.layer3.": "features.6.",
    "resnet_101.layer4.": "features.7.",
    "word_semantic.fc_1.": "f_1.",
    "word_semantic.fc_2.": "f_2.",
    "graph_net.fc_eq3_w.": "ggnn.update_a.",
    "graph_net.fc_eq3_u.": "ggnn.update_h.",
    "graph_net.fc_eq4_w.": "ggnn.reset_a.",
    "graph_net.fc_eq5_w.": "ggnn.candidate_a.",
    "graph_net.fc_eq5_u.": "ggnn.candidate_h.",
    "fc_output.": "output.",
    "classifiers.": "classifier.",
}
RELEASED_UNUSED_KEYS = ("graph_net.fc_eq4_u.weight", "graph_net.fc_eq4_u.bias")


class SSGRLGatedGraph(nn.Module):
    """SSGRL's gated graph network as its released code computes it: ``steps`` propagation steps
    over the ``C`` class nodes of width ``dim``, with ``A_in = adjacency``, ``A_out = adjacencyᵀ``:

    ``a = [A_in h ‖ A_out h]``, ``z = σ(W_z a + U_z h)``, ``r = σ(W_r a + U_z h)``,
    ``h̃ = tanh(W a + U (r ⊙ h))``, ``h ← (1 − z) ⊙ h + z ⊙ h̃``.

    The reset gate ``r`` reuses the update gate's ``U_z`` (``fc_eq3_u`` in the released
    ``ggnn.py``): the released checkpoints were trained with that function, so it is the one
    computed here, in training too; the released ``fc_eq4_u`` (the GGNN paper's ``U_r``) never
    enters the forward and has no counterpart. Input and output ``[B, C, dim]``.
    """

    def __init__(self, dim: int, steps: int = 3) -> None:
        super().__init__()
        self.steps = steps
        self.update_a, self.update_h = nn.Linear(2 * dim, dim), nn.Linear(dim, dim)
        self.reset_a = nn.Linear(2 * dim, dim)
        self.candidate_a, self.candidate_h = nn.Linear(2 * dim, dim), nn.Linear(dim, dim)

    def forward(self, nodes: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        for _ in range(self.steps):
            messages = torch.cat([adjacency @ nodes, adjacency.T @ nodes], dim=-1)
            recurrent = self.update_h(nodes)  # U_z h: shared by both gates
            update = torch.sigmoid(self.update_a(messages) + recurrent)
            reset = torch.sigmoid(self.reset_a(messages) + recurrent)
            candidate = torch.tanh(self.candidate_a(messages) + self.candidate_h(reset * nodes))
            nodes = (1 - update) * nodes + update * candidate
        return nodes


@register_model("ssgrl")
class SSGRL(LogitModel):
    """SSGRL as released. Options:

    - ``label_embeddings``: the class word vectors (the released ``word_file``): ``"coco"`` /
      ``"voc"`` (the packaged GloVe vectors), a ``[C, 300]`` tensor/ndarray or ``.npy`` path,
      ``"random"`` for seeded stand-ins; ``None`` = the packaged vectors for 80 or 20 classes
      (:func:`fastmlr.graph.label_embedding_matrix`);
    - ``adjacency``: the label graph (the released ``graph_file``): ``"coco"`` / ``"voc"``
      (:func:`fastmlr.graph.conditional_probability` of the packaged statistics, ``P[i, j] = P(j | i)``,
      zero diagonal), or the matrix itself as a ``[C, C]`` non-negative tensor/ndarray or ``.npy``
      path; ``None`` = the packaged graph for 80 or 20 classes, the identity otherwise. It is the
      GGNN's incoming matrix, its transpose the outgoing one, used as given (no normalisation);
    - ``steps``: GGNN time steps (3).

    Eval: ``model(images) -> [B, C]`` probabilities. Train: ``[B, C]`` logits for :meth:`loss`.

    **Released checkpoints** (``{'state_dict': ...}`` of the released ``SSGRL``, with or without
    ``module.``) load through ``create_model("ssgrl", checkpoint=PATH, label_embeddings=...,
    adjacency=...)`` (:meth:`remap_checkpoint_keys`). They hold neither the word vectors nor the
    graph (the released code reads both from ``.npy`` files), so both options must be given: the
    files the checkpoint was trained with, in its class order.
    """

    def __init__(
        self,
        *,
        label_embeddings: torch.Tensor | np.ndarray | str | os.PathLike | None = None,
        adjacency: torch.Tensor | np.ndarray | str | os.PathLike | None = None,
        steps: int = 3,
        **kw,
    ) -> None:
        super().__init__(**kw)
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps}")
        C, D = self.num_classes, self.spec.out_channels
        self.register_buffer("word_embeddings", label_embedding_matrix(label_embeddings, C))
        self.register_buffer("adjacency", adjacency_matrix(adjacency, C, conditional_probability))
        self.graph_given = label_embeddings is not None and adjacency is not None
        self.f_1 = nn.Linear(D, ATTENTION_DIM, bias=False)
        self.f_2 = nn.Linear(WORD_EMBEDDING_DIM, ATTENTION_DIM, bias=False)
        self.f_a = nn.Linear(ATTENTION_DIM, 1)
        self.ggnn = SSGRLGatedGraph(D, int(steps))
        self.output = nn.Linear(2 * D, D)
        self.classifier = ClassWiseLinear(C, D)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, D, ⌊H/64⌋, ⌊W/64⌋]``: the backbone, then the released 2×2 average pool."""
        return F.avg_pool2d(self.features(images), kernel_size=2, stride=2)

    def semantic_decoupling(self, tokens: torch.Tensor) -> torch.Tensor:
        """``F [B, HW, D] -> f [B, C, D]``: ``f_c = Σ_xy softmax_xy(f_a(tanh(f_1(F) ⊙ f_2(x_c)))) F_xy``."""
        scores = kernels.tanh_attention_scores(
            self.f_1(tokens), self.f_2(self.word_embeddings), self.f_a.weight[0], self.f_a.bias
        )
        return kernels.softmax_attention_pool(tokens, scores)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, C]`` logits (no input checks)."""
        tokens = self.feature_map(images).flatten(2).transpose(1, 2)  # F as [B, HW, D]
        semantic = self.semantic_decoupling(tokens)
        propagated = self.ggnn(semantic, self.adjacency)
        return self.classifier(torch.tanh(self.output(torch.cat([propagated, semantic], dim=-1))))

    def remap_checkpoint_keys(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A released SSGRL state dict (keys ``resnet_101.*``, ``word_semantic.*``, ``graph_net.*``,
        ``fc_output.*``, ``classifiers.*``) in fastmlr's layout: :data:`RELEASED_KEY_MAP`, the fold
        ``f_a = fc_a ∘ fc_3`` (weight ``w_a W_3``, bias ``w_a · b_3 + b_a``, computed in float64),
        ``fc_eq4_u`` dropped, and this model's word vectors and graph added (the released
        checkpoint keeps neither). Any other state dict is returned unchanged."""
        if "word_semantic.fc_a.weight" not in state_dict:
            return state_dict
        if not self.graph_given:
            raise ValueError(
                "a released SSGRL checkpoint holds no word vectors or label graph: pass "
                "label_embeddings= and adjacency= (the released word_file and graph_file, .npy)"
            )
        fc_3_w, fc_3_b = state_dict["word_semantic.fc_3.weight"], state_dict["word_semantic.fc_3.bias"]
        fc_a_w, fc_a_b = state_dict["word_semantic.fc_a.weight"], state_dict["word_semantic.fc_a.bias"]
        out = {
            "f_a.weight": (fc_a_w.double() @ fc_3_w.double()).to(fc_a_w.dtype),
            "f_a.bias": (fc_a_w.double() @ fc_3_b.double() + fc_a_b.double()).to(fc_a_b.dtype),
            "word_embeddings": self.word_embeddings.clone(),
            "adjacency": self.adjacency.clone(),
        }
        folded = ("word_semantic.fc_3.", "word_semantic.fc_a.")
        kept = {k: v for k, v in state_dict.items() if k not in RELEASED_UNUSED_KEYS and not k.startswith(folded)}
        return {**rename_keys(kept, RELEASED_KEY_MAP), **out}
