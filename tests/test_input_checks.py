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


def test_mcar_memory_model_refuses_before_allocating(mcar, monkeypatch) -> None:
    # The probe's case: mobilenet_v2 MCAR on one 4096x4096 image, on a machine with 16 GiB.
    from fastmlr.models.mcar import forward_bytes

    monkeypatch.delenv("FASTMLR_MEMORY_LIMIT", raising=False)
    monkeypatch.setattr("fastmlr.checks.machine_memory", lambda device="cpu": 16 * 2**30)
    images = torch.zeros(1, 3, 4096, 4096)
    assert forward_bytes(1, 4, 4096, 4096, "mobilenet_v2") > 16 * 2**30
    with torch.no_grad(), pytest.raises(ValueError, match=r"would need about 17\.\d GiB, more than the 16\.0 GiB"):
        mcar(images)


def test_memory_limit_is_overridable(mcar, monkeypatch) -> None:
    images = torch.rand(1, 3, 64, 64)
    monkeypatch.setenv("FASTMLR_MEMORY_LIMIT", "1M")
    with torch.no_grad(), pytest.raises(ValueError, match="FASTMLR_MEMORY_LIMIT"):
        mcar.check_memory(images)
    monkeypatch.setenv("FASTMLR_MEMORY_LIMIT", "none")
    with torch.no_grad():
        mcar.check_memory(images)
    monkeypatch.delenv("FASTMLR_MEMORY_LIMIT")
    mcar.memory_limit = 1024
    try:
        with torch.no_grad(), pytest.raises(ValueError, match="more than the 0.0 GiB limit"):
            mcar.check_memory(images)
    finally:
        del mcar.memory_limit
    monkeypatch.setenv("FASTMLR_MEMORY_LIMIT", "lots")
    with pytest.raises(ValueError, match="FASTMLR_MEMORY_LIMIT='LOTS'"):
        mcar.check_memory(images)


def test_memory_model_counts_autograd() -> None:
    from fastmlr.models.mcar import forward_bytes

    # The measured peaks of bench/results/mcar_memory.json, within 15 %.
    assert forward_bytes(1, 4, 512, 512, "mobilenet_v2", grad=True) == pytest.approx(2_106_966_016, rel=0.15)
    assert forward_bytes(2, 4, 768, 768, "mobilenet_v2") == pytest.approx(1_295_736_832, rel=0.15)
    assert forward_bytes(1, 4, 512, 512, "resnet101") == pytest.approx(325_312_512, rel=0.15)
