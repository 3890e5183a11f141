"""The validation photos packaged with fastmlr and :func:`find_images`, without importing PyTorch (the
ONNX Runtime path of a server imports this)."""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Sequence
from pathlib import Path

#: The validation photos shipped as package data: ``coco/`` (6 COCO val2014) and ``voc/`` (4 VOC 2008).
DEFAULT_IMAGES_DIR = Path(str(importlib.resources.files("fastmlr"))) / "assets" / "images"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def find_images(source: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> list[Path]:
    """The validation images: every ``.jpg/.jpeg/.png`` under a directory (recursively, sorted), or the
    given files. ``None`` means the packaged images, :data:`DEFAULT_IMAGES_DIR` (a ``FileNotFoundError``
    if the installation lacks them). A directory or file that was named explicitly but is missing raises
    ``FileNotFoundError``; a named directory without images raises ``ValueError``."""
    if source is None:
        if not DEFAULT_IMAGES_DIR.is_dir():
            raise FileNotFoundError(f"this installation lacks the packaged validation images: {DEFAULT_IMAGES_DIR}")
        source = DEFAULT_IMAGES_DIR
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.exists():
            raise FileNotFoundError(f"validation image directory not found: {root}")
        if root.is_file():
            return [root]
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise ValueError(f"no {'/'.join(IMAGE_SUFFIXES)} images under {root}")
        return paths
    paths = [Path(p) for p in source]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"validation images not found: {missing}")
    return paths
