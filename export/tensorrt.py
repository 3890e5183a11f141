"""TensorRT engines from fastmlr's ONNX exports, a cache for them, and a runner on torch CUDA tensors.

Written against the TensorRT 10 Python API (``tensorrt``: ``Builder``, ``OnnxParser``, optimization
profiles, ``IExecutionContext.set_tensor_address`` / ``execute_async_v3``). TensorRT is imported only
when a function needs it; without it (or without a CUDA GPU) these functions raise ``RuntimeError``
saying so. The pure parts — :func:`engine_cache_key` and :func:`profile_shapes` — need neither.

This code has not run here: TensorRT cannot be installed on fastmlr's development, CI or measurement
machines. Its tests skip with that reason where ``tensorrt`` or CUDA is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from torch import nn

from .onnx_export import (
    check_output_path,
    staging_directory,
    to_onnx,
)
from .tensorrt_ops import check_tensorrt_ops, load_onnx
from .validation import (
    ValidationReport,
    find_images,
    tolerance_for,
    validate,
    validation_inputs,
)

PRECISIONS = ("fp32", "fp16", "bf16")
TENSORRT_MISSING = "TensorRT is not installed: pip install fastmlr[trt] on a machine with an NVIDIA GPU"

Shape = tuple[int, ...]


def import_tensorrt():
    """The ``tensorrt`` module, or ``RuntimeError`` (:data:`TENSORRT_MISSING`)."""
    try:
        import tensorrt
    except ImportError as err:
        raise RuntimeError(TENSORRT_MISSING) from err
    return tensorrt


def require_cuda() -> torch.device:
    """The current CUDA device, or ``RuntimeError`` when torch sees no CUDA GPU."""
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT needs an NVIDIA GPU, and torch sees no CUDA device here")
    return torch.device("cuda", torch.cuda.current_device())


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    return precision


def check_batches(min_batch: int, opt_batch: int, max_batch: int) -> None:
    """``ValueError`` unless ``1 <= min_batch <= opt_batch <= max_batch`` (integers)."""
    values = (min_batch, opt_batch, max_batch)
    integers = all(isinstance(b, int) and not isinstance(b, bool) for b in values)
    if not integers or not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(
            f"batch sizes must be integers with 1 <= min_batch <= opt_batch <= max_batch, got "
            f"min_batch={min_batch}, opt_batch={opt_batch}, max_batch={max_batch}"
        )


def profile_shapes(
    onnx_model: str | os.PathLike | onnx.ModelProto, min_batch: int, opt_batch: int, max_batch: int
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """The optimization profile: for every graph input, its ``(min, opt, max)`` shapes with the batch
    (axis 0) set to ``min_batch`` / ``opt_batch`` / ``max_batch`` and the other axes as the graph fixes
    them. ``ValueError`` when another axis is symbolic, or when the graph's batch is fixed to a value
    the three batch sizes do not all equal (export with ``dynamic_batch=True`` for a range)."""
    check_batches(min_batch, opt_batch, max_batch)
    model = load_onnx(onnx_model)
    initializers = {init.name for init in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        rest = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims[1:])
        if None in rest:
            raise ValueError(f"input {value.name!r} has a symbolic axis other than the batch: {rest}")
        if dims[0].HasField("dim_value") and {min_batch, opt_batch, max_batch} != {dims[0].dim_value}:
            raise ValueError(
                f"the ONNX graph's batch is fixed to {dims[0].dim_value}; export it with dynamic_batch=True "
                f"to build an engine for batches {min_batch}..{max_batch}"
            )
        shapes[value.name] = tuple((b, *rest) for b in (min_batch, opt_batch, max_batch))
    return shapes


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def engine_cache_key(
    model_hash: str,
    *,
    input_shapes: dict[str, tuple[Shape, Shape, Shape]],
    precision: str,
    tensorrt_version: str,
    gpu_name: str,
) -> str:
    """The cache key of an engine: hex SHA-256 of the ONNX file's hash, the profile's (min, opt, max)
    shapes of every input, the precision, the TensorRT version and the GPU name — everything an engine
    plan is specific to. Pure; equal arguments give equal keys."""
    check_precision(precision)
    fields = {
        "model": model_hash,
        "shapes": {name: [list(s) for s in triple] for name, triple in sorted(input_shapes.items())},
        "precision": precision,
        "tensorrt": tensorrt_version,
        "gpu": gpu_name,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _explicit_batch_flags(trt) -> int:
    """Network creation flags: explicit batch (the only mode of TensorRT 10; a flag before it)."""
    if int(trt.__version__.split(".")[0]) >= 10:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def _write_atomically(data: bytes, path: Path) -> None:
    staged = path.with_name(f".{path.name}.partial")
    staged.write_bytes(data)
    os.replace(staged, path)


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    precision: str = "fp32",
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 1,
    workspace_gb: float = 4,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Build a serialized TensorRT engine (plan) from an ONNX file and write it to ``engine_path``.

    One optimization profile covers batches ``min_batch..max_batch`` (tuned for ``opt_batch``) on
    every input (:func:`profile_shapes`). ``precision`` ``"fp16"`` / ``"bf16"`` sets the builder flag
    that lets TensorRT pick kernels of that type (layers may stay in fp32); ``workspace_gb`` caps the
    workspace memory pool. With ``cache_dir``, the plan is stored there under
    :func:`engine_cache_key` and reused when the same ONNX bytes, shapes, precision, TensorRT version
    and GPU come again. Raises ``RuntimeError`` without TensorRT or CUDA, or when parsing or building
    fails (with the parser's errors).
    """
    check_precision(precision)
    if not workspace_gb > 0:
        raise ValueError(f"workspace_gb must be positive, got {workspace_gb}")
    shapes = profile_shapes(onnx_path, min_batch, opt_batch, max_batch)
    out = check_output_path(engine_path)
    trt = import_tensorrt()
    device = require_cuda()
    cached = None
    if cache_dir is not None:
        key = engine_cache_key(file_sha256(onnx_path), input_shapes=shapes, precision=precision,
                               tensorrt_version=trt.__version__, gpu_name=torch.cuda.get_device_name(device))
        cached = Path(cache_dir) / f"{key}.plan"
        if cached.is_file():
            shutil.copyfile(cached, out)
            return out
    plan = _build_plan(trt, Path(onnx_path), shapes, precision, workspace_gb)
    _write_atomically(plan, out)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(plan, cached)
    return out


def _build_plan(trt, onnx_path: Path, shapes: dict, precision: str, workspace_gb: float) -> bytes:
    """Parse the ONNX file and build the serialized plan (TensorRT Python API)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_explicit_batch_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    for name, (smallest, optimal, largest) in shapes.items():
        profile.set_shape(name, smallest, optimal, largest)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} (see TensorRT's log above)")
    return bytes(plan)


def _torch_dtype(trt, dtype) -> torch.dtype:
    """The torch dtype of a TensorRT ``DataType``."""
    table = {
        trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
        trt.DataType.INT8: torch.int8, trt.DataType.BOOL: torch.bool, trt.DataType.UINT8: torch.uint8,
    }
    for name, torch_dtype in (("BF16", torch.bfloat16), ("INT64", torch.int64)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = torch_dtype
    if dtype not in table:
        raise RuntimeError(f"TensorRT tensor type {dtype} has no torch equivalent here")
    return table[dtype]


class TRTRunner:
    """Runs a serialized engine on torch CUDA tensors.

    ``runner(images)`` binds the inputs' and freshly allocated outputs' device addresses to the
    execution context and enqueues the engine with ``execute_async_v3`` on the current torch CUDA
    stream, so the call is ordered with surrounding torch work like any torch op (no synchronisation).
    Returns ``{output name: tensor}``. ``input_names`` / ``output_names`` list the engine's I/O tensors.
    """

    def __init__(self, engine_path: str | os.PathLike) -> None:
        self._trt = trt = import_tensorrt()
        self.device = require_cuda()
        path = Path(engine_path)
        if not path.is_file():
            raise FileNotFoundError(f"TensorRT engine not found: {path}")
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(
                f"TensorRT could not deserialize {path} (built by another TensorRT version or for another GPU?)"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]

    def __call__(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"the engine takes {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        bound = []
        for name, tensor in zip(self.input_names, inputs, strict=True):
            dtype = _torch_dtype(self._trt, self.engine.get_tensor_dtype(name))
            tensor = tensor.to(self.device, dtype).contiguous()
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(f"input {name!r} shape {tuple(tensor.shape)} is outside the engine's profile")
            self.context.set_tensor_address(name, tensor.data_ptr())
            bound.append(tensor)
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _torch_dtype(self._trt, self.engine.get_tensor_dtype(name))
            outputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT failed to enqueue the engine (execute_async_v3 returned False)")
        return outputs


def validate_engine(
    engine_path: str | os.PathLike,
    model: nn.Module,
    *,
    image_size: int,
    precision: str,
    batches: Sequence[int] = (1,),
    images: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    num_random: int = 2,
) -> ValidationReport:
    """Run the engine (:class:`TRTRunner`) and ``model`` (PyTorch, kernels on their torch references)
    on the real images and random inputs, and check the contract of
    :func:`~fastmlr.export.validation.validate` at :func:`~fastmlr.export.validation.tolerance_for`
    ``(precision)``. Returns the report; raises ``ExportValidationError`` naming the failing stage."""
    runner = TRTRunner(engine_path)

    def run(images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = runner(images)
        torch.cuda.current_stream(runner.device).synchronize()
        return outputs

    inputs = validation_inputs(find_images(images), image_size, batches, num_random=num_random)
    return validate(run, model, inputs, tolerance=tolerance_for(precision), artifact=f"the TensorRT {precision} engine")


def engine_from_onnx(
    onnx_path: str | os.PathLike,
    model: nn.Module,
    engine_path: str | os.PathLike,
    *,
    image_size: int,
    precision: str = "fp32",
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 1,
    workspace_gb: float = 4,
    images: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """ONNX export of ``model`` to validated engine: :func:`~fastmlr.export.check_tensorrt_ops`,
    :func:`build_engine`, then :func:`validate_engine` at ``opt_batch``, ``min_batch`` and
    ``max_batch``; the plan reaches ``engine_path`` only if all pass."""
    out = check_output_path(engine_path)
    check_tensorrt_ops(onnx_path)
    with staging_directory(out) as staging:
        staged = build_engine(onnx_path, Path(staging) / out.name, precision=precision, min_batch=min_batch,
                              opt_batch=opt_batch, max_batch=max_batch, workspace_gb=workspace_gb,
                              cache_dir=cache_dir)
        batches = sorted({opt_batch, min_batch, max_batch}, key=lambda b: b != opt_batch)
        validate_engine(staged, model, image_size=image_size, precision=precision, batches=batches, images=images)
        os.replace(staged, out)
    return out


def export_engine(
    model: nn.Module,
    engine_path: str | os.PathLike,
    *,
    image_size: int,
    precision: str = "fp32",
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 1,
    opset: int = 17,
    workspace_gb: float = 4,
    images: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Model to validated engine: :func:`~fastmlr.export.to_onnx` (validated in ONNX Runtime; the batch
    axis is dynamic when ``min_batch != max_batch``), then :func:`engine_from_onnx`."""
    check_precision(precision)
    check_batches(min_batch, opt_batch, max_batch)
    out = check_output_path(engine_path)
    import_tensorrt()
    require_cuda()
    with staging_directory(out) as staging:
        onnx_path = to_onnx(model, Path(staging) / "model.onnx", image_size=image_size, batch=opt_batch,
                            dynamic_batch=min_batch != max_batch, opset=opset, images=images)
        return engine_from_onnx(onnx_path, model, out, image_size=image_size, precision=precision,
                                min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                                workspace_gb=workspace_gb, images=images, cache_dir=cache_dir)
