"""Does TensorRT's ONNX parser accept this graph? Checked against the support matrix kept as data in
``tensorrt_onnx_ops.json`` (transcribed from onnx-tensorrt's ``docs/operators.md``; the file names its
source and the TensorRT version it describes). Needs only ``onnx``, not TensorRT."""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

OPS_FILE = Path(__file__).with_name("tensorrt_onnx_ops.json")
ONNX_DOMAINS = ("", "ai.onnx")


class TensorRTCompatibilityError(ValueError):
    """The graph uses something TensorRT's ONNX parser does not support (the message says what)."""


@functools.lru_cache(maxsize=1)
def tensorrt_op_support() -> dict[str, Any]:
    """The parsed ``tensorrt_onnx_ops.json``: ``source``, ``tensorrt_version``, ``opset_range``,
    ``supported`` (op -> types, restrictions), ``unsupported`` and ``attribute_restrictions``."""
    with open(OPS_FILE, encoding="utf-8") as f:
        return json.load(f)


def load_onnx(onnx_path_or_model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """A ``ModelProto`` from a path (``FileNotFoundError`` when missing) or the model itself."""
    if isinstance(onnx_path_or_model, onnx.ModelProto):
        return onnx_path_or_model
    path = os.fspath(onnx_path_or_model)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX file not found: {path}")
    return onnx.load(path, load_external_data=False)


def iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph``, including those in the subgraphs of control-flow ops (If, Loop, Scan)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_nodes(sub)


def op_name(node: onnx.NodeProto) -> str:
    """``"Conv"`` for default-domain ops, ``"domain::Op"`` otherwise."""
    return node.op_type if node.domain in ONNX_DOMAINS else f"{node.domain}::{node.op_type}"


def onnx_op_counts(onnx_path_or_model: str | os.PathLike | onnx.ModelProto) -> Counter[str]:
    """How many nodes of each op (named as :func:`op_name` names them) the graph holds."""
    return Counter(op_name(n) for n in iter_nodes(load_onnx(onnx_path_or_model).graph))


def default_opset(model: onnx.ModelProto) -> int | None:
    """The opset version the model imports for the default ONNX domain (None if it imports none)."""
    for entry in model.opset_import:
        if entry.domain in ONNX_DOMAINS:
            return int(entry.version)
    return None


def _attribute_violations(node: onnx.NodeProto, allowed: dict[str, list]) -> list[str]:
    """``"Resize.mode='cubic'"``-style descriptions of attributes outside the allowed values."""
    found = []
    for attr in node.attribute:
        if attr.name not in allowed:
            continue
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        if value not in allowed[attr.name]:
            found.append(f"{node.op_type}.{attr.name}={value!r} (TensorRT allows {allowed[attr.name]})")
    return found


def tensorrt_incompatibilities(onnx_path_or_model: str | os.PathLike | onnx.ModelProto) -> list[str]:
    """Every reason TensorRT's ONNX parser would reject the graph, one line each (empty: compatible).

    Checked: the default-domain opset lies in the supported range; every op (in subgraphs too) is
    marked supported in the matrix; ops of other domains are reported (they would need a plugin);
    attributes listed under ``attribute_restrictions`` take allowed values. The matrix's type columns
    and free-text restrictions are recorded in the data file but not checked.
    """
    model = load_onnx(onnx_path_or_model)
    table = tensorrt_op_support()
    version = table["tensorrt_version"]
    problems = []
    opset = default_opset(model)
    low, high = table["opset_range"]
    if opset is None or not low <= opset <= high:
        problems.append(f"opset {opset} is outside TensorRT {version}'s range {low}..{high}")
    counts: Counter[str] = Counter()
    attribute_problems: list[str] = []
    for node in iter_nodes(model.graph):
        name = op_name(node)
        if name not in table["supported"]:
            counts[name] += 1
        restrictions = table["attribute_restrictions"].get(name)
        if restrictions:
            attribute_problems.extend(_attribute_violations(node, restrictions))
    if counts:
        listed = ", ".join(f"{op} ({n} node{'s' if n > 1 else ''})" for op, n in sorted(counts.items()))
        problems.append(f"ops TensorRT {version}'s ONNX parser does not support: {listed}")
    problems.extend(sorted(set(attribute_problems)))
    return problems


def check_tensorrt_ops(onnx_path_or_model: str | os.PathLike | onnx.ModelProto) -> None:
    """Raise :class:`TensorRTCompatibilityError` naming every unsupported op (and attribute or opset)
    of the graph; return None when TensorRT's ONNX parser supports all of it. The support matrix is
    ``tensorrt_onnx_ops.json`` (see :func:`tensorrt_incompatibilities` for what is checked)."""
    problems = tensorrt_incompatibilities(onnx_path_or_model)
    if problems:
        source = tensorrt_op_support()["source"]
        raise TensorRTCompatibilityError(
            "graph is not TensorRT-compatible: " + "; ".join(problems) + f" (support matrix: {source})"
        )
