"""Label graphs: the class word embeddings and adjacency matrices, and the graph layers of the zoo.

Label-graph models (SRDL, Deep-LIFT, ML-GCN, SSGRL) start from one 300-d word embedding per class and,
for Deep-LIFT, ML-GCN and SSGRL, an adjacency built from training-set label co-occurrence.

**Packaged graphs.** ``fastmlr/assets/label_graphs/`` holds, for ``"coco"`` (80 classes) and ``"voc"``
(20), the inputs the authors' released code trains with (published with ML-GCN): ``{name}_glove300.npy``
(``[C, 300]`` GloVe vectors of the class names), ``{name}_cooccurrence.npy`` (``[C, C]``, ``M[i, j]`` =
training images holding classes ``i`` and ``j``, zero diagonal) and ``{name}_class_counts.npy`` (``[C]``,
training images holding class ``i``). Rows follow the released class order (:mod:`fastmlr.data`: COCO's
names sorted alphabetically, VOC's devkit order).

**Resolving a model's options.** :func:`label_embedding_matrix` and :func:`adjacency_matrix` accept a
packaged graph's name (``"coco"``, ``"voc"``), the path of a ``.npy`` file, a numpy array or a tensor;
``None`` means the packaged graph with ``num_classes`` classes (80: COCO, 20: VOC). Seeded random word
embeddings (no semantics) are given only when asked for by name, ``label_embeddings="random"``.

Layers (``X`` is ``[C, d]``, one row per class):

- :class:`GraphConvolution` — ``Â X W`` (Kipf & Welling; ML-GCN's ``GraphConvolution``);
- :class:`LearnedAdjacencyGraph` — SRDL eq. 3, ``A' = LeakyReLU(V̂ A W)`` with a learnable ``V``;
- :class:`ClassWiseLinear` — one linear scorer per class node, ``[B, C, d] → [B, C]``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastmlr.checks import check_threshold

WORD_EMBEDDING_DIM = 300
#: Class count of each packaged label graph.
PACKAGED_GRAPHS = {"coco": 80, "voc": 20}
#: The name that asks :func:`label_embedding_matrix` for seeded random stand-in embeddings.
RANDOM_EMBEDDINGS = "random"
#: Seed of the random stand-in embeddings.
DEFAULT_EMBEDDING_SEED = 0
#: ML-GCN's binarisation threshold τ. 0.4 is what the released training scripts pass to ``gen_A``
#: (``demo_coco_gcn.py`` and ``demo_voc2007_gcn.py``: ``t=0.4``), so its checkpoints were trained with
#: the matrix it gives; the paper's τ ablation (Fig. 7) also peaks near 0.4.
MLGCN_TAU = 0.4
#: ML-GCN's re-weighting ``p`` (eq. 8 with p = 0.2 in the paper; the released ``gen_A`` hard-codes 0.25).
MLGCN_REWEIGHT = 0.25
LEAKY_SLOPE = 0.2


def _as_float_tensor(value: torch.Tensor | np.ndarray, name: str, dim: int = 2) -> torch.Tensor:
    """``value`` as a float64 CPU tensor (exact for every float32 or integer count input);
    ``ValueError`` unless it is a finite, real, ``dim``-D numeric array."""
    if isinstance(value, np.ndarray):
        if not np.issubdtype(value.dtype, np.number) and value.dtype != np.bool_:
            raise ValueError(f"{name} must be numeric, got dtype {value.dtype}")
        value = torch.from_numpy(np.asarray(value, dtype=np.float64))
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or a numpy array, got {type(value).__name__}")
    if value.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(value.shape)}")
    if value.is_complex():
        raise ValueError(f"{name} must be real, got dtype {value.dtype}")
    value = value.detach().to("cpu", torch.float64)
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return value


def _as_float_matrix(value: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """``value`` as a float32 CPU ``[rows, cols]`` tensor (see :func:`_as_float_tensor`)."""
    return _as_float_tensor(value, name).float()


def _load_npy(path: str | os.PathLike, name: str) -> np.ndarray:
    """The array in the ``.npy`` file ``path`` (no pickles); ``FileNotFoundError`` or ``ValueError``
    naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name} file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - report any unreadable file with its name
        raise ValueError(f"cannot read {name} file {path} (not a .npy array): {err}") from err


def _packaged(name: str, num_classes: int, what: str, names: tuple[str, ...] = ()) -> str:
    """``name`` checked as a packaged graph for a ``num_classes``-class model (``names``: other names
    the option accepts, for the error message)."""
    if name not in PACKAGED_GRAPHS:
        raise ValueError(
            f"unknown {what} {name!r}: give one of {sorted(PACKAGED_GRAPHS) + list(names)}, "
            "a .npy path, an array or a tensor"
        )
    if PACKAGED_GRAPHS[name] != num_classes:
        raise ValueError(
            f"{what} {name!r} has {PACKAGED_GRAPHS[name]} classes but the model has num_classes = {num_classes}"
        )
    return name


def _default_graph(num_classes: int, what: str, explicit: str) -> str:
    """The packaged graph of a ``num_classes``-class model (80: COCO, 20: VOC), for an option left ``None``."""
    for name, count in PACKAGED_GRAPHS.items():
        if count == num_classes:
            return name
    raise ValueError(
        f"no packaged {what} for num_classes = {num_classes} (packaged: "
        + ", ".join(f"{n!r} with {c}" for n, c in PACKAGED_GRAPHS.items())
        + f"); pass {explicit}"
    )


def _is_name(value: object) -> bool:
    """Whether a string option names a graph (``"coco"``, ``"random"``) rather than a file path."""
    return isinstance(value, str) and os.sep not in value and "." not in value


def _asset(filename: str) -> np.ndarray:
    with resources.as_file(resources.files("fastmlr") / "assets" / "label_graphs" / filename) as path:
        return np.load(path, allow_pickle=False)


def packaged_statistics(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The training-label statistics of the packaged graph ``name`` (``"coco"`` or ``"voc"``):
    ``(cooccurrence [C, C], class_counts [C])``, float64, in the released class order."""
    _packaged(name, PACKAGED_GRAPHS.get(name, -1), "label graph")
    return (torch.from_numpy(_asset(f"{name}_cooccurrence.npy")).double(),
            torch.from_numpy(_asset(f"{name}_class_counts.npy")).double())


def cooccurrence_statistics(labels: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics of a 0/1 label matrix ``[N_images, C]``, laid out as the packaged ones:
    ``(cooccurrence [C, C], class_counts [C])`` float64, ``cooccurrence[i, j]`` = images holding both
    ``i`` and ``j`` (zero diagonal), ``class_counts[i]`` = images holding ``i``."""
    matrix = _as_float_tensor(labels, "labels")
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"labels must be a non-empty [N_images, C] matrix, got {tuple(matrix.shape)}")
    if not ((matrix == 0) | (matrix == 1)).all():
        raise ValueError("labels must hold only 0 and 1")
    counts = matrix.T @ matrix
    class_counts = counts.diagonal().clone()
    counts.fill_diagonal_(0)
    return counts, class_counts


def _checked_statistics(cooccurrence, class_counts) -> tuple[torch.Tensor, torch.Tensor]:
    cooccurrence = _as_float_tensor(cooccurrence, "cooccurrence")
    class_counts = _as_float_tensor(class_counts, "class_counts", dim=1)
    C = class_counts.shape[0]
    if tuple(cooccurrence.shape) != (C, C):
        raise ValueError(f"cooccurrence must be [C, C] = [{C}, {C}] for {C} class counts, "
                         f"got {tuple(cooccurrence.shape)}")
    if (cooccurrence < 0).any() or (class_counts < 0).any():
        raise ValueError("cooccurrence and class_counts must be non-negative")
    return cooccurrence, class_counts


def conditional_probability(
    cooccurrence: torch.Tensor | np.ndarray, class_counts: torch.Tensor | np.ndarray
) -> torch.Tensor:
    """``P[i, j] = M[i, j] / n_i`` (float64 ``[C, C]``): the probability that class ``j`` is present
    when class ``i`` is (ML-GCN eq. 6's ``P_ij``; SSGRL's correlation matrix). A class never seen
    (``n_i = 0``) gets a zero row: the released code divides by zero there and gets NaN."""
    cooccurrence, class_counts = _checked_statistics(cooccurrence, class_counts)
    return torch.where(class_counts[:, None] > 0, cooccurrence / class_counts.clamp(min=1)[:, None],
                       torch.zeros((), dtype=torch.float64, device="cpu"))


def mlgcn_correlation(
    cooccurrence: torch.Tensor | np.ndarray,
    class_counts: torch.Tensor | np.ndarray,
    tau: float = MLGCN_TAU,
) -> torch.Tensor:
    """ML-GCN's correlation matrix ``A`` exactly as its released ``gen_A`` builds it (the matrix its
    checkpoints store as the parameter ``A``), float32 ``[C, C]``:

    1. ``P = M / n[:, None]`` (:func:`conditional_probability`);
    2. binarise (eq. 7): ``A = 1`` where ``P >= tau``, else 0 (the diagonal of ``M`` is 0, so 0 there
       for ``tau > 0``);
    3. re-weight each column (eq. 8 as released): ``A[i, j] ← A[i, j] · 0.25 / (Σ_k A[k, j] + 1e-6)``;
    4. add the identity.

    Computed in float64 like the released numpy code, then cast. ``tau`` defaults to
    :data:`MLGCN_TAU` = 0.4, the value the released scripts train with. The model applies
    :func:`mlgcn_propagation` to this matrix at run time.
    """
    tau = check_threshold(tau, "tau")
    binary = (conditional_probability(cooccurrence, class_counts) >= tau).double()
    reweighted = binary * MLGCN_REWEIGHT / (binary.sum(0, keepdim=True) + 1e-6)
    return (reweighted + torch.eye(binary.shape[0], dtype=torch.float64, device="cpu")).float()


def mlgcn_propagation(correlation: torch.Tensor) -> torch.Tensor:
    """The propagation matrix ML-GCN's released ``gen_adj`` derives from its correlation matrix at run
    time: with ``D = diag(Σ_j A[i, j])^{-1/2}`` (row sums), ``Â = (A D)ᵀ D = D Aᵀ D``, i.e.
    ``Â[i, j] = A[j, i] / sqrt(d_i d_j)``. ``correlation`` ``[C, C]`` with positive row sums (every
    :func:`mlgcn_correlation` has them: it includes the identity)."""
    inv_sqrt_degree = correlation.sum(1).rsqrt()
    return inv_sqrt_degree[:, None] * correlation.T * inv_sqrt_degree[None, :]


def require_positive_row_sums(matrix: torch.Tensor, reason: str) -> torch.Tensor:
    """``matrix`` itself, after checking that every row sums to more than 0 (graphs normalised by their
    row sums, eq. ``D^-1/2``, need it); a ``ValueError`` names the empty rows and ``reason``."""
    empty = (matrix.sum(1) <= 0).nonzero()[:, 0].tolist()
    if empty:
        raise ValueError(f"adjacency rows {empty[:8]} sum to 0: {reason}")
    return matrix


def label_embedding_matrix(
    embeddings: torch.Tensor | np.ndarray | str | os.PathLike | None,
    num_classes: int,
    seed: int = DEFAULT_EMBEDDING_SEED,
) -> torch.Tensor:
    """The ``[C, 300]`` float32 word-embedding matrix the label graphs start from.

    ``embeddings`` is one of:

    - ``"coco"`` / ``"voc"``: the packaged GloVe vectors of the class names (released class order);
    - ``None``: the packaged vectors with ``num_classes`` classes (80: COCO, 20: VOC); for any other
      class count a ``ValueError`` asks for them explicitly;
    - ``"random"``: a stand-in without semantics, ``torch.randn(C, 300)`` from a generator seeded with
      ``seed`` (the same matrix for every model with the same ``C``);
    - a ``[C, 300]`` tensor or ndarray, or the path of a ``.npy`` file holding one (one row per class,
      in the model's class order).

    Wrong shapes, non-finite values and unknown names raise ``ValueError`` naming them; a missing file
    ``FileNotFoundError``.
    """
    if embeddings is None:
        embeddings = _default_graph(num_classes, "word embeddings",
                                    f"label_embeddings (a [{num_classes}, 300] array, a .npy path, or "
                                    f"{RANDOM_EMBEDDINGS!r} for seeded random stand-ins)")
    if _is_name(embeddings):
        if embeddings == RANDOM_EMBEDDINGS:
            generator = torch.Generator().manual_seed(seed)
            return torch.randn(num_classes, WORD_EMBEDDING_DIM, generator=generator, device="cpu")
        name = _packaged(embeddings, num_classes, "label_embeddings", (RANDOM_EMBEDDINGS,))
        embeddings = _asset(f"{name}_glove300.npy")
    elif isinstance(embeddings, (str, os.PathLike)):
        embeddings = _load_npy(embeddings, "label embedding")
    matrix = _as_float_matrix(embeddings, "label_embeddings")
    if tuple(matrix.shape) != (num_classes, WORD_EMBEDDING_DIM):
        raise ValueError(
            f"label_embeddings must have shape ({num_classes}, {WORD_EMBEDDING_DIM}) "
            f"(num_classes x word dim), got {tuple(matrix.shape)}"
        )
    return matrix


StatisticsGraph = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def adjacency_matrix(
    adjacency: torch.Tensor | np.ndarray | str | os.PathLike | None,
    num_classes: int,
    from_statistics: StatisticsGraph = mlgcn_correlation,
) -> torch.Tensor:
    """The ``[C, C]`` float32 adjacency a model stores, from ``adjacency``:

    - ``"coco"`` / ``"voc"``: ``from_statistics(cooccurrence, class_counts)`` of the packaged
      statistics — the model's own construction (ML-GCN: :func:`mlgcn_correlation`, τ = 0.4);
    - ``None``: the packaged graph with ``num_classes`` classes (80: COCO, 20: VOC); for any other
      class count the identity (no label relations);
    - a ``[C, C]`` tensor or ndarray, or the path of a ``.npy`` file holding one: used as given.

    Non-square matrices, a size other than ``num_classes``, negative or non-finite entries and unknown
    names raise ``ValueError``; a missing file ``FileNotFoundError``.
    """
    if adjacency is None:
        if num_classes not in PACKAGED_GRAPHS.values():
            return torch.eye(num_classes, device="cpu")
        adjacency = _default_graph(num_classes, "label graph", "")
    if _is_name(adjacency):
        adjacency = from_statistics(*packaged_statistics(_packaged(adjacency, num_classes, "adjacency")))
    elif isinstance(adjacency, (str, os.PathLike)):
        adjacency = _load_npy(adjacency, "adjacency")
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


class GraphConvolution(nn.Module):
    """One graph convolution ``Y = Â (X W)`` (no activation, no bias), ``weight`` ``[in, out]`` laid out
    and initialised as ML-GCN's released ``GraphConvolution`` (uniform in ``±1/sqrt(out_features)``),
    so a released checkpoint's ``gc*.weight`` loads unchanged."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        bound = out_features**-0.5
        self.weight = nn.Parameter(torch.empty(in_features, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        """``x [C, in]``, ``adjacency [C, C]`` (normalised) → ``[C, out]``."""
        return adjacency @ (x @ self.weight)


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
