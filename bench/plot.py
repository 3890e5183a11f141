"""Bar chart of a ``bench/latency.py`` result.

    python bench/plot.py bench/results/cpu-ix.json --out bench/results/cpu-ix.png

Top panel: median ms per image of every measurement, one bar per backend (the whisker reaches the
p90), with the papers' figures for the same configuration as hatched bars beside ours. Bottom panel
(when the result has MCAR's per-component rows): MCAR's global stream, global-to-local step and
local stream stacked, ours beside the paper's (Table IX, P40), with the baseline as a black tick.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if not __package__:  # run as ``python bench/plot.py``: make the bench package importable
    import _script  # noqa: F401

from bench.writers import check_outputs

PAPER_STYLE = {
    "mcar-ix": ("MCAR Table IX (P40)", "#bbbbbb"),
    "srdl-3": ("SRDL Table 3 (RTX 3070)", "#888888"),
}
STACK = (("global", "Global"), ("g2l", "G-to-L"), ("local", "Local"))


def measurement_label(m: dict) -> str:
    """``"mcar/global\\nresnet101 448"``; whole models drop the ``/total``."""
    name = m["model"] if m["component"] == "total" else f"{m['model']}/{m['component']}"
    return f"{name}\n{m['backbone']} {m['size']}"


def bar_series(
    result: dict,
) -> tuple[list[str], dict[str, list[float | None]], dict[str, list[float | None]]]:
    """The top panel's data: category labels (measurement configurations, first-seen order), and
    per series (each backend, then each paper table with a figure) the value in ms per image for
    every category (``None``: no bar), plus each backend's p90 in ms per image (the whiskers)."""
    labels: list[str] = []
    values: dict[tuple[str, str], float] = {}
    p90: dict[tuple[str, str], float] = {}
    for m in result["measurements"]:
        label = measurement_label(m)
        if label not in labels:
            labels.append(label)
        values[(m["backend"], label)] = m["ms_per_image"]
        p90[(m["backend"], label)] = m["p90_ms"] / m["batch"]
        for figure in m["paper"]:
            values[(figure["table"], label)] = figure["ms"]
    names = list(dict.fromkeys(m["backend"] for m in result["measurements"]))
    names += [t for t in PAPER_STYLE if any(k[0] == t for k in values)]
    series = {name: [values.get((name, label)) for label in labels] for name in names}
    whiskers = {name: [p90.get((name, label)) for label in labels] for name in names if name not in PAPER_STYLE}
    return labels, series, whiskers


def use_log_scale(series: dict[str, list[float | None]], scale: str) -> bool:
    """``scale`` ``"log"``/``"linear"`` as given; ``"auto"``: log when the largest bar is more than
    30× the smallest (CPU times beside the papers' GPU times)."""
    if scale != "auto":
        return scale == "log"
    finite = [v for vs in series.values() for v in vs if v is not None and v > 0]
    return bool(finite) and max(finite) > 30 * min(finite)


def draw(result: dict, out: Path, scale: str = "auto") -> None:
    """Render ``result`` (a latency JSON) to the image file ``out`` (format from its suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels, series, whiskers = bar_series(result)
    bars = breakdown_bars(result.get("mcar_breakdown") or [])
    panels = 2 if bars else 1
    fig, axes = plt.subplots(panels, 1, figsize=(max(8.0, 1.1 * len(labels) + 2), 5.0 * panels), squeeze=False)
    ax = axes[0, 0]
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series.items()):
        heights = [np.nan if v is None else v for v in vals]
        style = PAPER_STYLE.get(name)
        if style is None:
            lows = [0.0] * len(vals)
            highs = [
                0.0 if v is None or w is None else max(0.0, w - v) for v, w in zip(vals, whiskers[name], strict=True)
            ]
            ax.bar(x + i * width, heights, width, label=name, yerr=[lows, highs], capsize=2)
        else:
            ax.bar(x + i * width, heights, width, label=style[0], color=style[1], hatch="//", edgecolor="black")
    ax.set_xticks(x + width * (len(series) - 1) / 2, labels, fontsize=8)
    ax.set_ylabel("ms per image (median; whisker: p90)")
    if use_log_scale(series, scale):
        ax.set_yscale("log")
    ax.set_title(chart_title(result))
    ax.legend(fontsize=8)
    if bars:
        draw_breakdown(axes[1, 0], bars)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def breakdown_bars(breakdown: list[dict]) -> list[tuple[str, dict[str, float], float]]:
    """The bottom panel's stacked bars as ``(label, {component: ms}, baseline ms)``: per (backbone,
    size), first seen first, ours for every backend whose components were timed (the exported
    backends time MCAR whole and are left out), then the paper's P40 figures once."""
    bars, papers_done = [], set()
    for r in breakdown:
        key = (r["backbone"], r["size"])
        if all(r["ours_ms"][c] is not None for c, _ in STACK):
            bars.append((f"{key[0]} {key[1]}\n{r['backend']}", r["ours_ms"], r["ours_ms"]["baseline"]))
        if r["paper_ms"] and key not in papers_done:
            papers_done.add(key)
            bars.append((f"{key[0]} {key[1]}\npaper (P40)", r["paper_ms"], r["paper_ms"]["baseline"]))
    return bars


def draw_breakdown(ax, bars: list[tuple[str, dict[str, float], float]]) -> None:
    """MCAR's components stacked (``bars`` from :func:`breakdown_bars`), the baseline a black tick."""
    import numpy as np

    colors = {"global": "#4c72b0", "g2l": "#dd8452", "local": "#55a868"}
    x = np.arange(len(bars))
    bottoms = np.zeros(len(bars))
    for c, header in STACK:
        heights = np.asarray([ms[c] for _, ms, _ in bars])
        ax.bar(x, heights, 0.6, bottom=bottoms, label=header, color=colors[c])
        bottoms += heights
    ax.scatter(x, [b for _, _, b in bars], marker="_", s=400, color="black", label="Baseline", zorder=3)
    ax.set_xticks(x, [label for label, _, _ in bars], fontsize=8)
    ax.set_ylabel("ms per image")
    ax.set_title("MCAR per component (Table IX layout)")
    ax.legend(fontsize=8)


def chart_title(result: dict) -> str:
    """Precision, batch, device and the machine, from the result's settings and environment."""
    s, env = result["settings"], result["environment"]
    machine = env.get("gpu") or env.get("cpu")
    return f"{s['precision']}, batch {s['batch']}, {s['device']} ({machine})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/plot.py", description="bar chart of a bench/latency.py JSON")
    parser.add_argument("result", help="a JSON written by bench/latency.py --out FILE.json")
    parser.add_argument("--out", required=True, help="image to write (.png, .svg, .pdf)")
    parser.add_argument("--scale", choices=("auto", "log", "linear"), default="auto")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out image")
    args = parser.parse_args(argv)
    path = Path(args.result)
    try:
        check_outputs([args.out], args.overwrite, (".png", ".svg", ".pdf"))
        result = json.loads(path.read_text())
        if not isinstance(result, dict) or not result.get("measurements"):
            raise ValueError(f"{path} holds no measurements (is it a bench/latency.py result?)")
    except FileNotFoundError:
        print(f"plot.py: error: {path}: no such file", file=sys.stderr)
        return 2
    except (ValueError, json.JSONDecodeError) as err:
        print(f"plot.py: error: {err}", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            "plot.py: error: matplotlib is not installed: pip install matplotlib (or pip install -e '.[eval]')",
            file=sys.stderr,
        )
        return 2
    draw(result, Path(args.out), args.scale)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
