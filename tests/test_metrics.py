"""fastmlr.metrics: hand-computed cases, an independent per-image computation on random data, bad input."""

import math

import numpy as np
import pytest
import torch

from fastmlr.metrics import average_precision, evaluate, format_table, paper_threshold, top_k_mask


def reference_ap(scores: np.ndarray, positives: np.ndarray) -> float:
    """AP as the mean over positives of the precision at the positive's rank (distinct scores)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, precisions = 0, []
    for rank, i in enumerate(order, start=1):
        if positives[i]:
            hits += 1
            precisions.append(hits / rank)
    return sum(precisions) / len(precisions)


def reference_prf(predicted: list[list[bool]], labels: list[list[bool]]) -> dict[str, float]:
    """Eq. (10) by explicit loops over classes and images (every class has a positive)."""
    num_images, num_classes = len(labels), len(labels[0])
    correct = [sum(predicted[n][c] and labels[n][c] for n in range(num_images)) for c in range(num_classes)]
    predicted_count = [sum(predicted[n][c] for n in range(num_images)) for c in range(num_classes)]
    truth = [sum(labels[n][c] for n in range(num_images)) for c in range(num_classes)]
    op = sum(correct) / sum(predicted_count)
    orr = sum(correct) / sum(truth)
    cp = sum(c / p if p else 0.0 for c, p in zip(correct, predicted_count, strict=True)) / num_classes
    cr = sum(c / g for c, g in zip(correct, truth, strict=True)) / num_classes
    return {
        "CP": cp, "CR": cr, "CF1": 2 * cp * cr / (cp + cr),
        "OP": op, "OR": orr, "OF1": 2 * op * orr / (op + orr),
    }


def test_hand_computed_ap_and_prf():
    # Class 0 ranks: +, -, +, -  -> AP = (1/1 + 2/3) / 2.  Class 1 ranks: -, +, -, + -> (1/2 + 2/4) / 2.
    scores = np.array([[0.9, 0.9], [0.8, 0.8], [0.7, 0.4], [0.6, 0.3]])
    labels = np.array([[1, 0], [0, 1], [1, 0], [0, 1]])
    result = evaluate(scores, labels, threshold=0.5)
    assert result["AP"] == pytest.approx([100 * (1 + 2 / 3) / 2, 100 * 0.5])
    assert result["mAP"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 0.5) / 2)
    # >= 0.5: class 0 predicts all 4 (2 correct); class 1 predicts images 0, 1 (1 correct).
    cp, cr = (2 / 4 + 1 / 2) / 2, (2 / 2 + 1 / 2) / 2
    op, orr = 3 / 6, 3 / 4
    assert result["CP"] == pytest.approx(100 * cp)
    assert result["CR"] == pytest.approx(100 * cr)
    assert result["CF1"] == pytest.approx(100 * 2 * cp * cr / (cp + cr))
    assert result["OP"] == pytest.approx(100 * op)
    assert result["OR"] == pytest.approx(100 * orr)
    assert result["OF1"] == pytest.approx(100 * 2 * op * orr / (op + orr))
    # Top-3 with C = 2: both classes are in every image's top 3, so the threshold alone decides.
    for name in ("CP", "CR", "OP", "OR"):
        assert result[f"{name}_top3"] == pytest.approx(result[name]), name
    assert result["num_classes_evaluated"] == 2 and result["classes_without_positives"] == []


def test_threshold_is_inclusive_and_top3_must_pass_it():
    # Two images, five classes, threshold 0.6 (MCAR's). Scores equal to 0.6 count, and a top-3 class
    # counts only if it also scores >= 0.6, as in the released AveragePrecisionMeter code.
    scores = np.array([[0.9, 0.6, 0.55, 0.3, 0.1], [0.2, 0.7, 0.65, 0.62, 0.61]])
    labels = np.array([[1, 0, 1, 1, 0], [0, 1, 0, 1, 1]])
    result = evaluate(scores, labels, threshold=0.6)
    # >= 0.6: image 0 -> {0, 1}, image 1 -> {1, 2, 3, 4}.
    # Per class: correct [1, 1, 0, 1, 1], predicted [1, 2, 1, 1, 1], ground truth [1, 1, 1, 2, 1].
    assert result["OP"] == pytest.approx(100 * 4 / 6) and result["OR"] == pytest.approx(100 * 4 / 6)
    assert result["CP"] == pytest.approx(100 * (1 + 1 / 2 + 0 + 1 + 1) / 5)
    assert result["CR"] == pytest.approx(100 * (1 + 1 + 0 + 1 / 2 + 1) / 5)
    # Top 3: image 0 -> {0, 1, 2}, of which {0, 1} pass; image 1 -> {1, 2, 3}, all pass.
    # Per class: correct [1, 1, 0, 1, 0], predicted [1, 2, 1, 1, 0].
    assert top_k_mask(scores, 3).tolist() == [[True, True, True, False, False], [False, True, True, True, False]]
    assert result["OP_top3"] == pytest.approx(100 * 3 / 5) and result["OR_top3"] == pytest.approx(100 * 3 / 6)
    assert result["OF1_top3"] == pytest.approx(100 * 2 * (3 / 5) * (3 / 6) / (3 / 5 + 3 / 6))
    assert result["CP_top3"] == pytest.approx(100 * (1 + 1 / 2 + 0 + 1 + 0) / 5)
    assert result["CR_top3"] == pytest.approx(100 * (1 + 1 + 0 + 1 / 2 + 0) / 5)
    assert result["CF1_top3"] == pytest.approx(100 * 0.5)


def test_paper_thresholds():
    assert paper_threshold("mcar") == 0.6
    for name in ("baseline", "mlgcn", "ssgrl", "deeplift", "srdl", "lce", "pgcn"):
        assert paper_threshold(name) == 0.5, name


def test_tied_scores_form_one_threshold():
    # All scores tied: one threshold with precision 1/2 and full recall, in any image order.
    tied = np.full(4, 0.3)
    assert average_precision(tied, np.array([1, 0, 0, 1], bool)) == pytest.approx(0.5)
    assert average_precision(tied, np.array([0, 1, 1, 0], bool)) == pytest.approx(0.5)
    # Ranks: 0.9 (+), then a tie {0.5 +, 0.5 -}: 1 * 1/2 + 2/3 * 1/2.
    ap = average_precision(np.array([0.5, 0.9, 0.5]), np.array([0, 1, 1], bool))
    assert ap == pytest.approx(0.5 + 1 / 3)


def test_class_without_positives_left_out():
    scores = np.array([[0.9, 0.8, 0.7], [0.2, 0.6, 0.1], [0.4, 0.3, 0.2]])
    labels = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 0]])
    result = evaluate(scores, labels)
    assert result["AP"][1] is None
    assert result["classes_without_positives"] == [1] and result["num_classes_evaluated"] == 2
    assert result["mAP"] == pytest.approx((result["AP"][0] + result["AP"][2]) / 2)
    # >= 0.5 predicts 4 entries, 1 correct; class 1's two false positives count in OP but not in CP.
    assert result["OP"] == pytest.approx(100 * 1 / 4)
    assert result["CP"] == pytest.approx(100 * (1 / 1 + 0) / 2)


def test_ignore_mask_removes_entries():
    scores = np.array([[0.9], [0.8], [0.7]])
    labels = np.array([[0], [0], [1]])
    ignore = np.array([[True], [False], [False]])
    assert evaluate(scores, labels, ignore=ignore)["AP"] == pytest.approx([50.0])
    assert evaluate(scores, labels)["AP"] == pytest.approx([100 / 3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_independent_computation_on_random_data(seed):
    rng = np.random.default_rng(seed)
    num_images, num_classes = 37, 6
    scores = rng.random((num_images, num_classes))
    labels = rng.random((num_images, num_classes)) < 0.3
    labels[0] = True  # every class has a positive
    result = evaluate(torch.from_numpy(scores), torch.from_numpy(labels), threshold=0.4)
    expected_ap = [reference_ap(scores[:, c], labels[:, c]) for c in range(num_classes)]
    assert result["AP"] == pytest.approx([100 * v for v in expected_ap])
    assert result["mAP"] == pytest.approx(100 * sum(expected_ap) / num_classes)
    for name, value in reference_prf((scores >= 0.4).tolist(), labels.tolist()).items():
        assert result[name] == pytest.approx(100 * value), name
    top3_classes = [sorted(range(num_classes), key=lambda k: -row[k])[:3] for row in scores]
    top3 = [
        [c in classes and row[c] >= 0.4 for c in range(num_classes)]
        for classes, row in zip(top3_classes, scores, strict=True)
    ]
    for name, value in reference_prf(top3, labels.tolist()).items():
        assert result[f"{name}_top3"] == pytest.approx(100 * value), name


def test_format_table_lists_every_metric():
    result = evaluate(np.array([[0.9, 0.1], [0.2, 0.7]]), np.array([[1, 0], [0, 1]]))
    table = format_table({"eager": result})
    assert "eager" in table and "top-3" in table and "OF1" in table and "≥0.50" in table
    assert f"{result['mAP']:.2f}" in table


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        (np.zeros((3, 2)), np.zeros((3, 3)), "same shape"),
        (np.zeros(3), np.zeros(3), "2-D"),
        (np.zeros((2, 2)), np.array([[0, 2], [1, 0]]), "binary"),
        (np.zeros((2, 2)), np.array([[0, -1], [1, 0]]), "binary"),
        (np.array([[math.nan, 0.0], [0.1, 0.2]]), np.eye(2), "NaN"),
        (np.zeros((0, 2)), np.zeros((0, 2)), "non-empty"),
        (np.zeros((2, 2)), np.zeros((2, 2)), "no class has a positive"),
        (np.array([["a", "b"]]), np.array([[1, 0]]), "real numbers"),
    ],
)
def test_bad_input_raises(scores, labels, message):
    with pytest.raises(ValueError, match=message):
        evaluate(scores, labels)


def test_bad_ignore_raises():
    with pytest.raises(ValueError, match="boolean"):
        evaluate(np.eye(2), np.eye(2), ignore=np.zeros((2, 2)))
