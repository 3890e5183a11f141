"""What a benchmark result must say about the machine that produced it.

:func:`capture_environment` returns a JSON-ready dict: CPU model (``/proc/cpuinfo``), logical CPU
count, GPU name, CUDA/cuDNN versions, the versions of torch, torchvision, triton, ONNX, ONNX Runtime,
TensorRT and Torch-TensorRT (``None`` when not installed), torch's intra-op thread count, the
thread and device environment variables, Python, the OS, the git commit of the working tree and
the UTC time. Nothing here imports the optional
packages: versions come from the installed distributions' metadata.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

# Distribution names whose version a result records; several names stand for one package when it
# ships under different names (TensorRT's wheels are per-CUDA: tensorrt-cu12, tensorrt-cu13, ...).
PACKAGES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "triton": ("triton",),
    "numpy": ("numpy",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11"),
    "torch_tensorrt": ("torch-tensorrt", "torch_tensorrt"),
}


# Environment variables that change what a benchmark measures; the last four set the CPU allocator
# (glibc's tunables, or a preloaded jemalloc/tcmalloc), which decides how often fresh memory is
# page-faulted in (see ``describe_allocator``).
RELEVANT_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "TRITON_INTERPRET",
    "CUDA_VISIBLE_DEVICES",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "GLIBC_TUNABLES",
    "LD_PRELOAD",
)
ALLOCATOR_VARIABLES = RELEVANT_VARIABLES[4:]


def cpu_model(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The first ``model name`` line of ``cpuinfo``; ``platform.processor()`` (or ``"unknown"``)
    when the file is absent or has no such line (non-Linux, some ARM kernels)."""
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_name() -> str | None:
    """The name of CUDA device 0, ``None`` when torch sees no CUDA device."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def package_version(names: tuple[str, ...]) -> str | None:
    """The installed version of the first distribution in ``names`` that is installed, else ``None``."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def git_commit(repo: str | os.PathLike | None = None) -> str | None:
    """``git rev-parse HEAD`` of ``repo`` (default: this file's repository), with ``+dirty`` appended
    when tracked files differ from it; ``None`` outside a git checkout or without git."""
    cwd = Path(repo) if repo is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--"], cwd=cwd, capture_output=True, timeout=10
        ).returncode
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty == 1 else "")


def capture_environment() -> dict:
    """The machine and software a result was measured with (see the module docstring)."""
    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu_name(),
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "versions": {key: package_version(names) for key, names in PACKAGES.items()},
        "variables": {name: os.environ.get(name) for name in RELEVANT_VARIABLES},
        "python": platform.python_version(),
        "os": platform.platform(),
        "git_commit": git_commit(),
        "utc_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_conditions() -> dict:
    """How busy the machine is at this moment: the UTC time and the 1-, 5- and 15-minute load
    averages (runnable processes; above the CPU count, timed work shares the CPUs with others)."""
    return {"utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count()}


def describe_allocator(env: dict) -> str:
    """The CPU allocator settings of ``env``: "glibc malloc, default settings" or the variables set.

    With its defaults glibc hands freed memory back to the OS (blocks over its mmap threshold, and
    the heap's top above its trim threshold), so a call whose temporaries are fresh memory pays a
    page fault per 4 KiB touched — often more than the arithmetic of small-op code on a CPU."""
    settings = [f"{name}={env['variables'][name]}" for name in ALLOCATOR_VARIABLES if env["variables"].get(name)]
    return ", ".join(settings) if settings else "glibc malloc, default settings"


def describe_machine(env: dict) -> str:
    """One line naming the machine of ``env`` (from :func:`capture_environment`): CPU, threads, GPU."""
    text = f"{env['cpu']} ({env['cpu_count']} logical CPUs, torch threads {env['torch_threads']})"
    if env.get("gpu"):
        text += f", GPU {env['gpu']} (CUDA {env['cuda']})"
    return text
