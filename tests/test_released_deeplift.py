"""Deep-LIFT equals the released code (yidaiqiushen/Deep-LIFT, ``models.py``): a released-layout
checkpoint loads through ``create_model`` and gives the sigmoid of
:func:`fastmlr.testing.released_deeplift_logits` to 1e-5.

The released forward runs only at 448 px (it views the LIFT map as 14×14), so the parity check is
one forward each at 448, with ResNet-50 weights in the released ``features.0..7`` layout (the
released code builds ResNet-101; the layout is the same, and half the depth keeps this file fast).
The image-independent label half is also checked on its own, and the key map and parameter counts
are pinned on the exact ResNet-101 layout, on the meta device.
"""

import pytest
import torch
import torchvision
from torch import nn

from fastmlr import create_model
from fastmlr.graph import label_embedding_matrix
from fastmlr.models.deeplift import DeepLIFT
from fastmlr.testing import (
    assert_key_map,
    random_resnet_state,
    released_deeplift_label_features,
    released_deeplift_logits,
)

C = 20  # VOC: the packaged GloVe vectors are the default word vectors
D = 2048
TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def released_head(classes: int, dim: int = D) -> dict[str, torch.Tensor]:
    """The released ``GCNResnet``'s non-backbone state, random, under its names: non-trivial ``bn0``
    statistics, PReLU slopes and biases, and an asymmetric ``A`` with zeros (released checkpoints
    hold ones, as ``A`` never gets a gradient; zeros here pin the mask's orientation)."""
    state: dict[str, torch.Tensor] = {
        "bn0.running_mean": torch.randn(300) * 0.1,
        "bn0.running_var": torch.rand(300) + 0.5,
        "bn0.num_batches_tracked": torch.tensor(7),
    }
    for name, (fan_in, fan_out) in {"gc1": (300, 1024), "gc2": (1024, dim)}.items():
        state[f"{name}.weight"] = nn.init.xavier_uniform_(torch.empty(2 * fan_in, fan_out))
        state[f"{name}.bias"] = torch.randn(fan_out) * 0.05
        state[f"{name}.agg.weight"] = torch.randn(2 * fan_in)
        for score in ("f1", "f2"):
            conv = nn.Conv1d(fan_in, 1, kernel_size=1)
            state[f"{name}.agg.{score}.weight"] = conv.weight.detach() * 4
            state[f"{name}.agg.{score}.bias"] = conv.bias.detach()
        state[f"{name}.agg.prelu.weight"] = torch.rand(1) * 0.3 + 0.1
    state["W"] = nn.init.xavier_uniform_(torch.empty(dim, dim), gain=1.414)
    adjacency = (torch.rand(classes, classes) < 0.6).float()
    state["A"] = adjacency.fill_diagonal_(1)
    for mlp in ("mlp_1", "mlp_2"):
        for index in (1, 3):
            layer = nn.Linear(classes, classes)
            state[f"{mlp}.{index}.weight"], state[f"{mlp}.{index}.bias"] = layer.weight.detach(), layer.bias.detach()
    return state


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A random released-layout checkpoint, as the released ``engine.py`` saves it; the LIFT weight
    ``W`` is scaled so the pooled LIFT map, and so the scores, stay in the sigmoid's range."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(2)
    backbone = random_resnet_state("resnet50", torch.randn(2, 3, 64, 64, generator=generator))
    state = {f"features.{TRUNK.index(k.split('.')[0])}.{k.split('.', 1)[1]}": v for k, v in backbone.items()}
    state |= released_head(C)
    words = label_embedding_matrix("voc", C)
    labels = released_deeplift_label_features(state, words)[0]
    state["W"] = state["W"] * (0.015 / labels.square().sum(1).mean().sqrt())
    path = tmp_path_factory.mktemp("deeplift") / "voc_model_best.pth.tar"
    torch.save({"epoch": 5, "state_dict": state, "best_score": 0.9}, path)
    images = torch.randn(1, 3, 448, 448, generator=generator)
    return {"state": state, "words": words, "path": path, "images": images,
            "logits": released_deeplift_logits(state, images, words)}


def test_released_checkpoint_gives_the_released_probabilities(released):
    model = create_model("deeplift", backbone="resnet50", num_classes=C, image_size=448, checkpoint=released["path"])
    with torch.no_grad():
        probs = model(released["images"])
    expected = torch.sigmoid(released["logits"])
    assert 0.02 < expected.min() and expected.max() < 0.98 and expected.std() > 0.05
    assert (probs - expected).abs().max() <= 1e-5
    assert torch.equal(model.word_embeddings, released["words"])  # the packaged vectors, by default
    assert torch.equal(model.adjacency, released["state"]["A"])


def test_label_features_equal_the_released_and_the_mask_is_transposed(released):
    """``x₂ W`` alone (no image): equal to the released one; with ``A`` transposed it is not — the
    released mask ``gen_adj(A) > 0`` reads ``A[j, i]`` for the neighbours ``j`` of ``i``."""
    state = released["state"]
    model = DeepLIFT(backbone="resnet50", num_classes=C, image_size=64)
    head = {k: v for k, v in state.items() if not k.startswith("features.")}
    own = model.remap_checkpoint_keys(head)
    model.load_state_dict({**model.state_dict(), **own})
    model.eval()
    expected = released_deeplift_label_features(state, released["words"])[0]
    with torch.no_grad():
        actual = model.label_features()
        scale = expected.abs().max()
        assert (actual - expected).abs().max() <= 1e-5 * scale
        model.adjacency.copy_(state["A"].T)
        assert (model.label_features() - expected).abs().max() > 1e-2 * scale


def released_layout_shapes(classes: int) -> dict[str, torch.Size]:
    """Every key of a released Deep-LIFT (ResNet-101) state dict with its shape, on the meta device."""
    with torch.device("meta"):
        backbone = torchvision.models.resnet101(weights=None).state_dict()
        head = released_head(classes)
    trunk = {f"features.{TRUNK.index(k.split('.')[0])}.{k.split('.', 1)[1]}": v.shape
             for k, v in backbone.items() if not k.startswith("fc.")}
    return trunk | {k: v.shape for k, v in head.items()}


def test_key_map_and_parameter_counts_on_the_released_resnet101_layout():
    shapes = released_layout_shapes(80)
    # The released model's parameters (buffers and num_batches_tracked left out): 51.544 M.
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    assert sum(s.numel() for k, s in shapes.items() if not k.endswith(buffers)) == 51_543_862
    with torch.device("meta"):
        model = DeepLIFT(backbone="resnet101", num_classes=80, image_size=448, label_embeddings="coco")
    assert sum(p.numel() for p in model.parameters()) == 51_521_854
    assert sum(p.numel() for p in model.features.parameters()) == 42_500_160
    renamed = {
        "features.7.2.conv3.weight": "features.7.2.conv3.weight",
        "bn0.running_var": "embedding_norm.running_var",
        "gc1.bias": "graph_layers.0.linear.bias",
        "gc2.agg.prelu.weight": "graph_layers.1.aggregator.prelu.weight",
        "gc2.agg.f1.bias": "graph_layers.1.aggregator.score_node.bias",
        "gc2.agg.f2.bias": "graph_layers.1.aggregator.score_neighbour.bias",
        "W": "lift_weight",
        "A": "adjacency",
        "mlp_2.1.weight": "classifier.0.weight",
        "mlp_2.3.bias": "classifier.2.bias",
    }
    remapped = assert_key_map(model, shapes, renamed)
    assert remapped["graph_layers.0.linear.weight"].shape == (1024, 600)  # gc1.weight transposed
    assert remapped["graph_layers.0.aggregator.score_node.weight"].shape == (1, 300)  # Conv1d squeezed
    # dropped: mlp_1.{1,3}.{weight,bias}, gc{1,2}.agg.weight; added: word_embeddings
    assert len(remapped) == len(shapes) - 6 + 1
