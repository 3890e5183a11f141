"""crop_resize (docs/mcar-localization.md §4): torch reference against per-crop F.interpolate, Triton
(CPU interpreter) against the torch reference, normalisation, output dtypes, edge boxes, bad input."""

import logging

import fastmlr.kernels._dispatch as dispatch
import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from fastmlr.kernels import crop_resize, use_backend

# Edge cases: the whole image, 1-pixel-wide and 1-pixel-high boxes at each border, a 1×1 box in a
# corner, and ordinary interior boxes.
EDGE_BOXES = torch.tensor(
    [
        [[0, 0, 50, 40], [0, 0, 1, 40], [49, 0, 50, 40], [0, 39, 50, 40], [49, 39, 50, 40]],
        [[0, 0, 50, 1], [3, 5, 4, 30], [10, 7, 33, 8], [5, 6, 45, 31], [0, 0, 1, 1]],
    ]
)


def loop_oracle(images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per image, per box: ``F.interpolate`` of the crop (the released code's loop)."""
    return torch.stack(
        [
            torch.cat(
                [
                    F.interpolate(
                        images[b : b + 1, :, y1:y2, x1:x2], size, mode="bilinear", align_corners=True
                    )
                    for x1, y1, x2, y2 in boxes[b].tolist()
                ]
            )
            for b in range(boxes.shape[0])
        ]
    )


def random_boxes(batch: int, n_boxes: int, height: int, width: int) -> torch.Tensor:
    x = torch.sort(torch.randint(0, width + 1, (batch, n_boxes, 2)), -1).values
    y = torch.sort(torch.randint(0, height + 1, (batch, n_boxes, 2)), -1).values
    x[..., 1] = torch.maximum(x[..., 1], x[..., 0] + 1).clamp(max=width)
    x[..., 0] = torch.minimum(x[..., 0], x[..., 1] - 1)
    y[..., 1] = torch.maximum(y[..., 1], y[..., 0] + 1).clamp(max=height)
    y[..., 0] = torch.minimum(y[..., 0], y[..., 1] - 1)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1)


@pytest.mark.parametrize("size", [(24, 17), (40, 50), (64, 64), (1, 5), (7, 1), (1, 1)])
def test_torch_matches_per_crop_interpolate(size: tuple[int, int]) -> None:
    images = torch.rand(2, 3, 40, 50)
    for boxes in (EDGE_BOXES, random_boxes(2, 6, 40, 50)):
        got = crop_resize(images, boxes, size, backend="torch")
        assert got.shape == (2, boxes.shape[1], 3, *size) and got.dtype == torch.float32
        torch.testing.assert_close(got, loop_oracle(images, boxes, size), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [(64, 64), (96, 128), (1, 5)])
def test_auto_on_cpu_is_per_region_interpolate_bit_for_bit(size: tuple[int, int]) -> None:
    """``auto`` on CPU runs torch's own kernel per region: the released code's crops exactly, normalised
    and cast like the other paths; forcing ``torch`` runs the vectorised reference instead."""
    images = torch.rand(2, 3, 120, 100)
    boxes = random_boxes(2, 6, 120, 100)
    assert torch.equal(crop_resize(images, boxes, size), loop_oracle(images, boxes, size))
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    expected = crop_resize(images, boxes, size, mean=mean, std=std, out_dtype=torch.float16, backend="torch")
    got = crop_resize(images, boxes, size, mean=mean, std=std, out_dtype=torch.float16)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)  # fp16: within one unit in the last place
    with use_backend("torch"):
        forced = crop_resize(images, boxes, size)
    torch.testing.assert_close(forced, loop_oracle(images, boxes, size), rtol=0, atol=1e-6)


def test_real_image_matches_per_crop_interpolate(shared_images) -> None:
    from PIL import Image

    image = Image.open(shared_images[0]).convert("RGB").resize((96, 80))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(80, 96, 3)
    images = pixels.permute(2, 0, 1)[None].float() / 255
    boxes = random_boxes(1, 5, 80, 96)
    got = crop_resize(images, boxes, 64, backend="torch")
    torch.testing.assert_close(got, loop_oracle(images, boxes, (64, 64)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [(24, 17), (1, 5), (40, 50)])
def test_triton_matches_torch(size: tuple[int, int]) -> None:
    images = torch.rand(2, 3, 40, 50)
    for boxes in (EDGE_BOXES, random_boxes(2, 4, 40, 50)):
        expected = crop_resize(images, boxes, size, backend="torch")
        got = crop_resize(images, boxes, size, backend="triton")
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_normalisation_and_out_dtype(backend: str) -> None:
    images = torch.rand(2, 3, 40, 50)
    boxes = random_boxes(2, 3, 40, 50)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    plain = loop_oracle(images, boxes, (16, 16))
    expected = (plain - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    got = crop_resize(images, boxes, 16, mean=mean, std=std, backend=backend)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    for dtype in (torch.float16, torch.bfloat16):
        low = crop_resize(images, boxes, 16, mean=mean, std=std, out_dtype=dtype, backend=backend)
        assert low.dtype == dtype
        torch.testing.assert_close(low, got.to(dtype), rtol=0, atol=0)
    only_mean = crop_resize(images, boxes, 16, mean=0.5, backend=backend)
    torch.testing.assert_close(only_mean, plain - 0.5, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_input_dtypes_and_layouts(backend: str) -> None:
    images = torch.rand(1, 3, 40, 50)
    boxes = random_boxes(1, 3, 40, 50)
    expected = loop_oracle(images, boxes, (12, 20))
    channels_last = images.to(memory_format=torch.channels_last)
    torch.testing.assert_close(
        crop_resize(channels_last, boxes, (12, 20), backend=backend), expected, atol=1e-6, rtol=0
    )
    as_uint8 = (images * 255).round().to(torch.uint8)
    got = crop_resize(as_uint8, boxes.int(), (12, 20), backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, loop_oracle(as_uint8.float(), boxes, (12, 20)), atol=1e-4, rtol=0)
    double = crop_resize(images.double(), boxes, (12, 20), backend=backend)
    assert double.dtype == torch.float64
    torch.testing.assert_close(double, loop_oracle(images.double(), boxes, (12, 20)), atol=1e-6, rtol=0)
    assert crop_resize(images, boxes[:, :0], 8, backend=backend).shape == (1, 0, 3, 8, 8)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_writes_into_out(backend: str, out_dtype: torch.dtype) -> None:
    """``out=`` is filled with exactly what the call returns without it (stale contents overwritten),
    and returned; its dtype is the output dtype."""
    images = torch.rand(2, 3, 40, 50)
    boxes = torch.cat([EDGE_BOXES[:, :3], random_boxes(2, 3, 40, 50)], 1)
    kwargs = {"mean": [0.485, 0.456, 0.406], "std": 0.25, "backend": backend}
    expected = crop_resize(images, boxes, (24, 17), out_dtype=out_dtype, **kwargs)
    out = torch.full((2, 6, 3, 24, 17), float("nan"), dtype=out_dtype)
    got = crop_resize(images, boxes, (24, 17), out=out, **kwargs)
    assert got is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    plain = crop_resize(images, boxes, (24, 17), backend=backend)
    assert crop_resize(images, boxes, (24, 17), out=torch.empty_like(plain), backend=backend).equal(plain)


@pytest.mark.parametrize(
    ("out", "kwargs", "message"),
    [
        (torch.empty(1, 2, 3, 8, 9), {}, r"shape \[1, 2, 3, 8, 8\]"),
        (torch.empty(1, 2, 3, 8, 8, dtype=torch.float16), {"out_dtype": torch.float32}, "float32 tensor"),
        (torch.empty(1, 2, 3, 8, 8, dtype=torch.int32), {}, "out_dtype"),
        (torch.empty(1, 2, 8, 8, 3).permute(0, 1, 4, 2, 3), {}, "contiguous"),
        (torch.empty(1, 2, 3, 8, 8).tolist(), {}, "torch.Tensor"),
    ],
)
def test_bad_out(out: object, kwargs: dict, message: str) -> None:
    images, boxes = torch.rand(1, 3, 40, 50), random_boxes(1, 2, 40, 50)
    with pytest.raises(ValueError, match=message):
        crop_resize(images, boxes, 8, out=out, **kwargs)


@pytest.mark.parametrize(
    ("boxes", "kwargs", "message"),
    [
        (torch.tensor([[[0, 0, 51, 40]]]), {}, "inside"),
        (torch.tensor([[[-1, 0, 10, 10]]]), {}, "inside"),
        (torch.tensor([[[0, 0, 10, 41]]]), {}, "inside"),
        (torch.tensor([[[5, 0, 5, 10]]]), {}, "x1 < x2"),
        (torch.tensor([[[0, 9, 5, 3]]]), {}, "y1 < y2"),
        (torch.tensor([[[0.0, 0, 5, 5]]]), {}, "integer"),
        (torch.tensor([[0, 0, 5, 5]]), {}, r"\[B, N, 4\]"),
        (torch.tensor([[[0, 0, 5, 5]], [[0, 0, 5, 5]]]), {}, "2 images"),
        (torch.tensor([[[0, 0, 5, 5]]]), {"size": 0}, "size"),
        (torch.tensor([[[0, 0, 5, 5]]]), {"mean": [0.5, 0.5]}, "one value per channel"),
        (torch.tensor([[[0, 0, 5, 5]]]), {"out_dtype": torch.int32}, "out_dtype"),
    ],
)
def test_bad_input(boxes: torch.Tensor, kwargs: dict, message: str) -> None:
    images = torch.rand(1, 3, 40, 50)
    size = kwargs.pop("size", 8)
    with pytest.raises(ValueError, match=message):
        crop_resize(images, boxes, size, **kwargs)


def test_bad_images() -> None:
    boxes = torch.tensor([[[0, 0, 5, 5]]])
    with pytest.raises(ValueError, match=r"\[B, Ch, H, W\]"):
        crop_resize(torch.rand(3, 40, 50), boxes, 8)
    with pytest.raises(ValueError, match="floating point or uint8"):
        crop_resize(torch.zeros(1, 3, 40, 50, dtype=torch.int32), boxes, 8)


def test_use_backend_and_fallback(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    images, boxes = torch.rand(1, 3, 20, 20), random_boxes(1, 2, 20, 20)
    expected = crop_resize(images, boxes, 8, backend="torch")
    with use_backend("torch"):
        torch.testing.assert_close(crop_resize(images, boxes, 8, backend="triton"), expected)
    monkeypatch.setattr(dispatch, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(dispatch, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="fastmlr.kernels"):
        for _ in range(2):
            torch.testing.assert_close(crop_resize(images, boxes, 8, backend="triton"), expected)
    assert len([r for r in caplog.records if "crop_resize" in r.getMessage()]) == 1


@requires_cuda
def test_cuda_triton_matches_torch() -> None:
    images = torch.rand(4, 3, 448, 448)
    boxes = random_boxes(4, 4, 448, 448)
    expected = crop_resize(images, boxes, 448, backend="torch")
    got = crop_resize(images.cuda(), boxes.cuda(), 448, backend="triton")
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=1e-5)
    half = crop_resize(
        images.cuda(), boxes.cuda(), 448, mean=0.5, std=0.25, out_dtype=torch.float16, backend="triton"
    )
    torch.testing.assert_close(half.cpu(), ((expected - 0.5) / 0.25).half(), rtol=0, atol=1e-2)
