"""Serving load test: ``fastmlr serve``'s Triton server under tritonclient load, beside the same runner
called in this process.

One model (default: the baseline, mobilenet_v2, 224×224, ONNX Runtime, max batch 8) is served on free
loopback ports (:func:`fastmlr.serve.serving`); the in-process runner is :func:`fastmlr.serve.open_runner`
on the very artifact the server loaded. For each concurrency c (1, 2, 4, 8, 16) the script times, in
turn: the in-process runner at batch c, then c tritonclient HTTP clients, then c gRPC clients, each
client sending one image per request back to back for ``--duration`` seconds. Reported per row: p50 /
p90 / p99 latency (per call or request), throughput (images/s), failed requests, and for the server the
mean batch Triton's dynamic batcher formed (its statistics: inferences / executions). Then a bounded
soak: ``--soak`` seconds at concurrency 8 (HTTP and gRPC clients alternating), every response compared
with the in-process runner's output for the same image (max |Δ| ≤ 1e-5). Traffic goes to 127.0.0.1 only.

Targets (baseline mobilenet_v2 224, ONNX Runtime): HTTP p50 at c = 1 ≤ 1.15 × in-process p50 at batch 1
+ 2 ms; throughput at c = 8 ≥ throughput at c = 1; soak 0 failed and 0 wrong::

    python bench/serve.py --out bench/results/serve_cpu.json
    python bench/serve.py --size 64 --duration 2 --soak 5 --out /tmp/serve.json      # smoke
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

if not __package__:  # run as ``python bench/serve.py``: make the bench package importable
    import _script  # noqa: F401

import numpy as np
import torch

import fastmlr
from bench.environment import capture_environment, describe_machine
from bench.memory import process_group_memory
from bench.writers import format_ms, markdown_table, run_script
from fastmlr import serve
from fastmlr.testing import calibrate_batchnorm

TOLERANCE = 1e-5
POOL = 32  # distinct images the clients cycle through (and the soak checks against)


def percentiles(samples_ms: list[float]) -> dict[str, float | None]:
    if not samples_ms:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None}
    p50, p90, p99 = np.percentile(np.asarray(samples_ms), [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99)}


def client_module(protocol: str):  # noqa: ANN201 - tritonclient.http or tritonclient.grpc
    if protocol == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module
    return module


class PoolInputs:
    """The pool's images as tritonclient inputs of ``protocol``, one image per request, serialised once
    (binary tensor data) and shared read-only by every client, so that a timed request costs the
    client only its send and receive, as the in-process rows reuse their batches."""

    def __init__(self, protocol: str, pool: np.ndarray) -> None:
        module = client_module(protocol)
        self.inputs = []
        for image in pool:
            request = module.InferInput(serve.INPUT_NAME, [1, *image.shape], "FP32")
            request.set_data_from_numpy(image[None])
            self.inputs.append(request)
        binary = {"binary_data": True} if protocol == "http" else {}  # gRPC sends tensors as binary anyway
        self.outputs = [module.InferRequestedOutput("probs", **binary)]

    def __len__(self) -> int:
        return len(self.inputs)


class Client:
    """One tritonclient connection (``http`` or ``grpc``, kept open) that sends one pool image per
    request and asks for ``probs`` only, as binary data."""

    def __init__(self, protocol: str, url: str, model: str, inputs: PoolInputs) -> None:
        self.model, self.inputs = model, inputs
        self.client = client_module(protocol).InferenceServerClient(url)

    def infer(self, index: int) -> np.ndarray:
        """``probs`` of pool image ``index`` (shape ``[1, C]``)."""
        return self.client.infer(self.model, [self.inputs.inputs[index]], outputs=self.inputs.outputs).as_numpy("probs")

    def close(self) -> None:
        self.client.close()


def drive(
    make_client: Callable[[int], Client], count: int, pool_size: int, duration_s: float,
    check: Callable[[int, np.ndarray], bool] | None = None, on_start: Callable[[], None] | None = None,
) -> dict:
    """``count`` clients (``make_client(i)``, each made and used in a thread of its own, as
    tritonclient's HTTP client requires) send one warm-up request each, then, from ``on_start`` on,
    requests for the ``pool_size`` pool images in turn, back to back for ``duration_s``. The latencies,
    completed and failed requests, wrong answers (``check(pool index, probs)`` false) and the wall time."""
    latencies: list[float] = []
    counts = {"completed": 0, "failed": 0, "wrong": 0}
    errors: list[str] = []
    lock = threading.Lock()
    started = {}

    def begin() -> None:
        if on_start is not None:
            on_start()
        started["at"] = time.perf_counter()
        started["stop"] = time.monotonic() + duration_s

    barrier = threading.Barrier(count, action=begin)

    def loop(index: int) -> None:
        client = make_client(index)
        try:
            client.infer(index % pool_size)  # warm-up: connection, first execution
            barrier.wait()
            n = index
            while time.monotonic() < started["stop"]:
                t0 = time.perf_counter()
                try:
                    probs = client.infer(n % pool_size)
                except Exception as err:  # noqa: BLE001 - counted and reported
                    with lock:
                        counts["failed"] += 1
                        errors.append(str(err)[:200])
                else:
                    elapsed = (time.perf_counter() - t0) * 1000
                    wrong = check is not None and not check(n % pool_size, probs)
                    with lock:
                        latencies.append(elapsed)
                        counts["completed"] += 1
                        counts["wrong"] += wrong
                n += count
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(count) as threads:
        list(threads.map(loop, range(count)))
    wall = time.perf_counter() - started["at"]
    return {"samples_ms": latencies, **counts, "wall_s": wall, "errors": sorted(set(errors))[:5]}


def server_batches(http_url: str, model: str) -> tuple[int, int]:
    """Triton's cumulative (inference count, execution count) of ``model``."""
    with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/stats", timeout=10) as response:
        stats = json.load(response)["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def time_server(
    server: serve.TritonServer, protocol: str, model: str, concurrency: int, inputs: PoolInputs, duration_s: float
) -> dict:
    """:func:`drive` with ``concurrency`` clients of ``protocol``, plus the mean batch Triton's dynamic
    batcher formed meanwhile (``mean_server_batch``: inferences / executions)."""
    url = server.http_url if protocol == "http" else server.grpc_url
    before: list[int] = []
    row = drive(lambda i: Client(protocol, url, model, inputs), concurrency, len(inputs), duration_s,
                on_start=lambda: before.extend(server_batches(server.http_url, model)))
    after = server_batches(server.http_url, model)
    executions = after[1] - before[1]
    return {**row, "inferences": after[0] - before[0], "executions": executions}


def time_in_process(runner: serve.Runner, pool: np.ndarray, batch: int, duration_s: float) -> dict:
    """The runner called back to back on batches of ``batch`` pool images for ``duration_s``."""
    batches = [np.ascontiguousarray(np.take(pool, range(i, i + batch), axis=0, mode="wrap")) for i in range(4)]
    runner(batches[0])  # warm-up
    samples = []
    stop_at = time.monotonic() + duration_s
    start = time.perf_counter()
    while time.monotonic() < stop_at or len(samples) < 5:
        t0 = time.perf_counter()
        runner(batches[len(samples) % len(batches)])
        samples.append((time.perf_counter() - t0) * 1000)
    wall = time.perf_counter() - start
    return {"samples_ms": samples, "completed": len(samples) * batch, "failed": 0, "wrong": 0, "wall_s": wall,
            "errors": []}


def merge(rows: list[dict], key: dict, part: dict) -> None:
    """Add the measurement ``part`` to the row of ``rows`` with the fields ``key`` (created if new)."""
    row = next((r for r in rows if all(r[k] == v for k, v in key.items())), None)
    if row is None:
        rows.append({**key, **part, "samples_ms": list(part["samples_ms"]), "errors": list(part["errors"])})
        return
    for field in ("completed", "failed", "wrong", "wall_s", "inferences", "executions"):
        if field in part:
            row[field] += part[field]
    row["samples_ms"] += part["samples_ms"]
    row["errors"] = sorted(set(row["errors"]) | set(part["errors"]))[:5]


def summarize_row(row: dict) -> dict:
    """``row`` with its samples replaced by p50/p90/p99, images/s and the server's mean batch."""
    summary = {k: v for k, v in row.items() if k not in ("samples_ms", "inferences", "executions")}
    summary.update(percentiles(row["samples_ms"]))
    summary["images_per_s"] = row["completed"] / row["wall_s"]
    if row.get("executions"):
        summary["mean_server_batch"] = row["inferences"] / row["executions"]
    return summary


def run(args: argparse.Namespace) -> dict:
    load_before = os.getloadavg()
    torch.manual_seed(0)
    model = fastmlr.create_model(args.model, backbone=args.backbone, image_size=args.size)
    calibrate_batchnorm(model, torch.randn(8, 3, args.size, args.size))  # outputs depend on the image
    pool = np.random.default_rng(0).standard_normal((POOL, 3, args.size, args.size)).astype(np.float32)
    rows = []
    ports = tuple(serve.free_loopback_ports(3))
    with tempfile.NamedTemporaryFile("w", suffix=".log", prefix="tritonserver-") as log, serve.serving(
        model, name=args.model, backend=args.backend, max_batch=args.max_batch, ports=ports, log=log,
    ) as server:
        served = serve.read_served(server.repository / args.model)
        runner = serve.open_runner(served)
        reference = [runner(pool[i : i + 1])["probs"][0] for i in range(POOL)]
        urls = {"http": server.http_url, "grpc": server.grpc_url}
        inputs = {protocol: PoolInputs(protocol, pool) for protocol in urls}
        slice_s = args.duration / args.rounds
        for round_index in range(args.rounds):  # rounds spread a slow spell of the machine over every row
            for concurrency in args.concurrency:
                print(f"round {round_index + 1}/{args.rounds}, concurrency {concurrency}", flush=True)
                parts = {"in-process": time_in_process(runner, pool, concurrency, slice_s)}
                for protocol in ("http", "grpc"):
                    parts[protocol] = time_server(server, protocol, args.model, concurrency, inputs[protocol], slice_s)
                for path, part in parts.items():
                    merge(rows, {"path": path, "concurrency": concurrency,
                                 "batch": concurrency if path == "in-process" else 1}, part)
        rows = [summarize_row(row) for row in rows]
        print(f"soak: {args.soak:.0f} s at concurrency 8", flush=True)
        max_diff = [0.0]

        def check(index: int, probs: np.ndarray) -> bool:
            diff = float(np.abs(probs[0] - reference[index]).max())
            max_diff[0] = max(max_diff[0], diff)
            return probs.shape == (1, reference[index].shape[0]) and diff <= TOLERANCE

        def soak_client(i: int) -> Client:
            protocol = ("http", "grpc")[i % 2]
            return Client(protocol, urls[protocol], args.model, inputs[protocol])

        soak = drive(soak_client, 8, POOL, args.soak, check)
        soak = summarize_row({**soak, "max_abs_diff": max_diff[0]})
        memory = process_group_memory(server.process.pid)
        code = server.stop()
    env = capture_environment()
    env["versions"]["nvidia-pytriton"] = _version("nvidia-pytriton")
    env["versions"]["tritonclient"] = _version("tritonclient")
    return {"config": {"model": args.model, "backbone": args.backbone, "size": args.size, "backend": args.backend,
                       "max_batch": args.max_batch, "duration_s": args.duration, "rounds": args.rounds,
                       "soak_s": args.soak,
                       "tolerance": TOLERANCE, "triton": "2.51 (nvidia-pytriton's tritonserver)"},
            "environment": env, "load_average_1min": {"start": load_before[0], "end": os.getloadavg()[0]},
            "rows": rows, "soak": soak, "server_memory_mib": memory, "server_exit_code": code,
            "targets": targets(rows, soak)}


def _version(name: str) -> str | None:
    from bench.environment import package_version

    return package_version((name,))


def targets(rows: list[dict], soak: dict) -> list[dict]:
    """The three targets, each with the measured values and whether it is met."""
    def find(path: str, concurrency: int) -> dict | None:
        return next((r for r in rows if r["path"] == path and r["concurrency"] == concurrency), None)

    result = []
    http1, local1, http8 = find("http", 1), find("in-process", 1), find("http", 8)
    if http1 and local1 and http1["p50_ms"] is not None:
        bound = 1.15 * local1["p50_ms"] + 2
        result.append({"target": "HTTP p50 at c=1 <= 1.15 x in-process p50 (batch 1) + 2 ms",
                       "measured": f"{http1['p50_ms']:.2f} ms vs bound {bound:.2f} ms "
                                   f"(in-process {local1['p50_ms']:.2f} ms)", "met": http1["p50_ms"] <= bound})
    if http1 and http8:
        ratio = http8["images_per_s"] / http1["images_per_s"]
        result.append({"target": "HTTP throughput at c=8 >= c=1",
                       "measured": f"{http8['images_per_s']:.1f} vs {http1['images_per_s']:.1f} images/s "
                                   f"({ratio:.2f}x)", "met": ratio >= 1})
    result.append({"target": "soak: 0 failed, 0 wrong",
                   "measured": f"{soak['completed']} answered, {soak['failed']} failed, {soak['wrong']} wrong "
                               f"(max |diff| {soak['max_abs_diff']:.1e})",
                   "met": soak["failed"] == 0 and soak["wrong"] == 0})
    return result


def render_markdown(result: dict) -> str:
    config, env = result["config"], result["environment"]
    versions = env["versions"]
    lines = [
        f"# Serving: {config['model']} {config['backbone']} {config['size']}x{config['size']} on {config['backend']}, "
        f"Triton dynamic batching (max batch {config['max_batch']})",
        "",
        f"Machine: {describe_machine(env)}; torch {versions['torch']}, ONNX Runtime {versions['onnxruntime']}, "
        f"nvidia-pytriton {versions.get('nvidia-pytriton')} (Triton 2.51), "
        f"tritonclient {versions.get('tritonclient')}, "
        f"Python {env['python']}; {env['utc_time']}. Clients, server and in-process runner share the same CPUs, "
        "and the machine is shared with other work: 1-minute load average "
        f"{result['load_average_1min']['start']:.1f} at the start, {result['load_average_1min']['end']:.1f} at the end "
        f"(on {env['cpu_count']} logical CPUs), so figures vary between runs; compare rows of one run only.",
        "",
        f"Each row ran {config['duration_s']:.0f} s in {config['rounds']} slices, one per round of the whole sweep "
        "(so a slow spell of the machine is spread over every row). "
        "Server rows: c clients, one image per request, back to back; "
        "latency per request. In-process rows: the same runner called on batches of c images; latency per call.",
        "",
    ]
    table = []
    for r in result["rows"]:
        mean_batch = r.get("mean_server_batch")
        table.append([r["path"], r["concurrency"], r["batch"], format_ms(r["p50_ms"]), format_ms(r["p90_ms"]),
                      format_ms(r["p99_ms"]), f"{r['images_per_s']:.1f}", r["completed"], r["failed"],
                      "—" if mean_batch is None else f"{mean_batch:.2f}"])
    lines.append(markdown_table(["path", "c", "batch per call", "p50 ms", "p90 ms", "p99 ms", "images/s", "images",
                                 "failed", "mean server batch"], table))
    soak = result["soak"]
    lines += ["", f"Soak: {config['soak_s']:.0f} s at concurrency 8 (HTTP and gRPC clients alternating): "
                  f"{soak['completed']} answered, {soak['failed']} failed, {soak['wrong']} wrong "
                  f"(max |Δprob| against the in-process runner {soak['max_abs_diff']:.1e}, tolerance "
                  f"{config['tolerance']:.0e}); p50 {format_ms(soak['p50_ms'])} ms, "
                  f"p99 {format_ms(soak['p99_ms'])} ms, "
                  f"{soak['images_per_s']:.1f} images/s. Server exit code after SIGTERM: {result['server_exit_code']}.",
              "", "Resident memory of the server's processes after the soak (peak in brackets): " + ", ".join(
                  f"{name} {m['rss']:.0f} MiB ({m['peak']:.0f})"
                  for name, m in sorted(result["server_memory_mib"].items())) + ".",
              "", markdown_table(["target", "measured", "met"],
                                 [[t["target"], t["measured"], "yes" if t["met"] else "**no**"]
                                  for t in result["targets"]])]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="baseline")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--backend", choices=serve.BACKENDS, default="onnxruntime")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--concurrency", type=lambda text: [int(c) for c in text.split(",")], default=[1, 2, 4, 8, 16])
    parser.add_argument("--duration", type=float, default=15, help="seconds per row, over all rounds")
    parser.add_argument("--rounds", type=int, default=3, help="the sweep is run this many times, rows merged")
    parser.add_argument("--soak", type=float, default=180, help="seconds of the soak at concurrency 8")
    parser.add_argument("--out", type=Path, required=True, help="result JSON (markdown written beside it)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_script("serve.py", args, run, render_markdown)


if __name__ == "__main__":
    raise SystemExit(main())
