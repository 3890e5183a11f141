"""``fastmlr evaluate`` end to end on synthetic COCO / VOC trees, ``fastmlr predict`` on real images."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import make_coco, make_voc
from torch import nn

from fastmlr import create_model
from fastmlr.checkpoint import save_checkpoint
from fastmlr.cli import main
from fastmlr.data import COCO_CLASSES, VOC_CLASSES, CocoMultiLabel, VocMultiLabel
from fastmlr.metrics import METRIC_NAMES, TOP3_NAMES, evaluate
from fastmlr.predict import (
    PALETTE,
    Region,
    draw_regions,
    region_image_paths,
    region_label,
    scale_box,
    top_labels,
)
from fastmlr.testing import calibrate_batchnorm, condition_for_low_precision

SMALL = ["--backbone", "mobilenet_v2", "--size", "64"]
SMALL_MODEL = {"backbone": "mobilenet_v2", "num_classes": 80, "image_size": 64}


def image_dependent_model(name: str) -> nn.Module:
    """A small random model whose outputs depend on the image (see :func:`calibrate_batchnorm`)."""
    return calibrate_batchnorm(create_model(name, **SMALL_MODEL), torch.randn(8, 3, 64, 64))


@pytest.fixture(scope="module")
def coco_tree(tmp_path_factory):
    """Ten generated images (id 4 corrupt, id 6 without annotations) and a baseline checkpoint."""
    root = tmp_path_factory.mktemp("coco")
    labels = {i: [i % 80, (7 * i) % 80] for i in range(1, 11)}
    labels[6] = []
    ann_file = make_coco(root, labels, corrupt=(4,))
    torch.manual_seed(1)
    checkpoint = root / "baseline.pt"
    save_checkpoint(image_dependent_model("baseline"), checkpoint)
    return root, ann_file, checkpoint


@pytest.fixture
def one_torch_thread():
    """PyTorch on one thread for the test: on a loaded 2-core machine its two OpenMP threads wait on each
    other (the MCAR int8 test took 73 s with two threads and 27 s with one, at load average 4)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_evaluate_coco_eager_matches_direct_computation(coco_tree, tmp_path, capsys):
    root, ann_file, checkpoint = coco_tree
    out = tmp_path / "result.json"
    with pytest.warns(UserWarning, match="skipping unreadable image.*COCO_val2014_000000000004.jpg"):
        code, stdout, stderr = run_cli(
            ["evaluate", "--model", "baseline", *SMALL, "--checkpoint", str(checkpoint), "--data", "coco",
             "--root", str(root), "--backend", "eager", "--batch-size", "3", "--workers", "1",
             "--out", str(out)],
            capsys,
        )
    assert code == 0, stderr
    report = json.loads(out.read_text())
    assert report["num_images"] == 9 and report["skipped_images"] == 1 and report["split"] == "val"
    assert report["unreadable_images"][0]["path"] == str(root / "val2014" / "COCO_val2014_000000000004.jpg")
    # The same numbers computed without the command: the readable images through the model.
    dataset = CocoMultiLabel(root / "val2014", ann_file, image_size=64)
    readable = [i for i in range(len(dataset)) if dataset.image_ids[i] != 4]
    images = torch.stack([dataset[i][0] for i in readable])
    model = create_model("baseline", **SMALL_MODEL, checkpoint=checkpoint)
    with torch.no_grad():
        probs = model(images)
    assert probs.std(dim=0).min() > 1e-3  # the images are told apart: their order matters
    expected = evaluate(probs, dataset.targets[readable])
    for name in METRIC_NAMES + TOP3_NAMES:
        assert report["metrics"][name] == pytest.approx(expected[name], abs=1e-9), name
    assert report["metrics"]["AP"]["airplane"] == pytest.approx(expected["AP"][0])  # released order
    assert report["metrics"]["num_classes_evaluated"] == expected["num_classes_evaluated"]
    assert "eager" in stdout and "top-3" in stdout and f"{expected['mAP']:.2f}" in stdout


def test_evaluate_onnxruntime_compared_with_eager(coco_tree, tmp_path, capsys, one_torch_thread):
    root, _, checkpoint = coco_tree
    out = tmp_path / "onnx.json"
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        code, stdout, stderr = run_cli(
            ["evaluate", "--model", "baseline", *SMALL, "--checkpoint", str(checkpoint), "--data", "coco",
             "--root", str(root), "--backend", "onnxruntime", "--compare", "eager", "--batch-size", "4",
             "--workers", "0", "--limit", "7", "--out", str(out)],
            capsys,
        )
    assert code == 0, stderr
    report = json.loads(out.read_text())
    assert report["num_images"] == 6 and report["skipped_images"] == 1
    compare = report["compare"]
    assert compare["backend"] == "eager" and 0 <= compare["max_abs_prob_diff"] < 1e-4
    assert compare["map_diff"] == pytest.approx(report["metrics"]["mAP"] - compare["metrics"]["mAP"])
    assert abs(compare["map_diff"]) < 0.5
    # fp32: nothing calibrated, every image compared, every label the same.
    assert compare["agreement_images"] == 6 and compare["label_agreement"] == 1.0 and "calibration" not in report
    assert compare["identical_boxes"] is None  # a model without regions
    assert "onnxruntime (fp32) vs eager (fp32): ΔmAP" in stdout and "agreement on 6 images: labels" in stdout


def int8_model(name: str, **options) -> nn.Module:
    """A small random model whose INT8 export passes validation at 80 classes: conditioned for INT8
    (:func:`condition_for_low_precision` on the packaged photos, BatchNorm shifts of std 2) with logits
    of std 0.5 (std 2 drifts past the 0.15 tolerance at 80 classes: |Δprob| 0.16 to 0.23 over seeds)."""
    from fastmlr.export.validation import find_images, image_batches

    torch.manual_seed(0)
    photos = find_images(None)
    batch = torch.cat([b for _, b in image_batches(photos, 64, len(photos))])
    return condition_for_low_precision(create_model(name, **{**SMALL_MODEL, **options}), batch, shift_std=2.0,
                                       logit_std=0.5)


def run_evaluate_spied(argv, capsys, monkeypatch):
    """``fastmlr evaluate`` with every backend's outputs, the calibration given to the export and the
    graph's precision recorded: ``(code, stdout, stderr, {"outputs": {backend: {output: array}},
    "calibration": str | None, "graph_precision": str})``."""
    onnx = pytest.importorskip("onnx")
    import fastmlr.export.precision

    import fastmlr.evaluate

    seen = {}
    collect, session = fastmlr.evaluate.collect_outputs, fastmlr.export.precision.precision_session
    to_onnx = fastmlr.export.to_onnx

    def spy_collect(*args, **kwargs):
        result = collect(*args, **kwargs)
        seen["outputs"] = result[0]
        return result

    def spy_session(path, **kwargs):
        seen["graph_precision"] = fastmlr.export.precision.graph_precision(onnx.load(path))
        return session(path, **kwargs)

    def spy_to_onnx(*args, **kwargs):
        seen["calibration"] = kwargs["calibration"]
        return to_onnx(*args, **kwargs)

    monkeypatch.setattr(fastmlr.evaluate, "collect_outputs", spy_collect)
    monkeypatch.setattr(fastmlr.export, "to_onnx", spy_to_onnx)
    monkeypatch.setattr(fastmlr.export.precision, "precision_session", spy_session)
    return (*run_cli(argv, capsys), seen)


def check_agreement(compare: dict, probs: np.ndarray, reference: np.ndarray, threshold: float) -> None:
    """The report's agreement numbers, recomputed from the two backends' probabilities ``[n, C]``."""
    difference = np.abs(probs.astype(np.float64) - reference)
    top3 = [set(np.argsort(-p)[:3]) == set(np.argsort(-r)[:3]) for p, r in zip(probs, reference, strict=True)]
    assert compare["agreement_images"] == len(probs) and compare["threshold"] == threshold
    assert compare["label_agreement"] == pytest.approx(((probs >= threshold) == (reference >= threshold)).mean())
    assert compare["top3_agreement"] == pytest.approx(np.mean(top3))
    assert compare["max_abs_prob_diff"] == pytest.approx(difference.max())
    assert compare["mean_abs_prob_diff"] == pytest.approx(difference.mean())


def test_evaluate_int8_against_eager_leaves_calibration_images_out(coco_tree, tmp_path, capsys, monkeypatch,
                                                                    one_torch_thread):
    from fastmlr.export.precision import DEFAULT_CALIBRATION_DIR
    from fastmlr.export.validation import find_images

    root, ann_file, _ = coco_tree
    model = int8_model("baseline")
    checkpoint, out = tmp_path / "baseline.pt", tmp_path / "int8.json"
    save_checkpoint(model, checkpoint)
    # Calibration: the packaged COCO photos and a copy, under another name, of one evaluated image.
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for photo in find_images(DEFAULT_CALIBRATION_DIR):
        shutil.copy(photo, calibration)
    shutil.copy(root / "val2014" / "COCO_val2014_000000000003.jpg", calibration / "copy.jpg")
    with pytest.warns(UserWarning, match=r"1 of the 9 evaluated images are int8 calibration images "
                      r"\(COCO_val2014_000000000003.jpg\): the agreement leaves them out"):
        code, stdout, stderr, seen = run_evaluate_spied(
            ["evaluate", "--model", "baseline", *SMALL, "--checkpoint", str(checkpoint), "--data", "coco",
             "--root", str(root), "--backend", "onnxruntime", "--precision", "int8", "--calibration",
             str(calibration), "--compare", "eager", "--batch-size", "4", "--workers", "0", "--out", str(out)],
            capsys, monkeypatch,
        )
    assert code == 0, stderr
    report = json.loads(out.read_text())
    compare = report["compare"]
    assert seen["graph_precision"] == "int8" and seen["calibration"] == str(calibration)
    assert (report["precision"], compare["precision"]) == ("int8", "fp32")
    assert report["calibration"] == {"source": str(calibration), "images": 7, "evaluated_images_used": [
        str(root / "val2014" / "COCO_val2014_000000000003.jpg")]}
    # The eager rows are the model's own probabilities on the readable images; the int8 rows differ.
    eager_probs, targets, _ = readable_probs(model, root, ann_file)
    int8, eager = seen["outputs"]["onnxruntime"]["probs"], seen["outputs"]["eager"]["probs"]
    np.testing.assert_allclose(eager, eager_probs.numpy(), atol=1e-6)
    assert 1e-3 < np.abs(int8 - eager).max() < 0.15
    # ΔmAP over all 9 images: the two metrics blocks, and the metrics of the two probability arrays.
    assert compare["map_diff"] == pytest.approx(report["metrics"]["mAP"] - compare["metrics"]["mAP"])
    assert compare["map_diff"] == pytest.approx(evaluate(int8, targets)["mAP"] - evaluate(eager, targets)["mAP"])
    assert report["metrics"]["mAP"] == pytest.approx(evaluate(int8, targets)["mAP"])
    # The agreement on the 8 images calibration did not see (image 3 is row 2 of the readable ones).
    dataset = CocoMultiLabel(root / "val2014", ann_file, image_size=64)
    readable_ids = [i for i in dataset.image_ids if i != 4]
    held_out = [row for row, image_id in enumerate(readable_ids) if image_id != 3]
    assert len(held_out) == 8
    check_agreement(compare, int8[held_out], eager[held_out], 0.5)
    assert compare["identical_boxes"] is None
    assert "onnxruntime (int8) vs eager (fp32): ΔmAP = " in stdout
    assert (f"agreement on 8 images not used for calibration: labels (≥0.50) {100 * compare['label_agreement']:.2f}%"
            in stdout)
    assert "int8 calibrated on 7 images" in stdout and "1 of the evaluated images are among them" in stdout


def test_evaluate_mcar_int8_against_eager_compares_boxes(tmp_path, capsys, monkeypatch, one_torch_thread):
    root = make_voc(tmp_path / "VOC2007", {
        "000001": [("dog", 0), ("person", 0)], "000002": [("cat", 0)], "000003": [("person", 0), ("car", 0)],
        "000004": [("dog", 0)], "000005": [("car", 0)],
    })
    model = int8_model("mcar", num_classes=20, topn=2)
    checkpoint, out = tmp_path / "mcar.pt", tmp_path / "int8.json"
    save_checkpoint(model, checkpoint)
    with pytest.warns(UserWarning, match="calibrating INT8 ranges on the packaged validation photos"):
        code, stdout, stderr, seen = run_evaluate_spied(
            ["evaluate", "--model", "mcar", *SMALL, "--checkpoint", str(checkpoint), "--data", "voc", "--root",
             str(root), "--backend", "onnxruntime", "--precision", "int8", "--compare", "eager", "--batch-size",
             "2", "--workers", "0", "--out", str(out)],
            capsys, monkeypatch,
        )
    assert code == 0, stderr
    report = json.loads(out.read_text())
    compare = report["compare"]
    assert seen["graph_precision"] == "int8" and report["calibration"]["evaluated_images_used"] == []
    int8, eager = seen["outputs"]["onnxruntime"], seen["outputs"]["eager"]
    # The eager rows are MCAR's own stages on the 5 images, in split order, in the command's batches of 2
    # (a box may move with the batch's arithmetic, and the local scores with it).
    images = torch.stack([VocMultiLabel(root, image_size=64)[i][0] for i in range(5)])
    with torch.no_grad():
        parts = [model.forward_stages(images[start : start + 2]) for start in range(0, 5, 2)]
    for name in ("probs", "boxes", "indices"):
        np.testing.assert_allclose(eager[name], torch.cat([getattr(p, name) for p in parts]).numpy(), atol=1e-6)
    assert int8["boxes"].shape == (5, 2, 4) and int8["indices"].shape == (5, 2)
    # Every image is held out; labels compared at MCAR's threshold, 0.6.
    check_agreement(compare, int8["probs"], eager["probs"], 0.6)
    same = (int8["boxes"] == eager["boxes"]).all(axis=-1) & (int8["indices"] == eager["indices"])
    assert compare["identical_boxes"] == pytest.approx(same.mean())
    assert compare["map_diff"] == pytest.approx(report["metrics"]["mAP"] - compare["metrics"]["mAP"])
    assert f"identical boxes {100 * same.mean():.1f}%" in stdout


def test_calibration_images_among_matches_paths_and_bytes(tmp_path):
    from fastmlr.export.precision import calibration_images_among

    for name, content in [("a.jpg", b"aaaa"), ("b.jpg", b"bbbb"), ("c.jpg", b"cccc"), ("a_copy.jpg", b"aaaa")]:
        (tmp_path / name).write_bytes(content)
    images = [tmp_path / "b.jpg", tmp_path / "a_copy.jpg", tmp_path / "c.jpg", tmp_path / "sub" / ".." / "a.jpg"]
    (tmp_path / "sub").mkdir()
    # b: the same file; a_copy: a's bytes under another name; c: same size, other bytes; a: through "..".
    found = calibration_images_among(images, [tmp_path / "a.jpg", tmp_path / "b.jpg"])
    assert found == [images[0], images[1], images[3]]


def test_evaluate_voc_tree(tmp_path, capsys):
    root = make_voc(tmp_path / "VOC2007", {
        "000001": [("dog", 0), ("person", 1)],
        "000002": [("cat", 0), ("person", 0)],
        "000003": [("person", 1)],
    })
    out = tmp_path / "voc.json"
    code, _, stderr = run_cli(
        ["evaluate", "--model", "baseline", *SMALL, "--data", "voc", "--root", str(root), "--workers", "0",
         "--out", str(out)],
        capsys,
    )
    assert code == 0, stderr
    metrics = json.loads(out.read_text())["metrics"]
    # difficult="ignore": person is positive only in image 2, its difficult-only images are left out.
    assert metrics["num_classes"] == 20 and metrics["num_classes_evaluated"] == 3
    assert metrics["AP"]["person"] == pytest.approx(100.0)
    assert set(metrics["classes_without_positives"]) == set(VOC_CLASSES) - {"dog", "cat", "person"}


@pytest.mark.parametrize(
    ("model", "extra", "threshold"),
    [("mcar", [], 0.6), ("baseline", [], 0.5), ("mcar", ["--threshold", "0.3"], 0.3)],
)
def test_evaluate_threshold_follows_the_paper_code(tmp_path, capsys, model, extra, threshold):
    root = make_voc(tmp_path / "VOC2007", {"000001": [("dog", 0)], "000002": [("cat", 0)]})
    out = tmp_path / "voc.json"
    code, stdout, stderr = run_cli(
        ["evaluate", "--model", model, *SMALL, "--data", "voc", "--root", str(root), "--workers", "0",
         "--out", str(out), *extra],
        capsys,
    )
    assert code == 0, stderr
    assert json.loads(out.read_text())["metrics"]["threshold"] == threshold
    assert f"≥{threshold:.2f}" in stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num-classes", "20"], "the model predicts 20 classes but the dataset has 80"),
        (["--backend", "trt"], "TensorRT"),
        (["--compare", "eager"], "same backend"),
        (["--precision", "fp16"], "applies to the exported backends"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--ann", "/nonexistent/instances.json"], "annotation file not found"),
    ],
)
def test_evaluate_bad_input(coco_tree, capsys, extra, message):
    root = coco_tree[0]
    code, _, stderr = run_cli(
        ["evaluate", "--model", "baseline", *SMALL, "--data", "coco", "--root", str(root), "--workers", "0",
         *extra],
        capsys,
    )
    assert code == 1 and message in stderr


def readable_probs(model: nn.Module, root, ann_file) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(probs, targets, classes)`` of the readable images of ``coco_tree`` (image 4 is corrupt)."""
    dataset = CocoMultiLabel(root / "val2014", ann_file, image_size=64)
    readable = [i for i in range(len(dataset)) if dataset.image_ids[i] != 4]
    with torch.no_grad():
        probs = model(torch.stack([dataset[i][0] for i in readable]))
    return probs, dataset.targets[readable], dataset.classes


def test_evaluate_matches_labels_to_the_model_by_class_name(coco_tree, tmp_path, capsys):
    root, ann_file, _ = coco_tree
    torch.manual_seed(2)
    model = image_dependent_model("baseline")
    # The same weights, its outputs declared in reverse class order (zebra first): the labels follow.
    names = list(reversed(COCO_CLASSES))
    reversed_model = create_model("baseline", **SMALL_MODEL, class_names=names)
    reversed_model.load_state_dict(model.state_dict())
    checkpoint, out = tmp_path / "reversed.pt", tmp_path / "reversed.json"
    save_checkpoint(reversed_model, checkpoint)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        code, _, stderr = run_cli(
            ["evaluate", "--model", "baseline", *SMALL, "--checkpoint", str(checkpoint), "--data", "coco",
             "--root", str(root), "--workers", "0", "--out", str(out)],
            capsys,
        )
    assert code == 0, stderr
    report = json.loads(out.read_text())["metrics"]
    probs, targets, classes = readable_probs(model, root, ann_file)
    expected = evaluate(probs, targets[:, [classes.index(name) for name in names]])
    assert report["AP"] == pytest.approx(dict(zip(names, expected["AP"], strict=True)))
    assert report["mAP"] == pytest.approx(expected["mAP"])


def test_evaluate_refuses_a_checkpoint_of_other_classes(coco_tree, tmp_path, capsys):
    names = [*COCO_CLASSES[:-1], "okapi"]
    checkpoint = tmp_path / "okapi.pt"
    save_checkpoint(create_model("baseline", **SMALL_MODEL, class_names=names), checkpoint)
    code, _, stderr = run_cli(
        ["evaluate", "--model", "baseline", *SMALL, "--checkpoint", str(checkpoint), "--data", "coco",
         "--root", str(coco_tree[0]), "--workers", "0"],
        capsys,
    )
    assert code == 1 and "lacks ['zebra']" in stderr and "has ['okapi']" in stderr


def test_evaluate_a_label_graph_checkpoint(coco_tree, tmp_path, capsys):
    # Its word embeddings and matrix come from the weights: the model is rebuilt without graph options.
    checkpoint = tmp_path / "mlgcn.pt"
    save_checkpoint(create_model("mlgcn", **SMALL_MODEL), checkpoint)
    code, stdout, stderr = run_cli(
        ["evaluate", "--model", "mlgcn", "--checkpoint", str(checkpoint), "--data", "coco",
         "--root", str(coco_tree[0]), "--workers", "0", "--limit", "3"],
        capsys,
    )
    assert code == 0, stderr
    assert "3 images evaluated" in stdout


def test_evaluate_annotation_file_without_annotations(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    ann = tmp_path / "image_info_test2014.json"
    ann.write_text(json.dumps({"images": [], "categories": []}))
    code, _, stderr = run_cli(
        ["evaluate", "--model", "baseline", *SMALL, "--data", "coco", "--root", str(tmp_path / "images"),
         "--ann", str(ann)],
        capsys,
    )
    assert code == 1 and "image_info_test2014.json has no 'annotations'" in stderr


def test_top_labels_and_scale_box():
    probs = torch.tensor([0.1, 0.9, 0.5, 0.9])
    labels = top_labels(probs, ["a", "b", "c", "d"], 3)
    assert [name for name, _ in labels] == ["b", "d", "c"]
    assert [p for _, p in labels] == pytest.approx([0.9, 0.9, 0.5])
    # A box of a 64x64 input mapped onto a 640x320 image.
    assert scale_box(torch.tensor([8, 16, 32, 64]), 64, (640, 320)) == (80.0, 80.0, 320.0, 320.0)


def test_region_image_paths(tmp_path):
    paths = [tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg", tmp_path / "y.png"]
    assert [p.name for p in region_image_paths(paths, tmp_path)] == [
        "x_0_regions.png", "x_1_regions.png", "y_regions.png"]
    with pytest.raises(ValueError, match="would overwrite an input image"):
        region_image_paths([tmp_path / "a" / "z.jpg", tmp_path / "z_regions.png"], tmp_path)


def test_draw_regions_boxes_and_colours():
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    regions = [
        Region(3, (20.0, 30.0, 120.0, 90.0), 0.14, 0.99, 0.99),
        Region(7, (150.0, 10.0, 190.0, 50.0), 0.7, 0.2, 0.7),
    ]
    names = [f"class_{i}" for i in range(10)]
    assert region_label(regions[0], names) == "class_3: 0.14/0.99"
    canvas = np.asarray(draw_regions(image, regions, names))
    assert canvas.shape == (100, 200, 3)
    assert tuple(canvas[89, 60]) == PALETTE[0]  # bottom edge of the first box (half-open: y2 - 1)
    assert tuple(canvas[60, 119]) == PALETTE[0]  # its right edge
    assert tuple(canvas[49, 170]) == PALETTE[1]
    assert tuple(canvas[60, 70]) == (0, 0, 0)  # inside the first box, below its label
    assert tuple(canvas[95, 5]) == (0, 0, 0)


def test_predict_baseline_prints_voc_names(shared_images, tmp_path, capsys):
    code, stdout, stderr = run_cli(
        ["predict", str(shared_images[0]), "--model", "baseline", *SMALL, "--num-classes", "20",
         "--topk", "3", "--out", str(tmp_path)],
        capsys,
    )
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0].startswith(str(shared_images[0]))
    assert len(lines) == 4 and all(line.split()[0] in VOC_CLASSES for line in lines[1:])
    assert not list(tmp_path.iterdir())  # no regions to draw for a baseline


@pytest.mark.parametrize(
    ("options", "expected"),
    [({"num_classes": 80}, "airplane"),  # output 0 of COCO's released order (category-id order: person)
     ({"num_classes": 3, "class_names": ["cat", "okapi", "dog"]}, "okapi")],  # a checkpoint's own names
)
def test_predict_names_are_the_models(shared_images, tmp_path, capsys, options, expected):
    model = create_model("baseline", backbone="mobilenet_v2", image_size=64, **options)
    with torch.no_grad():
        model.convclass.bias[model.class_names.index(expected)] = 50.0
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(model, checkpoint)
    code, stdout, stderr = run_cli(
        ["predict", str(shared_images[0]), "--model", "baseline", *SMALL, "--num-classes",
         str(options["num_classes"]), "--checkpoint", str(checkpoint), "--topk", "1"],
        capsys,
    )
    assert code == 0, stderr
    assert stdout.splitlines()[1].split() == [expected, "1.000"]


def test_export_metadata_names_the_classes(tmp_path):
    onnx = pytest.importorskip("onnx")
    from fastmlr.export.onnx_export import write_metadata

    node = onnx.helper.make_node("Identity", ["images"], ["probs"])
    tensor = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "g", [tensor("images", onnx.TensorProto.FLOAT, [1, 3])],
                                   [tensor("probs", onnx.TensorProto.FLOAT, [1, 3])])
    path = tmp_path / "model.onnx"
    onnx.save(onnx.helper.make_model(graph), path)
    write_metadata(path, create_model("baseline", **SMALL_MODEL), 64)
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(props["fastmlr.config"])["class_names"] == list(COCO_CLASSES)


def test_predict_mcar_writes_region_png(shared_images, tmp_path, capsys):
    path = shared_images[-1]
    checkpoint = tmp_path / "mcar.pt"
    save_checkpoint(image_dependent_model("mcar"), checkpoint)
    code, stdout, stderr = run_cli(
        ["predict", str(path), "--model", "mcar", *SMALL, "--checkpoint", str(checkpoint),
         "--out", str(tmp_path), "--min-local", "0", "--min-score", "0"],
        capsys,
    )
    assert code == 0, stderr
    png = tmp_path / f"{path.stem}_regions.png"
    assert png.is_file() and f"wrote {png}" in stdout
    boxes = [[float(v) for v in line.split("[")[1].split("]")[0].split(",")]
             for line in stdout.splitlines() if line.startswith("  region [")]
    assert len(boxes) == 4  # topN = 4 regions, each printed
    with Image.open(path) as original, Image.open(png) as drawn:
        assert drawn.size == original.size
        width, height = original.size
        difference = np.abs(np.asarray(drawn, dtype=int) - np.asarray(original.convert("RGB"), dtype=int))
    assert difference.max() > 0  # something was drawn
    # Boxes are scaled back to the original image (rounded when printed): inside it, and at least
    # the interval search's minimum size (ceil(64 / 8) - 1 = 7 input pixels) times the scale.
    for x1, y1, x2, y2 in boxes:
        assert 0 <= x1 < x2 <= width + 0.5 and 0 <= y1 < y2 <= height + 0.5
        assert x2 - x1 >= 7 * width / 64 - 1 and y2 - y1 >= 7 * height / 64 - 1


@pytest.mark.parametrize(
    ("make_file", "message"),
    [(lambda p: None, "image not found"), (lambda p: p.write_bytes(b"\x89PNG broken"), "cannot read image")],
)
def test_predict_bad_image(tmp_path, capsys, make_file, message):
    path = tmp_path / "x.png"
    make_file(path)
    code, _, stderr = run_cli(["predict", str(path), "--model", "baseline", *SMALL], capsys)
    assert code == 1 and message in stderr


def test_predict_bad_topk(shared_images, capsys):
    code, _, stderr = run_cli(
        ["predict", str(shared_images[0]), "--model", "baseline", *SMALL, "--num-classes", "5",
         "--topk", "6"],
        capsys,
    )
    assert code == 1 and "--topk must be at most --num-classes" in stderr
