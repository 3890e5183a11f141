"""Latency of fastmlr's models on the machine at hand, with the papers' figures beside ours.

    python bench/latency.py --model mcar --backend trt
    python bench/latency.py --table ix --backend eager,compile,onnxruntime --out bench/results/cpu-ix.json
    python bench/latency.py --table srdl3 --device cuda --kernels triton --out r.json --out r.md

Each configuration (model × backbone × size × backend) is built with random weights (timing does
not depend on them; ``--checkpoint`` loads real ones), fed a fixed-seed random batch, called
``--warmup`` times (the first call, timed apart as ``first_call_ms``, is where ``torch.compile``
compiles and ONNX Runtime / TensorRT initialise), then ``--iters`` times, each call timed: CUDA
events on the GPU for torch backends, ``time.perf_counter`` (after a device synchronisation on the
GPU) otherwise. We report median, p90, min, mean and images per second.

MCAR is timed per component, the columns of MCAR's Table IX: the global stream
(:meth:`MCAR.global_stream`), the global-to-local step (:meth:`MCAR.global_to_local`: top-N classes,
localization, crop-resize), the local stream (:meth:`MCAR.local_stream` on the N regions) and the
whole forward ("total"); the baseline of the same backbone and size is timed with it, for the ratio
total / baseline. Components need a torch backend (eager, compile); the exported backends time
MCAR whole.

``--table ix`` runs Table IX's grid (3 backbones × 256/448, baseline and MCAR), ``--table srdl3``
SRDL Table 3's rows (ResNet-101, 448); ``--model/--backbone/--size`` given with a table override
its grid (e.g. ``--table ix --backbone mobilenet_v2 --size 64`` for a quick check). ``--dry-run``
prints the configurations a command would time and exits.

Output: a markdown report on stdout, ``--out FILE.json|.md|.csv`` (repeatable); the JSON records
the environment (``bench/_env.py``), the settings, every measurement with its samples, the paper
figures and the derived tables. A configuration this machine cannot run (TensorRT or a GPU
missing, ...) ends the command before any timing with exit status 2 and one line saying what is
missing and how to get it; so does a bad argument. A configuration that fails while it is being
built or run (an export error, say) is reported on stderr and under ``failures`` in the output, the
others still run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from fastmlr.runtime import ort_cuda_available
from _env import capture_environment, describe_machine
from paper_tables import (
    SRDL_TABLE_3_BACKBONE,
    SRDL_TABLE_3_ROWS,
    SRDL_TABLE_3_SIZE,
    TABLE_IX_BACKBONES,
    TABLE_IX_COLUMNS,
    TABLE_IX_HEADERS,
    TABLE_IX_MS,
    TABLE_IX_SIZES,
    paper_figures,
    table_metadata,
)

import fastmlr

MODELS = ("baseline", "mcar", "srdl", "lce", "deeplift", "mlgcn", "ssgrl")
BACKBONES = ("mobilenet_v2", "resnet50", "resnet101")
BACKENDS = ("eager", "compile", "onnxruntime", "trt", "torch-trt")
TORCH_BACKENDS = ("eager", "compile")  # backends that can time MCAR's components
GPU_ONLY_BACKENDS = ("trt", "torch-trt")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MCAR_COMPONENTS = ("global", "g2l", "local", "total")
TABLES = ("ix", "srdl3")
OUT_SUFFIXES = (".json", ".md", ".csv")
# Issue 7's targets, checked at batch 1 (ratios measured in one run).
MCAR_RATIO_LIMIT = {"cpu": 5.2, "cuda": 3.0}  # MCAR total / baseline at most this
ORT_SPEEDUP_MIN = 1.2  # ONNX Runtime on CPU at least this much faster than eager


class Unavailable(Exception):
    """This machine cannot run the requested configuration; the message says what is missing and
    how to get it."""


@dataclass(frozen=True)
class Config:
    """One timed configuration."""

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


# ----------------------------------------------------------------------------------------------
# Statistics and timing
# ----------------------------------------------------------------------------------------------


def summarize(samples_ms: list[float], batch: int) -> dict:
    """Statistics of per-call times ``samples_ms`` (ms) for calls on ``batch`` images.

    ``median_ms``, ``p90_ms`` (linear interpolation between order statistics, numpy's default),
    ``min_ms``, ``mean_ms``; ``ms_per_image`` = median / batch; ``images_per_s`` = 1000·batch / median.
    """
    if not samples_ms:
        raise ValueError("summarize: no samples")
    samples = np.asarray(samples_ms, dtype=np.float64)
    median = float(np.median(samples))
    return {
        "median_ms": median,
        "p90_ms": float(np.percentile(samples, 90)),
        "min_ms": float(samples.min()),
        "mean_ms": float(samples.mean()),
        "ms_per_image": median / batch,
        "images_per_s": 1000.0 * batch / median,
    }


def time_calls(fn: Callable[[], object], iters: int, timer: str) -> list[float]:
    """Call ``fn`` ``iters`` times; return each call's time in ms.

    ``timer="cuda-events"``: CUDA events recorded on the current stream around the call, read after
    synchronising on the end event (the GPU time of torch work). ``"perf_counter+sync"``: wall time,
    the device synchronised before the start and the end. ``"perf_counter"``: wall time (CPU).
    """
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


def timer_for(backend: str, device: str) -> str:
    """The timer :func:`time_calls` uses for ``backend`` on ``device``: on the GPU, CUDA events for
    work enqueued on torch's current stream (eager, compile, Torch-TensorRT, and TensorRT through
    ``TRTRunner``, which enqueues there), wall time with synchronisation for ONNX Runtime (its CUDA
    provider runs on its own stream); wall time on the CPU."""
    if device == "cpu":
        return "perf_counter"
    return "perf_counter+sync" if backend == "onnxruntime" else "cuda-events"


# ----------------------------------------------------------------------------------------------
# Availability: one line saying what is missing and how to get it
# ----------------------------------------------------------------------------------------------


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def _export_has(*names: str) -> list[str]:
    """The names in ``names`` that ``fastmlr.export`` lacks (all of them if it does not import)."""
    try:
        import fastmlr.export as export
    except Exception:  # noqa: BLE001
        return list(names)
    return [n for n in names if not hasattr(export, n)]


def check_available(backend: str, settings: Settings) -> None:
    """Raise :class:`Unavailable` when ``backend`` cannot run with ``settings`` here."""
    device, precision = settings.device, settings.precision
    missing = []
    if device == "cuda" and not torch.cuda.is_available():
        missing.append(
            "torch sees no CUDA device (torch.cuda.is_available() is False): run on a machine with an "
            "NVIDIA GPU and a CUDA build of torch"
        )
    if backend in GPU_ONLY_BACKENDS and device != "cuda":
        missing.append(f"--backend {backend} runs on NVIDIA GPUs only: use --device cuda")
    if backend == "trt":
        if not _importable("tensorrt"):
            missing.append("TensorRT is not installed: pip install tensorrt (or pip install -e '.[trt]')")
        if lacking := _export_has("build_engine", "TRTRunner"):
            missing.append(f"fastmlr.export lacks {', '.join(lacking)}")
    if backend == "torch-trt":
        if not _importable("torch_tensorrt"):
            missing.append("Torch-TensorRT is not installed: pip install torch-tensorrt (or pip install -e '.[trt]')")
        if lacking := _export_has("compile_torch_tensorrt"):
            missing.append(f"fastmlr.export lacks {', '.join(lacking)}")
    if backend == "onnxruntime":
        if not _importable("onnxruntime"):
            missing.append("ONNX Runtime is not installed: pip install onnxruntime (or pip install -e '.[onnx]')")
        elif device == "cuda" and not ort_cuda_available():
            missing.append("ONNX Runtime has no CUDAExecutionProvider: pip install onnxruntime-gpu")
        if lacking := _export_has("to_onnx"):
            missing.append(f"fastmlr.export lacks {', '.join(lacking)}")
        if precision != "fp32":
            missing.append("--backend onnxruntime times fp32 graphs only: use --precision fp32")
    if backend == "compile":
        if device == "cpu" and not _cxx_compiler():
            missing.append("torch.compile on CPU needs a C++ compiler: apt-get install g++ (or set CXX)")
        if device == "cuda" and not _importable("triton"):
            missing.append("torch.compile on CUDA needs triton: pip install triton")
    if settings.kernels == "triton" and device != "cuda":
        missing.append(
            "--kernels triton times Triton kernels, which need --device cuda (on CPU they only run in "
            "Triton's interpreter, which is not for timing)"
        )
    if precision == "fp16" and device == "cpu" and backend in TORCH_BACKENDS:
        missing.append("fp16 on CPU is not a deployment precision in torch: use --precision fp32 or bf16")
    if precision == "bf16" and device == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        missing.append(f"this GPU ({torch.cuda.get_device_name(0)}) does not support bf16: use fp16 or fp32")
    if missing:
        raise Unavailable(f"--backend {backend} --device {device}: " + "; ".join(missing))


def _cxx_compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")


# ----------------------------------------------------------------------------------------------
# Building the callables that get timed
# ----------------------------------------------------------------------------------------------


def has_components(model: torch.nn.Module) -> bool:
    """True for models exposing MCAR's stage methods (global stream, global-to-local, local stream)."""
    return all(callable(getattr(model, m, None)) for m in ("global_stream", "global_to_local", "local_stream"))


def mcar_stage_calls(model: torch.nn.Module, images: torch.Tensor, wrap: Callable) -> dict[str, Callable[[], object]]:
    """One zero-argument callable per Table IX column of an MCAR ``model`` on ``images``.

    Each stage gets the inputs it sees in a forward (computed once here, eagerly): ``global`` runs
    :meth:`global_stream` on the images, ``g2l`` :meth:`global_to_local` on the images and the global
    outputs, ``local`` :meth:`local_stream` on the B·N regions, ``total`` the whole ``model(images)``.
    ``wrap`` is applied to each stage function (``torch.compile`` or the identity).
    """
    scores, cams = model.global_stream(images)
    _, _, regions = model.global_to_local(images, scores, cams)
    batch = images.shape[0]
    global_stream, global_to_local = wrap(model.global_stream), wrap(model.global_to_local)
    local_stream, forward = wrap(model.local_stream), wrap(model)
    return {
        "global": lambda: global_stream(images),
        "g2l": lambda: global_to_local(images, scores, cams),
        "local": lambda: local_stream(regions, batch),
        "total": lambda: forward(images),
    }


def torch_calls(
    model: torch.nn.Module, images: torch.Tensor, backend: str, settings: Settings
) -> dict[str, Callable[[], object]]:
    """``eager`` / ``compile`` callables, the model and images moved to ``--device`` and cast to
    ``--precision``: MCAR's components, or ``{"total": model(images)}``."""
    dtype = PRECISIONS[settings.precision]
    model = model.to(device=settings.device, dtype=dtype)
    images = images.to(device=settings.device, dtype=dtype)
    if settings.channels_last:  # NHWC activations: faster convolutions on CPU (oneDNN) and tensor cores
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    wrap = torch.compile if backend == "compile" else (lambda fn: fn)
    if has_components(model):
        return mcar_stage_calls(model, images, wrap)
    forward = wrap(model)
    return {"total": lambda: forward(images)}


def export_onnx(model: torch.nn.Module, images: torch.Tensor, workdir: Path) -> Path:
    """:func:`fastmlr.export.to_onnx` of the fp32 CPU ``model`` at ``images``' size and batch, into
    ``workdir`` (not validated: timing only)."""
    from fastmlr.export import to_onnx

    batch, _, size, _ = images.shape
    name = f"{getattr(model, 'model_name', 'model')}-{getattr(model, 'backbone_name', 'net')}-{size}-b{batch}"
    return to_onnx(model, workdir / f"{name}.onnx", image_size=size, batch=batch, validate=False)


def onnxruntime_calls(
    model: torch.nn.Module, images: torch.Tensor, settings: Settings, workdir: Path
) -> dict[str, Callable[[], object]]:
    """An ONNX Runtime session on the exported ``model`` (CPU execution provider, or CUDA's with
    ``--device cuda``; ``settings.threads`` intra-op threads) fed ``images`` as a host array, so on the
    GPU the copies are timed too."""
    from fastmlr.runtime import ort_session

    path = export_onnx(model, images, workdir)
    session = ort_session(path, device=settings.device, threads=settings.threads)
    if len(session.get_inputs()) != 1:
        raise ValueError(
            f"the exported graph {path.name} has {len(session.get_inputs())} inputs, expected 1 (images); "
            "a graph without input means the export folded the model into constants"
        )
    feed = {session.get_inputs()[0].name: images.numpy()}
    return {"total": lambda: session.run(None, feed)}


def trt_calls(
    model: torch.nn.Module, images: torch.Tensor, settings: Settings, workdir: Path
) -> dict[str, Callable[[], object]]:
    """A TensorRT engine of the exported ``model`` at ``--precision`` (built by
    :func:`fastmlr.export.build_engine` for exactly this batch, reused from ``--cache-dir`` when it
    was built before), run by :class:`fastmlr.export.TRTRunner` on ``images`` (fp32, on the GPU)."""
    from fastmlr.export import TRTRunner, build_engine

    onnx_path = export_onnx(model, images, workdir)
    batch = images.shape[0]
    engine = build_engine(
        onnx_path,
        onnx_path.with_suffix(f".{settings.precision}.engine"),
        precision=settings.precision,
        min_batch=batch,
        opt_batch=batch,
        max_batch=batch,
        cache_dir=settings.cache_dir,
    )
    runner = TRTRunner(engine)
    images = images.to(runner.device)
    return {"total": lambda: runner(images)}


def torch_trt_calls(
    model: torch.nn.Module, images: torch.Tensor, settings: Settings
) -> dict[str, Callable[[], object]]:
    """``model`` compiled by :func:`fastmlr.export.compile_torch_tensorrt` at ``--precision`` (which
    casts weights and expects inputs of that type) for exactly this batch, on ``images`` cast alike."""
    from fastmlr.export import compile_torch_tensorrt

    batch, _, size, _ = images.shape
    compiled = compile_torch_tensorrt(
        model, image_size=size, precision=settings.precision, min_batch=batch, opt_batch=batch, max_batch=batch
    )
    images = images.to(device="cuda", dtype=PRECISIONS[settings.precision])
    return {"total": lambda: compiled(images)}


def build_calls(
    model: torch.nn.Module, images: torch.Tensor, backend: str, settings: Settings, workdir: Path
) -> dict[str, Callable[[], object]]:
    """The callables to time for ``backend`` (component name → zero-argument callable), from the fp32
    CPU ``model`` and ``images``; each builder moves and casts them as its runtime needs."""
    if backend in TORCH_BACKENDS:
        return torch_calls(model, images, backend, settings)
    if backend == "onnxruntime":
        return onnxruntime_calls(model, images, settings, workdir)
    if backend == "trt":
        return trt_calls(model, images, settings, workdir)
    if backend == "torch-trt":
        return torch_trt_calls(model, images, settings)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


@contextlib.contextmanager
def kernels_forced(kernels: str) -> Iterator[None]:
    """``fastmlr.kernels.use_backend(kernels)`` unless ``kernels`` is ``"auto"``."""
    if kernels == "auto":
        yield
        return
    with fastmlr.kernels.use_backend(kernels):
        yield


def make_model(config: Config, settings: Settings) -> torch.nn.Module:
    """``config.model`` in eval mode, fp32 on the CPU; weights from ``--checkpoint`` for the model it
    belongs to (``settings.checkpoint_model``), random from ``settings.seed`` otherwise."""
    torch.manual_seed(settings.seed)
    model = fastmlr.create_model(
        config.model,
        backbone=config.backbone,
        num_classes=settings.num_classes,
        image_size=config.size,
        checkpoint=settings.checkpoint if config.model == settings.checkpoint_model else None,
    )
    return model.eval()


def make_images(config: Config, settings: Settings) -> torch.Tensor:
    """A fixed-seed fp32 CPU batch ``[batch, 3, size, size]`` of standard-normal pixels (as
    normalised images are)."""
    generator = torch.Generator().manual_seed(settings.seed)
    return torch.randn(settings.batch, 3, config.size, config.size, generator=generator)


def measure_config(config: Config, settings: Settings, workdir: Path, progress: Callable[[str], None]) -> list[dict]:
    """Time every component of ``config``; one measurement dict per component.

    Torch backends build their callables under ``torch.inference_mode``; the exported backends
    export outside it (tracing must see the model's ordinary eval path). Every call runs under
    ``inference_mode`` and ``--kernels``' forced backend.
    """
    model = make_model(config, settings)
    images = make_images(config, settings)
    timer = timer_for(config.backend, settings.device)
    with kernels_forced(settings.kernels):
        t0 = time.perf_counter()
        with torch.inference_mode(config.backend in TORCH_BACKENDS):
            calls = build_calls(model, images, config.backend, settings, workdir)
        setup_s = time.perf_counter() - t0
        measurements = []
        with torch.inference_mode():
            for component, fn in calls.items():
                progress(f"{config.label()} {component}: warm-up {settings.warmup}, {settings.iters} timed calls")
                first_call_ms = time_calls(fn, 1, timer)[0]
                time_calls(fn, settings.warmup - 1, timer)
                samples = time_calls(fn, settings.iters, timer)
                figures = paper_figures(config.model, component, config.backbone, config.size)
                measurements.append(
                    {
                        **asdict(config),
                        "component": component,
                        "batch": settings.batch,
                        "precision": settings.precision,
                        "device": settings.device,
                        "kernels": settings.kernels,
                        "timer": timer,
                        "setup_s": setup_s,
                        "first_call_ms": first_call_ms,
                        **summarize(samples, settings.batch),
                        "samples_ms": samples,
                        "paper": [f.as_dict() for f in figures],
                    }
                )
        return measurements


def one_line(err: BaseException) -> str:
    """``"Type: first line of the message"``, for a failure record."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


# ----------------------------------------------------------------------------------------------
# What to run
# ----------------------------------------------------------------------------------------------


def parse_list(text: str, choices: tuple[str, ...], what: str, all_means: tuple[str, ...] | None = None) -> list[str]:
    """Comma-separated ``text`` → list (order kept, duplicates dropped); ``"all"`` → ``all_means``.
    ``ValueError`` naming ``what`` and the choices for anything else."""
    items = []
    for item in (s.strip() for s in text.split(",")):
        if item == "all" and all_means is not None:
            items += all_means
        elif item in choices:
            items.append(item)
        else:
            extra = ", all" if all_means is not None else ""
            raise ValueError(f"--{what}: unknown {item!r}; choose from {', '.join(choices)}{extra}")
    return list(dict.fromkeys(items))


def parse_sizes(text: str) -> list[int]:
    """Comma-separated positive multiples of 32."""
    sizes = []
    for item in text.split(","):
        try:
            size = int(item)
        except ValueError:
            raise ValueError(f"--size: {item!r} is not an integer") from None
        if size < 32 or size % 32:
            raise ValueError(f"--size: {size} is not a positive multiple of 32 (the backbones' stride)")
        sizes.append(size)
    return list(dict.fromkeys(sizes))


def registered_models() -> list[str]:
    """The models of :data:`MODELS` that fastmlr registers (others are being written)."""
    return [m for m in MODELS if m in fastmlr.list_models()]


def plan(args: argparse.Namespace) -> tuple[list[Config], list[str]]:
    """The configurations to time, and the table models that are not registered (skipped).

    ``--table ix``: baseline and MCAR × Table IX's backbones × 256/448. ``--table srdl3``: the models
    of SRDL Table 3's rows at ResNet-101 / 448. Explicit ``--model``/``--backbone``/``--size``
    override a table's. MCAR is always timed with the baseline of the same backbone and size (for
    the ratio total / baseline). ``ValueError`` for an explicitly requested unregistered model.
    """
    available = registered_models()
    if args.table == "ix":
        models, backbones, sizes = ["baseline", "mcar"], list(TABLE_IX_BACKBONES), list(TABLE_IX_SIZES)
    elif args.table == "srdl3":
        models = list(dict.fromkeys(r.model for r in SRDL_TABLE_3_ROWS if r.model is not None))
        backbones, sizes = [SRDL_TABLE_3_BACKBONE], [SRDL_TABLE_3_SIZE]
    else:
        models, backbones, sizes = ["mcar"], ["resnet101"], [448]
    if args.model is not None:
        models = parse_list(args.model, MODELS, "model", all_means=tuple(available))
        unknown = [m for m in models if m not in available]
        if unknown:
            raise ValueError(
                f"--model: {', '.join(unknown)} not registered in fastmlr (registered: {', '.join(available)})"
            )
    if args.backbone is not None:
        backbones = parse_list(args.backbone, BACKBONES, "backbone", all_means=BACKBONES)
    if args.size is not None:
        sizes = parse_sizes(args.size)
    if "mcar" in models and "baseline" not in models:
        models.insert(0, "baseline")
    skipped = [m for m in models if m not in available]
    backends = parse_list(args.backend, BACKENDS, "backend")
    configs = [
        Config(m, bb, s, be) for bb in backbones for s in sizes for m in models if m in available for be in backends
    ]
    return configs, skipped


# ----------------------------------------------------------------------------------------------
# Derived tables: MCAR per component, SRDL Table 3, speed-ups, targets
# ----------------------------------------------------------------------------------------------


def _index(measurements: list[dict]) -> dict[tuple, dict]:
    return {(m["model"], m["component"], m["backbone"], m["size"], m["backend"]): m for m in measurements}


def mcar_breakdown(measurements: list[dict]) -> list[dict]:
    """Table IX's rows from ``measurements``: per (backbone, size, backend) with MCAR's total and the
    baseline measured, ms per image for every Table IX column measured (``None`` when not), the
    paper's P40 figures, and total / baseline for ours and the paper's."""
    index = _index(measurements)
    rows = []
    for m in measurements:
        if (m["model"], m["component"]) != ("mcar", "total"):
            continue
        key = (m["backbone"], m["size"], m["backend"])
        baseline = index.get(("baseline", "total", *key))
        if baseline is None:
            continue
        ours = {"baseline": baseline["ms_per_image"]}
        for column in MCAR_COMPONENTS:
            found = index.get(("mcar", column, *key))
            ours[column] = found["ms_per_image"] if found else None
        paper = TABLE_IX_MS.get((m["backbone"], m["size"]))
        rows.append(
            {
                "backbone": m["backbone"],
                "size": m["size"],
                "backend": m["backend"],
                "ours_ms": ours,
                "paper_ms": paper,
                "ratio_total_baseline": ours["total"] / ours["baseline"],
                "paper_ratio_total_baseline": paper["total"] / paper["baseline"] if paper else None,
            }
        )
    return rows


def srdl3_rows(measurements: list[dict], skipped: list[str]) -> list[dict]:
    """SRDL Table 3's rows with ours beside the paper's, for every (backbone, size, backend) the run
    measured (Table 3 itself is ResNet-101 at 448; other grids give the same layout): ms per image
    (``None``, with a ``status``, when the model is not implemented, not registered or not
    measured), and each row's time relative to the baseline row, ours and the paper's."""
    index = _index(measurements)
    groups = list(dict.fromkeys((m["backbone"], m["size"], m["backend"]) for m in measurements))
    paper_baseline = next(r.ms for r in SRDL_TABLE_3_ROWS if r.model == "baseline")
    rows = []
    for backbone, size, backend in groups:
        base = index.get(("baseline", "total", backbone, size, backend))
        for r in SRDL_TABLE_3_ROWS:
            found = index.get((r.model, r.component, backbone, size, backend))
            if r.model is None:
                status = "not implemented in fastmlr"
            elif r.model in skipped:
                status = "not registered yet"
            elif found is None:
                status = "not measured"
            else:
                status = "measured"
            ours = found["ms_per_image"] if found else None
            rows.append(
                {
                    "label": r.label,
                    "publication": r.publication,
                    "model": r.model,
                    "component": r.component,
                    "backbone": backbone,
                    "size": size,
                    "backend": backend,
                    "status": status,
                    "ours_ms": ours,
                    "paper_ms": r.ms,
                    "ours_vs_baseline": ours / base["ms_per_image"] if ours is not None and base else None,
                    "paper_vs_baseline": r.ms / paper_baseline,
                }
            )
    return rows


def speedups(measurements: list[dict]) -> list[dict]:
    """For every measurement of a non-eager backend whose eager twin was measured in this run:
    eager median / its median (> 1: faster than eager)."""
    index = _index(measurements)
    out = []
    for m in measurements:
        eager = index.get((m["model"], m["component"], m["backbone"], m["size"], "eager"))
        if m["backend"] != "eager" and eager is not None:
            out.append(
                {
                    "model": m["model"],
                    "component": m["component"],
                    "backbone": m["backbone"],
                    "size": m["size"],
                    "backend": m["backend"],
                    "speedup_over_eager": eager["median_ms"] / m["median_ms"],
                }
            )
    return out


def targets(breakdown: list[dict], speedup_rows: list[dict], settings: Settings) -> list[dict]:
    """Issue 7's targets as measured here (batch 1 only; ``[]`` otherwise): MCAR total / baseline at
    most 5.2 on CPU, 3 on GPU; ONNX Runtime on CPU at least 1.2× faster than eager for each model."""
    if settings.batch != 1:
        return []
    out = [
        {
            "target": "MCAR total / baseline",
            "backbone": r["backbone"],
            "size": r["size"],
            "backend": r["backend"],
            "value": r["ratio_total_baseline"],
            "limit": f"<= {MCAR_RATIO_LIMIT[settings.device]}",
            "met": r["ratio_total_baseline"] <= MCAR_RATIO_LIMIT[settings.device],
        }
        for r in breakdown
    ]
    if settings.device == "cpu":
        out += [
            {
                "target": f"ONNX Runtime speed-up over eager ({s['model']})",
                "backbone": s["backbone"],
                "size": s["size"],
                "backend": s["backend"],
                "value": s["speedup_over_eager"],
                "limit": f">= {ORT_SPEEDUP_MIN}",
                "met": s["speedup_over_eager"] >= ORT_SPEEDUP_MIN,
            }
            for s in speedup_rows
            if s["backend"] == "onnxruntime" and s["component"] == "total"
        ]
    return out


# ----------------------------------------------------------------------------------------------
# Output: markdown, CSV, JSON
# ----------------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(result: dict) -> str:
    """The report: settings and machine, every measurement, then Table IX's and SRDL Table 3's
    layouts, speed-ups over eager and the targets, where the run measured them."""
    s, env = result["settings"], result["environment"]
    parts = [
        f"## Latency: {', '.join(s['backends'])} · {s['precision']} · batch {s['batch']} · {s['device']} · "
        f"kernels {s['kernels']}" + (" · channels_last" if s.get("channels_last") else ""),
        f"Machine: {describe_machine(env)}. "
        + ", ".join(f"{k} {env['versions'][k]}" for k in ("torch", "triton", "onnxruntime", "tensorrt"))
        + ". "
        f"{s['warmup']} warm-up + {s['iters']} timed calls; ms per call of {s['batch']} image(s).",
    ]
    rows = [
        [
            m["model"],
            m["component"],
            m["backbone"],
            str(m["size"]),
            m["backend"],
            _ms(m["median_ms"]),
            _ms(m["p90_ms"]),
            _ms(m["min_ms"]),
            f"{m['images_per_s']:.1f}",
            "; ".join(f"{p['ms']:g} ({p['hardware'].split(' (')[0]})" for p in m["paper"]) or "—",
        ]
        for m in result["measurements"]
    ]
    parts.append(
        _md_table(
            [
                "model",
                "component",
                "backbone",
                "size",
                "backend",
                "median ms",
                "p90 ms",
                "min ms",
                "img/s",
                "paper ms",
            ],
            rows,
        )
    )
    if result["mcar_breakdown"]:
        parts.append("### MCAR per component (Table IX layout): ms per image, ours (paper, P40)")
        rows = []
        for r in result["mcar_breakdown"]:
            paper = r["paper_ms"] or {}
            cells = [
                f"{_ms(r['ours_ms'][c])} ({paper[c]:g})" if c in paper else _ms(r["ours_ms"][c])
                for c in TABLE_IX_COLUMNS
            ]
            ratio = f"{r['ratio_total_baseline']:.2f}×"
            if r["paper_ratio_total_baseline"] is not None:
                ratio += f" ({r['paper_ratio_total_baseline']:.2f}×)"
            rows.append([r["backbone"], str(r["size"]), r["backend"], *cells, ratio])
        headers = [
            "backbone",
            "size",
            "backend",
            *(TABLE_IX_HEADERS[c] for c in TABLE_IX_COLUMNS),
            "Total / Baseline",
        ]
        parts.append(_md_table(headers, rows))
    if result["srdl3"]:
        parts.append("### SRDL Table 3 layout: ms per image, ours vs the paper's (RTX 3070, ResNet-101, 448×448)")
        rows = [
            [
                r["label"],
                f"{r['backbone']} {r['size']}",
                r["backend"],
                _ms(r["ours_ms"]) if r["status"] == "measured" else r["status"],
                f"{r['paper_ms']:g}",
                "—" if r["ours_vs_baseline"] is None else f"{r['ours_vs_baseline']:.2f}×",
                f"{r['paper_vs_baseline']:.2f}×",
            ]
            for r in result["srdl3"]
        ]
        headers = ["method", "ours at", "backend", "ours ms", "paper ms", "ours / baseline", "paper / baseline"]
        parts.append(_md_table(headers, rows))
    if result["speedups"]:
        parts.append("### Speed-up over eager (eager median / backend median)")
        rows = [
            [
                s["model"],
                s["component"],
                s["backbone"],
                str(s["size"]),
                s["backend"],
                f"{s['speedup_over_eager']:.2f}×",
            ]
            for s in result["speedups"]
        ]
        parts.append(_md_table(["model", "component", "backbone", "size", "backend", "speed-up"], rows))
    if result["targets"]:
        parts.append("### Targets (issue 7)")
        rows = [
            [
                t["target"],
                t["backbone"],
                str(t["size"]),
                t["backend"],
                f"{t['value']:.2f}",
                t["limit"],
                "yes" if t["met"] else "**no**",
            ]
            for t in result["targets"]
        ]
        parts.append(_md_table(["target", "backbone", "size", "backend", "measured", "target", "met"], rows))
    if result["failures"]:
        parts.append("### Failed configurations")
        rows = [[f["model"], f["backbone"], str(f["size"]), f["backend"], f["error"]] for f in result["failures"]]
        parts.append(_md_table(["model", "backbone", "size", "backend", "error"], rows))
    if result["skipped_models"]:
        parts.append(f"Not registered in fastmlr yet, skipped: {', '.join(result['skipped_models'])}.")
    return "\n\n".join(parts) + "\n"


CSV_FIELDS = (
    "model",
    "component",
    "backbone",
    "size",
    "backend",
    "batch",
    "precision",
    "device",
    "kernels",
    "timer",
    "median_ms",
    "p90_ms",
    "min_ms",
    "mean_ms",
    "ms_per_image",
    "images_per_s",
    "first_call_ms",
    "setup_s",
    "paper_ms",
)


def render_csv(result: dict) -> str:
    """One line per measurement (:data:`CSV_FIELDS`); ``paper_ms`` lists ``table=ms`` pairs."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for m in result["measurements"]:
        writer.writerow({**m, "paper_ms": " ".join(f"{p['table']}={p['ms']:g}" for p in m["paper"])})
    return buffer.getvalue()


def write_outputs(result: dict, paths: list[str]) -> None:
    """Write ``result`` to each path, the format chosen by its suffix (.json, .md, .csv)."""
    render = {".json": lambda r: json.dumps(r, indent=2) + "\n", ".md": render_markdown, ".csv": render_csv}
    for path in map(Path, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render[path.suffix](result))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/latency.py",
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        help=f"comma-separated from {', '.join(MODELS)}, or all (default: mcar, which also times the baseline)",
    )
    parser.add_argument(
        "--backend", default="eager", help=f"comma-separated from {', '.join(BACKENDS)} (default eager)"
    )
    parser.add_argument("--backbone", help=f"comma-separated from {', '.join(BACKBONES)}, or all (default resnet101)")
    parser.add_argument("--size", help="image side(s), comma-separated multiples of 32 (default 448)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="default: cuda for trt/torch-trt or when a GPU is visible, else cpu",
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before timing, at least 1 (default 5)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls (default 20)")
    parser.add_argument("--table", choices=TABLES, help="ix: MCAR Table IX's grid; srdl3: SRDL Table 3's rows")
    parser.add_argument("--out", action="append", default=[], help="write results to FILE.json|.md|.csv (repeatable)")
    parser.add_argument(
        "--checkpoint", help="real weights for the run's one model (MCAR's companion baseline stays random)"
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="eager/compile: model and inputs in channels_last memory format (NHWC)",
    )
    parser.add_argument(
        "--kernels",
        choices=("auto", "torch", "triton"),
        default="auto",
        help="force fastmlr.kernels' backend for the run (default auto)",
    )
    parser.add_argument("--threads", type=int, help="torch and ONNX Runtime intra-op threads (default: torch's)")
    parser.add_argument("--num-classes", type=int, default=80, help="classes (default 80, MS-COCO)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache-dir",
        help="keep exported ONNX files and TensorRT engines here (default: a temporary directory)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the configurations and exit")
    return parser


def checkpoint_model(models: set[str]) -> str:
    """The model ``--checkpoint`` is loaded into: the one model of the run besides the baseline (which
    MCAR brings along with random weights), or the baseline when it is alone. ``ValueError`` when the
    run has several."""
    owners = sorted(models - {"baseline"}) or ["baseline"]
    if len(owners) > 1:
        raise ValueError(f"--checkpoint holds one model's weights but the run times {', '.join(owners)}")
    return owners[0]


def settings_from(args: argparse.Namespace, configs: list[Config]) -> Settings:
    """Validate the scalar options (``ValueError`` naming the bad one) and fill in the defaults that
    depend on the configurations: the device and the model a checkpoint belongs to."""
    for name in ("batch", "iters", "warmup", "num_classes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    for path in args.out:
        if Path(path).suffix not in OUT_SUFFIXES:
            raise ValueError(f"--out {path}: the suffix must be one of {', '.join(OUT_SUFFIXES)}")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file")
    device = args.device
    if device is None:
        gpu_wanted = any(c.backend in GPU_ONLY_BACKENDS for c in configs) or torch.cuda.is_available()
        device = "cuda" if gpu_wanted else "cpu"
    return Settings(
        batch=args.batch,
        precision=args.precision,
        device=device,
        warmup=args.warmup,
        iters=args.iters,
        kernels=args.kernels,
        threads=args.threads or torch.get_num_threads(),
        seed=args.seed,
        num_classes=args.num_classes,
        checkpoint=args.checkpoint,
        checkpoint_model=checkpoint_model({c.model for c in configs}) if args.checkpoint else None,
        cache_dir=args.cache_dir,
        channels_last=args.channels_last,
    )


def progress_printer(total: int) -> Callable[[str], None]:
    """A function printing ``[k/total] message`` lines on stderr, k counting calls."""
    count = 0

    def report(message: str) -> None:
        nonlocal count
        count += 1
        print(f"[{count}/{total}] {message}", file=sys.stderr, flush=True)

    return report


def run(args: argparse.Namespace) -> dict:
    """Plan, check, time and assemble the result dict (what ``--out x.json`` writes)."""
    configs, skipped = plan(args)
    backends = list(dict.fromkeys(c.backend for c in configs))
    settings = settings_from(args, configs)
    for backend in backends:
        check_available(backend, settings)
    if args.dry_run:
        return {
            "settings": asdict(settings),
            "configs": [asdict(c) for c in configs],
            "skipped_models": skipped,
        }
    torch.set_num_threads(settings.threads)
    steps = sum(len(MCAR_COMPONENTS) if c.model == "mcar" and c.backend in TORCH_BACKENDS else 1 for c in configs)
    progress = progress_printer(steps)
    measurements, failures = [], []
    with contextlib.ExitStack() as stack:
        workdir = (
            Path(settings.cache_dir) if settings.cache_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        )
        workdir.mkdir(parents=True, exist_ok=True)
        for config in configs:
            try:
                measurements += measure_config(config, settings, workdir, progress)
            except Exception as err:  # noqa: BLE001 - one failing configuration must not end a grid
                failures.append({**asdict(config), "error": one_line(err)})
                print(f"latency.py: {config.label()} failed: {one_line(err)}", file=sys.stderr, flush=True)
    breakdown = mcar_breakdown(measurements)
    speedup_rows = speedups(measurements)
    return {
        "environment": capture_environment(),
        "settings": {**asdict(settings), "backends": backends, "table": args.table, "command": sys.argv},
        "paper_tables": table_metadata(),
        "measurements": measurements,
        "mcar_breakdown": breakdown,
        "srdl3": srdl3_rows(measurements, skipped) if args.table == "srdl3" else [],
        "speedups": speedup_rows,
        "targets": targets(breakdown, speedup_rows, settings),
        "skipped_models": skipped,
        "failures": failures,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except Unavailable as err:
        print(f"latency.py: unavailable: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        print(f"latency.py: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        for c in result["configs"]:
            print(f"{c['model']} {c['backbone']} {c['size']} {c['backend']}")
        if result["skipped_models"]:
            print(f"not registered, skipped: {', '.join(result['skipped_models'])}")
        return 0
    sys.stdout.write(render_markdown(result))
    write_outputs(result, args.out)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
