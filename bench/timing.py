"""Timing: timers, warm-up, statistics, and interleaved rounds for fair ratios on a shared machine.

Timers (:func:`time_calls`): ``"cuda-events"`` — CUDA events recorded on torch's current stream
around each call, read after synchronising on the end event (the GPU time of work enqueued on that
stream); ``"perf_counter+sync"`` — wall time, the device synchronised before the start and after the
end (work on other streams, host copies); ``"perf_counter"`` — wall time on the CPU.

Statistics (:func:`summarize`): median, p90 (linear interpolation between order statistics, numpy's
default), min and mean of the per-call times, plus ms per image and images per second for calls on
a batch. Ratios between implementations are only fair when a slow spell of the machine hits them
alike: :func:`interleaved` calls each implementation once per round, in turn.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

TIMERS = ("cuda-events", "perf_counter+sync", "perf_counter")


def timer_for(device: str, own_stream: bool = False) -> str:
    """The timer for work on ``device``: wall time on the CPU; on the GPU CUDA events, unless the
    work runs on a stream of its own (``own_stream``: ONNX Runtime's CUDA provider), then wall time
    with synchronisation."""
    if device == "cpu":
        return "perf_counter"
    return "perf_counter+sync" if own_stream else "cuda-events"


def time_calls(fn: Callable[[], object], iters: int, timer: str) -> list[float]:
    """Call ``fn`` ``iters`` times; each call's time in ms, measured with ``timer`` (:data:`TIMERS`)."""
    if timer not in TIMERS:
        raise ValueError(f"unknown timer {timer!r}; choose one of {TIMERS}")
    samples = []
    if timer == "cuda-events":
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        return samples
    sync = torch.cuda.synchronize if timer == "perf_counter+sync" else (lambda: None)
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1000.0)
    return samples


def warm_up(fn: Callable[[], object], calls: int, timer: str) -> float:
    """Call ``fn`` ``calls`` times (at least once) untimed but for the first call, whose time in ms
    is returned: where ``torch.compile`` compiles and runtimes initialise."""
    first = time_calls(fn, 1, timer)[0]
    time_calls(fn, calls - 1, timer)
    return first


@dataclass(frozen=True)
class Stats:
    """Statistics of per-call times in ms, for calls on ``batch`` images each."""

    median_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    ms_per_image: float
    images_per_s: float


def summarize(samples_ms: list[float], batch: int = 1) -> Stats:
    """:class:`Stats` of ``samples_ms``: ``ms_per_image`` = median / batch, ``images_per_s`` =
    1000·batch / median. ``ValueError`` without samples."""
    if not samples_ms:
        raise ValueError("summarize: no samples")
    samples = np.asarray(samples_ms, dtype=np.float64)
    median = float(np.median(samples))
    return Stats(
        median_ms=median,
        p90_ms=float(np.percentile(samples, 90)),
        min_ms=float(samples.min()),
        mean_ms=float(samples.mean()),
        ms_per_image=median / batch,
        images_per_s=1000.0 * batch / median,
    )


def interleaved(
    calls: Mapping[str, Callable[[], object]], rounds: int, timer: str, warmup: int = 1
) -> dict[str, list[float]]:
    """Per-call times in ms of every callable of ``calls``: ``warmup`` untimed calls each, then
    ``rounds`` rounds that call each one once in turn, so that a slow spell of a shared machine hits
    them all alike and their ratios stay fair."""
    for fn in calls.values():
        time_calls(fn, warmup, timer)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name] += time_calls(fn, 1, timer)
    return times


def pair_with_baseline(
    rows: Sequence[Mapping], group: Sequence[str], impl: str, baseline: Callable[[Mapping], str]
) -> list[tuple[Mapping, Mapping]]:
    """Each row of ``rows`` paired with its baseline: the row with the same values of the ``group``
    fields whose ``impl`` field is ``baseline(row)``. Baseline rows themselves, and rows whose
    baseline was not measured, are left out. Ratios are then ``base[value] / row[value]``."""
    index = {(tuple(r[k] for k in group), r[impl]): r for r in rows}
    pairs = []
    for row in rows:
        name = baseline(row)
        base = index.get((tuple(row[k] for k in group), name))
        if row[impl] != name and base is not None:
            pairs.append((row, base))
    return pairs
