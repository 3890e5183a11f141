"""The ``fastmlr`` command. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``; they are imported only when used.

Every error reaches the user as one line on stderr, ``fastmlr COMMAND: error: ...``: bad arguments
(exit status 2, argparse's rule) and bad input found while running — ``ValueError``,
``FileNotFoundError`` and other ``OSError``, ``RuntimeError`` (exit status 1). Interrupted: 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, NoReturn

SUBCOMMANDS = {
    "export": ("fastmlr.export.cli", "export a model to ONNX, a TensorRT engine or a Triton-server repository"),
    "evaluate": ("fastmlr.evaluate", "evaluate a model on COCO or VOC (mAP, CF1, OF1) with any backend"),
    "predict": ("fastmlr.predict", "predict labels for images; draw MCAR's regions"),
    "serve": ("fastmlr.serve", "serve a model on NVIDIA Triton Inference Server with dynamic batching"),
}


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block), pointing at ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: The models' own options on the command line: flag -> (option, type, help). The option is the
#: ``create_model`` keyword; a flag applies to the models having that option. Left out: SRDL's
#: ``topk``, which only shapes training.
MODEL_OPTION_FLAGS: dict[str, tuple[str, type, str]] = {
    "--pooling": ("pooling", str, "baseline, mcar: global pooling, avg | max | gwp"),
    "--topn": ("topn", int, "mcar: classes localized per image (N)"),
    "--tau": ("threshold", float, "mcar: localization threshold τ of eq. 7; srdl: object-erasing threshold"),
    "--steps": ("steps", int, "ssgrl: graph propagation steps"),
    "--mask-ratio": ("mask_ratio", float, "lce: share of label tokens masked in training"),
    "--label-embeddings": ("label_embeddings", str, "label-graph models: [C, 300] .npy file (or a packaged name)"),
    "--adjacency": ("adjacency", str, "label-graph models: [C, C] label graph .npy file (or a packaged name)"),
}


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Add :data:`MODEL_OPTION_FLAGS`. Each defaults to the checkpoint's value, else the model's."""
    group = parser.add_argument_group("model options (default: the checkpoint's value, else the model's default)")
    for flag, (option, kind, help_text) in MODEL_OPTION_FLAGS.items():
        group.add_argument(flag, dest=f"model_{option}", metavar=flag[2:].replace("-", "_").upper(), type=kind,
                           default=None, help=help_text)


def model_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The model options given on the command line, as ``create_model`` keywords; ``ValueError`` for
    a flag that does not apply to ``args.model``."""
    from fastmlr.registry import model_defaults

    options = model_defaults(args.model)
    given = {}
    for flag, (option, _, _) in MODEL_OPTION_FLAGS.items():
        value = getattr(args, f"model_{option}", None)
        if value is None:
            continue
        if option not in options:
            users = [flag for flag, (o, _, _) in MODEL_OPTION_FLAGS.items() if o in options]
            raise ValueError(f"{flag} does not apply to model {args.model!r} (its flags: {', '.join(users) or 'none'})")
        given[option] = value
    return given


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = CommandParser(prog="fastmlr", description="fast, exported, measured multi-label recognition")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] not in SUBCOMMANDS:
        print(f"fastmlr: error: unknown command {argv[0]!r}; choose one of {', '.join(SUBCOMMANDS)} "
              "(see fastmlr --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    cmd_parser = CommandParser(prog=f"fastmlr {argv[0]}", description=SUBCOMMANDS[argv[0]][1])
    module.add_arguments(cmd_parser)
    try:
        args = cmd_parser.parse_args(argv[1:])
    except SystemExit as done:  # --help (0) or a bad argument (2), already printed
        return int(done.code or 0)
    try:
        return int(module.run(args) or 0)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"fastmlr {argv[0]}: error: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastmlr {argv[0]}: interrupted", file=sys.stderr)
        return 130


def one_line(err: BaseException) -> str:
    """An exception as one line: its message's lines joined (multi-line messages, e.g. a validation
    report, keep their content)."""
    text = str(err) or type(err).__name__
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


if __name__ == "__main__":
    raise SystemExit(main())
