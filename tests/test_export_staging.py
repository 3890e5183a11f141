"""An export killed before it could clean up (SIGKILL) leaves its staging directory; the next export
beside it removes it, and never one of a process still running."""

from __future__ import annotations

import os
import subprocess
import sys

from fastmlr.export.onnx_export import STAGING_PREFIX, staging_directory


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_next_export_removes_stale_staging_directories(tmp_path) -> None:
    stale = tmp_path / f"{STAGING_PREFIX}{dead_pid()}-abc123"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"unvalidated graph")
    running = tmp_path / f"{STAGING_PREFIX}{os.getppid()}-def456"  # a live process's export
    running.mkdir()
    with staging_directory(tmp_path / "model.onnx") as staging:
        assert os.path.basename(staging).startswith(f"{STAGING_PREFIX}{os.getpid()}-")
        assert not stale.exists() and running.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name]
