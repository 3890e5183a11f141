"""Peak memory of one call, measured around it.

On CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak, minus what was allocated just
before the call (tensors only, exact). On the CPU (Linux): the process's peak resident set
(``VmHWM``), reset to the current resident set through ``/proc/self/clear_refs``, minus the resident
set just before the call; it also counts allocator slack, so it is an upper bound. Run each case in
a fresh process when cases must not share allocator state.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

MEASURES = {
    "cuda": "torch.cuda.max_memory_allocated minus allocated before the call",
    "cpu": "peak RSS (VmHWM, reset through /proc/self/clear_refs) during the call minus RSS before it",
}


def process_status_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` (peak RSS) of this process from ``/proc/self/status``, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field} line")


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """The peak memory ``fn()`` adds on ``device`` (``"cuda"`` or ``"cpu"``) over what is held before."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
    before = process_status_bytes("VmRSS")
    fn()
    return process_status_bytes("VmHWM") - before


def process_group_memory(pgid: int) -> dict[str, dict[str, float]]:
    """Resident memory (MiB, now and peak: ``VmRSS``, ``VmHWM``) of each live process of process group
    ``pgid``, by executable name; a Triton Python-backend stub is named after the model it serves
    (``triton_python_backend_stub <model>``, from the ``<model>/<version>/model.py`` it runs)."""
    memory = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:
                continue
            status = dict(line.split(":", 1) for line in (stat.parent / "status").read_text().splitlines())
            argv = [Path(a.decode()) for a in (stat.parent / "cmdline").read_bytes().split(b"\0") if a]
        except (OSError, ValueError, IndexError):  # ended meanwhile
            continue
        name = argv[0].name
        if len(argv) > 1 and argv[1].name == "model.py":
            name = f"{name} {argv[1].parent.parent.name}"
        kib = {key: int(status[field].split()[0]) for key, field in (("rss", "VmRSS"), ("peak", "VmHWM"))}
        memory[name] = {key: value / 1024 for key, value in kib.items()}
    return memory
