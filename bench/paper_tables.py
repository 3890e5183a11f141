"""The papers' inference-time tables, as data, so benchmark results can print them beside ours.

- MCAR Table IX (``shared/papers/002_2112ec6cd3cda4d7.txt``): average inference time per image in
  ms on one P40 GPU (cuDNN v7.4.1), baseline and MCAR (topN = 4) with each component, for
  MobileNet-v2 / ResNet-50 / ResNet-101 at 256×256 and 448×448.
- SRDL Table 3 (``shared/papers/000_24bf399b3f1dd02f.txt``): inference time in ms at 448×448 on a
  GeForce RTX 3070, seven methods (the paper spells MCAR "MACR").

Figures are copied as printed. In Table IX the components do not always add up to the printed
total (ResNet-50 256: 8.2 + 9.1 + 14.3 = 31.6 vs 31.7; ResNet-50 448: 55.5 vs 55.4; ResNet-101 448:
82.9 vs 82.8): rounding in the paper, kept as is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperTable:
    """Where a table of figures comes from and what they measure."""

    key: str
    short: str
    paper: str
    table: str
    source: str
    hardware: str
    measure: str


MCAR_TABLE_IX = PaperTable(
    key="mcar-ix",
    short="MCAR",
    paper="MCAR: Learning to Discover Multi-Class Attentional Regions for Multi-Label Image Recognition "
    "(Gao & Zhou, TIP 2021)",
    table="Table IX",
    source="shared/papers/002_2112ec6cd3cda4d7.txt",
    hardware="NVIDIA Tesla P40 (cuDNN v7.4.1)",
    measure="average inference time per image, ms",
)

SRDL_TABLE_3 = PaperTable(
    key="srdl-3",
    short="SRDL",
    paper="SRDL: Semantic Representation and Dependency Learning for Multi-Label Image Recognition (Pu et al.)",
    table="Table 3",
    source="shared/papers/000_24bf399b3f1dd02f.txt",
    hardware="NVIDIA GeForce RTX 3070",
    measure="inference time, ms, 448×448 input, MS-COCO",
)

# MCAR's Table IX columns, in the paper's order, named as ``bench/latency.py`` names the components:
# the baseline network, then MCAR's total, global stream, global-to-local step, local stream.
TABLE_IX_COLUMNS = ("baseline", "total", "global", "g2l", "local")
TABLE_IX_HEADERS = {
    "baseline": "Baseline",
    "total": "Total",
    "global": "Global",
    "g2l": "G-to-L",
    "local": "Local",
}
TABLE_IX_BACKBONES = ("mobilenet_v2", "resnet50", "resnet101")
TABLE_IX_SIZES = (256, 448)

# (backbone, image size) -> column -> ms per image, P40.
TABLE_IX_MS: dict[tuple[str, int], dict[str, float]] = {
    ("mobilenet_v2", 256): {"baseline": 6.7, "total": 22.7, "global": 6.6, "g2l": 9.2, "local": 6.9},
    ("mobilenet_v2", 448): {"baseline": 6.9, "total": 34.3, "global": 6.9, "g2l": 13.0, "local": 14.4},
    ("resnet50", 256): {"baseline": 8.5, "total": 31.7, "global": 8.2, "g2l": 9.1, "local": 14.3},
    ("resnet50", 448): {"baseline": 11.2, "total": 55.4, "global": 11.1, "g2l": 13.2, "local": 31.2},
    ("resnet101", 256): {"baseline": 15.7, "total": 46.8, "global": 16.1, "g2l": 8.6, "local": 22.1},
    ("resnet101", 448): {"baseline": 18.4, "total": 82.8, "global": 18.8, "g2l": 13.5, "local": 50.6},
}


@dataclass(frozen=True)
class SRDLRow:
    """One row of SRDL Table 3: the paper's label, the fastmlr model and MCAR component that
    reproduce it, and the paper's time in ms."""

    label: str
    publication: str
    model: str
    component: str
    ms: float


# In the paper's order; publications as printed in the paper. The paper's table gives no backbone;
# its baseline row is ResNet-101 and the methods it compares are ResNet-101 models, so fastmlr times
# every row with ResNet-101 at 448.
SRDL_TABLE_3_ROWS: tuple[SRDLRow, ...] = (
    SRDLRow("ResNet-101", "", "baseline", "total", 31.54),
    SRDLRow("SSGRL", "ICCV 2021", "ssgrl", "total", 33.36),
    SRDLRow("ML-GCN", "CVPR 2021", "mlgcn", "total", 32.40),
    SRDLRow("P-GCN", "TPAMI 2021", "pgcn", "total", 32.33),
    SRDLRow("MACR (Global)", "TIP 2021", "mcar", "global", 32.48),
    SRDLRow("MACR (Global-local)", "TIP 2021", "mcar", "total", 123.47),
    SRDLRow("Ours (SRDL)", "", "srdl", "total", 32.58),
)
SRDL_TABLE_3_BACKBONE = "resnet101"
SRDL_TABLE_3_SIZE = 448


@dataclass(frozen=True)
class PaperFigure:
    """A paper's time for one thing fastmlr measures."""

    table: PaperTable
    label: str
    ms: float

    def cite(self) -> str:
        """E.g. ``"18.4 (MCAR Table IX, NVIDIA Tesla P40 (cuDNN v7.4.1))"``."""
        return f"{self.ms:g} ({self.table.short} {self.table.table}, {self.table.hardware})"

    def as_dict(self) -> dict:
        return {"table": self.table.key, "label": self.label, "ms": self.ms, "hardware": self.table.hardware}


def paper_figures(model: str, component: str, backbone: str, size: int) -> list[PaperFigure]:
    """Every paper figure for ``model``'s ``component`` (``"total"`` for a whole model; MCAR also
    ``"global"``, ``"g2l"``, ``"local"``) with ``backbone`` at ``size``×``size``; empty if none.

    Table IX covers ``baseline`` (its "Baseline" column) and ``mcar``'s four columns; Table 3
    covers its rows at ResNet-101 / 448.
    """
    figures = []
    row = TABLE_IX_MS.get((backbone, size))
    if row is not None:
        column = "baseline" if (model, component) == ("baseline", "total") else component if model == "mcar" else None
        if column in row:
            label = f"{backbone} {size}x{size} {TABLE_IX_HEADERS[column]}"
            figures.append(PaperFigure(MCAR_TABLE_IX, label, row[column]))
    if (backbone, size) == (SRDL_TABLE_3_BACKBONE, SRDL_TABLE_3_SIZE):
        figures += [
            PaperFigure(SRDL_TABLE_3, r.label, r.ms)
            for r in SRDL_TABLE_3_ROWS
            if (r.model, r.component) == (model, component)
        ]
    return figures


def table_metadata() -> list[dict]:
    """The source of every table here, for a result's JSON."""
    return [vars(t).copy() for t in (MCAR_TABLE_IX, SRDL_TABLE_3)]
