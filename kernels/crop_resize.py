"""MCAR's crop-and-resize of the selected regions (``docs/mcar-localization.md`` §4).

``crop_resize(images, boxes, size)`` resizes every ``images[b, :, y1:y2, x1:x2]`` to ``size`` with
bilinear interpolation, ``align_corners=True``, i.e. ``F.interpolate(crop, size, mode="bilinear",
align_corners=True)`` per box (to 1 ulp, see below): output row ``i`` samples source row
``y1 + i * (y2 - y1 - 1) / (sh - 1)`` (the scale rounded to float32 as torch does), and likewise for
columns. Optionally it normalises per channel, ``(x - mean[c]) / std[c]``, applied to the resized
value, and casts to ``out_dtype``; all arithmetic is in float32 (float64 for float64 images).

- Torch reference (``backend="torch"``): index gathers and weights (no ``grid_sample``, whose
  normalised coordinates lose ~1e-5), separable — columns first, then rows — with the arithmetic of
  torch's bilinear kernel, unfused: ``out = h0λ (w0λ a + w1λ b) + h1λ (w0λ c + w1λ d)``. Vectorised
  over images, boxes and channels; traceable by ``torch.onnx.export``. torch's own CPU kernel fuses
  some of these products and sums into FMAs (which ones depends on sizes, layout and even the
  thread count), so per-crop ``F.interpolate`` agrees with this to 1 ulp (≤ 1.2e-7 on [0, 1]
  images), not bit for bit.
- Per region (``backend="auto"`` on CPU, eager): torch's bilinear kernel (what ``F.interpolate``
  runs) once per region, writing straight into the output batch — the released code's own
  arithmetic, so bit-identical crops, and 3–6× faster on CPU than the vectorised gathers
  (``bench/results/g2l_cpu.md``). Export traces take the vectorised reference instead.
- Triton: one kernel writes all B×N regions; a program handles one box and a tile of output pixels
  for every channel, with the per-box scales computed once on the host (exact float32 division).

Every backend can write into a caller's tensor (``out=``, e.g. the local stream's preallocated input
batch). On CPU that matters: a fresh ``[8, 4, 3, 448, 448]`` float32 batch is 77 MB, and the kernel's
first touch of new pages costs about as much as the resampling itself (``bench/results/g2l_cpu.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._dispatch import forced_backend, interpreter_enabled, resolve_backend
from ._utils import is_exporting, size_pair

__all__ = ["crop_resize", "crop_resize_per_region", "crop_resize_reference"]

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def output_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """``(sh, sw)`` from an int or a pair of positive ints (:func:`~._utils.size_pair`)."""
    return size_pair(size, "crop_resize", "size")


def check_crop_inputs(images: torch.Tensor, boxes: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``images`` is ``[B, Ch, H, W]`` (floating or uint8) and ``boxes`` an
    integer ``[B, N, 4]`` tensor of ``(x1, y1, x2, y2)`` with ``0 <= x1 < x2 <= W``, ``0 <= y1 < y2 <= H``."""
    op = "crop_resize"
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"{op}: images must be a [B, Ch, H, W] tensor, got {getattr(images, 'shape', images)}")
    if not (images.is_floating_point() or images.dtype == torch.uint8):
        raise ValueError(f"{op}: images must be floating point or uint8, got {images.dtype}")
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"{op}: boxes must be a [B, N, 4] tensor, got {getattr(boxes, 'shape', boxes)}")
    if boxes.shape[0] != images.shape[0]:
        raise ValueError(f"{op}: boxes hold {boxes.shape[0]} images but images {images.shape[0]}")
    if boxes.dtype.is_floating_point or boxes.dtype.is_complex or boxes.dtype == torch.bool:
        raise ValueError(f"{op}: boxes must be an integer tensor, got {boxes.dtype}")
    if boxes.device != images.device:
        raise ValueError(f"{op}: boxes are on {boxes.device} but images on {images.device}")
    if is_exporting() or boxes.numel() == 0:
        return
    height, width = images.shape[-2:]
    x1, y1, x2, y2 = boxes.unbind(-1)
    if bool((x1 < 0).any() | (y1 < 0).any() | (x2 > width).any() | (y2 > height).any()):
        raise ValueError(f"{op}: boxes must lie inside the {height}x{width} image (0 <= x1, x2 <= W, ...)")
    if bool((x1 >= x2).any() | (y1 >= y2).any()):
        raise ValueError(f"{op}: boxes must be non-empty with x1 < x2 and y1 < y2")


def _channel_vector(
    values: Sequence[float] | torch.Tensor | None,
    name: str,
    channels: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """``mean``/``std`` as a ``[Ch]`` tensor (a scalar is broadcast), or None."""
    if values is None:
        return None
    vector = torch.as_tensor(values, dtype=dtype, device=device).reshape(-1)
    if vector.numel() == 1:
        vector = vector.expand(channels)
    if vector.numel() != channels:
        raise ValueError(f"crop_resize: {name} must have one value per channel ({channels}), got {vector.numel()}")
    return vector.contiguous()


def box_scales(boxes: torch.Tensor, size: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-box align-corners scales ``[..., 2]`` = ``((y2-y1-1)/(sh-1), (x2-x1-1)/(sw-1))`` in
    ``dtype`` (torch's opmath: float32, float64 for float64 images), 0 where the output side is 1."""
    extents = torch.stack([boxes[..., 3] - boxes[..., 1], boxes[..., 2] - boxes[..., 0]], -1).to(dtype) - 1
    divisors = torch.tensor([max(s - 1, 1) for s in size], dtype=dtype, device=boxes.device)
    scales = extents / divisors
    return torch.where(torch.tensor([s > 1 for s in size], device=boxes.device), scales, torch.zeros_like(scales))


def _source_coordinates(
    start: torch.Tensor, extent: torch.Tensor, scale: torch.Tensor, out_size: int
) -> tuple[torch.Tensor, ...]:
    """torch's align-corners sampling for ``out_size`` outputs per box, in ``scale``'s dtype: absolute
    source indices ``(i0, i1)`` ``[..., out]`` and weights ``(λ0, λ1)``."""
    real = scale[..., None] * torch.arange(out_size, device=scale.device, dtype=scale.dtype)
    offset = real.long()  # trunc == floor (real >= 0)
    lambda1 = real - offset.to(scale.dtype)
    step = (offset < extent[..., None] - 1).long()
    first = start[..., None] + offset
    return first, first + step, 1 - lambda1, lambda1


def _dtypes(images: torch.Tensor, out_dtype: torch.dtype | None) -> tuple[torch.dtype, torch.dtype]:
    """Compute dtype (float64 for float64 images, else float32) and output dtype (default: the
    images' dtype, float32 for uint8)."""
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    return dtype, out_dtype or (images.dtype if images.is_floating_point() else torch.float32)


def check_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """Raise ``ValueError`` unless ``out`` is a contiguous tensor of ``shape``, ``dtype`` on ``device``."""
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"crop_resize: out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"crop_resize: out must be a {dtype} tensor of shape {list(shape)} on {device}, "
            f"got {out.dtype} {list(out.shape)} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError("crop_resize: out must be contiguous")


def _normalise_and_cast(
    out: torch.Tensor,
    mean: Sequence[float] | torch.Tensor | None,
    std: Sequence[float] | torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(out - mean[c]) / std[c]`` over the channel axis (-3) when given, in place on ``out`` (a
    compute-dtype batch of the caller's), then cast to ``out_dtype``."""
    channels = out.shape[-3]
    mean_c = _channel_vector(mean, "mean", channels, out.dtype, out.device)
    std_c = _channel_vector(std, "std", channels, out.dtype, out.device)
    if mean_c is not None:
        out.sub_(mean_c[:, None, None])
    if std_c is not None:
        out.div_(std_c[:, None, None])
    return out.to(out_dtype)


def _into(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``result`` copied into ``out`` (returned); ``result`` itself when there is no ``out`` or it is
    ``out`` already."""
    return result if out is None or result is out else out.copy_(result)


def crop_resize_reference(
    images: torch.Tensor,
    boxes: torch.Tensor,
    size: int | tuple[int, int],
    *,
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of :func:`crop_resize` (no box or ``out`` checks)."""
    out_h, out_w = output_hw(size)
    batch, channels = images.shape[:2]
    n_boxes = boxes.shape[1]
    dtype, out_dtype = _dtypes(images, out_dtype)
    boxes = boxes.long()
    scales = box_scales(boxes, (out_h, out_w), dtype)
    y0, y1, h0l, h1l = _source_coordinates(boxes[..., 1], boxes[..., 3] - boxes[..., 1], scales[..., 0], out_h)
    x0, x1, w0l, w1l = _source_coordinates(boxes[..., 0], boxes[..., 2] - boxes[..., 0], scales[..., 1], out_w)
    source = images.to(dtype)[:, None].expand(batch, n_boxes, channels, *images.shape[-2:])

    def columns(index: torch.Tensor) -> torch.Tensor:  # [B, N, Ch, H, sw]
        return source.gather(4, index[:, :, None, None, :].expand(batch, n_boxes, channels, source.shape[3], out_w))

    # Width pass on every source row, then the height pass on the two rows each output row needs:
    # rows = w0λ a + w1λ b, out = h0λ rows[y0] + h1λ rows[y1] (in-place on fresh gathers: no temporaries).
    rows = columns(x0).mul_(w0l[:, :, None, None, :]).add_(columns(x1).mul_(w1l[:, :, None, None, :]))

    def pick_rows(index: torch.Tensor) -> torch.Tensor:  # [B, N, Ch, sh, sw]
        return rows.gather(3, index[:, :, None, :, None].expand(batch, n_boxes, channels, out_h, out_w))

    result = pick_rows(y0).mul_(h0l[:, :, None, :, None]).add_(pick_rows(y1).mul_(h1l[:, :, None, :, None]))
    return _into(_normalise_and_cast(result, mean, std, out_dtype), out)


def crop_resize_per_region(
    images: torch.Tensor,
    boxes: torch.Tensor,
    size: int | tuple[int, int],
    *,
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`crop_resize` as the released code computes it: torch's bilinear kernel
    (``F.interpolate(crop, size, mode="bilinear", align_corners=True)``) once per region, written
    straight into the output batch (no box or ``out`` checks). The fastest CPU path; not traceable
    (the crop bounds are read as Python ints)."""
    out_h, out_w = output_hw(size)
    dtype, out_dtype = _dtypes(images, out_dtype)
    source = images.to(dtype)
    shape = (boxes.shape[0], boxes.shape[1], images.shape[1], out_h, out_w)
    # Resample into ``out`` itself when it holds the compute dtype, else into a compute-dtype batch.
    target = out if out is not None and out.dtype == dtype else source.new_empty(shape)
    for b, image_boxes in enumerate(boxes.tolist()):
        for n, (x1, y1, x2, y2) in enumerate(image_boxes):
            crop = source[b : b + 1, :, y1:y2, x1:x2]
            torch.ops.aten.upsample_bilinear2d.out(crop, [out_h, out_w], True, None, None, out=target[b, n : n + 1])
    return _into(_normalise_and_cast(target, mean, std, out_dtype), out)


@triton.jit
def _round_to_bfloat16(value):
    """float32 rounded to the nearest bfloat16 (ties to even), still float32, so the later cast is
    exact whatever rounding it uses (Triton's CPU interpreter truncates float32 → bfloat16)."""
    bits = value.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)

@triton.jit
def _crop_resize_kernel(
    images_ptr,
    boxes_ptr,
    scales_ptr,
    mean_ptr,
    std_ptr,
    out_ptr,
    n_boxes,
    channels,
    out_h,
    out_w,
    stride_b,
    stride_c,
    stride_h,
    stride_w,
    HAS_MEAN: tl.constexpr,
    HAS_STD: tl.constexpr,
    COMPUTE: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (box, pixel tile): bilinear samples of one box for ``BLOCK`` output pixels, every
    channel; ``out`` is ``[B, N, Ch, sh, sw]`` contiguous."""
    box = tl.program_id(0).to(tl.int64)
    image = box // n_boxes
    x1 = tl.load(boxes_ptr + box * 4)
    y1 = tl.load(boxes_ptr + box * 4 + 1)
    x2 = tl.load(boxes_ptr + box * 4 + 2)
    y2 = tl.load(boxes_ptr + box * 4 + 3)
    scale_h = tl.load(scales_ptr + box * 2)
    scale_w = tl.load(scales_ptr + box * 2 + 1)
    pixel = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = pixel < out_h * out_w
    row = pixel // out_w
    col = pixel % out_w
    real_y = scale_h * row.to(COMPUTE)
    off_y = real_y.to(tl.int32)
    h1l = real_y - off_y.to(COMPUTE)
    h0l = 1.0 - h1l
    real_x = scale_w * col.to(COMPUTE)
    off_x = real_x.to(tl.int32)
    w1l = real_x - off_x.to(COMPUTE)
    w0l = 1.0 - w1l
    top = (y1 + off_y) * stride_h
    bottom = (y1 + off_y + tl.where(off_y < y2 - y1 - 1, 1, 0)) * stride_h
    left = (x1 + off_x) * stride_w
    right = (x1 + off_x + tl.where(off_x < x2 - x1 - 1, 1, 0)) * stride_w
    out = out_ptr + box * channels * out_h * out_w + pixel
    for c in range(channels):
        base = images_ptr + image * stride_b + c * stride_c
        v00 = tl.load(base + top + left, mask=ok, other=0).to(COMPUTE)
        v01 = tl.load(base + top + right, mask=ok, other=0).to(COMPUTE)
        v10 = tl.load(base + bottom + left, mask=ok, other=0).to(COMPUTE)
        v11 = tl.load(base + bottom + right, mask=ok, other=0).to(COMPUTE)
        value = h0l * (w0l * v00 + w1l * v01) + h1l * (w0l * v10 + w1l * v11)
        if HAS_MEAN:
            value = value - tl.load(mean_ptr + c)
        if HAS_STD:
            std_c = tl.load(std_ptr + c)
            if COMPUTE == tl.float32:
                value = tl.math.div_rn(value, tl.zeros_like(value) + std_c)
            else:
                value = value / std_c
        if ROUND_BF16:
            value = _round_to_bfloat16(value)
        tl.store(out + c * out_h * out_w, value.to(out_ptr.dtype.element_ty), mask=ok)


def _crop_resize_triton(images, boxes, size, *, mean=None, std=None, out_dtype=None, out=None) -> torch.Tensor:
    out_h, out_w = output_hw(size)
    batch, channels = images.shape[:2]
    n_boxes = boxes.shape[1]
    dtype, out_dtype = _dtypes(images, out_dtype)
    if out is None:
        out = torch.empty(batch, n_boxes, channels, out_h, out_w, dtype=out_dtype, device=images.device)
    if out.numel() == 0:
        return out
    boxes = boxes.long().contiguous()
    scales = box_scales(boxes, (out_h, out_w), dtype).contiguous()
    mean_c = _channel_vector(mean, "mean", channels, dtype, images.device)
    std_c = _channel_vector(std, "std", channels, dtype, images.device)
    # ~1k pixels per program on a GPU; one tile per box under the CPU interpreter (cost per program).
    block = min(triton.next_power_of_2(out_h * out_w), 1 << 20 if interpreter_enabled() else 1024)
    _crop_resize_kernel[(batch * n_boxes, triton.cdiv(out_h * out_w, block))](
        images,
        boxes,
        scales,
        mean_c if mean_c is not None else scales,
        std_c if std_c is not None else scales,
        out,
        n_boxes,
        channels,
        out_h,
        out_w,
        *images.stride(),
        HAS_MEAN=mean_c is not None,
        HAS_STD=std_c is not None,
        COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
        ROUND_BF16=out_dtype == torch.bfloat16 and dtype == torch.float32,
        BLOCK=block,
        enable_fp_fusion=False,
    )
    return out


def crop_resize(
    images: torch.Tensor,
    boxes: torch.Tensor,
    size: int | tuple[int, int],
    *,
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Resize each box of each image to ``size`` (doc §4) → ``[B, N, Ch, sh, sw]``.

    ``images [B, Ch, H, W]`` (floating or uint8, any strides), ``boxes [B, N, 4]`` integer
    ``(x1, y1, x2, y2)``, half-open, inside the image. Output pixel ``(i, j)`` of box
    ``n`` equals ``F.interpolate(images[b:b+1, :, y1:y2, x1:x2], size, mode="bilinear",
    align_corners=True)[0, :, i, j]``; then ``(x - mean[c]) / std[c]`` when given (either may be
    None; a scalar applies to every channel); then cast to ``out_dtype`` (default: the images' dtype,
    float32 for uint8).

    ``out``: a contiguous ``[B, N, Ch, sh, sw]`` tensor of the output dtype on the images' device to
    write into and return (e.g. the local stream's preallocated input batch); its dtype is the
    output dtype when ``out_dtype`` is None.

    ``backend``: ``"auto"`` runs the Triton kernel on CUDA tensors and, on CPU, one torch
    ``F.interpolate`` per region (:func:`crop_resize_per_region`, the fastest CPU path, vectorised
    reference while exporting); ``"torch"`` the vectorised reference; ``"triton"`` the kernel.
    Images that require grad (with grad enabled) always take the vectorised reference, the one
    differentiable path.

    Raises ``ValueError`` for bad shapes/dtypes, boxes outside the image or empty, a non-positive
    ``size``, ``mean``/``std`` of the wrong length, or an ``out`` of the wrong shape, dtype, device or
    layout."""
    out_h, out_w = output_hw(size)
    check_crop_inputs(images, boxes)
    if out is not None and out_dtype is None and isinstance(out, torch.Tensor):
        out_dtype = out.dtype
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise ValueError(f"crop_resize: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if out is not None:
        shape = (*boxes.shape[:2], images.shape[1], out_h, out_w)
        check_out(out, shape, _dtypes(images, out_dtype)[1], images.device)
    kwargs = {"mean": mean, "std": std, "out_dtype": out_dtype, "out": out}
    if torch.is_grad_enabled() and images.requires_grad:
        # The Triton kernel and the per-region path (aten's out= variant) have no autograd formula;
        # the vectorised reference is made of differentiable gathers and products.
        return crop_resize_reference(images, boxes, size, **kwargs)
    if resolve_backend("crop_resize", backend, images, boxes) == "triton":
        return _crop_resize_triton(images, boxes, size, **kwargs)
    if backend == "auto" and forced_backend() is None and not is_exporting() and images.device.type == "cpu":
        return crop_resize_per_region(images, boxes, size, **kwargs)
    return crop_resize_reference(images, boxes, size, **kwargs)
