"""SSGRL equals the released code (HCPLab-SYSU/SSGRL): a released-layout checkpoint loads through
``create_model`` and gives the sigmoid of :func:`fastmlr.testing.released_ssgrl_logits` to 1e-5.

The parity check runs ResNet-50 weights under the released ``resnet_101.`` keys (the released code
builds ResNet-101; the trunk's layout is the same, and half the depth keeps this file fast) at 160 px:
the 5×5 map exercises the released ``AvgPool2d(2, 2)`` dropping its last row and column. The key map
is pinned on the exact ResNet-101 layout, on the meta device.
"""

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from fastmlr import create_model
from fastmlr.checkpoint import read_state_dict
from fastmlr.graph import conditional_probability, cooccurrence_statistics
from fastmlr.models.ssgrl import SSGRL, SSGRLGatedGraph
from fastmlr.testing import assert_key_map, random_resnet_state, released_ssgrl_logits

C = 20
SIZE = 160  # ResNet map 5×5, pooled to 2×2
D = 2048


def released_head(classes: int, dim: int = D, attention_scale: float = 30.0) -> dict[str, torch.Tensor]:
    """The released SSGRL's non-backbone parameters, random, under its names. ``fc_a`` is scaled up so
    the attention over the positions is peaked (with the default scale it is nearly uniform and would
    hide errors in the attention)."""
    state = {}

    def linear(name: str, fan_in: int, fan_out: int, bias: bool = True, scale: float = 1.0) -> None:
        layer = nn.Linear(fan_in, fan_out, bias=bias)
        state[name + ".weight"] = layer.weight.detach() * scale
        if bias:
            state[name + ".bias"] = layer.bias.detach() * scale

    linear("word_semantic.fc_1", dim, 1024, bias=False)
    linear("word_semantic.fc_2", 300, 1024, bias=False)
    linear("word_semantic.fc_3", 1024, 1024)
    linear("word_semantic.fc_a", 1024, 1, scale=attention_scale)
    for eq in (3, 4, 5):
        linear(f"graph_net.fc_eq{eq}_w", 2 * dim, dim)
        linear(f"graph_net.fc_eq{eq}_u", dim, dim)
    linear("fc_output", 2 * dim, dim)
    state["classifiers.weight"] = (torch.rand(classes, dim) * 2 - 1) * 2 / dim**0.5
    state["classifiers.bias"] = (torch.rand(classes) * 2 - 1) / dim**0.5
    return state


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A random released-layout checkpoint (saved as the released ``main.py`` saves it), its
    word-vector and graph ``.npy`` files, images, and the released logits."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    backbone = random_resnet_state("resnet50", torch.randn(2, 3, 64, 64, generator=generator))
    state = {f"resnet_101.{k}": v for k, v in backbone.items()} | released_head(C)
    words = torch.randn(C, 300, generator=generator)
    labels = (torch.rand(60, C, generator=generator) < 0.25).double()
    graph = conditional_probability(*cooccurrence_statistics(labels)).float()
    folder = tmp_path_factory.mktemp("ssgrl")
    np.save(folder / "vectors.npy", words.numpy())
    np.save(folder / "prob_train.npy", graph.numpy())
    torch.save({"epoch": 3, "state_dict": state, "best_mAP": 0.5}, folder / "checkpoint.pth.tar")
    images = torch.randn(2, 3, SIZE, SIZE, generator=generator)
    return {"state": state, "words": words, "graph": graph, "folder": folder, "images": images,
            "logits": released_ssgrl_logits(state, images, words, graph)}


@pytest.fixture(scope="module")
def model(released):
    folder = released["folder"]
    return create_model("ssgrl", backbone="resnet50", num_classes=C, image_size=SIZE,
                        checkpoint=folder / "checkpoint.pth.tar",
                        label_embeddings=folder / "vectors.npy", adjacency=folder / "prob_train.npy")


def test_released_checkpoint_gives_the_released_probabilities(released, model):
    with torch.no_grad():
        probs = model(released["images"])
    expected = torch.sigmoid(released["logits"])
    # the scores are spread and image-dependent, so the comparison means something
    assert 0.02 < expected.min() and expected.max() < 0.98 and expected.std() > 0.05
    assert (expected[0] - expected[1]).abs().max() > 1e-2
    assert (probs - expected).abs().max() <= 1e-5
    assert torch.equal(model.adjacency, released["graph"]) and torch.equal(model.word_embeddings, released["words"])


def test_each_released_quirk_matters(released, model):
    """The parity test would fail without the 2×2 average pool or without the ``fc_3`` fold."""
    state = released["state"]
    images, expected = released["images"][:1], torch.sigmoid(released["logits"][:1])
    try:
        with torch.no_grad():
            model.feature_map = lambda x: model.features(x)  # no AvgPool2d(2, 2)
            assert (torch.sigmoid(model.logits(images)) - expected).abs().max() > 1e-3
            del model.feature_map
            identity = {"word_semantic.fc_3.weight": torch.eye(1024), "word_semantic.fc_3.bias": torch.zeros(1024)}
            model.load_state_dict(model.remap_checkpoint_keys({**state, **identity}))  # fc_3 left out
            assert (torch.sigmoid(model.logits(images)) - expected).abs().max() > 1e-3
    finally:
        model.__dict__.pop("feature_map", None)
        model.load_state_dict(model.remap_checkpoint_keys(state))


def released_layout_shapes(classes: int) -> dict[str, torch.Size]:
    """Every key of a released SSGRL (ResNet-101) state dict with its shape, built on the meta device."""
    with torch.device("meta"):
        backbone = torchvision.models.resnet101(weights=None).state_dict()
        head = released_head(classes)
    return {f"resnet_101.{k}": v.shape for k, v in backbone.items() if not k.startswith("fc.")} | {
        k: v.shape for k, v in head.items()
    }


def test_key_map_covers_the_released_resnet101_layout():
    shapes = released_layout_shapes(80)
    with torch.device("meta"):
        model = SSGRL(backbone="resnet101", num_classes=80, image_size=448,
                      label_embeddings="coco", adjacency="coco")
    # pinned entries of the map
    renamed = {
        "resnet_101.conv1.weight": "features.0.weight",
        "resnet_101.bn1.running_var": "features.1.running_var",
        "resnet_101.layer3.22.conv3.weight": "features.6.22.conv3.weight",
        "resnet_101.layer4.0.downsample.1.num_batches_tracked": "features.7.0.downsample.1.num_batches_tracked",
        "word_semantic.fc_1.weight": "f_1.weight",
        "word_semantic.fc_2.weight": "f_2.weight",
        "graph_net.fc_eq3_w.bias": "ggnn.update_a.bias",
        "graph_net.fc_eq3_u.weight": "ggnn.update_h.weight",
        "graph_net.fc_eq4_w.weight": "ggnn.reset_a.weight",
        "graph_net.fc_eq5_w.weight": "ggnn.candidate_a.weight",
        "graph_net.fc_eq5_u.bias": "ggnn.candidate_h.bias",
        "fc_output.weight": "output.weight",
        "classifiers.weight": "classifier.weight",
    }
    assert_key_map(model, shapes, renamed)
    assert not any("reset_h" in k for k in model.state_dict())  # fc_eq4_u has no counterpart


def test_fold_of_fc_3_into_f_a():
    torch.manual_seed(3)
    head = released_head(4, dim=8)
    model = SSGRL(backbone="mobilenet_v2", num_classes=4, image_size=64, label_embeddings="random",
                  adjacency=torch.eye(4))
    state = model.remap_checkpoint_keys({**head, "word_semantic.fc_1.weight": torch.zeros(1024, 8)})
    t = torch.randn(5, 1024)
    fc_3 = t @ head["word_semantic.fc_3.weight"].T + head["word_semantic.fc_3.bias"]
    expected = fc_3 @ head["word_semantic.fc_a.weight"].T + head["word_semantic.fc_a.bias"]
    torch.testing.assert_close(t @ state["f_a.weight"].T + state["f_a.bias"], expected, rtol=1e-5, atol=1e-4)
    assert "graph_net.fc_eq4_u.weight" not in state and "ggnn.reset_h.weight" not in state


def test_released_checkpoint_needs_the_word_vectors_and_graph(released):
    model = SSGRL(backbone="mobilenet_v2", num_classes=C, image_size=64, label_embeddings="random")
    with pytest.raises(ValueError, match="label_embeddings= and adjacency="):
        model.remap_checkpoint_keys(released["state"])


def test_module_prefix_is_stripped(tmp_path):
    """``nn.DataParallel`` checkpoints (every key ``module.``) read as the bare layout."""
    state = released_head(2, dim=4)
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "parallel.pth.tar")
    torch.save({"state_dict": state}, tmp_path / "bare.pth.tar")
    assert read_state_dict(tmp_path / "parallel.pth.tar").keys() == read_state_dict(tmp_path / "bare.pth.tar").keys()
    assert read_state_dict(tmp_path / "parallel.pth.tar").keys() == state.keys()


def test_gated_graph_step_follows_the_released_ggnn():
    """One step of ``ggnn.py`` written out: the reset gate adds ``U_z h`` (``fc_eq3_u``), and the
    incoming/outgoing messages use the adjacency and its transpose."""
    torch.manual_seed(4)
    ggnn = SSGRLGatedGraph(6, steps=2)
    nodes, adjacency = torch.randn(2, 3, 6), torch.rand(3, 3)
    expected = nodes
    for _ in range(2):
        messages = torch.cat([adjacency @ expected, adjacency.T @ expected], dim=2)
        recurrent = expected @ ggnn.update_h.weight.T + ggnn.update_h.bias
        z = torch.sigmoid(messages @ ggnn.update_a.weight.T + ggnn.update_a.bias + recurrent)
        r = torch.sigmoid(messages @ ggnn.reset_a.weight.T + ggnn.reset_a.bias + recurrent)
        h = torch.tanh(messages @ ggnn.candidate_a.weight.T + ggnn.candidate_a.bias
                       + (r * expected) @ ggnn.candidate_h.weight.T + ggnn.candidate_h.bias)
        expected = (1 - z) * expected + z * h
    torch.testing.assert_close(ggnn(nodes, adjacency), expected)
    assert not hasattr(ggnn, "reset_h")
