"""Reduced precision in ONNX Runtime: speed against the float32 graph, and agreement with the float32
PyTorch model, for the baseline and MCAR at full size.

    python bench/bench_precision.py --out bench/results/precision_cpu.json
    python bench/bench_precision.py --models baseline --backbone mobilenet_v2 --size 64 --rounds 3 --out /tmp/p.json

Cases: every model of ``--models`` at every precision of ``--precisions``, exported by
:func:`fastmlr.export.to_onnx` (``--validate``: each graph validated against PyTorch at its
precision's tolerance before it is timed) from random weights conditioned like a trained network
(:func:`fastmlr.testing.condition_for_low_precision` on the packaged photos); INT8 calibrated on the
packaged COCO photos. Agreement (:func:`fastmlr.export.precision.agreement`) is measured on the
packaged VOC photos, which calibration did not see. Timing: batch 1, one ONNX Runtime session per
graph (:func:`fastmlr.export.precision.precision_session`), all sessions called in turn for
``--rounds`` rounds (:func:`bench.timing.interleaved`), so the ratios are fair on a shared machine.
Targets: INT8 vs float32 on the baseline (≥ 2.5×), MCAR INT8 total vs the float32 baseline (≤ 2.0×).
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

if not __package__:  # run as ``python bench/bench_precision.py``: make the bench package importable
    import _script  # noqa: F401

import numpy as np
import torch
from fastmlr.export import to_onnx
from fastmlr.export.onnx_export import INPUT_NAME, ExportWrapper
from fastmlr.export.precision import DEFAULT_CALIBRATION_DIR, PRECISIONS, agreement, precision_session
from fastmlr.export.validation import DEFAULT_IMAGES_DIR, find_images, image_batches
from fastmlr.kernels import use_backend

import fastmlr
from bench.environment import capture_environment, describe_machine, run_conditions
from bench.timing import interleaved, summarize
from bench.writers import check_result_files, markdown_table, write_json_and_markdown
from fastmlr.testing import LOW_PRECISION_CONDITIONING, condition_for_low_precision

#: Speed targets: (what, model, precision, reference model, reference precision, bound, sense).
TARGETS = (
    ("INT8 vs float32, baseline", "baseline", "int8", "baseline", "fp32", 2.5, "speed-up ≥"),
    ("MCAR INT8 total / float32 baseline", "mcar", "int8", "baseline", "fp32", 2.0, "cost ≤"),
)


def held_out_images() -> list[Path]:
    """The packaged photos calibration leaves out (``voc/``)."""
    return [p for p in find_images(DEFAULT_IMAGES_DIR) if DEFAULT_CALIBRATION_DIR not in p.parents]


def build_model(name: str, backbone: str, size: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = fastmlr.create_model(name, backbone=backbone, num_classes=80, image_size=size)
    photos = find_images(DEFAULT_IMAGES_DIR)
    batch = torch.cat([b for _, b in image_batches(photos, size, len(photos))])
    return condition_for_low_precision(model, batch, **LOW_PRECISION_CONDITIONING)


def reference_outputs(model: torch.nn.Module, batches: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
    """The float32 PyTorch model's outputs (as exported) on each batch."""
    wrapper = ExportWrapper(model).eval()
    names = fastmlr.export.output_names(model)
    with torch.no_grad(), use_backend("torch"):
        return [{n: t.numpy() for n, t in zip(names, wrapper(b), strict=True)} for b in batches]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON path; the markdown goes beside it (.md)")
    parser.add_argument("--models", default="baseline,mcar")
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--validate", action="store_true", help="validate every graph before timing it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    args = parser.parse_args(argv)
    check_result_files("bench_precision.py", args.out, args.overwrite)
    models, precisions = args.models.split(","), args.precisions.split(",")
    if "fp32" not in precisions or any(p not in PRECISIONS for p in precisions):
        parser.error(f"--precisions: a comma-separated subset of {PRECISIONS} that includes fp32")
    held_out = [b for _, b in image_batches(held_out_images(), args.size, 1)]
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed)).numpy()
    calls, agreements, exports = {}, [], []
    with tempfile.TemporaryDirectory() as workdir:
        for name in models:
            model = build_model(name, args.backbone, args.size, args.seed)
            reference = reference_outputs(model, held_out)
            for precision in precisions:
                path = Path(workdir) / f"{name}-{precision}.onnx"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    reports = []
                    try:
                        to_onnx(model, path, image_size=args.size, precision=precision, validate=args.validate,
                                on_validated=reports.append)
                    except (ValueError, RuntimeError) as err:  # a failed export or validation is a result
                        exports.append({"model": name, "precision": precision, "validated": False,
                                        "error": f"{type(err).__name__}: {err}"})
                        print(f"{name} {precision}: FAILED {type(err).__name__}: {err}", flush=True)
                        continue
                    session = precision_session(path, validation=precision == "bf16")
                names = [o.name for o in session.get_outputs()]
                outputs = [dict(zip(names, session.run(None, {INPUT_NAME: b.numpy()}), strict=True)) for b in held_out]
                agree = agreement(outputs, reference)
                agreements.append({"model": name, "precision": precision, **agree.__dict__})
                exports.append({"model": name, "precision": precision, "validated": bool(reports),
                                "validation": reports[0].summary() if reports else None})
                print(f"{name} {precision}: {agree.describe()}", flush=True)
                calls[f"{name}/{precision}"] = (lambda s: lambda: s.run(None, {INPUT_NAME: x}))(session)
        start = run_conditions()
        times = interleaved(calls, args.rounds, "perf_counter")
        conditions = {"start": start, "end": run_conditions()}
    results = []
    agreements = [a for a in agreements if f"{a['model']}/{a['precision']}" in times]
    for key, samples in times.items():
        name, precision = key.split("/")
        stats = summarize(samples)
        results.append({"model": name, "precision": precision, "median_ms": stats.median_ms,
                        "min_ms": stats.min_ms, "samples_ms": samples})
        print(f"{key:16s} median {stats.median_ms:9.1f} ms  min {stats.min_ms:9.1f} ms", flush=True)
    median = {(r["model"], r["precision"]): r["median_ms"] for r in results}
    targets = []
    for what, model, precision, ref_model, ref_precision, bound, sense in TARGETS:
        if (model, precision) in median and (ref_model, ref_precision) in median:
            ratio = median[(ref_model, ref_precision)] / median[(model, precision)]
            value = ratio if sense.startswith("speed") else 1 / ratio
            met = value >= bound if sense.startswith("speed") else value <= bound
            targets.append({"target": what, "value": value, "bound": f"{sense} {bound}", "met": met})
    report = {
        "environment": capture_environment(),
        "config": {"backbone": args.backbone, "size": args.size, "batch": 1, "rounds": args.rounds,
                   "calibration": str(DEFAULT_CALIBRATION_DIR.relative_to(DEFAULT_IMAGES_DIR.parent.parent)),
                   "held_out_images": len(held_out), "validated": args.validate},
        "results": results, "agreement": agreements, "targets": targets, "exports": exports,
        "run_conditions": conditions,
    }
    write_json_and_markdown(report, args.out, markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    cfg = report["config"]
    base = {r["model"]: r["median_ms"] for r in report["results"] if r["precision"] == "fp32"}
    baseline_fp32 = base.get("baseline")
    agree = {(a["model"], a["precision"]): a for a in report["agreement"]}
    rows = []
    for r in report["results"]:
        a = agree[(r["model"], r["precision"])]
        vs_fp32 = base[r["model"]] / r["median_ms"] if r["model"] in base else float("nan")
        vs_base = f"{r['median_ms'] / baseline_fp32:.2f}×" if baseline_fp32 else ""
        boxes = "" if a["identical_boxes"] is None else f"{100 * a['identical_boxes']:.0f}%"
        rows.append([r["model"], r["precision"], f"{r['median_ms']:.1f}", f"{vs_fp32:.2f}×", vs_base,
                     f"{100 * a['label_agreement']:.2f}%", f"{100 * a['top3_agreement']:.0f}%",
                     f"{a['max_abs_diff']:.3f}", f"{a['mean_abs_diff']:.4f}", boxes])
    table = markdown_table(["model", "precision", "median ms", "speed-up vs its fp32", "cost vs fp32 baseline",
                            "labels agree (0.5)", "top-3 agree", "max |Δprob|", "mean |Δprob|",
                            "identical boxes"], rows)
    targets = markdown_table(["target", "measured", "bound", "met"],
                             [[t["target"], f"{t['value']:.2f}×", t["bound"], "met" if t["met"] else "NOT met"]
                              for t in report["targets"]])
    header = (
        f"Machine: {describe_machine(report['environment'])}, no GPU; ONNX Runtime "
        f"{report['environment']['versions'].get('onnxruntime')} CPU provider. "
        f"{cfg['backbone']} at {cfg['size']}×{cfg['size']}, batch 1, median of {cfg['rounds']} calls per graph, "
        "all graphs called in turn (a shared, noisy machine: compare ratios within this run). Random weights "
        "conditioned like a trained network (fastmlr.testing.condition_for_low_precision); INT8 calibrated on "
        f"the {cfg['calibration']} photos, agreement with the float32 PyTorch model on the "
        f"{cfg['held_out_images']} held-out VOC photos. GPU (TensorRT fp16/int8, ONNX Runtime CUDA): not measured."
    )
    conditions = report.get("run_conditions")
    if conditions:
        loads = [", ".join(f"{x:.1f}" for x in conditions[k]["load_average"]) for k in ("start", "end")]
        header += (f" Load average (1, 5, 15 min) on {conditions['start']['cpu_count']} CPUs while timing: "
                   f"{loads[0]} at {conditions['start']['utc']}, {loads[1]} at {conditions['end']['utc']}.")
    checks = markdown_table(["model", "precision", "export"],
                            [[e["model"], e["precision"], e.get("error") or ("validated" if e["validated"] else
                                                                               "not validated (--validate)")]
                             for e in report["exports"]])
    return f"# Reduced precision in ONNX Runtime (CPU)\n\n{header}\n\n{table}\n\n{targets}\n\n{checks}\n"


if __name__ == "__main__":
    main()
