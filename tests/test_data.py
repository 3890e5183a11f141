"""fastmlr.data: COCO and VOC loaders on synthetic trees, the transform, skipping unreadable images."""

import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fastmlr.data import (
    COCO_CLASSES,
    IGNORE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VOC_CLASSES,
    CocoMultiLabel,
    Unreadable,
    VocMultiLabel,
    build_dataset,
    class_names,
    collate_skip_unreadable,
    eval_transform,
    load_image,
)

# COCO 2014's categories as its annotation files list them: ids 1..90 without ten, names in id order.
COCO_NAMES_BY_ID = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]
#: Category id of each class of the released order (COCO_CLASSES[c]).
CATEGORY_ID = [COCO_CATEGORY_IDS[COCO_NAMES_BY_ID.index(name)] for name in COCO_CLASSES]


def write_image(path: pathlib.Path, seed: int, size: tuple[int, int] = (48, 40)) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def make_coco(root: pathlib.Path, labels: dict[int, list[int]], corrupt: tuple[int, ...] = ()):
    """A COCO-layout tree: ``root/val2014/*.jpg`` and ``root/annotations/instances_val2014.json``.

    ``labels`` maps image id → list of class indices (0..79 into :data:`COCO_CLASSES`, the released
    order; repeats give several annotations);
    images listed in ``corrupt`` get a file that is not an image. Returns the annotation file.
    """
    (root / "val2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for image_id, classes in labels.items():
        name = f"COCO_val2014_{image_id:012d}.jpg"
        if image_id in corrupt:
            (root / "val2014" / name).write_bytes(b"not a jpeg")
        else:
            write_image(root / "val2014" / name, image_id)
        images.append({"id": image_id, "file_name": name, "width": 48, "height": 40})
        for c in classes:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": CATEGORY_ID[c],
                "bbox": [0, 0, 10, 10], "area": 100.0, "iscrowd": 0,
            })
    categories = [{"id": i, "name": n} for i, n in zip(COCO_CATEGORY_IDS, COCO_NAMES_BY_ID, strict=True)]
    # Reversed on purpose: classes must come out in sorted-name order, neither file nor id order.
    content = {"images": images[::-1], "annotations": annotations, "categories": categories[::-1]}
    ann_file = root / "annotations" / "instances_val2014.json"
    ann_file.write_text(json.dumps(content))
    return ann_file


VOC_XML = """<annotation><filename>{id}.jpg</filename>{objects}</annotation>"""
VOC_OBJECT = "<object><name>{name}</name><difficult>{difficult}</difficult></object>"


def make_voc(root: pathlib.Path, objects: dict[str, list[tuple[str, int]]], split: str = "test"):
    """A VOC-layout tree with ``objects``: image id → [(class name, difficult flag)]."""
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (root / sub).mkdir(parents=True)
    for seed, (image_id, objs) in enumerate(objects.items()):
        xml = "".join(VOC_OBJECT.format(name=n, difficult=d) for n, d in objs)
        (root / "Annotations" / f"{image_id}.xml").write_text(VOC_XML.format(id=image_id, objects=xml))
        write_image(root / "JPEGImages" / f"{image_id}.jpg", seed)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(objects) + "\n")
    return root


def test_class_names():
    assert class_names(80) == list(COCO_CLASSES) and len(set(COCO_CLASSES)) == 80
    # The released codes' order: COCO's names sorted (their coco.py), not category-id order.
    assert class_names(80)[:3] == ["airplane", "apple", "backpack"] and list(COCO_CLASSES) == sorted(COCO_NAMES_BY_ID)
    assert class_names(20) == list(VOC_CLASSES) and class_names(20)[0] == "aeroplane"
    assert class_names(3) == ["class_0", "class_1", "class_2"]


def test_eval_transform_resizes_and_normalises():
    image = Image.new("RGB", (50, 30), (255, 0, 128))
    x = eval_transform(32)(image)
    assert x.shape == (3, 32, 32)
    rgb = (1.0, 0.0, 128 / 255)
    expected = [(v - m) / s for v, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)
    with pytest.raises(ValueError, match="image_size"):
        eval_transform(0)


def test_coco_targets_and_order(tmp_path):
    ann_file = make_coco(tmp_path, {7: [0, 0, 79], 3: [], 42: [11, 12]})
    dataset = CocoMultiLabel(tmp_path / "val2014", ann_file, image_size=32)
    assert dataset.classes == list(COCO_CLASSES) and dataset.num_classes == 80
    assert dataset.image_ids == [3, 7, 42]
    assert dataset.targets[0].sum() == 0  # image without annotations kept, all zeros
    assert torch.nonzero(dataset.targets[1]).flatten().tolist() == [0, 79]
    assert torch.nonzero(dataset.targets[2]).flatten().tolist() == [11, 12]
    # Category id 1 ("person") is class 49 of the released order; id 5 ("airplane") class 0.
    person = make_coco(tmp_path / "person", {1: [COCO_CLASSES.index("person")], 2: [0]})
    raw = json.loads(person.read_text())
    assert [a["category_id"] for a in raw["annotations"]] == [1, 5]
    dataset = CocoMultiLabel(tmp_path / "person" / "val2014", person, image_size=32)
    assert dataset.classes[:3] == ["airplane", "apple", "backpack"]
    assert torch.nonzero(dataset.targets).tolist() == [[0, 49], [1, 0]]
    image, target = dataset[1]
    assert image.shape == (3, 32, 32) and torch.equal(target, dataset.targets[1])


def test_build_dataset_coco_default_layout(tmp_path):
    make_coco(tmp_path, {1: [5]})
    dataset = build_dataset("coco", tmp_path, image_size=32)
    assert len(dataset) == 1 and dataset.targets[0, 5] == 1


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    ann_file = make_coco(tmp_path, {1: [0], 2: [1], 3: [2], 4: [3]}, corrupt=(2,))
    (tmp_path / "val2014" / "COCO_val2014_000000000004.jpg").unlink()
    dataset = CocoMultiLabel(tmp_path / "val2014", ann_file, image_size=32)
    item = dataset[1]
    assert isinstance(item, Unreadable) and item.path.endswith("COCO_val2014_000000000002.jpg")
    assert "cannot read image" in item.reason
    loader = DataLoader(dataset, batch_size=3, num_workers=1, collate_fn=collate_skip_unreadable)
    batches = list(loader)
    assert [[u.path[-6:] for u in b.unreadable] for b in batches] == [["02.jpg"], ["04.jpg"]]
    assert "image not found" in batches[1].unreadable[0].reason
    assert batches[0].images.shape == (2, 3, 32, 32)
    assert batches[0].targets[:, :4].tolist() == [[1, 0, 0, 0], [0, 0, 1, 0]]
    assert batches[1].images is None and batches[1].targets is None


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image not found"):
        load_image(tmp_path / "missing.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(bad)
    write_image(tmp_path / "ok.png", 0)
    assert load_image(tmp_path / "ok.png").size == (48, 40)


def test_coco_bad_annotation_files(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        CocoMultiLabel(tmp_path / "images", tmp_path / "nope.json")
    no_annotations = tmp_path / "captions.json"
    no_annotations.write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(ValueError, match=r"captions\.json has no 'annotations'"):
        CocoMultiLabel(tmp_path / "images", no_annotations)
    not_json = tmp_path / "broken.json"
    not_json.write_text("{")
    with pytest.raises(ValueError, match="not a JSON file"):
        CocoMultiLabel(tmp_path / "images", not_json)
    unknown_category = tmp_path / "unknown.json"
    unknown_category.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 99}],
        "categories": [{"id": 1, "name": "a"}],
    }))
    with pytest.raises(ValueError, match="category_id 99"):
        CocoMultiLabel(tmp_path / "images", unknown_category)
    with pytest.raises(FileNotFoundError, match="COCO image directory"):
        CocoMultiLabel(tmp_path / "no_images", unknown_category)


@pytest.mark.parametrize(("difficult", "expected_cat"), [("ignore", IGNORE), ("negative", 0.0)])
def test_voc_targets_and_difficult(tmp_path, difficult, expected_cat):
    root = make_voc(tmp_path, {
        "000001": [("dog", 0), ("person", 0), ("person", 1)],
        "000002": [("cat", 1), ("cat", 1), ("tvmonitor", 0)],
        "000003": [],
    })
    dataset = VocMultiLabel(root, "test", image_size=32, difficult=difficult)
    assert dataset.classes == list(VOC_CLASSES) and dataset.image_ids == ["000001", "000002", "000003"]
    dog, person, cat, tv = (VOC_CLASSES.index(n) for n in ("dog", "person", "cat", "tvmonitor"))
    assert dataset.targets[0, dog] == 1 and dataset.targets[0, person] == 1 and dataset.targets[0].sum() == 2
    assert dataset.targets[1, cat] == expected_cat and dataset.targets[1, tv] == 1
    assert dataset.targets[2].abs().sum() == 0
    assert dataset[0][0].shape == (3, 32, 32)


def test_voc_bad_inputs(tmp_path):
    root = make_voc(tmp_path / "VOC2007", {"000001": [("dog", 0)]})
    with pytest.raises(FileNotFoundError, match="split file"):
        VocMultiLabel(root, "trainval")
    with pytest.raises(ValueError, match="difficult"):
        VocMultiLabel(root, difficult="skip")
    with pytest.raises(ValueError, match="applies to COCO only"):
        build_dataset("voc", root, ann_file="x.json")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("imagenet", root)
    (root / "Annotations" / "000001.xml").write_text("<annotation><object><name>unicorn</name></object>")
    with pytest.raises(ValueError, match="cannot parse VOC annotation"):
        VocMultiLabel(root)
    unicorn = "<annotation><object><name>unicorn</name></object></annotation>"
    (root / "Annotations" / "000001.xml").write_text(unicorn)
    with pytest.raises(ValueError, match="unknown VOC class 'unicorn'"):
        VocMultiLabel(root)
    (root / "Annotations" / "000001.xml").unlink()
    with pytest.raises(FileNotFoundError, match="VOC annotation file not found"):
        VocMultiLabel(root)
