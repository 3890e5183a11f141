"""Result records of the latency benchmark: what was timed, with what settings, and what came out.

Records are dataclasses; a result file stores them as ``dataclasses.asdict`` rows, which is also
what the derived tables (:mod:`bench.latency_tables`) and the plots read back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.timing import Stats


@dataclass(frozen=True)
class Config:
    """One timed configuration: a model with a backbone at an image size, on one backend."""

    model: str
    backbone: str
    size: int
    backend: str

    def label(self) -> str:
        return f"{self.model} {self.backbone} {self.size}x{self.size} {self.backend}"


@dataclass(frozen=True)
class Settings:
    """What every configuration of a run shares."""

    batch: int
    precision: str
    device: str
    warmup: int
    iters: int
    kernels: str
    threads: int
    seed: int
    num_classes: int
    checkpoint: str | None
    checkpoint_model: str | None
    cache_dir: str | None
    channels_last: bool = False


@dataclass(frozen=True)
class Measurement(Stats):
    """The times of one component (``"total"``: the whole model) of one configuration: the statistics
    of :class:`bench.timing.Stats`, and

    ``first_call_ms``, the first call, timed apart (compilation, runtime initialisation);
    ``setup_s``, the time to build what is called (export, engine build, compile wrappers);
    ``samples_ms``, every timed call; ``paper``, the papers' figures for the same thing
    (:meth:`bench.paper_tables.PaperFigure.as_dict`).
    """

    model: str
    backbone: str
    size: int
    backend: str
    component: str
    batch: int
    precision: str
    device: str
    kernels: str
    timer: str
    setup_s: float
    first_call_ms: float
    samples_ms: list[float] = field(default_factory=list)
    paper: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Failure:
    """A configuration that failed while it was built or timed; ``error`` is ``"Type: first line"``."""

    model: str
    backbone: str
    size: int
    backend: str
    error: str

    @classmethod
    def of(cls, config: Config, err: BaseException) -> Failure:
        text = str(err).strip().splitlines()
        error = f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
        return cls(config.model, config.backbone, config.size, config.backend, error)
