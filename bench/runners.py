"""The backends a model is timed with, each one :class:`BackendRunner` in :data:`RUNNERS`.

A runner says what this machine lacks to run it (:meth:`BackendRunner.missing`: one clause per
missing piece, naming how to get it) and builds the zero-argument callables that get timed (component
name → callable) from the fp32 CPU model and images, moving and casting them as its runtime needs:

- ``eager`` / ``compile``: the model in PyTorch (``compile``: each stage wrapped in ``torch.compile``),
  on ``--device`` at ``--precision``; MCAR is timed per component (Table IX's columns);
- ``onnxruntime``: the exported ONNX graph in an ONNX Runtime session (:func:`fastmlr.runtime.ort_session`)
  fed a host array, so on the GPU the copies are timed too;
- ``trt``: a TensorRT engine of the exported graph (:func:`fastmlr.export.build_engine`, reused from
  ``--cache-dir``), run by :class:`fastmlr.export.TRTRunner`;
- ``torch-trt``: the model compiled by :func:`fastmlr.export.compile_torch_tensorrt`.

A new backend is one more entry of :data:`RUNNERS`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.records import Settings
from bench.timing import timer_for

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Every ``--precision``: the torch dtypes, and INT8 (calibrated Q/DQ graphs: onnxruntime and trt only).
PRECISION_NAMES = (*PRECISIONS, "int8")
MCAR_COMPONENTS = ("global", "g2l", "local", "total")

Calls = dict[str, Callable[[], object]]


class Unavailable(Exception):
    """This machine cannot run the requested configuration; the message says what is missing and
    how to get it."""


def importable(module: str) -> bool:
    """True when ``import module`` works here."""
    try:
        __import__(module)
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def cxx_compiler() -> str | None:
    """The C++ compiler ``torch.compile`` would use on the CPU, ``None`` when there is none."""
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def mcar_stage_calls(model: torch.nn.Module, images: torch.Tensor, wrap: Callable) -> Calls:
    """One callable per Table IX column of an MCAR ``model`` on ``images``.

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


def torch_calls(model: torch.nn.Module, images: torch.Tensor, settings: Settings, compile: bool) -> Calls:
    """The model and images moved to ``--device`` (channels_last when asked), the backbone computing in
    ``--precision`` between float32 casts (:func:`fastmlr.export.torch_trt.with_low_precision_backbone`:
    heads and MCAR's decision path stay float32, as in the exported graphs); MCAR's components, or
    ``{"total": model(images)}``."""
    if settings.precision != "fp32":
        from fastmlr.export.torch_trt import with_low_precision_backbone

        model = with_low_precision_backbone(model, settings.precision)
    model = model.to(device=settings.device)
    images = images.to(device=settings.device)
    if settings.channels_last:  # NHWC activations: faster convolutions on CPU (oneDNN) and tensor cores
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    from fastmlr.export.validation import has_stages

    wrap = torch.compile if compile else (lambda fn: fn)
    if has_stages(model):  # MCAR: timed per Table IX column
        return mcar_stage_calls(model, images, wrap)
    forward = wrap(model)
    return {"total": lambda: forward(images)}


def export_onnx(
    model: torch.nn.Module, images: torch.Tensor, workdir: Path, precision: str = "fp32"
) -> Path:
    """:func:`fastmlr.export.to_onnx` of the fp32 CPU ``model`` at ``images``' size and batch and at
    ``precision``, into ``workdir`` (not validated: timing only). INT8 is calibrated on the packaged
    photos."""
    import warnings

    from fastmlr.export import to_onnx

    batch, _, size, _ = images.shape
    name = f"{model.model_name}-{model.backbone_name}-{size}-b{batch}-{precision}"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="calibrating INT8 ranges on the packaged")
        return to_onnx(model, workdir / f"{name}.onnx", image_size=size, batch=batch, validate=False,
                       precision=precision)


def onnxruntime_calls(model: torch.nn.Module, images: torch.Tensor, settings: Settings, workdir: Path) -> Calls:
    """An ONNX Runtime session on the model exported at ``--precision`` (``--threads`` intra-op threads)."""
    from fastmlr.export.precision import precision_session

    path = export_onnx(model, images, workdir, settings.precision)
    session = precision_session(path, device=settings.device, threads=settings.threads)
    if len(session.get_inputs()) != 1:
        raise ValueError(
            f"the exported graph {path.name} has {len(session.get_inputs())} inputs, expected 1 (images); "
            "a graph without input means the export folded the model into constants"
        )
    feed = {session.get_inputs()[0].name: images.numpy()}
    return {"total": lambda: session.run(None, feed)}


def trt_calls(model: torch.nn.Module, images: torch.Tensor, settings: Settings, workdir: Path) -> Calls:
    """A strongly typed TensorRT engine of the graph exported at ``--precision``, built for exactly this
    batch, on fp32 GPU images."""
    from fastmlr.export import TRTRunner, build_engine

    onnx_path = export_onnx(model, images, workdir, settings.precision)
    batch = images.shape[0]
    engine = build_engine(
        onnx_path,
        onnx_path.with_suffix(".engine"),
        min_batch=batch,
        opt_batch=batch,
        max_batch=batch,
        cache_dir=settings.cache_dir,
    )
    runner = TRTRunner(engine)
    images = images.to(runner.device)
    return {"total": lambda: runner(images)}


def torch_trt_calls(model: torch.nn.Module, images: torch.Tensor, settings: Settings, workdir: Path) -> Calls:
    """Torch-TensorRT with the backbone at ``--precision`` for exactly this batch, on fp32 GPU images."""
    from fastmlr.export import compile_torch_tensorrt

    batch, _, size, _ = images.shape
    compiled = compile_torch_tensorrt(
        model, image_size=size, precision=settings.precision, min_batch=batch, opt_batch=batch, max_batch=batch
    )
    images = images.to(device="cuda")
    return {"total": lambda: compiled(images)}


# ----------------------------------------------------------------------------------------------
# What each backend needs
# ----------------------------------------------------------------------------------------------


def _compile_missing(settings: Settings) -> list[str]:
    if settings.device == "cpu" and not cxx_compiler():
        return ["torch.compile on CPU needs a C++ compiler: apt-get install g++ (or set CXX)"]
    return []


def _onnxruntime_missing(settings: Settings) -> list[str]:
    from fastmlr.runtime import ort_cuda_available

    if not importable("onnxruntime"):
        return ["ONNX Runtime is not installed: pip install onnxruntime (or pip install -e '.[onnx]')"]
    missing = []
    if settings.device == "cuda" and not ort_cuda_available():
        missing.append("ONNX Runtime has no CUDAExecutionProvider: pip install onnxruntime-gpu")
    if settings.precision == "bf16" and settings.device == "cpu":
        missing.append("ONNX Runtime's CPU provider has no bf16 kernels: use --precision int8, fp32, or a GPU")
    return missing


def _trt_missing(settings: Settings) -> list[str]:
    if not importable("tensorrt"):
        return ["TensorRT is not installed: pip install tensorrt (or pip install -e '.[trt]')"]
    return []


def _torch_trt_missing(settings: Settings) -> list[str]:
    if settings.precision == "int8":
        return ["torch-trt compiles fp32/fp16/bf16; INT8 engines come from Q/DQ graphs: use --backend trt"]
    if not importable("torch_tensorrt"):
        return ["Torch-TensorRT is not installed: pip install torch-tensorrt (or pip install -e '.[trt]')"]
    return []


@dataclass(frozen=True)
class BackendRunner:
    """One backend: how to build its callables, what it needs, how it is timed.

    ``build(model, images, settings, workdir)`` returns the callables; ``requirements(settings)``
    the clauses of what is missing here; ``gpu_only`` backends need ``--device cuda``;
    ``per_component`` backends time MCAR per Table IX column (the others time it whole);
    ``own_stream`` backends run on a CUDA stream of their own (wall time with synchronisation).
    """

    name: str
    build: Callable[[torch.nn.Module, torch.Tensor, Settings, Path], Calls]
    requirements: Callable[[Settings], list[str]] = lambda settings: []
    gpu_only: bool = False
    per_component: bool = False
    own_stream: bool = False

    def timer(self, device: str) -> str:
        """The timer of :mod:`bench.timing` for this backend on ``device``."""
        return timer_for(device, own_stream=self.own_stream)

    def missing(self, settings: Settings) -> list[str]:
        """What this machine lacks to run this backend with ``settings`` (empty: it can)."""
        missing = []
        if self.gpu_only and settings.device != "cuda":
            missing.append(f"--backend {self.name} runs on NVIDIA GPUs only: use --device cuda")
        if self.per_component and settings.precision == "int8":
            missing.append("int8 runs as calibrated Q/DQ graphs: use --backend onnxruntime or trt")
        if self.per_component and settings.precision == "fp16" and settings.device == "cpu":
            missing.append("fp16 on CPU is not a deployment precision in torch: use --precision fp32 or bf16")
        return missing + self.requirements(settings)


RUNNERS: dict[str, BackendRunner] = {
    "eager": BackendRunner("eager", lambda m, x, s, w: torch_calls(m, x, s, compile=False), per_component=True),
    "compile": BackendRunner(
        "compile", lambda m, x, s, w: torch_calls(m, x, s, compile=True), _compile_missing, per_component=True
    ),
    "onnxruntime": BackendRunner("onnxruntime", onnxruntime_calls, _onnxruntime_missing, own_stream=True),
    "trt": BackendRunner("trt", trt_calls, _trt_missing, gpu_only=True),
    "torch-trt": BackendRunner("torch-trt", torch_trt_calls, _torch_trt_missing, gpu_only=True),
}
BACKENDS = tuple(RUNNERS)


def check_available(backend: str, settings: Settings) -> None:
    """Raise :class:`Unavailable` (one line: everything missing, and how to get it) when ``backend``
    cannot run with ``settings`` on this machine."""
    device = settings.device
    missing = []
    if device == "cuda" and not torch.cuda.is_available():
        missing.append(
            "torch sees no CUDA device (torch.cuda.is_available() is False): run on a machine with an "
            "NVIDIA GPU and a CUDA build of torch"
        )
    missing += RUNNERS[backend].missing(settings)
    if settings.kernels == "triton" and device != "cuda":
        missing.append(
            "--kernels triton times Triton kernels, which need --device cuda (on CPU they only run in "
            "Triton's interpreter, which is not for timing)"
        )
    if settings.precision == "bf16" and device == "cuda" and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        missing.append(f"this GPU ({torch.cuda.get_device_name(0)}) does not support bf16: use fp16 or fp32")
    if missing:
        raise Unavailable(f"--backend {backend} --device {device}: " + "; ".join(missing))
