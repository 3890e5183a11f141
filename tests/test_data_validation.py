"""Every loader validates each field it reads: COCO annotation files, VOC annotations, images
(decompression bombs included)."""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from fastmlr.data import CocoMultiLabel, load_image, voc_image_target


def bomb_png(path, side: int = 14000) -> None:
    """A PNG whose header declares ``side``² pixels (above PIL's 179 M-pixel limit) and holds no
    data: PIL refuses it when opening, before decoding anything."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def test_decompression_bomb_is_a_value_error_naming_the_file(tmp_path) -> None:
    bomb_png(tmp_path / "bomb.png")
    with pytest.raises(ValueError, match=r"cannot read image .*bomb.png: .*decompression bomb"):
        load_image(tmp_path / "bomb.png")


def coco_file(tmp_path, **changes) -> object:
    content = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 3}],
    }
    content.update(changes)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(content))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"images": [{"id": 1}]}, "image 1 has no 'file_name'"),
    ({"images": [{"id": 1, "file_name": ""}]}, "image 1 has no 'file_name'"),
    ({"images": [{"file_name": "a.jpg"}]}, "image #0 has no integer 'id'"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}]}, "image id 1 appears twice"),
    ({"images": {"id": 1}}, "'images' must be a list of objects"),
    ({"categories": [{"id": 1}]}, "category 1 has no 'name'"),
    ({"categories": [{"id": "1", "name": "cat"}]}, "category #0 has no integer 'id'"),
    ({"annotations": [{"id": 10, "category_id": 3}]}, "annotation 10 has no 'image_id'"),
    ({"annotations": [{"image_id": 1}]}, "annotation #0 has no 'category_id'"),
    ({"annotations": [{"id": 10, "image_id": 1, "category_id": 99}]}, "annotation 10 has category_id 99"),
    ({"annotations": [{"id": 10, "image_id": 1, "category_id": 3}, {"id": 11, "image_id": 7, "category_id": 1}]},
     r"1 annotation\(s\) refer to no image of the file \(annotation 11 -> image_id 7\)"),
])
def test_coco_fields_are_checked(tmp_path, changes, message) -> None:
    path = coco_file(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        CocoMultiLabel(tmp_path, path, image_size=64)


def test_valid_coco_file_still_loads(tmp_path) -> None:
    dataset = CocoMultiLabel(tmp_path, coco_file(tmp_path), image_size=64)
    assert dataset.targets.tolist() == [[0.0, 1.0], [0.0, 0.0]]


def test_voc_difficult_flag_must_be_0_or_1(tmp_path) -> None:
    xml = tmp_path / "000001.xml"
    xml.write_text("<annotation><object><name>dog</name><difficult>yes</difficult></object></annotation>")
    with pytest.raises(ValueError, match=r"<difficult> of a 'dog' object must be 0 or 1, got 'yes'"):
        voc_image_target(xml)


def test_evaluate_skips_and_counts_a_bomb_read_in_a_loader_worker(tmp_path, capsys) -> None:
    from PIL import Image

    from fastmlr.cli import main

    (tmp_path / "val2014").mkdir()
    Image.new("RGB", (64, 64), (90, 20, 160)).save(tmp_path / "val2014" / "a.jpg")
    bomb_png(tmp_path / "val2014" / "b.png")
    path = coco_file(tmp_path, images=[{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.png"}],
                     annotations=[{"id": 1, "image_id": 1, "category_id": 1},
                                  {"id": 2, "image_id": 2, "category_id": 3}],
                     categories=[{"id": 1, "name": "class_0"}, {"id": 3, "name": "class_1"}])  # a 2-class model's
    argv = ["evaluate", "--model", "baseline", "--backbone", "mobilenet_v2", "--size", "64", "--data", "coco",
            "--root", str(tmp_path), "--ann", str(path), "--workers", "1", "--num-classes", "2"]
    with pytest.warns(UserWarning, match="b.png"):
        assert main(argv) == 0
    assert "1 images evaluated, 1 skipped as unreadable" in capsys.readouterr().out
