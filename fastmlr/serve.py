"""``fastmlr serve``: one fastmlr model behind NVIDIA Triton Inference Server, with dynamic batching.

The server is the ``tritonserver`` binary (Triton 2.51) and Python backend that the ``nvidia-pytriton``
wheel ships (``pip install -e ".[serve]"``). The model runs in Triton's Python-backend process
(:class:`TritonPythonModel`): Triton's dynamic batcher hands it up to ``max_batch`` queued requests at
once; it checks every request, runs the good ones as one batch on the runner (:func:`open_runner`) and
answers each request on its own, so a bad request, or a backend failure that only one request causes,
fails that request alone. (PyTriton's own Python API is not used: its inference callables answer a
dynamic batch as a whole, so one bad request would fail every request batched with it.)

Triton itself rejects, per request and naming the input, a wrong shape, a wrong data type and an
empty batch; :func:`check_request` repeats those checks and adds NaN/Inf.

**The interpreter.** The Python-backend stub embeds ``libpython3.X.so.1.0`` and imports the standard
library of the environment that started the server. Left to the dynamic loader it finds the system's
libpython (Debian's 3.11.2), whose C core does not match another build's standard library (under
pyenv's 3.11.7, PyTriton's own model fails at start-up with ``'_thread.RLock' object has no attribute
'_recursion_count'``), or no libpython at all (pyenv's 3.12). :func:`server_environment` links the
running interpreter's own shared libpython into the server's workspace, first on ``LD_LIBRARY_PATH``,
so stub and standard library always come from one build. An interpreter without a shared libpython
(``Py_ENABLE_SHARED=0``) cannot host the stub, and :func:`libpython` says so.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from fastmlr.cli import add_model_options, model_arguments

INPUT_NAME = "images"
#: The outputs served, in order, with their numpy types; MCAR adds ``boxes`` and ``indices``.
OUTPUT_TYPES = {"probs": np.float32, "boxes": np.int64, "indices": np.int64}
BACKENDS = ("eager", "onnxruntime", "trt", "torch-trt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
#: How long Triton's dynamic batcher holds a request for more to batch with it. None: the one model
#: instance is busy for a whole execution, and the requests that arrive meanwhile form the next batch
#: anyway; a delay would only add to every request's latency when requests come one at a time.
MAX_QUEUE_DELAY_US = 0
#: The file beside ``model.py`` that tells the Python backend what to load (a :class:`ServedModel`).
SPEC_FILE = "fastmlr.json"
#: Seconds ``tritonserver`` waits, once signalled, for client connections to close and models to unload.
#: :meth:`TritonServer.stop` has unloaded the models before it signals, so this only gives responses
#: already produced time to reach their clients; an idle keep-alive connection delays the exit no longer.
TRITON_EXIT_TIMEOUT_S = 2
#: The header that must carry a server's token for Triton's model-repository (load/unload) API.
CONTROL_HEADER = "fastmlr-control"
#: The model-repository index states of a model that may still hold requests.
LIVE_MODEL_STATES = ("LOADING", "READY", "UNLOADING")
SERVE_MISSING = 'Triton Inference Server is not installed: pip install -e ".[serve]" (the nvidia-pytriton wheel)'

#: A runner: ImageNet-normalised float32 images ``[B, 3, S, S]`` → ``{output name: array with batch axis B}``.
Runner = Callable[[np.ndarray], dict[str, np.ndarray]]


# --------------------------------------------------------------------------------------------------
# The model and its runner


@dataclass(frozen=True)
class ServedModel:
    """What the Python backend loads: the registered ``model`` at ``size`` on ``backend``, its weights
    (a fastmlr checkpoint) and, for the exported backends, the validated artifact (ONNX graph or
    TensorRT engine); ``outputs`` are ``(name, dims without the batch axis)``."""

    name: str
    model: str
    size: int
    backend: str
    precision: str
    max_batch: int
    weights: str
    artifact: str | None
    outputs: tuple[tuple[str, tuple[int, ...]], ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ServedModel:
        fields = json.loads(text)
        fields["outputs"] = tuple((name, tuple(dims)) for name, dims in fields["outputs"])
        return cls(**fields)


def check_serve_options(backend: str, precision: str, max_batch: int) -> None:
    """``ValueError`` for an unknown backend or precision, a precision the backend cannot serve, or a
    ``max_batch`` below 1."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision != "fp32" and backend == "eager":
        raise ValueError(f"--precision {precision} needs --backend onnxruntime, trt or torch-trt; eager serves fp32")
    if precision == "int8" and backend == "torch-trt":
        raise ValueError("--precision int8 needs --backend onnxruntime or trt (calibrated Q/DQ ONNX graphs); "
                         "torch-trt compiles fp32, fp16 or bf16")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")


def served_outputs(model) -> tuple[tuple[str, tuple[int, ...]], ...]:  # noqa: ANN001 - any fastmlr model
    """``probs [C]``, plus ``boxes [N, 4]`` and ``indices [N]`` for models with ``forward_stages`` (MCAR)."""
    from fastmlr.export.validation import has_stages

    outputs: list[tuple[str, tuple[int, ...]]] = [("probs", (int(model.num_classes),))]
    if has_stages(model):
        outputs += [("boxes", (int(model.topn), 4)), ("indices", (int(model.topn),))]
    return tuple(outputs)


def prepare(
    model,  # noqa: ANN001 - any fastmlr model
    workdir: str | os.PathLike,
    *,
    name: str,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    max_batch: int = 8,
) -> ServedModel:
    """Write what :func:`open_runner` needs into ``workdir`` and describe it.

    The weights go to a fastmlr checkpoint; ``onnxruntime`` exports a dynamic-batch graph at
    ``precision`` with :func:`fastmlr.export.to_onnx` (int8 calibrated on the packaged COCO photos) and
    opens it once, so a graph ONNX Runtime cannot run on this machine (bf16 on the CPU) fails here;
    ``trt`` builds a validated engine for batches ``1..max_batch`` with :func:`fastmlr.export.export_engine`.
    Both are validated against PyTorch before anything is served.
    """
    from fastmlr.checkpoint import save_checkpoint

    check_serve_options(backend, precision, max_batch)
    model = model.eval().cpu()
    workdir = Path(workdir)
    size = int(model.image_size)
    weights = workdir / "weights.pt"
    save_checkpoint(model, weights)
    artifact: Path | None = None
    if backend == "onnxruntime":
        from fastmlr.export import to_onnx
        from fastmlr.export.precision import precision_session

        artifact = to_onnx(model, workdir / f"model.{precision}.onnx", image_size=size, batch=max_batch,
                           dynamic_batch=True, precision=precision)
        with warnings.catch_warnings():  # the runner warns about fp16 on the CPU when it opens the graph
            warnings.simplefilter("ignore")
            precision_session(artifact)
    elif backend == "trt":
        from fastmlr.export import export_engine

        artifact = export_engine(model, workdir / f"model.{precision}.plan", image_size=size, precision=precision,
                                 min_batch=1, opt_batch=max_batch, max_batch=max_batch)
    return ServedModel(name=name, model=str(model.model_name), size=size, backend=backend, precision=precision,
                       max_batch=max_batch, weights=str(weights), artifact=None if artifact is None else str(artifact),
                       outputs=served_outputs(model))


def open_runner(served: ServedModel) -> Runner:
    """The runner of ``served``: the PyTorch model (``eager``, CPU), an ONNX Runtime session on the graph
    (:func:`fastmlr.export.precision.precision_session`, which opens it through
    :func:`fastmlr.runtime.ort_session`; CPU), :class:`fastmlr.export.TRTRunner` on the engine, or the
    torch-tensorrt module from :func:`fastmlr.export.compile_torch_tensorrt`. The ONNX Runtime runner
    does not import PyTorch, so a server's Python-backend process holds ONNX Runtime and the graph only."""
    names = [name for name, _ in served.outputs]
    if served.backend == "onnxruntime":
        from fastmlr.export.precision import precision_session

        # The session's threads stop spinning when a run returns: in a server they share the CPUs with
        # Triton's request handling and the Python-backend hand-over that come between runs.
        session = precision_session(served.artifact, idle_spinning=False)

        def run_session(images: np.ndarray) -> dict[str, np.ndarray]:
            return dict(zip(names, session.run(names, {INPUT_NAME: images}), strict=True))

        return run_session
    import torch

    if served.backend == "trt":
        from fastmlr.export import TRTRunner

        engine = TRTRunner(served.artifact)

        def run_engine(images: np.ndarray) -> dict[str, np.ndarray]:
            outputs = engine(torch.from_numpy(images))
            return {name: outputs[name].cpu().numpy() for name in names}  # .cpu() waits for the stream

        return run_engine
    import fastmlr

    model = fastmlr.create_model(served.model, checkpoint=served.weights).eval()
    if served.backend == "torch-trt":
        from fastmlr.export import compile_torch_tensorrt

        compiled = compile_torch_tensorrt(model, image_size=served.size, precision=served.precision,
                                          min_batch=1, opt_batch=served.max_batch, max_batch=served.max_batch)

        def run_compiled(images: np.ndarray) -> dict[str, np.ndarray]:
            outputs = compiled(torch.from_numpy(images).to("cuda"))  # float32 in and out, low precision inside
            return {name: value.cpu().numpy() for name, value in zip(names, outputs, strict=False)}

        return run_compiled

    @torch.inference_mode()
    def run_eager(images: np.ndarray) -> dict[str, np.ndarray]:
        batch = torch.from_numpy(images)
        if "boxes" in names:
            stages = model.forward_stages(batch)
            return {name: getattr(stages, name).numpy() for name in names}
        return {"probs": model(batch).numpy()}

    return run_eager


# --------------------------------------------------------------------------------------------------
# Requests


def check_request(images: np.ndarray, size: int) -> None:
    """``ValueError`` naming the problem unless ``images`` is a float32 ``[B, 3, size, size]`` batch,
    B ≥ 1, of finite values."""
    if images.dtype != np.float32:
        raise ValueError(f"input {INPUT_NAME!r} must be FP32, got {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != (3, size, size):
        raise ValueError(f"input {INPUT_NAME!r} must have shape [B, 3, {size}, {size}], got {list(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"input {INPUT_NAME!r} is an empty batch (B = 0)")
    if not np.isfinite(images).all():
        bad = int(images.size - np.isfinite(images).sum())
        raise ValueError(f"input {INPUT_NAME!r} holds {bad} NaN or infinite value{'s' * (bad != 1)}")


class BackendError(RuntimeError):
    """The runner failed on a request that passed :func:`check_request`."""


def answer_requests(
    runner: Runner, requests: Sequence[np.ndarray], size: int
) -> list[dict[str, np.ndarray] | ValueError | BackendError]:
    """One answer per request, in order: its outputs (each with the request's batch axis), the
    ``ValueError`` of :func:`check_request`, or a :class:`BackendError`. Requests that pass the check
    run as one batch; when that batch fails, each of them runs alone, so a failure that one request
    causes fails only that request."""
    answers: list[dict[str, np.ndarray] | ValueError | BackendError] = []
    for images in requests:
        try:
            check_request(images, size)
            answers.append({})
        except ValueError as err:
            answers.append(err)
    good = [i for i, answer in enumerate(answers) if isinstance(answer, dict)]
    if not good:
        return answers
    try:
        batch = np.concatenate([requests[i] for i in good]) if len(good) > 1 else requests[good[0]]
        outputs = runner(np.ascontiguousarray(batch))
    except Exception as err:  # noqa: BLE001 - a backend failure becomes the requests' error answers
        if len(good) == 1:
            answers[good[0]] = BackendError(f"the backend failed on this request: {type(err).__name__}: {err}")
        else:
            for i in good:
                answers[i] = answer_requests(runner, [requests[i]], size)[0]
        return answers
    start = 0
    for i in good:
        stop = start + requests[i].shape[0]
        answers[i] = {name: value[start:stop] for name, value in outputs.items()}
        start = stop
    return answers


class TritonPythonModel:
    """The model as Triton's Python backend loads it (``<repository>/<name>/1/model.py`` imports it):
    reads the :class:`ServedModel` beside it (:func:`read_served`), opens its runner once, and answers
    each dynamic batch of requests with :func:`answer_requests`."""

    def initialize(self, args: dict[str, str]) -> None:
        self.served = read_served(Path(args["model_repository"]), int(args["model_version"]))
        self.runner = open_runner(self.served)

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils  # exists only inside Triton's Python backend

        arrays = [pb_utils.get_input_tensor_by_name(request, INPUT_NAME).as_numpy() for request in requests]
        responses = []
        for answer in answer_requests(self.runner, arrays, self.served.size):
            if isinstance(answer, Exception):  # a bad request is the client's error (HTTP 400), else 500
                errors = pb_utils.TritonError
                code = errors.INVALID_ARG if isinstance(answer, ValueError) else errors.INTERNAL
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(answer), code)))
            else:
                tensors = [pb_utils.Tensor(name, np.ascontiguousarray(answer[name], dtype=OUTPUT_TYPES[name]))
                           for name, _ in self.served.outputs]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses


def write_repository(
    served: ServedModel, repository: str | os.PathLike, *, max_queue_delay_us: int = MAX_QUEUE_DELAY_US
) -> Path:
    """``<repository>/<name>/config.pbtxt`` (Python backend, ``max_batch_size``, dynamic batching that
    waits up to ``max_queue_delay_us`` for more requests, the input ``images`` FP32 ``[3, S, S]``, the
    outputs), ``1/model.py`` and ``1/fastmlr.json`` (the :class:`ServedModel`); returns the model's
    directory."""
    from fastmlr.export.triton_server import TensorSpec, triton_config

    types = {"probs": "TYPE_FP32", "boxes": "TYPE_INT64", "indices": "TYPE_INT64"}
    model_dir = Path(repository) / served.name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "1" / "model.py").write_text("from fastmlr.serve import TritonPythonModel  # noqa: F401\n")
    (model_dir / "1" / SPEC_FILE).write_text(served.to_json())
    config = triton_config(
        served.name, backend="python", max_batch_size=served.max_batch, max_queue_delay_us=max_queue_delay_us,
        inputs=[TensorSpec(INPUT_NAME, "TYPE_FP32", (3, served.size, served.size))],
        outputs=[TensorSpec(name, types[name], dims) for name, dims in served.outputs],
    )
    (model_dir / "config.pbtxt").write_text(config)
    return model_dir


def read_served(model_dir: str | os.PathLike, version: int = 1) -> ServedModel:
    """The :class:`ServedModel` that :func:`write_repository` wrote for version ``version`` of ``model_dir``."""
    return ServedModel.from_json((Path(model_dir) / str(version) / SPEC_FILE).read_text())


# --------------------------------------------------------------------------------------------------
# The server process


@dataclass(frozen=True)
class TritonDistribution:
    """The files of the ``tritonserver`` that ``nvidia-pytriton`` ships."""

    server: Path  # bin/tritonserver
    backends: Path  # backends/ (python/ without its stub)
    libraries: Path  # the wheel's bundled shared libraries (libtritonserver, libcudart, ...)
    stub: Path  # the Python-backend stub built for this interpreter's X.Y


def triton_distribution() -> TritonDistribution:
    """Locate the server, its backends, libraries and this Python's backend stub; ``RuntimeError``
    naming what is missing."""
    try:
        import pytriton
    except ImportError as err:
        raise RuntimeError(SERVE_MISSING) from err
    root = Path(pytriton.__file__).parent
    dist = root / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = TritonDistribution(server=dist / "bin" / "tritonserver", backends=dist / "backends",
                               libraries=root.parent / "nvidia_pytriton.libs",
                               stub=dist / "python_backend_stubs" / version / "triton_python_backend_stub")
    if not found.stub.is_file():
        shipped = sorted(p.name for p in (dist / "python_backend_stubs").glob("*"))
        raise RuntimeError(f"nvidia-pytriton ships Triton Python-backend stubs for Python {', '.join(shipped)}; "
                           f"this interpreter is Python {version}")
    for path in (found.server, found.backends / "python", found.libraries):
        if not path.exists():
            raise RuntimeError(f"the nvidia-pytriton installation lacks {path}; reinstall it: {SERVE_MISSING}")
    return found


def libpython() -> Path:
    """The running interpreter's shared ``libpython3.X.so.1.0``; ``RuntimeError`` with the fix when it has
    none (the Python backend's stub must embed the very build whose standard library it imports)."""
    soname = sysconfig.get_config_var("INSTSONAME") or ""
    path = Path(sysconfig.get_config_var("LIBDIR") or "") / soname
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or ".so" not in soname or not path.is_file():
        raise RuntimeError(
            f"this Python ({sys.executable}, {sys.version.split()[0]}) has no shared libpython, which Triton's "
            "Python-backend stub embeds: use an interpreter built with --enable-shared (Debian's /usr/bin/python3; "
            "pyenv with PYTHON_CONFIGURE_OPTS=--enable-shared) for the environment that runs fastmlr serve")
    return path


def server_environment(dist: TritonDistribution, workspace: Path) -> dict[str, str]:
    """The environment of ``tritonserver``: this interpreter's libpython (linked into ``workspace``) and the
    wheel's libraries first on ``LD_LIBRARY_PATH``, this interpreter's ``bin`` first on ``PATH`` (the stub
    finds its ``sys.prefix``, and so this environment's packages, from the ``python3`` there)."""
    library = libpython()
    link_dir = workspace / "libpython"
    link_dir.mkdir(exist_ok=True)
    (link_dir / library.name).symlink_to(library)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(link_dir), str(dist.libraries), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), env.get("PATH", "")) if p)
    return env


def free_loopback_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that were free on 127.0.0.1 a moment ago (the OS's choice), for
    servers of tests and benchmarks."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when the process that started the server dies (Linux prctl)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class TritonServer:
    """``tritonserver`` on ``repository``, listening on ``host`` (HTTP, gRPC, metrics ports).

    ``start()`` launches it with every model of the repository loaded; ``wait_ready(timeout)`` polls
    ``/v2/health/ready`` and raises ``RuntimeError`` with the server's log tail if it exits or times out;
    ``stop()`` drains the models (:meth:`drain`: no new requests, the ones in flight finish), then sends
    SIGTERM and returns the server's exit code. Its output goes to ``log`` (a file; ``None``: this
    process's stdout/stderr). A context manager.

    Triton's own shutdown waits for every open client connection to close before it unloads the models,
    out of one exit-timeout budget: a client that merely keeps an idle keep-alive connection would use
    the whole budget and make the server exit 1 with no request lost. So the server runs in Triton's
    explicit model-control mode, and :meth:`drain` unloads the models through the model-repository API
    first; once they are unloaded, a short exit timeout (:data:`TRITON_EXIT_TIMEOUT_S`) is all Triton
    needs. That API is restricted to requests carrying this server's random token in the
    :data:`CONTROL_HEADER` header (HTTP and gRPC), so clients cannot load or unload models. The token is
    on Triton's command line, so local users who can read other users' processes can see it.
    """

    def __init__(
        self, repository: str | os.PathLike, *, host: str = "127.0.0.1", http_port: int = 8000,
        grpc_port: int = 8001, metrics_port: int = 8002, drain_timeout_s: float = 30, log: IO | None = None,
    ) -> None:
        self.repository = Path(repository)
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.drain_timeout_s = drain_timeout_s
        self.log = log
        self.process: subprocess.Popen | None = None
        self.drained: bool | None = None  # after stop(): whether every request in flight had finished
        self._token = secrets.token_hex(16)
        # The Python backend names its /dev/shm regions by this prefix: one of its own per server, so that
        # servers on one machine never share a region, and stop() can remove what a killed server left.
        self.shm_prefix = f"fastmlr{os.getpid()}-{secrets.token_hex(4)}-"
        self._workspace: tempfile.TemporaryDirectory | None = None

    @property
    def http_url(self) -> str:
        return f"{self._probe_host()}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._probe_host()}:{self.grpc_port}"

    def _probe_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    def command(self, dist: TritonDistribution, backends: Path) -> list[str]:
        address = [f"--{kind}-address={self.host}" for kind in ("http", "grpc", "metrics")]
        control = f"model-repository:{CONTROL_HEADER}={self._token}"
        return [str(dist.server), f"--model-repository={self.repository}", f"--backend-directory={backends}",
                *address, f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
                f"--metrics-port={self.metrics_port}", "--model-control-mode=explicit", "--load-model=*",
                f"--http-restricted-api={control}", f"--grpc-restricted-protocol={control}",
                f"--exit-timeout-secs={TRITON_EXIT_TIMEOUT_S}",
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                "--allow-gpu-metrics=false", "--log-info=false"]

    def start(self) -> TritonServer:
        dist = triton_distribution()
        self._workspace = tempfile.TemporaryDirectory(prefix="fastmlr-triton-")
        workspace = Path(self._workspace.name)
        env = server_environment(dist, workspace)
        backends = workspace / "backends"
        shutil.copytree(dist.backends, backends)
        shutil.copy2(dist.stub, backends / "python" / "triton_python_backend_stub")
        out = self.log if self.log is not None else None
        self.process = subprocess.Popen(self.command(dist, backends), env=env, stdout=out,
                                        stderr=subprocess.STDOUT if out is not None else None,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=_die_with_parent)
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise RuntimeError(f"tritonserver exited with code {code} before it was ready{self._log_tail()}")
            if self.ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"tritonserver was not ready after {timeout_s:.0f} s{self._log_tail()}")

    def _log_tail(self, lines: int = 15) -> str:
        name = getattr(self.log, "name", None)
        if not isinstance(name, str) or not os.path.isfile(name):
            return " (its log is above)"
        tail = Path(name).read_text(errors="replace").splitlines()[-lines:]
        return ":\n" + "\n".join(tail)

    def _control(self, path: str) -> Any:  # noqa: ANN401 - the endpoint's JSON
        """POST to the model-repository API ``/v2/repository/<path>`` with this server's token."""
        request = urllib.request.Request(f"http://{self.http_url}/v2/repository/{path}", data=b"{}", method="POST",
                                         headers={CONTROL_HEADER: self._token})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def drain(self, timeout_s: float | None = None) -> bool:
        """Unload every model: Triton answers new requests for them with an error and finishes the ones it
        has (queued or executing). True once none is loaded, within ``timeout_s`` (default
        ``drain_timeout_s``); False on timeout or when the server cannot be reached."""
        deadline = time.monotonic() + (self.drain_timeout_s if timeout_s is None else timeout_s)
        try:
            loaded = [m["name"] for m in self._control("index") if m.get("state") in LIVE_MODEL_STATES]
            for name in loaded:
                self._control(f"models/{urllib.parse.quote(name)}/unload")
            while time.monotonic() < deadline:
                if not any(m.get("state") in LIVE_MODEL_STATES for m in self._control("index")):
                    return True
                time.sleep(0.05)
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return False

    def stop(self, timeout_s: float | None = None) -> int:
        """:meth:`drain` (up to ``drain_timeout_s``), then SIGTERM and wait (SIGKILL after ``timeout_s``,
        default :data:`TRITON_EXIT_TIMEOUT_S` + 30 s). The exit code: 0 when the server stopped cleanly,
        non-zero when requests were still in flight after the drain or the server failed."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.drained = self.drain()
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=TRITON_EXIT_TIMEOUT_S + 30 if timeout_s is None else timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        # What only a failed or killed server leaves behind: Python-backend stubs (in its process group, as it
        # runs in a session of its own) that would wait for it forever, and their shared-memory regions.
        if code != 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            with contextlib.suppress(OSError):
                region.unlink()
        if self._workspace is not None:
            self._workspace.cleanup()
            self._workspace = None
        return code

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def serving(
    model,  # noqa: ANN001 - any fastmlr model
    *, name: str, backend: str = "onnxruntime", precision: str = "fp32", max_batch: int = 8,
    host: str = "127.0.0.1", ports: tuple[int, int, int] = (8000, 8001, 8002), log: IO | None = None,
    ready_timeout_s: float = 120,
) -> Iterator[TritonServer]:
    """``model`` prepared (:func:`prepare`) and served until the block ends; yields the ready server."""
    with tempfile.TemporaryDirectory(prefix="fastmlr-serve-") as workdir:
        served = prepare(model, workdir, name=name, backend=backend, precision=precision, max_batch=max_batch)
        write_repository(served, Path(workdir) / "repository")
        server = TritonServer(Path(workdir) / "repository", host=host, http_port=ports[0], grpc_port=ports[1],
                              metrics_port=ports[2], log=log)
        with server:
            server.wait_ready(ready_timeout_s)
            yield server


# --------------------------------------------------------------------------------------------------
# The command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastmlr serve`` options."""
    parser.add_argument("--model", required=True, help="registered model name, also its name in Triton")
    parser.add_argument("--backbone", help="resnet50 | resnet101 | mobilenet_v2 (default: the checkpoint's, "
                                           "else resnet101)")
    parser.add_argument("--size", type=int, help="input side S (default: the checkpoint's, else 448)")
    parser.add_argument("--checkpoint", help="weights (random weights, seed 0, without it)")
    parser.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="the graph's precision (onnxruntime, trt; torch-trt: not int8); eager serves fp32")
    parser.add_argument("--max-batch", type=int, default=8, help="Triton's max_batch_size (dynamic batching)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--drain-timeout", type=float, default=30,
                        help="seconds that SIGINT/SIGTERM waits for the requests in flight to finish (default 30)")
    parser.add_argument("--workdir", help="keep the exported model and Triton's model repository here "
                                          "(default: a temporary directory, removed at exit)")
    add_model_options(parser)


def run(args: argparse.Namespace) -> int:
    """Prepare the model, start Triton, print the endpoints, and serve until SIGINT/SIGTERM; then stop
    taking requests, let the ones in flight finish (up to ``--drain-timeout``) and exit 0 (1 when the
    server fails or requests were still in flight)."""
    import torch

    import fastmlr

    check_serve_options(args.backend, args.precision, args.max_batch)
    for option in ("http_port", "grpc_port", "metrics_port"):
        port = getattr(args, option)
        if not 0 < port < 65536:
            raise ValueError(f"--{option.replace('_', '-')} must be a TCP port (1-65535), got {port}")
    if ":" in args.host:  # Triton joins address and port as "HOST:PORT", which an IPv6 literal breaks
        raise ValueError(f"--host must be an IPv4 address or a host name: Triton 2.51 cannot listen on the IPv6 "
                         f"address {args.host!r}")
    if not args.drain_timeout >= 0:
        raise ValueError(f"--drain-timeout must be a number of seconds >= 0, got {args.drain_timeout}")
    triton_distribution()
    libpython()
    if args.workdir:
        from fastmlr.checks import check_output_dir

        check_output_dir(args.workdir, "--workdir")
    stop = {"signal": None}

    def request_stop(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        torch.manual_seed(0)
        model = fastmlr.create_model(args.model, backbone=args.backbone, image_size=args.size,
                                     checkpoint=args.checkpoint, **model_arguments(args)).eval()
        kept = contextlib.nullcontext(args.workdir) if args.workdir else None
        with kept or tempfile.TemporaryDirectory(prefix="fastmlr-serve-") as workdir:
            Path(workdir).mkdir(parents=True, exist_ok=True)
            served = prepare(model, workdir, name=args.model, backend=args.backend, precision=args.precision,
                             max_batch=args.max_batch)
            del model
            if stop["signal"] is not None:
                print(f"stopped ({signal.Signals(stop['signal']).name}) before the server started", flush=True)
                return 0
            write_repository(served, Path(workdir) / "repository")
            serving_started = False
            server = TritonServer(Path(workdir) / "repository", host=args.host, http_port=args.http_port,
                                  grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                                  drain_timeout_s=args.drain_timeout).start()
            try:
                while not server.ready() and stop["signal"] is None:
                    if server.process.poll() is not None:
                        print(f"fastmlr serve: error: tritonserver exited with code {server.process.returncode}",
                              file=sys.stderr)
                        return 1
                    time.sleep(0.2)
                serving_started = stop["signal"] is None
                if serving_started:
                    outputs = ", ".join(f"{n} {list(d)}" for n, d in served.outputs)
                    print(f"serving {served.name} ({served.backend}, {served.precision}, max batch "
                          f"{served.max_batch}): input images [3, {served.size}, {served.size}] -> {outputs}\n"
                          f"  HTTP http://{args.host}:{args.http_port}/v2/models/{served.name}/infer  "
                          f"gRPC {args.host}:{args.grpc_port}  metrics http://{args.host}:{args.metrics_port}"
                          "/metrics\n  stop with Ctrl-C or SIGTERM", flush=True)
                while stop["signal"] is None and server.process.poll() is None:
                    time.sleep(0.2)
            finally:
                code = server.stop()
            if stop["signal"] is None:
                print(f"fastmlr serve: error: tritonserver exited with code {code}", file=sys.stderr)
                return 1
            if not serving_started:  # Triton may not handle signals yet: SIGTERM ends it at once
                print(f"stopped ({signal.Signals(stop['signal']).name}) before the server was ready", flush=True)
                return 0 if code in (0, -signal.SIGTERM) else 1
            drain_failed = server.drained is False
            if drain_failed:
                print(f"fastmlr serve: error: requests were still in flight {args.drain_timeout:g} s after "
                      f"{signal.Signals(stop['signal']).name} (--drain-timeout)", file=sys.stderr)
            print(f"stopped ({signal.Signals(stop['signal']).name}); tritonserver exited with code {code}", flush=True)
            return 0 if code == 0 and not drain_failed else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
