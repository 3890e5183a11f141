"""Compare an exported artifact with the PyTorch reference before it is written.

The inputs are real images (the COCO and VOC validation photos packaged in ``fastmlr/assets/images``,
through :func:`fastmlr.data.eval_transform`: resized to the model's size, ImageNet-normalised)
plus seeded random images. Floating outputs must agree within a tolerance that depends on the
artifact's precision (:data:`TOLERANCES`); integer outputs (MCAR's boxes and class indices) must be
identical. A failure raises :class:`ExportValidationError` naming, for every failing output, the worst
difference, the element index and the input it occurred on.
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastmlr.data import IMAGENET_MEAN, IMAGENET_STD, eval_transform, load_image

#: Largest allowed absolute difference of floating outputs (probabilities), by artifact precision:
#: fp32 and fp16 as the export issue fixes them; bf16 scales fp16's bound by the ratio of the two
#: formats' unit roundoffs (2^-8 / 2^-11 = 8), as bf16 keeps 7 mantissa bits to fp16's 10.
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 8e-2}

#: The validation photos shipped as package data: ``coco/`` (6 COCO val2014) and ``voc/`` (4 VOC 2008).
DEFAULT_IMAGES_DIR = Path(str(importlib.resources.files("fastmlr"))) / "assets" / "images"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

#: Runs one input batch and returns the outputs in ``output_names`` order.
Runner = Callable[[torch.Tensor], Sequence[np.ndarray | torch.Tensor]]


class ExportValidationError(RuntimeError):
    """The artifact's outputs differ from PyTorch's; the message says where and by how much."""


def tolerance_for(precision: str) -> float:
    """The allowed absolute difference for ``precision`` (``"fp32"``, ``"fp16"`` or ``"bf16"``)."""
    if precision not in TOLERANCES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {sorted(TOLERANCES)}")
    return TOLERANCES[precision]


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


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation (:data:`fastmlr.data.IMAGENET_MEAN`/``STD``) of ``[..., 3, H, W]`` pixels in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=pixels.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=pixels.dtype).view(3, 1, 1)
    return (pixels - mean) / std


def image_batches(paths: Sequence[Path], image_size: int, batch: int) -> list[tuple[str, torch.Tensor]]:
    """The images in consecutive groups of ``batch``; the last group is completed with images from the
    start. Each group is labelled with its files (``parent/name``)."""
    if not paths:
        return []
    transform = eval_transform(image_size)  # the papers' test transform, as fastmlr.data applies it
    images = [transform(load_image(p)) for p in paths]
    names = [f"{p.parent.name}/{p.name}" for p in paths]
    groups = []
    for start in range(0, len(paths), batch):
        order = [(start + k) % len(paths) for k in range(batch)]
        label = "images [" + ", ".join(names[i] for i in order) + "]"
        groups.append((label, torch.stack([images[i] for i in order])))
    return groups


def random_batches(image_size: int, batch: int, count: int, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """``count`` batches of uniform random pixels (ImageNet-normalised), drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for k in range(count):
        pixels = torch.rand(batch, 3, image_size, image_size, generator=generator)
        batches.append((f"random input #{k} (seed {seed}, batch {batch})", normalize(pixels)))
    return batches


def validation_inputs(
    image_paths: Sequence[Path], image_size: int, batches: Sequence[int], *, num_random: int = 2, seed: int = 0
) -> list[tuple[str, torch.Tensor]]:
    """Labelled input batches: the real images grouped by the first batch size, then ``num_random``
    random batches of every size in ``batches`` (several sizes check a dynamic batch axis)."""
    inputs = image_batches(image_paths, image_size, batches[0])
    for b in batches:
        inputs += random_batches(image_size, b, num_random, seed)
    return inputs


@dataclass(frozen=True)
class Comparison:
    """The worst element of one output over the inputs compared. ``difference`` is the absolute
    difference there (``inf`` for a shape mismatch or NaN on one side only); ``exact`` outputs
    (integers) must not differ at all."""

    output: str
    input_label: str
    index: tuple[int, ...]
    expected: float
    actual: float
    difference: float
    tolerance: float
    exact: bool
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.difference == 0 if self.exact else self.difference <= self.tolerance

    def describe(self, artifact: str = "export") -> str:
        """One line saying where the worst difference is and what was allowed."""
        if self.note:
            return f"output {self.output!r} on {self.input_label}: {self.note}"
        bound = "must be identical" if self.exact else f"tolerance {self.tolerance:g}"
        return (
            f"output {self.output!r} at index {self.index} on {self.input_label}: {artifact} {self.actual:.7g} "
            f"vs PyTorch {self.expected:.7g} (|diff| {self.difference:.3g}, {bound})"
        )


def compare_arrays(
    output: str, expected: np.ndarray, actual: np.ndarray, tolerance: float, input_label: str
) -> Comparison:
    """The worst element of ``actual`` against ``expected``. Integer and boolean outputs are exact;
    floating ones compare within ``tolerance``."""
    exact = not np.issubdtype(expected.dtype, np.floating)
    if expected.shape != actual.shape:
        note = f"shape {tuple(actual.shape)} differs from PyTorch's {tuple(expected.shape)}"
        return Comparison(output, input_label, (), np.nan, np.nan, np.inf, tolerance, exact, note)
    if expected.size == 0:
        return Comparison(output, input_label, (), 0.0, 0.0, 0.0, tolerance, exact)
    e64 = expected.astype(np.float64)
    a64 = actual.astype(np.float64)
    diff = np.abs(e64 - a64)
    both_nan = np.isnan(e64) & np.isnan(a64)
    diff = np.where(both_nan, 0.0, np.where(np.isnan(diff), np.inf, diff))
    flat = int(np.argmax(diff))
    index = tuple(int(i) for i in np.unravel_index(flat, diff.shape))
    return Comparison(output, input_label, index, float(e64[index]), float(a64[index]), float(diff[index]),
                      tolerance, exact)


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy() if x.dtype == torch.bfloat16 else x.detach().cpu().numpy()
    return np.asarray(x)


def _badness(cmp: Comparison) -> tuple[bool, float]:
    """Ordering key: failing beats passing, then the larger difference."""
    return (not cmp.ok, cmp.difference)


def compare_runners(
    run: Runner,
    reference: Runner,
    inputs: Sequence[tuple[str, torch.Tensor]],
    output_names: Sequence[str],
    tolerance: float,
) -> list[Comparison]:
    """Run both on every input; return, per output, the worst comparison over all inputs (a failing
    one is worse than any passing one)."""
    worst: dict[str, Comparison] = {}
    for label, images in inputs:
        expected = reference(images)
        try:
            actual = run(images)
        except Exception as err:  # noqa: BLE001 - any runtime failure is a validation failure
            raise ExportValidationError(f"on {label} the artifact failed to run: {err}") from err
        if len(actual) != len(output_names) or len(expected) != len(output_names):
            raise ExportValidationError(
                f"on {label}: expected {len(output_names)} outputs {list(output_names)}, the artifact gave "
                f"{len(actual)} and PyTorch {len(expected)}"
            )
        for name, e, a in zip(output_names, expected, actual, strict=True):
            cmp = compare_arrays(name, _numpy(e), _numpy(a), tolerance, label)
            if name not in worst or _badness(cmp) > _badness(worst[name]):
                worst[name] = cmp
    return [worst[name] for name in output_names if name in worst]


def raise_on_failure(comparisons: Sequence[Comparison], artifact: str, notes: Sequence[str] = ()) -> None:
    """Raise :class:`ExportValidationError` listing every failing comparison (and ``notes``, e.g. the
    tracer's warnings, which often explain a mismatch)."""
    failing = [c for c in comparisons if not c.ok]
    if not failing:
        return
    message = f"{artifact} differs from the PyTorch model, so it was not written: " + "; ".join(
        c.describe(artifact) for c in failing
    )
    if notes:
        message += ". Warnings while exporting: " + " | ".join(notes)
    raise ExportValidationError(message)
