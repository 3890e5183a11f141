"""Label graphs: packaged statistics, ML-GCN correlation, word embeddings, and the graph layers of the zoo."""


import numpy as np
import pytest
import torch

from fastmlr.data import class_names
from fastmlr.graph import (
    PACKAGED_GRAPHS,
    ClassWiseLinear,
    GraphConvolution,
    LearnedAdjacencyGraph,
    adjacency_matrix,
    conditional_probability,
    cooccurrence_statistics,
    label_embedding_matrix,
    mlgcn_correlation,
    mlgcn_propagation,
    packaged_statistics,
)

# 4 images, 3 classes: n = (3, 3, 1); n_01 = 2, n_02 = 1, n_12 = 1.
LABELS = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 0]])
# Its ML-GCN correlation at tau = 0.4: P(j|i) rows (-, 2/3, 1/3), (2/3, -, 1/3), (1, 1, -) binarise to
# (0,1,0), (1,0,0), (1,1,0); column sums (2, 2, 0) re-weight the ones to q = 0.25 / (2 + 1e-6); + I.
Q = 0.25 / (2 + 1e-6)
CORRELATION = torch.tensor([[1, Q, 0], [Q, 1, 0], [Q, Q, 1]])


def test_cooccurrence_statistics():
    cooccurrence, counts = cooccurrence_statistics(LABELS.numpy().astype(bool))
    assert cooccurrence.tolist() == [[0, 2, 1], [2, 0, 1], [1, 1, 0]] and counts.tolist() == [3, 3, 1]


def test_mlgcn_correlation_and_propagation_hand_computed():
    correlation = mlgcn_correlation(*cooccurrence_statistics(LABELS))
    torch.testing.assert_close(correlation, CORRELATION)
    # tau 0.3 also keeps P(2|0) = P(2|1) = 1/3: column 2 sums to 2 as well.
    wider = mlgcn_correlation(*cooccurrence_statistics(LABELS), tau=0.3)
    torch.testing.assert_close(wider, torch.tensor([[1, Q, Q], [Q, 1, Q], [Q, Q, 1]]))
    # gen_adj: row sums d = (1 + q, 1 + q, 1 + 2q); Â[i, j] = A[j, i] / sqrt(d_i d_j).
    d = CORRELATION.sum(1)
    expected = CORRELATION.T / (d[:, None] * d[None, :]).sqrt()
    torch.testing.assert_close(mlgcn_propagation(CORRELATION), expected)
    # A class never seen keeps only its self-loop (the released code would divide by zero).
    torch.testing.assert_close(mlgcn_correlation(*cooccurrence_statistics(torch.tensor([[1, 0], [1, 0]]))),
                               torch.eye(2))


def released_gen_a(cooccurrence: np.ndarray, counts: np.ndarray, tau: float) -> np.ndarray:
    """The released ``gen_A`` as its numpy steps (in place on a float64 copy), for comparison."""
    adj = cooccurrence / counts[:, None]
    adj[adj < tau] = 0
    adj[adj >= tau] = 1
    adj = adj * 0.25 / (adj.sum(0, keepdims=True) + 1e-6)
    return adj + np.identity(len(counts))


@pytest.mark.parametrize("name", ["coco", "voc"])
def test_packaged_graphs_are_the_released_inputs(name):
    cooccurrence, counts = packaged_statistics(name)
    C = PACKAGED_GRAPHS[name]
    assert cooccurrence.shape == (C, C) and counts.shape == (C,)
    assert torch.equal(cooccurrence, cooccurrence.T) and (cooccurrence.diagonal() == 0).all()
    released = torch.from_numpy(released_gen_a(cooccurrence.numpy(), counts.numpy(), 0.4)).float()
    assert torch.equal(mlgcn_correlation(cooccurrence, counts), released)
    assert torch.equal(adjacency_matrix(name, C), released) and torch.equal(adjacency_matrix(None, C), released)
    # Rows follow fastmlr.data's (released) class order: the most frequent class is "person".
    names = class_names(C)
    assert names[int(counts.argmax())] == "person"
    glove = label_embedding_matrix(name, C)
    assert glove.shape == (C, 300) and torch.equal(glove, label_embedding_matrix(None, C))


@pytest.mark.parametrize(
    "labels, tau, message",
    [
        (torch.tensor([1, 0, 1]), 0.4, "2-D"),
        (torch.tensor([[1, 2], [0, 1]]), 0.4, "0 and 1"),
        (torch.zeros(0, 3), 0.4, "non-empty"),
        (LABELS, 1.0, "tau"),
        (LABELS, 0.0, "tau"),
        ("labels.npy", 0.4, "torch.Tensor or a numpy array"),
    ],
)
def test_correlation_rejects_bad_input(labels, tau, message):
    with pytest.raises(ValueError, match=message):
        mlgcn_correlation(*cooccurrence_statistics(labels), tau)


def test_statistics_must_agree():
    with pytest.raises(ValueError, match=r"\[3, 3\].*\(2, 2\)"):
        mlgcn_correlation(torch.zeros(2, 2), torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        conditional_probability(-torch.ones(2, 2), torch.ones(2))
    with pytest.raises(ValueError, match="NaN"):
        conditional_probability(torch.full((2, 2), float("nan")), torch.ones(2))


def test_adjacency_matrix_resolves_and_checks(tmp_path):
    torch.testing.assert_close(adjacency_matrix(None, 3), torch.eye(3))  # no packaged 3-class graph
    torch.testing.assert_close(adjacency_matrix(CORRELATION.numpy(), 3), CORRELATION)
    path = tmp_path / "graph.npy"
    np.save(path, CORRELATION.numpy())
    torch.testing.assert_close(adjacency_matrix(path, 3), CORRELATION)
    torch.testing.assert_close(adjacency_matrix(str(path), 3), CORRELATION)
    # A named graph goes through the model's own construction.
    torch.testing.assert_close(adjacency_matrix("voc", 20, lambda m, n: conditional_probability(m, n).float()),
                               conditional_probability(*packaged_statistics("voc")).float())
    with pytest.raises(ValueError, match=r"square.*\(3, 4\)"):
        adjacency_matrix(torch.ones(3, 4), 3)
    with pytest.raises(ValueError, match=r"\(4, 4\).*num_classes = 3"):
        adjacency_matrix(torch.eye(4), 3)
    with pytest.raises(ValueError, match="non-negative"):
        adjacency_matrix(-torch.eye(3), 3)
    with pytest.raises(ValueError, match="infinite"):
        adjacency_matrix(torch.full((3, 3), float("inf")), 3)
    with pytest.raises(ValueError, match="unknown adjacency 'cocoa'"):
        adjacency_matrix("cocoa", 80)
    with pytest.raises(ValueError, match="'coco' has 80 classes.*num_classes = 20"):
        adjacency_matrix("coco", 20)
    with pytest.raises(FileNotFoundError, match="absent.npy"):
        adjacency_matrix(tmp_path / "absent.npy", 3)


def test_label_embedding_matrix(tmp_path):
    random = label_embedding_matrix("random", 5)
    assert random.shape == (5, 300) and random.dtype == torch.float32
    torch.testing.assert_close(random, label_embedding_matrix("random", 5))  # seeded: reproducible
    assert not torch.equal(random, label_embedding_matrix("random", 5, seed=1))
    glove = np.random.default_rng(0).normal(size=(5, 300))
    path = tmp_path / "glove.npy"
    np.save(path, glove)
    torch.testing.assert_close(label_embedding_matrix(path, 5), torch.from_numpy(glove).float())
    torch.testing.assert_close(label_embedding_matrix(str(path), 5), label_embedding_matrix(glove, 5))
    torch.testing.assert_close(label_embedding_matrix(torch.from_numpy(glove), 5), label_embedding_matrix(glove, 5))


def test_label_embedding_matrix_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"no packaged word embeddings for num_classes = 5.*'random'"):
        label_embedding_matrix(None, 5)
    with pytest.raises(ValueError, match=r"unknown label_embeddings 'glove'.*'random'"):
        label_embedding_matrix("glove", 80)
    with pytest.raises(ValueError, match="'voc' has 20 classes.*num_classes = 80"):
        label_embedding_matrix("voc", 80)
    with pytest.raises(ValueError, match=r"\(5, 300\).*\(4, 300\)"):
        label_embedding_matrix(torch.zeros(4, 300), 5)
    with pytest.raises(ValueError, match=r"\(5, 300\).*\(5, 200\)"):
        label_embedding_matrix(np.zeros((5, 200)), 5)
    missing = tmp_path / "absent.npy"
    with pytest.raises(FileNotFoundError, match="absent.npy"):
        label_embedding_matrix(missing, 5)
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="bad.npy"):
        label_embedding_matrix(tmp_path / "bad.npy", 5)
    with pytest.raises(ValueError, match="NaN"):
        label_embedding_matrix(torch.full((5, 300), float("nan")), 5)


def test_graph_convolution_is_adjacency_times_projection():
    layer = GraphConvolution(6, 4)
    x, adjacency = torch.randn(3, 6), mlgcn_propagation(CORRELATION)
    torch.testing.assert_close(layer(x, adjacency), adjacency @ x @ layer.weight)
    assert layer.weight.shape == (6, 4)  # [in, out], as the released checkpoints store it


def test_learned_adjacency_graph_matches_eq3():
    graph = LearnedAdjacencyGraph(3, (5, 5, 5))
    x = torch.randn(3, 5)
    v_hat = torch.softmax(graph.relation, 1)
    expected = x
    for weight in graph.weights:
        expected = torch.nn.functional.leaky_relu(v_hat @ expected @ weight.weight.T, 0.2)
    torch.testing.assert_close(graph(x), expected)


def test_class_wise_linear_is_one_dot_per_class():
    layer = ClassWiseLinear(3, 5)
    x = torch.randn(2, 3, 5)
    expected = torch.stack([x[:, c] @ layer.weight[c] + layer.bias[c] for c in range(3)], dim=1)
    torch.testing.assert_close(layer(x), expected)
