"""The tie rules every backend shares, pinned with exact ties (a saturated sigmoid makes them common):
the top-N ranking orders by (score descending, class index ascending) in torch and in the exported
ONNX graph; the interval search keeps the segment holding the maximum, the widest among equal maxima,
and the first examined ([0, z0), then [zk, L), then the inner segments) among equally wide ones — in
the torch reference, the Triton kernel (Triton's interpreter here), the ONNX graph and the
released-code loop."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
from fastmlr.export.onnx_export import stable_sort_symbolic
from fastmlr.kernels import interval_search, localize_regions

from fastmlr.models.mcar import select_top_classes
from fastmlr.testing import interval_search_loop, normalise_profile

#: Scores with exact ties (saturated at 1.0, and equal below) -> the top 3, best first.
RANKINGS = [
    ([0.5, 0.9, 0.9, 0.2, 0.9], [1, 2, 4]),
    ([1.0, 1.0, 1.0, 1.0, 1.0], [0, 1, 2]),
    ([0.1, 1.0, 0.3, 1.0, 0.3], [1, 3, 2]),
]

#: Profiles (L = 12, τ = 0.5, minsize 2) with exact ties -> the interval ``[start, end)``. A segment
#: starts at its crossing index, the last value before the sign change (doc §3).
INTERVALS = [
    # equal maxima: [0, 8) (from the crossing at 0, width 8) beats [8, 12) (width 4): the widest wins
    ([1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1], [0, 8]),
    # equal maxima in equally wide [0, 3) and [9, 12): the first examined, [0, z0), wins
    ([1, 1, 1, 0.8, 0, 0, 0, 0, 0, 0, 1, 1], [0, 3]),
    # equal maxima in equally wide [zk, L) = [9, 12) and inner [3, 6): [zk, L) is examined first
    ([0, 0, 0, 0, 1, 1, 0.8, 0, 0, 0, 1, 1], [9, 12]),
    # a saturated plateau with a dip to exactly τ (sign 0, no crossing): one segment [1, 7)
    ([0, 0, 1, 1, 0.5, 1, 1, 0.8, 0, 0, 0, 0], [1, 7]),
]


def test_top_n_ties_keep_the_lower_class_index_in_torch_and_onnx(tmp_path) -> None:
    class TopN(torch.nn.Module):
        def forward(self, scores: torch.Tensor) -> torch.Tensor:
            return select_top_classes(scores, 3)

    scores = torch.tensor([row for row, _ in RANKINGS])
    expected = torch.tensor([top for _, top in RANKINGS])
    assert torch.equal(select_top_classes(scores, 3), expected)
    path = tmp_path / "topn.onnx"
    with stable_sort_symbolic(17):
        torch.onnx.export(TopN(), (scores,), str(path), opset_version=17, dynamo=False, input_names=["scores"],
                          output_names=["indices"], dynamic_axes={"scores": {0: "b"}, "indices": {0: "b"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"scores": scores.numpy()})[0].tolist() == expected.tolist()
    reversed_rows = scores.flip(0).numpy()  # another batch through the same graph
    assert session.run(None, {"scores": reversed_rows})[0].tolist() == expected.flip(0).tolist()


@pytest.mark.parametrize(("profile", "expected"), INTERVALS)
def test_interval_tie_rules_in_every_backend(profile: list[float], expected: list[int], tmp_path) -> None:
    row = torch.tensor(profile, dtype=torch.float32)
    assert list(interval_search_loop(normalise_profile(row), 0.5)) == expected  # the released rule
    for backend in ("torch", "triton"):
        assert interval_search(row, 0.5, backend=backend).tolist() == expected, backend

    class Search(torch.nn.Module):
        def forward(self, profiles: torch.Tensor) -> torch.Tensor:
            return interval_search(profiles, 0.5, backend="torch")

    path = tmp_path / "search.onnx"
    torch.onnx.export(Search(), (row[None],), str(path), opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.run(None, {session.get_inputs()[0].name: row[None].numpy()})[0].tolist() == [expected]


def test_tied_class_maps_give_tied_boxes_in_torch_and_triton() -> None:
    """Two classes with the same (saturating) map: the same box, whichever backend."""
    generator = torch.Generator().manual_seed(0)
    cam = torch.randn(1, 3, 6, 6, generator=generator) * 20  # logits beyond 16.6 saturate to exactly 1.0
    cam[0, 2] = cam[0, 0]
    indices = torch.tensor([[2, 0, 1]])
    boxes = [localize_regions(cam, indices, 96, backend=b) for b in ("torch", "triton")]
    assert torch.equal(boxes[0], boxes[1]) and torch.equal(boxes[0][0, 0], boxes[0][0, 1])
