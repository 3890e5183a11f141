"""SRDL, LCE, Deep-LIFT, ML-GCN and SSGRL: shapes, determinism, batching, training losses, OE, LCE widths.

Most checks use MobileNetV2 at 64×64 with 4 classes (CPU budget). A randomly initialised backbone
in eval mode has BatchNorm running statistics (0, 1) that shrink its output to ~1e-9, which would
make every comparison trivially pass; :func:`fastmlr.testing.calibrate_batchnorm` first sets them to one
batch's statistics.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmlr import create_model, kernels
from fastmlr.graph import cooccurrence_statistics, mlgcn_correlation
from fastmlr.losses import multilabel_bce
from fastmlr.models.lce import kept_token_indices, lce_loss, sine_position_encoding
from fastmlr.models.srdl import box_masks, erasing_boxes, object_erasing, srdl_loss
from fastmlr.testing import calibrate_batchnorm, stand_in_label_graph

C = 4
SIZE = 64
ZOO = [
    ("srdl", {}),
    ("lce", {}),
    ("deeplift", {}),
    ("mlgcn", {}),
    ("ssgrl", {}),
]
IDS = [name + "-" + "-".join(cfg.values()) if cfg else name for name, cfg in ZOO]
TARGETS = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
ADJACENCY = mlgcn_correlation(*cooccurrence_statistics(torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 1],
                                                                   [1, 1, 0, 1]])))


def images(batch: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def graph_options(name: str) -> dict:
    adjacency = {"adjacency": ADJACENCY} if name in ("deeplift", "mlgcn", "ssgrl") else {}
    return {**stand_in_label_graph(name), **adjacency}


def build(name: str, cfg: dict, backbone: str = "mobilenet_v2", size: int = SIZE) -> nn.Module:
    torch.manual_seed(0)
    options = {**cfg, **graph_options(name)}
    model = create_model(name, backbone=backbone, num_classes=C, image_size=size, **options)
    return calibrate_batchnorm(model, images(4, size, seed=1))


@pytest.mark.parametrize("name, cfg", ZOO, ids=IDS)
def test_eval_shapes_determinism_and_batching(name, cfg):
    model = build(name, cfg)
    batch = images(2)
    with torch.no_grad():
        probs = model(batch)
        again = model(batch)
    assert probs.shape == (2, C) and probs.dtype == torch.float32
    assert ((probs >= 0) & (probs <= 1)).all()
    assert probs.std() > 1e-4, "scores do not depend on the classes: a degenerate head"
    assert torch.equal(probs, again)
    assert not torch.allclose(probs[0], probs[1]), "scores do not depend on the image"
    # A batch equals its images one by one. In float64: in float32 the convolutions pick other
    # algorithms per batch size, and ML-GCN's GMP(F)·W sums 1280 large terms, so rounding alone
    # moves its probabilities by ~1e-5.
    model.double()
    with torch.no_grad():
        batched = model(batch.double())
        singles = torch.cat([model(batch[i : i + 1].double()) for i in range(2)])
    torch.testing.assert_close(singles, batched, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.float(), probs, atol=1e-3, rtol=0)


@pytest.mark.parametrize("backbone", ["resnet50", "resnet101"])
@pytest.mark.parametrize("name, cfg", [z for z in ZOO if z[0] != "lce"], ids=[i for i in IDS if i != "lce"])
def test_resnet_shapes(name, cfg, backbone):
    model = create_model(name, backbone=backbone, num_classes=C, image_size=SIZE, **cfg, **stand_in_label_graph(name))
    with torch.no_grad():
        probs = model(images(1))
    assert probs.shape == (1, C) and ((probs >= 0) & (probs <= 1)).all()


@pytest.mark.parametrize("backbone", ["resnet50", "resnet101"])
def test_lce_resnet_widths_and_shapes(backbone):
    # ~440 M parameters at D = 3584: built and run on the meta device (shapes only, no memory).
    with torch.device("meta"):
        model = create_model("lce", backbone=backbone, num_classes=80, image_size=448)
        tokens, partial = model.label_tokens(torch.empty(1, 3, 448, 448))
        logits = partial + model.co_classifier(model.encoder(tokens))
    assert model.embed_dim == 3584 and model.token_dim == 3584 + 196
    assert model.label_queries.shape == (80, 3584)
    assert model.decoder[0].attention.embed_dim == 3584 and model.decoder[0].attention.num_heads == 4
    assert model.encoder.layers[0].self_attn.embed_dim == 3780 and len(model.encoder.layers) == 3
    assert model.encoder.layers[0].linear1.out_features == 2048
    assert model.infer_classifier.in_features == 3780 and model.infer_classifier.out_features == 80
    assert tokens.shape == (1, 80, 3780) and logits.shape == (1, 80)


def test_lce_mobilenet_widths():
    model = create_model("lce", backbone="mobilenet_v2", num_classes=C, image_size=SIZE)
    assert (model.embed_dim, model.token_dim) == (32 + 96 + 1280, 1408 + 4)
    assert model.position.shape == (4, 1408)
    with pytest.raises(ValueError, match=r"D \+ HW = 1417 \(HW = 9"):
        create_model("lce", backbone="mobilenet_v2", num_classes=C, image_size=96)
    with pytest.raises(ValueError, match="64x64"):
        model(images(1, size=96))


def test_lce_masks_tokens_only_in_training():
    model = build("lce", {})
    seen = []
    model.encoder.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    width = model.token_dim
    with torch.no_grad():
        model(images(2))
        assert seen == [(2, C, width)]
        seen.clear()
        model.train()
        logits, infer_logits = model(images(2))
    # Training runs the encoder twice: on all tokens, then on the inference token + the kept ones
    # (C = 4: 10 % of 4 rounds to 0 dropped; test_lce_masking_drops_tokens drops some).
    assert seen == [(2, C, width), (2, 1 + C, width)]
    assert logits.shape == infer_logits.shape == (2, C)
    kept = kept_token_indices(3, 80, 0.1, torch.device("cpu"))
    assert kept.shape == (3, 72) and (kept.diff(dim=1) > 0).all() and kept.max() < 80


def test_lce_masking_drops_tokens():
    model = create_model("lce", backbone="mobilenet_v2", num_classes=10, image_size=SIZE, mask_ratio=0.2)
    seen = []
    model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    model.train()
    with torch.no_grad():
        model(images(1))
    assert seen == [10, 1 + 8]  # 20 % of 10 tokens dropped, the inference token prepended


def test_sine_position_encoding():
    pos = sine_position_encoding(2, 3, 8)
    assert pos.shape == (6, 8)
    # position (row 1, column 2) = index 5; the first channel is sin(y · 2π) with y = 2/2, the
    # fifth sin(x · 2π) with x = 3/3.
    torch.testing.assert_close(pos[5, 0], torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(pos[0, 1], torch.tensor(-1.0))  # cos(π)
    with pytest.raises(ValueError, match="multiple of 4"):
        sine_position_encoding(2, 2, 6)


@pytest.mark.parametrize("name, cfg", ZOO, ids=IDS)
def test_training_lowers_the_loss(name, cfg):
    # The head trains on fixed backbone features (BatchNorm frozen at its calibrated statistics):
    # with batch statistics of two images and a random backbone, Adam's sign-like first steps over
    # millions of backbone weights swing ML-GCN's unnormalised GMP(F)·W logits by tens of units.
    model = build(name, cfg)
    model.train()
    model.features.eval()
    head = [p for n, p in model.named_parameters() if not n.startswith("features.")]
    optimizer = torch.optim.Adam(head, lr=1e-5)
    batch = images(2)

    def loss() -> torch.Tensor:
        torch.manual_seed(123)  # the same dropout and LCE token mask at every evaluation
        return model.loss(model(batch), TARGETS)

    with torch.no_grad():
        before = loss().item()
    for step in range(5):
        optimizer.zero_grad()
        loss().backward()
        if step == 0:  # the gradient also reaches the backbone (through the fused attention ops)
            assert model.features[-1][0].weight.grad.abs().sum() > 0
        optimizer.step()
    with torch.no_grad():
        after = loss().item()
    assert after < before


def test_losses_follow_the_papers():
    logits, other = torch.randn(2, C), torch.randn(2, C)
    bce = F.binary_cross_entropy(torch.sigmoid(logits), TARGETS)
    bce_other = F.binary_cross_entropy(torch.sigmoid(other), TARGETS)
    torch.testing.assert_close(multilabel_bce(logits, TARGETS), bce)
    torch.testing.assert_close(srdl_loss((logits, other), TARGETS), bce + bce_other)  # SRDL eq. 13
    torch.testing.assert_close(lce_loss((logits, other), TARGETS), bce + 0.1 * bce_other)  # LCE eq. 13
    torch.testing.assert_close(
        multilabel_bce(logits, TARGETS, reduction="sum"), bce * TARGETS.numel()
    )
    with pytest.raises(ValueError, match="shape"):
        multilabel_bce(logits, TARGETS[:, :3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        multilabel_bce(logits, TARGETS * 2)
    with pytest.raises(ValueError, match="reduction"):
        multilabel_bce(logits, TARGETS, reduction="none")


def hand_made_attention() -> torch.Tensor:
    """``[1, 4, 6, 6]``: class 2 peaks in rows 1..2, columns 2..4; class 0 in row 4, columns 0..1;
    classes 1 and 3 carry noise-free ramps."""
    maps = torch.full((1, 4, 6, 6), 0.1)
    maps[0, 2, 1:3, 2:5] = 0.9
    maps[0, 2, 2, 3] = 1.0
    maps[0, 0, 4, 0:2] = 0.8
    maps[0, 1] = torch.linspace(0.0, 1.0, 36).reshape(6, 6)
    maps[0, 3] = torch.linspace(1.0, 0.0, 36).reshape(6, 6)
    return maps


def test_srdl_erasing_boxes_are_the_interval_search_boxes():
    maps = hand_made_attention()
    boxes = erasing_boxes(maps, threshold=0.5)
    columns = kernels.interval_search(maps.amax(dim=2), threshold=0.5)  # eq. 7: max over rows
    rows = kernels.interval_search(maps.amax(dim=3), threshold=0.5)  # eq. 8: max over columns
    assert boxes.dtype == torch.int64 and boxes.shape == (1, 4, 4)
    torch.testing.assert_close(boxes[..., 0::2], columns)
    torch.testing.assert_close(boxes[..., 1::2], rows)
    # By hand (mcar-localization.md §3): class 2's column profile [.1 .1 .9 1 .9 .1] crosses 0.5 at
    # indices 1 and 4, and the segments start *at* a crossing: the peak's segment is [1, 4). Its row
    # profile [.1 .9 1 .1 .1 .1] crosses at 0 and 2: the peak (index 2) lies in [2, 6).
    assert boxes[0, 2].tolist() == [1, 2, 4, 6]


def test_srdl_object_erasing_zeroes_exactly_the_box_of_the_top_classes():
    maps = hand_made_attention()
    probs = torch.tensor([[0.7, 0.2, 0.9, 0.1]])  # top-2: classes 2 then 0
    erased, classes, boxes = object_erasing(maps, probs, topk=2, threshold=0.5)
    assert classes.tolist() == [[2, 0]]
    expected = maps.clone()
    for k, c in enumerate(classes[0].tolist()):
        x1, y1, x2, y2 = boxes[0, k].tolist()
        assert (x2 - x1) * (y2 - y1) > 0
        expected[0, c, y1:y2, x1:x2] = 0
    assert torch.equal(erased, expected)
    assert torch.equal(erased[0, [1, 3]], maps[0, [1, 3]])  # classes outside the top-K: untouched
    inside = box_masks(boxes, 6, 6)
    assert (erased[0, [2, 0]][inside[0]] == 0).all()  # box_masks marks the same cells


def test_srdl_training_feeds_the_erased_attention_to_the_fused_pool(monkeypatch):
    model = build("srdl", {"topk": 2})
    pooled = []
    real_pool = kernels.srdl_max_pool

    def spy(features, spatial, channel, **kw):
        pooled.append(spatial.detach().clone())
        return real_pool(features, spatial, channel, **kw)

    monkeypatch.setattr(kernels, "srdl_max_pool", spy)
    model.train()
    with torch.no_grad():
        logits, erased_logits = model(images(1))
    original, erased = pooled
    assert logits.shape == erased_logits.shape == (1, C)
    top = torch.sort(torch.sigmoid(logits), dim=1, descending=True, stable=True).indices[0, :2]
    changed = (original != erased).any(dim=2)[0]
    assert changed.tolist() == [c in top.tolist() for c in range(C)]
    assert (erased[original != erased] == 0).all()


@pytest.mark.parametrize(
    "name, options, error, message",
    [
        ("srdl", {"label_embeddings": torch.zeros(3, 300)}, ValueError, r"\(4, 300\).*\(3, 300\)"),
        ("ssgrl", {"label_embeddings": torch.zeros(4, 256)}, ValueError, r"\(4, 256\)"),
        ("mlgcn", {"label_embeddings": "/nonexistent/glove.npy"}, FileNotFoundError, "glove.npy"),
        ("mlgcn", {"adjacency": torch.eye(5)}, ValueError, r"\(5, 5\).*num_classes = 4"),
        ("deeplift", {"adjacency": torch.ones(4, 3)}, ValueError, r"square.*\(4, 3\)"),
        ("deeplift", {"adjacency": torch.zeros(4, 4)}, ValueError, r"rows \[0, 1, 2, 3\] sum to 0"),
        ("srdl", {"topk": 5}, ValueError, r"topk must be an integer in 1\.\.4"),
        ("srdl", {"threshold": 1.5}, ValueError, "threshold"),
        ("ssgrl", {"steps": 0}, ValueError, "steps"),
        ("lce", {"mask_ratio": 1.0}, ValueError, "mask_ratio"),
    ],
)
def test_bad_options_raise(name, options, error, message):
    with pytest.raises(error, match=message):
        create_model(name, backbone="mobilenet_v2", num_classes=C, image_size=SIZE,
                     **{**stand_in_label_graph(name), **options})


def test_label_embeddings_and_adjacency_are_used(tmp_path):
    import numpy as np

    path = tmp_path / "glove.npy"
    embeddings = np.random.default_rng(0).normal(size=(C, 300)).astype(np.float32)
    np.save(path, embeddings)
    model = create_model("deeplift", backbone="mobilenet_v2", num_classes=C, image_size=SIZE,
                         label_embeddings=path, adjacency=ADJACENCY)
    assert torch.equal(model.word_embeddings, torch.from_numpy(embeddings))
    assert torch.equal(model.adjacency, ADJACENCY)
    assert "word_embeddings" in model.state_dict()  # saved with checkpoints
    plain = create_model("deeplift", backbone="mobilenet_v2", num_classes=C, image_size=SIZE,
                         label_embeddings="random")
    assert torch.equal(plain.adjacency, torch.ones(C, C))  # the released Deep-LIFT's matrix


def test_srdl_rejects_a_one_cell_feature_map_in_training():
    model = create_model("srdl", backbone="mobilenet_v2", num_classes=C, image_size=32,
                         label_embeddings="random").train()
    with pytest.raises(ValueError, match="2x2"):
        model(images(2, size=32))


def test_checkpoint_round_trip_restores_the_label_graph(tmp_path):
    from fastmlr.checkpoint import save_checkpoint

    embeddings = torch.randn(C, 300)
    model = create_model("deeplift", backbone="mobilenet_v2", num_classes=C, image_size=SIZE,
                         label_embeddings=embeddings, adjacency=ADJACENCY)
    path = tmp_path / "deeplift.pt"
    save_checkpoint(model, path)
    loaded = create_model("deeplift", backbone="mobilenet_v2", num_classes=C, image_size=SIZE,
                          checkpoint=path)
    assert torch.equal(loaded.word_embeddings, embeddings) and torch.equal(loaded.adjacency, ADJACENCY)
