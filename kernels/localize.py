"""MCAR's global-to-local localisation: class activation maps → one box per selected class
(``docs/mcar-localization.md`` §1 steps 2, 3, 5 and §3).

For each image ``b`` and selected class ``c = indices[b, n]``: ``M = sigmoid(cam_logits[b, c])`` on the
low-resolution ``h×w`` map (step 2), bilinear upsampling with ``align_corners=True`` to ``H×W``
(step 3), the max-marginal profiles ``px[x] = max_y M↑[y, x]`` (length W) and ``py[y] = max_x M↑[y, x]``
(length H) (step 5), and the interval search of :mod:`.interval_search` on each; the box is
``(x1, y1, x2, y2)``, half-open, in input pixels.

Both implementations compute the max-marginals without the ``H×W`` map. Along one axis the
upsampled value is ``(1 − λ)·A + λ·B`` between two low-resolution samples, linear in ``λ`` over the
run of outputs that share the same source index ``i0``; its maximum over such a run is at the run's
first or last output. So ``px`` (max over rows) only needs the *extremal rows* — the first and last
output row of each run, ``≤ 2h`` rows — and ``py`` only the extremal columns (``≤ 2w``): about
``2·(h·W + H·w)`` values per map instead of ``H·W`` (≈ 9× fewer at 14 → 448).

Every value is computed with the arithmetic of torch's bilinear kernel, from the sampling tables of
:func:`axis_sampling` (``real = scale·i`` in float32 with ``scale = (in − 1)/(out − 1)``,
``i0 = int(real)``, ``i1 = i0 + (i0 < in − 1)``, ``λ1 = real − i0``, ``λ0 = 1 − λ1``):
``val = h0λ·(w0λ·v00 + w1λ·v01) + h1λ·(w0λ·v10 + w1λ·v11)``.

- Torch reference: sigmoid on all C low-resolution maps, gather the N selected ones, the horizontal
  pass on the ``h`` low-resolution rows, then the vertical pass at the extremal rows (→ ``px``) and at
  all rows of the extremal columns (→ ``py``), max, and the torch interval search. Vectorised and
  ONNX-traceable (the extremal indices depend on the sizes only).
- Triton: one profiles program per selected map computes the same values in registers and writes
  ``px`` and ``py``; the interval-search kernel then normalises and searches each profile and writes
  the box coordinates. Floating-point contraction is off (``enable_fp_fusion=False``), so the
  profiles are bit-identical to the torch reference (tested under the CPU interpreter).

Relation to ``F.interpolate``: torch's CPU upsampling kernel fuses some products and sums into
FMAs (depending on sizes and memory layout), so about a quarter of its values differ by 1 ulp from
the unfused formula, and in rare maps rounding makes an interior row exceed its run's endpoints by
1 ulp; the profiles agree with ``upsample → max`` to ~1e-7, and boxes differ only where such a
1-ulp change decides a tie between equal maxima or a value exactly at the threshold.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from fastmlr.checks import check_finite, check_threshold

from ._dispatch import resolve_backend
from ._utils import is_exporting, size_pair
from .interval_search import interval_search_reference, launch_interval_search

__all__ = ["axis_sampling", "localize_regions", "localize_regions_reference", "max_marginals", "selected_maps"]


def image_hw(image_size: int | tuple[int, int], op: str = "localize_regions") -> tuple[int, int]:
    """``(H, W)`` from an int or a pair of ints, each >= 2: a profile needs two samples
    (:func:`~._utils.size_pair`)."""
    return size_pair(image_size, op, "image_size", minimum=2)


def check_localize_inputs(cam_logits: torch.Tensor, indices: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``cam_logits`` is a finite floating ``[B, C, h, w]`` tensor and
    ``indices`` an integer ``[B, N]`` tensor of class indices in ``[0, C)`` on the same device."""
    op = "localize_regions"
    if not isinstance(cam_logits, torch.Tensor) or cam_logits.dim() != 4:
        shape = getattr(cam_logits, "shape", cam_logits)
        raise ValueError(f"{op}: cam_logits must be a [B, C, h, w] tensor, got {shape}")
    if not cam_logits.is_floating_point():
        raise ValueError(f"{op}: cam_logits must be floating point, got {cam_logits.dtype}")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.shape[0] != cam_logits.shape[0]:
        raise ValueError(
            f"{op}: indices must be a [B, N] tensor with B = {cam_logits.shape[0]}, "
            f"got {getattr(indices, 'shape', indices)}"
        )
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(f"{op}: indices must be an integer tensor, got {indices.dtype}")
    if indices.device != cam_logits.device:
        raise ValueError(f"{op}: indices are on {indices.device} but cam_logits on {cam_logits.device}")
    num_classes = cam_logits.shape[1]
    if not is_exporting() and indices.numel() and not bool(((indices >= 0) & (indices < num_classes)).all()):
        raise ValueError(f"{op}: indices must lie in [0, {num_classes}), got values outside")
    # Non-finite logits come from a broken model; their profiles would normalise to NaN and quietly
    # give the default box (the interval search rejects such profiles too).
    check_finite(cam_logits, f"{op}: cam_logits")


def selected_maps(cam_logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Doc §1 step 2 for the selected classes: ``sigmoid`` of the low-resolution maps (in float32),
    gathered at ``indices`` → ``[B, N, h, w]``. The sigmoid runs on all C maps (cheap at h×w) so each
    value is computed exactly as when every map is kept."""
    maps = torch.sigmoid(cam_logits.float())
    # The index broadcast to [B, N, h, w] by adding zeros, not by an expand to traced sizes: the ONNX
    # exporter's shape inference then keeps N, h, w static (and B symbolic under a dynamic batch).
    gather_index = indices.long()[:, :, None, None] + torch.zeros_like(maps[:, :1], dtype=torch.long)
    return maps.gather(1, gather_index)


@functools.lru_cache(maxsize=64)
def axis_sampling(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Align-corners bilinear sampling of ``out_size`` outputs from ``in_size`` inputs, as torch's
    kernel computes it in float32: ``(i0, i1, λ0, λ1, extremal)`` — source indices and weights per
    output, and the sorted outputs that are first or last among those sharing ``i0``. Depends on the
    sizes only (constants under ONNX export)."""
    scale = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
    real = scale * np.arange(out_size, dtype=np.float32)
    i0 = real.astype(np.int64)  # trunc == floor, real >= 0
    i1 = i0 + (i0 < in_size - 1)
    lambda1 = real - i0.astype(np.float32)
    lambda0 = np.float32(1) - lambda1
    run_start = np.r_[True, i0[1:] != i0[:-1]]
    run_end = np.r_[i0[1:] != i0[:-1], True]
    extremal = np.flatnonzero(run_start | run_end)
    return i0, i1, lambda0, lambda1, extremal


def sampling_tensors(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """:func:`axis_sampling` on ``device``: ``(i0, i1, λ0, λ1, extremal)`` (int64, float32 weights).
    Built per call, never cached: a tensor made while an exporter traces is a fake tensor."""
    return tuple(torch.from_numpy(a).to(device) for a in axis_sampling(in_size, out_size))


def _max_marginals_reference(maps: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Doc §1 steps 3 and 5 on float32 ``maps [..., h, w]`` → ``(px [..., W], py [..., H])``.

    Indexes the last two axes only, so the leading axes (batch, regions) are never reshaped: traced
    by the ONNX exporter they stay symbolic (a dynamic batch axis survives shape inference)."""
    y0, y1, h0l, h1l, rows = sampling_tensors(int(maps.shape[-2]), height, maps.device)
    x0, x1, w0l, w1l, cols = sampling_tensors(int(maps.shape[-1]), width, maps.device)
    # In-place products and sums on the fresh gathers: the same arithmetic with half the temporaries
    # (on CPU each new block of memory costs page faults once glibc has trimmed its heap).
    # The horizontal pass on the h low-resolution rows, every output column: [..., h, W].
    across = maps.index_select(-1, x0).mul_(w0l).add_(maps.index_select(-1, x1).mul_(w1l))
    # px: the vertical pass at the extremal rows only, [..., E_rows, W], max over rows.
    top = across.index_select(-2, y0[rows]).mul_(h0l[rows, None])
    px = top.add_(across.index_select(-2, y1[rows]).mul_(h1l[rows, None])).amax(-2)
    # py: the vertical pass at every row of the extremal columns, [..., H, E_cols], max over columns.
    at_cols = across.index_select(-1, cols)
    left = at_cols.index_select(-2, y0).mul_(h0l[:, None])
    py = left.add_(at_cols.index_select(-2, y1).mul_(h1l[:, None])).amax(-1)
    return px, py


@triton.jit
def _load_sampling(table_ptr, outputs, n_outputs, ok):
    """``(i0, i1, λ0, λ1)`` of ``outputs`` from a ``[4, n_outputs]`` float32 table (indices exact)."""
    i0 = tl.load(table_ptr + outputs, mask=ok, other=0).to(tl.int32)
    i1 = tl.load(table_ptr + n_outputs + outputs, mask=ok, other=0).to(tl.int32)
    lambda0 = tl.load(table_ptr + 2 * n_outputs + outputs, mask=ok, other=0)
    lambda1 = tl.load(table_ptr + 3 * n_outputs + outputs, mask=ok, other=0)
    return i0, i1, lambda0, lambda1

@triton.jit
def _bilinear(base, w, rows_table, n_rows_out, rows, row_ok, cols_table, n_cols_out, cols, col_ok):
    """Upsampled values at ``rows × cols`` (−inf outside the masks), torch's arithmetic."""
    y0, y1, h0l, h1l = _load_sampling(rows_table, rows, n_rows_out, row_ok)
    x0, x1, w0l, w1l = _load_sampling(cols_table, cols, n_cols_out, col_ok)
    ok = row_ok[:, None] & col_ok[None, :]
    top = base + (y0 * w)[:, None]
    bottom = base + (y1 * w)[:, None]
    v00 = tl.load(top + x0[None, :], mask=ok, other=0.0)
    v01 = tl.load(top + x1[None, :], mask=ok, other=0.0)
    v10 = tl.load(bottom + x0[None, :], mask=ok, other=0.0)
    v11 = tl.load(bottom + x1[None, :], mask=ok, other=0.0)
    w0 = w0l[None, :]
    w1 = w1l[None, :]
    value = h0l[:, None] * (w0 * v00 + w1 * v01) + h1l[:, None] * (w0 * v10 + w1 * v11)
    return tl.where(ok, value, float("-inf"))

@triton.jit
def _running_max(
    base, w, rows_table, H, cols_table, W, extremal, n_extremal, outputs, ok, CHUNK: tl.constexpr,
    OVER_ROWS: tl.constexpr,
):
    """``px`` (``OVER_ROWS``: max over the extremal rows, for the output columns ``outputs``) or
    ``py`` (max over the extremal columns, for the output rows ``outputs``), ``CHUNK`` extremal
    rows/columns at a time into a running max."""
    best = tl.full(outputs.shape, float("-inf"), tl.float32)
    for start in range(0, n_extremal, CHUNK):
        e = start + tl.arange(0, CHUNK)
        e_ok = e < n_extremal
        picked = tl.load(extremal + e, mask=e_ok, other=0)
        if OVER_ROWS:
            value = _bilinear(base, w, rows_table, H, picked, e_ok, cols_table, W, outputs, ok)
            best = tl.maximum(best, tl.max(value, axis=0))
        else:
            value = _bilinear(base, w, rows_table, H, outputs, ok, cols_table, W, picked, e_ok)
            best = tl.maximum(best, tl.max(value, axis=1))
    return best

@triton.jit
def _max_marginals_kernel(
    maps_ptr,
    px_ptr,
    py_ptr,
    rows_table,
    extremal_rows,
    cols_table,
    extremal_cols,
    h,
    w,
    H,
    W,
    n_extremal_rows,
    n_extremal_cols,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """One program per map: ``px`` from the extremal rows × all columns, ``py`` from all rows ×
    the extremal columns, ``CHUNK`` extremal rows (columns) at a time into a running max; the
    upsampled values stay in registers (max is exact, so the chunking changes no bit)."""
    pid = tl.program_id(0).to(tl.int64)
    base = maps_ptr + pid * h * w
    tables = (base, w, rows_table, H, cols_table, W)
    xs = tl.arange(0, BLOCK_W)
    px = _running_max(*tables, extremal_rows, n_extremal_rows, xs, xs < W, CHUNK, True)
    tl.store(px_ptr + pid * W + xs, px, mask=xs < W)
    ys = tl.arange(0, BLOCK_H)
    py = _running_max(*tables, extremal_cols, n_extremal_cols, ys, ys < H, CHUNK, False)
    tl.store(py_ptr + pid * H + ys, py, mask=ys < H)


@functools.lru_cache(maxsize=64)
def _kernel_tables(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``[4, out]`` float32 table (i0, i1, λ0, λ1 — indices < 2**24 are exact in float32) and the
    extremal outputs (int32) for the Triton kernel."""
    i0, i1, lambda0, lambda1, extremal = axis_sampling(in_size, out_size)
    table = np.stack([i0.astype(np.float32), i1.astype(np.float32), lambda0, lambda1])
    return table, extremal.astype(np.int32)


def _launch_max_marginals(maps: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton profiles kernel on float32 ``maps [M, h, w]`` (contiguous) → ``(px [M, W], py [M, H])``."""
    n_maps, h, w = maps.shape
    px = torch.empty(n_maps, width, dtype=torch.float32, device=maps.device)
    py = torch.empty(n_maps, height, dtype=torch.float32, device=maps.device)
    if n_maps:
        rows_table, extremal_rows, cols_table, extremal_cols = (
            torch.from_numpy(a).to(maps.device) for a in _kernel_tables(h, height) + _kernel_tables(w, width)
        )
        _max_marginals_kernel[(n_maps,)](
            maps,
            px,
            py,
            rows_table,
            extremal_rows,
            cols_table,
            extremal_cols,
            h,
            w,
            height,
            width,
            len(extremal_rows),
            len(extremal_cols),
            BLOCK_H=triton.next_power_of_2(height),
            BLOCK_W=triton.next_power_of_2(width),
            # 8 extremal rows × 512 columns per step: ~16 values a thread at 8 warps, no spills (the
            # whole 32 × 512 tile at once needed 255 registers and spilled, per ptxas).
            CHUNK=8,
            num_warps=8,
            enable_fp_fusion=False,
        )
    return px, py


def max_marginals(
    maps: torch.Tensor, image_size: int | tuple[int, int], *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(px [..., W], py [..., H])`` of the bilinear (align_corners=True) upsampling of float32 maps
    ``[..., h, w]`` to ``H×W``: ``px`` the max over rows, ``py`` the max over columns (doc §1 step 5)."""
    height, width = image_hw(image_size, "max_marginals")
    if not isinstance(maps, torch.Tensor) or maps.dim() < 2 or maps.dtype != torch.float32:
        described = f"{maps.dtype} {tuple(maps.shape)}" if isinstance(maps, torch.Tensor) else type(maps)
        raise ValueError(f"max_marginals: maps must be a float32 [..., h, w] tensor, got {described}")
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    flat = maps.reshape(-1, h, w)
    if resolve_backend("max_marginals", backend, maps) == "triton":
        px, py = _launch_max_marginals(flat.contiguous(), height, width)
    else:
        px, py = _max_marginals_reference(flat, height, width)
    return px.reshape(*lead, width), py.reshape(*lead, height)


def _boxes_from_intervals(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(x1, y1, x2, y2)`` from x and y intervals ``[..., 2]``."""
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def localize_regions_reference(
    cam_logits: torch.Tensor, indices: torch.Tensor, image_size: int | tuple[int, int], threshold: float = 0.5
) -> torch.Tensor:
    """Torch reference of :func:`localize_regions` (no input checks)."""
    height, width = image_hw(image_size)
    maps = selected_maps(cam_logits, indices)
    if maps.numel() == 0:
        return torch.empty(*indices.shape, 4, dtype=torch.long, device=cam_logits.device)
    px, py = _max_marginals_reference(maps, height, width)  # [B, N, W], [B, N, H]
    if height == width:  # one search over both profiles: half the (small) ops
        x, y = interval_search_reference(torch.stack([px, py]), threshold).unbind(0)
        return _boxes_from_intervals(x, y)
    return _boxes_from_intervals(interval_search_reference(px, threshold), interval_search_reference(py, threshold))


def _localize_regions_triton(
    cam_logits: torch.Tensor, indices: torch.Tensor, image_size: tuple[int, int], threshold: float
) -> torch.Tensor:
    height, width = image_size
    batch, n_regions = indices.shape
    maps = selected_maps(cam_logits, indices).reshape(batch * n_regions, *cam_logits.shape[-2:]).contiguous()
    boxes = torch.empty(batch * n_regions, 4, dtype=torch.long, device=cam_logits.device)
    px, py = _launch_max_marginals(maps, height, width)
    launch_interval_search(px, threshold, boxes, out_stride_pair=2)  # x1, x2
    launch_interval_search(py, threshold, boxes[:, 1:], out_stride_pair=2)  # y1, y2
    return boxes.reshape(batch, n_regions, 4)


def localize_regions(
    cam_logits: torch.Tensor,
    indices: torch.Tensor,
    image_size: int | tuple[int, int],
    threshold: float = 0.5,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """One box per selected class (doc §1 steps 2, 3, 5 and §3) → ``LongTensor [B, N, 4]``.

    ``cam_logits [B, C, h, w]`` are the classifier's logits on the low-resolution feature map,
    ``indices [B, N]`` the selected classes of each image, ``image_size`` the input ``H×W`` (int or
    pair). Each box is ``(x1, y1, x2, y2)`` with ``[x1, x2) × [y1, y2)`` in input pixels. Only the N
    selected maps are evaluated, at their extremal rows and columns (module docstring); the boxes
    equal those from upsampling all C maps, up to 1-ulp rounding deciding an exact tie.

    Raises ``ValueError`` for a bad shape or dtype, indices outside ``[0, C)``, ``image_size`` below 2,
    or ``threshold`` outside (0, 1)."""
    size = image_hw(image_size)
    check_localize_inputs(cam_logits, indices)
    check_threshold(threshold, "localize_regions: threshold")
    if resolve_backend("localize_regions", backend, cam_logits, indices) == "triton":
        return _localize_regions_triton(cam_logits, indices, size, threshold)
    return localize_regions_reference(cam_logits, indices, size, threshold)
