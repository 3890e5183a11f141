"""LCE — Modeling Label Correlations with Latent Context for Multi-Label Recognition (Chen et al.).

- Multi-level context feature fusion (eq. 1): the stride-8, -16 and -32 maps (ResNet: conv3, conv4,
  conv5 = 512, 1024, 2048 channels) with the first two bilinearly resized to the last one's size,
  concatenated: ``X_ml`` ``[B, D, h, w]`` (D = 3584 for ResNets, HW = 196 at 448).
- Latent context information embedding (eq. 2–3): learnable label queries ``L_eb`` ``[C, D]`` go
  through 3 decoder layers of [cross-attention (4 heads) on the HW tokens of ``X_ml`` + FFN
  (2048)], no self-attention, dropout 0.1 → ``L_ca``; ``ŷ_ca`` = per-class linear on ``L_ca``.
- Spatial class-aware features (eq. 4–5): 1×1 conv D→C, ``L_sp`` ``[B, C, HW]``; ``ŷ_sp`` = its GMP.
- Label correlation (eq. 6–8): tokens ``L = [L_ca : L_sp]`` (C tokens of width D + HW) through a
  3-layer Transformer encoder (4 heads, FFN 2048) → ``ŷ_co`` = per-class linear.
- Output (eq. 11): ``ŷ = ŷ_ca + ŷ_sp + ŷ_co``.
- Training only (eq. 9–10): 10 % of the C tokens are dropped, a learnable inference token is
  prepended, the shared encoder runs again and ``ŷ_infer = Linear(D + HW → C)`` of that token;
  loss ``1.0·BCE(ŷ) + 0.1·BCE(ŷ_infer)`` (eq. 12–13).

The widths depend on HW, so the model is tied to its image size (``fixed_size``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastmlr.backbones import multilevel_features
from fastmlr.graph import ClassWiseLinear
from fastmlr.losses import weighted_bce
from fastmlr.models.base import MLRModel
from fastmlr.registry import register_model

HEADS = 4
LAYERS = 3
FFN_DIM = 2048
DROPOUT = 0.1
#: α and β of eq. 13.
CLS_WEIGHT, INFER_WEIGHT = 1.0, 0.1


def sine_position_encoding(height: int, width: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised 2-D sine position encoding, ``[height·width, dim]`` (row-major positions).

    The first ``dim/2`` channels encode the row ``y``, the last ``dim/2`` the column ``x``; each
    coordinate ``(i + 1) / n · 2π`` is divided by ``temperature^(2⌊j/2⌋ / (dim/2))`` for channel
    ``j`` and goes through sin (even ``j``) and cos (odd ``j``), interleaved. ``dim`` must be a
    multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"sine position encoding needs a width that is a multiple of 4, got {dim}")
    half = dim // 2
    frequencies = temperature ** (2 * (torch.arange(half) // 2) / half)

    def encode(n: int) -> torch.Tensor:
        coords = torch.arange(1, n + 1, dtype=torch.float64) / n * 2 * math.pi
        angles = coords[:, None] / frequencies
        return torch.stack([angles[:, 0::2].sin(), angles[:, 1::2].cos()], dim=2).flatten(1)  # [n, half]

    rows, cols = encode(height), encode(width)
    grid = torch.cat([rows[:, None, :].expand(-1, width, -1), cols[None, :, :].expand(height, -1, -1)], dim=2)
    return grid.reshape(height * width, dim).float()


def kept_token_indices(batch: int, num_tokens: int, mask_ratio: float, device: torch.device) -> torch.Tensor:
    """``[batch, N]`` int64: per image, the ascending indices of the tokens left after masking
    ``round(mask_ratio · num_tokens)`` of them uniformly at random (``N = num_tokens − masked``)."""
    masked = int(mask_ratio * num_tokens + 0.5)
    order = torch.rand(batch, num_tokens, device=device).argsort(dim=1)
    return order[:, : num_tokens - masked].sort(dim=1).values


class LabelCrossAttentionLayer(nn.Module):
    """One layer of the latent context embedding module: post-norm cross-attention of the label
    queries to the feature tokens (keys carry the position encoding, values do not — DETR's
    convention) and an FFN, each with dropout and a residual; no self-attention."""

    def __init__(
        self, dim: int, heads: int = HEADS, ffn_dim: int = FFN_DIM, dropout: float = DROPOUT
    ) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """``queries [B, C, D]``, ``memory [B, HW, D]``, ``position [HW, D]`` → ``[B, C, D]``."""
        attended = self.attention(queries, memory + position, memory, need_weights=False)[0]
        queries = self.norm1(queries + self.dropout1(attended))
        return self.norm2(queries + self.dropout2(self.ffn(queries)))


def lce_loss(outputs: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor, reduction: str = "mean"):
    """Eq. 13: ``α·L_cls + β·L_infer`` with α = 1.0, β = 0.1, each a binary cross-entropy (eq. 12)
    of ``outputs = (logits ŷ, inference logits ŷ_infer)`` against 0/1 ``targets`` ``[B, C]``."""
    logits, infer_logits = outputs
    return weighted_bce([(CLS_WEIGHT, logits), (INFER_WEIGHT, infer_logits)], targets, reduction)


@register_model("lce")
class LCE(MLRModel):
    """LCE with option ``mask_ratio`` (share of label tokens dropped for the inference token, 0.1).

    Widths: ``D`` = sum of the backbone's three level widths (3584 for ResNets, 1408 for
    MobileNetV2), tokens ``D + HW`` with ``HW = (image_size / 32)²``; 4 heads must divide both.
    Eval: ``model(images) -> [B, C]`` probabilities (no masking, no inference token).
    Train: ``(logits, infer_logits)``, both ``[B, C]``, for :meth:`loss` (:func:`lce_loss`).
    """

    fixed_size = True
    onnx_min_opset = 14  # attention exports as scaled_dot_product_attention

    def __init__(self, *, mask_ratio: float = 0.1, **kw) -> None:
        super().__init__(**kw)
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.mask_ratio = float(mask_ratio)
        C, side = self.num_classes, self.feature_size
        D, HW = sum(self.spec.level_channels), side * side
        width = D + HW
        if D % HEADS or width % HEADS:
            raise ValueError(
                f"LCE needs {HEADS} heads to divide D = {D} and D + HW = {width} "
                f"(HW = {HW} at image_size {self.image_size}); choose an image_size giving an even map side"
            )
        self.embed_dim, self.token_dim = D, width
        self.register_buffer("position", sine_position_encoding(side, side, D), persistent=False)
        self.label_queries = nn.Parameter(torch.randn(C, D) * 0.02)  # L_eb
        self.decoder = nn.ModuleList(LabelCrossAttentionLayer(D) for _ in range(LAYERS))
        self.ca_classifier = ClassWiseLinear(C, D)
        self.spatial = nn.Conv2d(D, C, kernel_size=1)
        encoder_layer = nn.TransformerEncoderLayer(width, HEADS, FFN_DIM, DROPOUT, batch_first=True)
        self.encoder = nn.TransformerEncoder(encoder_layer, LAYERS, enable_nested_tensor=False)
        self.co_classifier = ClassWiseLinear(C, width)
        self.infer_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)  # L_infer
        self.infer_classifier = nn.Linear(width, C)

    def fused_features(self, images: torch.Tensor) -> torch.Tensor:
        """Eq. 1: ``X_ml = [f_ds(X3) : f_ds(X4) : X5]``, ``[B, D, h, w]`` (bilinear resizing)."""
        x3, x4, x5 = multilevel_features(self.features, self.spec, images)
        size = x5.shape[-2:]
        resized = [F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in (x3, x4)]
        return torch.cat([*resized, x5], dim=1)

    def label_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images -> (L [B, C, D + HW], ŷ_ca + ŷ_sp [B, C])`` (eq. 1–6)."""
        fused = self.fused_features(images)
        memory = fused.flatten(2).transpose(1, 2)  # [B, HW, D]
        context = self.label_queries.expand(images.shape[0], -1, -1)
        for layer in self.decoder:
            context = layer(context, memory, self.position)  # eq. 2: L_ca
        spatial = self.spatial(fused).flatten(2)  # eq. 4: L_sp [B, C, HW]
        partial_logits = self.ca_classifier(context) + spatial.amax(dim=2)  # eq. 3 + eq. 5
        return torch.cat([context, spatial], dim=2), partial_logits  # eq. 6

    def infer_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Eq. 9–10: mask ``mask_ratio`` of the tokens, prepend ``L_infer``, encode, score it: ``[B, C]``."""
        kept = kept_token_indices(tokens.shape[0], tokens.shape[1], self.mask_ratio, tokens.device)
        masked = tokens.gather(1, kept[:, :, None].expand(-1, -1, tokens.shape[2]))
        sequence = torch.cat([self.infer_token.expand(tokens.shape[0], -1, -1), masked], dim=1)
        return self.infer_classifier(self.encoder(sequence)[:, 0])

    def forward(self, images: torch.Tensor):
        """Eval: ``[B, C]`` probabilities. Train: ``(logits, infer_logits)``."""
        self.check_input(images)
        tokens, partial_logits = self.label_tokens(images)
        logits = partial_logits + self.co_classifier(self.encoder(tokens))  # eq. 7, 8, 11
        if not self.training:
            return torch.sigmoid(logits)
        return logits, self.infer_logits(tokens)

    @staticmethod
    def loss(outputs: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor, reduction: str = "mean"):
        """:func:`lce_loss`."""
        return lce_loss(outputs, targets, reduction)
