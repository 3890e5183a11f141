"""A fastmlr checkpoint carries its model's configuration: loading applies it, contradictions and
foreign models are refused, and non-finite weights never load."""

from __future__ import annotations

import pytest
import torch

import fastmlr
from fastmlr.checkpoint import read_checkpoint, save_checkpoint
from fastmlr.testing import calibrate_batchnorm

SMALL = {"backbone": "mobilenet_v2", "num_classes": 10, "image_size": 64}


@pytest.fixture(scope="module")
def saved_mcar(tmp_path_factory) -> tuple[torch.nn.Module, object]:
    """An MCAR with non-default options (max pooling, top-2, τ = 0.3), saved."""
    torch.manual_seed(0)
    model = fastmlr.create_model("mcar", **SMALL, pooling="max", topn=2, threshold=0.3)
    calibrate_batchnorm(model, torch.rand(4, 3, 64, 64))
    path = tmp_path_factory.mktemp("ckpt") / "mcar.pt"
    save_checkpoint(model, path)
    return model, path


def test_loading_applies_the_saved_configuration(saved_mcar) -> None:
    model, path = saved_mcar
    loaded = fastmlr.create_model("mcar", checkpoint=path)
    assert (loaded.pooling, loaded.topn, loaded.threshold) == ("max", 2, 0.3)
    assert (loaded.backbone_name, loaded.num_classes, loaded.image_size) == ("mobilenet_v2", 10, 64)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        theirs, ours = model.forward_stages(images), loaded.forward_stages(images)
    assert torch.equal(ours.probs, theirs.probs) and torch.equal(ours.boxes, theirs.boxes)


def test_agreeing_arguments_are_accepted(saved_mcar) -> None:
    _, path = saved_mcar
    loaded = fastmlr.create_model("mcar", checkpoint=path, backbone="mobilenet_v2", topn=2, threshold=0.3)
    assert loaded.config["pooling"] == "max"


@pytest.mark.parametrize("option, value, saved", [
    ("pooling", "gwp", "'max'"), ("topn", 4, "2"), ("threshold", 0.5, "0.3"),
    ("num_classes", 7, "10"), ("image_size", 96, "64"), ("backbone", "resnet50", "'mobilenet_v2'"),
])
def test_a_contradicting_argument_names_both_values(saved_mcar, option, value, saved) -> None:
    _, path = saved_mcar
    with pytest.raises(ValueError, match=rf"{option}={value!r} contradicts .* saved with {option}={saved}"):
        fastmlr.create_model("mcar", checkpoint=path, **{option: value})


def test_a_checkpoint_of_another_model_fails(saved_mcar, tmp_path) -> None:
    # baseline and MCAR have the same state-dict layout: only the saved name tells them apart.
    _, path = saved_mcar
    with pytest.raises(ValueError, match="saved from model 'mcar', not 'baseline'"):
        fastmlr.create_model("baseline", checkpoint=path)
    baseline = tmp_path / "baseline.pt"
    save_checkpoint(fastmlr.create_model("baseline", **SMALL), baseline)
    with pytest.raises(ValueError, match="saved from model 'baseline', not 'mcar'"):
        fastmlr.create_model("mcar", checkpoint=baseline)
    with pytest.raises(ValueError, match="saved from model 'baseline', not 'mcar'"):
        fastmlr.checkpoint.load_checkpoint(fastmlr.create_model("mcar", **SMALL), baseline)


def test_a_foreign_checkpoint_takes_arguments_and_defaults(saved_mcar, tmp_path) -> None:
    model, _ = saved_mcar
    bare = tmp_path / "bare.pt"
    torch.save({"state_dict": model.state_dict()}, bare)  # the released layout: no configuration
    assert read_checkpoint(bare).config is None
    loaded = fastmlr.create_model("mcar", **SMALL, checkpoint=bare, topn=3)
    assert (loaded.pooling, loaded.topn, loaded.threshold) == ("gwp", 3, 0.5)


def test_unknown_options_are_named() -> None:
    with pytest.raises(ValueError, match="has no option topk; its options: .*'topn'"):
        fastmlr.create_model("mcar", **SMALL, topk=2)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_do_not_load(saved_mcar, tmp_path, value) -> None:
    model, _ = saved_mcar
    state = model.state_dict()
    state["convclass.weight"] = state["convclass.weight"].clone()
    state["convclass.weight"][3, 7] = value
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError, match=r"weight 'convclass.weight' contains 1 NaN or infinite value"):
        fastmlr.create_model("mcar", **SMALL, checkpoint=path)


def test_option_types_are_named() -> None:
    with pytest.raises(ValueError, match=r"num_classes must be an int, got '80' \(str\)"):
        fastmlr.create_model("mcar", backbone="mobilenet_v2", num_classes="80", image_size=64)
    with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1\), got None"):
        fastmlr.create_model("mcar", **SMALL, threshold=None)
    with pytest.raises(ValueError, match="topn must be an integer"):
        fastmlr.create_model("mcar", **SMALL, topn="2")
