"""fastmlr's benchmarks: a shared harness and the scripts that define what it times.

Harness: :mod:`bench.timing` (warm-up, timers, statistics, interleaved rounds),
:mod:`bench.environment` (the machine a result was measured on), :mod:`bench.runners` (the backends
a model is timed with: eager, compile, onnxruntime, trt, torch-trt), :mod:`bench.records` (result
records) and :mod:`bench.writers` (JSON, markdown, CSV). The papers' figures are in
:mod:`bench.paper_tables`; our latency tables beside them and the latency targets in
:mod:`bench.latency_tables`.

Scripts (each defines cases only): ``latency.py`` (model latency, the papers' timing tables),
``bench_g2l.py`` (MCAR's global-to-local step), ``bench_attention.py`` (per-category attention),
``plot.py`` (charts of a latency result).
"""
