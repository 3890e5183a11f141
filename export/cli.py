"""``fastmlr export``: a registered model to validated ONNX, a TensorRT engine, or a Triton Inference
Server model repository.

Examples::

    fastmlr export --model mcar --backbone resnet101 --size 448 --out mcar.onnx
    fastmlr export --model mcar --size 448 --batch 8 --dynamic-batch --format trt --precision fp16 --out mcar.plan
    fastmlr export --model baseline --size 448 --precision int8 --calibration calib_images/ --out baseline.int8.onnx
    fastmlr export --model mcar --size 448 --batch 8 --format triton-server --out model_repository

Every artifact is compared with the PyTorch model before it is written (see :mod:`fastmlr.export`).
Bad input raises ``ValueError`` / ``FileNotFoundError`` / ``RuntimeError``, which ``fastmlr`` prints
as one line (exit status 1).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastmlr.checks import check_output_dir, check_output_file
from fastmlr.cli import add_model_options, model_arguments
from fastmlr.registry import create_model, list_models

from .onnx_export import check_image_size
from .precision import CALIBRATION_METHODS, PRECISIONS, check_calibration_method, check_precision

FORMATS = ("onnx", "trt", "triton-server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fastmlr export``."""
    parser.add_argument("--model", required=True, help=f"registered model: {', '.join(list_models())}")
    parser.add_argument("--backbone", help="resnet50, resnet101 or mobilenet_v2 (default: the checkpoint's, "
                        "else resnet101)")
    parser.add_argument("--num-classes", type=int, help="number of classes (default: the checkpoint's, else 80)")
    parser.add_argument("--size", type=int, help="input image side, a multiple of 32 (default: the checkpoint's, "
                        "else 448)")
    parser.add_argument("--batch", type=int, default=1,
                        help="batch size; with --dynamic-batch or triton-server the largest batch (1)")
    parser.add_argument("--dynamic-batch", action="store_true",
                        help="symbolic batch axis (ONNX); engine profile for batches 1..--batch (trt)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (17)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint to load (fastmlr or the released MCAR format)")
    parser.add_argument("--format", default="onnx", help=f"one of {', '.join(FORMATS)} (onnx)")
    parser.add_argument("--precision", default="fp32",
                        help=f"precision of the graph and engine: {', '.join(PRECISIONS)} (fp32); int8 is "
                             "calibrated Q/DQ, fp16/bf16 are for GPUs")
    parser.add_argument("--calibration", default=None,
                        help="int8: directory of calibration images, a few hundred of your data (default: the "
                             "packaged COCO photos, with a warning)")
    parser.add_argument("--calibration-method", default="minmax",
                        help=f"int8 activation ranges: {', '.join(CALIBRATION_METHODS)} (minmax)")
    parser.add_argument("--per-tensor", action="store_true",
                        help="int8: one weight scale per tensor instead of per output channel")
    parser.add_argument("--triton-platform", default="onnx",
                        help="triton-server: serve the ONNX file ('onnx', onnxruntime backend) or a TensorRT "
                             "engine ('plan')")
    parser.add_argument("--images", default=None,
                        help="directory of validation images (default: the packaged COCO and VOC validation photos)")
    parser.add_argument("--out", required=True,
                        help="output file (.onnx / .plan) or, for triton-server, the model repository directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_model_options(parser)


def check_arguments(args: argparse.Namespace) -> None:
    """Reject bad options before any model is built: unknown model, format or precision, an image size
    that is not a multiple of 32, a batch below 1, an output path that cannot be written."""
    if args.model not in list_models():
        raise ValueError(f"unknown model {args.model!r}; choose one of {list_models()}")
    if args.format not in FORMATS:
        raise ValueError(f"unknown format {args.format!r}; choose one of {list(FORMATS)}")
    check_precision(args.precision)
    check_calibration_method(args.calibration_method)
    if args.precision != "int8" and (args.calibration is not None or args.per_tensor):
        raise ValueError("--calibration and --per-tensor apply to --precision int8")
    if args.calibration is not None and not Path(args.calibration).exists():
        raise FileNotFoundError(f"--calibration {args.calibration} does not exist")
    if args.size is not None:
        check_image_size(args.size)
    if args.images is not None and not Path(args.images).exists():
        raise FileNotFoundError(f"--images {args.images} does not exist")
    if args.batch < 1:
        raise ValueError(f"--batch must be a positive integer, got {args.batch}")
    if args.format == "triton-server":
        if not Path(args.out).parent.is_dir():
            raise FileNotFoundError(f"cannot create the model repository {args.out}: its parent directory is missing")
        model_file = "model.onnx" if args.triton_platform == "onnx" else "model.plan"
        check_output_dir(args.out, "--out", (f"{args.model}/config.pbtxt", f"{args.model}/1/{model_file}"),
                         args.overwrite)
    else:
        check_output_file(args.out, "--out", args.overwrite, create_dirs=False)


def run(args: argparse.Namespace) -> int:
    """Build the model, export it as ``--format`` says, print where the artifact went."""
    check_arguments(args)
    model = create_model(args.model, backbone=args.backbone, num_classes=args.num_classes, image_size=args.size,
                         checkpoint=args.checkpoint, **model_arguments(args))
    size = model.image_size  # the checkpoint's when --size is left out
    if args.format == "onnx":
        from .onnx_export import to_onnx

        reports = []
        out = to_onnx(model, args.out, image_size=size, batch=args.batch, dynamic_batch=args.dynamic_batch,
                      opset=args.opset, images=args.images, on_validated=reports.append, precision=args.precision,
                      calibration=args.calibration, calibration_method=args.calibration_method,
                      per_channel=not args.per_tensor)
        print(f"wrote {out} (ONNX opset {args.opset}, {args.precision}, validated against PyTorch in ONNX Runtime)")
        print("\n".join(report.summary() for report in reports))
    elif args.format == "trt":
        from .tensorrt import export_engine

        min_batch = 1 if args.dynamic_batch else args.batch
        out = export_engine(model, args.out, image_size=size, precision=args.precision, min_batch=min_batch,
                            opt_batch=args.batch, max_batch=args.batch, opset=args.opset, images=args.images,
                            calibration=args.calibration)
        print(f"wrote {out} (TensorRT {args.precision} engine, batches {min_batch}..{args.batch}, "
              "validated against PyTorch)")
    else:
        from .triton_server import write_triton_repository

        out = write_triton_repository(model, args.out, image_size=size, max_batch_size=args.batch,
                                      platform=args.triton_platform, precision=args.precision, opset=args.opset,
                                      images=args.images)
        print(f"wrote {out} (Triton Inference Server model, max_batch_size {args.batch}, validated against PyTorch)")
    return 0
