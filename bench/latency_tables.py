"""Our latency tables beside the papers', the latency targets, and the latency report.

From the measurement rows of a run (:class:`bench.records.Measurement` as dicts):

- :func:`mcar_breakdown`: MCAR Table IX's layout — ms per image of the baseline, MCAR's total, global
  stream, global-to-local step and local stream, ours beside the paper's (P40), and total / baseline;
- :func:`srdl3_rows`: SRDL Table 3's layout — each row's method, ours beside the paper's (RTX 3070),
  each relative to the baseline row;
- :func:`speedups`: every backend's speed-up over eager for the same model and component;
- :func:`latency_targets`: the latency targets at batch 1, named by what they measure —
  MCAR's total / baseline ratio (at most :data:`MCAR_RATIO_LIMIT`: the paper's "about 4 to 5 times"
  on CPU, 3 on a GPU) and ONNX Runtime's speed-up over eager on CPU (at least :data:`ORT_SPEEDUP_MIN`).

:func:`render_markdown` and :func:`render_csv` write a run's result.
"""

from __future__ import annotations

from collections.abc import Mapping

from bench.environment import describe_machine
from bench.paper_tables import SRDL_TABLE_3_ROWS, TABLE_IX_COLUMNS, TABLE_IX_HEADERS, TABLE_IX_MS
from bench.runners import MCAR_COMPONENTS
from bench.timing import pair_with_baseline
from bench.writers import format_ms, markdown_table, to_csv

#: MCAR total / baseline at most this, by device (batch 1).
MCAR_RATIO_LIMIT = {"cpu": 5.2, "cuda": 3.0}
#: ONNX Runtime on CPU at least this much faster than eager (batch 1), for every model.
ORT_SPEEDUP_MIN = 1.2


def _index(measurements: list[dict]) -> dict[tuple, dict]:
    return {(m["model"], m["component"], m["backbone"], m["size"], m["backend"], m["precision"]): m
            for m in measurements}


def mcar_breakdown(measurements: list[dict]) -> list[dict]:
    """Table IX's rows: per (backbone, size, backend, precision) with MCAR's total and the baseline measured, ms
    per image for every Table IX column measured (``None`` when not), the paper's P40 figures, and
    total / baseline for ours and the paper's."""
    index = _index(measurements)
    rows = []
    for m in measurements:
        if (m["model"], m["component"]) != ("mcar", "total"):
            continue
        key = (m["backbone"], m["size"], m["backend"], m["precision"])
        baseline = index.get(("baseline", "total", *key))
        if baseline is None:
            continue
        ours = {"baseline": baseline["ms_per_image"]}
        for column in MCAR_COMPONENTS:
            found = index.get(("mcar", column, *key))
            ours[column] = found["ms_per_image"] if found else None
        paper = TABLE_IX_MS.get((m["backbone"], m["size"]))
        rows.append({
            "backbone": m["backbone"],
            "size": m["size"],
            "backend": m["backend"],
            "precision": m["precision"],
            "ours_ms": ours,
            "paper_ms": paper,
            "ratio_total_baseline": ours["total"] / ours["baseline"],
            "paper_ratio_total_baseline": paper["total"] / paper["baseline"] if paper else None,
        })
    return rows


def srdl3_rows(measurements: list[dict]) -> list[dict]:
    """SRDL Table 3's rows with ours beside the paper's, for every (backbone, size, backend) the run
    measured (Table 3 itself is ResNet-101 at 448; other grids give the same layout): ms per image
    (``None``, with the ``status`` "not measured", when the run did not time the method), and
    each row's time relative to the baseline row, ours and the paper's."""
    index = _index(measurements)
    groups = list(dict.fromkeys((m["backbone"], m["size"], m["backend"], m["precision"]) for m in measurements))
    paper_baseline = next(r.ms for r in SRDL_TABLE_3_ROWS if r.model == "baseline")
    rows = []
    for backbone, size, backend, precision in groups:
        base = index.get(("baseline", "total", backbone, size, backend, precision))
        for r in SRDL_TABLE_3_ROWS:
            found = index.get((r.model, r.component, backbone, size, backend, precision))
            status = "measured" if found else "not measured"
            ours = found["ms_per_image"] if found else None
            rows.append({
                "label": r.label,
                "publication": r.publication,
                "model": r.model,
                "component": r.component,
                "backbone": backbone,
                "size": size,
                "backend": backend,
                "precision": precision,
                "status": status,
                "ours_ms": ours,
                "paper_ms": r.ms,
                "ours_vs_baseline": ours / base["ms_per_image"] if ours is not None and base else None,
                "paper_vs_baseline": r.ms / paper_baseline,
            })
    return rows


def speedups(measurements: list[dict]) -> list[dict]:
    """For every measurement of a non-eager backend whose eager twin was measured in this run:
    eager median / its median (> 1: faster than eager)."""
    pairs = pair_with_baseline(measurements, ("model", "component", "backbone", "size", "precision"), "backend",
                               lambda m: "eager")
    return [
        {**{k: m[k] for k in ("model", "component", "backbone", "size", "backend", "precision")},
         "speedup_over_eager": eager["median_ms"] / m["median_ms"]}
        for m, eager in pairs
    ]


def latency_targets(breakdown: list[dict], speedup_rows: list[dict], batch: int, device: str) -> list[dict]:
    """The latency targets as measured in this run (batch 1 only; ``[]`` otherwise): MCAR total /
    baseline at most :data:`MCAR_RATIO_LIMIT`; ONNX Runtime on CPU at least :data:`ORT_SPEEDUP_MIN`
    times faster than eager for each model."""
    if batch != 1:
        return []
    limit = MCAR_RATIO_LIMIT[device]
    out = [
        {"target": "MCAR total / baseline", "backbone": r["backbone"], "size": r["size"], "backend": r["backend"],
         "value": r["ratio_total_baseline"], "limit": f"<= {limit}", "met": r["ratio_total_baseline"] <= limit}
        for r in breakdown
    ]
    if device == "cpu":
        out += [
            {"target": f"ONNX Runtime speed-up over eager ({s['model']})", "backbone": s["backbone"],
             "size": s["size"], "backend": s["backend"], "value": s["speedup_over_eager"],
             "limit": f">= {ORT_SPEEDUP_MIN}", "met": s["speedup_over_eager"] >= ORT_SPEEDUP_MIN}
            for s in speedup_rows
            if s["backend"] == "onnxruntime" and s["component"] == "total"
        ]
    return out


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------

CSV_FIELDS = (
    "model", "component", "backbone", "size", "backend", "batch", "precision", "device", "kernels", "timer",
    "median_ms", "p90_ms", "min_ms", "mean_ms", "ms_per_image", "images_per_s", "first_call_ms", "setup_s",
    "paper_ms",
)


def render_csv(result: Mapping) -> str:
    """One line per measurement (:data:`CSV_FIELDS`); ``paper_ms`` lists ``table=ms`` pairs."""
    rows = [{**m, "paper_ms": " ".join(f"{p['table']}={p['ms']:g}" for p in m["paper"])}
            for m in result["measurements"]]
    return to_csv(rows, CSV_FIELDS)


def _measurements_table(result: Mapping) -> str:
    rows = [
        [m["model"], m["component"], m["backbone"], m["size"], m["backend"], m["precision"],
         format_ms(m["median_ms"]), format_ms(m["p90_ms"]), format_ms(m["min_ms"]), f"{m['images_per_s']:.1f}",
         "; ".join(f"{p['ms']:g} ({p['hardware'].split(' (')[0]})" for p in m["paper"]) or "—"]
        for m in result["measurements"]
    ]
    headers = ["model", "component", "backbone", "size", "backend", "precision", "median ms", "p90 ms", "min ms",
               "img/s", "paper ms"]
    return markdown_table(headers, rows)


def _breakdown_table(breakdown: list[dict]) -> str:
    rows = []
    for r in breakdown:
        paper = r["paper_ms"] or {}
        cells = [f"{format_ms(r['ours_ms'][c])} ({paper[c]:g})" if c in paper else format_ms(r["ours_ms"][c])
                 for c in TABLE_IX_COLUMNS]
        ratio = f"{r['ratio_total_baseline']:.2f}×"
        if r["paper_ratio_total_baseline"] is not None:
            ratio += f" ({r['paper_ratio_total_baseline']:.2f}×)"
        rows.append([r["backbone"], r["size"], r["backend"], r["precision"], *cells, ratio])
    headers = ["backbone", "size", "backend", "precision", *(TABLE_IX_HEADERS[c] for c in TABLE_IX_COLUMNS),
               "Total / Baseline"]
    return markdown_table(headers, rows)


def _srdl3_table(rows: list[dict]) -> str:
    cells = [
        [r["label"], f"{r['backbone']} {r['size']}", r["backend"], r["precision"],
         format_ms(r["ours_ms"]) if r["status"] == "measured" else r["status"], f"{r['paper_ms']:g}",
         "—" if r["ours_vs_baseline"] is None else f"{r['ours_vs_baseline']:.2f}×", f"{r['paper_vs_baseline']:.2f}×"]
        for r in rows
    ]
    headers = ["method", "ours at", "backend", "precision", "ours ms", "paper ms", "ours / baseline",
               "paper / baseline"]
    return markdown_table(headers, cells)


def render_markdown(result: Mapping) -> str:
    """The report: settings and machine, every measurement, then Table IX's and SRDL Table 3's
    layouts, speed-ups over eager and the latency targets, where the run measured them."""
    s, env = result["settings"], result["environment"]
    versions = ", ".join(f"{k} {env['versions'][k]}" for k in ("torch", "triton", "onnxruntime", "tensorrt"))
    precisions = ", ".join(s.get("precisions") or [s["precision"]])
    parts = [
        f"## Latency: {', '.join(s['backends'])} · {precisions} · batch {s['batch']} · {s['device']} · "
        f"kernels {s['kernels']}" + (" · channels_last" if s.get("channels_last") else ""),
        f"Machine: {describe_machine(env)}. {versions}. "
        f"{s['warmup']} warm-up + {s['iters']} timed calls; ms per call of {s['batch']} image(s).",
    ]
    conditions = result.get("run_conditions")
    if isinstance(conditions, Mapping) and "start" in conditions:
        start, end = conditions["start"], conditions["end"]
        loads = [", ".join(f"{x:.1f}" for x in c["load_average"]) for c in (start, end)]
        parts.append(f"Timing order: {conditions['order']}. Load average (1, 5, 15 min) on "
                     f"{start['cpu_count']} CPUs: {loads[0]} at {start['utc']}, {loads[1]} at {end['utc']}.")
    parts.append(_measurements_table(result))
    if result["mcar_breakdown"]:
        parts += ["### MCAR per component (Table IX layout): ms per image, ours (paper, P40)",
                  _breakdown_table(result["mcar_breakdown"])]
    if result["srdl3"]:
        parts += ["### SRDL Table 3 layout: ms per image, ours vs the paper's (RTX 3070, ResNet-101, 448×448)",
                  _srdl3_table(result["srdl3"])]
    if result["speedups"]:
        rows = [[u["model"], u["component"], u["backbone"], u["size"], u["backend"], f"{u['speedup_over_eager']:.2f}×"]
                for u in result["speedups"]]
        parts += ["### Speed-up over eager (eager median / backend median)",
                  markdown_table(["model", "component", "backbone", "size", "backend", "speed-up"], rows)]
    if result["targets"]:
        rows = [[t["target"], t["backbone"], t["size"], t["backend"], f"{t['value']:.2f}", t["limit"],
                 "yes" if t["met"] else "**no**"] for t in result["targets"]]
        parts += ["### Latency targets (batch 1)",
                  markdown_table(["target", "backbone", "size", "backend", "measured", "target", "met"], rows)]
    if result["failures"]:
        rows = [[f["model"], f["backbone"], f["size"], f["backend"], f["error"]] for f in result["failures"]]
        parts += ["### Failed configurations", markdown_table(["model", "backbone", "size", "backend", "error"], rows)]
    return "\n\n".join(parts) + "\n"
