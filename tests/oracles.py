"""Independent oracles: plain Python loops written straight from ``shared/docs/mcar-localization.md``
and the released MCAR code's global-to-local loop. Slow on purpose — they are what the vectorised
references and the Triton kernels are checked against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def normalise_loop(s: list[float]) -> list[float]:
    """Doc §2 (MCAR eq. 6)."""
    hi, lo = max(s), min(s)
    if hi == lo:
        return [v / hi if hi != 0 else float("nan") for v in s]
    return [(v - lo) / (hi - lo) for v in s]


def interval_search_loop(profile: list[float], tau: float = 0.5) -> tuple[int, int]:
    """Doc §3 on a raw profile, one element at a time. Values are normalised in float32 like the
    reference (``profile`` should hold float32 values)."""
    t = torch.tensor(profile, dtype=torch.float32)
    hi, lo = t.max(), t.min()
    s = (t / hi if hi == lo else (t - lo) / (hi - lo)).tolist()
    L = len(s)
    minsize = math.ceil(L * 0.125)
    sg = [0 if (v != v) else (1 if v > tau else (-1 if v < tau else 0)) for v in s]
    z = [i for i in range(L - 1) if abs(sg[i + 1] - sg[i]) == 2]
    if not z:
        return math.ceil(L * 0.125), math.ceil(L * 0.875)
    segments = []
    if z[0] > 0:
        segments.append((0, z[0]))
    segments.append((z[-1], L))
    segments += [(z[i], z[i + 1]) for i in range(len(z) - 1)]
    peak, width, lo_, hi_ = 0.0, 0, 0, 0
    for a, b in segments:
        pc, wc = max(s[a:b]), b - a
        if pc > peak or (pc == peak and wc > width):
            peak, width, lo_, hi_ = pc, wc, a, b
    if hi_ - lo_ <= minsize:
        pad = minsize - (hi_ - lo_)
        half = math.ceil(pad / 2)
        if lo_ > half and L - hi_ > pad:
            lo_, hi_ = lo_ - half + 1, hi_ + half
        if lo_ < half:
            lo_, hi_ = 0, minsize
        if L - hi_ < half:
            lo_, hi_ = L - minsize + 1, L
    return lo_, hi_


def released_global_to_local(
    images: torch.Tensor, cam_logits: torch.Tensor, global_scores: torch.Tensor, topn: int, tau: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """The released code's loop: per image, upsample all C maps, per selected class search the two
    profiles in Python, crop and resize with ``F.interpolate``. Returns ``(boxes [B, N, 4], regions
    [B, N, 3, H, W])``."""
    H, W = images.shape[-2:]
    all_boxes, all_regions = [], []
    for b in range(images.shape[0]):
        maps = F.interpolate(torch.sigmoid(cam_logits[b : b + 1]), size=(H, W), mode="bilinear", align_corners=True)[0]
        order = sorted(range(maps.shape[0]), key=lambda c: -float(global_scores[b, c]))[:topn]
        boxes, regions = [], []
        for c in order:
            x1, x2 = interval_search_loop(maps[c].max(dim=0).values.tolist(), tau)
            y1, y2 = interval_search_loop(maps[c].max(dim=1).values.tolist(), tau)
            boxes.append([x1, y1, x2, y2])
            crop = images[b : b + 1, :, y1:y2, x1:x2]
            regions.append(F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=True)[0])
        all_boxes.append(boxes)
        all_regions.append(torch.stack(regions))
    return torch.tensor(all_boxes, dtype=torch.long), torch.stack(all_regions)
