"""TensorRT engines from fastmlr's ONNX exports, a cache for them, and a runner on torch CUDA tensors.

Written against the TensorRT 10.12+ and 11 Python API (``tensorrt``: ``Builder``, ``OnnxParser``,
optimization profiles, ``IExecutionContext.set_tensor_address`` / ``execute_async_v3``). Every network
is **strongly typed**: each tensor has the type the ONNX graph gives it, so an engine's precision is
the graph's (:mod:`fastmlr.export.precision`: fp16/bf16 casts, INT8 Q/DQ nodes), never a builder
flag. TensorRT 11 removed the weak-typing API (``BuilderFlag.FP16/BF16/INT8/FP8``, INT8 calibrators)
and builds only strongly typed networks; 10.12–10.x asks for one with
``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; older versions are refused (:data:`MIN_TENSORRT`).

TensorRT is imported only when a function needs it; without it (or without a CUDA GPU) these
functions raise ``RuntimeError`` saying so. The pure parts — :func:`engine_cache_key`,
:func:`profile_shapes` and :func:`network_flags` — need neither.

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
from .precision import check_precision, graph_precision, uint8_activations
from .tensorrt_ops import check_tensorrt_ops, load_onnx
from .validation import (
    ValidationReport,
    find_images,
    tolerance_for,
    validate,
    validation_inputs,
)

#: The oldest TensorRT that builds strongly typed networks from ONNX (the flag came with 10.12's
#: deprecation of weak typing).
MIN_TENSORRT = (10, 12)
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


def tensorrt_version(trt) -> tuple[int, int]:  # noqa: ANN001 - the tensorrt module
    """``(major, minor)`` of the imported TensorRT (``trt.__version__``, e.g. ``"10.13.0.35"``)."""
    try:
        major, minor = (int(part) for part in trt.__version__.split(".")[:2])
    except ValueError as err:
        raise RuntimeError(f"cannot read TensorRT's version from {trt.__version__!r}") from err
    return major, minor


def network_flags(trt) -> int:  # noqa: ANN001 - the tensorrt module
    """``create_network`` flags for a strongly typed network: none on TensorRT 11+ (every network is
    strongly typed), ``STRONGLY_TYPED`` on 10.12–10.x. ``RuntimeError`` naming the minimum on older
    versions, whose strongly typed mode fastmlr does not target."""
    version = tensorrt_version(trt)
    if version < MIN_TENSORRT:
        raise RuntimeError(
            f"TensorRT {trt.__version__} is too old: fastmlr builds strongly typed networks (precision from the "
            f"ONNX graph), which needs TensorRT >= {MIN_TENSORRT[0]}.{MIN_TENSORRT[1]}; pip install -U tensorrt")
    if version[0] >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def check_engine_graph(onnx_model: str | os.PathLike | onnx.ModelProto) -> str:
    """The graph's precision, once the graph is one TensorRT builds as a strongly typed network:
    ``ValueError`` for an INT8 graph with uint8 activations (ONNX Runtime's CPU form; TensorRT's INT8
    Q/DQ is signed with zero point 0, as :func:`fastmlr.export.to_onnx` writes it)."""
    model = load_onnx(onnx_model)
    unsigned = uint8_activations(model)
    if unsigned:
        raise ValueError(
            f"this INT8 graph quantizes activations to uint8 ({len(unsigned)} QuantizeLinear nodes, e.g. "
            f"{unsigned[0]!r}), ONNX Runtime's CPU form; TensorRT builds only signed, zero-point-0 INT8: build "
            "from the graph to_onnx(..., precision='int8') writes, not from a graph rewritten for the CPU")
    return graph_precision(model)


def _write_atomically(data: bytes, path: Path) -> None:
    staged = path.with_name(f".{path.name}.partial")
    staged.write_bytes(data)
    os.replace(staged, path)


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 1,
    workspace_gb: float = 4,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Build a serialized TensorRT engine (plan) from an ONNX file and write it to ``engine_path``.

    The network is strongly typed (:func:`network_flags`): the engine computes in the types the graph
    holds, so its precision is the graph's (:func:`fastmlr.export.to_onnx` ``precision=``; read back
    from the graph's ``fastmlr.precision`` metadata). One optimization profile covers batches
    ``min_batch..max_batch`` (tuned for ``opt_batch``) on every input (:func:`profile_shapes`);
    ``workspace_gb`` caps the workspace memory pool. With ``cache_dir``, the plan is stored there
    under :func:`engine_cache_key` and reused when the same ONNX bytes, shapes, precision, TensorRT
    version and GPU come again. Raises ``ValueError`` for a graph TensorRT cannot build strongly typed
    (:func:`check_engine_graph`), ``RuntimeError`` without TensorRT 10.12+ or CUDA, or when parsing or
    building fails (with the parser's errors).
    """
    if not workspace_gb > 0:
        raise ValueError(f"workspace_gb must be positive, got {workspace_gb}")
    shapes = profile_shapes(onnx_path, min_batch, opt_batch, max_batch)
    precision = check_engine_graph(onnx_path)
    out = check_output_path(engine_path)
    trt = import_tensorrt()
    flags = network_flags(trt)
    device = require_cuda()
    cached = None
    if cache_dir is not None:
        key = engine_cache_key(file_sha256(onnx_path), input_shapes=shapes, precision=precision,
                               tensorrt_version=trt.__version__, gpu_name=torch.cuda.get_device_name(device))
        cached = Path(cache_dir) / f"{key}.plan"
        if cached.is_file():
            shutil.copyfile(cached, out)
            return out
    plan = _build_plan(trt, Path(onnx_path), shapes, flags, workspace_gb)
    _write_atomically(plan, out)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(plan, cached)
    return out


def _build_plan(trt, onnx_path: Path, shapes: dict, flags: int, workspace_gb: float) -> bytes:  # noqa: ANN001
    """Parse the ONNX file into a network created with ``flags`` and build the serialized plan. No
    precision flag is set: a strongly typed network takes its types from the graph."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
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
    ``max_batch``; the plan reaches ``engine_path`` only if all pass. ``precision`` must be the
    graph's (a strongly typed engine cannot change it): ``ValueError`` otherwise."""
    check_precision(precision)
    out = check_output_path(engine_path)
    check_tensorrt_ops(onnx_path)
    built = check_engine_graph(onnx_path)
    if built != precision:
        raise ValueError(f"{onnx_path} is a {built} graph and the engine was asked for {precision}: a strongly "
                         "typed engine computes in the graph's types; export with "
                         f"to_onnx(..., precision={precision!r})")
    with staging_directory(out) as staging:
        staged = build_engine(onnx_path, Path(staging) / out.name, min_batch=min_batch,
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
    calibration: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> Path:
    """Model to validated engine: :func:`~fastmlr.export.to_onnx` at ``precision`` (validated in ONNX
    Runtime; the batch axis is dynamic when ``min_batch != max_batch``; INT8 in TensorRT's signed
    Q/DQ form, calibrated on ``calibration``), then :func:`engine_from_onnx`."""
    check_precision(precision)
    check_batches(min_batch, opt_batch, max_batch)
    out = check_output_path(engine_path)
    import_tensorrt()
    require_cuda()
    with staging_directory(out) as staging:
        onnx_path = to_onnx(model, Path(staging) / "model.onnx", image_size=image_size, batch=opt_batch,
                            dynamic_batch=min_batch != max_batch, opset=opset, images=images, precision=precision,
                            calibration=calibration)
        return engine_from_onnx(onnx_path, model, out, image_size=image_size, precision=precision,
                                min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                                workspace_gb=workspace_gb, images=images, cache_dir=cache_dir)
