"""Compare an exported artifact with the PyTorch reference before it is written.

The inputs are real images (the COCO and VOC validation photos packaged in ``fastmlr/assets/images``,
through :func:`fastmlr.data.eval_transform`: resized to the model's size, ImageNet-normalised)
plus seeded random images. :func:`validate` runs any artifact that maps images to named outputs and
checks it against the model within a tolerance that depends on the artifact's precision
(:data:`TOLERANCES`).

MCAR is checked stage by stage, because its global-to-local step is discontinuous: a top-N ranking
and a threshold test on normalised profiles (eq. 6-7) turn values that differ by a few ulps between
two runtimes into different integers wherever the reference itself is on a tie (a saturated sigmoid
gives plateaus and exactly equal peaks). Numerics may drift within the tolerance; logic may not. So
the streams are compared within the tolerance, the decisions exactly except where the reference's
decision is ambiguous within the tolerance (:mod:`.decision_margins`), and the local stream on the
artifact's own boxes. The result is a :class:`ValidationReport`; a failure raises
:class:`ExportValidationError` naming the failing stage, the worst difference, its index and input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fastmlr.kernels import use_backend
from fastmlr.kernels.localize import max_marginals, selected_maps
from torch import nn

from fastmlr import kernels
from fastmlr.data import IMAGENET_MEAN, IMAGENET_STD, eval_transform, load_image

from .decision_margins import IntervalMargins, explain_ranking
from .images import DEFAULT_IMAGES_DIR, IMAGE_SUFFIXES, find_images  # noqa: F401 - also this module's API

#: Largest allowed absolute difference of floating outputs (probabilities), by artifact precision:
#: fp32 1e-4 and fp16 1e-2, fastmlr's export contract; bf16 scales fp16's bound by the ratio of the two
#: formats' unit roundoffs (2^-8 / 2^-11 = 8), as bf16 keeps 7 mantissa bits to fp16's 10. int8
#: (calibrated Q/DQ, :mod:`fastmlr.export.precision`) from the drift measured on well-conditioned
#: random-weight networks (``bench/bench_precision.py``, ``tests/test_export_precision.py``), with headroom.
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 8e-2, "int8": 0.15}


class ExportValidationError(RuntimeError):
    """The artifact's outputs differ from PyTorch's; the message says in which stage, where and by how
    much. ``stage`` names the failing stage, ``report`` is the :class:`ValidationReport` (when one was
    made)."""

    def __init__(self, message: str, *, stage: str | None = None, report: ValidationReport | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.report = report


def tolerance_for(precision: str) -> float:
    """The allowed absolute difference for ``precision`` (``"fp32"``, ``"fp16"`` or ``"bf16"``)."""
    if precision not in TOLERANCES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {sorted(TOLERANCES)}")
    return TOLERANCES[precision]


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
    difference there (``inf`` for a shape mismatch or NaN on one side only), divided by ``max(1,
    scale)`` when ``scaled``; ``exact`` outputs (integers) must not differ at all."""

    output: str
    input_label: str
    index: tuple[int, ...]
    expected: float
    actual: float
    difference: float
    tolerance: float
    exact: bool
    note: str = ""
    scaled: bool = False

    @property
    def ok(self) -> bool:
        return self.difference == 0 if self.exact else self.difference <= self.tolerance

    def describe(self, artifact: str = "export") -> str:
        """One line saying where the worst difference is and what was allowed."""
        if self.note:
            return f"output {self.output!r} on {self.input_label}: {self.note}"
        bound = "must be identical" if self.exact else f"tolerance {self.tolerance:g}"
        if self.scaled:
            bound += " times max(1, its rounding scale)"
        return (
            f"output {self.output!r} at index {self.index} on {self.where}: {artifact} {self.actual:.7g} "
            f"vs PyTorch {self.expected:.7g} (|diff| {self.difference:.3g}, {bound})"
        )

    @property
    def where(self) -> str:
        """The image the worst element belongs to (the first index is the batch position)."""
        return _image_name(self.input_label, self.index[0]) if self.index else self.input_label


def compare_arrays(
    output: str, expected: np.ndarray, actual: np.ndarray, tolerance: float, input_label: str,
    *, scale: np.ndarray | None = None,
) -> Comparison:
    """The worst element of ``actual`` against ``expected``. Integer and boolean outputs are exact;
    floating ones compare within ``tolerance``, times ``max(1, scale)`` where ``scale`` is given (the
    magnitude a sum's rounding error is relative to)."""
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
    if scale is not None:
        diff = diff / np.maximum(1.0, scale)
    flat = int(np.argmax(diff))
    index = tuple(int(i) for i in np.unravel_index(flat, diff.shape))
    return Comparison(output, input_label, index, float(e64[index]), float(a64[index]), float(diff[index]),
                      tolerance, exact, scaled=scale is not None)


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy() if x.dtype == torch.bfloat16 else x.detach().cpu().numpy()
    return np.asarray(x)


def _badness(cmp: Comparison) -> tuple[bool, float]:
    """Ordering key: failing beats passing, then the larger difference."""
    return (not cmp.ok, cmp.difference)


# ---------------------------------------------------------------------------------------------------
# The stage-wise contract
# ---------------------------------------------------------------------------------------------------

#: The outputs of a model with ``forward_stages`` (MCAR), in graph order: the final probabilities, the
#: ``[B, N, 4]`` int64 boxes and ``[B, N]`` class indices, then the stages the validation reads: global
#: and local scores ``[B, C]`` and the class maps before the sigmoid ``[B, C, h, w]``.
STAGE_OUTPUTS = ("probs", "boxes", "indices", "global_scores", "local_scores", "cam_logits")

#: The stages, in the order they are checked (a model without ``forward_stages`` has ``probabilities`` only).
GLOBAL, DECISIONS, LOCAL, FINAL, PROBABILITIES = (
    "global stream", "decisions", "local stream", "final scores", "probabilities")

#: Runs one input batch: ``images -> {output name: array}`` (or a sequence in :func:`output_names` order).
NamedRunner = Callable[[torch.Tensor], Mapping[str, np.ndarray | torch.Tensor] | Sequence[np.ndarray | torch.Tensor]]


class ArtifactMismatchError(ExportValidationError, ValueError):
    """The artifact is not an export of this model: other outputs, class count, regions per image (top-N)
    or input size. Raised before any numbers are compared."""


def has_stages(model: nn.Module) -> bool:
    """True for models exported with their stages (those with ``forward_stages``: MCAR)."""
    return callable(getattr(model, "forward_stages", None))


def output_names(model: nn.Module) -> tuple[str, ...]:
    """The exported graph's output names, in order."""
    return STAGE_OUTPUTS if has_stages(model) else ("probs",)


def resolve_tolerance(tolerance: float | str) -> float:
    """A tolerance given as a number (> 0) or a precision name (:data:`TOLERANCES`)."""
    if isinstance(tolerance, str):
        return tolerance_for(tolerance)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be a number in (0, 1) or one of {sorted(TOLERANCES)}, got {tolerance!r}")
    return float(tolerance)


@dataclass(frozen=True)
class DecisionFlip:
    """A decision where the artifact differs from PyTorch within the decision's margin.

    ``decision`` is ``"ranking"`` (``reference``/``artifact``: the N classes, best first) or
    ``"x interval"`` / ``"y interval"`` of region ``region`` (``[start, end)`` in pixels)."""

    input_label: str
    image: int
    region: int | None
    decision: str
    reference: tuple[int, ...]
    artifact: tuple[int, ...]
    reason: str

    def describe(self) -> str:
        where = _image_name(self.input_label, self.image)
        region = "" if self.region is None else f" region {self.region}"
        return f"{where}{region} {self.decision} {list(self.reference)} -> {list(self.artifact)}: {self.reason}"


def _image_name(input_label: str, image: int) -> str:
    """Image ``image`` of an input batch labelled by :func:`image_batches` or :func:`random_batches`."""
    if input_label.startswith("images [") and input_label.endswith("]"):
        names = input_label[len("images ["):-1].split(", ")
        if image < len(names):
            return names[image]
    return f"{input_label}, image {image}"


@dataclass
class StageReport:
    """One stage: the worst comparison per output it compares, and the refusals it found."""

    name: str
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    refusals: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refusals and all(c.ok for c in self.comparisons.values())

    def add(self, comparison: Comparison) -> None:
        old = self.comparisons.get(comparison.output)
        if old is None or _badness(comparison) > _badness(old):
            self.comparisons[comparison.output] = comparison

    def problems(self, artifact: str) -> list[str]:
        """The failing comparisons and the refusals, one line each."""
        return [c.describe(artifact) for c in self.comparisons.values() if not c.ok] + self.refusals

    def line(self) -> str:
        """``name: output worst |diff| (where); ...`` for the summary."""
        parts = []
        for c in self.comparisons.values():
            scaled = " (scaled)" if c.scaled else ""
            parts.append(f"{c.output} worst |diff|{scaled} {c.difference:.2g} at {c.index} on {c.where}")
        if self.refusals:
            parts.append(f"{len(self.refusals)} refused, e.g. {self.refusals[0]}")
        return f"{self.name}: {'ok' if self.ok else 'FAILED'}" + "".join(f"; {p}" for p in parts)


@dataclass
class EndToEnd:
    """What a user of the artifact sees: images whose classes and boxes are identical to PyTorch's, the
    IoU of each differing box (same rank), and the final probabilities' differences."""

    images: int = 0
    identical_boxes: int = 0
    differing_box_ious: list[float] = field(default_factory=list)
    max_prob_diff: float = 0.0
    sum_prob_diff: float = 0.0
    probs_compared: int = 0

    @property
    def mean_prob_diff(self) -> float:
        return self.sum_prob_diff / max(self.probs_compared, 1)

    def line(self, with_boxes: bool) -> str:
        probs = f"|Δprob| max {self.max_prob_diff:.3g}, mean {self.mean_prob_diff:.2g}"
        if not with_boxes:
            return f"end to end: {self.images} images, {probs}"
        ious = self.differing_box_ious
        iou = (f" (IoU of the {len(ious)} differing boxes: min {min(ious):.2f}, mean {np.mean(ious):.2f})"
               if ious else "")
        return f"end to end: {self.identical_boxes}/{self.images} images with identical boxes{iou}; {probs}"


@dataclass
class ValidationReport:
    """The outcome of :func:`validate`: per stage the worst difference and where; the decisions compared
    and the flips accepted with their reasons; end-to-end agreement."""

    artifact: str
    tolerance: float
    stages: dict[str, StageReport]
    decisions_compared: int = 0
    flips: list[DecisionFlip] = field(default_factory=list)
    end_to_end: EndToEnd = field(default_factory=EndToEnd)
    inputs: int = 0
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return all(stage.ok for stage in self.stages.values())

    @property
    def failing_stage(self) -> str | None:
        """The first stage (in checking order) that failed, or ``None``."""
        return next((name for name, stage in self.stages.items() if not stage.ok), None)

    def summary(self, max_flips: int = 3) -> str:
        """A few lines: the verdict, each stage's worst difference, the flips, end-to-end agreement."""
        verdict = "passed" if self.ok else f"FAILED at the {self.failing_stage} stage"
        lines = [f"{self.artifact} vs PyTorch: {verdict} (tolerance {self.tolerance:g}, {self.inputs} input "
                 f"batches, {self.end_to_end.images} images)"]
        for name, stage in self.stages.items():
            lines.append(f"  {stage.line()}")
            if name == DECISIONS:
                lines[-1] += (f"; {self.decisions_compared} compared, {len(self.flips)} flipped within their "
                              "margins" + (":" if self.flips else ""))
                lines += [f"    {flip.describe()}" for flip in self.flips[:max_flips]]
                if len(self.flips) > max_flips:
                    lines.append(f"    ... and {len(self.flips) - max_flips} more")
        lines.append(f"  {self.end_to_end.line(DECISIONS in self.stages)}")
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        """:class:`ExportValidationError` naming the first failing stage and its problems."""
        stage = self.failing_stage
        if stage is None:
            return
        problems = self.stages[stage].problems(self.artifact)
        shown = "; ".join(problems[:4]) + (f"; ... and {len(problems) - 4} more" if len(problems) > 4 else "")
        others = [name for name, s in self.stages.items() if not s.ok and name != stage]
        message = f"{self.artifact} differs from the PyTorch model in the {stage} stage, so it was not written: {shown}"
        if others:
            message += f". Also failing: {', '.join(others)}"
        if self.notes:
            message += ". Warnings while exporting: " + " | ".join(self.notes)
        raise ExportValidationError(message, stage=stage, report=self)


def _named_outputs(raw: object, names: Sequence[str], artifact: str) -> dict[str, np.ndarray]:
    """The runner's outputs by name; :class:`ArtifactMismatchError` for missing or extra outputs."""
    if isinstance(raw, Mapping):
        outputs = {str(k): _numpy(v) for k, v in raw.items()}
        if set(outputs) != set(names):
            missing, extra = sorted(set(names) - set(outputs)), sorted(set(outputs) - set(names))
            raise ArtifactMismatchError(
                f"{artifact} has outputs {sorted(outputs)}, the model exports {list(names)} (missing {missing}, "
                f"extra {extra}): it is not an export of this model", stage="interface")
        return outputs
    values = list(raw)  # type: ignore[call-overload]
    if len(values) != len(names):
        raise ArtifactMismatchError(
            f"{artifact} gives {len(values)} outputs, the model exports {len(names)} {list(names)}: it is not an "
            "export of this model", stage="interface")
    return {name: _numpy(v) for name, v in zip(names, values, strict=True)}


def _check_shapes(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], artifact: str) -> None:
    """:class:`ArtifactMismatchError` naming the first output whose shape differs from PyTorch's, by what
    the axis means (batch, class count, regions per image, class-map size)."""
    meaning = {"probs": ("batch", "classes"), "global_scores": ("batch", "classes"),
               "local_scores": ("batch", "classes"), "indices": ("batch", "regions per image (top-N)"),
               "boxes": ("batch", "regions per image (top-N)", "box coordinates"),
               "cam_logits": ("batch", "classes", "class-map height", "class-map width")}
    for name, e in expected.items():
        a = actual[name]
        if a.shape == e.shape:
            continue
        axes = meaning.get(name, ())
        if a.ndim == e.ndim:
            axis = next(i for i in range(e.ndim) if a.shape[i] != e.shape[i])
            what = axes[axis] if axis < len(axes) else f"axis {axis}"
            detail = f"{a.shape[axis]} {what}, the model {e.shape[axis]}"
        else:
            detail = f"shape {tuple(a.shape)}, the model {tuple(e.shape)}"
        raise ArtifactMismatchError(f"{artifact}'s output {name!r} has {detail}: it is not an export of this model",
                                    stage="interface")


@contextlib.contextmanager
def classifier_conditioning(model: nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Record ``(z, M)`` for every call of MCAR's 1×1 classifier (eq. 1 and 4): the logits and the
    magnitude of their summands ``M = Σ_k |W[c, k]·x[k]| + |b[c]|``, which a logit's floating-point
    rounding error is relative to. With random weights the features can be large and the logits small
    by cancellation: a logit near 1 may carry an fp32 error of 1e-2 while its summands are near 1e3.
    MCAR calls the classifier on the pooled image features, on the feature map (the class maps), then
    on the pooled region features."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        bias = None if module.bias is None else module.bias.abs()
        calls.append((output.detach(), torch.nn.functional.conv2d(inputs[0].detach().abs(), module.weight.abs(), bias)))

    handle = model.convclass.register_forward_hook(record)
    try:
        yield calls
    finally:
        handle.remove()


def probability_scale(z: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """``σ'(z)·M``: how far rounding at the scale of ``M`` moves the probability ``σ(z)``."""
    p = torch.sigmoid(z.float())
    return p * (1 - p) * magnitude


def _reference(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, object, list]:
    """The images on the model's device, the model's outputs on them (stages for MCAR, kernels on
    torch) and, for MCAR, its classifier calls (:func:`classifier_conditioning`)."""
    param = next(model.parameters(), None)
    images = images.to(param.device if param is not None else "cpu")
    with torch.no_grad(), use_backend("torch"):
        if not has_stages(model):
            return images, model(images), []
        with classifier_conditioning(model) as calls:
            return images, model.forward_stages(images), calls


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two half-open boxes ``(x1, y1, x2, y2)``."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union) if union > 0 else 0.0


def _check_decisions(report: ValidationReport, model: nn.Module, label: str, size: tuple[int, int], stages,
                     actual: dict[str, np.ndarray], tolerance: float, score_scale: np.ndarray,
                     map_drift: np.ndarray) -> bool:
    """Stage b: the artifact's classes and boxes are PyTorch's, or flips within their margins: the
    ranking within the global scores' tolerance (``tolerance · max(1, score_scale)``, stage a), each
    box within ``max(tolerance, map_drift[b, c])``, the largest
    difference of the artifact's class map after the sigmoid (bounded by stage a; upsampling is a
    convex combination, so no profile value moves further). Returns whether the boxes are usable for
    stage c (valid classes, boxes inside the image)."""
    refusals = report.stages[DECISIONS].refusals
    height, width = size
    scores = stages.global_scores.double().cpu().numpy()
    ref_indices = stages.indices.cpu().numpy()
    indices = actual["indices"].astype(np.int64)
    boxes = actual["boxes"].astype(np.int64)
    batch, regions = indices.shape
    report.decisions_compared += 3 * batch * regions  # a ranking position and two intervals per region
    for b in np.flatnonzero((indices != ref_indices).any(1)):
        reason = explain_ranking(scores[b], indices[b], ref_indices[b], tolerance * np.maximum(1, score_scale[b]))
        ref, art = tuple(ref_indices[b].tolist()), tuple(indices[b].tolist())
        if reason is None:
            refusals.append(f"{_image_name(label, b)}: the artifact ranks classes {list(art)}, PyTorch "
                            f"{list(ref)}, with global scores {np.round(scores[b][list(art)], 7).tolist()}: "
                            f"not a tie within {tolerance:g}")
        else:
            report.flips.append(DecisionFlip(label, int(b), None, "ranking", ref, art, reason))
    num_classes = scores.shape[1]
    if indices.min() < 0 or indices.max() >= num_classes:
        refusals.append(f"on {label}: class indices outside [0, {num_classes})")
        return False
    chosen = torch.from_numpy(indices).to(stages.cam_logits.device)
    same_classes = bool((indices == ref_indices).all())
    with torch.no_grad():
        ref_boxes = stages.boxes if same_classes else kernels.localize_regions(
            stages.cam_logits, chosen, size, model.threshold, backend="torch")
        ref_boxes = ref_boxes.cpu().numpy()
        differing = np.argwhere((boxes != ref_boxes).any(-1))
        if len(differing):
            px, py = max_marginals(selected_maps(stages.cam_logits, chosen), size, backend="torch")
            px, py = px.cpu().numpy(), py.cpu().numpy()
    for b, n in differing:
        for axis, (lo, hi), profile in (("x", (0, 2), px[b, n]), ("y", (1, 3), py[b, n])):
            ref = (int(ref_boxes[b, n, lo]), int(ref_boxes[b, n, hi]))
            art = (int(boxes[b, n, lo]), int(boxes[b, n, hi]))
            if ref == art:
                continue
            moved = max(tolerance, float(map_drift[b, indices[b, n]]))
            reason = IntervalMargins(profile, model.threshold, moved).explain(art)
            if reason is None:
                refusals.append(f"{_image_name(label, b)} region {n} (class {indices[b, n]}): the artifact's "
                                f"{axis} interval {list(art)}, PyTorch's {list(ref)}: no profile within "
                                f"{moved:.3g} gives it")
            else:
                report.flips.append(DecisionFlip(label, int(b), int(n), f"{axis} interval", ref, art, reason))
    inside = (boxes[..., 0] >= 0) & (boxes[..., 1] >= 0) & (boxes[..., 2] <= width) & (boxes[..., 3] <= height)
    return bool((inside & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])).all())


def _check_stages(report: ValidationReport, model: nn.Module, label: str, images: torch.Tensor, stages,
                  calls: list, actual: dict[str, np.ndarray], tolerance: float) -> None:
    """Stages a-d of MCAR's contract on one input batch, and its end-to-end agreement. ``calls`` are the
    reference's classifier calls (:func:`classifier_conditioning`): pooled image features, feature map,
    pooled regions."""
    batch = images.shape[0]
    (global_z, global_m), (_, cam_m), (local_z, local_m) = calls[:3]
    score_scale = _numpy(probability_scale(global_z, global_m).flatten(1))
    report.stages[GLOBAL].add(compare_arrays("global_scores", _numpy(stages.global_scores), actual["global_scores"],
                                             tolerance, label, scale=score_scale))
    report.stages[GLOBAL].add(compare_arrays("cam_logits", _numpy(stages.cam_logits), actual["cam_logits"], tolerance,
                                             label, scale=_numpy(cam_m)))
    maps = torch.sigmoid(stages.cam_logits.float()).cpu()
    drift = (torch.sigmoid(torch.from_numpy(actual["cam_logits"]).float()) - maps).abs().amax((-2, -1)).numpy()
    size = (int(images.shape[-2]), int(images.shape[-1]))
    if _check_decisions(report, model, label, size, stages, actual, tolerance, score_scale, drift):
        boxes = actual["boxes"].astype(np.int64)
        if (boxes == stages.boxes.cpu().numpy()).all():
            expected_local = stages.local_scores  # the same crops: PyTorch's own local stream
        else:
            with torch.no_grad(), use_backend("torch"), classifier_conditioning(model) as local_calls:
                regions = kernels.crop_resize(images, torch.from_numpy(boxes).to(images.device), size)
                expected_local = model.local_stream(regions.flatten(0, 1), batch)
            (local_z, local_m), = local_calls
        # The local score is a max over regions: its rounding scale is the largest of theirs.
        local_scale = probability_scale(local_z, local_m).reshape(batch, -1, local_z.shape[1]).amax(1)
        report.stages[LOCAL].add(compare_arrays("local_scores", _numpy(expected_local), actual["local_scores"],
                                                tolerance, label, scale=_numpy(local_scale)))
    else:
        report.stages[LOCAL].refusals.append(f"on {label}: not checked, the artifact's classes or boxes are invalid")
    combined = np.maximum(actual["global_scores"], actual["local_scores"])
    report.stages[FINAL].add(compare_arrays("probs", combined, actual["probs"], tolerance, label))
    ref_boxes, ref_indices = stages.boxes.cpu().numpy(), stages.indices.cpu().numpy()
    same = (actual["boxes"] == ref_boxes).all(-1) & (actual["indices"] == ref_indices)
    report.end_to_end.identical_boxes += int(same.all(1).sum())
    report.end_to_end.differing_box_ious += [_iou(ref_boxes[b, n], actual["boxes"][b, n])
                                             for b, n in np.argwhere(~same)]


def validate(
    run: NamedRunner,
    model: nn.Module,
    inputs: Sequence[tuple[str, torch.Tensor]],
    *,
    tolerance: float | str = "fp32",
    artifact: str = "the artifact",
    notes: Sequence[str] = (),
    check: bool = True,
) -> ValidationReport:
    """Validate any artifact that maps images to named outputs (an ONNX Runtime session, a TensorRT
    engine, a compiled module, a reduced-precision graph) against ``model`` in PyTorch.

    ``run(images)`` returns ``{name: array}`` for every name of :func:`output_names` (or a sequence in
    that order); ``inputs`` are labelled batches (:func:`validation_inputs`); ``tolerance`` is the
    largest allowed difference of a probability, a number or a precision (:data:`TOLERANCES`).

    Models without stages: ``probs`` within ``tolerance``. MCAR, stage by stage:

    a. global stream: ``cam_logits`` within ``tolerance · max(1, M)``, ``global_scores`` within
       ``tolerance · max(1, σ'(z)·M)``, where ``M`` is the magnitude of each logit's summands
       (:func:`classifier_conditioning`: a sum's rounding error is relative to its summands, not to
       its value; for well-conditioned weights the bound is ``tolerance`` itself);
    b. decisions: ``indices`` and ``boxes`` equal PyTorch's, except where PyTorch's decision is
       ambiguous within ``tolerance`` (:mod:`.decision_margins`: tied scores at a rank that changes the
       top-N, profile values near τ, near-equal peaks, flat profiles; for a box, within the larger of
       ``tolerance`` and the largest difference of that class map after the sigmoid, which stage a
       bounds); each such flip is reported with its reason, any other difference refuses the artifact;
    c. local stream: ``local_scores`` within ``tolerance · max(1, σ'(z)·M)`` of PyTorch's local stream
       on the crops of the artifact's own boxes;
    d. final scores: ``probs`` within ``tolerance`` of the per-class max of the artifact's global and
       local scores.

    Returns the :class:`ValidationReport`; with ``check`` (the default) a failing stage raises
    :class:`ExportValidationError` (its ``stage`` and ``report`` attached). An artifact of another
    model (other outputs, class count, regions per image) raises :class:`ArtifactMismatchError`
    before anything is compared; one that fails to run raises :class:`ExportValidationError`."""
    tolerance = resolve_tolerance(tolerance)
    names = output_names(model)
    stage_names = (GLOBAL, DECISIONS, LOCAL, FINAL) if has_stages(model) else (PROBABILITIES,)
    report = ValidationReport(artifact, tolerance, {name: StageReport(name) for name in stage_names},
                              notes=tuple(notes))
    model.eval()
    for label, batch in inputs:
        images, reference, calls = _reference(model, batch)
        try:
            raw = run(batch)
        except Exception as err:  # noqa: BLE001 - any runtime failure is a validation failure
            raise ExportValidationError(f"on {label} {artifact} failed to run: {err}", stage="interface") from err
        actual = _named_outputs(raw, names, artifact)
        expected = {name: _numpy(getattr(reference, name)) if has_stages(model) else _numpy(reference)
                    for name in names}
        _check_shapes(actual, expected, artifact)
        report.inputs += 1
        report.end_to_end.images += len(batch)
        if has_stages(model):
            _check_stages(report, model, label, images, reference, calls, actual, tolerance)
        else:
            report.stages[PROBABILITIES].add(compare_arrays("probs", expected["probs"], actual["probs"], tolerance,
                                                            label))
        diff = np.abs(expected["probs"].astype(np.float64) - actual["probs"].astype(np.float64))
        worst = float(np.nan_to_num(diff, nan=np.inf).max())
        report.end_to_end.max_prob_diff = max(report.end_to_end.max_prob_diff, worst)
        report.end_to_end.sum_prob_diff += float(diff.sum())
        report.end_to_end.probs_compared += diff.size
    if check:
        report.raise_if_failed()
    return report
