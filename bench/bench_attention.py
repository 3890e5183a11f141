"""Peak memory and time of the per-category attention paths: fused/chunked vs naive broadcast.

Usage (the full grid; several GB of RAM for the naive rows at B = 16)::

    python bench/bench_attention.py --out bench/results/attention_cpu.json
    python bench/bench_attention.py --device cuda --out bench/results/attention_cuda.json
    python bench/bench_attention.py --batch 1 --classes 5 --positions 9 --dim 64 --out /tmp/a.json  # smoke

Paths (inference, ``torch.no_grad``; ``--train`` adds the backward of ``sum(output)``):

- ``srdl``: ``SA = sigmoid(tanh_attention_scores(P, Q, w, b))``, ``f = srdl_max_pool(F, SA, CA)``;
- ``ssgrl``: ``s = tanh_attention_scores(P, Q, w, b)``, ``f = softmax_attention_pool(F, s)``.

Implementations: ``naive`` (the ``*_reference`` broadcast forms), ``chunked`` (``backend="torch"``:
the memory-bounded torch path) and, on CUDA, ``triton`` (the fused kernels).

Each (path, implementation, batch) runs in its own subprocess so that peak memory is its own. Peak
activation memory = peak during the first call minus what was held just before it, inputs included
in the latter (:func:`bench.memory.peak_bytes`: exact on CUDA, an upper bound on CPU). A warm-up
call on tiny inputs precedes the window. Time = median of ``--repeats`` calls after the measured one.

Writes JSON (results, naive/impl ratios, environment) and a markdown table beside it (``.md``).
Targets: chunked/fused peak <= 1/10 of naive at B = 16; fused >= 2x faster than naive on GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if not __package__:  # run as ``python bench/bench_attention.py``: make the bench package importable
    import _script  # noqa: F401

import torch
from fastmlr.kernels import (
    softmax_attention_pool,
    softmax_attention_pool_reference,
    srdl_max_pool,
    srdl_max_pool_reference,
    tanh_attention_scores,
    tanh_attention_scores_reference,
)

from bench.environment import capture_environment, describe_machine
from bench.memory import MEASURES, peak_bytes
from bench.timing import pair_with_baseline, summarize, time_calls, timer_for
from bench.writers import check_result_files, markdown_table, write_json_and_markdown

PATHS = ("srdl", "ssgrl")
MEMORY_TARGET = 0.1  # chunked/fused peak over naive peak at the largest batch
SPEED_TARGET = 2.0  # naive time over fused time on GPU


def make_inputs(batch: int, classes: int, positions: int, dim: int, device: str) -> dict[str, torch.Tensor]:
    """Seeded fp32 inputs of both paths: features ``F``, projections ``P``/``Q``, ``f_s`` and ``CA``."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen)).to(device)

    return {
        "F": torch.relu(randn(batch, positions, dim)),
        "P": randn(batch, positions, dim),
        "Q": randn(classes, dim),
        "w": randn(dim, scale=dim**-0.5),
        "b": randn(1),
        "CA": torch.sigmoid(randn(batch, classes, dim)),
    }


def run_path(path: str, impl: str, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """One forward of ``path`` with ``impl`` (``naive`` | ``chunked`` | ``triton``)."""
    if impl == "naive":
        scores = tanh_attention_scores_reference(x["P"], x["Q"], x["w"], x["b"])
        if path == "srdl":
            return srdl_max_pool_reference(x["F"], torch.sigmoid(scores), x["CA"])
        return softmax_attention_pool_reference(x["F"], scores)
    backend = "torch" if impl == "chunked" else "triton"
    scores = tanh_attention_scores(x["P"], x["Q"], x["w"], x["b"], backend=backend)
    if path == "srdl":
        return srdl_max_pool(x["F"], torch.sigmoid(scores), x["CA"], backend=backend)
    return softmax_attention_pool(x["F"], scores, backend=backend)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Footprint:
    """Peak activation memory of the first call and the times of the calls after it."""

    path: str
    impl: str
    batch: int
    peak_bytes: int
    time_ms: float
    times_ms: list[float]


def measure(
    path: str, impl: str, batch: int, classes: int, positions: int, dim: int, device: str, repeats: int, train: bool
) -> Footprint:
    """Peak activation bytes of the first call and median ms of ``repeats`` more (run in a worker)."""
    x = make_inputs(batch, classes, positions, dim, device)
    if train:
        for key in ("F", "P", "Q", "w", "b", "CA"):
            x[key].requires_grad_(True)

    def call() -> None:
        with torch.set_grad_enabled(train):
            out = run_path(path, impl, x)
            if train:
                out.sum().backward()
        _sync(device)

    with torch.no_grad():  # load code paths and lazy state on tiny inputs, outside the window
        run_path(path, impl, make_inputs(1, 2, 3, 4, device))
    _sync(device)
    peak = peak_bytes(call, device)
    times = time_calls(call, repeats, timer_for(device, own_stream=True))
    return Footprint(path, impl, batch, peak, summarize(times).median_ms, times)


def run_worker(args: argparse.Namespace, path: str, impl: str, batch: int) -> dict:
    """:func:`measure` in a fresh subprocess (so its peak memory is its own)."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        path,
        impl,
        str(batch),
        "--classes",
        str(args.classes),
        "--positions",
        str(args.positions),
        "--dim",
        str(args.dim),
        "--device",
        args.device,
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    if args.train:
        command.append("--train")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker {path}/{impl}/B={batch} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratios(results: list[dict]) -> list[dict]:
    """For every non-naive row: naive peak / its peak and naive time / its time (same path, batch)."""
    return [
        {"path": r["path"], "impl": r["impl"], "batch": r["batch"],
         "memory_fraction_of_naive": r["peak_bytes"] / max(1, base["peak_bytes"]),
         "speedup_vs_naive": base["time_ms"] / r["time_ms"]}
        for r, base in pair_with_baseline(results, ("path", "batch"), "impl", lambda r: "naive")
    ]


def markdown(report: dict) -> str:
    """The results and ratios as markdown tables, with the targets and the GPU status."""
    cfg = report["config"]
    lines = [
        f"# Per-category attention: fused/chunked vs naive ({cfg['device']}, "
        f"{'forward+backward' if cfg['train'] else 'inference'})",
        "",
        f"C = {cfg['classes']}, HW = {cfg['positions']}, D = {cfg['dim']}, fp32; "
        f"machine: {describe_machine(report['environment'])}.",
        "",
        f"Peak = {report['memory_measure']}; time = median of {cfg['repeats']} calls.",
        "",
        markdown_table(["path", "impl", "B", "peak MiB", "time ms"],
                       [[r["path"], r["impl"], r["batch"], f"{r['peak_bytes'] / 2**20:.1f}", f"{r['time_ms']:.2f}"]
                        for r in report["results"]]),
        "",
        markdown_table(["path", "impl", "B", "peak / naive peak", "speed-up vs naive"],
                       [[r["path"], r["impl"], r["batch"], f"{r['memory_fraction_of_naive']:.4f}",
                         f"{r['speedup_vs_naive']:.2f}x"] for r in report["ratios"]]),
    ]
    lines += [
        "",
        f"Targets: peak <= {MEMORY_TARGET:g} x naive at the largest batch; fused >= "
        f"{SPEED_TARGET:g}x faster than naive on GPU — GPU: {report['gpu_status']}.",
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--positions", type=int, default=196)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--train", action="store_true", help="measure forward + backward")
    parser.add_argument("--out", type=Path, required=False, help="JSON file (the .md goes beside it)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    parser.add_argument("--worker", nargs=3, metavar=("PATH", "IMPL", "BATCH"), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if min(args.batch + [args.classes, args.positions, args.dim, args.repeats, args.threads]) < 1:
        raise SystemExit("--batch, --classes, --positions, --dim, --repeats, --threads must be positive")
    if args.out and not args.worker:
        check_result_files("bench_attention.py", args.out, args.overwrite)
    if args.worker:
        path, impl, batch = args.worker
        footprint = measure(path, impl, int(batch), args.classes, args.positions, args.dim, args.device,
                            args.repeats, args.train)
        print(json.dumps(asdict(footprint)))
        return 0
    impls = ["naive", "chunked"] + (["triton"] if args.device == "cuda" else [])
    results = []
    for path in args.paths:
        for batch in args.batch:
            for impl in impls:
                results.append(run_worker(args, path, impl, batch))
                r = results[-1]
                print(
                    f"{path:6s} {impl:8s} B={batch:<3d} peak {r['peak_bytes'] / 2**20:10.1f} MiB  "
                    f"{r['time_ms']:10.2f} ms",
                    flush=True,
                )
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "worker")},
        "memory_measure": MEASURES[args.device],
        "gpu_status": "measured" if args.device == "cuda" else "not measured (CPU run)",
        "results": results,
        "ratios": ratios(results),
        "environment": capture_environment(),
    }
    text = markdown(report)
    print(text)
    if args.out:
        write_json_and_markdown(report, args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
