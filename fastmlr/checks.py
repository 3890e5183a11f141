"""Input checks shared by every model's boundary. Each failure is a ``ValueError`` naming the problem."""

from __future__ import annotations

import torch


def check_images(images: torch.Tensor, image_size: int | None = None) -> None:
    """Validate a batch of images ``[B, 3, H, W]``.

    Requires a floating tensor with 4 dimensions, 3 channels, a non-empty batch, H and W multiples
    of 32 (the backbones' stride) and finite values (not checked while
    tracing for export or compile). When ``image_size`` is given (models whose
    layer widths depend on it, e.g. LCE), H and W must equal it.
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must be 4-D [B, 3, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating tensor, got dtype {images.dtype}")
    b, c, h, w = images.shape
    if b == 0:
        raise ValueError("images is an empty batch (B = 0)")
    if c != 3:
        raise ValueError(f"images must have 3 channels, got {c} (shape {tuple(images.shape)})")
    if h % 32 or w % 32 or h == 0 or w == 0:
        raise ValueError(f"image height and width must be positive multiples of 32, got {h}x{w}")
    if image_size is not None and (h, w) != (image_size, image_size):
        raise ValueError(f"this model is built for {image_size}x{image_size} images, got {h}x{w}")
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
    if not tracing and not torch.isfinite(images).all():  # a value check cannot be traced or exported
        raise ValueError("images contain NaN or infinite values")


def check_threshold(threshold: float, name: str = "threshold") -> float:
    """``threshold`` must lie in the open interval (0, 1)."""
    threshold = float(threshold)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {threshold}")
    return threshold


def check_topn(topn: int, num_classes: int) -> int:
    """``topn`` must be an integer in 1..num_classes."""
    if isinstance(topn, bool) or int(topn) != topn or not 1 <= int(topn) <= num_classes:
        raise ValueError(f"topn must be an integer in 1..{num_classes} (num_classes), got {topn}")
    return int(topn)
