"""Label graphs: co-occurrence adjacency, word-embedding inputs, and the graph layers of the zoo."""

import math

import numpy as np
import pytest
import torch

from fastmlr.graph import (
    AttentionGraphLayer,
    ClassWiseLinear,
    GatedGraphNetwork,
    GraphConvolution,
    LearnedAdjacencyGraph,
    ResidualGCN,
    adjacency_matrix,
    cooccurrence_adjacency,
    label_embedding_matrix,
)

# 4 images, 3 classes: n = (3, 3, 1); n_01 = 2, n_02 = 1, n_12 = 1.
LABELS = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 0]])


def test_cooccurrence_adjacency_hand_computed():
    # P(j|i): row 0 = (-, 2/3, 1/3), row 1 = (2/3, -, 1/3), row 2 = (1, 1, -).
    # Binarised at 0.5 with self-loops: A = [[1,1,0],[1,1,0],[1,1,1]], row degrees d = (2, 2, 3).
    # Â[i, j] = A[j, i] / sqrt(d_i d_j).
    r6 = 1 / math.sqrt(6)
    expected = torch.tensor([[0.5, 0.5, r6], [0.5, 0.5, r6], [0.0, 0.0, 1 / 3]])
    torch.testing.assert_close(cooccurrence_adjacency(LABELS, tau=0.5), expected)


def test_cooccurrence_adjacency_tau_and_inputs():
    # tau = 0.3 also keeps P(2|0) = P(2|1) = 1/3: every class links to every other one.
    full = cooccurrence_adjacency(LABELS.numpy().astype(bool), tau=0.3)
    torch.testing.assert_close(full, torch.full((3, 3), 1 / 3))
    # A class that never occurs has only its self-loop.
    labels = torch.tensor([[1, 0], [1, 0]])
    torch.testing.assert_close(cooccurrence_adjacency(labels), torch.eye(2))


@pytest.mark.parametrize(
    "labels, tau, message",
    [
        (torch.tensor([1, 0, 1]), 0.5, "2-D"),
        (torch.tensor([[1, 2], [0, 1]]), 0.5, "0 and 1"),
        (torch.zeros(0, 3), 0.5, "non-empty"),
        (LABELS, 1.0, "tau"),
        (LABELS, 0.0, "tau"),
        ("labels.npy", 0.5, "torch.Tensor or a numpy array"),
    ],
)
def test_cooccurrence_adjacency_rejects_bad_input(labels, tau, message):
    with pytest.raises(ValueError, match=message):
        cooccurrence_adjacency(labels, tau)


def test_adjacency_matrix_checks_shapes():
    torch.testing.assert_close(adjacency_matrix(None, 3), torch.eye(3))
    given = cooccurrence_adjacency(LABELS)
    torch.testing.assert_close(adjacency_matrix(given.numpy(), 3), given)
    with pytest.raises(ValueError, match=r"square.*\(3, 4\)"):
        adjacency_matrix(torch.ones(3, 4), 3)
    with pytest.raises(ValueError, match=r"\(4, 4\).*num_classes = 3"):
        adjacency_matrix(torch.eye(4), 3)
    with pytest.raises(ValueError, match="non-negative"):
        adjacency_matrix(-torch.eye(3), 3)


def test_label_embedding_matrix(tmp_path):
    default = label_embedding_matrix(None, 5)
    assert default.shape == (5, 300) and default.dtype == torch.float32
    torch.testing.assert_close(default, label_embedding_matrix(None, 5))  # seeded: reproducible
    assert not torch.equal(default, label_embedding_matrix(None, 5, seed=1))
    glove = np.random.default_rng(0).normal(size=(5, 300))
    path = tmp_path / "glove.npy"
    np.save(path, glove)
    torch.testing.assert_close(label_embedding_matrix(path, 5), torch.from_numpy(glove).float())
    torch.testing.assert_close(label_embedding_matrix(str(path), 5), label_embedding_matrix(glove, 5))


def test_label_embedding_matrix_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"\(5, 300\).*\(4, 300\)"):
        label_embedding_matrix(torch.zeros(4, 300), 5)
    with pytest.raises(ValueError, match=r"\(5, 300\).*\(5, 200\)"):
        label_embedding_matrix(np.zeros((5, 200)), 5)
    missing = tmp_path / "absent.npy"
    with pytest.raises(FileNotFoundError, match="absent.npy"):
        label_embedding_matrix(missing, 5)
    with pytest.raises(ValueError, match="NaN"):
        label_embedding_matrix(torch.full((5, 300), float("nan")), 5)


def test_graph_convolution_is_adjacency_times_projection():
    layer = GraphConvolution(6, 4)
    x, adjacency = torch.randn(3, 6), cooccurrence_adjacency(LABELS)
    torch.testing.assert_close(layer(x, adjacency), adjacency @ x @ layer.linear.weight.T)


def test_attention_graph_layer_aggregation_follows_adjacency():
    layer = AttentionGraphLayer(6, 4)
    x = torch.randn(3, 6)
    adjacency = cooccurrence_adjacency(LABELS)
    weights = layer.aggregation(x, adjacency)
    torch.testing.assert_close(weights.sum(1), torch.ones(3))  # Σ_j G_ij = 1
    assert (weights[adjacency == 0] == 0).all() and (weights[adjacency > 0] > 0).all()
    # With only self-loops G = I, so [X ‖ G X] = [X ‖ X].
    torch.testing.assert_close(layer.aggregation(x, torch.eye(3)), torch.eye(3))
    expected = torch.nn.functional.leaky_relu(layer.linear(torch.cat([x, x], 1)), 0.2)
    torch.testing.assert_close(layer(x, torch.eye(3)), expected)


def test_learned_adjacency_graph_matches_eq3():
    graph = LearnedAdjacencyGraph(3, (5, 5, 5))
    x = torch.randn(3, 5)
    v_hat = torch.softmax(graph.relation, 1)
    expected = x
    for weight in graph.weights:
        expected = torch.nn.functional.leaky_relu(v_hat @ expected @ weight.weight.T, 0.2)
    torch.testing.assert_close(graph(x), expected)


def test_residual_gcn_and_ggnn_shapes():
    adjacency = cooccurrence_adjacency(LABELS)
    assert ResidualGCN(300, 64)(torch.randn(3, 300), adjacency).shape == (3, 64)
    nodes = torch.randn(2, 3, 8)
    out = GatedGraphNetwork(8, steps=3)(nodes, adjacency)
    assert out.shape == (2, 3, 8) and not torch.allclose(out, nodes)


def test_class_wise_linear_is_one_dot_per_class():
    layer = ClassWiseLinear(3, 5)
    x = torch.randn(2, 3, 5)
    expected = torch.stack([x[:, c] @ layer.weight[c] + layer.bias[c] for c in range(3)], dim=1)
    torch.testing.assert_close(layer(x), expected)
