"""Baseline: pooling choices, shapes, backbone weight files."""

from __future__ import annotations

import pytest
import torch
import torchvision

import fastmlr
from fastmlr.models.baseline import global_pool


def test_global_pool_variants() -> None:
    x = torch.randn(2, 5, 3, 4)
    avg, mx = x.mean(dim=(2, 3)), x.amax(dim=(2, 3))
    torch.testing.assert_close(global_pool(x, "avg").flatten(1), avg)
    torch.testing.assert_close(global_pool(x, "max").flatten(1), mx)
    torch.testing.assert_close(global_pool(x, "gwp").flatten(1), (avg + mx) / 2)  # MCAR eq. 15, λ = 0.5


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "resnet50"])
@pytest.mark.parametrize("pooling", ["avg", "max", "gwp"])
def test_baseline_outputs(backbone: str, pooling: str) -> None:
    model = fastmlr.create_model("baseline", backbone=backbone, num_classes=7, image_size=64, pooling=pooling)
    with torch.no_grad():
        probs = model(torch.rand(2, 3, 64, 96))
    assert probs.shape == (2, 7) and ((probs >= 0) & (probs <= 1)).all()


def test_backbone_weight_file(tmp_path) -> None:
    tv = torchvision.models.mobilenet_v2(weights=None)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(tv.state_dict(), path)
    model = fastmlr.create_model("baseline", backbone="mobilenet_v2", image_size=64, backbone_weights=path)
    torch.testing.assert_close(model.features[0][0].weight, tv.features[0][0].weight)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        fastmlr.create_model("baseline", backbone="mobilenet_v2", backbone_weights=tmp_path / "missing.pth")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="lacks"):
        fastmlr.create_model("baseline", backbone="mobilenet_v2", backbone_weights=tmp_path / "wrong.pth")


def test_config_keeps_plain_options_only(tmp_path) -> None:
    import numpy as np

    from fastmlr.checkpoint import save_checkpoint

    emb = tmp_path / "emb.npy"
    np.save(emb, np.random.rand(5, 300).astype("float32"))
    model = fastmlr.create_model(
        "mlgcn", backbone="mobilenet_v2", num_classes=5, image_size=64, adjacency=np.eye(5), label_embeddings=emb
    )
    assert model.config["label_embeddings"] == str(emb) and "adjacency" not in model.config
    save_checkpoint(model, tmp_path / "m.pt")  # loads back under weights_only=True
    # The checkpoint's buffers replace the stand-ins the model is built with (5 classes: no packaged graph).
    again = fastmlr.create_model("mlgcn", backbone="mobilenet_v2", num_classes=5, image_size=64,
                                 checkpoint=tmp_path / "m.pt")
    assert torch.equal(again.correlation, model.correlation)
    assert torch.equal(again.word_embeddings, model.word_embeddings)
