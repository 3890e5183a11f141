"""The released MCAR code's global-to-local step, reimplemented as the benchmark's baseline.

This mirrors the loop of the authors' released ``forward`` (``docs/mcar-localization.md``, "Cost in
the released code"): sigmoid the class activation maps of **all** C classes, upsample all of them to
the input size (bilinear, ``align_corners=True``), take both max-marginal profiles with
``max_pool2d``; then, in Python, for every image sort the global scores, and for each of the top-N
classes normalise its two profiles, run the interval search one profile at a time (``obj_loc``:
``sign``, ``nonzero`` and a loop over the candidate segments on small tensors) and
``F.interpolate`` the crop into a preallocated batch. It is written from the semantics in
``docs/mcar-localization.md`` — the same boxes as :func:`fastmlr.kernels.localize_regions` — and keeps
the released code's structure and therefore its cost: the C − N unused maps are upsampled, and every
region costs a handful of tiny tensor ops and Python-level control flow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def obj_loc(score: torch.Tensor, threshold: float) -> tuple[int, int]:
    """Interval search (doc §3) on one normalised profile, the released way: tensor ops on the
    profile, a Python loop over the candidate segments."""
    length = score.shape[0]
    minsize = math.ceil(length * 0.125)
    sign = (score - threshold).sign()
    crossings = ((sign[1:] - sign[:-1]).abs() == 2).nonzero()
    if len(crossings) == 0:
        return math.ceil(length * 0.125), math.ceil(length * 0.875)
    crossings = crossings[:, 0].tolist()
    candidates = ([(0, crossings[0])] if crossings[0] > 0 else []) + [(crossings[-1], length)]
    candidates += list(zip(crossings[:-1], crossings[1:], strict=True))
    best_peak, best_width, lo, hi = 0.0, 0, 0, 0
    for start, end in candidates:
        peak = score[start:end].max()
        if peak > best_peak or (peak == best_peak and end - start > best_width):
            best_peak, best_width, lo, hi = peak, end - start, start, end
    if hi - lo <= minsize:
        pad = minsize - (hi - lo)
        half = math.ceil(pad / 2.0)
        if lo > half and length - hi > pad:
            lo, hi = lo - half + 1, hi + half
        if lo < half:
            lo, hi = 0, minsize
        if length - hi < half:
            lo, hi = length - minsize + 1, length
    return lo, hi


def normalise(profile: torch.Tensor) -> torch.Tensor:
    """Doc §2."""
    if profile.max() == profile.min():
        return profile / profile.max()
    return (profile - profile.min()) / (profile.max() - profile.min())


def released_localize(
    cam_logits: torch.Tensor,
    global_scores: torch.Tensor,
    image_size: tuple[int, int],
    top_n: int,
    threshold: float = 0.5,
) -> torch.Tensor:
    """Boxes ``[B, top_n, 4]`` (x1, y1, x2, y2) the released way (all C maps upsampled, Python loops)."""
    height, width = image_size
    cams = F.interpolate(torch.sigmoid(cam_logits), size=(height, width), mode="bilinear", align_corners=True)
    x_profiles = F.max_pool2d(cams, (height, 1)).squeeze(2)  # [B, C, W]
    y_profiles = F.max_pool2d(cams, (1, width)).squeeze(3)  # [B, C, H]
    boxes = torch.zeros(cam_logits.shape[0], top_n, 4, dtype=torch.long)
    for b in range(cam_logits.shape[0]):
        _, order = global_scores[b].sort(descending=True)
        for n in range(top_n):
            x1, x2 = obj_loc(normalise(x_profiles[b, order[n]]), threshold)
            y1, y2 = obj_loc(normalise(y_profiles[b, order[n]]), threshold)
            boxes[b, n] = torch.tensor([x1, y1, x2, y2])
    return boxes


def released_global_to_local(
    images: torch.Tensor,
    cam_logits: torch.Tensor,
    global_scores: torch.Tensor,
    top_n: int,
    threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole step: boxes ``[B, top_n, 4]`` and the local inputs ``[B, top_n, 3, H, W]`` (each region
    resized to the input size with one ``F.interpolate`` per region)."""
    batch, channels, height, width = images.shape
    boxes = released_localize(cam_logits, global_scores, (height, width), top_n, threshold)
    local_inputs = images.new_zeros(batch, top_n, channels, height, width)
    for b in range(batch):
        for n in range(top_n):
            x1, y1, x2, y2 = boxes[b, n].tolist()
            local_inputs[b, n] = F.interpolate(
                images[b : b + 1, :, y1:y2, x1:x2], size=(height, width), mode="bilinear", align_corners=True
            )[0]
    return boxes, local_inputs
