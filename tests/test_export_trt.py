"""TensorRT: the op-support check (data and logic), the engine cache key and optimization profile
(pure, no TensorRT needed), the Triton-kernel plugin redirection for torch-tensorrt (traced on CPU),
and — where ``tensorrt`` / ``torch_tensorrt`` and CUDA exist — engines built, run and cached.

TensorRT cannot be installed on fastmlr's development, CI or measurement machines, so the last group
skips there with that reason."""

from __future__ import annotations

import importlib.util
import json

import onnx
import pytest
import torch
from fastmlr.export import TensorRTCompatibilityError, build_engine, check_tensorrt_ops, engine_cache_key, to_onnx
from fastmlr.export.onnx_export import ExportWrapper
from fastmlr.export.tensorrt import TENSORRT_MISSING, profile_shapes
from fastmlr.export.tensorrt_ops import OPS_FILE, tensorrt_incompatibilities
from fastmlr.export.torch_trt import NAMESPACE, input_checks_skipped, plugin_kernels
from fastmlr.kernels import use_backend
from onnx import TensorProto, helper

import fastmlr
from fastmlr import kernels

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_TORCH_TENSORRT = importlib.util.find_spec("torch_tensorrt") is not None
requires_tensorrt = pytest.mark.skipif(
    not (HAS_TENSORRT and torch.cuda.is_available()),
    reason="needs the tensorrt package and a CUDA GPU (TensorRT cannot be installed on fastmlr's dev/CI machines)",
)
requires_torch_tensorrt = pytest.mark.skipif(
    not (HAS_TORCH_TENSORRT and torch.cuda.is_available()),
    reason="needs torch_tensorrt and a CUDA GPU (TensorRT cannot be installed on fastmlr's dev/CI machines)",
)


def tiny_graph(nodes, opset: int = 17, outputs=("y",)) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    ys = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs]
    graph = helper.make_graph(nodes, "g", [x], ys)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_support_matrix_names_its_source_and_version() -> None:
    table = json.loads(OPS_FILE.read_text())
    assert "onnx-tensorrt" in table["source"] and "operators.md" in table["source"]
    assert table["tensorrt_version"] == "10.15" and table["opset_range"] == [9, 24]
    # ops MCAR's graph relies on, as the matrix lists them
    assert {"TopK", "GatherElements", "CumSum", "ArgMax", "Conv", "Sigmoid"} <= set(table["supported"])
    assert "Unique" in table["unsupported"] and "Unique" not in table["supported"]


def test_check_accepts_a_supported_graph() -> None:
    check_tensorrt_ops(tiny_graph([helper.make_node("Relu", ["x"], ["y"])]))


def test_check_names_unsupported_ops_domains_attributes_and_opset() -> None:
    graph = tiny_graph(
        [
            helper.make_node("Unique", ["x"], ["u"]),
            helper.make_node("MyPlugin", ["x"], ["p"], domain="com.example"),
            helper.make_node("TopK", ["x", "k"], ["y", "i"], sorted=0),
        ],
        opset=8,
        outputs=("u", "p", "y"),
    )
    problems = tensorrt_incompatibilities(graph)
    assert any("opset 8 is outside" in p for p in problems)
    assert any("Unique (1 node)" in p and "com.example::MyPlugin (1 node)" in p for p in problems)
    assert any("TopK.sorted=0" in p for p in problems)
    with pytest.raises(TensorRTCompatibilityError, match="Unique"):
        check_tensorrt_ops(graph)


def test_check_looks_into_subgraphs() -> None:
    branch = helper.make_graph([helper.make_node("NonMaxSuppression", ["x"], ["z"]),
                                helper.make_node("Unique", ["x"], ["w"])], "b", [],
                               [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    with pytest.raises(TensorRTCompatibilityError, match=r"Unique \(2 nodes\)"):
        check_tensorrt_ops(tiny_graph([node]))


def test_check_missing_file() -> None:
    with pytest.raises(FileNotFoundError):
        check_tensorrt_ops("/nonexistent/model.onnx")


def test_engine_cache_key_is_pure_and_covers_every_field() -> None:
    shapes = {"images": ((1, 3, 448, 448), (4, 3, 448, 448), (8, 3, 448, 448))}
    base = {"input_shapes": shapes, "precision": "fp16", "tensorrt_version": "10.15.1", "gpu_name": "NVIDIA H100"}
    key = engine_cache_key("abc", **base)
    assert key == engine_cache_key("abc", **base) and len(key) == 64
    variants = [
        ("abd", base),
        ("abc", {**base, "input_shapes": {"images": ((1, 3, 448, 448),) * 3}}),
        ("abc", {**base, "precision": "fp32"}),
        ("abc", {**base, "tensorrt_version": "10.14"}),
        ("abc", {**base, "gpu_name": "NVIDIA H200"}),
    ]
    assert len({engine_cache_key(h, **kw) for h, kw in variants} | {key}) == len(variants) + 1
    with pytest.raises(ValueError, match="unknown precision"):
        engine_cache_key("abc", **{**base, "precision": "int3"})


@pytest.fixture(scope="module")
def baseline_onnx(tmp_path_factory, shared_images):
    model = fastmlr.create_model("baseline", backbone="mobilenet_v2", num_classes=4, image_size=64)
    folder = tmp_path_factory.mktemp("trt")
    static = to_onnx(model, folder / "static.onnx", image_size=64, images=shared_images[:1], num_random=1)
    dynamic = to_onnx(model, folder / "dynamic.onnx", image_size=64, dynamic_batch=True,
                      images=shared_images[:1], num_random=1)
    return model, static, dynamic


def test_profile_shapes(baseline_onnx) -> None:
    _, static, dynamic = baseline_onnx
    assert profile_shapes(dynamic, 1, 4, 8) == {"images": ((1, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64))}
    assert profile_shapes(static, 1, 1, 1) == {"images": ((1, 3, 64, 64),) * 3}
    with pytest.raises(ValueError, match="batch is fixed to 1; export it with dynamic_batch=True"):
        profile_shapes(static, 1, 2, 4)
    with pytest.raises(ValueError, match="min_batch <= opt_batch <= max_batch"):
        profile_shapes(dynamic, 4, 2, 8)


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message shown where tensorrt is missing")
def test_build_engine_without_tensorrt_says_how_to_install(baseline_onnx, tmp_path) -> None:
    _, static, _ = baseline_onnx
    with pytest.raises(RuntimeError, match="TensorRT is not installed: pip install fastmlr\\[trt\\]") as info:
        build_engine(static, tmp_path / "m.plan")
    assert str(info.value) == TENSORRT_MISSING
    assert not (tmp_path / "m.plan").exists()


def test_plugin_kernels_route_mcar_through_custom_ops() -> None:
    """torch-tensorrt path, as far as it runs without TensorRT: inside ``plugin_kernels`` MCAR calls the
    ``fastmlr_trt`` custom ops (Triton kernels, here in Triton's CPU interpreter), gives the same boxes,
    and ``torch.export`` records one opaque op per kernel — what torch-tensorrt turns into plugins."""
    torch.manual_seed(0)
    model = fastmlr.create_model("mcar", backbone="mobilenet_v2", num_classes=6, image_size=96, topn=2).eval()
    images = torch.rand(2, 3, 96, 96)
    with torch.no_grad(), use_backend("torch"):
        expected = model.forward_stages(images)
    original = kernels.localize_regions
    with torch.no_grad(), plugin_kernels() as names:
        assert names == ["localize_regions", "crop_resize"] and kernels.localize_regions is not original
        routed = model.forward_stages(images)
        with input_checks_skipped(model):
            program = torch.export.export(ExportWrapper(model), (images,))
    assert kernels.localize_regions is original  # restored
    assert torch.equal(routed.boxes, expected.boxes) and torch.equal(routed.indices, expected.indices)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {f"{NAMESPACE}.localize_regions.default", f"{NAMESPACE}.crop_resize.default"} <= targets


@requires_tensorrt
def test_engine_build_run_and_cache(baseline_onnx, tmp_path) -> None:  # pragma: no cover - needs TensorRT
    from fastmlr.export import TRTRunner, validate_engine

    model, _, dynamic = baseline_onnx
    cache = tmp_path / "cache"
    plan = build_engine(dynamic, tmp_path / "m.plan", min_batch=1, opt_batch=2, max_batch=4, cache_dir=cache)
    assert len(list(cache.glob("*.plan"))) == 1
    again = build_engine(dynamic, tmp_path / "again.plan", min_batch=1, opt_batch=2, max_batch=4, cache_dir=cache)
    assert again.read_bytes() == plan.read_bytes()
    runner = TRTRunner(plan)
    images = torch.rand(3, 3, 64, 64, device="cuda")
    probs = runner(images)["probs"]
    with torch.no_grad():
        expected = model.cuda()(images)
    torch.testing.assert_close(probs, expected, atol=1e-4, rtol=0)
    validate_engine(plan, model, image_size=64, precision="fp32", batches=(2, 1, 4))


@requires_torch_tensorrt
def test_torch_tensorrt_keeps_triton_kernels_as_plugins() -> None:  # pragma: no cover - needs TensorRT
    from fastmlr.export import compile_torch_tensorrt

    model = fastmlr.create_model("mcar", backbone="mobilenet_v2", num_classes=6, image_size=96, topn=2).eval()
    compiled = compile_torch_tensorrt(model, image_size=96, min_batch=1, opt_batch=2, max_batch=2)
    images = torch.rand(2, 3, 96, 96, device="cuda")
    probs, boxes, *_ = compiled(images)
    with torch.no_grad():
        expected = model.cuda().forward_stages(images)
    assert torch.equal(boxes, expected.boxes)
    torch.testing.assert_close(probs, expected.probs, atol=1e-4, rtol=0)



class FakeTensorRT:
    """A stand-in ``tensorrt`` module of a given version that records what the builder is asked for.
    Its ``BuilderFlag`` has none of the weak-typing flags TensorRT 11 removed, so code that still sets
    ``BuilderFlag.FP16/BF16/INT8/FP8`` fails with ``AttributeError`` as it would on TensorRT 11."""

    class BuilderFlag:  # the flags TensorRT 11 keeps (no FP16, BF16, INT8, FP8)
        REFIT = 1
        SPARSE_WEIGHTS = 2

    class MemoryPoolType:
        WORKSPACE = 0

    class Logger:
        WARNING = 2

        def __init__(self, severity: int) -> None:
            pass

    def __init__(self, version: str) -> None:
        self.__version__ = version
        self.created_with: list[int] = []
        self.flags_set: list[object] = []
        if version.startswith("10."):
            self.NetworkDefinitionCreationFlag = type("NetworkDefinitionCreationFlag", (), {"STRONGLY_TYPED": 5})
        fake = self

        class Config:
            def set_memory_pool_limit(self, pool, size) -> None:  # noqa: ANN001
                pass

            def set_flag(self, flag) -> None:  # noqa: ANN001
                fake.flags_set.append(flag)

            def add_optimization_profile(self, profile) -> None:  # noqa: ANN001
                pass

        class Profile:
            def set_shape(self, name, smallest, optimal, largest) -> None:  # noqa: ANN001
                pass

        class Builder:
            def __init__(self, logger) -> None:  # noqa: ANN001
                pass

            def create_network(self, flags: int) -> object:
                fake.created_with.append(flags)
                return object()

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network, config) -> bytes:  # noqa: ANN001
                return b"plan"

        class OnnxParser:
            def __init__(self, network, logger) -> None:  # noqa: ANN001
                pass

            def parse_from_file(self, path: str) -> bool:
                return True

        self.Builder, self.OnnxParser = Builder, OnnxParser


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """Install a :class:`FakeTensorRT` of the version asked for (and a stand-in CUDA device)."""
    from fastmlr.export import tensorrt as trt_module

    def install(version: str) -> FakeTensorRT:
        fake = FakeTensorRT(version)
        monkeypatch.setattr(trt_module, "import_tensorrt", lambda: fake)
        monkeypatch.setattr(trt_module, "require_cuda", lambda: torch.device("cpu"))
        return fake

    return install


@pytest.mark.parametrize(("version", "flags"), [("11.4.0.1", 0), ("10.13.2.6", 1 << 5), ("10.12.0.36", 1 << 5)])
def test_engines_are_strongly_typed_without_precision_flags(baseline_onnx, fake_tensorrt, tmp_path, version,
                                                           flags) -> None:
    from fastmlr.export.precision import set_graph_precision

    _, static, _ = baseline_onnx
    for precision in ("fp32", "fp16", "bf16"):
        graph = onnx.load(static)
        set_graph_precision(graph, precision)
        path = tmp_path / f"{precision}.onnx"
        onnx.save(graph, path)
        fake = fake_tensorrt(version)
        plan = build_engine(path, tmp_path / f"{precision}.plan")
        assert plan.read_bytes() == b"plan"
        assert fake.created_with == [flags] and fake.flags_set == []


def test_tensorrt_older_than_10_12_is_refused_naming_the_minimum(baseline_onnx, fake_tensorrt, tmp_path) -> None:
    _, static, _ = baseline_onnx
    fake_tensorrt("10.8.0.43")
    with pytest.raises(RuntimeError, match=r"TensorRT 10\.8\.0\.43 is too old.*needs TensorRT >= 10\.12"):
        build_engine(static, tmp_path / "m.plan")
    assert not (tmp_path / "m.plan").exists()


def test_uint8_int8_graph_is_refused_for_tensorrt(fake_tensorrt, tmp_path) -> None:
    zero = helper.make_tensor("zp", TensorProto.UINT8, [], [128])
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="quant_x"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dequant_x")]
    graph = tiny_graph(nodes)
    graph.graph.initializer.extend([zero, scale])
    path = tmp_path / "int8.onnx"
    onnx.save(graph, path)
    fake_tensorrt("11.4.0.1")
    with pytest.raises(ValueError, match="uint8.*TensorRT builds only signed"):
        build_engine(path, tmp_path / "m.plan", min_batch=1, opt_batch=1, max_batch=1)


def test_no_weak_typing_api_in_the_engine_code() -> None:
    """TensorRT 11 removed the weak-typing API: no code path may reference it."""
    import ast
    import inspect

    from fastmlr.export import tensorrt as trt_module
    from fastmlr.export import torch_trt

    for module in (trt_module, torch_trt):
        tree = ast.parse(inspect.getsource(module))
        flags = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                 and isinstance(node.value, ast.Attribute) and node.value.attr == "BuilderFlag"}
        assert not flags & {"FP16", "BF16", "INT8", "FP8"}, module.__name__
        names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        names |= {k.arg for node in ast.walk(tree) if isinstance(node, ast.Call) for k in node.keywords}
        assert not names & {"IInt8Calibrator", "IInt8EntropyCalibrator2", "int8_calibrator",
                            "enabled_precisions"}, module.__name__


def test_torch_tensorrt_low_precision_is_the_backbone_alone() -> None:
    from fastmlr.export import compile_torch_tensorrt
    from fastmlr.export.torch_trt import with_low_precision_backbone

    model = fastmlr.create_model("mcar", backbone="mobilenet_v2", num_classes=6, image_size=64).eval()
    low = with_low_precision_backbone(model, "bf16")
    assert {p.dtype for p in low.features.parameters()} == {torch.bfloat16}
    assert low.convclass.weight.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        stages = low.forward_stages(torch.rand(1, 3, 64, 64))  # float32 images in, float32 out
    assert stages.probs.dtype == stages.cam_logits.dtype == torch.float32
    assert with_low_precision_backbone(model, "fp32") is model
    with pytest.raises(ValueError, match="INT8 engines are built from calibrated Q/DQ ONNX graphs"):
        compile_torch_tensorrt(model, image_size=64, precision="int8")
