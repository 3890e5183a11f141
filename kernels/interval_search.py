"""MCAR's interval search on 1-D activation profiles (``docs/mcar-localization.md`` §2–§3).

``interval_search(profiles, threshold)`` normalises each raw profile to [0, 1] (§2) and returns the
half-open interval ``[start, end)`` the released MCAR code picks (§3). Two implementations sit side
by side behind one dispatcher:

- the torch reference: vectorised over every leading dimension and traceable by
  ``torch.onnx.export`` (opset 17) — only comparisons, ``where``, ``cumsum``, ``sort``, ``gather`` and
  max/argmax reductions, no data-dependent shapes, and no constant sized by the leading axes
  (zeros are ``x * 0``, positions broadcast), so they can stay dynamic in the exported graph;
- a Triton kernel: one program per profile, the profile padded to a power of two with masks.

How the search is vectorised. The crossings ``z0 < … < zk`` cut ``[0, L)`` into the segments
``[0, z0), [z0, z1), …, [zk, L)`` — exactly the candidate segments of §3 (the first one is empty when
``z0 == 0``). Keeping the best ``(peak, width)`` with strict improvement over the examination order
``[0, z0)``, ``[zk, L)``, ``[z0, z1)``, … is a lexicographic maximum of ``(peak, width, -rank)``: the
winner holds the profile's global maximum, is the widest of the segments holding it, and is examined
first among equally wide ones. (The initial ``(0, 0)`` never survives: normalised values are ≥ 0 and
every non-empty segment has width ≥ 1.) So each index ``j`` at the global maximum proposes its own
segment with the key ``width * (L + 2) + (L + 1 - rank)`` and the largest key wins. The torch
reference finds each index's segment bounds with a sort of the crossing positions and gathers; the
Triton kernel with a forward max-scan (start: last crossing ≤ j) and a reverse min-scan (end: first
crossing > j).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmlr.checks import check_threshold

from ._dispatch import resolve_backend
from ._utils import is_exporting

__all__ = ["interval_search", "interval_search_reference", "normalize_profiles"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_profiles(profiles: torch.Tensor, threshold: float, op: str = "interval_search") -> None:
    """Raise ``ValueError`` unless ``profiles`` is a floating ``[..., L]`` tensor (``L >= 2``, finite
    values) and ``threshold`` lies in (0, 1)."""
    if not isinstance(profiles, torch.Tensor):
        raise ValueError(f"{op}: profiles must be a torch.Tensor, got {type(profiles).__name__}")
    if profiles.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: profiles must be float16/bfloat16/float32/float64, got {profiles.dtype}")
    if profiles.dim() < 1 or profiles.shape[-1] < 2:
        raise ValueError(f"{op}: profiles must have a last dimension of length >= 2, got {tuple(profiles.shape)}")
    check_threshold(threshold, f"{op}: threshold")
    if not is_exporting() and not bool(torch.isfinite(profiles).all()):
        raise ValueError(f"{op}: profiles contain NaN or infinite values")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype profiles are normalised and compared in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_interval(length: int) -> tuple[int, int]:
    """``[ceil(L * 0.125), ceil(L * 0.875))``: the interval returned when a profile never crosses tau."""
    return (length + 7) // 8, (7 * length + 7) // 8


def normalize_profiles(profiles: torch.Tensor) -> torch.Tensor:
    """Doc §2: ``s / max(s)`` for a flat profile, else ``(s - min) / (max - min)``, along the last dim.

    Computed in :func:`compute_dtype`. A flat all-zero profile becomes NaN (0 / 0) like the released
    code; NaN has sign 0, so such a profile has no crossing and gets the default interval."""
    s = profiles.to(compute_dtype(profiles.dtype))
    s_max = s.amax(-1, keepdim=True)
    s_min = s.amin(-1, keepdim=True)
    return torch.where(s_max == s_min, s / s_max, (s - s_min) / (s_max - s_min))


def _apply_minimum_size(lo: torch.Tensor, hi: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Doc §3 minimum size: when ``hi - lo <= minsize``, three sequential checks with ``pad`` and
    ``half`` computed once from the chosen interval."""
    minsize = (length + 7) // 8
    applies = hi - lo <= minsize
    pad = minsize - (hi - lo)
    half = torch.div(pad + 1, 2, rounding_mode="floor")  # ceil(pad / 2); pad >= 0 wherever it applies
    grow = applies & (lo > half) & (length - hi > pad)  # check 1
    lo, hi = torch.where(grow, lo - half + 1, lo), torch.where(grow, hi + half, hi)
    at_start = applies & (lo < half)  # check 2
    lo, hi = torch.where(at_start, 0, lo), torch.where(at_start, minsize, hi)
    at_end = applies & (length - hi < half)  # check 3
    lo, hi = torch.where(at_end, length - minsize + 1, lo), torch.where(at_end, length, hi)
    return lo, hi


def search_normalized(s: torch.Tensor, threshold: float) -> torch.Tensor:
    """Doc §3 on normalised profiles ``s [..., L]`` → ``LongTensor [..., 2]`` of ``[start, end)``."""
    length = s.shape[-1]
    tau = torch.tensor(threshold, dtype=s.dtype, device=s.device)  # compared in the profile's dtype
    sign = (s > tau).long() - (s < tau).long()  # NaN and values equal to tau have sign 0
    # Crossing at i in 0..L-2, none at L-1 (a zero step appended: ``x * 0`` keeps leading axes symbolic).
    step = torch.cat([sign[..., 1:] - sign[..., :-1], sign[..., :1] * 0], dim=-1)
    crossing = step.abs() == 2
    position = torch.arange(length, device=s.device)  # broadcast against [..., L] by where
    n_cross = crossing.sum(-1, keepdim=True)
    segment = crossing.long().cumsum(-1)  # index j lies in segment [z_{m-1}, z_m), m = segment[j]
    # z_m for m = 0..L-1 (L beyond the last crossing): segment m ends at z_m and starts at z_{m-1}.
    ends_by_segment = torch.where(crossing, position, length).sort(-1).values
    starts_by_segment = torch.cat([ends_by_segment[..., :1] * 0, ends_by_segment[..., :-1]], -1)
    start = starts_by_segment.gather(-1, segment)
    end = ends_by_segment.gather(-1, segment)
    # Examination order: [0, z0) first, then [zk, L), then [z0, z1), [z1, z2), ...
    rank = torch.where(segment == 0, 0, torch.where(segment == n_cross, 1, segment + 1))
    at_peak = s == s.amax(-1, keepdim=True)
    key = torch.where(at_peak, (end - start) * (length + 2) + (length + 1 - rank), -1)
    best = key.argmax(-1, keepdim=True)
    lo, hi = _apply_minimum_size(start.gather(-1, best), end.gather(-1, best), length)
    default_lo, default_hi = default_interval(length)
    no_crossing = n_cross == 0
    lo = torch.where(no_crossing, default_lo, lo)
    hi = torch.where(no_crossing, default_hi, hi)
    return torch.cat([lo, hi], dim=-1)


def interval_search_reference(profiles: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Torch reference of :func:`interval_search` (no input checks)."""
    return search_normalized(normalize_profiles(profiles), threshold)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)

@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)

@triton.jit
def _load_profile(base, offsets, length, COMPUTE: tl.constexpr):
    """The profile at ``offsets`` in the compute dtype (−inf where ``offsets >= length``)."""
    return tl.load(base + offsets, mask=offsets < length, other=float("-inf")).to(COMPUTE)

@triton.jit
def _divide(numerator, denominator, COMPUTE: tl.constexpr):
    """IEEE division rounded to nearest, as torch (float32 ``/`` in Triton may be approximate)."""
    if COMPUTE == tl.float32:
        return tl.math.div_rn(numerator, denominator)
    else:
        return numerator / denominator

@triton.jit
def _normalize(value, s_min, s_max, COMPUTE: tl.constexpr):
    """Doc §2."""
    flat = _divide(value, tl.zeros_like(value) + s_max, COMPUTE)
    spread = _divide(value - s_min, tl.zeros_like(value) + (s_max - s_min), COMPUTE)
    return tl.where(s_max == s_min, flat, spread)

@triton.jit
def _sign(s, tau):
    return (s > tau).to(tl.int32) - (s < tau).to(tl.int32)

@triton.jit
def search_profile(base, length, tau, out_lo, out_hi, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    """Doc §2–§3 on the profile at ``base`` (``length`` values); stores ``start`` at ``out_lo`` and
    ``end`` at ``out_hi``."""
    j = tl.arange(0, BLOCK)
    valid = j < length
    raw0 = _load_profile(base, j, length, COMPUTE)
    raw1 = _load_profile(base, j + 1, length, COMPUTE)
    raw2 = _load_profile(base, j + 2, length, COMPUTE)
    s_max = tl.max(raw0, axis=0)
    s_min = tl.min(tl.where(valid, raw0, float("inf")), axis=0)
    s0 = _normalize(raw0, s_min, s_max, COMPUTE)
    s1 = _normalize(raw1, s_min, s_max, COMPUTE)
    s2 = _normalize(raw2, s_min, s_max, COMPUTE)
    sign0 = _sign(s0, tau)
    sign1 = _sign(s1, tau)
    sign2 = _sign(s2, tau)
    cross_here = (tl.abs(sign1 - sign0) == 2) & (j + 1 < length)  # crossing at j
    cross_next = (tl.abs(sign2 - sign1) == 2) & (j + 2 < length)  # crossing at j + 1
    n_cross = tl.sum(cross_here.to(tl.int32), axis=0)
    segment = tl.cumsum(cross_here.to(tl.int32), axis=0)
    start = tl.associative_scan(tl.where(cross_here, j, 0), 0, _max_combine)
    end = tl.associative_scan(tl.where(cross_next, j + 1, length), 0, _min_combine, reverse=True)
    rank = tl.where(segment == 0, 0, tl.where(segment == n_cross, 1, segment + 1))
    peak = tl.max(tl.where(valid, s0, float("-inf")), axis=0)
    at_peak = valid & (s0 == peak)
    key = tl.where(at_peak, (end - start).to(tl.int64) * (length + 2) + (length + 1 - rank), -1)
    best = tl.max(key, axis=0)
    lo = tl.min(tl.where(key == best, start, length), axis=0)
    hi = tl.min(tl.where(key == best, end, length), axis=0)
    # Minimum size: three sequential checks (doc §3).
    minsize = (length + 7) // 8
    pad = minsize - (hi - lo)
    half = (pad + 1) // 2
    applies = hi - lo <= minsize
    grow = applies & (lo > half) & (length - hi > pad)
    lo, hi = tl.where(grow, lo - half + 1, lo), tl.where(grow, hi + half, hi)
    at_start = applies & (lo < half)
    lo, hi = tl.where(at_start, 0, lo), tl.where(at_start, minsize, hi)
    at_end = applies & (length - hi < half)
    lo, hi = tl.where(at_end, length - minsize + 1, lo), tl.where(at_end, length, hi)
    lo = tl.where(n_cross == 0, (length + 7) // 8, lo)
    hi = tl.where(n_cross == 0, (7 * length + 7) // 8, hi)
    tl.store(out_lo, lo.to(tl.int64))
    tl.store(out_hi, hi.to(tl.int64))

@triton.jit
def _interval_search_kernel(
    profiles_ptr,
    tau_ptr,
    out_ptr,
    length,
    stride_profile,
    out_stride_profile,
    out_stride_pair,
    BLOCK: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """One program per profile; ``tau`` is read in the compute dtype."""
    pid = tl.program_id(0).to(tl.int64)
    tau = tl.load(tau_ptr)
    out = out_ptr + pid * out_stride_profile
    search_profile(
        profiles_ptr + pid * stride_profile,
        length,
        tau,
        out,
        out + out_stride_pair,
        BLOCK,
        COMPUTE,
    )


def launch_interval_search(
    profiles: torch.Tensor, threshold: float, out: torch.Tensor, out_stride_pair: int = 1
) -> None:
    """Run the Triton search on contiguous ``profiles [P, L]``, writing ``start``/``end`` of profile
    ``p`` to ``out[p]`` (int64, ``out_stride_pair`` elements apart)."""
    n_profiles, length = profiles.shape[0], profiles.shape[-1]
    if n_profiles == 0:
        return
    dtype = compute_dtype(profiles.dtype)
    tau = torch.tensor([threshold], dtype=dtype, device=profiles.device)
    _interval_search_kernel[(n_profiles,)](
        profiles,
        tau,
        out,
        length,
        length,
        out.stride(0),
        out_stride_pair,
        BLOCK=triton.next_power_of_2(length),
        COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
        enable_fp_fusion=False,
    )


def _interval_search_triton(profiles: torch.Tensor, threshold: float) -> torch.Tensor:
    length = profiles.shape[-1]
    flat = profiles.reshape(-1, length).contiguous()
    out = torch.empty(flat.shape[0], 2, dtype=torch.long, device=profiles.device)
    launch_interval_search(flat, threshold, out)
    return out.reshape(*profiles.shape[:-1], 2)


def interval_search(profiles: torch.Tensor, threshold: float = 0.5, *, backend: str = "auto") -> torch.Tensor:
    """MCAR's interval search (doc §2–§3) on raw profiles ``[..., L]`` → ``LongTensor [..., 2]``.

    Each profile is normalised to [0, 1] (in float32, float64 for float64 input), split at the
    crossings of ``threshold``, and the segment holding the maximum (widest, then first examined)
    is returned as half-open ``[start, end)`` after the minimum-size adjustment. A profile that never
    crosses ``threshold`` gives ``[ceil(L/8), ceil(7L/8))``.

    Raises ``ValueError`` for a non-floating dtype, ``L < 2``, NaN/inf values, or ``threshold``
    outside (0, 1)."""
    check_profiles(profiles, threshold)
    if resolve_backend("interval_search", backend, profiles) == "triton":
        return _interval_search_triton(profiles, threshold)
    return interval_search_reference(profiles, threshold)
