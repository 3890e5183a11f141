"""Compile every fastmlr Triton kernel for real NVIDIA GPUs, on a machine without one.

The Triton CPU interpreter checks what the kernels compute, not that Triton's compiler accepts them.
This script runs each dispatching op with ``backend="triton"`` on CPU tensors in a process *without*
``TRITON_INTERPRET``, behind a stand-in CUDA driver that reports the chosen architecture: Triton then
specialises and compiles each kernel exactly as for a launch on that GPU (the dispatchers' own block
sizes, warps and dtypes), down to a cubin from Triton's bundled ``ptxas``, and skips the launch.
The outputs are never computed; what is checked is that every kernel compiles.

Prints one JSON line per compiled kernel variant: name, architecture, registers per thread and
spilled bytes (``ptxas -v``), static shared memory; exits non-zero when a kernel of
``fastmlr.kernels`` (a ``@triton.jit`` function named ``*_kernel``) was not compiled for every
architecture. ``tests/test_kernels_compile.py`` runs it in CI.

    python tests/compile_kernels.py --arch 80 90
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_kernels.py needs TRITON_INTERPRET unset: the interpreter never compiles")

import fastmlr.kernels._dispatch as dispatch  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from fastmlr import kernels  # noqa: E402


class CompileOnlyDriver:
    """Enough of Triton's CUDA driver for the JIT to compile for ``arch``: device 0, stream 0."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


COMPILED: list[triton.compiler.CompiledKernel] = []
_run = JITFunction.run


def compile_without_launch(self, *args, grid, warmup, **kwargs):
    """``JITFunction.run`` in warm-up mode: specialise and compile, record the kernel, never launch."""
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    COMPILED.append(kernel)
    return kernel


def exercise_every_op() -> None:
    """Each dispatching op once per kernel variant it can launch (dtype, flags), at the paper's sizes."""
    cam = torch.randn(2, 80, 14, 14)
    indices = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    kernels.localize_regions(cam, indices, 448, backend="triton")
    for dtype in (torch.float32, torch.float16, torch.float64):
        kernels.interval_search(torch.rand(8, 14, dtype=dtype), 0.5, backend="triton")
    boxes = torch.tensor([[[0, 0, 100, 120], [10, 20, 448, 448]]] * 2)
    images = torch.rand(2, 3, 448, 448)
    kernels.crop_resize(images, boxes, 448, backend="triton")
    for out_dtype in (torch.float16, torch.bfloat16):
        kernels.crop_resize(images, boxes, 448, mean=0.5, std=0.25, out_dtype=out_dtype, backend="triton")
    kernels.crop_resize(images.double(), boxes, 448, backend="triton")
    feats, labels = torch.randn(2, 196, 256), torch.randn(80, 256)
    w, b = torch.randn(256), torch.randn(())
    scores = kernels.tanh_attention_scores(feats, labels, w, b, backend="triton")
    channel = torch.rand(2, 80, 256)
    mlp = torch.randn(64, 80), torch.randn(64), torch.randn(80, 64), torch.randn(80)
    for needs_grad in (False, True):  # training also compiles the variants that keep arg-max positions
        attended = feats.clone().requires_grad_(needs_grad)
        kernels.srdl_max_pool(attended, torch.sigmoid(scores), channel, backend="triton")
        kernels.softmax_attention_pool(attended, scores, backend="triton")
        kernels.lift_attention_pool(torch.randn(2, 80, 256), attended, *mlp, backend="triton")


def ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers per thread and spilled bytes from ``ptxas -v`` on ``ptx``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # Triton targets sm_90a on Hopper
        command = [get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", path, "-o", os.path.join(tmp, "kernel.cubin")]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
    log = result.stderr + result.stdout
    registers = re.search(r"Used (\d+) registers", log)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return {"registers": int(registers.group(1)) if registers else -1, "spill_bytes": max(spills, default=0)}


def all_kernels() -> set[str]:
    """Names of the launched Triton kernels of ``fastmlr.kernels``: its ``@triton.jit`` ``*_kernel``s."""
    modules = [m for name, m in sys.modules.items() if name.startswith("fastmlr.kernels") and m is not None]
    return {
        name
        for module in modules
        for name, value in vars(module).items()
        if isinstance(value, JITFunction) and name.endswith("_kernel")
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities ×10")
    args = parser.parse_args(argv)
    JITFunction.run = compile_without_launch
    dispatch._triton_can_run = lambda tensors: None  # CPU tensors stand in for CUDA ones
    missing = set()
    for arch in args.arch:
        driver.set_active(CompileOnlyDriver(arch))
        COMPILED.clear()
        exercise_every_op()
        for kernel in COMPILED:
            usage = ptxas_usage(kernel.asm["ptx"], arch)
            record = {"kernel": kernel.name, "arch": f"sm_{arch}", "cubin_bytes": len(kernel.asm["cubin"]),
                      "shared_bytes": kernel.metadata.shared, **usage}
            print(json.dumps(record), flush=True)
        missing |= {f"{name} (sm_{arch})" for name in all_kernels() - {k.name for k in COMPILED}}
    if missing:
        sys.exit(f"not compiled: {', '.join(sorted(missing))}")


if __name__ == "__main__":
    main()
