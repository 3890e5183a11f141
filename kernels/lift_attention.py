"""Deep-LIFT's LIFT pooling (003_*.txt, Eqs. 5-7) in one pass over the LIFT map.

The head of Deep-LIFT computes the LIFT map ``A = L F`` (Eq. 5, ``[C, HW]`` per image) and pools it by
average and max over the positions. The paper weighs the label channels first with the channel
attention of its CAM, ``M = sigmoid(MLP(avg_p A) + MLP(max_p A))`` (Eq. 6; ``MLP`` = Linear(C -> hidden)
-> ReLU -> Linear(hidden -> C), shared by both poolings), pooling the attention LIFT map
``A_att = M (.) A`` (Eq. 7). The authors' released network leaves the channel attention out (its
forward has it commented out), and so does :class:`fastmlr.models.deeplift.DeepLIFT`: the CAM is
optional here (the MLP weights ``None``: ``M = 1``).

Since ``M`` is a sigmoid, ``M > 0`` (or underflows to exactly 0), so ``max_p (M_c A[c,p]) = M_c max_p
A[c,p]``; the mean is linear, so ``avg_p (M_c A[c,p]) = M_c avg_p A[c,p]``. The per-class average and
maximum of ``A`` are therefore all the head needs: they feed the CAM *and*, scaled by ``M``, are the
output. ``A_att`` is never formed, and one pass over ``A`` gives everything, with or without the CAM.

The paper gives the MLP as "multi-layer perceptron with one hidden layer" (CAM, its ref. [26] =
CBAM) without saying whether its layers have biases; ``b1``/``b2`` may be tensors or ``None``
(bias-free, CBAM's Eq. 2 as printed). ``docs/models.md`` fixes the hidden width at ``C / 4``.

Backends: ``"torch"`` forms ``A`` with one matmul (``[B, C, HW]``, small: no chunking needed) and
pools it; ``"triton"`` computes the pooled statistics in a kernel that tiles ``A = L F^T`` in
registers and reduces it on the fly, never writing ``A``. Its backward recomputes in torch. While an
exporter traces (:func:`~fastmlr.kernels._utils.is_exporting`) the torch path runs whatever
the backend: its plain ops trace, the Triton kernel's ``torch.autograd.Function`` does not.
"""

from __future__ import annotations

import torch

from ._attention_triton import lift_stats_triton
from ._dispatch import resolve_backend
from ._utils import check_same_device_dtype, check_tensor, is_exporting

__all__ = ["lift_attention_pool", "lift_attention_pool_reference"]


def _cam_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None) -> torch.Tensor:
    """The CAM's shared MLP: ``Linear(C -> hidden) -> ReLU -> Linear(hidden -> C)`` on ``[B, C]``."""
    return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w1, b1)), w2, b2)


def _channel_attention(avg: torch.Tensor, mx: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
                       w2: torch.Tensor, b2: torch.Tensor | None) -> torch.Tensor:
    """Deep-LIFT Eq. (6): ``M = sigmoid(MLP(A_avg) + MLP(A_max))``, ``[B, C]``."""
    return torch.sigmoid(_cam_mlp(avg, w1, b1, w2, b2) + _cam_mlp(mx, w1, b1, w2, b2))


def lift_attention_pool_reference(
    L: torch.Tensor, F: torch.Tensor, w1: torch.Tensor | None = None, b1: torch.Tensor | None = None,
    w2: torch.Tensor | None = None, b2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eqs. (5)-(7) as written: form ``A``, ``M`` and ``A_att = M (.) A``, then pool ``A_att``
    (without the CAM, ``w1 = w2 = None``, pool ``A``)."""
    A = torch.matmul(L, F.transpose(1, 2))  # Eq. (5): [B, C, HW]
    if w1 is not None:
        M = _channel_attention(A.mean(-1), A.amax(-1), w1, b1, w2, b2)  # Eq. (6)
        A = M[..., None] * A  # Eq. (7)
    return torch.cat([A.mean(-1), A.amax(-1)], dim=1)


def _lift_stats_torch(L: torch.Tensor, F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean and max over positions of ``A = L F^T``, each ``[B, C]``."""
    A = torch.matmul(L, F.transpose(1, 2))
    return A.mean(-1), A.amax(-1)


class _LiftStatsTriton(torch.autograd.Function):
    """Mean and max over positions of ``A = L F^T`` by the fused kernel; backward recomputes in torch."""

    @staticmethod
    def forward(ctx, L, F):  # noqa: ANN001
        avg, mx, argmax = lift_stats_triton(L, F)
        ctx.save_for_backward(L, F, argmax)
        return avg, mx

    @staticmethod
    def backward(ctx, grad_avg, grad_max):  # noqa: ANN001
        # dA[b,c,p] = grad_avg / HW + [p == argmax] grad_max; dL = dA F, dF = dA^T L.
        L, F, argmax = ctx.saved_tensors
        HW = F.shape[1]
        dA = (grad_avg / HW)[..., None].expand(-1, -1, HW).contiguous()
        dA.scatter_add_(2, argmax.long()[..., None], grad_max[..., None])
        dL = torch.matmul(dA, F)
        if L.shape[0] == 1 and F.shape[0] != 1:
            dL = dL.sum(0, keepdim=True)
        dF = torch.matmul(dA.transpose(1, 2), L.expand(F.shape[0], -1, -1))
        return dL, dF


def lift_attention_pool(
    L: torch.Tensor,
    F: torch.Tensor,
    w1: torch.Tensor | None = None,
    b1: torch.Tensor | None = None,
    w2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Deep-LIFT's pooled attention LIFT features ``concat(avg_p A_att, max_p A_att)``, ``[B, 2C]``.

    ``A = L F^T`` (Eq. 5), ``M = sigmoid(MLP(avg_p A) + MLP(max_p A))`` (Eq. 6), ``A_att = M (.) A``
    (Eq. 7); computed as ``concat(M * avg_p A, M * max_p A)``, which is equal because ``M > 0`` (see
    the module docstring). Without the CAM (``w1``, ``b1``, ``w2``, ``b2`` all ``None``, the released
    network) ``M = 1``: ``concat(avg_p A, max_p A)``. Gradients: the max routes to one maximal
    position per class.

    Args:
        L: ``[B, C, D]`` or ``[1, C, D]`` label re-embeddings (one set shared by the batch when 1).
        F: ``[B, HW, D]`` feature map.
        w1: ``[hidden, C]``, b1: ``[hidden]`` or ``None`` — the CAM MLP's first layer; ``None``
            (with ``w2``, ``b1``, ``b2``) for no CAM.
        w2: ``[C, hidden]``, b2: ``[C]`` or ``None`` — its second layer.
        backend: ``"auto" | "torch" | "triton"`` (for the pass over ``A``; the MLP is torch).

    Returns:
        ``[B, 2C]``: the attended average (first ``C``) then the attended maximum.
    """
    op = "lift_attention_pool"
    check_tensor(op, "F", F, (None, None, None))
    B, _, D = F.shape
    check_tensor(op, "L", L, (None, None, D))
    if L.shape[0] not in (1, B):
        raise ValueError(f"{op}: L must have shape [1, C, {D}] or [{B}, C, {D}], got {list(L.shape)}")
    C = L.shape[1]
    mlp = {}
    if w1 is None:
        if any(x is not None for x in (b1, w2, b2)):
            raise ValueError(f"{op}: without w1 (no channel attention) b1, w2 and b2 must be None too")
    else:
        check_tensor(op, "w1", w1, (None, C))
        hidden = w1.shape[0]
        check_tensor(op, "w2", w2, (C, hidden))
        mlp = {"w1": w1, "w2": w2}
        if b1 is not None:
            check_tensor(op, "b1", b1, (hidden,))
            mlp["b1"] = b1
        if b2 is not None:
            check_tensor(op, "b2", b2, (C,))
            mlp["b2"] = b2
    check_same_device_dtype(op, L=L, F=F, **mlp)
    if not is_exporting() and resolve_backend(op, backend, L, F) == "triton":
        avg, mx = _LiftStatsTriton.apply(L.contiguous(), F.contiguous())
    else:
        avg, mx = _lift_stats_torch(L, F)
    if w1 is None:
        return torch.cat([avg, mx], dim=1)
    M = _channel_attention(avg, mx, w1, b1, w2, b2)
    return torch.cat([M * avg, M * mx], dim=1)
