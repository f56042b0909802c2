"""A missing real peer skips a test on a developer's machine and fails it in CI.

Run through a small pytest session of its own in a subprocess, with a tool that does
not exist and a PostgreSQL URL where no server listens, so the outcome is the one a
machine without DCMTK or PostgreSQL would get.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
TOOL = "pacsnode-test-no-such-tool"

INNER_TESTS = f'''
from tests.conftest import require_tool


def test_tool() -> None:
    require_tool({TOOL!r})


def test_postgres(postgres_admin_url: str) -> None:
    pass
'''


def _run_inner(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    """pytest on INNER_TESTS with tests/conftest.py as a plugin (for its fixtures)."""
    test_file = tmp_path / "test_inner.py"
    test_file.write_text(INNER_TESTS)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(REPO)
    env["PACSNODE_TEST_POSTGRES"] = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/x"
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
         "-p", "tests.conftest", str(test_file)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


def test_missing_peers_skip_outside_ci(tmp_path: Path) -> None:
    result = _run_inner(tmp_path, ci=None)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "2 skipped" in output, output
    assert f"not installed: {TOOL} (run 'make test' to install)" in output
    assert "no PostgreSQL server at postgresql+psycopg://nobody@127.0.0.1:" in output
    assert "CI=true" not in output


def test_missing_peers_fail_in_ci(tmp_path: Path) -> None:
    result = _run_inner(tmp_path, ci="true")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output  # pytest's "tests failed"
    # The tool check fails the test; the PostgreSQL fixture errors it in set-up.
    assert "1 failed, 1 error" in output, output
    assert f"FAILED test_inner.py::test_tool - Failed: not installed: {TOOL}" in output, output
    assert "ERROR test_inner.py::test_postgres - Failed: no PostgreSQL server at" in output
    assert output.count("[CI=true: a missing peer fails the run]") >= 2, output
    assert "skipped" not in output


def test_only_ci_true_turns_skips_into_failures(tmp_path: Path) -> None:
    """CI=false (or any other value) is a developer's run: skips stay skips."""
    result = _run_inner(tmp_path, ci="false")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 skipped" in result.stdout
