"""Multi-label datasets (MS-COCO 2014, PASCAL VOC 2007/2012), the papers' test transform, class names.

A sample is ``(image, target)``: ``image`` a float ``[3, S, S]`` tensor (resized to S×S, ImageNet
normalisation — the papers' test-time transform), ``target`` a float ``[C]`` vector with 1 (present),
0 (absent) and, for VOC with ``difficult="ignore"``, :data:`IGNORE` (-1: left out of the metrics).

**Unreadable images** (missing, corrupt, truncated, not an image) are *skipped and counted*: the
dataset returns an :class:`Unreadable` record (path and reason) for them instead of a sample, and
:func:`collate_skip_unreadable` sets those records apart from the batch, so a ``DataLoader`` (with
workers) keeps going and the caller — in the main process — warns about each skipped file and reports
the count (``fastmlr evaluate`` does). :func:`load_image` (used by ``fastmlr predict``) raises instead.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE = -1.0
DIFFICULT_MODES = ("ignore", "negative")
DEFAULT_SPLITS = {"coco": "val", "voc": "test"}

# The 80 MS-COCO categories in the released codes' order: the category *names* sorted (Python's
# ``sorted``), as ML-GCN's, MCAR's and Deep-LIFT's ``coco.py`` index them — so their checkpoints'
# output k is COCO_CLASSES[k]. (Not COCO's category-id order, which starts person, bicycle, car.)
COCO_CLASSES = (
    "airplane", "apple", "backpack", "banana", "baseball bat", "baseball glove", "bear", "bed",
    "bench", "bicycle", "bird", "boat", "book", "bottle", "bowl", "broccoli", "bus", "cake", "car",
    "carrot", "cat", "cell phone", "chair", "clock", "couch", "cow", "cup", "dining table", "dog",
    "donut", "elephant", "fire hydrant", "fork", "frisbee", "giraffe", "hair drier", "handbag",
    "horse", "hot dog", "keyboard", "kite", "knife", "laptop", "microwave", "motorcycle", "mouse",
    "orange", "oven", "parking meter", "person", "pizza", "potted plant", "refrigerator", "remote",
    "sandwich", "scissors", "sheep", "sink", "skateboard", "skis", "snowboard", "spoon",
    "sports ball", "stop sign", "suitcase", "surfboard", "teddy bear", "tennis racket", "tie",
    "toaster", "toilet", "toothbrush", "traffic light", "train", "truck", "tv", "umbrella", "vase",
    "wine glass", "zebra",
)  # fmt: skip

# The 20 PASCAL VOC classes in the devkit's order.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip


def class_names(num_classes: int) -> list[str]:
    """The default class names of a ``num_classes``-class model, in output order: COCO's 80 in the
    released order (:data:`COCO_CLASSES`, names sorted) when ``num_classes`` is 80, VOC's 20 when 20,
    else ``class_0 … class_{C-1}``."""
    if num_classes == len(COCO_CLASSES):
        return list(COCO_CLASSES)
    if num_classes == len(VOC_CLASSES):
        return list(VOC_CLASSES)
    return [f"class_{i}" for i in range(num_classes)]


def check_class_names(names: Sequence[str] | None, num_classes: int) -> list[str]:
    """A model's class names in output order: :func:`class_names` of ``num_classes`` when ``names`` is
    ``None``, else ``names`` checked — ``num_classes`` distinct non-empty strings (``ValueError``)."""
    if names is None:
        return class_names(num_classes)
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"class_names must be a sequence of non-empty strings, got {names!r}")
    names = list(names)
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names but num_classes = {num_classes}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"class_names repeats {repeated}")
    return names


def eval_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The papers' test transform: resize to ``image_size``² (bilinear, aspect ratio not kept), scale
    to [0, 1], normalise with the ImageNet mean and std. PIL RGB image → float ``[3, S, S]``."""
    if isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size}")
    return transforms.Compose([
        transforms.Resize((int(image_size),) * 2, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image as RGB. FileNotFoundError if it does not exist, ValueError
    naming the file if it cannot be decoded (corrupt, truncated, not an image) or declares more than
    twice PIL's ``Image.MAX_IMAGE_PIXELS`` (a decompression bomb, refused before decoding)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


class MultiLabelImages(Dataset):
    """Image files with multi-hot targets. ``targets`` is float ``[N, C]`` (1, 0 or :data:`IGNORE`).

    ``__getitem__(i)`` returns ``(transform(image), targets[i])``, or an :class:`Unreadable` record
    when image ``i`` cannot be read (see :func:`collate_skip_unreadable`).
    """

    def __init__(
        self,
        image_paths: Sequence[pathlib.Path],
        targets: torch.Tensor,
        classes: Sequence[str],
        image_size: int = 448,
    ) -> None:
        if targets.shape != (len(image_paths), len(classes)):
            raise ValueError(
                f"targets must be [num_images, num_classes] = [{len(image_paths)}, {len(classes)}], "
                f"got {tuple(targets.shape)}"
            )
        self.image_paths = list(image_paths)
        self.targets = targets.float()
        self.classes = list(classes)
        self.image_size = int(image_size)
        self.transform = eval_transform(image_size)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def reorder_classes(self, names: Sequence[str]) -> None:
        """Put the targets' columns in the order of ``names`` (a model's class names): afterwards
        ``classes == list(names)`` and column ``k`` of ``targets`` is class ``names[k]``. ``ValueError``
        naming the differences unless ``names`` holds exactly the dataset's classes."""
        missing, extra = sorted(set(self.classes) - set(names)), sorted(set(names) - set(self.classes))
        if missing or extra or len(names) != len(self.classes):
            raise ValueError(
                f"the model's classes are not the dataset's: the model lacks {missing[:8]} and has "
                f"{extra[:8]} that the dataset lacks ({len(names)} vs {len(self.classes)} classes)"
            )
        order = [self.classes.index(name) for name in names]
        self.targets = self.targets[:, order]
        self.classes = list(names)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | Unreadable:
        try:
            image = load_image(self.image_paths[index])
        except (FileNotFoundError, ValueError) as err:
            return Unreadable(str(self.image_paths[index]), str(err))
        return self.transform(image), self.targets[index]


class Unreadable(NamedTuple):
    """A dataset item whose image could not be read: its path and why."""

    path: str
    reason: str


class Batch(NamedTuple):
    """A collated batch: ``images`` ``[b, 3, S, S]`` and ``targets`` ``[b, C]`` of the readable
    items (both ``None`` when none was), ``unreadable`` the records of the others."""

    images: torch.Tensor | None
    targets: torch.Tensor | None
    unreadable: tuple[Unreadable, ...]


def collate_skip_unreadable(items: Sequence[tuple[torch.Tensor, torch.Tensor] | Unreadable]) -> Batch:
    """``DataLoader`` ``collate_fn``: stack the readable ``(image, target)`` items; set the
    :class:`Unreadable` ones apart."""
    unreadable = tuple(item for item in items if isinstance(item, Unreadable))
    readable = [item for item in items if not isinstance(item, Unreadable)]
    if not readable:
        return Batch(None, None, unreadable)
    return Batch(torch.stack([i for i, _ in readable]), torch.stack([t for _, t in readable]), unreadable)


def _require_dir(path: pathlib.Path, what: str) -> pathlib.Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _entries(content: dict, key: str, ann_file: pathlib.Path) -> list[dict]:
    entries = content[key]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{ann_file}: '{key}' must be a list of objects")
    return entries


def _unique_ids(entries: list[dict], what: str, ann_file: pathlib.Path) -> set[int]:
    """The ``id`` of every entry, each an int, none repeated."""
    ids: set[int] = set()
    for position, entry in enumerate(entries):
        entry_id = entry.get("id")
        if isinstance(entry_id, bool) or not isinstance(entry_id, int):
            raise ValueError(f"{ann_file}: {what} #{position} has no integer 'id' (got {entry_id!r})")
        if entry_id in ids:
            raise ValueError(f"{ann_file}: {what} id {entry_id} appears twice")
        ids.add(entry_id)
    return ids


def check_coco_fields(content: dict, ann_file: pathlib.Path) -> None:
    """Every field the COCO loader reads, checked (ValueError naming the file, the entry and the
    field): images need a unique int ``id`` and a non-empty ``file_name``; categories a unique int
    ``id`` and a non-empty ``name``; annotations an ``image_id`` among the images and a
    ``category_id`` among the categories. An annotation of no listed image is an error, not a skip:
    the file is inconsistent and some image's labels would be missing."""
    images = _entries(content, "images", ann_file)
    categories = _entries(content, "categories", ann_file)
    image_ids = _unique_ids(images, "image", ann_file)
    category_ids = _unique_ids(categories, "category", ann_file)
    for what, entries, field in (("image", images, "file_name"), ("category", categories, "name")):
        for entry in entries:
            if not isinstance(entry.get(field), str) or not entry[field]:
                raise ValueError(f"{ann_file}: {what} {entry['id']} has no '{field}'")
    orphans = []
    for position, annotation in enumerate(_entries(content, "annotations", ann_file)):
        name = f"annotation {annotation.get('id', f'#{position}')}"
        for field in ("image_id", "category_id"):
            if field not in annotation:
                raise ValueError(f"{ann_file}: {name} has no '{field}'")
        if annotation["category_id"] not in category_ids:
            raise ValueError(
                f"{ann_file}: {name} has category_id {annotation['category_id']}, which is not among the "
                "file's categories"
            )
        if annotation["image_id"] not in image_ids:
            orphans.append(f"{name} -> image_id {annotation['image_id']}")
    if orphans:
        raise ValueError(
            f"{ann_file}: {len(orphans)} annotation(s) refer to no image of the file ({', '.join(orphans[:3])}): "
            "the annotation file is inconsistent"
        )


def _load_coco_annotations(ann_file: pathlib.Path):
    """A pycocotools ``COCO`` index of ``ann_file`` after checking it has images, categories and
    annotations (ValueError naming the file otherwise)."""
    try:
        from pycocotools.coco import COCO
    except ImportError as err:
        raise RuntimeError('reading COCO annotations needs pycocotools: pip install -e ".[eval]"') from err

    if not ann_file.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
    try:
        content = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{ann_file} is not a JSON file: {err}") from err
    if not isinstance(content, dict):
        raise ValueError(f"{ann_file} is not a COCO annotation file (top level is not an object)")
    for key in ("images", "categories", "annotations"):
        if key not in content:
            raise ValueError(f"{ann_file} has no '{key}': not a COCO instances_*.json annotation file")
    if not content["categories"]:
        raise ValueError(f"{ann_file} has no categories")
    check_coco_fields(content, ann_file)
    coco = COCO()
    coco.dataset = content
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress messages
        try:
            coco.createIndex()
        except (KeyError, TypeError) as err:
            raise ValueError(f"{ann_file} is malformed: missing field {err}") from err
    return coco


class CocoMultiLabel(MultiLabelImages):
    """MS-COCO (2014) as multi-label classification.

    ``ann_file``: an ``instances_*.json``. Classes = its categories named by their ``name``, in the
    released codes' order: names sorted (for COCO's 80 that is :data:`COCO_CLASSES`; two categories
    with one name raise ``ValueError``). Images = all of the file's images in
    increasing image id, ``image_dir / file_name``; target[c] = 1 when the image has any annotation
    (crowd ones included) of class c, so images without annotations are kept with all-zero targets.
    """

    def __init__(
        self, image_dir: str | os.PathLike, ann_file: str | os.PathLike, image_size: int = 448
    ) -> None:
        image_dir = _require_dir(pathlib.Path(image_dir), "COCO image directory")
        ann_file = pathlib.Path(ann_file)
        coco = _load_coco_annotations(ann_file)
        category_ids = sorted(coco.getCatIds(), key=lambda category_id: coco.cats[category_id]["name"])
        names = [coco.cats[category_id]["name"] for category_id in category_ids]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"{ann_file}: several categories are named {repeated}: classes are indexed by name")
        class_index = {category_id: i for i, category_id in enumerate(category_ids)}
        image_ids = sorted(coco.getImgIds())
        targets = torch.zeros(len(image_ids), len(category_ids))
        for row, image_id in enumerate(image_ids):
            for annotation in coco.imgToAnns[image_id]:  # categories checked by check_coco_fields
                targets[row, class_index[annotation["category_id"]]] = 1.0
        classes = [coco.cats[category_id]["name"] for category_id in category_ids]
        paths = [image_dir / coco.imgs[image_id]["file_name"] for image_id in image_ids]
        super().__init__(paths, targets, classes, image_size)
        self.image_ids = image_ids


def check_difficult(difficult: str) -> str:
    if difficult not in DIFFICULT_MODES:
        raise ValueError(f"difficult must be one of {DIFFICULT_MODES}, got {difficult!r}")
    return difficult


def voc_image_target(xml_file: pathlib.Path, difficult: str = "ignore") -> torch.Tensor:
    """The ``[20]`` target of one VOC annotation file: 1 for a class with a non-difficult object;
    for a class with only ``difficult`` objects :data:`IGNORE` (``difficult="ignore"``) or 0
    (``"negative"``); 0 for a class without objects. A missing ``<difficult>`` means 0; any value
    other than 0 or 1, or an unknown class name, is a ``ValueError`` naming the file."""
    if not xml_file.is_file():
        raise FileNotFoundError(f"VOC annotation file not found: {xml_file}")
    try:
        root = ET.parse(xml_file).getroot()
    except ET.ParseError as err:
        raise ValueError(f"cannot parse VOC annotation {xml_file}: {err}") from err
    target = torch.zeros(len(VOC_CLASSES))
    difficult_only = torch.zeros(len(VOC_CLASSES), dtype=torch.bool)
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise ValueError(f"{xml_file}: unknown VOC class {name!r}")
        c = VOC_CLASSES.index(name)
        flag = (obj.findtext("difficult") or "0").strip()
        if flag not in ("0", "1"):
            raise ValueError(f"{xml_file}: <difficult> of a {name!r} object must be 0 or 1, got {flag!r}")
        if flag == "1":
            difficult_only[c] = True
        else:
            target[c] = 1.0
    if difficult == "ignore":
        target[difficult_only & (target == 0)] = IGNORE
    return target


class VocMultiLabel(MultiLabelImages):
    """PASCAL VOC 2007/2012 as multi-label classification with the 20 classes in the devkit's order.

    ``root`` is a ``VOCdevkit/VOC2007``-style directory: image ids from ``ImageSets/Main/{split}.txt``,
    labels from ``Annotations/{id}.xml``, images ``JPEGImages/{id}.jpg``.

    ``difficult`` decides a class whose only objects in an image are marked difficult:
    ``"ignore"`` (default) leaves that (image, class) entry out of the metrics, as the VOC devkit's
    classification evaluation and the ML-GCN/MCAR code do (their label 0); ``"negative"`` counts it
    as absent. A class with any non-difficult object is present either way.
    """

    def __init__(
        self, root: str | os.PathLike, split: str = "test", image_size: int = 448, difficult: str = "ignore"
    ) -> None:
        root = _require_dir(pathlib.Path(root), "VOC root directory")
        difficult = check_difficult(difficult)
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"VOC split file not found: {split_file}")
        image_ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        if not image_ids:
            raise ValueError(f"VOC split file {split_file} lists no image")
        targets = torch.stack([
            voc_image_target(root / "Annotations" / f"{image_id}.xml", difficult) for image_id in image_ids
        ])
        paths = [root / "JPEGImages" / f"{image_id}.jpg" for image_id in image_ids]
        super().__init__(paths, targets, VOC_CLASSES, image_size)
        self.image_ids = image_ids
        self.difficult = difficult


def build_dataset(
    data: str,
    root: str | os.PathLike,
    split: str | None = None,
    ann_file: str | os.PathLike | None = None,
    image_size: int = 448,
    difficult: str = "ignore",
) -> MultiLabelImages:
    """The dataset named by ``data`` (``"coco"`` or ``"voc"``), with the ``fastmlr evaluate`` layout.

    COCO: ``root`` is the COCO directory; images in ``root/{split}2014`` when that directory exists,
    else in ``root`` itself; annotations ``ann_file``, by default
    ``root/annotations/instances_{split}2014.json``; ``split`` defaults to ``"val"``.
    VOC: ``root`` is ``VOCdevkit/VOC2007`` (or 2012); ``split`` defaults to ``"test"``; no ``ann_file``.
    """
    if data not in DEFAULT_SPLITS:
        raise ValueError(f"unknown dataset {data!r}; choose one of {sorted(DEFAULT_SPLITS)}")
    root = pathlib.Path(root)
    split = split or DEFAULT_SPLITS[data]
    if data == "coco":
        image_dir = root / f"{split}2014"
        image_dir = image_dir if image_dir.is_dir() else root
        ann_file = ann_file or root / "annotations" / f"instances_{split}2014.json"
        return CocoMultiLabel(image_dir, ann_file, image_size)
    if ann_file is not None:
        raise ValueError("--ann applies to COCO only: VOC annotations are read from root/Annotations")
    return VocMultiLabel(root, split, image_size, difficult)
