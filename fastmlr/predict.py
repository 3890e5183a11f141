"""``fastmlr predict``: the top labels of each image, and for MCAR a PNG with its attentional regions
drawn like the paper's Fig. 6 — one box per localized class, labelled
"class: global score / two-stream score" (ŷ_g^c and max(ŷ_g^c, ŷ_l^c)), one colour per class, shown
when the local score ŷ_l^c > ``--min-local`` (0.1) and the two-stream score > ``--min-score`` (0.6),
the figure's conditions.

Images are resized to S×S for the model (:func:`fastmlr.data.eval_transform`); MCAR's boxes, in the
resized input's pixels, are scaled back to the original image. A missing or unreadable image is an
error (nothing is predicted).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import NamedTuple

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from fastmlr.checks import check_output_dir
from fastmlr.cli import add_model_options, model_arguments
from fastmlr.data import eval_transform, load_image
from fastmlr.evaluate import check_positive, resolve_device

# Distinct colours, one per localized class of an image (MCAR localizes topN = 4 by default).
PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
)  # fmt: skip


class Region(NamedTuple):
    """One MCAR region: its class, box ``(x1, y1, x2, y2)`` half-open in original-image pixels
    (floats), and the global, local and two-stream (final) scores of that class."""

    class_index: int
    box: tuple[float, float, float, float]
    global_score: float
    local_score: float
    final_score: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastmlr predict`` options."""
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--model", required=True, help="registered model name (fastmlr.list_models())")
    parser.add_argument("--backbone", help="resnet50 | resnet101 | mobilenet_v2 (default: the checkpoint's, else "
                        "resnet101)")
    parser.add_argument("--size", type=int, help="input side S, images resized to S×S (default: the checkpoint's, "
                        "else 448)")
    parser.add_argument("--num-classes", type=int,
                        help="80: COCO names, 20: VOC names (default: the checkpoint's, with its names; else 80)")
    parser.add_argument("--checkpoint", help="weights: a fastmlr checkpoint or a released-code one")
    parser.add_argument("--topk", type=int, default=5, help="labels printed per image")
    parser.add_argument("--out", default=".", help="directory for MCAR's region images (default: .)")
    parser.add_argument("--min-local", type=float, default=0.1, help="draw a region when ŷ_l > this")
    parser.add_argument("--min-score", type=float, default=0.6, help="… and max(ŷ_g, ŷ_l) > this")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace region images already in --out")
    add_model_options(parser)


def top_labels(probs: torch.Tensor, names: list[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` highest of ``probs`` ``[C]`` as ``(name, probability)``, best first (ties: lower index)."""
    order = torch.sort(probs, descending=True, stable=True).indices[:k]
    return [(names[i], float(probs[i])) for i in order.tolist()]


def scale_box(box: torch.Tensor, input_size: int, original_size: tuple[int, int]) -> tuple[float, ...]:
    """A half-open ``(x1, y1, x2, y2)`` box in the ``input_size``² resized input → the same region in
    the original ``(width, height)`` image's pixel coordinates."""
    sx, sy = original_size[0] / input_size, original_size[1] / input_size
    x1, y1, x2, y2 = (float(v) for v in box.tolist())
    return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


def mcar_regions(stages, image_index: int, input_size: int, original_size: tuple[int, int]) -> list[Region]:
    """Image ``image_index``'s regions from an ``MCARStages``, in selection order (best first)."""
    regions = []
    for n, c in enumerate(stages.indices[image_index].tolist()):
        regions.append(Region(
            class_index=c,
            box=scale_box(stages.boxes[image_index, n], input_size, original_size),
            global_score=float(stages.global_scores[image_index, c]),
            local_score=float(stages.local_scores[image_index, c]),
            final_score=float(stages.probs[image_index, c]),
        ))
    return regions


def shown(region: Region, min_local: float, min_score: float) -> bool:
    """Fig. 6's display rule: ŷ_l^c > ``min_local`` and max(ŷ_g^c, ŷ_l^c) > ``min_score``."""
    return region.local_score > min_local and region.final_score > min_score


def region_label(region: Region, names: list[str]) -> str:
    """"class: global / two-stream", e.g. "train: 0.14/0.99" (Fig. 6)."""
    return f"{names[region.class_index]}: {region.global_score:.2f}/{region.final_score:.2f}"


def overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether two ``(left, top, right, bottom)`` rectangles intersect."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def draw_regions(image: Image.Image, regions: list[Region], names: list[str]) -> Image.Image:
    """A copy of ``image`` with every region's box and label drawn, colour ``PALETTE[n]`` for the
    n-th region (each region is a different class). A label sits inside its box's top-left corner,
    moved down past any label already drawn there (regions of several classes may coincide)."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    line = max(2, round(min(width, height) / 150))
    font = ImageFont.load_default(size=max(12, round(min(width, height) / 28)))
    placed: list[tuple[float, ...]] = []
    for n, region in enumerate(regions):
        colour = PALETTE[n % len(PALETTE)]
        x1, y1, x2, y2 = region.box
        # PIL rectangles include their far corner; the box is half-open.
        draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour, width=line)
        text = region_label(region, names)
        origin = (x1 + line, y1 + line)
        label = draw.textbbox(origin, text, font=font)
        while any(overlaps(label, other) for other in placed):
            origin = (origin[0], origin[1] + label[3] - label[1] + 2)
            label = draw.textbbox(origin, text, font=font)
        placed.append(label)
        draw.rectangle((label[0] - 1, label[1] - 1, label[2] + 1, label[3] + 1), fill=colour)
        draw.text(origin, text, fill=(255, 255, 255), font=font)
    return canvas


def region_image_paths(image_paths: list[pathlib.Path], out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Where each image's drawing goes: ``out_dir / {stem}_regions.png``, or ``{stem}_{i}_regions.png``
    (``i``: its position in ``image_paths``) for stems shared by several images. ValueError if one
    would overwrite an input image."""
    stems = [p.stem for p in image_paths]
    targets = [
        out_dir / (f"{stem}_regions.png" if stems.count(stem) == 1 else f"{stem}_{i}_regions.png")
        for i, stem in enumerate(stems)
    ]
    inputs = {p.resolve() for p in image_paths}
    for target in targets:
        if target.resolve() in inputs:
            raise ValueError(f"the region image {target} would overwrite an input image: choose another --out")
    return targets


def check_arguments(args: argparse.Namespace) -> None:
    """ValueError for arguments argparse cannot check."""
    for name in ("size", "num_classes", "topk"):
        check_positive(getattr(args, name), f"--{name.replace('_', '-')}")
    if args.num_classes is not None and args.topk > args.num_classes:
        raise ValueError(f"--topk must be at most --num-classes ({args.num_classes}), got {args.topk}")
    for name in ("min_local", "min_score"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    check_output_dir(args.out, "--out")


def predict_image(
    model: nn.Module, image: Image.Image, image_size: int, device: torch.device
) -> tuple[torch.Tensor, object | None]:
    """``(probs [C], stages)`` for one image; ``stages`` is MCAR's ``forward_stages`` output (batch of
    one) or None for models without regions."""
    batch = eval_transform(image_size)(image).unsqueeze(0).to(device)
    with torch.inference_mode():
        if callable(getattr(model, "forward_stages", None)):
            stages = model.forward_stages(batch)
            stages = type(stages)(*(t.cpu() for t in stages))
            return stages.probs[0], stages
        return model(batch)[0].float().cpu(), None


def run(args: argparse.Namespace) -> int:
    """``fastmlr predict``: print each image's top labels; for MCAR also print and draw its regions."""
    from fastmlr.registry import create_model

    check_arguments(args)
    paths = [pathlib.Path(p) for p in args.images]
    images = [load_image(p) for p in paths]  # every image is checked before any is predicted
    device = resolve_device(args.device)
    model = create_model(
        args.model, backbone=args.backbone, num_classes=args.num_classes, image_size=args.size,
        checkpoint=args.checkpoint, **model_arguments(args),
    ).to(device)
    if args.topk > model.num_classes:
        raise ValueError(f"--topk must be at most the model's {model.num_classes} classes, got {args.topk}")
    names = model.class_names
    size = model.image_size
    targets = region_image_paths(paths, pathlib.Path(args.out))
    if callable(getattr(model, "forward_stages", None)):  # region images will be written
        check_output_dir(args.out, "--out", tuple(t.name for t in targets), args.overwrite)
    if args.checkpoint is None:
        print("note: no --checkpoint, the weights are random", file=sys.stderr)
    for path, image, target in zip(paths, images, targets, strict=True):
        probs, stages = predict_image(model, image, size, device)
        print(f"{path}  ({image.width}x{image.height})")
        for name, p in top_labels(probs, names, args.topk):
            print(f"  {name:<20}{p:.3f}")
        if stages is None:
            continue
        regions = mcar_regions(stages, 0, size, image.size)
        drawn = [r for r in regions if shown(r, args.min_local, args.min_score)]
        for r in regions:
            box = ", ".join(f"{v:.0f}" for v in r.box)
            mark = "" if r in drawn else "   (not drawn)"
            print(f"  region [{box}]  {region_label(r, names)}  local {r.local_score:.2f}{mark}")
        target.parent.mkdir(parents=True, exist_ok=True)
        draw_regions(image, drawn, names).save(target)
        print(f"  wrote {target}")
    return 0
