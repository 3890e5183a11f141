"""Lets ``python bench/<script>.py`` import the :mod:`bench` package: a script's own directory is
first on ``sys.path``, the repository root (the package's parent) is not."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)
