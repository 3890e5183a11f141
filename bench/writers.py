"""Writers of benchmark results: JSON, markdown tables, CSV; the format chosen by a path's suffix."""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from fastmlr.checks import check_output_file

OUT_SUFFIXES = (".json", ".md", ".csv")


def format_ms(value: float | None) -> str:
    """A time in ms for a table: ``—`` for none, one decimal from 10 ms, two below."""
    return "—" if value is None else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table; cells are written with ``str``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def to_json(result: Mapping) -> str:
    return json.dumps(result, indent=2) + "\n"


def to_csv(rows: Iterable[Mapping], fields: Sequence[str]) -> str:
    """One line per row with ``fields`` as the header (other keys ignored)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def check_suffixes(paths: Iterable[str | Path], suffixes: Sequence[str] = OUT_SUFFIXES) -> None:
    """``ValueError`` naming the first path whose suffix is not one of ``suffixes``."""
    for path in paths:
        if Path(path).suffix not in suffixes:
            raise ValueError(f"--out {path}: the suffix must be one of {', '.join(suffixes)}")


def check_outputs(paths: Iterable[str | Path], overwrite: bool = False, suffixes: Sequence[str] = OUT_SUFFIXES) -> None:
    """Before any measurement: every output path has one of ``suffixes`` and can be written
    (:func:`fastmlr.checks.check_output_file`: its directory writable or creatable, not a directory,
    not an existing file unless ``overwrite``). ``ValueError`` naming the first bad path."""
    paths = list(paths)
    check_suffixes(paths, suffixes)
    for path in paths:
        check_output_file(path, "--out", overwrite)


def json_and_markdown(json_path: str | Path) -> list[Path]:
    """The two files :func:`write_json_and_markdown` writes for ``json_path``."""
    return [Path(json_path), Path(json_path).with_suffix(".md")]


def check_result_files(script: str, json_path: str | Path, overwrite: bool = False) -> None:
    """:func:`check_outputs` for a JSON result and the markdown beside it; a bad path ends the run with
    one line, ``SCRIPT: error: ...``, before anything is measured."""
    try:
        check_outputs(json_and_markdown(json_path), overwrite, (".json", ".md"))
    except ValueError as err:
        raise SystemExit(f"{script}: error: {err}") from None


def write_outputs(
    result: Mapping, paths: Iterable[str | Path], renderers: Mapping[str, Callable[[Mapping], str]]
) -> None:
    """Write ``result`` to each path with the renderer of its suffix (``renderers[".md"]`` ...),
    creating missing directories."""
    for path in map(Path, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(renderers[path.suffix](result))


def write_json_and_markdown(result: Mapping, json_path: Path, markdown: str) -> None:
    """``result`` as JSON at ``json_path`` and ``markdown`` beside it (``.md``)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(to_json(result))
    json_path.with_suffix(".md").write_text(markdown)


def run_script(
    script: str, args: argparse.Namespace, run: Callable[[argparse.Namespace], Mapping],
    render_markdown: Callable[[Mapping], str],
) -> int:
    """A benchmark script's ``main`` after parsing: check ``args.out`` (and ``args.overwrite``) before
    anything is measured (:func:`check_result_files`), ``run(args)``, write the result as JSON at
    ``args.out`` and its ``render_markdown`` beside it, print the markdown; 0."""
    check_result_files(script, args.out, args.overwrite)
    result = run(args)
    markdown = render_markdown(result)
    write_json_and_markdown(result, args.out, markdown)
    print(markdown)
    return 0
