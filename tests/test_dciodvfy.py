"""Every DICOM object this project writes passes dicom3tools' dciodvfy without errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import NodeProcess, make_series, require_tool


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def test_synthetic_series_and_stored_copies_are_valid(sqlite_node: NodeProcess, tmp_path: Path) -> None:
    require_tool("dciodvfy", "storescu")
    series = make_series(tmp_path / "ct", slices=2)
    for path in series.paths:
        assert dciodvfy_errors(path) == [], path
    sqlite_node.storescu(*series.paths)
    stored = sorted((sqlite_node.data_dir / "studies").rglob("*.dcm"))
    assert len(stored) == 2
    for path in stored:  # our file meta in front of the received dataset
        assert dciodvfy_errors(path) == [], path
