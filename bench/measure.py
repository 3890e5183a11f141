"""Timing one configuration of the latency benchmark: the model and a batch, the backend's callables,
warm-up, timed calls, one :class:`~bench.records.Measurement` per component."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch

import fastmlr
from bench.paper_tables import paper_figures
from bench.records import Config, Measurement, Settings
from bench.runners import RUNNERS
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


def measure_config(
    config: Config, settings: Settings, workdir: Path, progress: Callable[[str], None]
) -> list[Measurement]:
    """Time every component of ``config``. Torch backends build their callables under
    ``torch.inference_mode``; the exported backends export outside it (tracing must see the model's
    ordinary eval path). Every call runs under ``inference_mode`` and ``--kernels``' forced backend."""
    runner = RUNNERS[config.backend]
    model, images = make_model(config, settings), make_images(config, settings)
    timer = runner.timer(settings.device)
    measurements = []
    with kernels_forced(settings.kernels):
        t0 = time.perf_counter()
        with torch.inference_mode(runner.per_component):
            calls = runner.build(model, images, settings, workdir)
        setup_s = time.perf_counter() - t0
        with torch.inference_mode():
            for component, fn in calls.items():
                progress(f"{config.label()} {component}: warm-up {settings.warmup}, {settings.iters} timed calls")
                first_call_ms = warm_up(fn, settings.warmup, timer)
                samples = time_calls(fn, settings.iters, timer)
                figures = paper_figures(config.model, component, config.backbone, config.size)
                measurements.append(Measurement(
                    **asdict(config), component=component, batch=settings.batch, precision=settings.precision,
                    device=settings.device, kernels=settings.kernels, timer=timer, setup_s=setup_s,
                    first_call_ms=first_call_ms, **asdict(summarize(samples, settings.batch)),
                    samples_ms=samples, paper=[f.as_dict() for f in figures],
                ))
    return measurements
