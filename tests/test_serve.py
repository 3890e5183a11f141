"""``fastmlr serve``: request checks and per-request answers (no server), then the real command —
Triton Inference Server on free loopback ports — under concurrent HTTP and gRPC requests compared with
the same runner in this process, bad requests, metrics, and SIGTERM with a request in flight."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import fastmlr
from fastmlr import serve
from fastmlr.checkpoint import save_checkpoint
from fastmlr.testing import calibrate_batchnorm

SIZE = 64
ROOT = pathlib.Path(__file__).resolve().parents[1]


def images(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Without a server


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((1, 3, SIZE, SIZE), np.float64), "must be FP32"),
        (np.zeros((1, 3, 32, 32), np.float32), "must have shape [B, 3, 64, 64], got [1, 3, 32, 32]"),
        (np.zeros((3, SIZE, SIZE), np.float32), "must have shape"),
        (np.zeros((0, 3, SIZE, SIZE), np.float32), "empty batch"),
        (np.where(np.arange(3 * SIZE * SIZE).reshape(1, 3, SIZE, SIZE) == 5, np.inf, 0).astype(np.float32),
         "holds 1 NaN or infinite value"),
        (np.full((2, 3, SIZE, SIZE), np.nan, np.float32), f"holds {2 * 3 * SIZE * SIZE} NaN"),
    ],
)
def test_check_request_names_the_problem(array: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match="input 'images'") as err:
        serve.check_request(array, SIZE)
    assert message in str(err.value)


def test_answer_requests_fails_only_the_bad_requests() -> None:
    calls = []

    def runner(batch: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(batch.shape[0])
        if (batch == 7).any():  # a request the backend itself cannot run
            raise RuntimeError("kernel exploded")
        return {"probs": batch.mean(axis=(2, 3))}

    good_a, good_b = images(2, 0), images(3, 1)
    poison = np.full((1, 3, SIZE, SIZE), 7, np.float32)
    nan = np.full((1, 3, SIZE, SIZE), np.nan, np.float32)
    answers = serve.answer_requests(runner, [good_a, nan, poison, good_b], SIZE)
    assert isinstance(answers[1], ValueError) and "NaN" in str(answers[1])
    assert isinstance(answers[2], serve.BackendError) and "kernel exploded" in str(answers[2])
    np.testing.assert_array_equal(answers[0]["probs"], good_a.mean(axis=(2, 3)))
    np.testing.assert_array_equal(answers[3]["probs"], good_b.mean(axis=(2, 3)))
    assert calls == [6, 2, 1, 3]  # one batch of the good requests, then each alone after its failure

    answers = serve.answer_requests(runner, [good_a, good_b], SIZE)  # all good: one call, split per request
    assert calls[-1] == 5 and [a["probs"].shape for a in answers] == [(2, 3), (3, 3)]


def test_repository_declares_dynamic_batching_and_the_outputs(tmp_path: pathlib.Path) -> None:
    served = serve.ServedModel(name="mcar", model="mcar", size=SIZE, backend="eager", precision="fp32",
                               max_batch=4, weights=str(tmp_path / 'w "1".pt'), artifact=None,
                               outputs=(("probs", (80,)), ("boxes", (4, 4)), ("indices", (4,))))
    model_dir = serve.write_repository(served, tmp_path / "repo")
    config = (model_dir / "config.pbtxt").read_text()
    # No queue delay: the batcher batches what queued while the model was busy, and never holds a lone request.
    for line in ('backend: "python"', "max_batch_size: 4", "dynamic_batching {", "max_queue_delay_microseconds: 0\n",
                 'name: "images"', "dims: [ 3, 64, 64 ]", "data_type: TYPE_INT64", "dims: [ 4, 4 ]"):
        assert line in config
    assert "from fastmlr.serve import TritonPythonModel" in (model_dir / "1" / "model.py").read_text()
    assert serve.read_served(model_dir) == served


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="eager serves fp32"):
        serve.check_serve_options("eager", "fp16", 8)
    with pytest.raises(ValueError, match="torch-trt compiles fp32, fp16 or bf16"):
        serve.check_serve_options("torch-trt", "int8", 8)
    with pytest.raises(ValueError, match="max_batch"):
        serve.check_serve_options("eager", "fp32", 0)
    with pytest.raises(ValueError, match="unknown backend"):
        serve.check_serve_options("tensorflow", "fp32", 8)


def test_eager_runner_matches_the_model(tmp_path: pathlib.Path) -> None:
    model = fastmlr.create_model("mcar", backbone="mobilenet_v2", num_classes=20, image_size=SIZE, topn=2).eval()
    served = serve.prepare(model, tmp_path, name="m", backend="eager", max_batch=2)
    assert served.outputs == (("probs", (20,)), ("boxes", (2, 4)), ("indices", (2,)))
    outputs = serve.open_runner(served)(images(2, 3))
    with torch.no_grad():
        stages = model.forward_stages(torch.from_numpy(images(2, 3)))
    np.testing.assert_allclose(outputs["probs"], stages.probs.numpy(), atol=1e-6)
    np.testing.assert_array_equal(outputs["boxes"], stages.boxes.numpy())
    np.testing.assert_array_equal(outputs["indices"], stages.indices.numpy())


def test_onnxruntime_runner_stops_spinning_between_runs(tmp_path: pathlib.Path, monkeypatch) -> None:
    """In a server, ONNX Runtime's idle spinning threads would take the CPUs that Triton's request handling
    needs between runs."""
    import fastmlr.export.precision as precision

    model = fastmlr.create_model("baseline", backbone="mobilenet_v2", image_size=SIZE).eval()
    served = serve.prepare(model, tmp_path, name="m", backend="onnxruntime", max_batch=2)
    sessions, opened = [], precision.precision_session
    monkeypatch.setattr(precision, "precision_session", lambda path, **kw: sessions.append(opened(path, **kw))
                        or sessions[-1])
    outputs = serve.open_runner(served)(images(2, 3))
    assert sessions[0].get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
    with torch.no_grad():
        np.testing.assert_allclose(outputs["probs"], model(torch.from_numpy(images(2, 3))).numpy(), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The real server


def cannot_serve_reason() -> str | None:
    """Why no Triton server can start in this environment, or None."""
    try:
        serve.triton_distribution()
        serve.libpython()
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401
    except (RuntimeError, ImportError) as err:
        return str(err)
    return None


def test_exported_repository_is_read_by_the_real_tritonserver(tmp_path: pathlib.Path) -> None:
    """The bundled tritonserver has no onnxruntime or tensorrt backend, so this is as far as it goes:
    each config.pbtxt parses as Triton's ModelConfig, its platform is known and maps to a backend, and
    loading stops only for want of that backend. A broken copy shows the parse is really checked."""
    reason = cannot_serve_reason()
    if reason:
        pytest.skip(reason)
    from fastmlr.export import write_triton_repository
    from fastmlr.export.triton_server import tensor_specs, triton_config

    repository = tmp_path / "repository"
    model = fastmlr.create_model("baseline", backbone="mobilenet_v2", image_size=SIZE)
    onnx_dir = write_triton_repository(model, repository, image_size=SIZE, max_batch_size=4)
    inputs, outputs = tensor_specs(onnx_dir / "1" / "model.onnx")
    (repository / "baseline_plan" / "1").mkdir(parents=True)  # the plan's config (no engine without a GPU)
    (repository / "baseline_plan" / "config.pbtxt").write_text(
        triton_config("baseline_plan", platform="tensorrt_plan", inputs=inputs, outputs=outputs, max_batch_size=4))
    (repository / "broken" / "1").mkdir(parents=True)
    (repository / "broken" / "config.pbtxt").write_text(
        (onnx_dir / "config.pbtxt").read_text().replace('"baseline"', '"broken"').replace("dims: [ 80 ]", "dims: [ 80"))
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        http, grpc, metrics = serve.free_loopback_ports(3)
        server = serve.TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics, log=log).start()
        assert server.process.wait(timeout=120) != 0  # no model can load, so the server refuses to start
        server.stop()
    text = log_path.read_text()
    assert "failed to load 'baseline' version 1: Invalid argument: unable to find backend library for backend " \
           "'onnxruntime'" in text, text
    assert "failed to load 'baseline_plan' version 1: Invalid argument: unable to find backend library for " \
           "backend 'tensorrt'" in text, text
    assert "Poll failed for model directory 'broken': failed to read text proto" in text, text
    assert text.count("failed to load '") == 2 and "Poll failed for model directory 'baseline" not in text, text


def test_the_stub_embeds_this_interpreters_own_libpython(tmp_path: pathlib.Path) -> None:
    """Triton's Python-backend stub must load the libpython of the build whose standard library it
    imports; left to the loader it takes the system's (Debian's 3.11.2 under pyenv's 3.11.7)."""
    reason = cannot_serve_reason()
    if reason:
        pytest.skip(reason)
    if shutil.which("ldd") is None:
        pytest.skip("ldd is not installed")
    dist = serve.triton_distribution()
    env = serve.server_environment(dist, tmp_path)
    listing = subprocess.run(["ldd", str(dist.stub)], env=env, capture_output=True, text=True, check=True).stdout
    library = serve.libpython()
    resolved = next(line.split("=>")[1].split("(")[0].strip() for line in listing.splitlines()
                    if line.strip().startswith(library.name))
    assert os.path.realpath(resolved) == os.path.realpath(library), listing


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    reason = cannot_serve_reason()
    if reason:
        print(f"\nserving tests skipped: {reason}", file=sys.stderr)
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model = fastmlr.create_model("baseline", backbone="mobilenet_v2", image_size=SIZE)
    calibrate_batchnorm(model, torch.randn(8, 3, SIZE, SIZE))  # outputs depend on the image
    save_checkpoint(model, tmp / "baseline.pt")
    http, grpc, metrics = serve.free_loopback_ports(3)
    log = open(tmp / "server.log", "w")  # noqa: SIM115 - closed at teardown
    process = subprocess.Popen(
        [sys.executable, "-m", "fastmlr.cli", "serve", "--model", "baseline", "--checkpoint", str(tmp / "baseline.pt"),
         "--backend", "onnxruntime", "--max-batch", "8", "--http-port", str(http), "--grpc-port", str(grpc),
         "--metrics-port", str(metrics), "--workdir", str(tmp / "work")],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    import tritonclient.http as httpclient

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
        try:
            if client.is_model_ready("baseline"):
                break
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        finally:
            client.close()  # an open connection would hold the server's shutdown
        time.sleep(0.25)
    else:
        process.kill()
        log_text = (tmp / "server.log").read_text()
        pytest.fail(f"fastmlr serve did not get ready (exit code {process.poll()}):\n{log_text}")
    # The in-process reference: the same runner on the very graph the server runs.
    reference = serve.open_runner(serve.read_served(tmp / "work" / "repository" / "baseline"))
    yield {"process": process, "http": http, "grpc": grpc, "metrics": metrics, "reference": reference,
           "log": tmp / "server.log", "repository": tmp / "work" / "repository"}
    if process.poll() is None:
        process.kill()
        process.wait()
    log.close()


def infer(protocol: str, port: int, array: np.ndarray, datatype: str = "FP32") -> np.ndarray:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        request = module.InferInput("images", list(array.shape), datatype)
        request.set_data_from_numpy(array)
        return client.infer("baseline", [request]).as_numpy("probs")
    finally:
        client.close()


def test_concurrent_requests_match_the_in_process_runner(server: dict) -> None:
    jobs = [("http" if i % 2 else "grpc", images(1 + i % 3, seed=i)) for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: infer(job[0], server[job[0]], job[1]), jobs))
    for (_, array), probs in zip(jobs, results, strict=True):
        np.testing.assert_allclose(probs, server["reference"](array)["probs"], atol=1e-5)
    assert np.ptp(np.stack([r[0] for r in results]), axis=0).max() > 1e-3  # different images, different outputs


def test_bad_requests_get_errors_and_the_server_keeps_serving(server: dict) -> None:
    from tritonclient.utils import InferenceServerException

    bad = {
        "NaN or infinite": np.full((1, 3, SIZE, SIZE), np.nan, np.float32),
        "unexpected shape": np.zeros((1, 3, 32, 32), np.float32),
        "data-type is 'FP64'": np.zeros((1, 3, SIZE, SIZE), np.float64),
        "input 'images'": np.zeros((0, 3, SIZE, SIZE), np.float32),  # empty batch
    }
    for protocol in ("http", "grpc"):
        for message, array in bad.items():
            datatype = "FP64" if array.dtype == np.float64 else "FP32"
            with pytest.raises(InferenceServerException, match=message):
                infer(protocol, server[protocol], array, datatype)
        good = images(2, seed=100)
        np.testing.assert_allclose(infer(protocol, server[protocol], good), server["reference"](good)["probs"],
                                   atol=1e-5)
    # A NaN request batched with good ones fails alone.
    jobs = [images(1, seed=200 + i) for i in range(6)]
    jobs.insert(3, np.full((1, 3, SIZE, SIZE), np.inf, np.float32))
    with concurrent.futures.ThreadPoolExecutor(7) as pool:
        futures = [pool.submit(infer, "http", server["http"], array) for array in jobs]
    outcomes = [f.exception() for f in futures]
    assert [o is not None for o in outcomes] == [False, False, False, True, False, False, False]
    assert "NaN or infinite" in str(outcomes[3])


def test_health_and_metrics_endpoints(server: dict) -> None:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server['http']}/v2/health/live", timeout=5) as response:
        assert response.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{server['metrics']}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    assert 'nv_inference_request_success{model="baseline",version="1"}' in metrics


def test_the_onnxruntime_stub_does_not_load_pytorch(server: dict) -> None:
    """The Python-backend process of an ONNX Runtime model maps ONNX Runtime, not libtorch (about 0.5 GB
    less resident memory per model)."""
    model_py = str(server["repository"] / "baseline" / "1" / "model.py")

    def command_line(process: pathlib.Path) -> str:
        try:
            return process.joinpath("cmdline").read_bytes().decode(errors="replace")
        except OSError:  # ended meanwhile
            return ""

    stubs = [p for p in pathlib.Path("/proc").glob("[0-9]*") if model_py in command_line(p)]
    assert len(stubs) == 1, stubs
    libraries = {line.split()[-1] for line in (stubs[0] / "maps").read_text().splitlines() if ".so" in line}
    assert any("onnxruntime" in path for path in libraries)
    assert not any("libtorch" in path for path in libraries), sorted(p for p in libraries if "torch" in p)


def test_clients_cannot_load_or_unload_models(server: dict) -> None:
    import urllib.error
    import urllib.request

    for action in ("unload", "load"):
        request = urllib.request.Request(f"http://127.0.0.1:{server['http']}/v2/repository/models/baseline/{action}",
                                         data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(request, timeout=5)
    good = images(1, seed=400)
    np.testing.assert_allclose(infer("grpc", server["grpc"], good), server["reference"](good)["probs"], atol=1e-5)


def test_sigterm_finishes_the_requests_in_flight_and_exits_0(server: dict) -> None:
    """Also with clients that keep idle connections open: Triton alone would wait its whole exit timeout
    for them to close and then exit 1."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    process = server["process"]
    batches = [images(8, seed=300 + i) for i in range(16)]
    idle = [httpclient.InferenceServerClient(f"127.0.0.1:{server['http']}"),
            grpcclient.InferenceServerClient(f"127.0.0.1:{server['grpc']}")]
    for client in idle:
        assert client.is_model_ready("baseline")  # the connection is open, and stays open, idle

    def timed(array: np.ndarray) -> tuple[np.ndarray, float]:
        return infer("http", server["http"], array), time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(len(batches)) as pool:
        futures = [pool.submit(timed, array) for array in batches]
        next(concurrent.futures.as_completed(futures)).result(timeout=60)  # the server is busy with the rest
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        concurrent.futures.wait(futures, timeout=60)
    finished_after_sigterm = 0
    for array, future in zip(batches, futures, strict=True):
        if future.exception() is None:  # a request that reached the server is answered, and right
            probs, finished = future.result()
            np.testing.assert_allclose(probs, server["reference"](array)["probs"], atol=1e-5)
            finished_after_sigterm += finished > sent
    assert finished_after_sigterm >= 1
    try:
        assert process.wait(timeout=20) == 0, server["log"].read_text()  # Triton's own exit timeout is 30 s
    finally:
        for client in idle:
            client.close()
    assert "stopped (SIGTERM)" in server["log"].read_text()


def test_drain_refuses_new_requests_and_the_server_then_stops_cleanly() -> None:
    reason = cannot_serve_reason()
    if reason:
        pytest.skip(reason)
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    model = fastmlr.create_model("baseline", backbone="mobilenet_v2", image_size=SIZE).eval()
    with serve.serving(model, name="baseline", ports=tuple(serve.free_loopback_ports(3))) as server:
        client = httpclient.InferenceServerClient(server.http_url)  # stays open, idle, through the stop
        try:
            assert client.is_model_ready("baseline")
            assert server.drain(timeout_s=30)
            assert not client.is_model_ready("baseline")
            request = httpclient.InferInput("images", [1, 3, SIZE, SIZE], "FP32")
            request.set_data_from_numpy(images(1, seed=500))
            with pytest.raises(InferenceServerException, match="has no available versions"):
                client.infer("baseline", [request])
            started = time.monotonic()
            assert server.stop() == 0 and server.drained
            assert time.monotonic() - started < 15
        finally:
            client.close()


def test_stop_clears_what_a_killed_server_left(tmp_path: pathlib.Path) -> None:
    """A killed server can leave Python-backend stubs waiting for it (seen when it is killed while a stub
    starts) and their shared-memory regions; stop() ends what remains of its process group and removes
    the regions. A ``sleep`` that the model starts stands in for a stuck stub."""
    reason = cannot_serve_reason()
    if reason:
        pytest.skip(reason)
    model_dir = tmp_path / "repository" / "slow"
    (model_dir / "1").mkdir(parents=True)
    pid_file = tmp_path / "stuck.pid"
    (model_dir / "1" / "model.py").write_text(
        "import pathlib, subprocess, time\n\n\nclass TritonPythonModel:\n    def initialize(self, args):\n"
        f"        pathlib.Path({str(pid_file)!r}).write_text(str(subprocess.Popen(['sleep', '600']).pid))\n"
        "        time.sleep(600)\n")
    (model_dir / "config.pbtxt").write_text(
        'name: "slow"\nbackend: "python"\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n')
    http, grpc, metrics = serve.free_loopback_ports(3)
    with open(tmp_path / "server.log", "w") as log:
        server = serve.TritonServer(tmp_path / "repository", http_port=http, grpc_port=grpc, metrics_port=metrics,
                                    log=log).start()
        deadline = time.monotonic() + 60
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pid_file.exists(), (tmp_path / "server.log").read_text()
        stuck = int(pid_file.read_text())
        regions = sorted(pathlib.Path("/dev/shm").glob(f"{server.shm_prefix}*"))
        assert regions
        server.process.kill()
        server.process.wait()
        try:
            assert os.getpgid(stuck) == server.process.pid and all(region.exists() for region in regions)
            assert server.stop() == -signal.SIGKILL
            deadline = time.monotonic() + 10
            while pathlib.Path(f"/proc/{stuck}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not pathlib.Path(f"/proc/{stuck}").exists(), "the server's process group outlived stop()"
            assert not any(region.exists() for region in regions)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stuck, signal.SIGKILL)
