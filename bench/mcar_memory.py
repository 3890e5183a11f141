"""MCAR's memory model against measured peaks: the peak resident memory of one forward (CPU, float32),
each case in a fresh process, beside :func:`fastmlr.models.mcar.forward_bytes`.

    python bench/mcar_memory.py --out bench/results/mcar_memory.json        # the .md goes beside it

Measure: :func:`bench.memory.peak_bytes` on the CPU (peak resident set during the call minus the
resident set before it; Linux). The model and input exist before; a 64 px forward has run, so
one-time allocations are not counted. ``backbone`` cases time the backbone alone (the per-pixel activation
coefficient of the model); ``mcar`` cases the whole forward.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

if not __package__:  # run as ``python bench/mcar_memory.py``: make the bench package importable
    import _script  # noqa: F401

import torch

import fastmlr
from bench.environment import capture_environment, describe_machine
from bench.memory import MEASURES, peak_bytes
from bench.writers import check_result_files, markdown_table, write_json_and_markdown
from fastmlr.models.mcar import forward_bytes

TOPN = 4
#: (what, backbone, batch, size, autograd)
CASES = (
    ("backbone", "mobilenet_v2", 1, 512, False), ("backbone", "mobilenet_v2", 1, 1024, False),
    ("backbone", "resnet50", 1, 512, False), ("backbone", "resnet50", 1, 1024, False),
    ("backbone", "resnet101", 1, 512, False), ("backbone", "resnet101", 1, 1024, False),
    ("backbone", "mobilenet_v2", 1, 512, True), ("backbone", "resnet50", 1, 512, True),
    ("backbone", "resnet101", 1, 512, True),
    ("mcar", "mobilenet_v2", 1, 512, False), ("mcar", "mobilenet_v2", 2, 768, False),
    ("mcar", "resnet50", 1, 512, False), ("mcar", "resnet101", 1, 512, False),
    ("mcar", "mobilenet_v2", 1, 512, True),
)


def measure(what: str, backbone: str, batch: int, size: int, grad: bool) -> int:
    """Peak bytes one forward adds to the resident memory (this process; :func:`bench.memory.peak_bytes`)."""
    torch.manual_seed(0)
    model = fastmlr.create_model("mcar" if what == "mcar" else "baseline", backbone=backbone, image_size=size)
    net = model if what == "mcar" else model.features
    model.memory_limit = float("inf")
    images = torch.rand(batch, 3, size, size, requires_grad=grad)
    with torch.no_grad():
        net(torch.rand(1, 3, 64, 64))

    def forward() -> None:
        with torch.set_grad_enabled(grad):
            net(images)

    return peak_bytes(forward, "cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON path; the markdown goes beside it (.md)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        what, backbone, batch, size, grad = args.worker
        print(measure(what, backbone, int(batch), int(size), grad == "True"))
        return 0
    check_result_files("mcar_memory.py", args.out, args.overwrite)
    rows = []
    for what, backbone, batch, size, grad in CASES:
        command = [sys.executable, __file__, "--out", str(args.out), "--worker", what, backbone, str(batch), str(size),
                   str(grad)]
        peak = int(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])
        per_pixel = peak / 4 / (batch * size * size)
        model = forward_bytes(batch, TOPN, size, size, backbone, grad=grad) if what == "mcar" else None
        rows.append({"what": what, "backbone": backbone, "batch": batch, "size": size, "autograd": grad,
                     "peak_bytes": peak, "elements_per_input_pixel": per_pixel, "model_bytes": model})
        print(json.dumps(rows[-1]), flush=True)
    env = capture_environment()
    report = {"environment": env, "topn": TOPN, "results": rows}
    table = markdown_table(
        ["what", "backbone", "B", "H=W", "autograd", "measured MiB", "elements / input pixel", "model MiB",
         "model / measured"],
        [[r["what"], r["backbone"], r["batch"], r["size"], r["autograd"], f"{r['peak_bytes'] / 2**20:.0f}",
          f"{r['elements_per_input_pixel']:.1f}",
          "" if r["model_bytes"] is None else f"{r['model_bytes'] / 2**20:.0f}",
          "" if r["model_bytes"] is None else f"{r['model_bytes'] / r['peak_bytes']:.2f}"] for r in rows],
    )
    markdown = (
        f"# MCAR memory model vs measured peaks (CPU, float32, N = {TOPN})\n\n"
        f"Machine: {describe_machine(env)}; torch {torch.__version__}. Measure: {MEASURES['cpu']}, one "
        "forward, each case in a fresh process; "
        "the machine is shared, which does not change memory figures. Model: "
        "`fastmlr.models.mcar.forward_bytes`.\n\n" + table + "\n"
    )
    write_json_and_markdown(report, args.out, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
