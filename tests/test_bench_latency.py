"""bench/latency.py, its harness and bench/plot.py: a tiny end-to-end run (MobileNetV2, 64×64, one warm-up, one
timed call; baseline and MCAR; eager, plus ONNX Runtime when fastmlr.export can export), the clean
one-line error of an unavailable backend, and the pure pieces (statistics, planning, paper tables,
derived tables)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastmlr
from bench import environment, latency, latency_tables, measure, paper_tables, plot, records, runners, timing

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def export_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        from fastmlr.export import to_onnx  # noqa: F401
    except ImportError:
        return False
    return True


def run_script(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    """One end-to-end run written as JSON, markdown and CSV; returns paths, stdout and stderr."""
    out = tmp_path_factory.mktemp("bench")
    backends = "eager,onnxruntime" if export_available() else "eager"
    paths = {suffix: out / f"tiny{suffix}" for suffix in (".json", ".md", ".csv")}
    args = "--model mcar --backbone mobilenet_v2 --size 64 --batch 1 --warmup 1 --iters 1 --device cpu"
    outs = [arg for p in paths.values() for arg in ("--out", str(p))]
    proc = run_script("latency.py", *args.split(), "--kernels", "torch", "--backend", backends, *outs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"paths": paths, "stdout": proc.stdout, "stderr": proc.stderr, "backends": backends.split(",")}


def test_tiny_run_writes_json_with_environment_and_measurements(tiny_run):
    result = json.loads(tiny_run["paths"][".json"].read_text())
    for key in (
        "environment",
        "settings",
        "paper_tables",
        "measurements",
        "mcar_breakdown",
        "speedups",
        "targets",
        "failures",
    ):
        assert key in result
    env = result["environment"]
    assert env["cpu"] and env["cpu_count"] >= 1 and env["torch_threads"] == 1
    assert env["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert result["settings"]["batch"] == 1 and result["settings"]["precision"] == "fp32"
    assert result["settings"]["kernels"] == "torch"
    assert result["failures"] == []
    measured = {(m["model"], m["component"], m["backend"]) for m in result["measurements"]}
    # MCAR brings its baseline; eager times MCAR per Table IX column, exported backends whole.
    assert {
        ("baseline", "total", "eager"),
        *(("mcar", c, "eager") for c in runners.MCAR_COMPONENTS),
    } <= measured
    for backend in tiny_run["backends"]:
        assert ("mcar", "total", backend) in measured and ("baseline", "total", backend) in measured
    for m in result["measurements"]:
        assert len(m["samples_ms"]) == 1 and m["median_ms"] == m["min_ms"] == m["samples_ms"][0] > 0
        assert m["images_per_s"] == pytest.approx(1000.0 / m["median_ms"])
        assert m["timer"] == "perf_counter" and m["size"] == 64 and m["paper"] == []
    row = next(r for r in result["mcar_breakdown"] if r["backend"] == "eager")
    assert row["ratio_total_baseline"] == pytest.approx(row["ours_ms"]["total"] / row["ours_ms"]["baseline"])
    assert row["paper_ms"] is None  # 64×64 is not in Table IX
    assert [t["target"] for t in result["targets"]][0] == "MCAR total / baseline"


def test_tiny_run_markdown_csv_and_progress(tiny_run):
    stdout = tiny_run["stdout"]
    assert "| model | component |" in stdout and "MCAR per component" in stdout
    assert tiny_run["paths"][".md"].read_text() == stdout
    lines = tiny_run["paths"][".csv"].read_text().splitlines()
    assert lines[0].split(",") == list(latency_tables.CSV_FIELDS)
    assert len(lines) == 1 + len(json.loads(tiny_run["paths"][".json"].read_text())["measurements"])
    assert "[1/" in tiny_run["stderr"] and "Traceback" not in tiny_run["stderr"]


def test_plot_draws_png(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "tiny.png"
    proc = run_script("plot.py", str(tiny_run["paths"][".json"]), "--out", str(png), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_rejects_a_file_without_measurements(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    proc = run_script("plot.py", str(bad), "--out", str(tmp_path / "x.png"), timeout=120)
    assert proc.returncode != 0 and "no measurements" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(
    torch.cuda.is_available() and runners.importable("tensorrt"), reason="TensorRT and a GPU are available"
)
def test_unavailable_trt_is_one_clean_line():
    proc = run_script("latency.py", "--model", "mcar", "--backend", "trt", "--size", "64", timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unavailable" in lines[0]
    assert "TensorRT" in lines[0] or "CUDA" in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is available")
def test_unavailable_cuda_device_is_one_clean_line():
    proc = run_script("latency.py", "--model", "baseline", "--device", "cuda", "--size", "64", timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--model", "nope"], "unknown 'nope'"),
        (["--size", "100"], "not a positive multiple of 32"),
        (["--backend", "eager,tvm"], "unknown 'tvm'"),
        (["--iters", "0"], "--iters must be at least 1"),
        (["--warmup", "0"], "--warmup must be at least 1"),
        (["--out", "x.txt"], "suffix"),
        (["--checkpoint", "/nonexistent/ckpt.pth", "--model", "baseline"], "no such file"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, needle, capsys):
    assert latency.main([*argv, "--device", "cpu", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_checkpoint_belongs_to_the_one_model_besides_the_baseline():
    assert latency.checkpoint_model({"baseline", "mcar"}) == "mcar"
    assert latency.checkpoint_model({"baseline"}) == "baseline"
    with pytest.raises(ValueError, match="mcar, srdl"):
        latency.checkpoint_model({"baseline", "mcar", "srdl"})


def test_make_model_loads_the_checkpoint_into_its_model_only(tmp_path):
    from fastmlr.checkpoint import save_checkpoint

    torch.manual_seed(123)
    trained = fastmlr.create_model("mcar", backbone="mobilenet_v2", num_classes=5, image_size=64)
    save_checkpoint(trained, tmp_path / "mcar.pth")
    settings = make_settings(num_classes=5, checkpoint=str(tmp_path / "mcar.pth"), checkpoint_model="mcar")
    loaded = measure.make_model(records.Config("mcar", "mobilenet_v2", 64, "eager"), settings)
    assert torch.equal(loaded.convclass.weight, trained.convclass.weight)
    baseline = measure.make_model(records.Config("baseline", "mobilenet_v2", 64, "eager"), settings)
    random_baseline = measure.make_model(
        records.Config("baseline", "mobilenet_v2", 64, "eager"), make_settings(num_classes=5)
    )
    assert torch.equal(baseline.convclass.weight, random_baseline.convclass.weight)  # seeded, not loaded
    assert not torch.equal(baseline.convclass.weight, trained.convclass.weight)


def test_kernels_triton_on_cpu_is_refused(capsys):
    assert latency.main(["--kernels", "triton", "--device", "cpu", "--dry-run"]) == 2
    assert "need --device cuda" in capsys.readouterr().err


def test_table_ix_plan_and_override(capsys):
    assert latency.main(["--table", "ix", "--device", "cpu", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = [
        f"{m} {b} {s} eager" for b in paper_tables.TABLE_IX_BACKBONES for s in (256, 448) for m in ("baseline", "mcar")
    ]
    assert lines == expected
    args = latency.build_parser().parse_args(["--table", "ix", "--backbone", "mobilenet_v2", "--size", "64"])
    configs = latency.plan(args)
    assert [(c.model, c.backbone, c.size) for c in configs] == [
        ("baseline", "mobilenet_v2", 64),
        ("mcar", "mobilenet_v2", 64),
    ]


def test_table_srdl3_plan_covers_its_rows():
    args = latency.build_parser().parse_args(["--table", "srdl3", "--backend", "eager,onnxruntime"])
    configs = latency.plan(args)
    wanted = {r.model for r in paper_tables.SRDL_TABLE_3_ROWS}
    assert "pgcn" in wanted and {c.model for c in configs} == wanted  # every row is a fastmlr model
    assert {(c.backbone, c.size) for c in configs} == {("resnet101", 448)}
    assert {c.backend for c in configs} == {"eager", "onnxruntime"}


def test_summarize_statistics():
    stats = timing.summarize([4.0, 1.0, 3.0, 2.0], batch=2)
    assert stats.median_ms == 2.5 and stats.min_ms == 1.0 and stats.mean_ms == 2.5
    assert stats.p90_ms == pytest.approx(3.7)  # linear interpolation: 3 + 0.7·(4 − 3)
    assert stats.ms_per_image == 1.25 and stats.images_per_s == pytest.approx(800.0)
    with pytest.raises(ValueError, match="no samples"):
        timing.summarize([], 1)


def make_settings(**overrides) -> records.Settings:
    defaults = dict(
        batch=1,
        precision="fp32",
        device="cpu",
        warmup=1,
        iters=1,
        kernels="auto",
        threads=1,
        seed=0,
        num_classes=80,
        checkpoint=None,
        checkpoint_model=None,
        cache_dir=None,
    )
    return records.Settings(**{**defaults, **overrides})


def test_measure_interleaved_per_image_at_batch_2(tmp_path):
    settings = make_settings(batch=2, iters=2, num_classes=5)
    config = records.Config("baseline", "mobilenet_v2", 64, "eager")
    messages, failures = [], []
    (m,) = measure.measure_interleaved([(config, settings)], tmp_path, messages.append,
                                       lambda *failure: failures.append(failure))
    assert failures == [] and len(m.samples_ms) == 2 and m.ms_per_image == pytest.approx(m.median_ms / 2)
    assert m.images_per_s == pytest.approx(2000.0 / m.median_ms) and m.first_call_ms > 0
    assert messages == [
        "baseline mobilenet_v2 64x64 eager fp32: build",
        "baseline mobilenet_v2 64x64 eager fp32 total: warm-up 1",
        "round 1/2: one timed call of each of 1 components",
        "round 2/2: one timed call of each of 1 components",
    ]


def test_table_configurations_are_built_first_then_timed_in_interleaved_rounds(tmp_path, monkeypatch):
    """Every configuration is built before any is called; then each round calls every configuration once,
    in turn, so the calls go a, b, c, a, b, c (not a, a, b, b, c, c); a configuration that fails is left
    out and the others still run."""
    events = []

    def build(config, settings, workdir):
        events.append(("build", config.model))
        if config.model == "mlgcn":
            return measure.Built(config, settings, {"total": lambda: 1 / 0}, "perf_counter", 0.0)
        return measure.Built(config, settings, {"total": lambda: events.append(("call", config.model))},
                             "perf_counter", 0.0)

    monkeypatch.setattr(measure, "build_config", build)
    settings = make_settings(warmup=1, iters=3)
    models = ("baseline", "mlgcn", "ssgrl", "srdl")
    jobs = [(records.Config(m, "resnet101", 448, "eager"), settings) for m in models]
    failures = []
    results = measure.measure_interleaved(jobs, tmp_path, lambda message: None,
                                          lambda config, _, err: failures.append((config.model, type(err))))
    assert events[:4] == [("build", m) for m in models]
    calls = [model for kind, model in events[4:]]
    assert calls == ["baseline", "ssgrl", "srdl"] + ["baseline", "ssgrl", "srdl"] * 3  # warm-up, then rounds
    assert failures == [("mlgcn", ZeroDivisionError)]
    assert [(m.model, len(m.samples_ms)) for m in results] == [("baseline", 3), ("ssgrl", 3), ("srdl", 3)]


def test_time_calls_counts_and_measures():
    calls = []
    samples = timing.time_calls(lambda: calls.append(1), 3, "perf_counter")
    assert len(samples) == 3 == len(calls) and all(s >= 0 for s in samples)


def test_interleaved_calls_each_implementation_once_per_round_in_turn():
    order = []
    times = timing.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3, "perf_counter")
    assert order == ["a", "b"] + ["a", "b"] * 3  # one warm-up call each, then the rounds
    assert [len(t) for t in times.values()] == [3, 3]


def test_parse_list_all_and_duplicates():
    assert latency.parse_list("resnet50,all", latency.BACKBONES, "backbone", all_means=latency.BACKBONES) == [
        "resnet50",
        "mobilenet_v2",
        "resnet101",
    ]
    with pytest.raises(ValueError, match="--backend: unknown 'all'"):
        latency.parse_list("all", latency.BACKENDS, "backend")


def test_paper_figures():
    cites = {(f.table.key, f.ms) for f in paper_tables.paper_figures("mcar", "total", "resnet101", 448)}
    assert cites == {("mcar-ix", 82.8), ("srdl-3", 123.47)}
    assert [f.ms for f in paper_tables.paper_figures("baseline", "total", "mobilenet_v2", 256)] == [6.7]
    assert [f.ms for f in paper_tables.paper_figures("mcar", "g2l", "resnet50", 448)] == [13.2]
    assert [f.ms for f in paper_tables.paper_figures("mcar", "global", "resnet101", 448)] == [18.8, 32.48]
    assert paper_tables.paper_figures("srdl", "total", "resnet101", 256) == []
    assert paper_tables.paper_figures("lce", "total", "resnet101", 448) == []


def test_table_ix_components_add_up_to_the_total():
    # The paper rounds to 0.1 ms: the three components may miss the printed total by 0.1.
    for key, row in paper_tables.TABLE_IX_MS.items():
        assert abs(row["global"] + row["g2l"] + row["local"] - row["total"]) <= 0.1 + 1e-9, key
        # "about 4 to 5 times" the baseline: 4.5-5.0 at 448, 3.0-3.7 at 256 (ResNet-101: 2.98).
        assert 2.9 < row["total"] / row["baseline"] < 5.0, key


def fake_measurement(model: str, component: str, ms: float, backend: str = "eager", size: int = 448) -> dict:
    return {
        "model": model,
        "component": component,
        "backbone": "resnet101",
        "size": size,
        "backend": backend,
        "precision": "fp32",
        "median_ms": ms,
        "ms_per_image": ms,
    }


def test_derived_tables_from_measurements():
    ms = {"global": 20.0, "g2l": 10.0, "local": 60.0, "total": 95.0}
    measurements = [
        fake_measurement("baseline", "total", 19.0),
        fake_measurement("baseline", "total", 9.5, "onnxruntime"),
        *(fake_measurement("mcar", c, v) for c, v in ms.items()),
        fake_measurement("mcar", "total", 50.0, "onnxruntime"),
    ]
    rows = latency_tables.mcar_breakdown(measurements)
    assert [(r["backend"], r["ratio_total_baseline"]) for r in rows] == [
        ("eager", 5.0),
        ("onnxruntime", 50.0 / 9.5),
    ]
    assert rows[0]["paper_ratio_total_baseline"] == pytest.approx(82.8 / 18.4)
    assert rows[1]["ours_ms"]["global"] is None  # exported backends time MCAR whole
    ups = {
        (s["model"], s["component"], s["backend"]): s["speedup_over_eager"]
        for s in latency_tables.speedups(measurements)
    }
    assert ups == {("baseline", "total", "onnxruntime"): 2.0, ("mcar", "total", "onnxruntime"): 1.9}
    targets = latency_tables.latency_targets(rows, latency_tables.speedups(measurements), batch=1, device="cpu")
    met = {(t["target"], t["backend"]): t["met"] for t in targets}
    assert met == {
        ("MCAR total / baseline", "eager"): True,
        ("MCAR total / baseline", "onnxruntime"): False,
        ("ONNX Runtime speed-up over eager (baseline)", "onnxruntime"): True,
        ("ONNX Runtime speed-up over eager (mcar)", "onnxruntime"): True,
    }
    assert latency_tables.latency_targets(rows, [], batch=2, device="cpu") == []
    srdl = latency_tables.srdl3_rows(measurements)
    status = {(r["label"], r["backend"]): r["status"] for r in srdl}
    assert status[("P-GCN", "eager")] == "not measured"  # a model of the table this run did not time
    assert status[("ML-GCN", "eager")] == "not measured"
    global_row = next(r for r in srdl if r["label"] == "MACR (Global)" and r["backend"] == "eager")
    assert global_row["ours_vs_baseline"] == pytest.approx(20.0 / 19.0)
    assert global_row["paper_vs_baseline"] == pytest.approx(32.48 / 31.54)


def test_plot_data_from_measurements():
    ms = {"global": 20.0, "g2l": 10.0, "local": 60.0, "total": 95.0}
    measurements = [
        {**fake_measurement("mcar", c, v), "p90_ms": v + 1.0, "batch": 1, "paper": []} for c, v in ms.items()
    ]
    measurements.append(
        {
            **fake_measurement("mcar", "total", 50.0, "onnxruntime"),
            "p90_ms": 52.0,
            "batch": 1,
            "paper": [{"table": "mcar-ix", "ms": 82.8}],
        }
    )
    labels, series, whiskers = plot.bar_series({"measurements": measurements})
    assert labels == [f"mcar/{c}\nresnet101 448" for c in ("global", "g2l", "local")] + ["mcar\nresnet101 448"]
    assert series == {
        "eager": [20.0, 10.0, 60.0, 95.0],
        "onnxruntime": [None, None, None, 50.0],
        "mcar-ix": [None, None, None, 82.8],
    }
    assert whiskers["eager"] == [21.0, 11.0, 61.0, 96.0] and "mcar-ix" not in whiskers
    paper = paper_tables.TABLE_IX_MS[("resnet101", 448)]
    breakdown = [
        {
            "backbone": "resnet101",
            "size": 448,
            "backend": "eager",
            "ours_ms": {**ms, "baseline": 19.0},
            "paper_ms": paper,
        },
        {
            "backbone": "resnet101",
            "size": 448,
            "backend": "onnxruntime",
            "ours_ms": {"baseline": 9.0, "total": 50.0, "global": None, "g2l": None, "local": None},
            "paper_ms": paper,
        },
    ]
    bars = plot.breakdown_bars(breakdown)  # the paper's bar once; components not timed: no bar
    assert [(label, base) for label, _, base in bars] == [
        ("resnet101 448\neager", 19.0),
        ("resnet101 448\npaper (P40)", 18.4),
    ]
    assert plot.use_log_scale({"a": [1.0, 31.0]}, "auto") and not plot.use_log_scale({"a": [1.0, 29.0]}, "auto")
    assert plot.use_log_scale({"a": [1.0, 2.0]}, "log") and not plot.use_log_scale({"a": [1.0, 99.0]}, "linear")


def test_cpu_model_reads_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Example CPU @ 2.0GHz\n\nmodel name\t: other\n")
    assert environment.cpu_model(info) == "Example CPU @ 2.0GHz"
    assert environment.cpu_model(tmp_path / "missing") != ""
    assert environment.package_version(("surely-not-installed-pkg",)) is None
