"""``fastmlr evaluate``: a model's mAP, CP/CR/CF1, OP/OR/OF1 (and top-3) on COCO or VOC, with any
backend — the eager PyTorch model, ONNX Runtime on the exported graph, or a TensorRT engine, each
exported backend at ``--precision`` fp32, fp16, bf16 or int8 — and, with ``--compare``, the accuracy
check of one backend against another on the same images: the mAP difference, and the agreement of
:func:`fastmlr.export.precision.agreement` (labels at the threshold, top-3 classes, the largest and
mean probability difference, MCAR's identical boxes) on the images int8 calibration did not use.

Images are loaded in batches by a ``DataLoader`` with workers; unreadable images are skipped with a
warning and counted (``skipped_images``). Every backend sees exactly the same batches.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import tempfile
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from fastmlr.checks import check_output_file, check_threshold
from fastmlr.cli import add_model_options, model_arguments
from fastmlr.data import (
    DEFAULT_SPLITS,
    DIFFICULT_MODES,
    IGNORE,
    Batch,
    Unreadable,
    build_dataset,
    collate_skip_unreadable,
)
from fastmlr.metrics import evaluate, format_table, paper_threshold
from fastmlr.runtime import ort_cuda_available

BACKENDS = ("eager", "onnxruntime", "trt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # fastmlr.export.precision.PRECISIONS, without importing onnx
BF16_ON_CPU = ("--precision bf16 with --backend/--compare onnxruntime needs a CUDA device: ONNX Runtime's CPU "
               "provider has no bf16 kernels (fp16 runs there, slowly; int8 is the fast precision on CPUs)")

# A backend: float [B, 3, S, S] images (CPU) -> its outputs (:func:`backend_outputs`): "probs" [B, C]
# float32, and for models with regions (MCAR) "boxes" [B, N, 4] and "indices" [B, N] int64.
Predictor = Callable[[torch.Tensor], dict[str, np.ndarray]]
#: MCAR's region outputs, compared between backends as the share of identical boxes.
REGION_OUTPUTS = ("boxes", "indices")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastmlr evaluate`` options."""
    parser.add_argument("--model", required=True, help="registered model name (fastmlr.list_models())")
    parser.add_argument("--backbone", help="resnet50 | resnet101 | mobilenet_v2 (default: the checkpoint's, else "
                        "resnet101)")
    parser.add_argument("--size", type=int, help="input side S, images resized to S×S (default: the checkpoint's, "
                        "else 448)")
    parser.add_argument("--checkpoint", help="weights: a fastmlr checkpoint or a released-code one")
    parser.add_argument(
        "--num-classes", type=int, help="the model's class count (default: the dataset's); must match it"
    )
    parser.add_argument("--data", required=True, choices=("coco", "voc"))
    parser.add_argument(
        "--root", required=True,
        help="COCO: the directory holding {split}2014/ (or the images themselves) and annotations/; "
        "VOC: VOCdevkit/VOC2007 (or VOC2012)",
    )
    parser.add_argument(
        "--ann", help="COCO annotation file (default ROOT/annotations/instances_{split}2014.json)"
    )
    parser.add_argument("--split", help="COCO: val (default) | train; VOC: test (default) | trainval | val …")
    parser.add_argument(
        "--difficult", choices=DIFFICULT_MODES, default="ignore",
        help="VOC: a class present only as 'difficult' objects is left out of the metrics (ignore, the "
        "devkit's rule) or counted absent (negative)",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="eager")
    parser.add_argument(
        "--compare", choices=BACKENDS, help="also run this backend on the same images and compare"
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available"
    )
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="fp32",
        help="precision of the exported graph (onnxruntime) or engine (trt); eager stays fp32, so "
        "--compare eager gives the precision's ΔmAP and agreement. bf16 needs a GPU; fp16 runs slowly on "
        "ONNX Runtime's CPU provider (with a warning)",
    )
    parser.add_argument(
        "--calibration", help="int8: directory of calibration images (default: the packaged COCO photos); "
        "evaluated images that are calibration images (same file or same bytes) are left out of the agreement",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images")
    parser.add_argument(
        "--threshold", type=float,
        help="label threshold (score ≥ t) for CP…OF1 and their top-3 variants; default: the model's "
        "paper code, 0.6 for MCAR, 0.5 for the others",
    )
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_model_options(parser)


def check_positive(value: int | None, name: str) -> None:
    """``value`` must be None or a positive integer (ValueError naming option ``name``)."""
    if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value}")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cuda"`` without a GPU → ValueError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(device)


def check_class_count(model_classes: int, dataset_classes: int, what: str = "the model") -> None:
    """ValueError when a model (or a backend's output) and the dataset disagree on the class count."""
    if model_classes != dataset_classes:
        raise ValueError(
            f"{what} predicts {model_classes} classes but the dataset has {dataset_classes}: "
            "evaluate a model trained on this dataset (or pass the matching --num-classes)"
        )


def as_numpy(array: Any) -> np.ndarray:
    """A torch tensor (any device) or array-like as a float32 numpy array."""
    if isinstance(array, torch.Tensor):
        array = array.detach().float().cpu().numpy()
    return np.asarray(array, dtype=np.float32)


def backend_outputs(outputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """A backend's outputs (torch tensors or arrays) as numpy: ``probs`` float32, and the
    :data:`REGION_OUTPUTS` among them int64."""
    result = {"probs": as_numpy(outputs["probs"])}
    for name in REGION_OUTPUTS:
        if name in outputs:
            value = outputs[name]
            value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            result[name] = value.astype(np.int64)
    return result


def eager_predictor(model: nn.Module, device: torch.device) -> Predictor:
    """The PyTorch model itself, in eval mode on ``device``; a model with regions (``forward_stages``,
    MCAR) also gives its boxes and their classes."""
    model = model.to(device).eval()
    has_regions = callable(getattr(model, "forward_stages", None))

    @torch.inference_mode()
    def predict(images: torch.Tensor) -> dict[str, np.ndarray]:
        images = images.to(device)
        if has_regions:
            return backend_outputs(model.forward_stages(images)._asdict())
        return backend_outputs({"probs": model(images)})

    return predict


def select_probs_output(output_names: list[str]) -> int:
    """Index of the probabilities among a graph's outputs: the one named ``probs`` if any, else the
    first (MCAR's graph returns ``(probs, boxes, indices)``)."""
    return output_names.index("probs") if "probs" in output_names else 0


def onnxruntime_predictor(
    model: nn.Module, image_size: int, batch_size: int, device: torch.device, workdir: pathlib.Path,
    precision: str = "fp32", calibration: str | None = None,
) -> Predictor:
    """Export ``model`` with :func:`fastmlr.export.to_onnx` (dynamic batch, at ``precision``; int8
    calibrated on ``calibration``) into ``workdir`` and run the graph with ONNX Runtime (CUDA execution
    provider on a CUDA ``device`` when available): its probabilities and, for MCAR, its regions."""
    from fastmlr import export
    from fastmlr.export.precision import precision_session

    has_cuda_provider = ort_cuda_available()  # raises a RuntimeError naming the install when ORT is missing
    path = workdir / f"{getattr(model, 'model_name', 'model')}-{precision}.onnx"
    cpu_model = copy.deepcopy(model).cpu().eval()  # the eager backend may hold ``model`` on the GPU
    export.to_onnx(cpu_model, path, image_size=image_size, batch=batch_size, dynamic_batch=True,
                   precision=precision, calibration=calibration)
    session = precision_session(path, device="cuda" if device.type == "cuda" and has_cuda_provider else "cpu")
    input_name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    fetch = {"probs": names[select_probs_output(names)], **{name: name for name in REGION_OUTPUTS if name in names}}

    def predict(images: torch.Tensor) -> dict[str, np.ndarray]:
        values = session.run(list(fetch.values()), {input_name: images.numpy()})
        return backend_outputs(dict(zip(fetch, values, strict=True)))

    return predict


def trt_predictor(
    model: nn.Module, image_size: int, batch_size: int, precision: str, workdir: pathlib.Path,
    calibration: str | None = None,
) -> Predictor:
    """A validated TensorRT engine of ``model`` at ``precision`` (int8 calibrated on ``calibration``)
    for batches 1..``batch_size`` (:func:`fastmlr.export.export_engine`), run by
    :class:`fastmlr.export.TRTRunner`. Without TensorRT or a CUDA GPU, ``fastmlr.export`` raises a
    RuntimeError saying which is missing."""
    from fastmlr import export

    stem = getattr(model, "model_name", "model")
    cpu_model = copy.deepcopy(model).cpu().eval()  # the eager backend may hold ``model`` on the GPU
    engine = export.export_engine(
        cpu_model, workdir / f"{stem}-{precision}.engine", image_size=image_size, precision=precision,
        min_batch=1, opt_batch=batch_size, max_batch=batch_size, calibration=calibration,
    )
    runner = export.TRTRunner(engine)

    def predict(images: torch.Tensor) -> dict[str, np.ndarray]:
        return backend_outputs(runner(images))  # .cpu() waits for the engine's stream

    return predict


def build_predictor(
    backend: str,
    model: nn.Module,
    image_size: int,
    batch_size: int,
    device: torch.device,
    workdir: pathlib.Path,
    precision: str = "fp32",
    calibration: str | None = None,
) -> Predictor:
    """The :data:`Predictor` of ``backend`` for ``model`` (exported files go to ``workdir``;
    ``precision`` is the exported graph's or engine's, ``calibration`` its int8 calibration images)."""
    if backend == "eager":
        return eager_predictor(model, device)
    if backend == "onnxruntime":
        return onnxruntime_predictor(model, image_size, batch_size, device, workdir, precision, calibration)
    if backend == "trt":
        return trt_predictor(model, image_size, batch_size, precision, workdir, calibration)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def collect_outputs(
    batches: Iterable[Batch], predictors: dict[str, Predictor], num_classes: int, progress: Any = None
) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray, list[Unreadable]]:
    """Run every predictor on every batch: ``({backend: {output: [N, ...]}}, targets [N, C],
    unreadable)``, each backend's outputs (``probs``, MCAR's regions) concatenated over the batches.

    Each unreadable image is warned about (``warnings.warn``) as it is met. ``progress`` (a tqdm bar
    or None) advances by the batch's item count, readable or not. Each predictor's probabilities must
    be ``[b, C]`` with C = ``num_classes`` (ValueError otherwise).
    """
    outputs: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in predictors}
    targets: list[np.ndarray] = []
    unreadable: list[Unreadable] = []
    for batch in batches:
        for item in batch.unreadable:
            warnings.warn(f"skipping unreadable image: {item.reason}", stacklevel=2)
        unreadable += batch.unreadable
        if batch.images is not None:
            for name, predict in predictors.items():
                output = predict(batch.images)
                probs = output["probs"]
                if probs.ndim != 2 or probs.shape[0] != len(batch.images):
                    raise ValueError(
                        f"backend {name} returned shape {probs.shape} for {len(batch.images)} images"
                    )
                check_class_count(probs.shape[1], num_classes, f"backend {name}")
                outputs[name].append(output)
            targets.append(batch.targets.numpy())
        if progress is not None:
            progress.update(len(batch.unreadable) + (0 if batch.images is None else len(batch.images)))
    if not targets:
        raise ValueError(f"no image could be read ({len(unreadable)} skipped): check the image directory")
    collected = {name: {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
                 for name, parts in outputs.items()}
    return collected, np.concatenate(targets), unreadable


def score_metrics(scores: np.ndarray, targets: np.ndarray, threshold: float, classes: list[str]) -> dict:
    """:func:`fastmlr.metrics.evaluate` on dataset targets (``IGNORE`` entries left out), with the
    per-class AP keyed by class name."""
    result = evaluate(scores, targets == 1, threshold=threshold, ignore=targets == IGNORE)
    result["AP"] = dict(zip(classes, result["AP"], strict=True))
    result["classes_without_positives"] = [classes[i] for i in result["classes_without_positives"]]
    return result


#: The agreement measures of a comparison (:func:`comparison`), None where no image was left to compare.
AGREEMENT_KEYS = ("label_agreement", "top3_agreement", "max_abs_prob_diff", "mean_abs_prob_diff", "identical_boxes")


def comparison(
    outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], metrics: dict, reference_metrics: dict,
    threshold: float, rows: np.ndarray,
) -> dict:
    """How far a backend's ``outputs`` (and their ``metrics``) are from the ``reference`` backend's.

    ``map_diff``: mAP − reference mAP, in points, over every evaluated image. On the images ``rows``
    (``agreement_images`` of them: those int8 calibration did not use, every image otherwise), the
    agreement of :func:`fastmlr.export.precision.agreement` with labels at ``threshold``:
    ``label_agreement``, the share of (image, class) pairs on the same side of it; ``top3_agreement``,
    the share of images with the same three top classes; ``max_abs_prob_diff`` and
    ``mean_abs_prob_diff`` of the probabilities; ``identical_boxes``, the share of MCAR's regions
    (image, rank) with the same class and box (None for models without regions). Without any such
    image those five are None."""
    result = {"map_diff": float(metrics["mAP"] - reference_metrics["mAP"]), "agreement_images": len(rows),
              "threshold": threshold}
    if not len(rows):
        return {**result, **dict.fromkeys(AGREEMENT_KEYS)}
    from fastmlr.export.precision import agreement

    agree = agreement([{k: v[rows] for k, v in outputs.items()}], [{k: v[rows] for k, v in reference.items()}],
                      threshold=threshold)
    return {**result, "label_agreement": agree.label_agreement, "top3_agreement": agree.top3_agreement,
            "max_abs_prob_diff": agree.max_abs_diff, "mean_abs_prob_diff": agree.mean_abs_diff,
            "identical_boxes": agree.identical_boxes}


def calibration_images(calibration: str | None) -> list[pathlib.Path]:
    """The int8 calibration images :func:`fastmlr.export.to_onnx` reads: those under ``--calibration``,
    else the packaged COCO photos. ``FileNotFoundError`` / ``ValueError`` naming ``--calibration`` for a
    missing path or a directory without images."""
    from fastmlr.export.precision import DEFAULT_CALIBRATION_DIR
    from fastmlr.export.validation import find_images

    if calibration is None:
        return find_images(DEFAULT_CALIBRATION_DIR)
    if not pathlib.Path(calibration).exists():
        raise FileNotFoundError(f"--calibration {calibration} does not exist")
    try:
        return find_images(calibration)
    except ValueError as err:
        raise ValueError(f"--calibration: {err}") from None


def backend_precision(backend: str, precision: str) -> str:
    """The precision ``backend`` runs at: ``precision`` for the exported backends, fp32 for eager."""
    return "fp32" if backend == "eager" else precision


def check_arguments(args: argparse.Namespace) -> None:
    """ValueError for arguments argparse cannot check."""
    for name in ("size", "batch_size", "limit", "num_classes"):
        check_positive(getattr(args, name), f"--{name.replace('_', '-')}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.compare == args.backend:
        raise ValueError(f"--compare {args.compare} is the same backend as --backend")
    if args.precision != "fp32" and not {"trt", "onnxruntime"} & {args.backend, args.compare}:
        raise ValueError(f"--precision {args.precision} applies to the exported backends (onnxruntime, trt)")
    if args.calibration is not None and args.precision != "int8":
        raise ValueError("--calibration applies to --precision int8")
    if args.threshold is not None:
        check_threshold(args.threshold, "--threshold")
    if args.out:
        check_output_file(args.out, "--out", args.overwrite)


def print_report(report: dict[str, Any]) -> None:
    """The metric table (one block per backend), the image counts and the comparison lines."""
    rows = {report["backend"]: report["metrics"]}
    if "compare" in report:
        rows[report["compare"]["backend"]] = report["compare"]["metrics"]
    print(format_table(rows))
    print(
        f"{report['num_images']} images evaluated, {report['skipped_images']} skipped as unreadable; "
        "metrics in %"
    )
    if "compare" not in report:
        return
    compare, calibration = report["compare"], report.get("calibration")
    print(f"{report['backend']} ({report['precision']}) vs {compare['backend']} ({compare['precision']}): "
          f"ΔmAP = {compare['map_diff']:+.4f} points over {report['num_images']} images")
    held_out = " not used for calibration" if calibration else ""
    if compare["label_agreement"] is None:
        print(f"  agreement: no evaluated image was left{held_out}")
    else:
        boxes = compare["identical_boxes"]
        print(f"  agreement on {compare['agreement_images']} images{held_out}: labels (≥{compare['threshold']:.2f}) "
              f"{100 * compare['label_agreement']:.2f}%, top-3 {100 * compare['top3_agreement']:.1f}%, "
              f"max |Δprob| {compare['max_abs_prob_diff']:.3g}, mean |Δprob| {compare['mean_abs_prob_diff']:.3g}"
              + ("" if boxes is None else f", identical boxes {100 * boxes:.1f}%"))
    if calibration:
        used = calibration["evaluated_images_used"]
        print(f"  int8 calibrated on {calibration['images']} images ({calibration['source']}); {len(used)} of the "
              "evaluated images are among them" + (", left out of the agreement" if used else ""))


def run(args: argparse.Namespace) -> int:
    """``fastmlr evaluate``: print the metric table (and the comparison), write the JSON report."""
    try:
        from tqdm import tqdm
    except ImportError as err:
        raise RuntimeError('fastmlr evaluate needs tqdm: pip install -e ".[eval]"') from err

    from fastmlr.checkpoint import read_checkpoint
    from fastmlr.registry import create_model, model_config, model_defaults

    check_arguments(args)
    device = resolve_device(args.device)
    backends = [args.backend] + ([args.compare] if args.compare else [])
    if (args.precision == "bf16" and "onnxruntime" in backends
            and not (device.type == "cuda" and ort_cuda_available())):
        raise ValueError(BF16_ON_CPU)
    calibration = calibration_images(args.calibration) if args.precision == "int8" else None
    checkpoint = read_checkpoint(args.checkpoint) if args.checkpoint else None
    # Given options over the checkpoint's; the class count, when neither says, is the dataset's.
    config = model_config(args.model, checkpoint, backbone=args.backbone, num_classes=args.num_classes,
                          image_size=args.size, **model_arguments(args))
    size = config.get("image_size", model_defaults(args.model)["image_size"])
    dataset = build_dataset(args.data, args.root, args.split, args.ann, size, args.difficult)
    config.setdefault("num_classes", dataset.num_classes)
    check_class_count(config["num_classes"], dataset.num_classes)
    model = create_model(args.model, checkpoint=checkpoint, **config)
    # Scores are matched to labels by class name: the dataset's columns follow the model's outputs.
    dataset.reorder_classes(model.class_names)
    subset = Subset(dataset, range(min(args.limit, len(dataset)))) if args.limit else dataset
    listed = dataset.image_paths[: len(subset)]
    loader = DataLoader(
        subset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_skip_unreadable,
        pin_memory=device.type == "cuda",
    )
    with tempfile.TemporaryDirectory(prefix="fastmlr-evaluate-") as workdir:
        predictors = {
            name: build_predictor(
                name, model, size, args.batch_size, device, pathlib.Path(workdir), args.precision, args.calibration
            )
            for name in backends
        }
        with tqdm(total=len(subset), unit="img", desc=f"evaluate {'+'.join(backends)}") as progress:
            outputs, targets, unreadable = collect_outputs(loader, predictors, dataset.num_classes, progress)
    threshold = paper_threshold(args.model) if args.threshold is None else args.threshold
    metrics = {name: score_metrics(o["probs"], targets, threshold, dataset.classes) for name, o in outputs.items()}
    skipped = {item.path for item in unreadable}
    evaluated = [path for path in listed if str(path) not in skipped]  # the rows of ``outputs``, in order
    if len(evaluated) != len(targets):
        raise RuntimeError(f"{len(targets)} images were evaluated but {len(evaluated)} were listed as readable")
    report: dict[str, Any] = {
        "model": args.model, "backbone": model.backbone_name, "image_size": size,
        "checkpoint": args.checkpoint, "data": args.data, "root": str(args.root),
        "split": args.split or DEFAULT_SPLITS[args.data], "device": str(device),
        "num_images": int(len(targets)), "skipped_images": len(unreadable),
        "unreadable_images": [item._asdict() for item in unreadable],
        "backend": args.backend, "precision": backend_precision(args.backend, args.precision),
        "metrics": metrics[args.backend],
    }
    rows = np.arange(len(evaluated))
    if calibration is not None:
        from fastmlr.export.precision import DEFAULT_CALIBRATION_DIR, calibration_images_among

        used = calibration_images_among(evaluated, calibration)
        report["calibration"] = {
            "source": str(args.calibration or DEFAULT_CALIBRATION_DIR), "images": len(calibration),
            "evaluated_images_used": [str(path) for path in used],
        }
        rows = np.flatnonzero([path not in set(used) for path in evaluated])
        if used:
            warnings.warn(
                f"{len(used)} of the {len(evaluated)} evaluated images are int8 calibration images "
                f"({', '.join(path.name for path in used[:3])}{' ...' if len(used) > 3 else ''}): the agreement "
                "leaves them out, the mAPs include them; pass --calibration DIR with images outside the dataset",
                stacklevel=1)
    if args.compare:
        main, other = args.backend, args.compare
        report["compare"] = {
            "backend": other, "precision": backend_precision(other, args.precision), "metrics": metrics[other],
            **comparison(outputs[main], outputs[other], metrics[main], metrics[other], threshold, rows),
        }
    print_report(report)
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")
    return 0
