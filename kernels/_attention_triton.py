"""Triton kernels of the per-category attention ops (:mod:`.category_attention`, :mod:`.lift_attention`).

Defined at import, like every kernel in :mod:`fastmlr.kernels` (``@triton.jit`` picks compiled or
interpreted execution from ``TRITON_INTERPRET`` as it decorates, so set that variable before
importing :mod:`fastmlr.kernels`). The launch wrappers take validated, contiguous tensors (the public
functions check them) and accumulate in fp32 whatever the input dtype.

Every kernel tiles the output and reduces over the remaining axis in registers, so the
``[B, C, HW, D]`` product behind each op exists only one ``BLOCK x BLOCK (x BLOCK)`` tile at a time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    """``tanh(x) = sign(x) (1 - e) / (1 + e)`` with ``e = exp(-2|x|)`` (no overflow for any ``x``)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _tanh_scores_kernel(
    P, Q, W, BIAS, OUT, C, HW, D,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``OUT[b, c, p] = sum_k W[k] tanh(P[b, p, k] Q[c, k]) + BIAS`` for one (c, p) tile of image b.

    The ``[BLOCK_C, BLOCK_P, BLOCK_K]`` slab of ``tanh(P Q)`` lives in registers; ``k`` is looped over.
    """
    pid_p, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p, mask_c = offs_p < HW, offs_c < C
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        p_tile = tl.load(P + b * HW * D + offs_p[:, None] * D + offs_k[None, :],
                         mask=mask_p[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        q_tile = tl.load(Q + offs_c[:, None] * D + offs_k[None, :],
                         mask=mask_c[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        w = tl.load(W + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        t = _tanh(q_tile[:, None, :] * p_tile[None, :, :])  # [BLOCK_C, BLOCK_P, BLOCK_K]
        acc += tl.sum(t * w[None, None, :], axis=2)
    acc += tl.load(BIAS).to(tl.float32)
    out_ptrs = OUT + b * C * HW + offs_c[:, None] * HW + offs_p[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


def tanh_attention_scores_triton(
    P: torch.Tensor, Q: torch.Tensor, w: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Launch :func:`_tanh_scores_kernel`: ``P [B, HW, D]``, ``Q [C, D]``, ``w [D]``, ``bias []``
    -> ``[B, C, HW]``."""
    B, HW, D = P.shape
    C = Q.shape[0]
    out = torch.empty(B, C, HW, device=P.device, dtype=P.dtype)
    block_c, block_p, block_k = 16, 16, 32
    grid = (triton.cdiv(HW, block_p), triton.cdiv(C, block_c), B)
    _tanh_scores_kernel[grid](P, Q, w, bias.contiguous(), out, C, HW, D,
                              BLOCK_C=block_c, BLOCK_P=block_p, BLOCK_K=block_k)
    return out


@triton.jit
def _srdl_max_kernel(
    F, SA, CA, OUT, ARGMAX, C, HW, D,
    WITH_ARGMAX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``OUT[b, c, k] = 0.5 max_p F[b, p, k] (SA[b, c, p] + CA[b, c, k])`` and the first maximal ``p``.

    One (c, k) tile of image b; positions are looped over, one ``F`` row and ``SA`` column at a time.
    """
    pid_k, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_k, mask_c = offs_k < D, offs_c < C
    mask = mask_c[:, None] & mask_k[None, :]
    ca = tl.load(CA + b * C * D + offs_c[:, None] * D + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    best = tl.full((BLOCK_C, BLOCK_K), float("-inf"), dtype=tl.float32)
    best_p = tl.zeros((BLOCK_C, BLOCK_K), dtype=tl.int32)
    for p in range(0, HW):
        f_row = tl.load(F + b * HW * D + p * D + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        sa_col = tl.load(SA + b * C * HW + offs_c * HW + p, mask=mask_c, other=0.0).to(tl.float32)
        value = f_row[None, :] * (sa_col[:, None] + ca)
        better = value > best
        best = tl.where(better, value, best)
        best_p = tl.where(better, p, best_p)
    tl.store(OUT + b * C * D + offs_c[:, None] * D + offs_k[None, :],
             (0.5 * best).to(OUT.dtype.element_ty), mask=mask)
    if WITH_ARGMAX:
        tl.store(ARGMAX + b * C * D + offs_c[:, None] * D + offs_k[None, :], best_p, mask=mask)


def srdl_max_pool_triton(
    F: torch.Tensor, SA: torch.Tensor, CA: torch.Tensor, with_argmax: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch :func:`_srdl_max_kernel`: ``F [B, HW, D]``, ``SA [B, C, HW]``, ``CA [B, C, D]`` ->
    (``[B, C, D]`` pooled, ``[B, C, D]`` int32 arg-max positions when ``with_argmax`` else ``None``)."""
    B, HW, D = F.shape
    C = SA.shape[1]
    out = torch.empty(B, C, D, device=F.device, dtype=F.dtype)
    # without the arg-max, `out` stands in for the never-written ARGMAX pointer
    argmax = torch.empty(B, C, D, device=F.device, dtype=torch.int32) if with_argmax else out
    block_c, block_k = 16, 64
    grid = (triton.cdiv(D, block_k), triton.cdiv(C, block_c), B)
    _srdl_max_kernel[grid](F, SA, CA, out, argmax, C, HW, D, WITH_ARGMAX=with_argmax,
                           BLOCK_C=block_c, BLOCK_K=block_k)
    return out, argmax if with_argmax else None


@triton.jit
def _softmax_pool_kernel(
    F, S, OUT, C, HW, D,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``OUT[b, c, k] = sum_p softmax_p(S[b, c, :])[p] F[b, p, k]`` for one (c, k) tile of image b.

    Online softmax: a running row max ``m`` and normaliser ``l`` rescale the accumulator as each
    block of positions arrives, so the attention weights are never written.
    """
    pid_c, pid_k, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_c, mask_k = offs_c < C, offs_k < D
    m = tl.full((BLOCK_C,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_C, BLOCK_K), dtype=tl.float32)
    for p0 in range(0, HW, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < HW
        s = tl.load(S + b * C * HW + offs_c[:, None] * HW + offs_p[None, :],
                    mask=mask_c[:, None] & mask_p[None, :], other=float("-inf")).to(tl.float32)
        s = tl.where(mask_c[:, None], s, 0.0)  # rows past C: finite, never stored
        f_tile = tl.load(F + b * HW * D + offs_p[:, None] * D + offs_k[None, :],
                         mask=mask_p[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        rescale = tl.exp(m - m_new)
        weights = tl.exp(s - m_new[:, None])
        l = l * rescale + tl.sum(weights, axis=1)
        acc = acc * rescale[:, None] + tl.dot(weights, f_tile, input_precision="ieee")
        m = m_new
    out = acc / l[:, None]
    tl.store(OUT + b * C * D + offs_c[:, None] * D + offs_k[None, :], out.to(OUT.dtype.element_ty),
             mask=mask_c[:, None] & mask_k[None, :])


def softmax_attention_pool_triton(F: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Launch :func:`_softmax_pool_kernel`: ``F [B, HW, D]``, ``s [B, C, HW]`` -> ``[B, C, D]``."""
    B, HW, D = F.shape
    C = s.shape[1]
    out = torch.empty(B, C, D, device=F.device, dtype=F.dtype)
    block_c, block_p, block_k = 16, 32, 64
    grid = (triton.cdiv(C, block_c), triton.cdiv(D, block_k), B)
    _softmax_pool_kernel[grid](F, s, out, C, HW, D, BLOCK_C=block_c, BLOCK_P=block_p, BLOCK_K=block_k)
    return out


@triton.jit
def _lift_stats_kernel(
    L, F, AVG, MAX, ARGMAX, C, HW, D, stride_lb,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Mean, max and first arg-max over ``p`` of ``A[b, c, p] = sum_k L[b, c, k] F[b, p, k]``.

    One block of classes of image b; each ``[BLOCK_C, BLOCK_P]`` tile of ``A`` is built by a
    ``k``-looped matmul in registers and folded into the running sum and max, never stored.
    ``stride_lb`` is 0 when one ``L`` serves the whole batch.
    """
    pid_c, b = tl.program_id(0), tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    best = tl.full((BLOCK_C,), float("-inf"), dtype=tl.float32)
    best_p = tl.zeros((BLOCK_C,), dtype=tl.int32)
    for p0 in range(0, HW, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < HW
        a = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < D
            l_tile = tl.load(L + b * stride_lb + offs_c[:, None] * D + offs_k[None, :],
                             mask=mask_c[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            f_tile = tl.load(F + b * HW * D + offs_p[None, :] * D + offs_k[:, None],
                             mask=mask_k[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
            a += tl.dot(l_tile, f_tile, input_precision="ieee")  # [BLOCK_C, BLOCK_P]
        total += tl.sum(a, axis=1)  # masked positions hold 0
        a = tl.where(mask_p[None, :], a, float("-inf"))
        tile_best = tl.max(a, axis=1)
        # first position attaining the tile's max (HW + BLOCK_P is larger than any real position)
        tile_best_p = tl.min(tl.where(a == tile_best[:, None], offs_p[None, :], HW + BLOCK_P), axis=1)
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_p = tl.where(better, tile_best_p, best_p)
    tl.store(AVG + b * C + offs_c, (total / HW).to(AVG.dtype.element_ty), mask=mask_c)
    tl.store(MAX + b * C + offs_c, best.to(MAX.dtype.element_ty), mask=mask_c)
    tl.store(ARGMAX + b * C + offs_c, best_p, mask=mask_c)


def lift_stats_triton(L: torch.Tensor, F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch :func:`_lift_stats_kernel`: ``L [B or 1, C, D]``, ``F [B, HW, D]`` -> mean, max (``[B, C]``)
    and int32 arg-max (``[B, C]``) over positions of ``A = L F^T``."""
    B, HW, D = F.shape
    C = L.shape[1]
    avg = torch.empty(B, C, device=F.device, dtype=F.dtype)
    mx = torch.empty(B, C, device=F.device, dtype=F.dtype)
    argmax = torch.empty(B, C, device=F.device, dtype=torch.int32)
    block_c, block_p, block_k = 16, 32, 64
    stride_lb = 0 if L.shape[0] == 1 else C * D
    grid = (triton.cdiv(C, block_c), B)
    _lift_stats_kernel[grid](L, F, avg, mx, argmax, C, HW, D, stride_lb,
                             BLOCK_C=block_c, BLOCK_P=block_p, BLOCK_K=block_k)
    return avg, mx, argmax
