"""ONNX export of every fastmlr model, validated in ONNX Runtime against PyTorch before it is written.

Exporter: torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``). In torch 2.14
the torch.export-based exporter (``dynamo=True``) cannot emit opsets below 18: asked for 17 it
silently writes 18 after its down-conversion fails. The TorchScript path emits the requested opset
(7..20) exactly, folds constants, and yields plain default-domain graphs that TensorRT's ONNX parser
takes (checked by :func:`fastmlr.export.check_tensorrt_ops`). It traces: Python control flow is
unrolled for the traced shapes, and a data-dependent Python value would be frozen into the graph —
which is why every export is validated on real and random inputs before it is kept.

Models with a ``forward_stages`` method (MCAR) are exported as one graph, global-to-local step
included, with outputs ``probs, boxes, indices`` and the stages ``global_scores, local_scores,
cam_logits`` that the stage-wise validation reads; every other model has one output, ``probs``.
Export runs the kernels on torch (``use_backend("torch")``); while the exporter traces, the kernels
switch to their trace-safe forms themselves (``fastmlr.kernels._utils.is_exporting``: the fused
attention ops leave their in-place, block-looping ``autograd.Function`` paths; image sizes read from
traced shapes are taken as ints). MCAR's global-to-local ops are written without loops,
data-dependent shapes or batch-sized constants, so they trace into static ONNX whose batch axis can
stay dynamic. The PyTorch side of validation runs the model exactly as users do (kernels on torch).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from fastmlr.kernels import use_backend
from torch import nn
from torch.onnx import symbolic_helper

from fastmlr.checks import check_image_size, check_output_file

from .precision import (
    check_calibration_method,
    check_precision,
    convert_precision,
    held_out_images,
    load_calibration,
    precision_session,
)
from .tensorrt_ops import tensorrt_op_support
from .validation import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    STAGE_OUTPUTS,
    TOLERANCES,
    ArtifactMismatchError,
    NamedRunner,
    ValidationReport,
    find_images,
    has_stages,
    output_names,
    random_batches,
    validation_inputs,
)
from .validation import validate as validate_runner

INPUT_NAME = "images"
#: The highest opset torch's TorchScript-based exporter emits (torch.onnx._constants).
MAX_TORCHSCRIPT_OPSET = 20
#: The lowest opset TensorRT's ONNX parser reads (tensorrt_onnx_ops.json, opset_range).
MIN_OPSET = tensorrt_op_support()["opset_range"][0]
_LEGACY_EXPORTER_NOTICES = (r".*legacy TorchScript-based ONNX export.*", r".*The feature will be removed.*")


class ExportWrapper(nn.Module):
    """What is exported: ``images -> (probs,)``, or :data:`STAGE_OUTPUTS` for models with
    ``forward_stages`` (MCAR). Consumers that only need the predictions read the first three."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if has_stages(self.model):
            stages = self.model.forward_stages(images)
            return tuple(getattr(stages, name) for name in STAGE_OUTPUTS)
        return (self.model(images),)


def model_name(model: nn.Module) -> str:
    return getattr(model, "model_name", type(model).__name__)


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def check_export_args(model: nn.Module, image_size: int, batch: int, opset: int) -> None:
    """``ValueError`` naming the problem: an image size that is not a positive multiple of 32 (or not
    the size a fixed-size model was built for), a batch below 1, an opset outside what the exporter
    and TensorRT read."""
    check_image_size(image_size)
    if getattr(model, "fixed_size", False) and image_size != model.image_size:
        raise ValueError(
            f"{model_name(model)} is built for {model.image_size}x{model.image_size} inputs "
            f"(its layer widths depend on the size), got image size {image_size}"
        )
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_TORCHSCRIPT_OPSET:
        raise ValueError(
            f"opset must be an integer in {MIN_OPSET}..{MAX_TORCHSCRIPT_OPSET} (TensorRT reads opsets from "
            f"{MIN_OPSET}; torch's TorchScript exporter writes up to {MAX_TORCHSCRIPT_OPSET}), got {opset}"
        )
    needed = getattr(model, "onnx_min_opset", MIN_OPSET)  # a model's own floor (MCAR: 11, LCE: 14)
    if opset < needed:
        raise ValueError(f"{model_name(model)} needs ONNX opset {needed} or later, got opset {opset}")


def check_output_path(path: str | os.PathLike, overwrite: bool = True) -> Path:
    """The output path, once :func:`fastmlr.checks.check_output_file` has found it writable: not a
    directory, its directory existing (``FileNotFoundError`` otherwise) and writable, an existing file
    replaced only with ``overwrite``."""
    return check_output_file(path, "output path", overwrite, create_dirs=False)


STAGING_PREFIX = ".fastmlr-export-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_staging(directory: Path) -> list[Path]:
    """Remove the staging directories in ``directory`` left by exports whose process is gone (killed
    before it could clean up: each name carries its process id). Returns what was removed."""
    removed = []
    for entry in directory.glob(f"{STAGING_PREFIX}*"):
        pid = entry.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if entry.is_dir() and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def staging_directory(final_path: Path) -> tempfile.TemporaryDirectory:
    """A temporary directory beside ``final_path`` (same file system, so the finished artifact is moved
    in atomically), named after this process; stale ones of dead processes are removed first
    (:func:`remove_stale_staging`). ``ValueError`` when that directory cannot be written."""
    parent = final_path.parent if str(final_path.parent) else Path(".")
    remove_stale_staging(parent)
    try:
        return tempfile.TemporaryDirectory(dir=parent, prefix=f"{STAGING_PREFIX}{os.getpid()}-")
    except OSError as err:
        raise ValueError(f"cannot write to {final_path.parent}: {err.strerror or err}") from err


def opset_error(opset: int, err: Exception) -> ValueError:
    """A one-line ValueError for an exporter failure caused by an op missing from ``opset`` (the
    exporter's first line; the rest of its message is a TorchScript IR dump)."""
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    needed = re.search(r"(?:added in version|try opset version) (\d+)", first_line)
    if needed:
        return ValueError(f"opset {opset} is below what the graph needs (opset {needed.group(1)}): {first_line}")
    return ValueError(f"the graph cannot be exported to ONNX at opset {opset}: {first_line}")


def _sort_symbolic(g, values, *args):  # noqa: ANN001, ANN202 - TorchScript symbolic signature
    """ONNX for ``aten::sort`` and ``aten::sort.stable`` (``torch.sort(..., stable=True)``, which
    torch's own symbolic rejects): TopK over the whole axis. ONNX TopK puts equal values in index order
    ("the element with the lower index appears first"), i.e. it is a stable sort."""
    dim = symbolic_helper._get_const(args[-2], "i", "dim")
    descending = bool(symbolic_helper._get_const(args[-1], "i", "descending"))
    size = symbolic_helper._get_tensor_dim_size(values, dim)
    if size is None:
        return symbolic_helper._sort_helper(g, values, dim, descending=descending)
    # A constant K (the axis is static) lets ONNX shape inference keep the other axes symbolic; K read
    # from Shape() at run time would make the exporter fall back to the traced, static batch.
    k = g.op("Constant", value_t=torch.tensor([size], dtype=torch.int64))
    return g.op("TopK", values, k, axis_i=dim, largest_i=descending, outputs=2)


@contextlib.contextmanager
def stable_sort_symbolic(opset: int) -> Iterator[None]:
    """Register :func:`_sort_symbolic` for ``aten::sort`` while exporting at ``opset``."""
    torch.onnx.register_custom_op_symbolic("aten::sort", _sort_symbolic, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::sort", opset)


@contextlib.contextmanager
def transformer_fastpath_disabled() -> Iterator[None]:
    """Turn off the fused eval-mode path of ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention``
    (``aten::_transformer_encoder_layer_fwd`` has no ONNX export), so that LCE traces into plain ops."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def export_graph(
    model: nn.Module, path: str | os.PathLike, *, image_size: int, batch: int, dynamic_batch: bool, opset: int
) -> list[str]:
    """Trace ``model`` (through :class:`ExportWrapper`, kernels on torch) into an ONNX
    file at ``path``. Returns the tracer's warnings (text), which explain most validation failures.
    Raises ``ValueError`` when ``opset`` lacks an op the graph needs."""
    wrapper = ExportWrapper(model).eval()
    names = list(output_names(model))
    # A dynamic batch is traced at 2 or more: the tracer can fold a size-1 axis into constants.
    traced_batch = max(batch, 2) if dynamic_batch else batch
    example = random_batches(image_size, traced_batch, 1)[0][1].to(model_device(model))
    dynamic_axes = {name: {0: "batch"} for name in [INPUT_NAME, *names]} if dynamic_batch else None
    with warnings.catch_warnings(record=True) as caught, use_backend("torch"), torch.no_grad(), \
            transformer_fastpath_disabled(), stable_sort_symbolic(opset):
        warnings.simplefilter("always")
        for notice in _LEGACY_EXPORTER_NOTICES:
            warnings.filterwarnings("ignore", message=notice)
        try:
            torch.onnx.export(
                wrapper, (example,), os.fspath(path), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=names, dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        except (torch.onnx.errors.UnsupportedOperatorError, torch.onnx.errors.SymbolicValueError) as err:
            raise opset_error(opset, err) from err
        declare_output_shapes(path, [tuple(t.shape) for t in wrapper(example)])
    tracer_notes = []
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning):
            first_sentence = str(w.message).split(". ")[0]
            tracer_notes.append(f"{Path(w.filename).name}:{w.lineno}: TracerWarning: {first_sentence}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return sorted(set(tracer_notes))


def declare_output_shapes(path: str | os.PathLike, shapes: Sequence[tuple[int, ...]]) -> None:
    """Write the traced outputs' sizes into the graph's output types wherever shape inference left an
    axis after the batch unknown (MCAR's ``local_scores``: a reshape to ``(batch, -1, C)`` loses C), so
    that serving configurations read fixed dims."""
    proto = onnx.load(os.fspath(path))
    changed = False
    for value, shape in zip(proto.graph.output, shapes, strict=True):
        dims = value.type.tensor_type.shape.dim
        for axis in range(1, min(len(dims), len(shape))):
            if not dims[axis].HasField("dim_value"):
                dims[axis].dim_value = int(shape[axis])
                changed = True
    if changed:
        onnx.save(proto, os.fspath(path))


def write_metadata(path: str | os.PathLike, model: nn.Module, image_size: int) -> None:
    """Record the model's name, configuration and input contract in the ONNX file's metadata."""
    proto = onnx.load(os.fspath(path))
    onnx.helper.set_model_props(proto, {
        "fastmlr.model": model_name(model),
        "fastmlr.config": json.dumps(getattr(model, "config", {}) or {}, sort_keys=True, default=str),
        "fastmlr.image_size": str(image_size),
        "fastmlr.input": f"{INPUT_NAME}: float32 [batch, 3, {image_size}, {image_size}], RGB scaled to [0, 1] "
                         f"then normalised with mean {IMAGENET_MEAN} and std {IMAGENET_STD}",
    })
    onnx.save(proto, os.fspath(path))


def onnx_runtime_runner(session) -> NamedRunner:  # noqa: ANN001 - an onnxruntime.InferenceSession
    """Runs an ONNX Runtime session: ``images -> {output name: array}``."""
    names = [o.name for o in session.get_outputs()]

    def run(images: torch.Tensor) -> dict[str, np.ndarray]:
        outputs = session.run(None, {INPUT_NAME: images.detach().cpu().numpy().astype(np.float32)})
        return dict(zip(names, outputs, strict=True))

    return run


def check_graph_interface(session, model: nn.Module, image_size: int) -> None:  # noqa: ANN001
    """:class:`~fastmlr.export.validation.ArtifactMismatchError` when the graph cannot be an export of
    ``model`` at ``image_size``: metadata naming another model, other inputs or outputs, another input
    size or class count. Checked before anything runs."""
    meta = session.get_modelmeta().custom_metadata_map
    exported_from = meta.get("fastmlr.model")
    if exported_from is not None and exported_from != model_name(model):
        raise ArtifactMismatchError(f"the ONNX graph was exported from {exported_from!r}, the model is "
                                    f"{model_name(model)!r}", stage="interface")
    inputs = session.get_inputs()
    if [i.name for i in inputs] != [INPUT_NAME]:
        raise ArtifactMismatchError(f"the ONNX graph takes inputs {[i.name for i in inputs]}, fastmlr exports "
                                    f"take [{INPUT_NAME!r}]", stage="interface")
    shape = inputs[0].shape
    fixed = [d for d in shape[-2:] if isinstance(d, int)]
    if len(shape) != 4 or any(d != image_size for d in fixed):
        raise ArtifactMismatchError(f"the ONNX graph takes images of shape {shape}, validation asked for "
                                    f"{image_size}x{image_size}", stage="interface")
    names = [o.name for o in session.get_outputs()]
    if names != list(output_names(model)):
        raise ArtifactMismatchError(f"the ONNX graph has outputs {names}, {model_name(model)} exports "
                                    f"{list(output_names(model))}: it is not an export of this model",
                                    stage="interface")
    classes = session.get_outputs()[0].shape[-1]
    num_classes = getattr(model, "num_classes", None)
    if isinstance(classes, int) and num_classes is not None and classes != num_classes:
        raise ArtifactMismatchError(f"the ONNX graph scores {classes} classes, the model {num_classes}",
                                    stage="interface")


def validate_onnx(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    image_size: int,
    batches: Sequence[int] = (1,),
    images: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    num_random: int = 2,
    tolerance: float | str = TOLERANCES["fp32"],
    notes: Sequence[str] = (),
) -> ValidationReport:
    """Run the ONNX file in ONNX Runtime and ``model`` in PyTorch on the real images (``images``: a
    directory or files; default: the packaged COCO and VOC validation photos) grouped by ``batches[0]``,
    and on ``num_random`` random batches of each size in ``batches``, and check the contract of
    :func:`~fastmlr.export.validation.validate` at ``tolerance`` (a number or a precision name).

    Returns the :class:`~fastmlr.export.validation.ValidationReport`. Raises
    :class:`~fastmlr.export.validation.ArtifactMismatchError` (a ``ValueError``) when the graph is not
    an export of ``model`` at ``image_size`` (metadata, inputs, outputs, input size, class count), and
    :class:`~fastmlr.export.validation.ExportValidationError` naming the failing stage otherwise."""
    session = precision_session(path, threads=torch.get_num_threads(), validation=True)
    check_graph_interface(session, model, image_size)
    inputs = validation_inputs(find_images(images), image_size, batches, num_random=num_random)
    return validate_runner(onnx_runtime_runner(session), model, inputs, tolerance=tolerance,
                           artifact="the ONNX export", notes=notes)


def to_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    image_size: int,
    batch: int = 1,
    dynamic_batch: bool = False,
    opset: int = 17,
    validate: bool = True,
    images: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    num_random: int = 2,
    on_validated: Callable[[ValidationReport], None] | None = None,
    precision: str = "fp32",
    calibration: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    calibration_method: str = "minmax",
    per_channel: bool = True,
) -> Path:
    """Export ``model`` to a single ONNX file at ``path`` and return the path.

    The graph takes ``images`` ``[batch, 3, S, S]`` float32 (``S = image_size``; ImageNet-normalised
    RGB) and returns ``probs`` ``[batch, C]``; for MCAR, whose global-to-local step is part of the
    graph, also ``boxes`` ``[batch, N, 4]`` and ``indices`` ``[batch, N]`` (int64), then the stages
    ``global_scores``, ``local_scores`` ``[batch, C]`` and ``cam_logits`` ``[batch, C, h, w]``
    (:data:`~fastmlr.export.validation.STAGE_OUTPUTS`; consumers may ignore them).
    ``dynamic_batch=True`` makes the batch axis symbolic (``"batch"``).

    With ``validate`` (the default) the graph is written to a temporary file beside ``path``, run in
    ONNX Runtime on the real images (``images``, default: the packaged COCO and VOC validation photos) and
    on random inputs (at ``batch``, and also ``batch + 1`` when the batch is dynamic) and checked
    against PyTorch by :func:`validate_onnx` (fp32 tolerance 1e-4; MCAR stage by stage, decisions
    exact except within their margins). Only then is it moved to ``path``, and ``on_validated``
    receives the report; a failure raises ``ExportValidationError`` (a ``RuntimeError``) naming the
    stage, the worst difference, the output, the element index and the input, and nothing is written.

    ``precision`` ``"fp16"``, ``"bf16"`` or ``"int8"`` converts the validated float32 graph
    (:mod:`fastmlr.export.precision`: backbone and heads in the low precision, inputs, outputs and
    MCAR's decision path in float32) and validates the result again, at the precision's tolerance
    (:data:`~fastmlr.export.validation.TOLERANCES`). ``int8`` calibrates its ranges on
    ``calibration`` (a directory or image files; default: the packaged COCO photos, with a warning)
    with ``calibration_method`` (``minmax``, ``entropy``, ``percentile``), weights per output channel
    with ``per_channel``; its validation images leave out those used for calibration. Its activations
    are signed with zero point 0, the form TensorRT builds and ONNX Runtime runs (on the CPU through
    :func:`~fastmlr.export.precision.fold_relu_into_uint8`, which is what is validated there).

    Bad input raises ``ValueError`` (image size not a multiple of 32, opset outside
    ``MIN_OPSET..MAX_TORCHSCRIPT_OPSET`` or below what the graph needs, unwritable directory, unknown
    precision or calibration method, calibration images that are missing or unreadable) or
    ``FileNotFoundError`` (missing output directory or image directory).
    """
    check_export_args(model, image_size, batch, opset)
    check_precision(precision)
    check_calibration_method(calibration_method)
    out = check_output_path(path)
    calibration_set = load_calibration(calibration, image_size) if precision == "int8" else None
    model.eval()
    with staging_directory(out) as staging:
        staged = Path(staging) / out.name
        notes = export_graph(model, staged, image_size=image_size, batch=batch,
                             dynamic_batch=dynamic_batch, opset=opset)
        write_metadata(staged, model, image_size)
        onnx.checker.check_model(os.fspath(staged))
        batches = (batch, batch + 1) if dynamic_batch else (batch,)
        if validate:
            report = validate_onnx(staged, model, image_size=image_size, batches=batches, images=images,
                                   num_random=num_random, notes=notes)
        if precision != "fp32":
            converted = Path(staging) / f"{precision}-{out.name}"
            convert_precision(staged, converted, precision, image_size=image_size, calibration=calibration_set,
                              calibration_method=calibration_method, per_channel=per_channel)
            staged = converted
            if validate:
                # INT8 ranges fit the calibration images; uniform noise lies outside them and is clipped, so
                # only held-out real images say how an INT8 graph drifts on the data it is made for.
                held_out = held_out_images(images, calibration_set)
                report = validate_onnx(staged, model, image_size=image_size, batches=batches, images=held_out,
                                       num_random=0 if precision == "int8" and held_out else num_random,
                                       tolerance=precision, notes=notes)
        if validate and on_validated is not None:
            on_validated(report)
        os.replace(staged, out)
    return out
