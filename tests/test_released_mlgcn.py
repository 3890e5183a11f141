"""ML-GCN equals the released code (Megvii-Nanjing/ML_GCN): a released-layout checkpoint loads through
``create_model`` and gives the sigmoid of :func:`fastmlr.testing.released_mlgcn_logits` to 1e-5.

The parity check runs ResNet-50 weights under the released ``features.N`` keys (the released code
builds ResNet-101; the trunk's layout is the same, and half the depth keeps this file fast) at 448 px,
the size the released checkpoints were trained at, where the released ``MaxPool2d(14, 14)`` covers the
whole 14×14 map. The graph is VOC's packaged one, the word vectors its GloVe vectors.
"""

import numpy as np
import pytest
import torch

from fastmlr import create_model
from fastmlr.graph import (
    cooccurrence_statistics,
    label_embedding_matrix,
    mlgcn_correlation,
    mlgcn_propagation,
    packaged_statistics,
)
from fastmlr.models.mlgcn import MLGCN
from fastmlr.testing import random_resnet_state, released_mlgcn_logits

C = 20
SIZE = 448
TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def released_layout(backbone: dict[str, torch.Tensor], A: torch.Tensor) -> dict[str, torch.Tensor]:
    """A released ``GCNResnet`` state dict: the trunk as ``features.N``, ``gc1``/``gc2`` weights
    ``[in, out]`` initialised as released (uniform ±1/sqrt(out)), and the correlation ``A``."""
    state = {}
    for key, value in backbone.items():
        stage, rest = key.split(".", 1)
        state[f"features.{TRUNK.index(stage)}.{rest}"] = value
    state["gc1.weight"] = (torch.rand(300, 1024) * 2 - 1) / 1024**0.5
    state["gc2.weight"] = (torch.rand(1024, 2048) * 2 - 1) / 2048**0.5
    state["A"] = A
    return state


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A random released-layout checkpoint saved as the released ``engine.py`` saves it (from
    ``nn.DataParallel``: ``module.`` keys), images, and the released logits."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    backbone = random_resnet_state("resnet50", torch.randn(2, 3, 64, 64, generator=generator))
    state = released_layout(backbone, mlgcn_correlation(*packaged_statistics("voc")))
    words = label_embedding_matrix("voc", C)
    images = torch.randn(2, 3, SIZE, SIZE, generator=generator)
    logits = released_mlgcn_logits(state, images, words)
    # Scale the last layer (the logits are linear in it) to |logit| <= 3: scores in [0.047, 0.953].
    scale = 3.0 / float(logits.abs().max())
    state["gc2.weight"] = state["gc2.weight"] * scale
    logits = logits * scale
    folder = tmp_path_factory.mktemp("mlgcn")
    torch.save({"epoch": 20, "arch": "gcn_resnet101", "best_score": 0.9,
                "state_dict": {f"module.{k}": v for k, v in state.items()}}, folder / "model_best.pth.tar")
    torch.save({"state_dict": state}, folder / "plain.pth.tar")
    return {"state": state, "words": words, "images": images, "logits": logits, "folder": folder}


def test_released_checkpoint_gives_the_released_probabilities(released):
    model = create_model("mlgcn", backbone="resnet50", num_classes=C, image_size=SIZE,
                         label_embeddings="voc", adjacency="voc", checkpoint=released["folder"] / "model_best.pth.tar")
    expected = torch.sigmoid(released["logits"])
    assert 0.02 < float(expected.min()) and float(expected.max()) < 0.98  # not saturated
    assert float((expected[0] - expected[1]).abs().max()) > 0.05  # the images are told apart
    with torch.no_grad():
        probs = model(released["images"])
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=0)
    # Saved without nn.DataParallel's "module." prefix: the same weights.
    plain = create_model("mlgcn", backbone="resnet50", num_classes=C, image_size=SIZE,
                         checkpoint=released["folder"] / "plain.pth.tar")
    state, again = model.state_dict(), plain.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)


def test_the_checkpoints_matrix_is_used(released, tmp_path):
    # A checkpoint whose A differs from the model's option: A is a weight of the checkpoint, and the
    # classifiers follow it (test_correlation_is_normalised_at_run_time pins how).
    labels = (torch.rand(50, C, generator=torch.Generator().manual_seed(3)) < 0.3).double()
    state = dict(released["state"], A=mlgcn_correlation(*cooccurrence_statistics(labels), tau=0.3))
    torch.save({"state_dict": state}, tmp_path / "other.pth.tar")
    model = create_model("mlgcn", backbone="resnet50", num_classes=C, image_size=SIZE,
                         checkpoint=tmp_path / "other.pth.tar")
    assert torch.equal(model.correlation, state["A"]) and not torch.equal(state["A"], released["state"]["A"])


def test_released_key_map():
    with torch.device("meta"):
        model = create_model("mlgcn", backbone="resnet101", num_classes=80, image_size=SIZE)
    released = {k: v for k, v in model.state_dict().items() if k.startswith("features.")}
    released |= {"gc1.weight": torch.empty(300, 1024), "gc2.weight": torch.empty(1024, 2048),
                 "A": torch.eye(80)}
    mapped = model.remap_checkpoint_keys(released)
    assert set(mapped) == set(model.state_dict())  # the 4 non-backbone keys included
    assert mapped["correlation"] is released["A"]
    assert torch.equal(mapped["word_embeddings"], label_embedding_matrix("coco", 80))
    own = {"correlation": torch.eye(80), "word_embeddings": torch.zeros(80, 300)}
    assert model.remap_checkpoint_keys(own) is own  # fastmlr's own layout passes unchanged


def test_coco_graph_by_name_is_the_default():
    model = create_model("mlgcn", backbone="mobilenet_v2", num_classes=80, image_size=64,
                         label_embeddings="coco", adjacency="coco")
    cooccurrence, counts = packaged_statistics("coco")
    assert torch.equal(model.correlation, mlgcn_correlation(cooccurrence, counts, tau=0.4))
    assert torch.equal(model.word_embeddings, label_embedding_matrix("coco", 80))
    default = create_model("mlgcn", backbone="mobilenet_v2", num_classes=80, image_size=64)
    assert torch.equal(default.correlation, model.correlation)
    assert torch.equal(default.word_embeddings, model.word_embeddings)
    assert model.class_names[:3] == ["airplane", "apple", "backpack"]


def test_correlation_is_normalised_at_run_time():
    model = create_model("mlgcn", backbone="mobilenet_v2", num_classes=C, image_size=64)
    propagation = mlgcn_propagation(model.correlation)
    hidden = torch.nn.functional.leaky_relu(propagation @ model.word_embeddings @ model.gc1.weight, 0.2)
    torch.testing.assert_close(model.classifiers(), propagation @ hidden @ model.gc2.weight)


def test_rows_summing_to_zero_are_refused():
    with pytest.raises(ValueError, match=r"rows \[1\] sum to 0"):
        create_model("mlgcn", backbone="mobilenet_v2", num_classes=3, image_size=64, label_embeddings="random",
                     adjacency=np.diag([1.0, 0.0, 1.0]))


def test_parameter_count_is_the_released_models():
    # ResNet-101 (42.50 M) + gc1 300×1024 + gc2 1024×2048; the released code also counts its 80×80
    # A as a parameter (outside the optimiser), fastmlr keeps it as a buffer.
    with torch.device("meta"):
        model = MLGCN(backbone="resnet101", num_classes=80, image_size=SIZE)
    total = sum(p.numel() for p in model.parameters())
    assert total == 42_500_160 + 300 * 1024 + 1024 * 2048 == 44_904_512
