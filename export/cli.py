"""``fastmlr export``: a registered model to validated ONNX, a TensorRT engine, or a Triton Inference
Server model repository.

Examples::

    fastmlr export --model mcar --backbone resnet101 --size 448 --out mcar.onnx
    fastmlr export --model mcar --size 448 --batch 8 --dynamic-batch --format trt --precision fp16 --out mcar.plan
    fastmlr export --model mcar --size 448 --batch 8 --format triton-server --out model_repository

Every artifact is compared with the PyTorch model before it is written (see :mod:`fastmlr.export`).
Bad input raises ``ValueError`` / ``FileNotFoundError`` / ``RuntimeError``, which ``fastmlr`` prints
as one line (exit status 1).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastmlr.registry import create_model, list_models

from .onnx_export import check_image_size, check_output_path
from .validation import TOLERANCES

FORMATS = ("onnx", "trt", "triton-server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fastmlr export``."""
    parser.add_argument("--model", required=True, help=f"registered model: {', '.join(list_models())}")
    parser.add_argument("--backbone", default="resnet101", help="resnet50, resnet101 or mobilenet_v2 (resnet101)")
    parser.add_argument("--num-classes", type=int, default=80, help="number of classes (80: COCO)")
    parser.add_argument("--size", type=int, default=448, help="input image side, a multiple of 32 (448)")
    parser.add_argument("--batch", type=int, default=1,
                        help="batch size; with --dynamic-batch or triton-server the largest batch (1)")
    parser.add_argument("--dynamic-batch", action="store_true",
                        help="symbolic batch axis (ONNX); engine profile for batches 1..--batch (trt)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (17)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint to load (fastmlr or the released MCAR format)")
    parser.add_argument("--format", default="onnx", help=f"one of {', '.join(FORMATS)} (onnx)")
    parser.add_argument("--precision", default="fp32",
                        help=f"TensorRT engine precision: {', '.join(TOLERANCES)} (fp32; trt and triton plans)")
    parser.add_argument("--triton-platform", default="onnx",
                        help="triton-server: serve the ONNX file ('onnx', onnxruntime backend) or a TensorRT "
                             "engine ('plan')")
    parser.add_argument("--images", default=None,
                        help="directory of validation images (default: the packaged COCO and VOC validation photos)")
    parser.add_argument("--out", required=True,
                        help="output file (.onnx / .plan) or, for triton-server, the model repository directory")


def check_arguments(args: argparse.Namespace) -> None:
    """Reject bad options before any model is built: unknown model, format or precision, an image size
    that is not a multiple of 32, a batch below 1, an output path that cannot be written."""
    if args.model not in list_models():
        raise ValueError(f"unknown model {args.model!r}; choose one of {list_models()}")
    if args.format not in FORMATS:
        raise ValueError(f"unknown format {args.format!r}; choose one of {list(FORMATS)}")
    if args.precision not in TOLERANCES:
        raise ValueError(f"unknown precision {args.precision!r}; choose one of {list(TOLERANCES)}")
    if args.format == "onnx" and args.precision != "fp32":
        raise ValueError("--precision applies to TensorRT engines (--format trt); ONNX is exported in fp32")
    check_image_size(args.size)
    if args.batch < 1:
        raise ValueError(f"--batch must be a positive integer, got {args.batch}")
    if args.format == "triton-server":
        if not Path(args.out).parent.is_dir():
            raise FileNotFoundError(f"cannot create the model repository {args.out}: its parent directory is missing")
    else:
        check_output_path(args.out)


def run(args: argparse.Namespace) -> int:
    """Build the model, export it as ``--format`` says, print where the artifact went."""
    check_arguments(args)
    model = create_model(args.model, backbone=args.backbone, num_classes=args.num_classes, image_size=args.size,
                         checkpoint=args.checkpoint)
    if args.format == "onnx":
        from .onnx_export import to_onnx

        reports = []
        out = to_onnx(model, args.out, image_size=args.size, batch=args.batch, dynamic_batch=args.dynamic_batch,
                      opset=args.opset, images=args.images, on_validated=reports.append)
        print(f"wrote {out} (ONNX opset {args.opset}, validated against PyTorch in ONNX Runtime)")
        print("\n".join(report.summary() for report in reports))
    elif args.format == "trt":
        from .tensorrt import export_engine

        min_batch = 1 if args.dynamic_batch else args.batch
        out = export_engine(model, args.out, image_size=args.size, precision=args.precision, min_batch=min_batch,
                            opt_batch=args.batch, max_batch=args.batch, opset=args.opset, images=args.images)
        print(f"wrote {out} (TensorRT {args.precision} engine, batches {min_batch}..{args.batch}, "
              "validated against PyTorch)")
    else:
        from .triton_server import write_triton_repository

        out = write_triton_repository(model, args.out, image_size=args.size, max_batch_size=args.batch,
                                      platform=args.triton_platform, precision=args.precision, opset=args.opset,
                                      images=args.images)
        print(f"wrote {out} (Triton Inference Server model, max_batch_size {args.batch}, validated against PyTorch)")
    return 0
