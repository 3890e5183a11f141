"""Per-category attention over a conv feature map, without materialising ``B x C x HW x D``.

SRDL's CAR module (000_*.txt, Eqs. 4-6) and SSGRL's semantic decoupling compute, for every class
``c``, an attention over the ``HW`` positions of the feature map and pool with it. Written with
broadcasting, each of these materialises a ``B x C x HW x D`` tensor (128 MB per 448 image at
C = 80, HW = 196, D = 2048). The ops here never do:

- :func:`tanh_attention_scores` — ``s[b,c,p] = sum_k w[k] * tanh(P[b,p,k] * Q[c,k]) + bias``
  (SRDL Eq. 5 before the sigmoid; SSGRL's attention logits);
- :func:`srdl_max_pool` — ``f[b,c,k] = max_p 0.5 * F[b,p,k] * (SA[b,c,p] + CA[b,c,k])``
  (SRDL Eq. 6 followed by its GMP);
- :func:`softmax_attention_pool` — ``f[b,c,k] = sum_p softmax_p(s)[b,c,p] * F[b,p,k]`` (SSGRL).

Layouts: features ``[B, HW, D]`` (positions x channels), class embeddings ``[C, D]``.

Backends (``backend="auto" | "torch" | "triton"``, resolved by
:func:`fastmlr.kernels.resolve_backend`):

- ``"triton"``: one tiled kernel per op (CUDA, or CPU under ``TRITON_INTERPRET=1``), in
  :mod:`._attention_triton`;
- ``"torch"``: for the scores and the max pool, a chunked path that loops over blocks of
  (batch, class) so that its largest transient is at most ``max_chunk_bytes`` (default
  :data:`DEFAULT_CHUNK_BYTES`) — CPU users get the memory win too; for the softmax pool,
  ``softmax(s) @ F``, which never needs a ``[B, C, HW, D]`` tensor in the first place.

While an exporter traces (``torch.jit`` / ``torch.onnx.export`` / ``torch.export`` / ``torch.compile``:
:func:`~fastmlr.kernels._utils.is_exporting`), every op runs plain out-of-place torch outside
any ``torch.autograd.Function``, whatever the backend: the scores and the max pool the chunked path's
arithmetic on the whole batch in one block, the softmax pool its torch path. The chunked path's
in-place block writes would be dropped by the ONNX exporter (the op would become a constant) and its
block loop unrolled at the traced batch; the plain form traces into a graph whose batch axis can stay
symbolic. The scores and the max pool then form ``[B, C, HW, D]`` (as a graph of the naive formula
would): the exported graph trades the memory bound for ops every exporter and TensorRT read.

Every op trains (gradients match the references'), memory bounded the same way:
``tanh_attention_scores``'s backward recomputes ``tanh(P * Q)`` block by block in torch;
``srdl_max_pool`` keeps the arg-max positions (``[B, C, D]``, only when a gradient is needed) and
its backward gathers/scatters through them; the Triton softmax pool's backward recomputes the
softmax in torch (``[B, C, HW]``). The ``*_reference`` functions are the naive broadcast forms:
the test oracle and the benchmark's "naive" baseline.
"""

from __future__ import annotations

import torch

from ._attention_triton import softmax_attention_pool_triton, srdl_max_pool_triton, tanh_attention_scores_triton
from ._dispatch import resolve_backend
from ._utils import check_same_device_dtype, check_tensor, is_exporting

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "softmax_attention_pool",
    "softmax_attention_pool_reference",
    "srdl_max_pool",
    "srdl_max_pool_reference",
    "tanh_attention_scores",
    "tanh_attention_scores_reference",
]

#: Transient budget of the chunked torch paths (bytes of the largest per-chunk tensor).
DEFAULT_CHUNK_BYTES = 32 * 2**20


# ---------------------------------------------------------------------------------------------
# Chunking (shared by every op here)
# ---------------------------------------------------------------------------------------------


def check_chunk_bytes(op: str, max_chunk_bytes: int) -> None:
    """Raise ``ValueError`` unless ``max_chunk_bytes`` is a positive integer."""
    if isinstance(max_chunk_bytes, bool) or not isinstance(max_chunk_bytes, int) or max_chunk_bytes < 1:
        raise ValueError(f"{op}: max_chunk_bytes must be a positive integer, got {max_chunk_bytes!r}")


def pair_blocks(batch: int, classes: int, pair_bytes: int, max_chunk_bytes: int) -> list[tuple[slice, slice]]:
    """(batch slice, class slice) blocks covering ``batch x classes`` pairs, row-major.

    A block holds as many (b, c) pairs as fit in ``max_chunk_bytes`` when each pair costs
    ``pair_bytes`` (at least one pair): whole class rows for several images when they fit, else part
    of one image's classes.
    """
    pairs = max(1, max_chunk_bytes // max(1, pair_bytes))
    if pairs >= classes:
        batch_step, class_step = min(batch, pairs // classes), classes
    else:
        batch_step, class_step = 1, pairs
    return [
        (slice(b0, min(b0 + batch_step, batch)), slice(c0, min(c0 + class_step, classes)))
        for b0 in range(0, batch, batch_step)
        for c0 in range(0, classes, class_step)
    ]


def _bias_tensor(bias: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``bias`` as a one-element tensor on ``like``'s device and dtype (a float becomes a constant)."""
    if isinstance(bias, torch.Tensor):
        if bias.numel() != 1:
            raise ValueError(f"tanh_attention_scores: b must be a float or a one-element tensor, got "
                             f"shape {list(bias.shape)}")
        return bias
    if isinstance(bias, bool) or not isinstance(bias, (int, float)):
        raise ValueError(f"tanh_attention_scores: b must be a float or a one-element tensor, got "
                         f"{type(bias).__name__}")
    return torch.tensor(float(bias), device=like.device, dtype=like.dtype)


# ---------------------------------------------------------------------------------------------
# tanh attention scores: s[b,c,p] = sum_k w[k] tanh(P[b,p,k] Q[c,k]) + bias
# ---------------------------------------------------------------------------------------------


def tanh_attention_scores_reference(
    P: torch.Tensor, Q: torch.Tensor, w: torch.Tensor, b: torch.Tensor | float
) -> torch.Tensor:
    """Naive broadcast form of :func:`tanh_attention_scores` (materialises ``[B, C, HW, D]``)."""
    return (torch.tanh(P[:, None, :, :] * Q[None, :, None, :]) * w).sum(-1) + b


def _tanh_scores_chunked(
    P: torch.Tensor, Q: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, max_chunk_bytes: int
) -> torch.Tensor:
    """Forward of the scores, one (batch, class) block of ``tanh(P * Q)`` at a time."""
    B, HW, D = P.shape
    C = Q.shape[0]
    out = torch.empty(B, C, HW, device=P.device, dtype=P.dtype)
    for bs, cs in pair_blocks(B, C, HW * D * P.element_size(), max_chunk_bytes):
        # the [bb, cc, HW, D] block is a temporary: freed before the next block is allocated
        out[bs, cs] = torch.matmul(torch.mul(P[bs, None, :, :], Q[None, cs, None, :]).tanh_(), w)
    return out.add_(bias)


def _tanh_scores_backward_chunked(
    grad: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, w: torch.Tensor, max_chunk_bytes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sum(grad * s)`` w.r.t. ``P``, ``Q``, ``w``, recomputing ``tanh(P * Q)`` per block.

    With ``t = tanh(P[b,p,k] Q[c,k])`` and ``u = grad[b,c,p] * w[k] * (1 - t^2)``:
    ``dP[b,p,k] = sum_c u Q[c,k]``, ``dQ[c,k] = sum_{b,p} u P[b,p,k]``, ``dw[k] = sum_{b,c,p} grad t``.
    Two block-sized tensors live at once, so blocks take half the budget.
    """
    B, HW, D = P.shape
    C = Q.shape[0]
    dP, dQ, dw = torch.zeros_like(P), torch.zeros_like(Q), torch.zeros_like(w)
    for bs, cs in pair_blocks(B, C, HW * D * P.element_size(), max(1, max_chunk_bytes // 2)):
        g = grad[bs, cs]  # [bb, cc, HW]
        t = torch.mul(P[bs, None, :, :], Q[None, cs, None, :]).tanh_()  # [bb, cc, HW, D]
        dw += torch.matmul(g.reshape(1, -1), t.reshape(-1, D))[0]
        u = t.square_().neg_().add_(1).mul_(w).mul_(g[..., None])
        dP[bs] += (u * Q[None, cs, None, :]).sum(1)
        dQ[cs] += u.mul_(P[bs, None, :, :]).sum((0, 2))
        del t, u  # free this block before the next one is allocated
    return dP, dQ, dw


def _tanh_scores_traceable(P: torch.Tensor, Q: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The scores as plain out-of-place ops on the whole batch (the chunked path's arithmetic in one
    block), for exporters."""
    return torch.matmul(torch.tanh(P[:, None, :, :] * Q[None, :, None, :]), w) + bias.reshape(())


class _TanhAttentionScores(torch.autograd.Function):
    """Forward by the chosen backend; backward by the chunked recompute."""

    @staticmethod
    def forward(ctx, P, Q, w, bias, backend: str, max_chunk_bytes: int):  # noqa: ANN001
        ctx.save_for_backward(P, Q, w)
        ctx.bias_shape = bias.shape
        ctx.max_chunk_bytes = max_chunk_bytes
        bias = bias.reshape(())
        if backend == "triton":
            return tanh_attention_scores_triton(P, Q, w, bias)
        return _tanh_scores_chunked(P, Q, w, bias, max_chunk_bytes)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        P, Q, w = ctx.saved_tensors
        dP, dQ, dw = _tanh_scores_backward_chunked(grad.contiguous(), P, Q, w, ctx.max_chunk_bytes)
        dbias = grad.sum().reshape(ctx.bias_shape) if ctx.needs_input_grad[3] else None
        return dP, dQ, dw, dbias, None, None


def tanh_attention_scores(
    P: torch.Tensor,
    Q: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | float,
    *,
    backend: str = "auto",
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Per-class tanh attention logits ``s[b,c,p] = sum_k w[k] * tanh(P[b,p,k] * Q[c,k]) + b``.

    SRDL Eq. (5) inside the sigmoid, with ``P = f_sa(F)``, ``Q = f_w(x_c)`` and ``(w, b) = f_s``;
    SSGRL's attention logits with ``P = f_1(F)``, ``Q = f_2(x_c)``, ``(w, b) = f_a``.

    Args:
        P: ``[B, HW, D]`` projected features.
        Q: ``[C, D]`` projected class embeddings.
        w: ``[D]`` weight of the scoring layer (``nn.Linear(D, 1).weight[0]``).
        b: its bias — a float or a one-element tensor (which then gets a gradient).
        backend: ``"auto" | "torch" | "triton"``.
        max_chunk_bytes: transient budget of the chunked torch path and of every backward.

    Returns:
        ``[B, C, HW]`` scores in ``P``'s dtype. Never forms ``[B, C, HW, D]`` as a whole.
    """
    op = "tanh_attention_scores"
    check_tensor(op, "P", P, (None, None, None))
    D = P.shape[2]
    check_tensor(op, "Q", Q, (None, D))
    check_tensor(op, "w", w, (D,))
    check_chunk_bytes(op, max_chunk_bytes)
    bias = _bias_tensor(b, P)
    check_same_device_dtype(op, P=P, Q=Q, w=w, b=bias)
    if is_exporting():
        return _tanh_scores_traceable(P, Q, w, bias)
    chosen = resolve_backend(op, backend, P, Q, w)
    return _TanhAttentionScores.apply(
        P.contiguous(), Q.contiguous(), w.contiguous(), bias, chosen, max_chunk_bytes
    )


# ---------------------------------------------------------------------------------------------
# SRDL max pool: f[b,c,k] = max_p 0.5 F[b,p,k] (SA[b,c,p] + CA[b,c,k])
# ---------------------------------------------------------------------------------------------


def srdl_max_pool_reference(F: torch.Tensor, SA: torch.Tensor, CA: torch.Tensor) -> torch.Tensor:
    """Naive broadcast form of :func:`srdl_max_pool` (materialises ``[B, C, HW, D]``)."""
    weighted = 0.5 * F[:, None, :, :] * SA[..., None] + 0.5 * F[:, None, :, :] * CA[:, :, None, :]
    return weighted.amax(2)


def _srdl_max_chunked(
    F: torch.Tensor, SA: torch.Tensor, CA: torch.Tensor, max_chunk_bytes: int, with_argmax: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pooled features and, when ``with_argmax``, the position of each maximum (``[B, C, D]`` int64).

    Works block by block. ``0.5 * max_p x = max_p 0.5 * x`` exactly (scaling by 0.5 is exact in
    floating point), so the half is applied after the max.
    """
    B, HW, D = F.shape
    C = SA.shape[1]
    out = torch.empty(B, C, D, device=F.device, dtype=F.dtype)
    argmax = torch.empty(B, C, D, device=F.device, dtype=torch.long) if with_argmax else None
    for bs, cs in pair_blocks(B, C, HW * D * F.element_size(), max_chunk_bytes):
        weighted = torch.add(SA[bs, cs, :, None], CA[bs, cs, None, :]).mul_(F[bs, None, :, :])
        if with_argmax:
            torch.max(weighted, dim=2, out=(out[bs, cs], argmax[bs, cs]))
        else:
            out[bs, cs] = weighted.amax(2)
        del weighted  # free this block before the next one is allocated
    return out.mul_(0.5), argmax


def _srdl_max_traceable(F: torch.Tensor, SA: torch.Tensor, CA: torch.Tensor) -> torch.Tensor:
    """The pooled features as plain out-of-place ops on the whole batch (the chunked path's arithmetic
    in one block), for exporters."""
    return torch.add(SA[:, :, :, None], CA[:, :, None, :]).mul(F[:, None, :, :]).amax(2).mul(0.5)


def _srdl_max_backward(
    grad: torch.Tensor, F: torch.Tensor, SA: torch.Tensor, CA: torch.Tensor, argmax: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients through the maxima: each ``f[b,c,k]`` depends only on position ``argmax[b,c,k]``.

    With ``p* = argmax[b,c,k]``: ``dF[b,p*,k] += 0.5 g (SA[b,c,p*] + CA[b,c,k])``,
    ``dSA[b,c,p*] += 0.5 g F[b,p*,k]``, ``dCA[b,c,k] = 0.5 g F[b,p*,k]``. Everything is ``[B, C, D]``.
    """
    B, HW, D = F.shape
    C = SA.shape[1]
    half_grad = 0.5 * grad
    F_at_max = F[:, None, :, :].expand(B, C, HW, D).gather(2, argmax[:, :, None, :])[:, :, 0, :]
    SA_at_max = SA.gather(2, argmax)
    dCA = half_grad * F_at_max
    dSA = torch.zeros_like(SA).scatter_add_(2, argmax, dCA)
    dF = torch.zeros_like(F).scatter_add_(1, argmax, half_grad * (SA_at_max + CA))
    return dF, dSA, dCA


class _SrdlMaxPool(torch.autograd.Function):
    """Forward by the chosen backend, keeping the arg-max when a gradient will be needed; backward by
    gather/scatter through it."""

    @staticmethod
    def forward(ctx, F, SA, CA, backend: str, max_chunk_bytes: int, with_argmax: bool):  # noqa: ANN001
        if backend == "triton":
            out, argmax = srdl_max_pool_triton(F, SA, CA, with_argmax)
        else:
            out, argmax = _srdl_max_chunked(F, SA, CA, max_chunk_bytes, with_argmax)
        ctx.save_for_backward(F, SA, CA, argmax)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        F, SA, CA, argmax = ctx.saved_tensors
        dF, dSA, dCA = _srdl_max_backward(grad.contiguous(), F, SA, CA, argmax.long())
        return dF, dSA, dCA, None, None, None


def srdl_max_pool(
    F: torch.Tensor,
    SA: torch.Tensor,
    CA: torch.Tensor,
    *,
    backend: str = "auto",
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """SRDL's category-specific features ``f[b,c,k] = max_p 0.5 * F[b,p,k] * (SA[b,c,p] + CA[b,c,k])``.

    SRDL Eq. (6), ``F_c = 0.5 F (.) SA_c + 0.5 F (.) CA_c``, followed by its global max pooling over
    positions. Gradients flow to one maximal position per ``(b, c, k)`` (``torch.max`` semantics; the
    naive ``amax`` splits ties evenly instead — the two agree wherever the maximum is unique).

    Args:
        F: ``[B, HW, D]`` feature map.
        SA: ``[B, C, HW]`` spatial attention (after the sigmoid).
        CA: ``[B, C, D]`` channel attention (after the sigmoid).
        backend: ``"auto" | "torch" | "triton"``.
        max_chunk_bytes: transient budget of the chunked torch path.

    Returns:
        ``[B, C, D]`` in ``F``'s dtype.
    """
    op = "srdl_max_pool"
    check_tensor(op, "F", F, (None, None, None))
    B, HW, D = F.shape
    check_tensor(op, "SA", SA, (B, None, HW))
    check_tensor(op, "CA", CA, (B, SA.shape[1], D))
    check_chunk_bytes(op, max_chunk_bytes)
    check_same_device_dtype(op, F=F, SA=SA, CA=CA)
    if is_exporting():
        return _srdl_max_traceable(F, SA, CA)
    chosen = resolve_backend(op, backend, F, SA, CA)
    with_argmax = torch.is_grad_enabled() and any(t.requires_grad for t in (F, SA, CA))
    return _SrdlMaxPool.apply(
        F.contiguous(), SA.contiguous(), CA.contiguous(), chosen, max_chunk_bytes, with_argmax
    )


# ---------------------------------------------------------------------------------------------
# softmax attention pool: f[b,c,k] = sum_p softmax_p(s)[b,c,p] F[b,p,k]
# ---------------------------------------------------------------------------------------------


def softmax_attention_pool_reference(F: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Naive broadcast form of :func:`softmax_attention_pool` (materialises ``[B, C, HW, D]``)."""
    return (torch.softmax(s, dim=-1)[..., None] * F[:, None, :, :]).sum(2)


def _softmax_pool_torch(F: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``softmax(s) @ F``: the pooling is a batched matmul, so no ``[B, C, HW, D]`` ever exists."""
    return torch.matmul(torch.softmax(s, dim=-1), F)


class _SoftmaxAttentionPoolTriton(torch.autograd.Function):
    """Fused online-softmax pooling forward; backward recomputes the softmax in torch."""

    @staticmethod
    def forward(ctx, F, s):  # noqa: ANN001
        ctx.save_for_backward(F, s)
        return softmax_attention_pool_triton(F, s)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        # a = softmax(s); f = a F  =>  dF = a^T g, da = g F^T, ds = a (da - sum_p a da).
        F, s = ctx.saved_tensors
        attention = torch.softmax(s, dim=-1)
        dF = torch.matmul(attention.transpose(1, 2), grad)
        d_attention = torch.matmul(grad, F.transpose(1, 2))
        ds = attention * (d_attention - (attention * d_attention).sum(-1, keepdim=True))
        return dF, ds


def softmax_attention_pool(F: torch.Tensor, s: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """SSGRL's semantic decoupling pool ``f[b,c,k] = sum_p softmax_p(s)[b,c,p] * F[b,p,k]``.

    The torch path is ``softmax(s) @ F`` (autograd differentiates it; its largest tensor is
    ``[B, C, max(HW, D)]``, so it needs no chunking); the Triton path fuses the softmax into the
    matmul with an online (running max) softmax, never writing the attention weights.

    Args:
        F: ``[B, HW, D]`` feature map.
        s: ``[B, C, HW]`` attention logits (e.g. :func:`tanh_attention_scores`).
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        ``[B, C, D]`` in ``F``'s dtype.
    """
    op = "softmax_attention_pool"
    check_tensor(op, "F", F, (None, None, None))
    B, HW, _ = F.shape
    check_tensor(op, "s", s, (B, None, HW))
    check_same_device_dtype(op, F=F, s=s)
    if not is_exporting() and resolve_backend(op, backend, F, s) == "triton":
        return _SoftmaxAttentionPoolTriton.apply(F.contiguous(), s.contiguous())
    return _softmax_pool_torch(F, s)
