"""``fastmlr export --format triton-server``: the model repository's layout and a ``config.pbtxt`` whose
names, data types and dims match the model's actual outputs."""

from __future__ import annotations

import os
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch
from fastmlr.export import write_triton_repository
from fastmlr.export.onnx_export import ExportWrapper, output_names
from fastmlr.export.triton_server import TensorSpec, tensor_specs, triton_config
from fastmlr.export.validation import validation_inputs
from fastmlr.kernels import use_backend
from test_export_onnx import MCAR_MARGIN, MCAR_SIZE, calibrated, small_model, tau_margin
from torch import nn

import fastmlr
from fastmlr.cli import main as fastmlr_main
from fastmlr.testing import stand_in_label_graph

NUMPY_TO_TRITON = {np.dtype("float32"): "TYPE_FP32", np.dtype("int64"): "TYPE_INT64"}


def parse_config(text: str) -> dict:
    """The fields of a config.pbtxt this repository writes: name, platform, max_batch_size, the input
    and output blocks (name -> (data_type, dims)) and whether dynamic batching is on."""
    def block(kind: str) -> dict[str, tuple[str, list[int]]]:
        body = re.search(rf"^{kind} \[\n(.*?)\n\]", text, re.S | re.M).group(1)
        entries = re.findall(r'name: "([^"]+)"\s+data_type: (\w+)\s+dims: \[ ([^\]]*) \]', body)
        return {name: (dtype, [int(d) for d in dims.split(",")]) for name, dtype, dims in entries}

    return {
        "name": re.search(r'^name: "([^"]+)"', text, re.M).group(1),
        "platform": re.search(r'^platform: "([^"]+)"', text, re.M).group(1),
        "max_batch_size": int(re.search(r"^max_batch_size: (\d+)", text, re.M).group(1)),
        "input": block("input"),
        "output": block("output"),
        "dynamic_batching": re.search(r"^dynamic_batching \{\n\s+max_queue_delay_microseconds: \d+\n\}", text,
                                      re.M) is not None,
    }


def repository_model(name: str, size: int) -> nn.Module:
    """A calibrated mobilenet_v2 model; MCAR as ``test_export_onnx`` builds it (a seed whose profiles
    stay clear of tau, so ONNX Runtime gives PyTorch's boxes)."""
    if name == "mcar":
        return small_model("mcar")
    torch.manual_seed(0)
    return calibrated(fastmlr.create_model(name, backbone="mobilenet_v2", num_classes=5, image_size=size,
                                           **stand_in_label_graph(name)))


@pytest.mark.parametrize(("name", "size"), [("baseline", 64), ("mlgcn", 64), ("mcar", MCAR_SIZE)])
def test_repository_layout_and_config_match_the_model(tmp_path, shared_images, name, size) -> None:
    model = repository_model(name, size)
    if name == "mcar":  # boxes are compared exactly: no validated profile near tau (ORT ~1e-7 off)
        validated = validation_inputs(shared_images[:1], size, (3, 4))
        assert min(tau_margin(model, images) for _, images in validated) > MCAR_MARGIN
    model_dir = write_triton_repository(model, tmp_path / "repo", image_size=size, max_batch_size=3,
                                        images=shared_images[:1])
    assert model_dir == tmp_path / "repo" / name
    assert sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")) == [
        "1", "1/model.onnx", "config.pbtxt"]
    config = parse_config((model_dir / "config.pbtxt").read_text())
    assert config["name"] == name and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 3 and config["dynamic_batching"]
    assert config["input"] == {"images": ("TYPE_FP32", [3, size, size])}
    # The model's own outputs at batch 2: config dims are their shapes without the batch axis.
    with torch.no_grad(), use_backend("torch"):
        outputs = [t.numpy() for t in ExportWrapper(model)(torch.rand(2, 3, size, size))]
    names = list(output_names(model))
    expected = {n: (NUMPY_TO_TRITON[o.dtype], list(o.shape[1:])) for n, o in zip(names, outputs, strict=True)}
    assert config["output"] == expected
    # The served file takes a batch up to max_batch_size and gives those shapes.
    session = ort.InferenceSession(os.fspath(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    served = session.run(None, {"images": np.zeros((3, 3, size, size), np.float32)})
    assert [list(o.shape) for o in served] == [[3, *config["output"][n][1]] for n in names]


def test_triton_config_text() -> None:
    text = triton_config("m", platform="tensorrt_plan", max_batch_size=8, max_queue_delay_us=50,
                         inputs=[TensorSpec("images", "TYPE_FP32", (3, 32, 32))],
                         outputs=[TensorSpec("probs", "TYPE_FP32", (80,)), TensorSpec("boxes", "TYPE_INT64", (4, 4))])
    config = parse_config(text)
    assert config["platform"] == "tensorrt_plan" and config["max_batch_size"] == 8
    assert config["output"] == {"probs": ("TYPE_FP32", [80]), "boxes": ("TYPE_INT64", [4, 4])}
    assert "max_queue_delay_microseconds: 50" in text
    with pytest.raises(ValueError, match="max_batch_size must be a positive integer"):
        triton_config("m", platform="onnxruntime_onnx", max_batch_size=0, inputs=[], outputs=[])


def test_tensor_specs_need_a_dynamic_batch(tmp_path, shared_images) -> None:
    from fastmlr.export import to_onnx

    model = fastmlr.create_model("baseline", backbone="mobilenet_v2", num_classes=5, image_size=64)
    path = to_onnx(model, tmp_path / "static.onnx", image_size=64, images=shared_images[:1], num_random=1)
    with pytest.raises(ValueError, match="no dynamic batch axis"):
        tensor_specs(path)


def test_bad_repository_arguments(tmp_path) -> None:
    model = fastmlr.create_model("baseline", backbone="mobilenet_v2", num_classes=5, image_size=64)
    with pytest.raises(ValueError, match="unknown Triton platform"):
        write_triton_repository(model, tmp_path / "repo", image_size=64, platform="tflite")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        write_triton_repository(model, tmp_path / "missing" / "repo", image_size=64)
    with pytest.raises(ValueError, match="applies to TensorRT plans"):
        write_triton_repository(model, tmp_path / "repo", image_size=64, precision="fp16")
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_the_repository(tmp_path, capsys, shared_images) -> None:
    code = fastmlr_main(["export", "--model", "baseline", "--backbone", "mobilenet_v2", "--num-classes", "3",
                         "--size", "64", "--batch", "4", "--format", "triton-server",
                         "--images", os.fspath(shared_images[0].parent), "--out", os.fspath(tmp_path / "repo")])
    assert code == 0 and "Triton Inference Server" in capsys.readouterr().out
    config = parse_config((tmp_path / "repo" / "baseline" / "config.pbtxt").read_text())
    assert config["max_batch_size"] == 4 and config["output"] == {"probs": ("TYPE_FP32", [3])}


def test_cli_triton_server_missing_parent(tmp_path, capsys) -> None:
    code = fastmlr_main(["export", "--model", "baseline", "--format", "triton-server",
                         "--out", os.fspath(tmp_path / "no" / "repo")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "parent directory is missing" in err
