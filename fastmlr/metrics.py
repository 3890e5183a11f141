"""Multi-label recognition metrics: mAP and the precision / recall / F1 family of MCAR eq. (10).

Every metric is returned in **percent** (0–100), as the papers' tables report them.

Conventions (fixed here because the papers leave them open):

* **AP** of a class is the non-interpolated average precision of its ranked scores,
  ``AP = Σ_k (R_k − R_{k−1}) · P_k`` over the distinct score values taken as thresholds in
  decreasing order (P_k, R_k: precision and recall of "score ≥ k-th value"). With distinct scores this
  is the mean, over the positive images, of the precision at each positive's rank; tied scores form
  one threshold, so the result does not depend on the order of the images.
* Classes **without a positive image** have no AP and no recall: they are left out of mAP, CP and
  CR (the per-class averages run over the ``num_classes_evaluated`` classes that have a positive).
  Their false positives still count in OP. Their AP is reported as ``None``.
* **Thresholded labels**: an image is assigned class c when its score is **greater than or equal
  to** ``threshold``. **Top-3 labels**: the classes among the image's three highest scores (ties:
  the lower class index first; all classes when C < 3) whose score is also ``>= threshold``, so an
  image can have fewer than three. Both follow the metric code the MCAR and ML-GCN authors released
  (``AveragePrecisionMeter.evaluation`` / ``overall_topk``): MCAR's compares probabilities with
  ``>= 0.6``, ML-GCN's (reused by Deep-LIFT) logits with ``>= 0``, i.e. probabilities ``>= 0.5``.
  MCAR's text says "greater than a threshold"; the released code, which produced its tables, is
  followed. :func:`paper_threshold` gives each model's threshold (0.6 for MCAR, 0.5 otherwise).
* A class with no predicted image has precision 0 (as in ML-GCN's evaluation code, which MCAR's
  code reuses); an F1 whose precision and recall are both 0 is 0.
* ``ignore`` (optional, same shape as ``labels``) marks (image, class) entries left out of every
  metric, e.g. PASCAL VOC's "difficult"-only objects (see :mod:`fastmlr.data`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

METRIC_NAMES = ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1")
TOP3_NAMES = ("CP_top3", "CR_top3", "CF1_top3", "OP_top3", "OR_top3", "OF1_top3")

DEFAULT_THRESHOLD = 0.5
# Thresholds of the models' released evaluation code where it differs from DEFAULT_THRESHOLD: MCAR's
# ``util.AveragePrecisionMeter`` uses probabilities >= 0.6. ML-GCN's and Deep-LIFT's use logits >= 0
# (= 0.5); SSGRL's released code reports mAP only; SRDL, LCE and P-GCN released no evaluation code.
PAPER_THRESHOLDS = {"mcar": 0.6}


def paper_threshold(model_name: str) -> float:
    """The label threshold of ``model_name``'s paper code: 0.6 for MCAR, 0.5 for every other model."""
    return PAPER_THRESHOLDS.get(model_name, DEFAULT_THRESHOLD)


def _as_numpy(array: Any, name: str) -> np.ndarray:
    """A torch tensor, numpy array or nested list as a 2-D numpy array; ValueError otherwise."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D [num_images, num_classes], got shape {array.shape}")
    return array


def check_scores_labels(
    scores: Any, labels: Any, ignore: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and convert: ``scores`` float64 ``[N, C]`` (finite), ``labels`` bool ``[N, C]``
    (values 0/1 or bool), ``ignore`` bool ``[N, C]`` (all False when None)."""
    scores = _as_numpy(scores, "scores")
    labels = _as_numpy(labels, "labels")
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels must have the same shape, got {scores.shape} and {labels.shape}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores and labels must be non-empty, got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.number) or np.issubdtype(scores.dtype, np.complexfloating):
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}")
    scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    if labels.dtype != bool:
        if not np.issubdtype(labels.dtype, np.number):
            raise ValueError(f"labels must be binary (0/1), got dtype {labels.dtype}")
        bad = np.unique(labels[(labels != 0) & (labels != 1)])
        if bad.size:
            raise ValueError(f"labels must be binary (0/1), found values {bad[:5].tolist()}")
    labels = labels.astype(bool)
    if ignore is None:
        ignore = np.zeros(labels.shape, dtype=bool)
    else:
        ignore = _as_numpy(ignore, "ignore")
        if ignore.shape != labels.shape:
            raise ValueError(f"ignore must have the labels' shape {labels.shape}, got {ignore.shape}")
        if ignore.dtype != bool:
            raise ValueError(f"ignore must be a boolean mask, got dtype {ignore.dtype}")
    return scores, labels, ignore


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Non-interpolated AP (a fraction) of one class: ``Σ_k (R_k − R_{k−1}) · P_k`` over the distinct
    score values in decreasing order; ``None`` when there is no positive. 1-D inputs of equal length."""
    num_positives = int(positives.sum())
    if num_positives == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_positives = scores[order], positives[order]
    true_positives = np.cumsum(sorted_positives)
    # Last index of every run of tied scores: the thresholds.
    last_of_tie = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    tp_at_threshold = true_positives[last_of_tie]
    predicted_at_threshold = np.flatnonzero(last_of_tie) + 1
    precision = tp_at_threshold / predicted_at_threshold
    recall_gain = np.diff(np.r_[0, tp_at_threshold]) / num_positives
    return float(np.sum(recall_gain * precision))


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise ``numerator / denominator`` with 0 where the denominator is 0."""
    numerator, denominator = np.asarray(numerator, float), np.asarray(denominator, float)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator != 0)


def _f1(precision: float, recall: float) -> float:
    return float(_safe_ratio(2 * precision * recall, precision + recall))


def precision_recall_f1(
    predicted: np.ndarray, labels: np.ndarray, ignore: np.ndarray, evaluated_classes: np.ndarray
) -> dict[str, float]:
    """CP, CR, CF1, OP, OR, OF1 (fractions) of MCAR eq. (10) for boolean ``predicted`` ``[N, C]``.

    ``M_c^i`` (correct), ``M_p^i`` (predicted), ``M_g^i`` (ground truth) count images per class over
    the entries not ignored. OP/OR sum the counts over all classes; CP/CR average the per-class
    ratios over ``evaluated_classes`` (a boolean ``[C]`` mask: the classes with a positive).
    """
    kept = ~ignore
    correct = (predicted & labels & kept).sum(axis=0)  # M_c^i
    num_predicted = (predicted & kept).sum(axis=0)  # M_p^i
    num_ground_truth = (labels & kept).sum(axis=0)  # M_g^i
    overall_precision = float(_safe_ratio(correct.sum(), num_predicted.sum()))
    overall_recall = float(_safe_ratio(correct.sum(), num_ground_truth.sum()))
    per_class_precision = float(_safe_ratio(correct, num_predicted)[evaluated_classes].mean())
    per_class_recall = float(_safe_ratio(correct, num_ground_truth)[evaluated_classes].mean())
    return {
        "CP": per_class_precision,
        "CR": per_class_recall,
        "CF1": _f1(per_class_precision, per_class_recall),
        "OP": overall_precision,
        "OR": overall_recall,
        "OF1": _f1(overall_precision, overall_recall),
    }


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean ``[N, C]``: each row's ``min(k, C)`` highest scores (ties: lower class index first),
    whatever their value (:func:`evaluate` also requires ``>= threshold`` for its top-3 labels)."""
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    mask = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(mask, top, True, axis=1)
    return mask


def evaluate(
    scores: Any, labels: Any, threshold: float = DEFAULT_THRESHOLD, ignore: Any = None
) -> dict[str, Any]:
    """All MLR metrics of ``scores`` ``[N, C]`` against binary ``labels`` ``[N, C]``, in percent.

    ``scores`` are probabilities (anything ranked works for mAP and top-3; the threshold is compared
    with them as they are). Accepts numpy arrays, torch tensors or nested lists.

    Returns a dict with ``mAP``, ``CP``, ``CR``, ``CF1``, ``OP``, ``OR``, ``OF1`` (labels = scores >=
    ``threshold``), ``CP_top3`` … ``OF1_top3`` (labels = the classes among each image's 3 highest
    scores that are >= ``threshold``), all in percent;
    ``AP``: per-class AP in percent (``None`` for a class without positives); ``num_images``,
    ``num_classes``, ``num_classes_evaluated`` (classes with a positive, the ones averaged by mAP,
    CP, CR), ``classes_without_positives`` (their indices), ``threshold``.
    See the module docstring for the exact conventions.
    """
    threshold = float(threshold)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    scores, labels, ignore = check_scores_labels(scores, labels, ignore)
    kept = ~ignore
    ap = [average_precision(scores[kept[:, c], c], labels[kept[:, c], c]) for c in range(scores.shape[1])]
    evaluated_classes = np.array([value is not None for value in ap])
    if not evaluated_classes.any():
        raise ValueError("no class has a positive label: mAP, CP and CR are undefined")
    results: dict[str, Any] = {"mAP": 100.0 * float(np.mean([v for v in ap if v is not None]))}
    passes_threshold = scores >= threshold
    thresholded = precision_recall_f1(passes_threshold, labels, ignore, evaluated_classes)
    top3 = precision_recall_f1(top_k_mask(scores, 3) & passes_threshold, labels, ignore, evaluated_classes)
    results.update({name: 100.0 * value for name, value in thresholded.items()})
    results.update({f"{name}_top3": 100.0 * value for name, value in top3.items()})
    results.update(
        AP=[None if v is None else 100.0 * v for v in ap],
        num_images=int(scores.shape[0]),
        num_classes=int(scores.shape[1]),
        num_classes_evaluated=int(evaluated_classes.sum()),
        classes_without_positives=np.flatnonzero(~evaluated_classes).tolist(),
        threshold=threshold,
    )
    return results


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """A text table of :func:`evaluate` results, one block of two lines per named result
    (labels ``≥threshold``, then ``top-3``: the top-3 classes that pass the threshold), columns mAP
    CP CR CF1 OP OR OF1 in percent."""
    header = f"{'':<16}{'labels':>8}" + "".join(f"{name:>8}" for name in METRIC_NAMES)
    lines = [header, "-" * len(header)]
    for row_name, result in rows.items():
        thresholded = [result[name] for name in METRIC_NAMES]
        top3 = [result[f"{name}_top3"] for name in METRIC_NAMES[1:]]
        lines.append(
            f"{row_name:<16}{'≥' + format(result['threshold'], '.2f'):>8}"
            + "".join(f"{value:8.2f}" for value in thresholded)
        )
        lines.append(f"{'':<16}{'top-3':>8}{'':>8}" + "".join(f"{value:8.2f}" for value in top3))
    lines.append("labels: ≥t = every class scoring ≥ t; top-3 = the image's 3 highest scores that are ≥ t")
    return "\n".join(lines)
