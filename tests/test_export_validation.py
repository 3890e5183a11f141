"""Stage-wise validation of exported MCAR artifacts: calibrated random-weight exports pass on the
packaged photos with their decision flips reported; wrong artifacts (another τ, another top-N, a moved
classifier bias, a crop off by one pixel, a local stream that skips a region) are refused at the
right stage; graphs of another model get an error naming the mismatch; the decision margins
themselves against brute-force perturbation."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from fastmlr.export import to_onnx, validate_onnx
from fastmlr.export.decision_margins import IntervalMargins, explain_ranking
from fastmlr.export.validation import (
    DECISIONS,
    FINAL,
    GLOBAL,
    LOCAL,
    ArtifactMismatchError,
    ExportValidationError,
    find_images,
    validate,
    validation_inputs,
)
from fastmlr.kernels import use_backend
from fastmlr.kernels.interval_search import interval_search_reference
from onnx import TensorProto, helper

import fastmlr
from fastmlr import kernels
from fastmlr.cli import main as fastmlr_main
from fastmlr.testing import calibrate_batchnorm

SIZE, NUM_CLASSES, TOPN = 96, 10, 3
SEEDS = (1, 2, 3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: two threads on two busy cores spin on each other many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_mcar(seed: int, **cfg) -> torch.nn.Module:
    """A seeded random-weight MCAR whose BatchNorm statistics are calibrated on random images, so its
    scores and boxes depend on the image."""
    torch.manual_seed(seed)
    model = fastmlr.create_model("mcar", backbone="mobilenet_v2", num_classes=NUM_CLASSES, image_size=SIZE,
                                 topn=TOPN, **cfg)
    calibration = torch.rand(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return calibrate_batchnorm(model, calibration)


@pytest.fixture(scope="module")
def seed_exports(tmp_path_factory):
    """``(model, path, report)`` per seed: exported by ``to_onnx`` and validated there on the packaged
    photos (one batch of all of them)."""
    folder = tmp_path_factory.mktemp("seeds")
    batch = len(find_images())
    exports = []
    for seed in SEEDS:
        model = random_mcar(seed)
        reports = []
        path = to_onnx(model, folder / f"mcar{seed}.onnx", image_size=SIZE, batch=batch, num_random=0,
                       on_validated=reports.append)
        exports.append((model, path, reports[0]))
    return exports


def check(path, model, num_random: int = 0):
    """``validate_onnx`` as ``to_onnx`` runs it for the seed exports."""
    return validate_onnx(path, model, image_size=SIZE, batches=(len(find_images()),), num_random=num_random)


def test_calibrated_random_seeds_pass_with_their_flips_reported(seed_exports) -> None:
    for _, path, report in seed_exports:
        assert report.ok and report.failing_stage is None
        assert list(report.stages) == [GLOBAL, DECISIONS, LOCAL, FINAL]
        assert report.end_to_end.images == len(find_images())
        assert report.decisions_compared == 3 * TOPN * report.end_to_end.images
        # Every image whose boxes differ from PyTorch's is there because of flips within the margins.
        differing = report.end_to_end.images - report.end_to_end.identical_boxes
        assert len(report.flips) >= differing and (differing == 0) == (not report.flips)
        assert len(report.end_to_end.differing_box_ious) >= differing
        for flip in report.flips:
            assert flip.reason and flip.reference != flip.artifact
        summary = report.summary()
        assert summary.startswith("the ONNX export vs PyTorch: passed") and "decisions: ok" in summary
        assert "images with identical boxes" in summary and "|Δprob| max" in summary
        outputs = [o.name for o in onnx.load(str(path)).graph.output]
        assert outputs == ["probs", "boxes", "indices", "global_scores", "local_scores", "cam_logits"]


def test_graph_against_another_tau_is_refused_in_the_decisions(seed_exports) -> None:
    model, path, _ = seed_exports[0]
    other = copy.deepcopy(model)
    other.threshold = 0.6
    with pytest.raises(ExportValidationError, match="in the decisions stage") as info:
        check(path, other)
    assert info.value.stage == DECISIONS and "interval" in str(info.value) and "no profile within" in str(info.value)
    assert info.value.report.stages[GLOBAL].ok  # the streams agree: it is the logic that differs


def test_graph_against_another_top_n_is_refused(seed_exports) -> None:
    model, path, _ = seed_exports[0]
    other = copy.deepcopy(model)
    other.topn = TOPN - 1
    with pytest.raises(ArtifactMismatchError, match=r"3 regions per image \(top-N\), the model 2"):
        check(path, other)


def test_graph_against_a_moved_classifier_bias_is_refused_in_the_global_stream(seed_exports) -> None:
    model, path, _ = seed_exports[0]
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.convclass.bias += 0.05
    with pytest.raises(ExportValidationError, match="in the global stream stage") as info:
        check(path, other)
    assert info.value.stage == GLOBAL and "output 'global_scores' at index" in str(info.value)


def test_crop_off_by_one_pixel_is_refused_in_the_local_stream(tmp_path, monkeypatch) -> None:
    """An exporting model whose crop-resize reads one pixel less on the right (x2 - 1): boxes and
    global stream are right, the regions are not."""
    model = random_mcar(SEEDS[0])
    crop_resize = kernels.crop_resize

    def shifted(images, boxes, size, **kw):
        return crop_resize(images, boxes - torch.tensor([0, 0, 1, 0]), size, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(kernels, "crop_resize", shifted)
        path = to_onnx(model, tmp_path / "shifted.onnx", image_size=SIZE, batch=len(find_images()), validate=False)
    with pytest.raises(ExportValidationError, match="in the local stream stage") as info:
        check(path, model)
    report = info.value.report
    assert info.value.stage == LOCAL and report.stages[GLOBAL].ok and report.stages[DECISIONS].ok
    assert "output 'local_scores'" in str(info.value)


def test_local_stream_skipping_a_region_is_refused(seed_exports) -> None:
    """An artifact (here the eager model, as any runner) whose local stream drops each image's last
    region before the per-class max."""
    model, _, _ = seed_exports[0]
    skipping = copy.deepcopy(model)
    skipping.local_stream = lambda regions, batch: type(model).local_stream(
        skipping, regions.view(batch, TOPN, *regions.shape[1:])[:, :-1].flatten(0, 1), batch)

    def run(images):
        with torch.no_grad(), use_backend("torch"):
            stages = skipping.forward_stages(images)
        return stages._asdict()

    inputs = validation_inputs(find_images(), SIZE, (len(find_images()),), num_random=0)
    with pytest.raises(ExportValidationError, match="in the local stream stage") as info:
        validate(run, model, inputs)
    assert info.value.stage == LOCAL
    assert validate(lambda images: model.forward_stages(images)._asdict(), model, inputs).ok  # the control


def test_cli_exports_random_weight_mcar(capsys, tmp_path) -> None:
    """Uncalibrated random weights: near-constant class maps, whose flat profiles decide nothing."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in find_images()[:2]:
        (photos / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "mcar.onnx"
    code = fastmlr_main(["export", "--model", "mcar", "--backbone", "mobilenet_v2", "--num-classes", "5",
                         "--size", "64", "--images", str(photos), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file(), printed
    lines = printed.splitlines()
    assert lines[0].startswith(f"wrote {out}") and lines[1] == (
        "the ONNX export vs PyTorch: passed (tolerance 0.0001, 4 input batches, 4 images)")
    stage_lines = [line for line in lines[2:] if line.startswith("  ") and not line.startswith("    ")]
    assert [line.split(":")[0].strip() for line in stage_lines] == [GLOBAL, DECISIONS, LOCAL, FINAL, "end to end"]
    assert len(lines) <= 12


def identity_graph(path, outputs: dict[str, list[int | str]], size: int = SIZE) -> None:
    """An ONNX graph taking ``images [batch, 3, size, size]`` whose outputs are global averages of it
    reshaped to the given shapes (enough to be run and mismatched)."""
    nodes = [helper.make_node("GlobalAveragePool", ["images"], ["pooled"])]
    values = []
    for name, shape in outputs.items():
        nodes.append(helper.make_node("Flatten", ["pooled"], [name]))
        values.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])
    graph = helper.make_graph(nodes, "stand-in", [images], values)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_graph_of_another_model_names_the_mismatch(tmp_path, seed_exports) -> None:
    model, path, _ = seed_exports[0]
    baseline = fastmlr.create_model("baseline", backbone="mobilenet_v2", num_classes=3, image_size=SIZE)
    with pytest.raises(ArtifactMismatchError, match="exported from 'mcar', the model is 'baseline'"):
        check(path, baseline)
    with pytest.raises(ArtifactMismatchError, match=r"takes images of shape \[10, 3, 96, 96\], validation asked "
                                                    r"for 128x128"):
        validate_onnx(path, model, image_size=128)
    identity_graph(tmp_path / "probs.onnx", {"probs": ["batch", 3]})
    with pytest.raises(ArtifactMismatchError, match=r"has outputs \['probs'\], mcar exports \['probs', 'boxes'"):
        check(tmp_path / "probs.onnx", model)
    other_classes = fastmlr.create_model("baseline", backbone="mobilenet_v2", num_classes=7, image_size=SIZE)
    with pytest.raises(ArtifactMismatchError, match="scores 3 classes, the model 7"):
        check(tmp_path / "probs.onnx", other_classes)
    with pytest.raises(ValueError, match="scores 3 classes"):  # a ValueError as well
        check(tmp_path / "probs.onnx", other_classes)


def test_runner_with_missing_outputs_or_bad_tolerance(seed_exports) -> None:
    model, _, _ = seed_exports[0]
    inputs = validation_inputs(find_images()[:1], SIZE, (1,), num_random=0)

    def run(images):
        stages = model.forward_stages(images)._asdict()
        del stages["cam_logits"]
        return stages

    with pytest.raises(ArtifactMismatchError, match=r"missing \['cam_logits'\]"):
        validate(run, model, inputs)
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        validate(run, model, inputs, tolerance="int4")
    with pytest.raises(ValueError, match="tolerance must be a number in"):
        validate(run, model, inputs, tolerance=-1.0)


# --- the decision margins ------------------------------------------------------------------------


def test_ranking_ties_within_the_tolerance_only() -> None:
    scores = np.array([0.9, 0.5, 0.89995, 0.1])
    reason = explain_ranking(scores, np.array([2, 0]), np.array([0, 2]), 1e-4)
    assert reason.startswith("top-N tie within tolerance at rank 1: class 2 (0.89995) and class 0 (0.9)")
    assert explain_ranking(scores, np.array([2, 0]), np.array([0, 2]), 1e-5) is None
    assert explain_ranking(scores, np.array([0, 1]), np.array([0, 2]), 1e-4) is None  # 0.5 is no tie with 0.9
    assert explain_ranking(scores, np.array([0, 0]), np.array([0, 2]), 1.0) is None  # a class twice
    assert explain_ranking(np.array([1.0, 1.0, 1.0]), np.array([2, 1]), np.array([0, 1]), 1e-6) is not None


def test_interval_margins_hand_worked() -> None:
    # L = 8. Crossings at 1 and 5; the peak segment is [1, 5). s[2] sits 1e-5 above tau: below it, the
    # crossing moves to 2 and the interval to [2, 5).
    near_tau = IntervalMargins(np.array([0, 0.2, 0.50001, 0.9, 1.0, 0.9, 0.3, 0], np.float32), 0.5, 1e-4)
    assert interval_search_reference(torch.from_numpy(near_tau.profile)).tolist() == [1, 5]
    assert "within" in near_tau.explain((2, 5)) and "of τ = 0.5" in near_tau.explain((2, 5))
    assert near_tau.explain((1, 5)) is not None  # the reference's own decision
    assert near_tau.explain((3, 5)) is None and near_tau.explain((1, 6)) is None
    # Near-equal peaks: the maximum at 0 wins; 0.99999 at 3-4 could win instead.
    peaks = IntervalMargins(np.array([1.0, 0.2, 0.2, 0.99999, 0.99999, 0.2, 0.2, 0.2], np.float32), 0.5, 1e-4)
    assert interval_search_reference(torch.from_numpy(peaks.profile)).tolist() == [0, 2]
    assert "near-equal peak 0.9999875 at 3" in peaks.explain((2, 4))  # (0.99999 - 0.2) / 0.8
    # [4, 8) holds s[4] (a segment starts at its crossing index), so it could win too; [5, 8) cannot.
    assert peaks.explain((4, 8)) is not None and peaks.explain((5, 8)) is None
    assert IntervalMargins(peaks.profile, 0.5, 1e-6).explain((2, 4)) is None  # outside a smaller tolerance
    flat = IntervalMargins(np.array([0.3, 0.30002, 0.3, 0.3], np.float32), 0.5, 1e-4)
    assert flat.explain((0, 1)).startswith("flat profile")
    assert near_tau.explain((5, 3)) is None and near_tau.explain((0, 9)) is None


@pytest.mark.parametrize("tolerance", [1e-3, 1e-2])
def test_interval_margins_hold_every_perturbation(tolerance: float) -> None:
    """Brute force: the search on any profile moved by at most ``tolerance`` returns an interval
    the margins explain (smooth, quantised with exact ties and values at tau, and clipped plateaus)."""
    rng = np.random.default_rng(0)
    explained = 0
    for trial in range(60):
        length = int(rng.integers(4, 24))
        profile = [rng.random(length), rng.integers(0, 5, length) / 4, np.clip(rng.random(length) * 1.5, 0, 1)][
            trial % 3].astype(np.float32)
        margins = IntervalMargins(profile, 0.5, tolerance)
        moves = np.concatenate([rng.uniform(-1, 1, (20, length)), rng.choice([-1.0, 0.0, 1.0], (20, length))])
        moved = torch.from_numpy((profile + tolerance * moves).astype(np.float32))
        for interval in interval_search_reference(moved).tolist():
            assert margins.explain(tuple(interval)) is not None, (profile.tolist(), interval)
            explained += 1
    assert explained == 60 * 40
