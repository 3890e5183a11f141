"""The benchmark cases time the right thing: bench/bench_g2l.py's implementations compute what the
released code does (identical boxes, crops equal to 1e-6), and its grid_sample crop samples the same
points as align-corners bilinear (to 1e-4)."""

import torch

from bench import bench_g2l
from fastmlr.testing import released_global_to_local


def test_g2l_cases_give_the_released_boxes_and_crops() -> None:
    x = bench_g2l.make_inputs(1)
    released_boxes, released_crops = released_global_to_local(
        x["images"], x["cam_logits"], x["global_scores"], bench_g2l.TOP_N
    )
    for impl in ("torch", "auto", "auto-out"):
        out = bench_g2l.local_batch(x["images"]) if impl == "auto-out" else None
        boxes, crops = bench_g2l.step(x, impl, out)
        torch.testing.assert_close(boxes, released_boxes, rtol=0, atol=0)
        torch.testing.assert_close(crops, released_crops, rtol=0, atol=1e-6)
    torch.testing.assert_close(bench_g2l.crop_grid_sample(x["images"], boxes), crops, rtol=0, atol=1e-4)


def test_g2l_speedups_pair_each_implementation_with_its_group_baseline() -> None:
    results = [
        {"group": "step", "impl": "released", "batch": 8, "median_ms": 300.0},
        {"group": "step", "impl": "auto", "batch": 8, "median_ms": 10.0},
        {"group": "crop", "impl": "loop", "batch": 8, "median_ms": 40.0},
        {"group": "crop", "impl": "roi_align", "batch": 8, "median_ms": 20.0},
        {"group": "localize", "impl": "torch", "batch": 1, "median_ms": 1.0},  # its baseline was not timed
    ]
    rows = {(r["group"], r["impl"]): r for r in bench_g2l.speedups(results)}
    assert set(rows) == {("step", "auto"), ("crop", "roi_align")}
    assert rows[("step", "auto")]["speedup"] == 30.0 and rows[("step", "auto")]["meets_target"] is True
    assert rows[("crop", "roi_align")]["baseline"] == "loop" and rows[("crop", "roi_align")]["target"] is None
