"""Latency of fastmlr's models on the machine at hand, with the papers' figures beside ours.

    python bench/latency.py --model mcar --backend trt
    python bench/latency.py --table ix --backend eager,compile,onnxruntime --out bench/results/cpu-ix.json
    python bench/latency.py --table srdl3 --device cuda --kernels triton --out r.json --out r.md

Each configuration (model × backbone × size × backend) is built with random weights (timing does
not depend on them; ``--checkpoint`` loads real ones) and fed a fixed-seed random batch. All are
built first, then each is called ``--warmup`` times (the first call, timed apart as
``first_call_ms``, is where ``torch.compile`` compiles and ONNX Runtime / TensorRT initialise),
then timed side by side: ``--iters`` rounds, each calling every configuration once in turn, so that
a slow spell of a shared machine hits all rows alike and their ratios stay fair
(:mod:`bench.measure`; timers of :mod:`bench.timing`: CUDA events on the GPU, ``time.perf_counter``
otherwise). We report median, p90, min, mean and images per second over the rounds, and the load
average at the start and end of the timing (``run_conditions``).

MCAR is timed per component, the columns of MCAR's Table IX: the global stream, the global-to-local
step (top-N classes, localization, crop-resize), the local stream on the N regions and the whole
forward ("total"); the baseline of the same backbone and size is timed with it, for the ratio
total / baseline. Components need a torch backend (eager, compile); the exported backends time
MCAR whole.

``--table ix`` runs Table IX's grid (3 backbones × 256/448, baseline and MCAR), ``--table srdl3``
SRDL Table 3's rows (ResNet-101, 448); ``--model/--backbone/--size`` given with a table override
its grid (e.g. ``--table ix --backbone mobilenet_v2 --size 64`` for a quick check). ``--dry-run``
prints the configurations a command would time and exits.

Output: a markdown report on stdout, ``--out FILE.json|.md|.csv`` (repeatable); the JSON records
the environment, the settings, every measurement with its samples, the paper figures and the
derived tables (:mod:`bench.latency_tables`). A configuration this machine cannot run (TensorRT or a
GPU missing, ...) ends the command before any timing with exit status 2 and one line saying what is
missing and how to get it; so does a bad argument. A configuration that fails while it is being
built or run (an export error, say) is reported on stderr and under ``failures`` in the output, the
others still run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

if not __package__:  # run as ``python bench/latency.py``: make the bench package importable
    import _script  # noqa: F401

import torch

import fastmlr
from bench import latency_tables as tables
from bench.environment import capture_environment, run_conditions
from bench.measure import INTERLEAVED_ORDER, measure_interleaved
from bench.paper_tables import (
    SRDL_TABLE_3_BACKBONE,
    SRDL_TABLE_3_ROWS,
    SRDL_TABLE_3_SIZE,
    TABLE_IX_BACKBONES,
    TABLE_IX_SIZES,
    table_metadata,
)
from bench.records import Config, Failure, Settings
from bench.runners import BACKENDS, PRECISION_NAMES, RUNNERS, Unavailable, check_available
from bench.writers import OUT_SUFFIXES, check_outputs, to_json, write_outputs
from fastmlr.backbones import BACKBONES as BACKBONE_SPECS
from fastmlr.checks import check_image_size

MODELS = tuple(fastmlr.list_models())
BACKBONES = (*TABLE_IX_BACKBONES, *(b for b in BACKBONE_SPECS if b not in TABLE_IX_BACKBONES))
TABLES = ("ix", "srdl3")
RENDERERS = {".json": to_json, ".md": tables.render_markdown, ".csv": tables.render_csv}


def parse_list(text: str, choices: tuple[str, ...], what: str, all_means: tuple[str, ...] | None = None) -> list[str]:
    """Comma-separated ``text`` → list (order kept, duplicates dropped); ``"all"`` → ``all_means``.
    ``ValueError`` naming ``what`` and the choices for anything else."""
    items = []
    for item in (s.strip() for s in text.split(",")):
        if item == "all" and all_means is not None:
            items += all_means
        elif item in choices:
            items.append(item)
        else:
            extra = ", all" if all_means is not None else ""
            raise ValueError(f"--{what}: unknown {item!r}; choose from {', '.join(choices)}{extra}")
    return list(dict.fromkeys(items))


def parse_sizes(text: str) -> list[int]:
    """Comma-separated image sides, each a positive multiple of 32."""
    sizes = []
    for item in text.split(","):
        try:
            size = int(item)
        except ValueError:
            raise ValueError(f"--size: {item!r} is not an integer") from None
        try:
            sizes.append(check_image_size(size, "--size"))
        except ValueError:
            raise ValueError(f"--size: {size} is not a positive multiple of 32 (the backbones' stride)") from None
    return list(dict.fromkeys(sizes))


def plan(args: argparse.Namespace) -> list[Config]:
    """The configurations to time. ``--table ix``: baseline and MCAR × Table IX's backbones × 256/448;
    ``--table srdl3``: the models of SRDL Table 3's rows at ResNet-101 / 448; explicit
    ``--model/--backbone/--size`` override a table's. MCAR is always timed with the baseline of the
    same backbone and size (for the ratio total / baseline)."""
    if args.table == "ix":
        models, backbones, sizes = ["baseline", "mcar"], list(TABLE_IX_BACKBONES), list(TABLE_IX_SIZES)
    elif args.table == "srdl3":
        models = list(dict.fromkeys(r.model for r in SRDL_TABLE_3_ROWS))
        backbones, sizes = [SRDL_TABLE_3_BACKBONE], [SRDL_TABLE_3_SIZE]
    else:
        models, backbones, sizes = ["mcar"], ["resnet101"], [448]
    if args.model is not None:
        models = parse_list(args.model, MODELS, "model", all_means=MODELS)
    if args.backbone is not None:
        backbones = parse_list(args.backbone, BACKBONES, "backbone", all_means=BACKBONES)
    if args.size is not None:
        sizes = parse_sizes(args.size)
    if "mcar" in models and "baseline" not in models:
        models.insert(0, "baseline")
    backends = parse_list(args.backend, BACKENDS, "backend")
    return [Config(m, bb, s, be) for bb in backbones for s in sizes for m in models for be in backends]


def checkpoint_model(models: set[str]) -> str:
    """The model ``--checkpoint`` is loaded into: the one model of the run besides the baseline (which
    MCAR brings along with random weights), or the baseline when it is alone. ``ValueError`` when the
    run has several."""
    owners = sorted(models - {"baseline"}) or ["baseline"]
    if len(owners) > 1:
        raise ValueError(f"--checkpoint holds one model's weights but the run times {', '.join(owners)}")
    return owners[0]


def settings_from(args: argparse.Namespace, configs: list[Config]) -> Settings:
    """Validate the scalar options (``ValueError`` naming the bad one) and fill in the defaults that
    depend on the configurations: the device and the model a checkpoint belongs to."""
    for name in ("batch", "iters", "warmup", "num_classes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    check_outputs(args.out, args.overwrite, OUT_SUFFIXES)
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file")
    device = args.device
    if device is None:
        gpu_wanted = any(RUNNERS[c.backend].gpu_only for c in configs) or torch.cuda.is_available()
        device = "cuda" if gpu_wanted else "cpu"
    return Settings(
        batch=args.batch, precision=args.precision, device=device, warmup=args.warmup, iters=args.iters,
        kernels=args.kernels, threads=args.threads or torch.get_num_threads(), seed=args.seed,
        num_classes=args.num_classes, checkpoint=args.checkpoint,
        checkpoint_model=checkpoint_model({c.model for c in configs}) if args.checkpoint else None,
        cache_dir=args.cache_dir, channels_last=args.channels_last,
    )


def run(args: argparse.Namespace) -> dict:
    """Plan, check, time and assemble the result (what ``--out x.json`` writes)."""
    configs = plan(args)
    backends = list(dict.fromkeys(c.backend for c in configs))
    precisions = parse_list(args.precision, PRECISION_NAMES, "precision")
    args.precision = precisions[0]
    settings = settings_from(args, configs)
    variants = [replace(settings, precision=p) for p in precisions]
    # INT8 exists as calibrated Q/DQ graphs only: with other precisions, the torch backends skip it.
    skipped = {(b, "int8") for b in backends if RUNNERS[b].per_component and len(precisions) > 1}
    for variant in variants:
        for backend in backends:
            if (backend, variant.precision) not in skipped:
                check_available(backend, variant)
    if args.dry_run:
        return {"settings": asdict(settings), "configs": [asdict(c) for c in configs], "precisions": precisions}
    torch.set_num_threads(settings.threads)
    jobs = [(c, v) for c in configs for v in variants if (c.backend, v.precision) not in skipped]
    components = sum(4 if c.model == "mcar" and RUNNERS[c.backend].per_component else 1 for c, _ in jobs)
    failures, progress = [], progress_printer(len(jobs) + components + settings.iters)

    def failed(config: Config, variant: Settings, err: BaseException) -> None:
        failures.append(Failure.of(config, err))
        print(f"latency.py: {config.label()} {variant.precision} failed: {failures[-1].error}",
              file=sys.stderr, flush=True)

    start = run_conditions()
    with contextlib.ExitStack() as stack:
        workdir = Path(settings.cache_dir or stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        measurements = measure_interleaved(jobs, workdir, progress, failed)
    rows = [asdict(m) for m in measurements]
    breakdown, speedup_rows = tables.mcar_breakdown(rows), tables.speedups(rows)
    return {
        "run_conditions": {"order": INTERLEAVED_ORDER, "start": start, "end": run_conditions()},
        "environment": capture_environment(),
        "settings": {**asdict(settings), "backends": backends, "precisions": precisions, "table": args.table,
                     "command": sys.argv},
        "paper_tables": table_metadata(),
        "measurements": rows,
        "mcar_breakdown": breakdown,
        "srdl3": tables.srdl3_rows(rows) if args.table == "srdl3" else [],
        "speedups": speedup_rows,
        "targets": tables.latency_targets(breakdown, speedup_rows, settings.batch, settings.device),
        "failures": [asdict(f) for f in failures],
    }


def progress_printer(total: int) -> Callable[[str], None]:
    """A function printing ``[k/total] message`` lines on stderr, k counting its calls."""
    count = 0

    def report(message: str) -> None:
        nonlocal count
        count += 1
        print(f"[{count}/{total}] {message}", file=sys.stderr, flush=True)

    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/latency.py", description=__doc__.split("\n\n")[0],
                                     epilog="examples:\n" + __doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", help=f"comma-separated from {', '.join(MODELS)}, or all (default: mcar, which also times "
                        "the baseline)")
    add("--backend", default="eager", help=f"comma-separated from {', '.join(BACKENDS)} (default eager)")
    add("--backbone", help=f"comma-separated from {', '.join(BACKBONES)}, or all (default resnet101)")
    add("--size", help="image side(s), comma-separated multiples of 32 (default 448)")
    add("--batch", type=int, default=1)
    add("--precision", default="fp32",
        help=f"comma-separated from {', '.join(PRECISION_NAMES)}; each configuration is timed at each (default fp32)")
    add("--device", choices=("cpu", "cuda"), help="default: cuda for trt/torch-trt or when a GPU is visible, else cpu")
    add("--warmup", type=int, default=5, help="untimed calls before timing, at least 1 (default 5)")
    add("--iters", type=int, default=20, help="timed rounds, one call of each configuration per round (default 20)")
    add("--table", choices=TABLES, help="ix: MCAR Table IX's grid; srdl3: SRDL Table 3's rows")
    add("--out", action="append", default=[], help="write results to FILE.json|.md|.csv (repeatable)")
    add("--overwrite", action="store_true", help="replace existing --out files")
    add("--checkpoint", help="real weights for the run's one model (MCAR's companion baseline stays random)")
    add("--channels-last", action="store_true", help="eager/compile: model and inputs in channels_last (NHWC)")
    add("--kernels", choices=("auto", "torch", "triton"), default="auto",
        help="force fastmlr.kernels' backend for the run (default auto)")
    add("--threads", type=int, help="torch and ONNX Runtime intra-op threads (default: torch's)")
    add("--num-classes", type=int, default=80, help="classes (default 80, MS-COCO)")
    add("--seed", type=int, default=0)
    add("--cache-dir", help="keep exported ONNX files and TensorRT engines here (default: a temporary directory)")
    add("--dry-run", action="store_true", help="print the configurations and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except Unavailable as err:
        print(f"latency.py: unavailable: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        print(f"latency.py: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        for c in result["configs"]:
            print(f"{c['model']} {c['backbone']} {c['size']} {c['backend']}")
        return 0
    sys.stdout.write(tables.render_markdown(result))
    write_outputs(result, args.out, RENDERERS)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
