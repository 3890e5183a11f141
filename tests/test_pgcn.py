"""P-GCN: label-aware features through the shared softmax attention pool, scores coupled by the
label graph, the packaged graphs, training, bad input, ONNX parity and the TensorRT op check.

MobileNetV2 at 64×64 (CPU budget), BatchNorm calibrated (:func:`fastmlr.testing.calibrate_batchnorm`)
so that outputs depend on the image.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from fastmlr.export import check_tensorrt_ops, to_onnx

from fastmlr import create_model, kernels, list_models
from fastmlr.graph import mlgcn_correlation, mlgcn_propagation, packaged_statistics
from fastmlr.models.pgcn import HIDDEN_DIM
from fastmlr.testing import calibrate_batchnorm

C = 4
SIZE = 64
TARGETS = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
#: Two disconnected components {0, 1} and {2, 3}, self-loops included (row sums positive).
TWO_COMPONENTS = torch.tensor([[1.0, 0.5, 0, 0], [0.5, 1.0, 0, 0], [0, 0, 1.0, 0.5], [0, 0, 0.5, 1.0]])


def images(batch: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def build(num_classes: int = C, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("pgcn", backbone="mobilenet_v2", num_classes=num_classes, image_size=SIZE, **options)
    return calibrate_batchnorm(model, images(4, seed=1))


def test_registered_and_eval_outputs_probabilities():
    assert "pgcn" in list_models()
    model = build(adjacency=TWO_COMPONENTS)
    with torch.no_grad():
        probs = model(images(3))
        logits = model.logits(images(3))
    assert probs.shape == (3, C) and probs.dtype == torch.float32
    assert ((probs > 0) & (probs < 1)).all()
    torch.testing.assert_close(probs, torch.sigmoid(logits))
    assert not torch.allclose(probs[0], probs[1]), "scores do not depend on the image"


def test_a_batch_equals_its_images_one_by_one():
    model = build(adjacency=TWO_COMPONENTS).double()  # float64: no batch-size-dependent conv rounding
    batch = images(3).double()
    with torch.no_grad():
        batched = model(batch)
        singles = torch.cat([model(batch[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(singles, batched, atol=1e-10, rtol=0)


def test_label_features_are_the_softmax_pool_of_the_class_maps(monkeypatch):
    model = build()
    calls = []
    real_pool = kernels.softmax_attention_pool

    def spy(features, scores, **kw):
        calls.append((tuple(features.shape), tuple(scores.shape)))
        return real_pool(features, scores, **kw)

    monkeypatch.setattr(kernels, "softmax_attention_pool", spy)
    feature_map = torch.randn(2, 1280, 3, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pooled = model.label_features(feature_map)
        # By the definition: map c = w_c · F_p + b_c at every position p, soft-maxed over p.
        maps = torch.einsum("cd,bdp->bcp", model.class_maps.weight[:, :, 0, 0], feature_map.flatten(2))
        weights = torch.softmax(maps + model.class_maps.bias[:, None], dim=-1)
        expected = torch.einsum("bcp,bdp->bcd", weights, feature_map.flatten(2))
    assert calls == [((2, 9, 1280), (2, C, 9))]
    assert pooled.shape == (2, C, 1280)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


def test_scores_are_coupled_only_along_the_graph():
    # Changing class 0's activation map changes class 0's features; through the graph it may move
    # the scores of class 0 and its neighbour 1, never those of the other component {2, 3}.
    model = build(adjacency=TWO_COMPONENTS)
    batch = images(2)
    with torch.no_grad():
        before = model.logits(batch)
        model.class_maps.weight[0].mul_(-3.0)
        after = model.logits(batch)
    moved = (after - before).abs().amax(dim=0)
    assert moved[0] > 1e-4 and moved[1] > 1e-4
    assert moved[2] == 0 and moved[3] == 0


def test_default_graph_is_ml_gcn_correlation_of_the_packaged_statistics():
    expected = mlgcn_correlation(*packaged_statistics("voc"))
    for options in ({}, {"adjacency": "voc"}):
        model = create_model("pgcn", backbone="mobilenet_v2", num_classes=20, image_size=SIZE, **options)
        assert torch.equal(model.correlation, expected)
    plain = create_model("pgcn", backbone="mobilenet_v2", num_classes=C, image_size=SIZE)
    assert torch.equal(plain.correlation, torch.eye(C))  # no packaged graph with 4 classes
    assert "correlation" in plain.state_dict()  # saved with checkpoints
    propagation = mlgcn_propagation(expected)
    assert torch.isfinite(propagation).all() and propagation.shape == (20, 20)


def test_training_returns_logits_and_lowers_the_loss():
    model = build(adjacency=TWO_COMPONENTS)
    model.train()
    model.features.eval()  # BatchNorm kept at its calibrated statistics (batches of two images)
    batch = images(2)
    logits = model(batch)
    with torch.no_grad():
        probs = model.eval()(batch)
    model.train()
    model.features.eval()
    assert logits.shape == (2, C)
    torch.testing.assert_close(torch.sigmoid(logits), probs)  # training gives the logits
    head = [p for n, p in model.named_parameters() if not n.startswith("features.")]
    optimizer = torch.optim.SGD(head, lr=1e-2)
    with torch.no_grad():
        before = model.loss(model(batch), TARGETS).item()
    for step in range(3):
        optimizer.zero_grad()
        model.loss(model(batch), TARGETS).backward()
        if step == 0:  # through the attention pool to the class maps and the backbone
            assert model.class_maps.weight.grad.abs().sum() > 0
            assert model.features[-1][0].weight.grad.abs().sum() > 0
        optimizer.step()
    with torch.no_grad():
        after = model.loss(model(batch), TARGETS).item()
    assert after < before


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"adjacency": torch.eye(5)}, ValueError, r"\(5, 5\).*num_classes = 4"),
        ({"adjacency": torch.ones(4, 3)}, ValueError, r"square.*\(4, 3\)"),
        ({"adjacency": torch.zeros(4, 4)}, ValueError, r"rows \[0, 1, 2, 3\] sum to 0"),
        ({"adjacency": -torch.eye(4)}, ValueError, "non-negative"),
        ({"adjacency": "coco"}, ValueError, "80 classes but the model has num_classes = 4"),
        ({"adjacency": "/nonexistent/adjacency.npy"}, FileNotFoundError, "adjacency.npy"),
        ({"label_embeddings": "coco"}, (TypeError, ValueError), "label_embeddings"),  # no word embeddings
    ],
)
def test_bad_options_raise(options, error, message):
    with pytest.raises(error, match=message):
        create_model("pgcn", backbone="mobilenet_v2", num_classes=C, image_size=SIZE, **options)


@pytest.mark.parametrize(
    "batch, message",
    [
        (torch.rand(1, 1, SIZE, SIZE), "3"),
        (torch.full((1, 3, SIZE, SIZE), float("nan")), "finite|NaN"),
        (torch.rand(1, 3, 50, 64), "32"),
        (torch.rand(3, SIZE, SIZE), "4-D|\\[B, 3, H, W\\]"),
    ],
)
def test_bad_images_raise(batch, message):
    with pytest.raises(ValueError, match=message):
        build()(batch)


def test_parameter_count_at_resnet101():
    # README's table: ResNet-101 (42.50 M) + 1×1 class maps (2048·80 + 80) + GCN 2048→1024→1 + 80 biases.
    with torch.device("meta"):
        model = create_model("pgcn", backbone="resnet101", num_classes=80, image_size=448,
                             adjacency=torch.eye(80, device="cpu"))
    head = 2048 * 80 + 80 + 2048 * HIDDEN_DIM + HIDDEN_DIM + 80
    assert sum(p.numel() for p in model.features.parameters()) == 42_500_160
    assert sum(p.numel() for p in model.parameters()) == 42_500_160 + head == 44_762_336


def test_onnx_parity_with_the_voc_graph_and_tensorrt_ops(tmp_path, shared_images):
    # 20 classes with the packaged VOC graph, batch axis dynamic: validated by to_onnx on the
    # shared photos and random batches of 2 and 3, then checked here on another batch size.
    model = build(num_classes=20)
    path = to_onnx(model, tmp_path / "pgcn.onnx", image_size=SIZE, batch=2, dynamic_batch=True,
                   images=shared_images[:2], num_random=1)
    check_tensorrt_ops(path)
    batch = images(4, seed=5)
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"images": batch.numpy()})
    with torch.no_grad():
        expected = model(batch).numpy()
    assert np.ptp(expected, axis=0).max() > 1e-2  # the images are told apart
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)
