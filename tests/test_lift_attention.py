"""Parity, gradients and input checks of Deep-LIFT's one-pass attention LIFT pooling."""

import pytest
import torch
from conftest import requires_cuda
from fastmlr.kernels import lift_attention_pool, lift_attention_pool_reference
from test_category_attention import onnx_replay

# (B, L's batch, C, HW, D, hidden, biases)
CASES = [
    (1, 1, 1, 1, 3, 1, True),
    (2, 1, 5, 9, 64, 2, True),
    (2, 2, 17, 49, 100, 4, False),
    (1, 1, 17, 9, 3, 4, True),
    (2, 2, 5, 49, 100, 1, False),
]
BACKENDS = ["torch", "triton"]


def lift_inputs(B, LB, C, HW, D, hidden, biases, dtype=torch.float32):
    """``(L, F, w1, b1, w2, b2)`` at a scale where the sigmoid of the CAM is not saturated."""
    return (torch.randn(LB, C, D, dtype=dtype) / D**0.5, torch.randn(B, HW, D, dtype=dtype),
            torch.randn(hidden, C, dtype=dtype) / C**0.5,
            torch.randn(hidden, dtype=dtype) if biases else None,
            torch.randn(C, hidden, dtype=dtype) / hidden**0.5,
            torch.randn(C, dtype=dtype) if biases else None)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """``max |actual - expected| <= rel * max(1, max |expected|)``."""
    assert actual.shape == expected.shape
    scale = max(1.0, expected.abs().max().item())
    error = (actual - expected).abs().max().item()
    assert error <= rel * scale, f"max error {error:.3g} exceeds {rel:g} x {scale:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_lift_attention_pool_matches_reference(case, backend):
    inputs = lift_inputs(*case)
    expected = lift_attention_pool_reference(*inputs)
    assert expected.shape == (case[0], 2 * case[2])
    assert_close_rel(lift_attention_pool(*inputs, backend=backend), expected)


def test_reference_follows_equations_5_to_7_elementwise():
    L, F, w1, b1, w2, b2 = lift_inputs(1, 1, 3, 4, 5, 2, True, torch.float64)
    A = [[sum(L[0, c, k].item() * F[0, p, k].item() for k in range(5)) for p in range(4)] for c in range(3)]

    def mlp(v):
        hidden = [max(0.0, sum(w1[h, c].item() * v[c] for c in range(3)) + b1[h].item()) for h in range(2)]
        return [sum(w2[c, h].item() * hidden[h] for h in range(2)) + b2[c].item() for c in range(3)]

    avg, mx = [sum(row) / 4 for row in A], [max(row) for row in A]
    M = [1 / (1 + torch.exp(-torch.tensor(a + m)).item()) for a, m in zip(mlp(avg), mlp(mx), strict=True)]
    A_att = [[M[c] * A[c][p] for p in range(4)] for c in range(3)]
    expected = [sum(row) / 4 for row in A_att] + [max(row) for row in A_att]
    assert lift_attention_pool_reference(L, F, w1, b1, w2, b2)[0].tolist() == pytest.approx(expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_lift_pool_without_channel_attention_matches_reference(case, backend):
    """The released Deep-LIFT network's pooling: no CAM, ``concat(avg_p A, max_p A)``."""
    L, F = lift_inputs(*case)[:2]
    A = torch.matmul(L, F.transpose(1, 2))
    expected = torch.cat([A.mean(-1), A.amax(-1)], dim=1)
    assert_close_rel(lift_attention_pool_reference(L, F), expected)
    assert_close_rel(lift_attention_pool(L, F, backend=backend), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lift_pool_without_channel_attention_gradients_match_reference(backend):
    L, F = (x.clone().requires_grad_(True) for x in lift_inputs(*CASES[2])[:2])
    weights = torch.randn(2, 2 * CASES[2][2], generator=torch.Generator().manual_seed(1))
    expected = torch.autograd.grad((lift_attention_pool_reference(L, F) * weights).sum(), [L, F])
    actual = torch.autograd.grad((lift_attention_pool(L, F, backend=backend) * weights).sum(), [L, F])
    for a, e in zip(actual, expected, strict=True):
        assert_close_rel(a, e)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [CASES[1], CASES[2]])
def test_lift_attention_pool_gradients_match_reference(case, backend):
    inputs = lift_inputs(*case)
    present = [i for i, x in enumerate(inputs) if x is not None]
    leaves = {i: inputs[i].clone().requires_grad_(True) for i in present}

    def run(fn):
        args = [leaves.get(i) for i in range(6)]
        out = fn(*args)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        return torch.autograd.grad((out * weights).sum(), [leaves[i] for i in present])

    expected = run(lift_attention_pool_reference)
    actual = run(lambda *x: lift_attention_pool(*x, backend=backend))
    for a, e in zip(actual, expected, strict=True):
        assert_close_rel(a, e)


def test_lift_attention_pool_rejects_bad_shapes():
    L, F, w1, b1, w2, b2 = lift_inputs(2, 1, 5, 9, 8, 2, True)
    with pytest.raises(ValueError, match=r"L must have shape \[\*, \*, 8\]"):
        lift_attention_pool(L[..., :7], F, w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r"L must have shape \[1, C, 8\] or \[2, C, 8\]"):
        lift_attention_pool(L.expand(3, -1, -1), F, w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r"w1 must have shape \[\*, 5\]"):
        lift_attention_pool(L, F, w1[:, :4], b1, w2, b2)
    with pytest.raises(ValueError, match=r"w2 must have shape \[5, 2\]"):
        lift_attention_pool(L, F, w1, b1, w2[:, :1], b2)
    with pytest.raises(ValueError, match=r"b1 must have shape \[2\]"):
        lift_attention_pool(L, F, w1, b1[:1], w2, b2)
    with pytest.raises(ValueError, match=r"b2 must have shape \[5\]"):
        lift_attention_pool(L, F, w1, b1, w2, b2[:4])
    with pytest.raises(ValueError, match="one device and dtype"):
        lift_attention_pool(L, F.double(), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="without w1 .* must be None"):
        lift_attention_pool(L, F, None, b1, w2, b2)
    with pytest.raises(ValueError, match="w2 must be a torch.Tensor"):
        lift_attention_pool(L, F, w1, b1, None, None)


@requires_cuda
def test_cuda_kernel_matches_reference():
    inputs = tuple(None if x is None else x.cuda() for x in lift_inputs(4, 1, 80, 196, 2048, 20, True))
    assert_close_rel(lift_attention_pool(*inputs, backend="triton"), lift_attention_pool_reference(*inputs))



@pytest.mark.parametrize("backend", BACKENDS)
def test_exported_op_follows_its_inputs_at_any_batch(backend):
    """Exported to ONNX at batch 2, the op runs in ONNX Runtime on new inputs at batch 3 like the
    reference: while tracing it runs the plain torch path, whatever the backend."""
    L, F, *mlp = lift_inputs(2, 2, 5, 9, 64, 2, True)
    L3, F3 = lift_inputs(3, 3, 5, 9, 64, 2, True)[:2]
    pooled = onnx_replay(lambda L, F: lift_attention_pool(L, F, *mlp, backend=backend), [L, F], [L3, F3])
    assert_close_rel(pooled, lift_attention_pool_reference(L3, F3, *mlp))
