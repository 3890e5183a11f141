"""Oracles for checking fastmlr — and a deployment of it — against the released MCAR code.

The released code's global-to-local step, rebuilt from ``shared/docs/mcar-localization.md`` with its
structure and therefore its cost: all C maps upsampled (bilinear, ``align_corners=True``), the
max-marginal profiles, then, in Python, per image and per selected class, the normalisation (§2)
and the interval search one profile at a time (§3: ``sign``, ``nonzero`` and a loop over the
candidate segments), and one ``F.interpolate`` per region (§4). The tests use it as the oracle of
:mod:`fastmlr.kernels` and of :class:`fastmlr.models.mcar.MCAR`; ``bench/bench_g2l.py`` times it as
the released code's step.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from fastmlr.graph import RANDOM_EMBEDDINGS


def normalise_profile(profile: torch.Tensor) -> torch.Tensor:
    """Doc §2 (MCAR eq. 6): min-max normalisation; a flat profile is divided by its maximum."""
    if profile.max() == profile.min():
        return profile / profile.max()
    return (profile - profile.min()) / (profile.max() - profile.min())


def interval_search_loop(score: torch.Tensor, threshold: float = 0.5) -> tuple[int, int]:
    """Doc §3 on one *normalised* 1-D profile, the released way: tensor ops on the profile, a Python
    loop over the candidate segments. Returns the half-open ``(start, end)``."""
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
        peak = float(score[start:end].max())
        if peak > best_peak or (peak == best_peak and end - start > best_width):
            best_peak, best_width, lo, hi = peak, end - start, start, end
    if hi - lo <= minsize:  # the three sequential minimum-size checks
        pad = minsize - (hi - lo)
        half = math.ceil(pad / 2.0)
        if lo > half and length - hi > pad:
            lo, hi = lo - half + 1, hi + half
        if lo < half:
            lo, hi = 0, minsize
        if length - hi < half:
            lo, hi = length - minsize + 1, length
    return lo, hi


def released_localize(
    cam_logits: torch.Tensor, global_scores: torch.Tensor, image_size: tuple[int, int], top_n: int,
    threshold: float = 0.5,
) -> torch.Tensor:
    """Boxes ``[B, top_n, 4]`` (x1, y1, x2, y2), half-open, the released way: every map upsampled,
    classes ranked by score (descending, ties to the lower index), Python loops."""
    height, width = image_size
    cams = F.interpolate(torch.sigmoid(cam_logits), size=(height, width), mode="bilinear", align_corners=True)
    x_profiles = F.max_pool2d(cams, (height, 1)).squeeze(2)  # [B, C, W]: max over rows
    y_profiles = F.max_pool2d(cams, (1, width)).squeeze(3)  # [B, C, H]: max over columns
    boxes = torch.zeros(cam_logits.shape[0], top_n, 4, dtype=torch.long)
    for b in range(cam_logits.shape[0]):
        order = global_scores[b].sort(descending=True, stable=True).indices
        for n in range(top_n):
            x1, x2 = interval_search_loop(normalise_profile(x_profiles[b, order[n]]), threshold)
            y1, y2 = interval_search_loop(normalise_profile(y_profiles[b, order[n]]), threshold)
            boxes[b, n] = torch.tensor([x1, y1, x2, y2])
    return boxes


def released_crop_resize(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The released code's crops: a zeroed ``[B, N, 3, H, W]`` batch, each region resized to the input
    size by its own ``F.interpolate`` (bilinear, ``align_corners=True``) and copied in."""
    batch, channels, height, width = images.shape
    local_inputs = images.new_zeros(batch, boxes.shape[1], channels, height, width)
    for b in range(batch):
        for n in range(boxes.shape[1]):
            x1, y1, x2, y2 = boxes[b, n].tolist()
            local_inputs[b, n] = F.interpolate(
                images[b : b + 1, :, y1:y2, x1:x2], size=(height, width), mode="bilinear", align_corners=True
            )[0]
    return local_inputs


def released_global_to_local(
    images: torch.Tensor, cam_logits: torch.Tensor, global_scores: torch.Tensor, top_n: int,
    threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole step: boxes ``[B, top_n, 4]`` and the local stream's inputs ``[B, top_n, 3, H, W]``
    (:func:`released_crop_resize`)."""
    boxes = released_localize(cam_logits, global_scores, tuple(images.shape[-2:]), top_n, threshold)
    return boxes, released_crop_resize(images, boxes)


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batch: torch.Tensor) -> nn.Module:
    """Set every backbone BatchNorm's running statistics to those of ``batch`` (one cumulative pass)
    and return the model in eval mode.

    A freshly initialised backbone in eval mode (running statistics 0 and 1) shrinks its features to
    ~1e-9 (mobilenet_v2), so every image scores the same and per-image bugs pass unseen; after this,
    random-weight outputs depend on the image.
    """
    norms = [m for m in model.features.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.features.train()
    model.features(batch)
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def stand_in_label_graph(name: str) -> dict[str, str]:
    """Options giving the model ``name`` seeded random stand-in word embeddings
    (``{"label_embeddings": "random"}``) when it takes word embeddings, else ``{}``: what a test of a
    label-graph model needs at a class count without a packaged graph (80 and 20 have one)."""
    from fastmlr import registry

    registry._import_models()
    if name not in registry._MODELS:
        raise ValueError(f"unknown model {name!r}")
    takes = "label_embeddings" in inspect.signature(registry._MODELS[name].__init__).parameters
    return {"label_embeddings": RANDOM_EMBEDDINGS} if takes else {}
