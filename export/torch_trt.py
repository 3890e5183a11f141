"""torch-tensorrt compilation that keeps fastmlr's Triton kernels inside the TensorRT engine as plugins.

MCAR's global-to-local step (``fastmlr.kernels.localize_regions`` and ``crop_resize``) has Triton
kernels. Here each is wrapped as a ``torch.library.custom_op`` (namespace ``fastmlr_trt``) whose body
runs the kernel with the Triton backend, with a fake (meta) implementation giving its output shape.
``torch_tensorrt.dynamo.conversion.plugins.custom_op`` then generates, from that op, a TensorRT Quick
Deployable Plugin (QDP, TensorRT >= 10.7; JIT: TensorRT calls back into the op on its own stream) and
the converter that places the plugin in the engine — so the compiled module has no graph break at
the kernels (torch-tensorrt's "automatically generate a plugin for a custom kernel" workflow).

While the model is traced, :func:`plugin_kernels` routes ``fastmlr.kernels.<op>`` calls to the custom
ops; the custom ops call the kernels' own functions, so no kernel logic is repeated here.

This code has not run here: neither torch-tensorrt nor TensorRT can be installed on fastmlr's
development, CI or measurement machines. ``compile_torch_tensorrt`` raises ``RuntimeError`` saying so
where they are missing.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
from fastmlr.kernels import use_backend
from torch import nn

from fastmlr import kernels
from fastmlr.checks import check_images

from .onnx_export import ExportWrapper, check_image_size, transformer_fastpath_disabled
from .precision import check_precision
from .tensorrt import check_batches, require_cuda

TORCH_TENSORRT_MISSING = "torch-tensorrt is not installed: pip install fastmlr[trt] on a machine with an NVIDIA GPU"
NAMESPACE = "fastmlr_trt"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: The kernels' functions while :func:`plugin_kernels` has replaced them in ``fastmlr.kernels``.
_originals: dict[str, Callable] = {}
_registered_plugins: list[str] = []


def import_torch_tensorrt():
    """The ``torch_tensorrt`` module, or ``RuntimeError`` (:data:`TORCH_TENSORRT_MISSING`)."""
    try:
        import torch_tensorrt
    except ImportError as err:
        raise RuntimeError(TORCH_TENSORRT_MISSING) from err
    return torch_tensorrt


def _kernel(name: str) -> Callable:
    """The kernel function ``fastmlr.kernels.<name>`` itself (never the custom-op redirection)."""
    return _originals.get(name) or getattr(kernels, name)


@torch.library.custom_op(f"{NAMESPACE}::localize_regions", mutates_args=())
def localize_regions_op(
    cam_logits: torch.Tensor, indices: torch.Tensor, height: int, width: int, threshold: float
) -> torch.Tensor:
    """``fastmlr.kernels.localize_regions`` on its Triton kernel: ``[B, N, 4]`` int64 boxes."""
    with use_backend("triton"):
        return _kernel("localize_regions")(cam_logits, indices, (height, width), threshold)


@localize_regions_op.register_fake
def _localize_regions_fake(cam_logits, indices, height, width, threshold):  # noqa: ANN001, ANN202
    return cam_logits.new_empty((*indices.shape, 4), dtype=torch.long)


@torch.library.custom_op(f"{NAMESPACE}::crop_resize", mutates_args=())
def crop_resize_op(images: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``fastmlr.kernels.crop_resize`` on its Triton kernel: ``[B, N, C, height, width]`` regions."""
    with use_backend("triton"):
        return _kernel("crop_resize")(images, boxes, (height, width))


@crop_resize_op.register_fake
def _crop_resize_fake(images, boxes, height, width):  # noqa: ANN001, ANN202
    return images.new_empty((images.shape[0], boxes.shape[1], images.shape[1], height, width))


#: ``fastmlr.kernels`` function -> the call that routes it to its custom op (same call signature as
#: MCAR uses: ``localize_regions(cam_logits, indices, size, threshold)``, ``crop_resize(images, boxes, size)``).
REDIRECTIONS: dict[str, Callable] = {
    "localize_regions": lambda cam_logits, indices, size, threshold, **_: localize_regions_op(
        cam_logits, indices, int(size[0]), int(size[1]), float(threshold)),
    "crop_resize": lambda images, boxes, size, **_: crop_resize_op(images, boxes, int(size[0]), int(size[1])),
}


@contextlib.contextmanager
def plugin_kernels() -> Iterator[list[str]]:
    """Inside the block, ``fastmlr.kernels.localize_regions`` / ``crop_resize`` call the custom ops
    (so a trace records one opaque op per kernel). Yields the names redirected (those the kernels
    package defines)."""
    names = [name for name in REDIRECTIONS if hasattr(kernels, name)]
    for name in names:
        _originals[name] = getattr(kernels, name)
        setattr(kernels, name, REDIRECTIONS[name])
    try:
        yield names
    finally:
        for name in names:
            setattr(kernels, name, _originals.pop(name))


@contextlib.contextmanager
def input_checks_skipped(model: nn.Module) -> Iterator[None]:
    """Skip ``model.check_input`` inside the block. Its finiteness test branches on tensor values,
    which ``torch.export`` cannot trace (``GuardOnDataDependentSymNode``); the compiled module is
    called on inputs the caller checks."""
    model.check_input = lambda images: None
    try:
        yield
    finally:
        del model.check_input


def register_plugins(torch_tensorrt) -> list[str]:
    """Generate the TensorRT QDP plugin and its torch-tensorrt converter for every custom op (once
    per process); returns their qualified names."""
    if not _registered_plugins:
        for name in REDIRECTIONS:
            qualified = f"{NAMESPACE}::{name}"
            torch_tensorrt.dynamo.conversion.plugins.custom_op(
                qualified, supports_dynamic_shapes=True, requires_output_allocator=False
            )
            _registered_plugins.append(qualified)
    return list(_registered_plugins)


class LowPrecisionBackbone(nn.Module):
    """A backbone computing in ``dtype`` between float32 borders: the input is cast to ``dtype``, the
    features back to float32, so everything around it (heads, MCAR's decision path) stays float32."""

    def __init__(self, features: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.features = features.to(dtype)
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images.to(self.dtype)).float()


def with_low_precision_backbone(model: nn.Module, precision: str) -> nn.Module:
    """A copy of ``model`` whose backbone (``model.features``) computes in ``precision`` (fp16 / bf16)
    inside :class:`LowPrecisionBackbone`; ``model`` itself for fp32."""
    if precision == "fp32":
        return model
    low = copy.deepcopy(model)
    low.features = LowPrecisionBackbone(low.features, DTYPES[precision])

    def check_float32_input(images: torch.Tensor) -> None:  # the backbone casts; callers pass float32
        check_images(images, low.image_size if low.fixed_size else None, torch.float32)

    low.check_input = check_float32_input
    return low


def compile_torch_tensorrt(
    model: nn.Module,
    *,
    image_size: int,
    precision: str = "fp32",
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 1,
    workspace_gb: float = 4,
) -> nn.Module:
    """Compile ``model`` with torch-tensorrt (dynamo frontend), the Triton kernels as plugins.

    The module compiled is :class:`~fastmlr.export.onnx_export.ExportWrapper` (outputs ``(probs,)``,
    or :data:`~fastmlr.export.validation.STAGE_OUTPUTS` for MCAR) with the backbone in ``precision``
    (:func:`with_low_precision_backbone`: fp16 / bf16 weights and activations, casts at its borders)
    and everything else, MCAR's decision path and kernels included, in float32. The types are in the
    program and compiled with ``use_explicit_typing=True`` (torch-tensorrt 2.x: TensorRT's strongly
    typed mode, the only one TensorRT 11 has; no ``enabled_precisions``). It is exported with
    ``torch.export`` for batches ``min_batch..max_batch`` and compiled with ``min_block_size=1``.
    Returns the compiled module; call it on float32 CUDA images. INT8 goes through ONNX Q/DQ graphs
    (:func:`~fastmlr.export.export_engine`): ``ValueError`` here. Raises ``RuntimeError`` without
    torch-tensorrt or CUDA.
    """
    check_precision(precision)
    if precision not in DTYPES:
        raise ValueError(f"torch-tensorrt compiles fp32, fp16 or bf16, got {precision!r}; INT8 engines are built "
                         "from calibrated Q/DQ ONNX graphs: fastmlr.export.export_engine(..., precision='int8')")
    check_batches(min_batch, opt_batch, max_batch)
    check_image_size(image_size)
    torch_tensorrt = import_torch_tensorrt()
    device = require_cuda()
    register_plugins(torch_tensorrt)
    model = with_low_precision_backbone(model, precision)
    wrapper = ExportWrapper(model).eval().to(device=device)
    dynamic = min_batch != max_batch
    # torch.export specialises axes of size 1, so a dynamic batch is traced at 2 or more.
    example_batch = min(max(opt_batch, 2), max_batch) if dynamic else opt_batch
    example = torch.randn(example_batch, 3, image_size, image_size, device=device)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=min_batch, max=max_batch)},) if dynamic else None
    with torch.no_grad(), plugin_kernels(), transformer_fastpath_disabled(), input_checks_skipped(model):
        program = torch.export.export(wrapper, (example,), dynamic_shapes=dynamic_shapes)
    shape = (3, image_size, image_size)
    inputs = [torch_tensorrt.Input(min_shape=(min_batch, *shape), opt_shape=(opt_batch, *shape),
                                   max_shape=(max_batch, *shape), dtype=torch.float32)]
    return torch_tensorrt.dynamo.compile(program, inputs, min_block_size=1, use_explicit_typing=True,
                                         workspace_size=int(workspace_gb * (1 << 30)))
