"""Reduced-precision ONNX graphs: INT8 through calibrated Q/DQ nodes, fp16 and bf16 through casts.

Precision lives in the graph, which is what ONNX Runtime (CPU, CUDA) and strongly typed TensorRT
networks (the only kind TensorRT 11 builds) both read:

- ``"int8"``: ONNX Runtime's static quantizer (``onnxruntime.quantization.quantize_static``) inserts
  QuantizeLinear/DequantizeLinear pairs around every Conv, MatMul and Gemm and the backbone's
  additions, activations and max-pools (:func:`quantized_nodes`), with activation ranges calibrated
  on real images (``minmax``, ``entropy`` or ``percentile``, per tensor) and weights per output
  channel (or per tensor). Activations and weights are signed with zero point 0: the only INT8 Q/DQ
  TensorRT builds, so one file serves TensorRT and ONNX Runtime. ONNX Runtime's CPU provider fuses
  integer convolutions only where a ReLU disappears into a uint8 zero point, so
  :func:`precision_session` opens an INT8 graph on the CPU through :func:`fold_relu_into_uint8`,
  which moves each ReLU into the uint8 QuantizeLinear after it; the graph on disk is unchanged.
- ``"fp16"`` / ``"bf16"``: NVIDIA ModelOpt's AutoCast (``modelopt.onnx.autocast``) converts the
  floating nodes and their weights to the low type and inserts Cast nodes at the region's borders;
  the graph's inputs and outputs stay float32.

In both, MCAR's decision path stays float32 (:func:`decision_nodes`): the classifier on the pooled
features and on the feature map (the class maps), the sigmoid, the top-N ranking, the whole
localization (profiles, min-max normalisation, interval search) and the crop coordinates and
crop-resize. Converting them would change which boxes are cropped, or where, not just the values.
The backbone, the local stream and every other model's heads run in the low precision.

On a CPU, ONNX Runtime runs INT8 graphs fast, fp16 graphs slowly (its CPU provider computes most fp16
ops by casting back to float32) and bf16 graphs not at all (no bf16 convolution), so a bf16 graph is
validated here by :func:`emulation_graph`: the same graph with every bf16 tensor held in float32 and
rounded to bf16 after each node.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

from .images import DEFAULT_IMAGES_DIR, find_images

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
#: Ops whose inputs get Q/DQ pairs: the arithmetic that dominates every model's cost.
QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")
#: Backbone ops that also get Q/DQ pairs, so that the trunk stays INT8 from one convolution to the
#: next: without them a residual Add reads float32, so the convolution before it (the last of every
#: block, and every projection shortcut) cannot end in a QuantizeLinear and ONNX Runtime runs it as a
#: float32 convolution between a DequantizeLinear and a QuantizeLinear. With them, ONNX Runtime's CPU
#: provider fuses every backbone Conv into a QLinearConv and every Add into a QLinearAdd, and a uint8
#: zero point of 0 absorbs the ReLU (or ReLU6's Clip) before it; ResNet-101 at 448 px keeps 1
#: QuantizeLinear and 1 DequantizeLinear of 139 (``bench/results/precision_cpu.md``). Only the
#: backbone's: heads keep float32 additions and activations, where a per-tensor range would be coarse.
TRUNK_OP_TYPES = ("Add", "Relu", "Clip", "MaxPool")
#: Outputs that are discrete decisions: no node that computes them from the backbone's features is
#: converted to a low precision.
DECISION_OUTPUTS = ("boxes", "indices")
#: The module scope of every model's backbone (``model.features``) in exported node names.
BACKBONE_SCOPE = "/features/"
#: The packaged photos used for calibration when none are given; the other packaged photos (``voc/``)
#: are left for validation, so that agreement is measured on images the calibration did not see.
DEFAULT_CALIBRATION_DIR = DEFAULT_IMAGES_DIR / "coco"
PRECISION_METADATA_KEY = "fastmlr.precision"

QUANT_MISSING = 'the int8 conversion needs ONNX Runtime\'s quantizer: pip install -e ".[onnx]"'
AUTOCAST_MISSING = (
    "fp16/bf16 graphs are made with NVIDIA ModelOpt's AutoCast, which is not installed: "
    'pip install -e ".[quant]"'
)


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else ``ValueError`` naming the choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    return precision


def check_calibration_method(method: str) -> str:
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {list(CALIBRATION_METHODS)}")
    return method


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration inputs: one ``[1, 3, S, S]`` float32 batch per readable image (the papers' test
    transform, ImageNet-normalised), the files they came from, and the unreadable files skipped
    (``(path, reason)``)."""

    batches: list[np.ndarray]
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def load_calibration(
    source: str | os.PathLike | Sequence[str | os.PathLike] | None, image_size: int, *, limit: int | None = None
) -> CalibrationSet:
    """Read the calibration images: a directory (every ``.jpg/.jpeg/.png`` under it) or a list of files;
    ``None`` means the packaged COCO photos (:data:`DEFAULT_CALIBRATION_DIR`), with a warning that
    ranges calibrated on 6 photos are a stand-in for a few hundred images of the deployment's data.
    At most ``limit`` images are read. Unreadable images are skipped with a warning and counted.

    ``FileNotFoundError`` for a missing directory or file; ``ValueError`` for a directory without
    images, an empty list, or when no image could be read."""
    if source is None:
        warnings.warn(
            f"calibrating INT8 ranges on the packaged validation photos ({DEFAULT_CALIBRATION_DIR}); "
            "pass calibration=DIR (--calibration) with a few hundred images of your own data for a "
            "deployment", stacklevel=3)
        source = DEFAULT_CALIBRATION_DIR
    if not isinstance(source, (str, os.PathLike)) and len(source) == 0:
        raise ValueError("int8 needs calibration images, and the list given is empty")
    from fastmlr.data import eval_transform, load_image  # PyTorch's transforms: only for calibration

    paths = find_images(source)
    if limit is not None:
        paths = paths[:limit]
    transform = eval_transform(image_size)
    batches, used, skipped = [], [], []
    for path in paths:
        try:
            image = load_image(path)
        except ValueError as err:
            skipped.append((path, str(err)))
            continue
        batches.append(transform(image).unsqueeze(0).numpy().astype(np.float32))
        used.append(path)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} of {len(paths)} calibration images as unreadable: "
                      + "; ".join(reason for _, reason in skipped[:3]) + (" ..." if len(skipped) > 3 else ""),
                      stacklevel=3)
    if not batches:
        raise ValueError(f"none of the {len(paths)} calibration images could be read")
    return CalibrationSet(batches, used, skipped)


def fold_initializer_identities(model: onnx.ModelProto) -> int:
    """Remove ``Identity`` nodes whose input is an initializer, pointing their consumers at the
    initializer itself (in place); returns how many were removed.

    The exporter writes one such node per use of a weight that several modules share (MCAR's global
    and local streams run the same backbone). The quantizer recognises weights only as initializers,
    so without this pass the local stream's weights would be quantized like activations: per tensor,
    from calibration ranges."""
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    outputs = {o.name for o in graph.output}
    renames = {}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in outputs:
            renames[node.output[0]] = node.input[0]
        else:
            keep.append(node)
    if not renames:
        return 0
    for node in keep:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    del graph.node[:]
    graph.node.extend(keep)
    return len(renames)


def separate_shared_initializers(model: onnx.ModelProto, nodes: Sequence[str]) -> int:
    """Give the nodes named in ``nodes`` their own copy (``<name>.fp32``) of every initializer they
    share with a node outside them (in place); returns how many copies were made. MCAR's classifier
    runs on the global pooled features and class maps (kept float32) and on the local stream
    (converted): a shared weight would otherwise be converted for both."""
    graph = model.graph
    keep = set(nodes)
    initializers = {init.name: init for init in graph.initializer}
    used_outside = {name for node in graph.node if node.name not in keep for name in node.input}
    copies: dict[str, str] = {}
    for node in graph.node:
        if node.name not in keep:
            continue
        for i, name in enumerate(node.input):
            if name in initializers and name in used_outside:
                if name not in copies:
                    copy = onnx.TensorProto()
                    copy.CopyFrom(initializers[name])
                    copy.name = copies[name] = f"{name}.fp32"
                    graph.initializer.append(copy)
                node.input[i] = copies[name]
    return len(copies)


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _ancestor_nodes(graph: onnx.GraphProto, tensors: Iterable[str]) -> list[onnx.NodeProto]:
    """Every node a value in ``tensors`` depends on, the producers included."""
    producers = _producers(graph)
    seen: dict[str, onnx.NodeProto] = {}
    stack = list(tensors)
    while stack:
        node = producers.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen[node.name] = node
        stack.extend(node.input)
    return list(seen.values())


def decision_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes on the graph's decision path, which stays float32: those that compute the
    decision outputs (:data:`DECISION_OUTPUTS`: MCAR's ``boxes`` and ``indices``) from the backbone's
    features (classifier, sigmoid, top-N, localization), and those that turn the decisions into the
    next backbone's input (crop coordinates and the crop-resize). The backbone itself (node scope
    :data:`BACKBONE_SCOPE`, every model's ``model.features``) is never on it. Empty for graphs
    without decision outputs (every model but MCAR)."""
    graph = model.graph
    decisions = [o.name for o in graph.output if o.name in DECISION_OUTPUTS]
    if not decisions:
        return []
    unnamed = [n for n in graph.node if not n.name]
    if unnamed:
        raise ValueError(f"the graph has {len(unnamed)} unnamed nodes; fastmlr's exports name every node")
    upstream = {n.name for n in _ancestor_nodes(graph, decisions) if BACKBONE_SCOPE not in n.name}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    downstream: set[str] = set()
    stack = [node for name in decisions for node in consumers.get(name, [])]
    while stack:
        node = stack.pop()
        if node.name in downstream or BACKBONE_SCOPE in node.name:
            continue
        downstream.add(node.name)
        stack.extend(c for out in node.output for c in consumers.get(out, []))
    return sorted(upstream | downstream)


def quantized_nodes(model: onnx.ModelProto, exclude: Sequence[str] = ()) -> list[str]:
    """The nodes :func:`quantize_int8` gives Q/DQ pairs: every :data:`QUANTIZED_OP_TYPES` node and every
    backbone (:data:`BACKBONE_SCOPE`) :data:`TRUNK_OP_TYPES` node, but those named in ``exclude``."""
    skip = set(exclude)
    return [n.name for n in model.graph.node if n.name not in skip and (
        n.op_type in QUANTIZED_OP_TYPES or (n.op_type in TRUNK_OP_TYPES and BACKBONE_SCOPE in n.name))]


class _Reader:
    """The ``CalibrationDataReader`` protocol over a list of input batches."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]) -> None:
        self._feeds = iter([{input_name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_int8(
    model: onnx.ModelProto,
    out_path: str | os.PathLike,
    calibration: CalibrationSet,
    *,
    method: str = "minmax",
    per_channel: bool = True,
    exclude: Sequence[str] = (),
) -> None:
    """Write the INT8 Q/DQ form of the float32 ``model`` to ``out_path`` (ONNX Runtime's static
    quantizer, QDQ format): Q/DQ pairs on the inputs of the :func:`quantized_nodes` (every Conv, MatMul
    and Gemm, and the backbone's Add, ReLU, Clip and MaxPool) but the nodes named in ``exclude``,
    activation ranges from running ``calibration`` through the graph with ``method``,
    activations per tensor, weights signed and symmetric per output channel (``per_channel``) or per
    tensor. Activations, like weights, are int8 with zero point 0 (see :func:`convert_precision`)."""
    try:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    except ImportError as err:
        raise RuntimeError(QUANT_MISSING) from err
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    input_name = model.graph.input[0].name
    quantize_static(
        model, os.fspath(out_path), _Reader(input_name, calibration.batches),
        quant_format=QuantFormat.QDQ, op_types_to_quantize=[*QUANTIZED_OP_TYPES, *TRUNK_OP_TYPES],
        nodes_to_quantize=quantized_nodes(model, exclude), per_channel=per_channel,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude),
        calibrate_method=methods[check_calibration_method(method)],
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )


def cast_precision(model: onnx.ModelProto, precision: str, *, exclude: Sequence[str] = ()) -> onnx.ModelProto:
    """The fp16 or bf16 form of the float32 ``model`` (NVIDIA ModelOpt AutoCast): every floating node
    but those named in ``exclude`` computes in ``precision`` on converted weights, Cast nodes sit at
    the borders, inputs and outputs stay float32.

    For fp16, AutoCast first runs the float32 graph in ONNX Runtime on random inputs and keeps in
    float32 any node whose inputs or outputs exceed 512 in magnitude (fp16 overflows at 65504, and a
    large value keeps few fractional bits); bf16 has float32's range, so that run is skipped."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as err:
        raise RuntimeError(AUTOCAST_MISSING) from err
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fastmlr-autocast-") as scratch:
        source = Path(scratch) / "fp32.onnx"
        onnx.save(model, os.fspath(source))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = convert_to_mixed_precision(
                os.fspath(source), low_precision_type=precision, nodes_to_exclude=list(exclude), keep_io_types=True,
                data_max=512 if precision == "fp16" else np.inf,
            )
    return converted


def graph_precision(model: onnx.ModelProto) -> str:
    """The precision a fastmlr graph was converted to (its ``fastmlr.precision`` metadata; float32
    when absent)."""
    meta = {p.key: p.value for p in model.metadata_props}
    return meta.get(PRECISION_METADATA_KEY, "fp32")


def set_graph_precision(model: onnx.ModelProto, precision: str) -> None:
    for prop in model.metadata_props:
        if prop.key == PRECISION_METADATA_KEY:
            prop.value = precision
            return
    model.metadata_props.add(key=PRECISION_METADATA_KEY, value=precision)


def uint8_activations(model: onnx.ModelProto) -> list[str]:
    """Names of the QuantizeLinear nodes that quantize to uint8 (ONNX Runtime's CPU form, see
    :func:`fold_relu_into_uint8`), which TensorRT does not build: its INT8 Q/DQ is signed with zero
    point 0."""
    zero_points = {init.name: init.data_type for init in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2
            and zero_points.get(n.input[2]) == TensorProto.UINT8]


def _is_zero_point(tensor: onnx.TensorProto | None, data_type: int) -> bool:
    return tensor is not None and tensor.data_type == data_type and not numpy_helper.to_array(tensor).any()


def _relu6_ceiling(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto],
                   initializers: dict[str, onnx.TensorProto]) -> float | None:
    """``c`` when ``node`` is ``Clip(x, 0, c)`` with constant bounds (a ReLU6), else ``None``."""
    def constant(name: str) -> np.ndarray | None:
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        source = producers.get(name)
        if source is not None and source.op_type == "Constant" and source.attribute[0].name == "value":
            return numpy_helper.to_array(source.attribute[0].t)
        return None

    if node.op_type != "Clip" or len(node.input) != 3:
        return None
    low, high = constant(node.input[1]), constant(node.input[2])
    return float(high) if low is not None and high is not None and float(low) == 0 else None


def fold_relu_into_uint8(model: onnx.ModelProto) -> int:
    """Rewrite, in place, an INT8 graph's signed zero-point-0 activations of ReLU (and ReLU6) outputs to
    uint8 with zero point 0, dropping the ReLU; return how many ReLUs (and max-pools of their outputs)
    were folded.

    ONNX Runtime's CPU provider fuses ``DQ → Conv → Q`` into an integer convolution, but a ReLU
    between the convolution and its QuantizeLinear (TensorRT's form: ``Conv → Q → DQ → ReLU → Q``)
    blocks the fusion, so the signed graph runs at about float32's speed there. A uint8
    QuantizeLinear with zero point 0 clamps negative inputs to 0, which is the ReLU, so each
    ``Q_a → DQ_a → ReLU → Q_b`` becomes ``Q_b`` in uint8 on the pre-activation tensor, and a MaxPool
    of such a tensor keeps uint8. With the same scale, the values are unchanged for inputs within
    ``Q_b``'s calibrated range ``[0, 127·scale]``, apart from the dropped requantization through
    ``Q_a`` (one rounding less); inputs beyond it saturate at ``255·scale`` rather than
    ``127·scale``. A ReLU6 (``Clip(x, 0, c)``) whose ``255·scale`` exceeds ``c`` gets the scale
    ``c / 255`` instead, so that saturation is its clip: finer steps than the signed graph's (the
    int32 biases of the convolutions reading it follow the new input scale). Every other signed
    activation moves to uint8 with zero point 128, which represents the same values. ResNet-101 at
    448 px and MobileNetV2 then run every Conv as a QLinearConv and every residual Add as a QLinearAdd
    (``bench/results/precision_cpu.md``; ``tests/test_export_precision.py``)."""
    graph = model.graph
    producers = _producers(graph)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {init.name: init for init in graph.initializer}

    def sole_consumer(node: onnx.NodeProto | None, op_type: str) -> onnx.NodeProto | None:
        users = consumers.get(node.output[0], []) if node is not None else []
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    def producer(name: str, op_type: str) -> onnx.NodeProto | None:
        node = producers.get(name)
        return node if node is not None and node.op_type == op_type else None

    def initializer(name: str, array: np.ndarray) -> str:
        if name not in initializers:
            initializers[name] = numpy_helper.from_array(array, name)
            graph.initializer.append(initializers[name])
        return name

    def signed_dequantizers(quantize: onnx.NodeProto) -> list[onnx.NodeProto]:
        """The DequantizeLinear nodes of a signed zero-point-0 QuantizeLinear that feeds only them, with
        its scale and zero point; ``[]`` for any other node."""
        if quantize.op_type != "QuantizeLinear" or len(quantize.input) < 3 or quantize.name in dropped or not (
                _is_zero_point(initializers.get(quantize.input[2]), TensorProto.INT8)):
            return []
        users = consumers.get(quantize.output[0], [])
        same = all(d.op_type == "DequantizeLinear" and d.input[1:] == quantize.input[1:] for d in users)
        return users if same else []

    def rescale_relu6(quantize: onnx.NodeProto, dequantizers: list[onnx.NodeProto], ceiling: float) -> None:
        """Give a ReLU6's QuantizeLinear the scale ``ceiling / 255``; an int32 bias is quantized at
        input scale × weight scale, so the biases of the Convs and Gemms reading it follow."""
        scale = numpy_helper.to_array(initializers[quantize.input[1]])
        ratio = float(scale.max()) / (ceiling / 255)
        replaced.add(quantize.input[1])
        rescaled = initializer(f"{quantize.input[1]}_relu6", np.full(scale.shape, ceiling / 255, np.float32))
        for node in (quantize, *dequantizers):
            node.input[1] = rescaled
        outputs = {d.output[0] for d in dequantizers}
        for user in (u for name in outputs for u in consumers.get(name, [])):
            has_bias = user.op_type in ("Conv", "Gemm") and len(user.input) > 2 and user.input[0] in outputs
            bias = producer(user.input[2], "DequantizeLinear") if has_bias else None
            if bias is None or bias.input[0] not in initializers or bias.input[1] not in initializers:
                continue
            replaced.update(bias.input[:2])
            values = numpy_helper.to_array(initializers[bias.input[0]]).astype(np.float64) * ratio
            bias.input[0] = initializer(f"{bias.input[0]}_relu6",
                                        np.clip(np.round(values), -2**31, 2**31 - 1).astype(np.int32))
            bias.input[1] = initializer(f"{bias.input[1]}_relu6",
                                        (numpy_helper.to_array(initializers[bias.input[1]]) / ratio).astype(np.float32))

    def retype(quantize: onnx.NodeProto, dequantizers: list[onnx.NodeProto], zero: int) -> None:
        replaced.add(quantize.input[2])
        shape = numpy_helper.to_array(initializers[quantize.input[2]]).shape
        unsigned = initializer(f"{quantize.input[2]}_uint8_{zero}", np.full(shape, zero, np.uint8))
        for node in (quantize, *dequantizers):
            node.input[2] = unsigned

    dropped, replaced, retyped = set(), set(), 0
    for quantize in list(graph.node):  # topological order: a MaxPool's input is retyped before it
        dequantizers = signed_dequantizers(quantize)
        if not dequantizers:
            continue
        activation, scale = producers.get(quantize.input[0]), initializers.get(quantize.input[1])
        ceiling = _relu6_ceiling(activation, producers, initializers) if activation is not None else None
        pool_input = producer(activation.input[0], "DequantizeLinear") if activation is not None and (
            activation.op_type == "MaxPool") else None
        if (activation is not None and (activation.op_type == "Relu" or ceiling is not None)
                and sole_consumer(activation, "QuantizeLinear") is quantize and scale is not None):
            source, folded = activation.input[0], {activation.name}
            dq_a = producer(source, "DequantizeLinear")
            q_a = producer(dq_a.input[0], "QuantizeLinear") if dq_a is not None else None
            if sole_consumer(dq_a, activation.op_type) is activation and sole_consumer(q_a, "DequantizeLinear") is dq_a:
                source, folded = q_a.input[0], folded | {dq_a.name, q_a.name}
                replaced.update(q_a.input[1:])
            quantize.input[0] = source
            dropped |= folded
            if ceiling is not None and 255 * float(numpy_helper.to_array(scale).max()) > ceiling:
                rescale_relu6(quantize, dequantizers, ceiling)
        elif pool_input is None or not _is_zero_point(initializers.get(pool_input.input[2]), TensorProto.UINT8):
            continue
        retype(quantize, dequantizers, 0)
        retyped += 1
    for quantize in list(graph.node):  # every other signed activation: the same values, shifted by 128
        dequantizers = signed_dequantizers(quantize)
        if dequantizers:
            retype(quantize, dequantizers, 128)
    kept = [n for n in graph.node if n.name not in dropped]
    used = {name for node in kept for name in node.input}
    used |= {out.name for out in graph.output}
    kept = [n for n in kept if n.op_type != "Constant" or n.output[0] in used]  # a ReLU6's bounds
    del graph.node[:]
    graph.node.extend(kept)
    live = [init for init in graph.initializer if init.name in used or init.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(live)
    return retyped


def convert_precision(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    precision: str,
    *,
    image_size: int,
    calibration: CalibrationSet | None = None,
    calibration_method: str = "minmax",
    per_channel: bool = True,
) -> list[str]:
    """Write the ``precision`` form of the float32 graph at ``fp32_path`` to ``out_path`` and return the
    names of the nodes kept in float32 as MCAR's decision path (:func:`decision_nodes`).

    ``"int8"`` needs ``calibration`` (:func:`load_calibration`). Its activations are int8 with zero
    point 0, the form TensorRT builds; ONNX Runtime's CPU provider runs it through
    :func:`fold_relu_into_uint8`."""
    check_precision(precision)
    model = onnx.load(os.fspath(fp32_path))
    fold_initializer_identities(model)
    keep = decision_nodes(model)
    separate_shared_initializers(model, keep)
    if precision == "fp32":
        converted = model
    elif precision == "int8":
        if calibration is None:
            raise ValueError("int8 needs calibration images (calibration=DIR or a list of image files)")
        import tempfile

        with tempfile.TemporaryDirectory(prefix="fastmlr-int8-") as scratch:
            quantized = Path(scratch) / "int8.onnx"
            quantize_int8(model, quantized, calibration, method=calibration_method, per_channel=per_channel,
                          exclude=keep)
            converted = onnx.load(os.fspath(quantized))
    else:
        converted = cast_precision(model, precision, exclude=keep)
    del converted.metadata_props[:]
    converted.metadata_props.extend(model.metadata_props)
    set_graph_precision(converted, precision)
    onnx.save(converted, os.fspath(out_path))
    return keep


_LOW_TYPES = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _float32_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)


def emulation_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float32 graph that computes what ``model`` (an fp16 or bf16 graph) computes, for runtimes
    without kernels of that type (ONNX Runtime's CPU provider has no bf16 convolution).

    Every fp16/bf16 tensor is held in float32 and rounded to its type where the graph produces it: a
    Cast to the low type becomes that Cast followed by a Cast back to float32, and every other node
    with a low-precision output gets the same pair after it; low-precision weights and constants are
    widened exactly. Each node thus computes in float32 on rounded inputs and rounds its result, as
    a TensorRT kernel that accumulates in float32 and stores fp16/bf16 does."""
    emulated = onnx.ModelProto()
    emulated.CopyFrom(model)
    graph = emulated.graph
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    for i, init in enumerate(graph.initializer):
        if init.data_type in _LOW_TYPES:
            graph.initializer[i].CopyFrom(_float32_tensor(init))
    nodes = []
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in _LOW_TYPES:
                attr.t.CopyFrom(_float32_tensor(attr.t))
        is_low_cast = node.op_type == "Cast" and any(a.name == "to" and a.i in _LOW_TYPES for a in node.attribute)
        rounded = []
        for k, out in enumerate(node.output):
            elem = next(a.i for a in node.attribute if a.name == "to") if is_low_cast else types.get(out)
            if elem in _LOW_TYPES:
                raw = f"{out}__float32"
                node.output[k] = raw
                rounded.append((raw, out, elem))
        if is_low_cast:
            node.attribute.remove(next(a for a in node.attribute if a.name == "to"))
            node.attribute.append(helper.make_attribute("to", TensorProto.FLOAT))
        nodes.append(node)
        for raw, out, elem in rounded:
            nodes.append(helper.make_node("Cast", [raw], [f"{out}__low"], to=elem, name=f"{out}__round"))
            nodes.append(helper.make_node("Cast", [f"{out}__low"], [out], to=TensorProto.FLOAT,
                                          name=f"{out}__widen"))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    for value in [*graph.input, *graph.output]:
        if value.type.tensor_type.elem_type in _LOW_TYPES:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    return emulated


def precision_session(
    path: str | os.PathLike, *, device: str = "cpu", threads: int | None = None, validation: bool = False,
    idle_spinning: bool = True,
):  # noqa: ANN201 - an onnxruntime.InferenceSession
    """An ONNX Runtime session (:func:`fastmlr.runtime.ort_session`) on a fastmlr graph of any
    precision. On the CPU, an INT8 graph runs through :func:`fold_relu_into_uint8`; a bf16 graph is
    refused (ONNX Runtime has no bf16 convolution there) unless
    ``validation``, which runs its :func:`emulation_graph`; an fp16 graph runs, with a warning that it
    is slow (ONNX Runtime's CPU provider computes most fp16 ops through float32 casts) unless
    ``validation``. ``threads`` and ``idle_spinning`` are :func:`~fastmlr.runtime.ort_session`'s."""
    from fastmlr.runtime import ort_session

    graph = onnx.load(os.fspath(path), load_external_data=False)
    precision = graph_precision(graph)
    if device == "cpu" and precision == "bf16":
        if not validation:
            raise ValueError(
                "ONNX Runtime's CPU provider has no bf16 kernels, so this bf16 graph cannot run on the CPU; "
                "run it with TensorRT or ONNX Runtime's CUDA provider, or export int8 (fast on CPUs) or fp32")
        load_external_data_for_model(graph, os.fspath(Path(path).parent))
        return ort_session(emulation_graph(graph).SerializeToString(), device=device, threads=threads,
                           idle_spinning=idle_spinning)
    if device == "cpu" and precision == "int8":
        load_external_data_for_model(graph, os.fspath(Path(path).parent))
        fold_relu_into_uint8(graph)
        return ort_session(graph.SerializeToString(), device=device, threads=threads, idle_spinning=idle_spinning)
    if device == "cpu" and precision == "fp16" and not validation:
        warnings.warn("running an fp16 graph on ONNX Runtime's CPU provider, which computes most fp16 ops through "
                      "float32 casts: expect it slower than fp32; fp16 graphs are for GPUs (TensorRT, CUDA), "
                      "int8 is the fast precision on CPUs", stacklevel=2)
    return ort_session(path, device=device, threads=threads, idle_spinning=idle_spinning)


@dataclass(frozen=True)
class Agreement:
    """How a reduced-precision artifact agrees with the float32 PyTorch model on held-out images:
    ``label_agreement`` the share of (image, class) pairs on the same side of ``threshold`` (a label
    is a score ≥ it; 0.5 unless given), ``top3_agreement`` the share of images with the same three top
    classes (as a set), ``max_abs_diff``
    / ``mean_abs_diff`` of the final probabilities, and for MCAR ``identical_boxes`` the share of
    regions (image, rank) with the same class and the same box (``None`` otherwise)."""

    images: int
    label_agreement: float
    top3_agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    identical_boxes: float | None
    threshold: float = 0.5

    def describe(self) -> str:
        boxes = "" if self.identical_boxes is None else f", identical boxes {100 * self.identical_boxes:.1f}%"
        return (f"on {self.images} held-out images: labels at {self.threshold:g} agree "
                f"{100 * self.label_agreement:.2f}%, "
                f"top-3 {100 * self.top3_agreement:.1f}%, |Δprob| max {self.max_abs_diff:.3g} "
                f"mean {self.mean_abs_diff:.3g}{boxes}")


def agreement(
    outputs: Sequence[dict[str, np.ndarray]], references: Sequence[dict[str, np.ndarray]], *, threshold: float = 0.5
) -> Agreement:
    """:class:`Agreement` of an artifact's outputs with the reference's, batch by batch (``probs``, and
    ``boxes`` / ``indices`` where present), labels taken at ``threshold``."""
    probs = np.concatenate([np.asarray(o["probs"], np.float64) for o in outputs])
    ref = np.concatenate([np.asarray(r["probs"], np.float64) for r in references])
    if probs.shape != ref.shape or probs.size == 0:
        raise ValueError(f"cannot compare probabilities of shapes {probs.shape} and {ref.shape}")
    diff = np.abs(probs - ref)
    top3 = [set(np.argsort(-p, kind="stable")[:3]) == set(np.argsort(-r, kind="stable")[:3])
            for p, r in zip(probs, ref, strict=True)]
    boxes = None
    if all("boxes" in o for o in outputs) and all("boxes" in r for r in references):
        same = [np.all(o["boxes"] == r["boxes"], axis=-1) & (o["indices"] == r["indices"])
                for o, r in zip(outputs, references, strict=True)]
        boxes = float(np.concatenate([s.reshape(-1) for s in same]).mean())
    return Agreement(len(probs), float(((probs >= threshold) == (ref >= threshold)).mean()), float(np.mean(top3)),
                     float(diff.max()), float(diff.mean()), boxes, threshold)


def held_out_images(
    images: str | os.PathLike | Sequence[str | os.PathLike] | None, calibration: CalibrationSet | None
) -> list[Path]:
    """The validation images (:func:`~fastmlr.export.validation.find_images`) without those used for
    calibration, so that agreement is measured on images the ranges were not fitted to. Empty, with a
    warning, when every validation image was a calibration image (validation then runs on random
    inputs only)."""
    paths = find_images(images)
    if calibration is None:
        return paths
    used = set(calibration_images_among(paths, calibration.paths))
    held_out = [p for p in paths if p not in used]
    if not held_out:
        warnings.warn("every validation image was used for calibration; the int8 graph is validated on random "
                      "inputs only: pass images= (--images) that the calibration did not see", stacklevel=3)
    return held_out


def calibration_images_among(images: Sequence[Path], calibration: Sequence[Path]) -> list[Path]:
    """The images of ``images`` (in order) that are calibration images: the same file as one of
    ``calibration`` (resolved path) or a copy of one, under any name (the same bytes: the packaged
    COCO photos are COCO val2014 images)."""
    used = {p.resolve() for p in calibration}
    sizes: dict[int, list[Path]] = {}
    for path in calibration:
        sizes.setdefault(path.stat().st_size, []).append(path)
    digests: dict[Path, str] = {}

    def digest(path: Path) -> str:
        if path not in digests:
            digests[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        return digests[path]

    found = []
    for path in map(Path, images):
        same_size = sizes.get(path.stat().st_size, [])
        if path.resolve() in used or any(digest(path) == digest(c) for c in same_size):
            found.append(path)
    return found
