"""Parity, gradients and input checks of the SRDL/SSGRL per-category attention ops.

The naive broadcast ``*_reference`` forms are the oracle; the chunked torch path runs with tiny
chunk budgets so that it really splits, and the Triton kernels run in the CPU interpreter.
"""

import io
import warnings

import pytest
import torch
from conftest import requires_cuda
from fastmlr.kernels import (
    softmax_attention_pool,
    softmax_attention_pool_reference,
    srdl_max_pool,
    srdl_max_pool_reference,
    tanh_attention_scores,
    tanh_attention_scores_reference,
)
from fastmlr.kernels.category_attention import pair_blocks

# (B, C, HW, D): C, HW, D off powers of two, single class / position, sizes straddling block edges.
SHAPES = [(1, 1, 1, 3), (2, 5, 9, 64), (1, 17, 49, 100), (2, 17, 1, 3), (1, 5, 49, 3), (2, 1, 9, 100)]
BACKENDS = ["torch", "triton"]
TINY_CHUNK = 1000  # bytes: forces many (batch, class) blocks at these sizes


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """``max |actual - expected| <= rel * max(1, max |expected|)``."""
    assert actual.shape == expected.shape
    scale = max(1.0, expected.abs().max().item())
    error = (actual - expected).abs().max().item()
    assert error <= rel * scale, f"max error {error:.3g} exceeds {rel:g} x {scale:.3g}"


def tanh_inputs(B, C, HW, D, dtype=torch.float32):
    return (torch.randn(B, HW, D, dtype=dtype), torch.randn(C, D, dtype=dtype),
            torch.randn(D, dtype=dtype) / D**0.5, torch.randn(1, dtype=dtype))


def srdl_inputs(B, C, HW, D, dtype=torch.float32):
    return (torch.randn(B, HW, D, dtype=dtype), torch.rand(B, C, HW, dtype=dtype),
            torch.rand(B, C, D, dtype=dtype))


def softmax_inputs(B, C, HW, D, dtype=torch.float32):
    return torch.randn(B, HW, D, dtype=dtype), 3 * torch.randn(B, C, HW, dtype=dtype)


def grads(fn, inputs):
    """Gradients of ``sum(fn(*inputs) * fixed random weights)`` w.r.t. every input."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return torch.autograd.grad((out * weights).sum(), leaves)


# --- forward parity ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_tanh_attention_scores_matches_reference(shape, backend):
    P, Q, w, b = tanh_inputs(*shape)
    expected = tanh_attention_scores_reference(P, Q, w, b)
    assert expected.shape == (shape[0], shape[1], shape[2])
    assert_close_rel(tanh_attention_scores(P, Q, w, b, backend=backend, max_chunk_bytes=TINY_CHUNK), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_srdl_max_pool_matches_reference(shape, backend):
    F, SA, CA = srdl_inputs(*shape)
    expected = srdl_max_pool_reference(F, SA, CA)
    assert expected.shape == (shape[0], shape[1], shape[3])
    assert_close_rel(srdl_max_pool(F, SA, CA, backend=backend, max_chunk_bytes=TINY_CHUNK), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_softmax_attention_pool_matches_reference(shape, backend):
    F, s = softmax_inputs(*shape)
    expected = softmax_attention_pool_reference(F, s)
    assert expected.shape == (shape[0], shape[1], shape[3])
    assert_close_rel(softmax_attention_pool(F, s, backend=backend), expected)


def test_references_follow_their_formulas_elementwise():
    """The oracles themselves, against explicit loops on one tiny case."""
    P, Q, w, b = tanh_inputs(1, 2, 3, 4, torch.float64)
    F, SA, CA = srdl_inputs(1, 2, 3, 4, torch.float64)
    s = torch.randn(1, 2, 3, dtype=torch.float64)
    scores = tanh_attention_scores_reference(P, Q, w, b)
    pooled_max = srdl_max_pool_reference(F, SA, CA)
    pooled_soft = softmax_attention_pool_reference(F, s)
    for c in range(2):
        attention = torch.exp(s[0, c]) / torch.exp(s[0, c]).sum()
        for p in range(3):
            assert scores[0, c, p].item() == pytest.approx(
                sum(w[k].item() * torch.tanh(P[0, p, k] * Q[c, k]).item() for k in range(4)) + b.item())
        for k in range(4):
            assert pooled_max[0, c, k].item() == pytest.approx(
                max(0.5 * F[0, p, k].item() * (SA[0, c, p].item() + CA[0, c, k].item()) for p in range(3)))
            assert pooled_soft[0, c, k].item() == pytest.approx(
                sum(attention[p].item() * F[0, p, k].item() for p in range(3)))


def test_float_bias_and_default_chunking_match_reference():
    P, Q, w, _ = tanh_inputs(2, 5, 9, 64)
    assert_close_rel(tanh_attention_scores(P, Q, w, -0.25), tanh_attention_scores_reference(P, Q, w, -0.25))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_stay_close_to_the_fp32_reference(dtype, backend):
    shape = (2, 5, 9, 64)
    P, Q, w, b = tanh_inputs(*shape)
    F, SA, CA = srdl_inputs(*shape)
    _, s = softmax_inputs(*shape)
    scores = tanh_attention_scores(*(x.to(dtype) for x in (P, Q, w, b)), backend=backend)
    pooled_max = srdl_max_pool(*(x.to(dtype) for x in (F, SA, CA)), backend=backend)
    pooled_soft = softmax_attention_pool(F.to(dtype), s.to(dtype), backend=backend)
    assert scores.dtype == pooled_max.dtype == pooled_soft.dtype == dtype
    assert_close_rel(scores.float(), tanh_attention_scores_reference(P, Q, w, b), rel=3e-2)
    assert_close_rel(pooled_max.float(), srdl_max_pool_reference(F, SA, CA), rel=3e-2)
    assert_close_rel(pooled_soft.float(), softmax_attention_pool_reference(F, s), rel=3e-2)


# --- chunking ---------------------------------------------------------------------------------


@pytest.mark.parametrize("batch, classes, pair_bytes, budget",
                         [(1, 1, 10, 1), (3, 7, 10, 25), (3, 7, 10, 70), (3, 7, 10, 150), (16, 80, 4, 10**9)])
def test_pair_blocks_tile_every_pair_once_within_budget(batch, classes, pair_bytes, budget):
    seen = torch.zeros(batch, classes, dtype=torch.long)
    for bs, cs in pair_blocks(batch, classes, pair_bytes, budget):
        seen[bs, cs] += 1
        pairs = (bs.stop - bs.start) * (cs.stop - cs.start)
        assert pairs == 1 or pairs * pair_bytes <= budget
    assert torch.equal(seen, torch.ones_like(seen))


# --- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 5, 9, 64), (1, 17, 1, 3)])
def test_tanh_attention_scores_gradients_match_reference(shape, backend):
    inputs = tanh_inputs(*shape)
    expected = grads(tanh_attention_scores_reference, inputs)
    actual = grads(lambda *x: tanh_attention_scores(*x, backend=backend, max_chunk_bytes=TINY_CHUNK), inputs)
    for a, e in zip(actual, expected, strict=True):
        assert_close_rel(a, e)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 5, 9, 64), (1, 17, 49, 3)])
def test_srdl_max_pool_gradients_match_reference(shape, backend):
    inputs = srdl_inputs(*shape)  # continuous random values: every maximum is unique
    expected = grads(srdl_max_pool_reference, inputs)
    actual = grads(lambda *x: srdl_max_pool(*x, backend=backend, max_chunk_bytes=TINY_CHUNK), inputs)
    for a, e in zip(actual, expected, strict=True):
        assert_close_rel(a, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_attention_pool_gradients_match_reference(backend):
    inputs = softmax_inputs(2, 5, 49, 64)
    expected = grads(softmax_attention_pool_reference, inputs)
    actual = grads(lambda *x: softmax_attention_pool(*x, backend=backend), inputs)
    for a, e in zip(actual, expected, strict=True):
        assert_close_rel(a, e)


def test_chunked_gradients_pass_gradcheck():
    P, Q, w, b = (x.requires_grad_(True) for x in tanh_inputs(2, 3, 4, 5, torch.float64))
    assert torch.autograd.gradcheck(
        lambda *x: tanh_attention_scores(*x, backend="torch", max_chunk_bytes=100), (P, Q, w, b))
    F, SA, CA = (x.requires_grad_(True) for x in srdl_inputs(2, 3, 4, 5, torch.float64))
    assert torch.autograd.gradcheck(
        lambda *x: srdl_max_pool(*x, backend="torch", max_chunk_bytes=100), (F, SA, CA))


def test_zero_dim_bias_gets_a_zero_dim_gradient():
    P, Q, w, _ = tanh_inputs(1, 2, 3, 4)
    bias = torch.tensor(0.5, requires_grad=True)
    tanh_attention_scores(P, Q, w, bias).sum().backward()
    assert bias.grad.shape == () and bias.grad.item() == pytest.approx(2 * 3)


# --- bad input --------------------------------------------------------------------------------


def test_tanh_attention_scores_rejects_bad_input():
    P, Q, w, b = tanh_inputs(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"Q must have shape \[\*, 4\]"):
        tanh_attention_scores(P, Q[:, :3], w, b)
    with pytest.raises(ValueError, match="P must have shape"):
        tanh_attention_scores(P[0], Q, w, b)
    with pytest.raises(ValueError, match=r"w must have shape \[4\]"):
        tanh_attention_scores(P, Q, w[:2], b)
    with pytest.raises(ValueError, match="one-element tensor"):
        tanh_attention_scores(P, Q, w, torch.zeros(2))
    with pytest.raises(ValueError, match="floating"):
        tanh_attention_scores(P.long(), Q, w, b)
    with pytest.raises(ValueError, match="one device and dtype"):
        tanh_attention_scores(P, Q.double(), w, b)
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        tanh_attention_scores(P, Q, w, b, max_chunk_bytes=0)
    with pytest.raises(ValueError, match="backend"):
        tanh_attention_scores(P, Q, w, b, backend="cuda")


def test_pools_reject_bad_shapes():
    F, SA, CA = srdl_inputs(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"SA must have shape \[2, \*, 4\]"):
        srdl_max_pool(F, SA[:, :, :3], CA)
    with pytest.raises(ValueError, match=r"CA must have shape \[2, 3, 5\]"):
        srdl_max_pool(F, SA, CA[:, :2])
    with pytest.raises(ValueError, match="F must be a torch.Tensor"):
        srdl_max_pool(F.numpy(), SA, CA)
    with pytest.raises(ValueError, match=r"s must have shape \[2, \*, 4\]"):
        softmax_attention_pool(F, SA[:1])


# --- CUDA -------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("shape", [(2, 80, 196, 2048), (1, 17, 49, 100)])
def test_cuda_kernels_match_reference(shape):
    B, C, HW, D = shape
    P, Q, w, b = (x.cuda() for x in tanh_inputs(*shape))
    F, SA, CA = (x.cuda() for x in srdl_inputs(*shape))
    _, s = (x.cuda() for x in softmax_inputs(*shape))
    assert_close_rel(tanh_attention_scores(P, Q, w, b, backend="triton"),
                     tanh_attention_scores_reference(P, Q, w, b))
    assert_close_rel(srdl_max_pool(F, SA, CA, backend="triton"), srdl_max_pool_reference(F, SA, CA))
    assert_close_rel(softmax_attention_pool(F, s, backend="triton"), softmax_attention_pool_reference(F, s))




# --- tracing ------------------------------------------------------------------------------------


def onnx_replay(fn, example: list[torch.Tensor], inputs: list[torch.Tensor]) -> torch.Tensor:
    """``fn`` exported by torch's TorchScript ONNX exporter (as ``fastmlr.export`` runs it) from the
    ``example`` tensors, every one with a dynamic leading (batch) axis, then run in ONNX Runtime on
    ``inputs``."""
    ort = pytest.importorskip("onnxruntime")

    class Wrapper(torch.nn.Module):
        def forward(self, *tensors):
            return fn(*tensors)

    names = [f"x{i}" for i in range(len(example))]
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(Wrapper(), tuple(example), buffer, dynamo=False, opset_version=17, input_names=names,
                          output_names=["out"], dynamic_axes={n: {0: "batch"} for n in [*names, "out"]})
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_exported_ops_follow_their_inputs_at_any_batch(backend):
    """Exported to ONNX at batch 2 with a tiny chunk budget, each op runs in ONNX Runtime on new
    inputs at batch 3 like the reference: while tracing, the ops run plain out-of-place torch (no
    in-place block writes for the exporter to drop, which made the op a constant; no block loop
    unrolled at the traced batch), whatever the backend."""
    P, Q, w, b = tanh_inputs(2, 5, 9, 64)
    P3 = tanh_inputs(3, 5, 9, 64)[0]
    scores = onnx_replay(lambda P: tanh_attention_scores(P, Q, w, b, backend=backend, max_chunk_bytes=TINY_CHUNK),
                         [P], [P3])
    assert_close_rel(scores, tanh_attention_scores_reference(P3, Q, w, b))
    srdl = onnx_replay(lambda *x: srdl_max_pool(*x, backend=backend, max_chunk_bytes=TINY_CHUNK),
                       list(srdl_inputs(2, 5, 9, 64)), inputs := list(srdl_inputs(3, 5, 9, 64)))
    assert_close_rel(srdl, srdl_max_pool_reference(*inputs))
    softmax = onnx_replay(lambda *x: softmax_attention_pool(*x, backend=backend),
                          list(softmax_inputs(2, 5, 9, 64)), inputs := list(softmax_inputs(3, 5, 9, 64)))
    assert_close_rel(softmax, softmax_attention_pool_reference(*inputs))
