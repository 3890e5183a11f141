"""Timing the configurations of the latency benchmark side by side: each one's model and batch, its
backend's callables, warm-up, then interleaved rounds of timed calls, one
:class:`~bench.records.Measurement` per component.

On a shared machine the share of the CPUs a call gets changes from minute to minute; timed one after
another, each configuration would see a different share and their ratios would say more about the
machine than about the models. :func:`measure_interleaved` therefore builds every configuration first
(exports, sessions, compile wrappers), then times rounds, each calling every component of every
configuration once, in turn, so that a slow spell hits all rows alike."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import fastmlr
from bench.paper_tables import paper_figures
from bench.records import Config, Measurement, Settings
from bench.runners import RUNNERS, Calls
from bench.timing import summarize, time_calls, warm_up


def make_model(config: Config, settings: Settings) -> torch.nn.Module:
    """``config.model`` in eval mode, fp32 on the CPU; weights from ``--checkpoint`` for the model it
    belongs to (``settings.checkpoint_model``), random from ``settings.seed`` otherwise."""
    torch.manual_seed(settings.seed)
    checkpoint = settings.checkpoint if config.model == settings.checkpoint_model else None
    return fastmlr.create_model(config.model, backbone=config.backbone, num_classes=settings.num_classes,
                                image_size=config.size, checkpoint=checkpoint).eval()


def make_images(config: Config, settings: Settings) -> torch.Tensor:
    """A fixed-seed fp32 CPU batch ``[batch, 3, size, size]`` of standard-normal pixels (as normalised
    images are)."""
    generator = torch.Generator().manual_seed(settings.seed)
    return torch.randn(settings.batch, 3, config.size, config.size, generator=generator)


@contextlib.contextmanager
def kernels_forced(kernels: str) -> Iterator[None]:
    """``fastmlr.kernels.use_backend(kernels)`` unless ``kernels`` is ``"auto"``."""
    with contextlib.nullcontext() if kernels == "auto" else fastmlr.kernels.use_backend(kernels):
        yield


#: How a run's calls were ordered, as its result records it.
INTERLEAVED_ORDER = ("interleaved: every configuration built first, then rounds calling each component of each "
                     "configuration once in turn; medians over the rounds")


@dataclass(frozen=True)
class Built:
    """One configuration ready to be timed: its callables (component → callable), their timer and
    the seconds it took to build them."""

    config: Config
    settings: Settings
    calls: Calls
    timer: str
    setup_s: float


def build_config(config: Config, settings: Settings, workdir: Path) -> Built:
    """Build what ``config`` times. Torch backends build their callables under
    ``torch.inference_mode``; the exported backends export outside it (tracing must see the model's
    ordinary eval path)."""
    runner = RUNNERS[config.backend]
    model, images = make_model(config, settings), make_images(config, settings)
    with kernels_forced(settings.kernels):
        t0 = time.perf_counter()
        with torch.inference_mode(runner.per_component):
            calls = runner.build(model, images, settings, workdir)
        setup_s = time.perf_counter() - t0
    return Built(config, settings, calls, runner.timer(settings.device), setup_s)


def measure_interleaved(
    jobs: Sequence[tuple[Config, Settings]],
    workdir: Path,
    progress: Callable[[str], None],
    on_failure: Callable[[Config, Settings, BaseException], None],
) -> list[Measurement]:
    """Time every component of every ``(config, settings)`` of ``jobs`` side by side.

    All configurations are built first (:func:`build_config`); each component then gets
    ``settings.warmup`` untimed calls (the first timed apart: ``first_call_ms``); then
    ``settings.iters`` rounds (the jobs share ``iters``), each calling every component of every job
    once, in the order of ``jobs``. Every call runs under ``inference_mode`` and ``--kernels``'
    forced backend. A job that fails while it is built or called is handed to ``on_failure`` with
    its error and left out (with the samples it had); the others go on. ``progress`` gets one
    message per build, per warm-up and per round."""
    built = []
    for config, settings in jobs:
        progress(f"{config.label()} {settings.precision}: build")
        try:
            built.append(build_config(config, settings, workdir))
        except Exception as err:  # noqa: BLE001 - one failing configuration must not end a grid
            on_failure(config, settings, err)
    first_ms: dict[tuple[int, str], float] = {}
    samples: dict[tuple[int, str], list[float]] = {}
    failed: set[int] = set()

    def call(job: int, component: str, timed: Callable[[Callable[[], object], Built], object]) -> object:
        """``timed(callable, built)`` for one component; ``None`` (the job marked failed) when it raises."""
        b = built[job]
        try:
            with kernels_forced(b.settings.kernels), torch.inference_mode():
                return timed(b.calls[component], b)
        except Exception as err:  # noqa: BLE001 - a failing configuration is left out, the others go on
            failed.add(job)
            on_failure(b.config, b.settings, err)
            return None

    entries = [(job, component) for job, b in enumerate(built) for component in b.calls]
    for job, component in entries:
        b = built[job]
        if job not in failed:
            progress(f"{b.config.label()} {b.settings.precision} {component}: warm-up {b.settings.warmup}")
            first_ms[(job, component)] = call(job, component, lambda fn, b: warm_up(fn, b.settings.warmup, b.timer))
    rounds = max((b.settings.iters for b in built), default=0)
    for r in range(rounds):
        progress(f"round {r + 1}/{rounds}: one timed call of each of {len(entries)} components")
        for job, component in entries:
            if job not in failed:
                times = call(job, component, lambda fn, b: time_calls(fn, 1, b.timer))
                samples.setdefault((job, component), []).extend(times or [])
    measurements = []
    for job, component in entries:
        if job in failed:
            continue
        b, times = built[job], samples[(job, component)]
        config, settings = b.config, b.settings
        figures = paper_figures(config.model, component, config.backbone, config.size)
        measurements.append(Measurement(
            **asdict(config), component=component, batch=settings.batch, precision=settings.precision,
            device=settings.device, kernels=settings.kernels, timer=b.timer, setup_s=b.setup_s,
            first_call_ms=first_ms[(job, component)], **asdict(summarize(times, settings.batch)),
            samples_ms=times, paper=[f.as_dict() for f in figures],
        ))
    return measurements
