"""Resident memory of ``fastmlr serve``'s Python-backend process, with and without PyTorch, side by side.

One ``tritonserver`` serves the same exported graph (default: the baseline, mobilenet_v2, 224×224,
ONNX Runtime, max batch 8) as two models: ``fastmlr``, the repository :func:`fastmlr.serve.write_repository`
writes, whose ONNX Runtime runner does not import PyTorch; and ``with_torch``, the same with
``import torch`` first in its ``model.py``, as every stub did while ``import fastmlr`` imported
PyTorch. Both get the same requests, interleaved: ``--requests`` single images, then ``--requests``
batches of ``--max-batch`` (which grow ONNX Runtime's memory arena). Reported: each process's resident
set (``VmRSS``) and peak (``VmHWM``) after each phase::

    python bench/serve_memory.py --out bench/results/serve_memory.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import replace
from pathlib import Path

if not __package__:  # run as ``python bench/serve_memory.py``: make the bench package importable
    import _script  # noqa: F401

import numpy as np
import torch

import fastmlr
from bench.environment import capture_environment, describe_machine
from bench.memory import process_group_memory
from bench.writers import markdown_table, run_script
from fastmlr import serve
from fastmlr.testing import calibrate_batchnorm

VARIANTS = {"fastmlr": "", "with_torch": "import torch  # noqa: F401 - what every stub imported before\n"}


def run(args: argparse.Namespace) -> dict:
    import tritonclient.http as httpclient

    torch.manual_seed(0)
    model = fastmlr.create_model(args.model, backbone=args.backbone, image_size=args.size)
    calibrate_batchnorm(model, torch.randn(8, 3, args.size, args.size))
    images = np.random.default_rng(0).standard_normal((args.max_batch, 3, args.size, args.size)).astype(np.float32)
    phases = []
    with tempfile.TemporaryDirectory(prefix="fastmlr-serve-memory-") as workdir:
        served = serve.prepare(model, workdir, name=args.model, backend="onnxruntime", max_batch=args.max_batch)
        repository = Path(workdir) / "repository"
        for name, prefix in VARIANTS.items():
            model_py = serve.write_repository(replace(served, name=name), repository) / "1" / "model.py"
            model_py.write_text(prefix + model_py.read_text())
        ports = serve.free_loopback_ports(3)
        with tempfile.NamedTemporaryFile("w", suffix=".log", prefix="tritonserver-") as log, serve.TritonServer(
            repository, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2], log=log
        ) as server:
            server.wait_ready()
            phases.append({"phase": "ready", "memory": process_group_memory(server.process.pid)})
            client = httpclient.InferenceServerClient(server.http_url)
            try:
                for batch in (1, args.max_batch):
                    request = httpclient.InferInput(serve.INPUT_NAME, [batch, *images.shape[1:]], "FP32")
                    request.set_data_from_numpy(images[:batch])
                    for _ in range(args.requests):
                        for name in VARIANTS:  # interleaved
                            client.infer(name, [request])
                    phases.append({"phase": f"after {args.requests} requests of batch {batch}",
                                   "memory": process_group_memory(server.process.pid)})
            finally:
                client.close()
    return {"config": {"model": args.model, "backbone": args.backbone, "size": args.size,
                       "max_batch": args.max_batch, "requests": args.requests,
                       "triton": "2.51 (nvidia-pytriton's tritonserver)"},
            "environment": capture_environment(), "load_average_1min": os.getloadavg()[0], "phases": phases}


def render_markdown(result: dict) -> str:
    config, env = result["config"], result["environment"]
    stubs = [f"triton_python_backend_stub {name}" for name in VARIANTS]
    rows = [[phase["phase"], *(f"{phase['memory'][s]['rss']:.0f} ({phase['memory'][s]['peak']:.0f})" for s in stubs),
             f"{phase['memory']['tritonserver']['rss']:.0f}"] for phase in result["phases"]]
    return "\n".join([
        f"# Resident memory of the served model's process: {config['model']} {config['backbone']} "
        f"{config['size']}x{config['size']}, ONNX Runtime, with and without PyTorch",
        "",
        f"Machine: {describe_machine(env)}; ONNX Runtime {env['versions']['onnxruntime']}, torch "
        f"{env['versions']['torch']}, Python {env['python']}; {env['utc_time']}; git {env['git_commit']}.",
        "",
        "One tritonserver serves the same graph as two models: `fastmlr` (the repository fastmlr serve writes; "
        "its ONNX Runtime runner does not import PyTorch) and `with_torch` (the same with `import torch` first "
        "in its model.py, as every stub did while `import fastmlr` imported PyTorch). Both got the same "
        "requests, interleaved. MiB, resident set (peak in brackets):",
        "",
        markdown_table(["after", "fastmlr stub", "with_torch stub", "tritonserver"], rows),
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="baseline")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20, help="requests per phase and model")
    parser.add_argument("--out", type=Path, required=True, help="result JSON (markdown written beside it)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    args = parser.parse_args(argv)
    return run_script("serve_memory.py", args, run, render_markdown)


if __name__ == "__main__":
    raise SystemExit(main())
