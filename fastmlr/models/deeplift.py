"""Deep-LIFT — Deep Label-Specific Feature Learning for Image Annotation (Li et al.).

fastmlr computes the network of the authors' released code (yidaiqiushen/Deep-LIFT, ``models.py``,
``GCNResnet``), so that its checkpoints load (:meth:`DeepLIFT.remap_checkpoint_keys`) and give its
probabilities. It differs from the network the paper describes (an AGCN with an MLP pair scorer or
an RGCN, a channel attention module, a ``2C → 2C → C`` head); the released one is:

1. Label features: the ``C`` word vectors, normalised by a BatchNorm without affine parameters, go
   through two attention graph layers ``300 → 1024 → D`` (:class:`AttentionGraphConv`, each
   ``ReLU([X ‖ G X] W + b)``, ``G`` the :class:`AttentionAggregator`), then ``L = X₂ W_lift``
   (``W_lift`` ``D×D``). ``L`` does not depend on the image.
2. LIFT map ``A = L Fᵀ`` (``[C, HW]`` per image, eq. 5) over the backbone map ``F``.
3. Scores: ``MLP(avg_xy A + max_xy A)`` with ``MLP = Linear(C, C) → LeakyReLU(0.2) → Linear(C, C)``.
   The map, the average and the maximum run in one pass (:func:`fastmlr.kernels.lift_attention_pool`
   without its channel attention), never forming ``A``.

Quirks of the released code, reproduced or accounted for:

- The channel attention (eq. 6–7) is commented out ("Optional") in the released forward, so its
  ``mlp_1`` never runs: the checkpoints were trained without it, and fastmlr has none.
- The aggregator's ``weight`` parameter (``2·in``) is never read; dropped on load.
- The adjacency ``A`` is a parameter initialised to ones, but the forward reads it through
  ``gen_adj(A).detach()`` and only its sign (the attention mask ``gen_adj(A) > 0``), so it never
  receives a gradient: checkpoints hold the ones it started with. fastmlr keeps it as the buffer
  ``adjacency``.
- A ``LeakyReLU(0.2)`` follows the second graph layer's ReLU: the identity on its non-negative
  output, so it is not applied.
- The released forward reshapes the LIFT map to 14×14 and max-pools with a 14×14 window: it runs
  only at 448 px, where this is the global maximum, which fastmlr computes at every size.
- The released code feeds the word vectors once per image (``[B, C, 300]``) and runs the graph
  layers per image; they do not depend on the image, so fastmlr runs them once. In training the
  embedding BatchNorm then normalises the same way but updates its running variance with the
  unbiased factor of ``C`` rows instead of ``B·C``.
- The repository's COCO script imports a ``models2`` module it does not publish; this is the
  ``models.py`` network, the one its VOC script trains.

Parameters at ResNet-101, C = 80: 51,521,854 (backbone 42,500,160). The released state dict holds
51,543,862 (51.544 M; the paper states 51.51 M): the 22,008 more are ``mlp_1`` (12,960), the
aggregators' unused ``weight`` (2,648) and ``A`` (6,400).
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
    LEAKY_SLOPE,
    WORD_EMBEDDING_DIM,
    adjacency_matrix,
    label_embedding_matrix,
    mlgcn_propagation,
    require_positive_row_sums,
)
from fastmlr.models.base import LogitModel
from fastmlr.registry import register_model

GRAPH_HIDDEN = 1024
#: The released aggregator's fill for masked attention logits (a finite value, not -inf: a row
#: without neighbours gets a uniform softmax rather than NaN).
MASKED_LOGIT = -9e15

#: Released Deep-LIFT parameter names -> fastmlr's (:func:`fastmlr.checkpoint.rename_keys`: an entry
#: ending in "." renames a prefix, any other one key). ``gc*.weight`` is transposed, the 1×1 Conv1d
#: weights ``gc*.agg.f*.weight`` squeezed, ``mlp_1.*`` and ``gc*.agg.weight`` dropped (never used by
#: the released forward).
RELEASED_KEY_MAP: dict[str, str] = {
    "bn0.": "embedding_norm.",
    "gc1.agg.f1.": "graph_layers.0.aggregator.score_node.",
    "gc1.agg.f2.": "graph_layers.0.aggregator.score_neighbour.",
    "gc1.agg.prelu.": "graph_layers.0.aggregator.prelu.",
    "gc1.bias": "graph_layers.0.linear.bias",
    "gc1.weight": "graph_layers.0.linear.weight",
    "gc2.agg.f1.": "graph_layers.1.aggregator.score_node.",
    "gc2.agg.f2.": "graph_layers.1.aggregator.score_neighbour.",
    "gc2.agg.prelu.": "graph_layers.1.aggregator.prelu.",
    "gc2.bias": "graph_layers.1.linear.bias",
    "gc2.weight": "graph_layers.1.linear.weight",
    "W": "lift_weight",
    "A": "adjacency",
    "mlp_2.1.": "classifier.0.",
    "mlp_2.3.": "classifier.2.",
}
RELEASED_UNUSED_PREFIXES = ("mlp_1.", "gc1.agg.weight", "gc2.agg.weight")


class AttentionAggregator(nn.Module):
    """The released ``AttentionAggregator``: ``G X`` with ``G[i, j] = softmax_j(e[i, j])`` over the
    neighbours, ``e[i, j] = PReLU(s(x_i) + t(x_j))`` where ``mask[i, j]``, else :data:`MASKED_LOGIT`;
    ``s`` and ``t`` are linear scores ``in → 1`` (the released 1×1 ``Conv1d``s ``f1``, ``f2``)."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.score_node = nn.Linear(in_features, 1)
        self.score_neighbour = nn.Linear(in_features, 1)
        self.prelu = nn.PReLU(1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x [C, in]``, boolean ``mask [C, C]`` → ``[C, in]``."""
        logits = self.score_node(x) + self.score_neighbour(x).T  # [C, 1] + [1, C]
        attention = torch.where(mask, self.prelu(logits), MASKED_LOGIT)
        return torch.softmax(attention, dim=1) @ x


class AttentionGraphConv(nn.Module):
    """The released ``GraphConv``: ``Y = ReLU([X ‖ G X] W + b)``, ``W`` ``(2·in) × out`` (Xavier-uniform,
    bias 0 at initialisation), ``G X`` from :class:`AttentionAggregator`."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.aggregator = AttentionAggregator(in_features)
        self.linear = nn.Linear(2 * in_features, out_features)
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.relu(self.linear(torch.cat([x, self.aggregator(x, mask)], dim=1)))


@register_model("deeplift")
class DeepLIFT(LogitModel):
    """Deep-LIFT as released. Options:

    - ``label_embeddings``: ``"coco"`` / ``"voc"`` (the GloVe vectors the released code feeds), a
      ``[C, 300]`` tensor/ndarray or ``.npy`` path, ``"random"`` for seeded stand-ins; ``None`` = the
      packaged vectors for 80 or 20 classes (:func:`fastmlr.graph.label_embedding_matrix`);
    - ``adjacency``: the matrix whose ``gen_adj`` sign masks the aggregators' attention (neighbours
      ``j`` of ``i`` where ``gen_adj(A)[i, j] > 0``, i.e. ``A[j, i] > 0``). ``None`` = all ones, the
      released matrix (every class attends to every class); otherwise ``"coco"`` / ``"voc"``
      (:func:`fastmlr.graph.mlgcn_correlation` of the packaged statistics) or a ``[C, C]``
      non-negative tensor/ndarray or ``.npy`` path with positive row sums.

    Eval: ``model(images) -> [B, C]`` probabilities. Train: ``[B, C]`` logits for :meth:`loss`.

    **Released checkpoints** (``{'state_dict': ...}``, with or without ``module.``) load through
    ``create_model("deeplift", checkpoint=PATH)`` (:meth:`remap_checkpoint_keys`); they carry no word
    vectors (the released code feeds them as an input), so ``word_embeddings`` come from
    ``label_embeddings`` — by default the packaged GloVe vectors it feeds.
    """

    def __init__(
        self,
        *,
        label_embeddings: torch.Tensor | np.ndarray | str | os.PathLike | None = None,
        adjacency: torch.Tensor | np.ndarray | str | os.PathLike | None = None,
        **kw,
    ) -> None:
        super().__init__(**kw)
        C, D = self.num_classes, self.spec.out_channels
        self.register_buffer("word_embeddings", label_embedding_matrix(label_embeddings, C))
        if adjacency is None:
            matrix = torch.ones(C, C)  # the released initialisation, never updated
        else:
            matrix = require_positive_row_sums(
                adjacency_matrix(adjacency, C), "Deep-LIFT normalises by the row sums"
            )
        self.register_buffer("adjacency", matrix)
        self.embedding_norm = nn.BatchNorm1d(WORD_EMBEDDING_DIM, affine=False)
        self.graph_layers = nn.ModuleList(
            [AttentionGraphConv(WORD_EMBEDDING_DIM, GRAPH_HIDDEN), AttentionGraphConv(GRAPH_HIDDEN, D)]
        )
        self.lift_weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(D, D), gain=1.414))
        self.classifier = nn.Sequential(nn.Linear(C, C), nn.LeakyReLU(LEAKY_SLOPE), nn.Linear(C, C))

    def label_features(self) -> torch.Tensor:
        """``L [C, D]``: the graph-embedded word vectors times ``W_lift``."""
        mask = mlgcn_propagation(self.adjacency) > 0  # the released gen_adj(A) > 0
        x = self.embedding_norm(self.word_embeddings)
        for layer in self.graph_layers:
            x = layer(x, mask)
        return x @ self.lift_weight

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, C]`` logits (no input checks)."""
        tokens = self.features(images).flatten(2).transpose(1, 2)  # F as [B, HW, D]
        pooled = kernels.lift_attention_pool(self.label_features()[None], tokens)  # [avg ‖ max]
        C = self.num_classes
        return self.classifier(pooled[:, :C] + pooled[:, C:])

    def remap_checkpoint_keys(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A released Deep-LIFT state dict (it has ``gc1.agg.f1.weight``) in fastmlr's layout:
        :data:`RELEASED_KEY_MAP`, ``gc*.weight`` transposed to ``[out, 2·in]``, the 1×1 Conv1d
        scores' ``[1, in, 1]`` weights squeezed to ``[1, in]``, the unused ``mlp_1.*`` and
        ``gc*.agg.weight`` dropped, and this model's word vectors added. Any other state dict is
        returned unchanged."""
        if "gc1.agg.f1.weight" not in state_dict:
            return state_dict
        state = {}
        for key, value in state_dict.items():
            if key.startswith(RELEASED_UNUSED_PREFIXES):
                continue
            if key in ("gc1.weight", "gc2.weight"):
                value = value.T.contiguous()
            elif key.startswith(("gc1.agg.f", "gc2.agg.f")) and key.endswith(".weight"):
                value = value.squeeze(-1)
            state[key] = value
        return {**rename_keys(state, RELEASED_KEY_MAP), "word_embeddings": self.word_embeddings.clone()}
