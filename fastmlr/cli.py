"""The ``fastmlr`` command. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``; they are imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "export": ("fastmlr.export.cli", "export a model to ONNX, a TensorRT engine or a Triton-server repository"),
    "evaluate": ("fastmlr.evaluate", "evaluate a model on COCO or VOC (mAP, CF1, OF1) with any backend"),
    "predict": ("fastmlr.predict", "predict labels for images; draw MCAR's regions"),
    "serve": ("fastmlr.serve", "serve a model on NVIDIA Triton Inference Server with dynamic batching"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="fastmlr", description="fast, exported, measured multi-label recognition")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints help or the "invalid choice" error
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    cmd_parser = argparse.ArgumentParser(prog=f"fastmlr {argv[0]}", description=SUBCOMMANDS[argv[0]][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"fastmlr {argv[0]}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
