"""What enters a model or a kernel is checked: dtypes against the weights, finite class maps; and
inputs that require grad get gradients through MCAR's global-to-local step."""

from __future__ import annotations

import pytest
import torch

import fastmlr
from fastmlr import kernels

SMALL = {"backbone": "mobilenet_v2", "num_classes": 5, "image_size": 64}


@pytest.fixture(scope="module")
def mcar() -> torch.nn.Module:
    torch.manual_seed(0)
    return fastmlr.create_model("mcar", **SMALL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_images_of_another_dtype_than_the_weights_name_both(mcar, dtype) -> None:
    images = torch.rand(1, 3, 64, 64, dtype=dtype)
    with pytest.raises(ValueError, match=rf"images are {dtype} but the model's weights are torch.float32"):
        mcar(images)


def test_half_model_takes_half_images() -> None:
    model = fastmlr.create_model("baseline", **SMALL).to(torch.bfloat16)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_class_maps_are_refused(value) -> None:
    cam_logits = torch.randn(2, 6, 7, 7)
    cam_logits[1, 4, 3, 2] = value
    indices = torch.tensor([[0, 1], [4, 2]])
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="localize_regions: cam_logits contains 1 NaN or infinite value"):
            kernels.localize_regions(cam_logits, indices, (64, 64), backend=backend)


@pytest.mark.parametrize("train", [False, True])
def test_mcar_inputs_that_require_grad_get_gradients(mcar, train) -> None:
    images = torch.rand(1, 3, 64, 64, requires_grad=True)
    mcar.train(train)
    try:
        outputs = mcar(images)
    finally:
        mcar.eval()
    loss = sum(o.sum() for o in outputs) if train else outputs.sum()
    loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_crop_resize_gradient_matches_the_reference() -> None:
    images = torch.rand(1, 2, 8, 10, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[[0, 0, 6, 5], [3, 2, 10, 8]]])
    assert torch.autograd.gradcheck(lambda x: kernels.crop_resize(x, boxes, (4, 5)), (images,))
    with torch.no_grad():  # without grad the fast per-region path still runs, and agrees
        fast = kernels.crop_resize(images, boxes, (4, 5))
    torch.testing.assert_close(kernels.crop_resize(images, boxes, (4, 5)).detach(), fast)
