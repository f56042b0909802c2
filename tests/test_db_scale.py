"""bench/db_scale.py runs, at a tiny size, against the PostgreSQL server: every query
the node makes at scale is exercised through the node's functions, with and without
migration 0010's indexes (the figures at full size are in docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_scale_benchmark_runs_small(postgres_admin_url: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "db_scale.py"), "--studies", "400",
         "--instances", "20000", "--repeats", "1", "--url", postgres_admin_url,
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "db_scale.json").read_text())
    counts = report["counts"]
    assert counts["studies"] == 400 and counts["series"] == 1200
    assert 19_000 <= counts["instances"] <= 21_000
    assert set(report["with_0010"]) == set(report["without_0010"])
    assert len(report["with_0010"]) >= 20
    plans = (tmp_path / "db_scale_plans.txt").read_text()
    assert "studies by calling AE" in plans and "Planning Time" in plans
