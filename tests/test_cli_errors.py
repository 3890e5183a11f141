"""The whole ``fastmlr`` command surface with bad arguments: every subcommand, every flag that takes a
path or a number. Each case must end with one line on stderr (``fastmlr ...: error: ...``), no
traceback, and the exit status: 2 for arguments argparse rejects, 1 for bad input found while
running. A new case is one row of :data:`CASES`.

Placeholders in the arguments are filled from the ``paths`` fixture: ``{tmp}`` an empty directory,
``{file}`` an existing file, ``{ckpt}`` a small MCAR checkpoint (mobilenet_v2, 64 px, 80 classes),
``{baseline_ckpt}`` a baseline one, ``{corrupt}`` a file that is neither a checkpoint nor an image,
``{image}`` a readable image, ``{bomb}`` a decompression bomb, ``{coco}`` a COCO tree with one image,
``{readonly}`` a directory no file can be created in.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image
from test_data_validation import bomb_png

import fastmlr
from fastmlr.checkpoint import save_checkpoint
from fastmlr.cli import main

SMALL = ["--backbone", "mobilenet_v2", "--size", "64"]
EXPORT = ["export", "--model", "mcar", *SMALL]
EVALUATE = ["evaluate", "--model", "baseline", *SMALL, "--data", "coco", "--root", "{coco}"]
PREDICT = ["predict", "{image}", "--model", "mcar", *SMALL]
REQUIRED = "the following arguments are required"
INVALID_INT = "invalid int value"
INVALID_FLOAT = "invalid float value"

# (case id, argv, exit status, pattern the one stderr line must match)
CASES = [
    ("unknown-command", ["bogus"], 2, r"^fastmlr: error: unknown command 'bogus'"),
    # --- export ---------------------------------------------------------------------------------
    ("export-no-out", ["export", "--model", "mcar"], 2, REQUIRED),
    ("export-unknown-flag", [*EXPORT, "--out", "{tmp}/m.onnx", "--bogus"], 2, "unrecognized arguments: --bogus"),
    ("export-unknown-model", ["export", "--model", "nope", "--out", "{tmp}/m.onnx"], 1, "unknown model 'nope'"),
    ("export-size-text", [*EXPORT, "--size", "abc", "--out", "{tmp}/m.onnx"], 2, INVALID_INT),
    ("export-size-not-32", [*EXPORT, "--size", "100", "--out", "{tmp}/m.onnx"], 1, "multiple of 32"),
    ("export-batch-zero", [*EXPORT, "--batch", "0", "--out", "{tmp}/m.onnx"], 1, "--batch must be a positive"),
    ("export-batch-text", [*EXPORT, "--batch", "x", "--out", "{tmp}/m.onnx"], 2, INVALID_INT),
    ("export-opset-text", [*EXPORT, "--opset", "x", "--out", "{tmp}/m.onnx"], 2, INVALID_INT),
    ("export-opset-range", [*EXPORT, "--opset", "5", "--out", "{tmp}/m.onnx"], 1,
     r"opset must be an integer in 9\.\.20"),
    ("export-mcar-opset-10", [*EXPORT, "--opset", "10", "--out", "{tmp}/m.onnx"], 1,
     "mcar needs ONNX opset 11 or later, got opset 10"),
    ("export-num-classes-text", [*EXPORT, "--num-classes", "x", "--out", "{tmp}/m.onnx"], 2, INVALID_INT),
    ("export-num-classes-zero", [*EXPORT, "--num-classes", "0", "--out", "{tmp}/m.onnx"], 1,
     "num_classes must be an int >= 1"),
    ("export-format", [*EXPORT, "--format", "tflite", "--out", "{tmp}/m.onnx"], 1, "unknown format 'tflite'"),
    ("export-precision", [*EXPORT, "--format", "trt", "--precision", "fp8x", "--out", "{tmp}/m.plan"], 1,
     "unknown precision 'fp8x'"),
    ("export-images-missing", [*EXPORT, "--images", "{tmp}/none", "--out", "{tmp}/m.onnx"], 1,
     "--images .*none does not exist"),
    ("export-checkpoint-missing", [*EXPORT, "--checkpoint", "{tmp}/none.pt", "--out", "{tmp}/m.onnx"], 1,
     "checkpoint not found"),
    ("export-checkpoint-corrupt", [*EXPORT, "--checkpoint", "{corrupt}", "--out", "{tmp}/m.onnx"], 1,
     "cannot read checkpoint"),
    ("export-checkpoint-other-model", [*EXPORT, "--checkpoint", "{baseline_ckpt}", "--out", "{tmp}/m.onnx"], 1,
     "saved from model 'baseline', not 'mcar'"),
    ("export-checkpoint-contradicted", ["export", "--model", "mcar", "--checkpoint", "{ckpt}", "--size", "96",
                                        "--out", "{tmp}/m.onnx"], 1, "image_size=96 contradicts .* image_size=64"),
    ("export-out-directory", [*EXPORT, "--out", "{tmp}"], 1, "--out .* is a directory; give a file name"),
    ("export-out-exists", [*EXPORT, "--out", "{file}"], 1, "--out .* exists; pass --overwrite"),
    ("export-out-readonly", [*EXPORT, "--out", "{readonly}/m.onnx"], 1, "--out .*: cannot write in"),
    ("export-out-under-file", [*EXPORT, "--out", "{file}/m.onnx"], 1, "existing.json is not a directory"),
    ("export-out-missing-dir", [*EXPORT, "--out", "{tmp}/none/m.onnx"], 1, "output directory does not exist"),
    ("export-triton-out-file", [*EXPORT, "--format", "triton-server", "--out", "{file}"], 1,
     "--out .* is a file; give a directory"),
    # model options (shared by export, evaluate, predict)
    ("option-topn-text", [*EXPORT, "--topn", "x", "--out", "{tmp}/m.onnx"], 2, INVALID_INT),
    ("option-topn-zero", [*EXPORT, "--topn", "0", "--out", "{tmp}/m.onnx"], 1, r"topn must be an integer in 1\.\.80"),
    ("option-tau-range", [*EXPORT, "--tau", "1.5", "--out", "{tmp}/m.onnx"], 1, r"threshold must be in \(0, 1\)"),
    ("option-tau-text", [*EXPORT, "--tau", "x", "--out", "{tmp}/m.onnx"], 2, INVALID_FLOAT),
    ("option-pooling", [*EXPORT, "--pooling", "sum", "--out", "{tmp}/m.onnx"], 1, "unknown pooling 'sum'"),
    ("option-not-of-model", ["export", "--model", "baseline", *SMALL, "--topn", "2", "--out", "{tmp}/m.onnx"], 1,
     "--topn does not apply to model 'baseline'"),
    ("option-steps-zero", ["export", "--model", "ssgrl", *SMALL, "--steps", "0", "--out", "{tmp}/m.onnx"], 1,
     "steps must be a positive integer"),
    ("option-mask-ratio", ["export", "--model", "lce", *SMALL, "--mask-ratio", "1.5", "--out", "{tmp}/m.onnx"], 1,
     r"mask_ratio must be in \[0, 1\)"),
    ("option-adjacency-missing", ["export", "--model", "deeplift", *SMALL, "--adjacency", "{tmp}/none.npy",
                                  "--out", "{tmp}/m.onnx"], 1, "none.npy"),
    ("option-label-embeddings-missing", ["export", "--model", "mlgcn", *SMALL, "--label-embeddings",
                                         "{tmp}/none.npy", "--out", "{tmp}/m.onnx"], 1, "none.npy"),
    ("option-contradicts-checkpoint", ["export", "--model", "mcar", "--checkpoint", "{ckpt}", "--topn", "2",
                                       "--out", "{tmp}/m.onnx"], 1, "topn=2 contradicts .* saved with topn=4"),
    # --- evaluate -------------------------------------------------------------------------------
    ("evaluate-no-data", ["evaluate", "--model", "baseline", "--root", "{coco}"], 2, REQUIRED),
    ("evaluate-data-choice", ["evaluate", "--model", "baseline", "--data", "imagenet", "--root", "{coco}"], 2,
     "invalid choice: 'imagenet'"),
    ("evaluate-root-missing", ["evaluate", "--model", "baseline", *SMALL, "--data", "coco", "--root", "{tmp}/none"],
     1, "not found"),
    ("evaluate-voc-root-missing", ["evaluate", "--model", "baseline", *SMALL, "--data", "voc", "--root",
                                   "{tmp}/none"], 1, "VOC root directory not found"),
    ("evaluate-ann-missing", [*EVALUATE, "--ann", "{tmp}/none.json"], 1, "COCO annotation file not found"),
    ("evaluate-ann-corrupt", [*EVALUATE, "--ann", "{corrupt}"], 1, "is not a JSON file"),
    ("evaluate-size-text", [*EVALUATE, "--size", "x"], 2, INVALID_INT),
    ("evaluate-size-zero", [*EVALUATE, "--size", "0"], 1, "--size must be a positive integer"),
    ("evaluate-batch-size-zero", [*EVALUATE, "--batch-size", "0"], 1, "--batch-size must be a positive integer"),
    ("evaluate-workers-negative", [*EVALUATE, "--workers", "-1"], 1, "--workers must be >= 0"),
    ("evaluate-limit-zero", [*EVALUATE, "--limit", "0"], 1, "--limit must be a positive integer"),
    ("evaluate-num-classes-zero", [*EVALUATE, "--num-classes", "0"], 1, "--num-classes must be a positive integer"),
    ("evaluate-num-classes-other", [*EVALUATE, "--num-classes", "20"], 1, "predicts 20 classes but the dataset has"),
    ("evaluate-threshold-text", [*EVALUATE, "--threshold", "x"], 2, INVALID_FLOAT),
    ("evaluate-threshold-range", [*EVALUATE, "--threshold", "1.5"], 1, r"--threshold must be in \(0, 1\)"),
    ("evaluate-compare-same", [*EVALUATE, "--compare", "eager"], 1, "same backend"),
    ("evaluate-precision-eager", [*EVALUATE, "--precision", "fp16"], 1, "applies to the exported backends"),
    ("evaluate-precision-unknown", [*EVALUATE, "--backend", "onnxruntime", "--precision", "int4"], 2,
     "invalid choice: 'int4'"),
    ("evaluate-precision-bf16-cpu", [*EVALUATE, "--backend", "onnxruntime", "--precision", "bf16", "--device", "cpu"],
     1, "--precision bf16 .*needs a CUDA device: ONNX Runtime's CPU provider has no bf16 kernels"),
    ("evaluate-calibration-not-int8", [*EVALUATE, "--backend", "onnxruntime", "--calibration", "{tmp}"], 1,
     "--calibration applies to --precision int8"),
    ("evaluate-calibration-missing", [*EVALUATE, "--backend", "onnxruntime", "--precision", "int8", "--calibration",
                                      "{tmp}/none"], 1, "--calibration .*none does not exist"),
    ("evaluate-calibration-empty", [*EVALUATE, "--backend", "onnxruntime", "--precision", "int8", "--calibration",
                                    "{tmp}"], 1, "--calibration: no .jpg/.jpeg/.png images under"),
    ("evaluate-checkpoint-missing", [*EVALUATE, "--checkpoint", "{tmp}/none.pt"], 1, "checkpoint not found"),
    ("evaluate-checkpoint-other-model", [*EVALUATE, "--checkpoint", "{ckpt}"], 1, "saved from model 'mcar'"),
    ("evaluate-out-directory", [*EVALUATE, "--out", "{tmp}"], 1, "--out .* is a directory"),
    ("evaluate-out-exists", [*EVALUATE, "--out", "{file}"], 1, "--out .* exists; pass --overwrite"),
    ("evaluate-out-readonly", [*EVALUATE, "--out", "{readonly}/r.json"], 1, "cannot write in"),
    # --- predict --------------------------------------------------------------------------------
    ("predict-no-image", ["predict", "--model", "mcar"], 2, REQUIRED),
    ("predict-image-missing", ["predict", "{tmp}/none.jpg", "--model", "mcar", *SMALL], 1, "image not found"),
    ("predict-image-corrupt", ["predict", "{corrupt}", "--model", "mcar", *SMALL], 1, "cannot read image"),
    ("predict-image-bomb", ["predict", "{bomb}", "--model", "mcar", *SMALL], 1,
     "cannot read image .*bomb.png: .*decompression bomb"),
    ("predict-size-text", [*PREDICT, "--size", "x"], 2, INVALID_INT),
    ("predict-size-not-32", [*PREDICT, "--size", "100"], 1, "image_size must be a positive multiple of 32"),
    ("predict-topk-zero", [*PREDICT, "--topk", "0"], 1, "--topk must be a positive integer"),
    ("predict-topk-too-many", [*PREDICT, "--topk", "81"], 1, "--topk must be at most the model's 80 classes"),
    ("predict-topk-over-num-classes", [*PREDICT, "--num-classes", "5", "--topk", "6"], 1,
     "--topk must be at most --num-classes"),
    ("predict-min-local", [*PREDICT, "--min-local", "1.5"], 1, r"--min-local must be in \[0, 1\)"),
    ("predict-min-score-text", [*PREDICT, "--min-score", "x"], 2, INVALID_FLOAT),
    ("predict-checkpoint-corrupt", [*PREDICT, "--checkpoint", "{corrupt}"], 1, "cannot read checkpoint"),
    ("predict-out-file", [*PREDICT, "--out", "{file}"], 1, "--out .* is a file; give a directory"),
    ("predict-out-readonly", [*PREDICT, "--out", "{readonly}/regions"], 1, "cannot write in"),
    ("predict-out-clobber", [*PREDICT, "--out", "{regions}"], 1, r"image_regions\.png exists; pass --overwrite"),
    ("predict-device", [*PREDICT, "--device", "tpu"], 2, "invalid choice: 'tpu'"),
    # --- serve (argument level; serving itself needs Triton) -------------------------------------
    ("serve-no-model", ["serve"], 2, REQUIRED),
    ("serve-max-batch-text", ["serve", "--model", "mcar", "--max-batch", "x"], 2, INVALID_INT),
    ("serve-port-text", ["serve", "--model", "mcar", "--http-port", "x"], 2, INVALID_INT),
    ("serve-port-range", ["serve", "--model", "mcar", "--http-port", "70000"], 1, r"--http-port must be a TCP port"),
    ("serve-host-ipv6", ["serve", "--model", "mcar", "--host", "::1"], 1,
     "--host must be an IPv4 address or a host name: Triton 2.51 cannot listen on the IPv6 address '::1'"),
    ("serve-drain-timeout", ["serve", "--model", "mcar", "--drain-timeout", "-1"], 1,
     r"--drain-timeout must be a number of seconds >= 0, got -1"),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli")
    (root / "empty").mkdir()
    (root / "existing.json").write_text("{}")
    (root / "corrupt.bin").write_bytes(b"neither a checkpoint nor an image")
    Image.new("RGB", (80, 60), (120, 30, 200)).save(root / "image.jpg")
    bomb_png(root / "bomb.png")
    torch.manual_seed(0)
    small = {"backbone": "mobilenet_v2", "image_size": 64}
    save_checkpoint(fastmlr.create_model("mcar", **small), root / "mcar.pt")
    save_checkpoint(fastmlr.create_model("baseline", **small), root / "baseline.pt")
    coco = root / "coco"
    (coco / "val2014").mkdir(parents=True)
    (coco / "annotations").mkdir()
    Image.new("RGB", (64, 64)).save(coco / "val2014" / "a.jpg")
    (coco / "annotations" / "instances_val2014.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "person"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1}],
    }))
    regions = root / "regions"
    regions.mkdir()
    (regions / "image_regions.png").write_bytes(b"drawn before")
    return {
        "tmp": str(root / "empty"), "file": str(root / "existing.json"), "corrupt": str(root / "corrupt.bin"),
        "image": str(root / "image.jpg"), "bomb": str(root / "bomb.png"), "ckpt": str(root / "mcar.pt"),
        "baseline_ckpt": str(root / "baseline.pt"), "coco": str(coco), "regions": str(regions),
        "readonly": "/sys",  # writes fail there even for root
    }


@pytest.mark.parametrize("argv, code, pattern", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_argument_gives_one_line_and_exit_status(paths, capsys, argv, code, pattern) -> None:
    argv = [arg.format(**paths) for arg in argv]
    assert main(argv) == code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{captured.err}"
    assert lines[0].startswith("fastmlr"), lines[0]
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    assert "Traceback" not in captured.out + captured.err


def test_every_subcommand_is_walked() -> None:
    from fastmlr.cli import SUBCOMMANDS

    walked = {case[1][0] for case in CASES}
    assert set(SUBCOMMANDS) <= walked, f"add cases for {sorted(set(SUBCOMMANDS) - walked)}"


def test_every_model_option_flag_is_walked() -> None:
    from fastmlr.cli import MODEL_OPTION_FLAGS

    walked = {arg for case in CASES for arg in case[1]}
    assert set(MODEL_OPTION_FLAGS) <= walked, f"add cases for {sorted(set(MODEL_OPTION_FLAGS) - walked)}"


def test_help_exits_0(capsys) -> None:
    assert main(["export", "--help"]) == 0
    assert "--overwrite" in capsys.readouterr().out


# The benchmark scripts check their output files before measuring: (script, argv, error pattern).
BENCH_CASES = [
    ("latency", ["--model", "baseline", "--out", "{file}"], r"--out .*existing.json exists; pass --overwrite"),
    ("latency", ["--model", "baseline", "--out", "{tmp}/r.txt"], "the suffix must be one of"),
    ("latency", ["--model", "baseline", "--out", "{readonly}/r.json"], "cannot write in"),
    ("latency", ["--model", "baseline", "--out", "{file}/r.json"], "existing.json is not a directory"),
    ("bench_g2l", ["--out", "{file}"], "exists; pass --overwrite"),
    ("bench_g2l", ["--out", "{readonly}/g2l.json"], "cannot write in"),
    ("bench_attention", ["--out", "{readonly}/attention.json"], "cannot write in"),
    ("bench_attention", ["--out", "{file}"], "exists; pass --overwrite"),
    ("bench_precision", ["--out", "{file}"], "exists; pass --overwrite"),
    ("bench_precision", ["--out", "{readonly}/precision.json"], "cannot write in"),
    ("serve", ["--out", "{file}"], "exists; pass --overwrite"),
    ("serve", ["--out", "{tmp}/serve.txt"], "the suffix must be one of"),
    ("serve_memory", ["--out", "{file}"], "exists; pass --overwrite"),
    ("plot", ["{file}", "--out", "{tmp}"], "the suffix must be one of .png"),
    ("plot", ["{file}", "--out", "{readonly}/plot.png"], "cannot write in"),
]


@pytest.mark.parametrize("script, argv, pattern", BENCH_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(BENCH_CASES)])
def test_bench_scripts_check_outputs_first(paths, capsys, script, argv, pattern) -> None:
    import importlib

    main_of = importlib.import_module(f"bench.{script}").main
    argv = [arg.format(**paths) for arg in argv]
    try:
        code = main_of(argv)
        err = capsys.readouterr().err
    except SystemExit as done:  # the kernel, precision and serving benchmarks exit with their message
        code, err = 1, str(done.code)
    assert code in (1, 2)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), err
