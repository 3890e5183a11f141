"""Label graphs: word-embedding inputs, co-occurrence adjacency, and the graph layers of the zoo.

Label-graph models (SRDL, Deep-LIFT, ML-GCN, SSGRL) start from one 300-d word embedding per class
(GloVe in the papers) and, for Deep-LIFT, ML-GCN and SSGRL, an adjacency built from the training
labels. No GloVe file ships offline, so :func:`label_embedding_matrix` falls back to a seeded random
matrix; :func:`cooccurrence_adjacency` builds the adjacency from a 0/1 label matrix.

Layers (``X`` is ``[C, d]``, one row per class):

- :class:`GraphConvolution` — ``Â X W`` (Kipf & Welling; ML-GCN's ``GraphConvolution``);
- :class:`LearnedAdjacencyGraph` — SRDL eq. 3, ``A' = LeakyReLU(V̂ A W)`` with a learnable ``V``;
- :class:`AttentionGraphLayer` — Deep-LIFT's AGCN layer (eq. 3), ``LeakyReLU([X ‖ G X] W)``;
- :class:`ResidualGCN` — Deep-LIFT's RGCN (eq. 4);
- :class:`GatedGraphNetwork` — the GGNN of SSGRL;
- :class:`ClassWiseLinear` — one linear scorer per class node, ``[B, C, d] → [B, C]``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastmlr.checks import check_threshold

WORD_EMBEDDING_DIM = 300
#: Seed of the stand-in word embeddings used when no ``label_embeddings`` are given.
DEFAULT_EMBEDDING_SEED = 0
LEAKY_SLOPE = 0.2


def _as_float_matrix(value: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """``value`` as a float32 CPU tensor; ``ValueError`` unless it is a finite 2-D numeric array."""
    if isinstance(value, np.ndarray):
        if not np.issubdtype(value.dtype, np.number) and value.dtype != np.bool_:
            raise ValueError(f"{name} must be numeric, got dtype {value.dtype}")
        value = torch.from_numpy(np.asarray(value, dtype=np.float32))
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or a numpy array, got {type(value).__name__}")
    if value.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(value.shape)}")
    value = value.detach().to("cpu", torch.float32)
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return value


def label_embedding_matrix(
    embeddings: torch.Tensor | np.ndarray | str | os.PathLike | None,
    num_classes: int,
    seed: int = DEFAULT_EMBEDDING_SEED,
) -> torch.Tensor:
    """The ``[C, 300]`` float32 word-embedding matrix the label graphs start from.

    ``embeddings`` is a ``[C, 300]`` tensor or ndarray, or the path of a ``.npy`` file holding one
    (e.g. GloVe vectors, one row per class in class order). When it is ``None`` the result is a
    stand-in: ``torch.randn(C, 300)`` drawn from a generator seeded with ``seed`` — the same matrix
    for every model built with the same ``C``, but carrying no semantics (load real embeddings for
    training). Wrong shapes raise ``ValueError`` naming them; a missing file ``FileNotFoundError``.
    """
    if embeddings is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(num_classes, WORD_EMBEDDING_DIM, generator=generator)
    if isinstance(embeddings, (str, os.PathLike)):
        path = os.fspath(embeddings)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"label embedding file not found: {path}")
        try:
            embeddings = np.load(path, allow_pickle=False)
        except Exception as err:  # noqa: BLE001 - report any unreadable file with its name
            raise ValueError(f"cannot read label embedding file {path}: {err}") from err
    matrix = _as_float_matrix(embeddings, "label_embeddings")
    if tuple(matrix.shape) != (num_classes, WORD_EMBEDDING_DIM):
        raise ValueError(
            f"label_embeddings must have shape ({num_classes}, {WORD_EMBEDDING_DIM}) "
            f"(num_classes x word dim), got {tuple(matrix.shape)}"
        )
    return matrix


def adjacency_matrix(adjacency: torch.Tensor | np.ndarray | None, num_classes: int) -> torch.Tensor:
    """The ``[C, C]`` float32 adjacency a model uses: ``adjacency`` checked, or the identity when
    ``None``. Non-square matrices, a size other than ``num_classes`` and negative entries raise
    ``ValueError`` naming the shape."""
    if adjacency is None:
        return torch.eye(num_classes)
    matrix = _as_float_matrix(adjacency, "adjacency")
    if matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"adjacency must be square, got shape {tuple(matrix.shape)}")
    if matrix.shape[0] != num_classes:
        raise ValueError(
            f"adjacency is {tuple(matrix.shape)} but the model has num_classes = {num_classes}"
        )
    if (matrix < 0).any():
        raise ValueError("adjacency must be non-negative")
    return matrix


def cooccurrence_adjacency(labels: torch.Tensor | np.ndarray, tau: float = 0.5) -> torch.Tensor:
    """ML-GCN's label adjacency from a 0/1 label matrix ``[N_images, C]``, as its released
    ``gen_A`` / ``gen_adj`` build it (binary variant):

    1. ``P[i, j] = n_ij / n_i`` for ``i ≠ j``: the conditional probability P(j | i) that class ``j``
       is present when ``i`` is (``n_ij`` images hold both, ``n_i`` hold ``i``; 0 when ``n_i = 0``);
    2. binarise: ``A[i, j] = 1`` where ``P[i, j] >= tau``, else 0;
    3. self-loops: ``A[i, i] = 1``;
    4. symmetric normalisation with the row degrees ``d_i = Σ_j A[i, j]``:
       ``Â = D^{-1/2} Aᵀ D^{-1/2}``, i.e. ``Â[i, j] = A[j, i] / sqrt(d_i d_j)`` — row ``i`` of
       ``Â X`` gathers the classes ``j`` whose presence implies ``i`` (P(i | j) >= tau).

    Returns a float32 ``[C, C]`` tensor. ``labels`` must be 2-D with 0/1 entries; ``tau`` in (0, 1).
    """
    tau = check_threshold(tau, "tau")
    matrix = _as_float_matrix(labels, "labels")
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"labels must be a non-empty [N_images, C] matrix, got {tuple(matrix.shape)}")
    if not ((matrix == 0) | (matrix == 1)).all():
        raise ValueError("labels must hold only 0 and 1")
    matrix = matrix.double()
    counts = matrix.T @ matrix  # n_ij; the diagonal is n_i
    occurrences = counts.diagonal().clone()
    conditional = counts / occurrences.clamp(min=1)[:, None]
    conditional.fill_diagonal_(0)
    binary = (conditional >= tau).double()
    binary.fill_diagonal_(1)
    inv_sqrt_degree = binary.sum(1).rsqrt()
    return (inv_sqrt_degree[:, None] * binary.T * inv_sqrt_degree[None, :]).float()


class GraphConvolution(nn.Module):
    """One graph convolution ``Y = Â X W`` (no activation; no bias by default). Initialised as
    ML-GCN's released ``GraphConvolution``: uniform in ``±1/sqrt(out_features)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        bound = out_features**-0.5
        for param in self.linear.parameters():
            nn.init.uniform_(param, -bound, bound)

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        """``x [C, in]``, ``adjacency [C, C]`` (normalised) → ``[C, out]``."""
        return adjacency @ self.linear(x)


class LearnedAdjacencyGraph(nn.Module):
    """SRDL's label graph (eq. 3): ``A^{l+1} = LeakyReLU_0.2(V̂ A^l W^l)`` for every width step in
    ``widths`` (models.md: 300→300→300), with one learnable ``V ∈ R^{C×C}`` (random init) shared by
    the layers and ``V̂ = softmax(V)`` over each row. Input ``[C, widths[0]]`` → ``[C, widths[-1]]``."""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (300, 300, 300)) -> None:
        super().__init__()
        self.relation = nn.Parameter(torch.randn(num_classes, num_classes) * 0.01)
        self.weights = nn.ModuleList(
            nn.Linear(w_in, w_out, bias=False) for w_in, w_out in zip(widths[:-1], widths[1:], strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalised = torch.softmax(self.relation, dim=1)  # V̂
        for weight in self.weights:
            x = F.leaky_relu(normalised @ weight(x), LEAKY_SLOPE)  # eq. 3
        return x


class AttentionGraphLayer(nn.Module):
    """Deep-LIFT's AGCN layer (eq. 3): ``Y = LeakyReLU_0.2([X ‖ G X] W)``.

    ``G = g(X, A)``: a two-layer MLP scores every pair ``(i, j)`` from ``[x_i ‖ x_j]`` (hidden width
    ``2·in``, LeakyReLU 0.2), the scores are masked to the adjacency's non-zero entries and
    soft-maxed over ``j`` — so each row of ``G`` sums to 1 (Σ_j |G_ij| = 1). The MLP's first layer
    on the concatenation is split as ``U x_i + U' x_j`` so the pair tensor is only ``[C, C, hidden]``.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        hidden = 2 * in_features
        self.score_hidden = nn.Linear(2 * in_features, hidden)
        self.score_out = nn.Linear(hidden, 1)
        self.linear = nn.Linear(2 * in_features, out_features)

    def aggregation(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        """``G [C, C]``: row-softmax of the pair scores over the neighbours ``adjacency[i, j] > 0``."""
        d = x.shape[1]
        w_i, w_j = self.score_hidden.weight[:, :d], self.score_hidden.weight[:, d:]
        hidden = (x @ w_i.T)[:, None, :] + (x @ w_j.T)[None, :, :] + self.score_hidden.bias
        scores = self.score_out(F.leaky_relu(hidden, LEAKY_SLOPE)).squeeze(-1)
        scores = scores.masked_fill(adjacency <= 0, float("-inf"))
        return torch.softmax(scores, dim=1)

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        gathered = self.aggregation(x, adjacency) @ x
        return F.leaky_relu(self.linear(torch.cat([x, gathered], dim=1)), LEAKY_SLOPE)


class ResidualGCN(nn.Module):
    """Deep-LIFT's RGCN: graph convolutions ``300→512→1024→1024→1024→out`` (each
    ``LeakyReLU_0.2(Â X W)``), the two equal-width 1024 layers forming one residual block (eq. 4):
    ``G_{l+2} = LeakyReLU(F(G_l) + G_l)``, ``F`` the two graph convolutions."""

    def __init__(self, in_features: int = WORD_EMBEDDING_DIM, out_features: int = 2048) -> None:
        super().__init__()
        self.stem = nn.ModuleList([GraphConvolution(in_features, 512), GraphConvolution(512, 1024)])
        self.block = nn.ModuleList([GraphConvolution(1024, 1024), GraphConvolution(1024, 1024)])
        self.head = GraphConvolution(1024, out_features)

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        for layer in self.stem:
            x = F.leaky_relu(layer(x, adjacency), LEAKY_SLOPE)
        residual = F.leaky_relu(self.block[0](x, adjacency), LEAKY_SLOPE)
        x = F.leaky_relu(self.block[1](residual, adjacency) + x, LEAKY_SLOPE)  # eq. 4
        return F.leaky_relu(self.head(x, adjacency), LEAKY_SLOPE)


class GatedGraphNetwork(nn.Module):
    """The gated graph neural network of SSGRL (Li et al.'s GGNN), ``steps`` propagation steps over
    the ``C`` class nodes of width ``dim``. With ``A_in = adjacency``, ``A_out = adjacencyᵀ``, per step:

    ``a = [A_in h ‖ A_out h]``, ``z = σ(W_z a + U_z h)``, ``r = σ(W_r a + U_r h)``,
    ``h̃ = tanh(W a + U (r ⊙ h))``, ``h ← (1 − z) ⊙ h + z ⊙ h̃``.

    Input and output ``[B, C, dim]``.
    """

    def __init__(self, dim: int, steps: int = 3) -> None:
        super().__init__()
        self.steps = steps
        self.update_a, self.update_h = nn.Linear(2 * dim, dim), nn.Linear(dim, dim)
        self.reset_a, self.reset_h = nn.Linear(2 * dim, dim), nn.Linear(dim, dim)
        self.candidate_a, self.candidate_h = nn.Linear(2 * dim, dim), nn.Linear(dim, dim)

    def forward(self, nodes: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        for _ in range(self.steps):
            messages = torch.cat([adjacency @ nodes, adjacency.T @ nodes], dim=-1)
            update = torch.sigmoid(self.update_a(messages) + self.update_h(nodes))
            reset = torch.sigmoid(self.reset_a(messages) + self.reset_h(nodes))
            candidate = torch.tanh(self.candidate_a(messages) + self.candidate_h(reset * nodes))
            nodes = (1 - update) * nodes + update * candidate
        return nodes


class ClassWiseLinear(nn.Module):
    """One weight vector per class: ``logit[b, c] = w_c · x[b, c] + b_c``, ``[B, C, d] → [B, C]``
    (SRDL's ``φ``, LCE's ``f_fc`` on label tokens, SSGRL's per-class classifiers)."""

    def __init__(self, num_classes: int, in_features: int) -> None:
        super().__init__()
        bound = in_features**-0.5
        self.weight = nn.Parameter(torch.empty(num_classes, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_classes).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.weight).sum(-1) + self.bias
