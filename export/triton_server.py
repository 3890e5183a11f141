"""An NVIDIA Triton Inference Server model repository for a fastmlr model.

Layout (Triton's model-repository convention)::

    <repository>/<name>/config.pbtxt
    <repository>/<name>/<version>/model.onnx     (platform "onnxruntime_onnx")
    <repository>/<name>/<version>/model.plan     (platform "tensorrt_plan")

The model is exported with a dynamic batch axis; ``config.pbtxt`` declares ``max_batch_size`` and
``dynamic_batching``, so its ``dims`` leave the batch axis out. Names, data types and dims are read
from the exported ONNX graph itself, so the configuration matches the artifact it describes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto
from torch import nn

from .onnx_export import check_image_size, model_name, staging_directory, to_onnx
from .tensorrt_ops import load_onnx

#: ``--triton-platform`` choice -> (Triton ``platform``, file name in the version directory).
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "plan": ("tensorrt_plan", "model.plan")}

ONNX_TO_TRITON_TYPES = {
    TensorProto.FLOAT: "TYPE_FP32", TensorProto.FLOAT16: "TYPE_FP16", TensorProto.BFLOAT16: "TYPE_BF16",
    TensorProto.DOUBLE: "TYPE_FP64", TensorProto.INT64: "TYPE_INT64", TensorProto.INT32: "TYPE_INT32",
    TensorProto.INT8: "TYPE_INT8", TensorProto.UINT8: "TYPE_UINT8", TensorProto.BOOL: "TYPE_BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as Triton sees it: ``dims`` exclude the batch axis."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def tensor_specs(onnx_model: str | os.PathLike | onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """``(inputs, outputs)`` of a graph whose tensors all lead with a symbolic batch axis and have
    fixed other axes; ``ValueError`` otherwise (Triton's ``max_batch_size > 0`` needs exactly that)."""
    model = load_onnx(onnx_model)
    initializers = {init.name for init in model.graph.initializer}

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor_type = value.type.tensor_type
        dims = tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            raise ValueError(f"tensor {value.name!r} has no dynamic batch axis; export with dynamic_batch=True")
        rest = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims[1:])
        if -1 in rest:
            raise ValueError(f"tensor {value.name!r} has a symbolic axis besides the batch: {rest}")
        if tensor_type.elem_type not in ONNX_TO_TRITON_TYPES:
            raise ValueError(f"tensor {value.name!r} has an ONNX type Triton has no TYPE_ for: {tensor_type.elem_type}")
        return TensorSpec(value.name, ONNX_TO_TRITON_TYPES[tensor_type.elem_type], rest)

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [spec(v) for v in model.graph.output]


def _tensor_block(kind: str, specs: Sequence[TensorSpec]) -> list[str]:
    entries = []
    for spec in specs:
        dims = ", ".join(str(d) for d in spec.dims)
        entries.append(
            f'  {{\n    name: "{spec.name}"\n    data_type: {spec.data_type}\n    dims: [ {dims} ]\n  }}'
        )
    return [f"{kind} [", ",\n".join(entries), "]"]


def triton_config(
    name: str,
    *,
    platform: str | None = None,
    backend: str | None = None,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch_size: int,
    max_queue_delay_us: int = 100,
) -> str:
    """The text of ``config.pbtxt`` (protobuf text format of Triton's ``ModelConfig``): name, exactly one
    of ``platform`` (e.g. ``"onnxruntime_onnx"``) and ``backend`` (e.g. ``"python"``), ``max_batch_size``,
    inputs and outputs (name, data type, dims without the batch axis), ``dynamic_batching`` with
    ``max_queue_delay_microseconds``."""
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size}")
    if (platform is None) == (backend is None):
        raise ValueError("give exactly one of platform and backend")
    kind, value = ("platform", platform) if platform is not None else ("backend", backend)
    lines = [f'name: "{name}"', f'{kind}: "{value}"', f"max_batch_size: {max_batch_size}"]
    lines += _tensor_block("input", inputs) + _tensor_block("output", outputs)
    lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {max_queue_delay_us}", "}"]
    return "\n".join(lines) + "\n"


def write_triton_repository(
    model: nn.Module,
    repository: str | os.PathLike,
    *,
    image_size: int,
    max_batch_size: int = 8,
    name: str | None = None,
    version: int = 1,
    platform: str = "onnx",
    precision: str = "fp32",
    opset: int = 17,
    images: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    max_queue_delay_us: int = 100,
) -> Path:
    """Write (or update) ``<repository>/<name>/`` for ``model`` and return that directory.

    The model is exported with :func:`~fastmlr.export.to_onnx` (dynamic batch, validated at
    ``max_batch_size`` and ``max_batch_size + 1``); with ``platform="plan"`` it is then built into a
    TensorRT engine for batches ``1..max_batch_size`` at ``precision`` and validated again
    (:func:`~fastmlr.export.tensorrt.engine_from_onnx`; needs TensorRT and a GPU). ``name`` defaults to
    the registered model name. ``repository`` is created if its parent exists. An existing
    ``config.pbtxt`` and model file of the same version are replaced; other versions are kept.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"unknown Triton platform {platform!r}; choose one of {sorted(PLATFORMS)}")
    if platform == "onnx" and precision != "fp32":
        raise ValueError(f"precision {precision!r} applies to TensorRT plans (platform 'plan'); the ONNX is fp32")
    check_image_size(image_size)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive integer, got {version}")
    name = name or model_name(model)
    repo = Path(repository)
    if not repo.parent.is_dir():
        raise FileNotFoundError(f"cannot create the model repository {repo}: {repo.parent} is not a directory")
    if repo.exists() and not repo.is_dir():
        raise ValueError(f"model repository path {repo} exists and is not a directory")
    model_dir = repo / name
    created = not model_dir.exists()
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot write the model repository {repo}: {err.strerror or err}") from err
    try:
        _write_model_version(model, model_dir, name=name, version=version, platform=platform,
                             precision=precision, image_size=image_size, max_batch_size=max_batch_size,
                             opset=opset, images=images, max_queue_delay_us=max_queue_delay_us)
    except BaseException:
        if created:
            shutil.rmtree(model_dir, ignore_errors=True)
        raise
    return model_dir


def _write_model_version(
    model: nn.Module, model_dir: Path, *, name: str, version: int, platform: str, precision: str,
    image_size: int, max_batch_size: int, opset: int, images, max_queue_delay_us: int,
) -> None:
    """Export into a staging directory, then move the model file and ``config.pbtxt`` into place."""
    triton_platform, file_name = PLATFORMS[platform]
    version_dir = model_dir / str(version)
    with staging_directory(model_dir / "config.pbtxt") as staging:
        onnx_path = to_onnx(model, Path(staging) / "model.onnx", image_size=image_size, batch=max_batch_size,
                            dynamic_batch=True, opset=opset, images=images, precision=precision)
        inputs, outputs = tensor_specs(onnx_path)
        version_dir.mkdir(exist_ok=True)
        if platform == "plan":
            from .tensorrt import engine_from_onnx

            engine_from_onnx(onnx_path, model, version_dir / file_name, image_size=image_size,
                             precision=precision, min_batch=1, opt_batch=max_batch_size,
                             max_batch=max_batch_size, images=images)
        elif precision == "int8":  # ONNX Runtime's backend reads the file as it is: give it the CPU form
            from .precision import fold_relu_into_uint8

            graph = onnx.load(os.fspath(onnx_path))
            fold_relu_into_uint8(graph)
            onnx.save(graph, os.fspath(version_dir / file_name))
        else:
            os.replace(onnx_path, version_dir / file_name)
        config = Path(staging) / "config.pbtxt"
        config.write_text(triton_config(name, platform=triton_platform, inputs=inputs, outputs=outputs,
                                        max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us))
        os.replace(config, model_dir / "config.pbtxt")
