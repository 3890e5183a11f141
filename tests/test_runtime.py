"""The ONNX Runtime session factory and the validation photos shipped inside the package."""

import glob
import io
import pathlib

import numpy as np
import pytest
import tomllib
import torch
from fastmlr.export.validation import find_images

import fastmlr
from fastmlr.runtime import ort_session

pytest.importorskip("onnxruntime")

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = pathlib.Path(fastmlr.__file__).resolve().parent


def tiny_graph() -> bytes:
    buffer = io.BytesIO()
    torch.onnx.export(torch.nn.Linear(3, 2), (torch.zeros(1, 3),), buffer, input_names=["x"], dynamo=False)
    return buffer.getvalue()


@pytest.mark.parametrize("optimization", ["disabled", "basic", "extended", "all"])
def test_session_from_bytes_and_path_runs(tmp_path, optimization) -> None:
    graph = tiny_graph()
    path = tmp_path / "linear.onnx"
    path.write_bytes(graph)
    x = np.ones((1, 3), np.float32)
    from_bytes = ort_session(graph, threads=1, optimization=optimization).run(None, {"x": x})[0]
    from_path = ort_session(path, optimization=optimization).run(None, {"x": x})[0]
    np.testing.assert_array_equal(from_bytes, from_path)


def test_session_options_reach_onnx_runtime() -> None:
    session = ort_session(tiny_graph(), threads=1, optimization="basic")
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert session.get_session_options().intra_op_num_threads == 1
    assert "BASIC" in str(session.get_session_options().graph_optimization_level)
    with pytest.raises(RuntimeError, match="force_spinning_stop"):  # ONNX Runtime's default: threads keep spinning
        session.get_session_options().get_session_config_entry("session.force_spinning_stop")
    idle = ort_session(tiny_graph(), idle_spinning=False).get_session_options()
    assert idle.get_session_config_entry("session.force_spinning_stop") == "1"


@pytest.mark.parametrize("kwargs, match", [
    ({"device": "gpu"}, "unknown device 'gpu'"),
    ({"threads": 0}, "threads must be a positive int"),
    ({"threads": 2.0}, "threads must be a positive int"),
    ({"optimization": "max"}, "unknown optimization 'max'"),
])
def test_bad_arguments_raise_value_error(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        ort_session(tiny_graph(), **kwargs)


def test_model_must_exist_and_be_a_path_or_bytes(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        ort_session(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="path or the graph's bytes"):
        ort_session(123)


def test_cuda_without_the_cuda_provider_says_so() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider")
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        ort_session(tiny_graph(), device="cuda")


def test_find_images_defaults_to_the_packaged_photos() -> None:
    images = find_images()
    assert [p.parent.name for p in images] == ["coco"] * 6 + ["voc"] * 4
    assert all(p.is_relative_to(PACKAGE / "assets" / "images") for p in images)


def test_package_data_ships_every_packaged_photo() -> None:
    """Every photo find_images() returns matches a package-data pattern, so a wheel carries them."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["fastmlr"]
    shipped = {pathlib.Path(p).resolve() for pattern in patterns for p in glob.glob(str(PACKAGE / pattern))}
    assert set(find_images()) <= shipped
