"""MCAR: shapes, batching, the released code's predictions, checkpoints, training outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fastmlr
from fastmlr.checkpoint import save_checkpoint
from fastmlr.models.mcar import mcar_loss
from fastmlr.testing import calibrate_batchnorm, released_global_to_local


def small_mcar(**cfg) -> nn.Module:
    cfg = {"backbone": "mobilenet_v2", "num_classes": 10, "image_size": 64, **cfg}
    model = fastmlr.create_model("mcar", **cfg)
    size = model.image_size
    return calibrate_batchnorm(model, torch.rand(4, 3, size, size))


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "resnet50", "resnet101"])
@pytest.mark.parametrize("size", [256, 448])
def test_shapes_all_backbones(backbone: str, size: int) -> None:
    model = fastmlr.create_model("mcar", backbone=backbone, num_classes=20, image_size=size, topn=2)
    with torch.no_grad():
        out = model.forward_stages(torch.rand(1, 3, size, size))
    assert out.probs.shape == out.global_scores.shape == out.local_scores.shape == (1, 20)
    assert out.indices.shape == (1, 2) and out.boxes.shape == (1, 2, 4) and out.boxes.dtype == torch.long
    assert torch.equal(out.probs, torch.maximum(out.global_scores, out.local_scores))
    x1, y1, x2, y2 = out.boxes.unbind(-1)
    assert ((0 <= x1) & (x1 < x2) & (x2 <= size) & (0 <= y1) & (y1 < y2) & (y2 <= size)).all()


def test_batch_equals_one_by_one() -> None:
    model = small_mcar(image_size=96)
    images = torch.rand(3, 3, 96, 96)
    with torch.no_grad():
        batched = model.forward_stages(images)
        single = [model.forward_stages(images[i : i + 1]) for i in range(3)]
    assert len({tuple(b.flatten().tolist()) for b in batched.boxes}) > 1, "boxes should depend on the image"
    assert torch.equal(batched.boxes, torch.cat([s.boxes for s in single]))
    assert torch.equal(batched.indices, torch.cat([s.indices for s in single]))
    torch.testing.assert_close(batched.probs, torch.cat([s.probs for s in single]), atol=1e-5, rtol=0)


def released_state_dict(backbone: str, num_classes: int, prefix: str = "module.") -> dict:
    """A state dict in the released code's layout, built independently of fastmlr, with batch-norm
    statistics measured on random images so that scores depend on the image (not saturated)."""
    tv = getattr(torchvision.models, backbone)(weights=None)
    features = nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool, tv.layer1, tv.layer2, tv.layer3, tv.layer4)
    holder = nn.Module()
    holder.features = features
    calibrate_batchnorm(holder, torch.rand(4, 3, 128, 128))
    convclass = nn.Conv2d(2048, num_classes, 1)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state.update({f"convclass.{k}": v for k, v in convclass.state_dict().items()})
    return {f"{prefix}{k}": v for k, v in state.items()}


def released_mcar_forward(state: dict, images: torch.Tensor, topn: int) -> torch.Tensor:
    """The released code's eval forward on its own state dict (GWP pooling, τ = 0.5)."""
    tv = torchvision.models.resnet50(weights=None)
    features = nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool, tv.layer1, tv.layer2, tv.layer3, tv.layer4)
    convclass = nn.Conv2d(2048, state["convclass.weight"].shape[0], 1)
    features.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("features.")})
    convclass.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("convclass.")})
    features.eval()

    def scores(x: torch.Tensor) -> torch.Tensor:
        a = features(x)
        pooled = (F.adaptive_avg_pool2d(a, 1) + F.adaptive_max_pool2d(a, 1)) / 2
        return torch.sigmoid(convclass(pooled).flatten(1)), convclass(a)

    g, cams = scores(images)
    _, regions = released_global_to_local(images, cams, g, topn)
    local = torch.stack([scores(regions[b])[0].max(dim=0).values for b in range(images.shape[0])])
    return torch.maximum(g, local)


def test_released_checkpoint_gives_released_predictions(tmp_path) -> None:
    state = released_state_dict("resnet50", num_classes=6)
    path = tmp_path / "mcar_released.pth.tar"
    torch.save({"state_dict": state, "epoch": 30, "best_score": 0.0}, path)
    model = fastmlr.create_model("mcar", backbone="resnet50", num_classes=6, image_size=128, checkpoint=path)
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        stages = model.forward_stages(images)
        theirs = released_mcar_forward({k[7:]: v for k, v in state.items()}, images, topn=4)
    assert 0.01 < stages.global_scores.min() and stages.global_scores.max() < 0.99, "scores must not saturate"
    assert not torch.equal(stages.boxes[0], stages.boxes[1]), "boxes should depend on the image"
    torch.testing.assert_close(stages.probs, theirs, atol=1e-5, rtol=0)


def test_checkpoint_round_trip(tmp_path) -> None:
    model = small_mcar()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(model, path)
    again = fastmlr.create_model("mcar", backbone="mobilenet_v2", num_classes=10, image_size=64, checkpoint=path)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(images), again(images))


def test_checkpoint_errors(tmp_path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(small_mcar().state_dict(), path)  # a bare state dict: no saved configuration to apply
    with pytest.raises(ValueError, match=r"convclass\.weight: checkpoint \(10, 1280, 1, 1\) vs model \(7, 1280"):
        small_mcar(num_classes=7, checkpoint=path)
    with pytest.raises(ValueError, match="keys missing|unexpected"):
        fastmlr.create_model("mcar", backbone="resnet50", num_classes=10, image_size=64, checkpoint=path)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        small_mcar(checkpoint=tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt"):
        small_mcar(checkpoint=corrupt)


def test_training_outputs_and_pair_loss() -> None:
    model = small_mcar().train()
    images, targets = torch.rand(2, 3, 64, 64), torch.randint(0, 2, (2, 10)).float()
    g, l = model(images)
    assert g.shape == l.shape == (2, 10)
    loss = mcar_loss(g, l, targets)
    expected = F.binary_cross_entropy(g, targets) + F.binary_cross_entropy(l, targets)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.convclass.weight.grad is not None and model.convclass.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same shape"):
        mcar_loss(g, l, targets[:, :3])


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.rand(3, 64, 64), "4-D"),
        (torch.randint(0, 255, (1, 3, 64, 64)), "floating"),
        (torch.rand(1, 1, 64, 64), "3 channels"),
        (torch.rand(1, 3, 64, 70), "multiples of 32"),
        (torch.rand(0, 3, 64, 64), "empty batch"),
        (torch.full((1, 3, 64, 64), float("nan")), "NaN"),
    ],
)
def test_bad_images(images: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        small_mcar()(images)


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"topn": 0}, "topn"),
        ({"topn": 11}, "topn"),
        ({"threshold": 1.0}, "threshold"),
        ({"threshold": 0.0}, "threshold"),
        ({"pooling": "sum"}, "pooling"),
        ({"backbone": "vgg16"}, "backbone"),
        ({"image_size": 100}, "multiple of 32"),
    ],
)
def test_bad_options(cfg: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        small_mcar(**cfg)


def test_registry() -> None:
    assert {"baseline", "mcar"} <= set(fastmlr.list_models())
    with pytest.raises(ValueError, match="unknown model"):
        fastmlr.create_model("nope")
