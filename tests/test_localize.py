"""localize_regions (docs/mcar-localization.md §1 steps 2, 3, 5 and §3) against a loop oracle that
upsamples ALL class maps with F.interpolate, and Triton (CPU interpreter) against torch."""

import logging
import warnings

import fastmlr.kernels._dispatch as dispatch
import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from fastmlr.kernels import localize_regions, use_backend
from fastmlr.kernels.localize import axis_sampling, max_marginals, selected_maps

from fastmlr.testing import interval_search_loop, normalise_profile

# (h, w, H, W): square and non-square maps, upsampling by integer and non-integer factors.
SHAPES = [(14, 14, 64, 64), (7, 5, 33, 48), (3, 9, 20, 71), (1, 4, 16, 12)]


def oracle_boxes(cam_logits: torch.Tensor, indices: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The released code's way: sigmoid and upsample every class map, then loop over images and
    selected classes in Python."""
    upsampled = F.interpolate(torch.sigmoid(cam_logits), (height, width), mode="bilinear", align_corners=True)
    boxes = []
    for b in range(indices.shape[0]):
        row = []
        for c in indices[b].tolist():
            cam = upsampled[b, c]
            x1, x2 = interval_search_loop(normalise_profile(cam.amax(dim=0)), 0.5)
            y1, y2 = interval_search_loop(normalise_profile(cam.amax(dim=1)), 0.5)
            row.append([x1, y1, x2, y2])
        boxes.append(row)
    return torch.tensor(boxes, dtype=torch.long)


def random_case(h: int, w: int, batch: int = 2, classes: int = 6, regions: int = 3):
    cam_logits = torch.randn(batch, classes, h, w) * 3
    indices = torch.stack([torch.randperm(classes)[:regions] for _ in range(batch)])
    return cam_logits, indices


@pytest.mark.parametrize(("h", "w", "H", "W"), SHAPES)
def test_torch_matches_loop_oracle(h: int, w: int, H: int, W: int) -> None:
    for _ in range(3):
        cam_logits, indices = random_case(h, w, batch=3, classes=10, regions=4)
        got = localize_regions(cam_logits, indices, (H, W), backend="torch")
        torch.testing.assert_close(got, oracle_boxes(cam_logits, indices, H, W), rtol=0, atol=0)


def test_mcar_size_matches_loop_oracle() -> None:
    """The paper's configuration: 14×14 maps, 448×448 input, 80 classes, top 4."""
    cam_logits, indices = random_case(14, 14, batch=2, classes=80, regions=4)
    got = localize_regions(cam_logits, indices, 448, backend="torch")
    torch.testing.assert_close(got, oracle_boxes(cam_logits, indices, 448, 448), rtol=0, atol=0)
    assert ((got[..., 0] < got[..., 2]) & (got[..., 1] < got[..., 3])).all()
    assert (got >= 0).all() and (got <= 448).all()


@pytest.mark.parametrize(("h", "w", "H", "W"), SHAPES)
def test_triton_matches_torch(h: int, w: int, H: int, W: int) -> None:
    cam_logits, indices = random_case(h, w)
    expected = localize_regions(cam_logits, indices, (H, W), backend="torch")
    got = localize_regions(cam_logits, indices, (H, W), backend="triton")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(got, oracle_boxes(cam_logits, indices, H, W), rtol=0, atol=0)


@pytest.mark.parametrize(("h", "w", "H", "W"), SHAPES)
def test_profiles_match_upsampling(h: int, w: int, H: int, W: int) -> None:
    """The max-marginals from the extremal rows/columns equal upsample-then-max up to torch's own
    rounding (1 ulp); torch and Triton compute them bit for bit alike."""
    cam_logits, indices = random_case(h, w, batch=4, classes=8, regions=4)
    maps = selected_maps(cam_logits, indices)
    upsampled = F.interpolate(maps, (H, W), mode="bilinear", align_corners=True)
    px, py = max_marginals(maps, (H, W), backend="torch")
    torch.testing.assert_close(px, upsampled.amax(-2), rtol=0, atol=2.5e-7)
    torch.testing.assert_close(py, upsampled.amax(-1), rtol=0, atol=2.5e-7)
    px_triton, py_triton = max_marginals(maps, (H, W), backend="triton")
    torch.testing.assert_close(px_triton, px, rtol=0, atol=0)
    torch.testing.assert_close(py_triton, py, rtol=0, atol=0)


@pytest.mark.parametrize(("h", "H"), [(14, 448), (7, 33), (3, 20), (1, 16), (5, 5), (9, 4)])
def test_axis_sampling(h: int, H: int) -> None:
    """The sampling tables reproduce F.interpolate along one axis (to its 1-ulp rounding), and the
    extremal outputs are the first and last of every run of equal source index."""
    i0, i1, lambda0, lambda1, extremal = axis_sampling(h, H)
    signal = torch.rand(h)
    expected = F.interpolate(signal[None, None], H, mode="linear", align_corners=True)[0, 0]
    got = torch.from_numpy(lambda0) * signal[i0] + torch.from_numpy(lambda1) * signal[i1]
    torch.testing.assert_close(got, expected, rtol=0, atol=1.2e-7)
    runs = [[k for k in range(H) if i0[k] == r] for r in sorted(set(i0.tolist()))]
    assert extremal.tolist() == sorted({k for run in runs for k in (run[0], run[-1])})


def test_triton_mcar_size() -> None:
    cam_logits, indices = random_case(14, 14, batch=1, classes=80, regions=4)
    expected = localize_regions(cam_logits, indices, 448, backend="torch")
    torch.testing.assert_close(localize_regions(cam_logits, indices, 448, backend="triton"), expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shapes_dtypes_and_duplicates(backend: str) -> None:
    cam_logits = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    indices = torch.tensor([[4, 4], [0, 3]], dtype=torch.int32)  # repeated class: same box twice
    boxes = localize_regions(cam_logits, indices, (24, 30), backend=backend)
    assert boxes.shape == (2, 2, 4) and boxes.dtype == torch.long
    assert boxes[0, 0].tolist() == boxes[0, 1].tolist()
    assert localize_regions(cam_logits.half(), indices, (24, 30), backend=backend).shape == (2, 2, 4)
    empty = localize_regions(cam_logits, indices[:, :0], 24, backend=backend)
    assert empty.shape == (2, 0, 4)


@pytest.mark.parametrize(
    ("cam_logits", "indices", "image_size", "threshold", "message"),
    [
        (torch.randn(2, 5, 6), torch.zeros(2, 1, dtype=torch.long), 32, 0.5, r"\[B, C, h, w\]"),
        (torch.randn(2, 5, 6, 6).long(), torch.zeros(2, 1, dtype=torch.long), 32, 0.5, "floating"),
        (torch.randn(2, 5, 6, 6), torch.zeros(3, 1, dtype=torch.long), 32, 0.5, r"\[B, N\]"),
        (torch.randn(2, 5, 6, 6), torch.zeros(2, dtype=torch.long), 32, 0.5, r"\[B, N\]"),
        (torch.randn(2, 5, 6, 6), torch.zeros(2, 1), 32, 0.5, "integer"),
        (torch.randn(2, 5, 6, 6), torch.full((2, 1), 5), 32, 0.5, r"\[0, 5\)"),
        (torch.randn(2, 5, 6, 6), torch.full((2, 1), -1), 32, 0.5, r"\[0, 5\)"),
        (torch.randn(2, 5, 6, 6), torch.zeros(2, 1, dtype=torch.long), 1, 0.5, "image_size"),
        (torch.randn(2, 5, 6, 6), torch.zeros(2, 1, dtype=torch.long), (32, 32, 3), 0.5, "image_size"),
        (torch.randn(2, 5, 6, 6), torch.zeros(2, 1, dtype=torch.long), torch.tensor(32), 0.5, "image_size"),
        (torch.randn(2, 5, 6, 6), torch.zeros(2, 1, dtype=torch.long), 32, 1.5, "threshold"),
    ],
)
def test_bad_input(cam_logits, indices, image_size, threshold, message) -> None:
    with pytest.raises(ValueError, match=message):
        localize_regions(cam_logits, indices, image_size, threshold)


def test_use_backend_and_fallback(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    cam_logits, indices = random_case(5, 5)
    expected = localize_regions(cam_logits, indices, 20, backend="torch")
    with use_backend("triton"):
        torch.testing.assert_close(localize_regions(cam_logits, indices, 20, backend="torch"), expected)
    monkeypatch.setattr(dispatch, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(dispatch, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="fastmlr.kernels"):
        for _ in range(2):
            torch.testing.assert_close(localize_regions(cam_logits, indices, 20, backend="triton"), expected)
    assert len([r for r in caplog.records if "localize_regions" in r.getMessage()]) == 1


@requires_cuda
def test_cuda_triton_matches_torch() -> None:
    cam_logits, indices = random_case(14, 14, batch=8, classes=80, regions=4)
    expected = localize_regions(cam_logits, indices, 448, backend="torch")
    got = localize_regions(cam_logits.cuda(), indices.cuda(), 448, backend="triton")
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)


def test_torch_references_export_to_onnx(tmp_path) -> None:
    """localize_regions → crop_resize (torch references, image size read from the traced input's shape
    as MCAR does) trace at opset 17 with a dynamic batch axis; traced at batch 2, ONNX Runtime gives
    the same boxes and crops at batch 1 and 3."""
    ort = pytest.importorskip("onnxruntime")
    from fastmlr.kernels import crop_resize

    class GlobalToLocal(torch.nn.Module):
        def forward(self, cam_logits, indices, images):
            size = tuple(images.shape[-2:])  # 0-dim tensors while tracing
            boxes = localize_regions(cam_logits, indices, size, backend="torch")
            return boxes, crop_resize(images, boxes, (16, 24), mean=0.5, std=0.25, backend="torch")

    def case(batch: int) -> tuple[torch.Tensor, ...]:
        cam_logits, indices = random_case(7, 5, batch=batch)
        return cam_logits, indices, torch.rand(batch, 3, 48, 40)

    path = tmp_path / "g2l.onnx"
    names = ["cam_logits", "indices", "images", "boxes", "crops"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on the shape-derived sizes (fixed in the graph)
        torch.onnx.export(GlobalToLocal(), case(2), str(path), opset_version=17, dynamo=False,
                          input_names=names[:3], output_names=names[3:],
                          dynamic_axes={name: {0: "batch"} for name in names})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        args = case(batch)
        boxes, crops = session.run(None, {name: a.numpy() for name, a in zip(names, args, strict=False)})
        expected_boxes, expected_crops = GlobalToLocal()(*args)
        torch.testing.assert_close(torch.from_numpy(boxes), expected_boxes, rtol=0, atol=0)
        torch.testing.assert_close(torch.from_numpy(crops), expected_crops, rtol=0, atol=1e-6)
