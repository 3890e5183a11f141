"""interval_search (docs/mcar-localization.md §2–§3) against the released-way loop of :mod:`fastmlr.testing`,
for the torch reference and the Triton kernel (run by Triton's CPU interpreter here)."""

import importlib
import logging

import fastmlr.kernels._dispatch as dispatch
import pytest
import torch
from conftest import requires_cuda
from fastmlr.kernels import interval_search, use_backend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmlr.testing import interval_search_loop, normalise_profile

BACKENDS = ["torch", "triton"]


def oracle(profiles: torch.Tensor, tau: float) -> torch.Tensor:
    """Row by row, the released way (:mod:`fastmlr.testing`), normalised in float32 (float64 for
    float64 profiles; fp16/bf16 convert exactly)."""
    dtype = torch.float64 if profiles.dtype == torch.float64 else torch.float32
    rows = profiles.to(dtype).reshape(-1, profiles.shape[-1])
    out = [interval_search_loop(normalise_profile(row), tau) for row in rows]
    return torch.tensor(out, dtype=torch.long).reshape(*profiles.shape[:-1], 2)


def special_profiles(length: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """Profiles built to hit every rule of §3: flat, exactly-tau values, edge peaks, equal maxima,
    narrow spikes (minimum-size checks 1, 2 and 3), plateaus and noise."""
    rows = []
    for k in range(count):
        kind = k % 10
        if kind == 0:  # flat: non-zero, zero, negative
            rows.append(torch.full((length,), [0.7, 0.0, -2.0][k // 10 % 3]))
        elif kind == 1:  # quantised values: exact ties, values exactly at tau = 0.5 after normalising
            rows.append(torch.randint(0, 5, (length,), generator=generator).float())
        elif kind == 2:  # peak at the left or right edge
            ramp = torch.linspace(1.0, 0.0, length)
            rows.append(ramp if k // 10 % 2 else ramp.flip(0))
        elif kind == 3:  # several equal maxima of different widths
            row = torch.zeros(length)
            for _ in range(3):
                a = int(torch.randint(0, length, (1,), generator=generator))
                w = int(torch.randint(1, max(2, length // 4), (1,), generator=generator))
                row[a : a + w] = 1.0
            rows.append(row)
        elif kind in (4, 5):  # narrow spike anywhere (incl. both edges): minimum-size padding
            row = torch.rand(length, generator=generator) * 0.3
            a = int(torch.randint(0, length, (1,), generator=generator))
            w = int(torch.randint(1, max(2, length // 8 + 2), (1,), generator=generator))
            row[a : a + w] = 1.0
            rows.append(row)
        elif kind == 6:  # spike near an edge: checks 2 and 3
            row = torch.zeros(length)
            pos = int(torch.randint(0, max(1, length // 8), (1,), generator=generator))
            row[pos if k // 10 % 2 else length - 1 - pos] = 1.0
            rows.append(row)
        elif kind == 7:  # whole profile above tau except one dip / monotone step
            row = torch.ones(length)
            row[int(torch.randint(0, length, (1,), generator=generator))] = 0.0
            rows.append(row)
        elif kind == 8:  # two-level plateau profile with values exactly at tau
            row = torch.randint(0, 3, (length,), generator=generator).float() / 2.0
            rows.append(row)
        else:  # smooth random profile (like a max-marginal of an upsampled CAM)
            row = torch.randn(length // 4 + 2, generator=generator).cumsum(0)
            rows.append(torch.nn.functional.interpolate(row[None, None], length, mode="linear")[0, 0])
    return torch.stack(rows)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [8, 14, 256, 448])
def test_matches_oracle(backend: str, length: int) -> None:
    generator = torch.Generator().manual_seed(length)
    count = 300 if backend == "torch" else 50  # the interpreter runs ~0.1 s per profile
    profiles = torch.cat(
        [
            special_profiles(length, count, generator),
            torch.rand(count // 3, length, generator=generator),
        ]
    )
    for tau in (0.5, 0.3):
        got = interval_search(profiles, tau, backend=backend)
        torch.testing.assert_close(got, oracle(profiles, tau), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_short_lengths(backend: str) -> None:
    """Every L from 2 to 20 with small integer profiles (dense in ties and exact-tau values)."""
    generator = torch.Generator().manual_seed(1)
    for length in range(2, 21):
        profiles = torch.randint(0, 4, (40 if backend == "torch" else 12, length), generator=generator)
        profiles = profiles.double()
        got = interval_search(profiles, backend=backend)
        torch.testing.assert_close(got, oracle(profiles, 0.5), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_and_leading_shapes(backend: str, dtype: torch.dtype) -> None:
    profiles = (torch.rand(2, 3, 30) * 4).to(dtype)
    got = interval_search(profiles, backend=backend)
    assert got.shape == (2, 3, 2) and got.dtype == torch.long
    torch.testing.assert_close(got, oracle(profiles, 0.5), rtol=0, atol=0)
    empty = interval_search(torch.zeros(0, 4, 16, dtype=dtype), backend=backend)
    assert empty.shape == (0, 4, 2)
    one = interval_search(profiles[0, 0], backend=backend)
    assert one.shape == (2,)


def test_onnx_export_keeps_leading_axes_dynamic(tmp_path) -> None:
    """The torch reference traced at [2, 3, L] with dynamic leading axes runs in ONNX Runtime at other
    leading shapes and gives the oracle's intervals: no constant in the graph depends on them."""
    ort = pytest.importorskip("onnxruntime")

    class Search(torch.nn.Module):
        def forward(self, profiles):
            return interval_search(profiles, 0.5, backend="torch")

    generator = torch.Generator().manual_seed(3)
    path = tmp_path / "search.onnx"
    torch.onnx.export(Search(), (torch.rand(2, 3, 12),), str(path), opset_version=17, dynamo=False,
                      input_names=["profiles"], output_names=["intervals"],
                      dynamic_axes={"profiles": {0: "a", 1: "b"}, "intervals": {0: "a", 1: "b"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 5, 12), (4, 2, 12)]:
        profiles = torch.randint(0, 4, shape, generator=generator).float()  # dense in ties and exact-tau values
        got = torch.from_numpy(session.run(None, {"profiles": profiles.numpy()})[0])
        torch.testing.assert_close(got, oracle(profiles, 0.5), rtol=0, atol=0)


def test_float64_is_searched_in_float64() -> None:
    """A value 1e-12 above tau counts as above tau in float64 (it would round to tau in float32)."""
    profile = torch.tensor([0.5 + 1e-12, 1.0, 0.5 + 1e-12, 0, 0, 0, 0, 0], dtype=torch.float64)
    for backend in BACKENDS:
        assert interval_search(profile, backend=backend).tolist() == [0, 2]
        assert interval_search(profile.float(), backend=backend).tolist() == [1, 7]  # no crossing


def test_hand_worked_examples() -> None:
    # L = 8, minsize = 1. Crossings at 1 and 4; segments [0,1), [4,8), [1,4); the peak is in [1,4).
    assert interval_search(torch.tensor([0.0, 0.1, 0.9, 1.0, 0.8, 0.1, 0.0, 0.0])).tolist() == [1, 4]
    # A single step down at 6 is a crossing: segments [0, 6) (peak) and [6, 8).
    assert interval_search(torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 0.9])).tolist() == [0, 6]
    # A flat profile never crosses tau: the default interval [1, 7) for L = 8.
    assert interval_search(torch.full((8,), 3.0)).tolist() == [1, 7]
    # Values equal to tau (0.5 after normalising) never cross: default interval.
    assert interval_search(torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0])).tolist() == [1, 7]


@pytest.mark.parametrize(
    ("profiles", "threshold", "message"),
    [
        (torch.arange(8), 0.5, "float16/bfloat16/float32/float64"),
        (torch.rand(3, 1), 0.5, "length >= 2"),
        (torch.tensor(1.0), 0.5, "length >= 2"),
        (torch.tensor([0.0, float("nan"), 1.0]), 0.5, "NaN or infinite"),
        (torch.tensor([0.0, float("inf"), 1.0]), 0.5, "NaN or infinite"),
        (torch.rand(8), 0.0, "threshold"),
        (torch.rand(8), 1.0, "threshold"),
    ],
)
def test_bad_input(profiles: torch.Tensor, threshold: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        interval_search(profiles, threshold)


def test_bad_backend() -> None:
    with pytest.raises(ValueError, match="backend"):
        interval_search(torch.rand(8), backend="cuda")


def test_use_backend_forces_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    module = importlib.import_module("fastmlr.kernels.interval_search")  # the package attr is the function
    original = module._interval_search_triton
    monkeypatch.setattr(module, "_interval_search_triton", lambda *a: calls.append(1) or original(*a))
    with use_backend("triton"):
        interval_search(torch.rand(4, 8), backend="torch")
    assert calls == [1]
    with use_backend("torch"):
        interval_search(torch.rand(4, 8), backend="triton")
    assert calls == [1]


def test_triton_without_cuda_or_interpreter_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(dispatch, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(dispatch, "_warned", set())
    profiles = torch.rand(5, 12)
    with caplog.at_level(logging.WARNING, logger="fastmlr.kernels"):
        first = interval_search(profiles, backend="triton")
        second = interval_search(profiles, backend="triton")
    records = [r for r in caplog.records if "interval_search" in r.getMessage()]
    assert len(records) == 1 and "falling back to torch" in records[0].getMessage()
    torch.testing.assert_close(first, oracle(profiles, 0.5), rtol=0, atol=0)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


@requires_cuda
def test_cuda_triton_matches_torch() -> None:
    generator = torch.Generator().manual_seed(3)
    profiles = torch.cat([special_profiles(448, 500, generator), torch.rand(500, 448, generator=generator)])
    expected = interval_search(profiles, backend="torch")
    got = interval_search(profiles.cuda(), backend="triton")
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(st.integers(min_value=0, max_value=6), min_size=2, max_size=40),
    scale=st.sampled_from([1.0, 0.25, -3.0]),
    threshold=st.sampled_from([0.5, 0.25, 1 / 3]),
)
def test_torch_matches_oracle_hypothesis(values: list[int], scale: float, threshold: float) -> None:
    """Small integer levels: dense in equal maxima, plateaus, values exactly at tau and short spikes."""
    profile = torch.tensor(values, dtype=torch.float32) * scale
    assert interval_search(profile, threshold).tolist() == oracle(profile, threshold).tolist()
