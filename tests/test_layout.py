"""The shape of the code: a folder per stage as the README says, small modules, and a
receiving process that imports no TensorFlow, training or phantom code."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("node", "analysis", "db")
MAX_LINES = 600


def modules() -> list[Path]:
    return sorted(p for package in (*PACKAGES, "bench") for p in (ROOT / package).rglob("*.py")
                  if "migrations" not in p.parts)


def test_no_module_is_over_600_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in modules()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by what they do: {long}"


def test_the_readme_layout_matches_the_tree() -> None:
    readme = (ROOT / "README.md").read_text()
    folders = {str(p.parent.relative_to(ROOT)) for package in PACKAGES
               for p in (ROOT / package).rglob("__init__.py")}
    unnamed = sorted(f for f in folders if f"`{f}/`" not in readme)
    assert not unnamed, f"README's layout does not name {unnamed}"
    named = set(re.findall(r"`((?:node|analysis|db)/[\w/]+\.py)`", readme))
    assert named, "the README names no module"
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, f"README names modules that do not exist: {missing}"


def test_a_serving_process_imports_no_tensorflow_training_or_phantoms(tmp_path: Path) -> None:
    """The default configuration routes CT to the CNN pipeline: its workers load
    TensorFlow, the process that receives does not."""
    script = textwrap.dedent(f"""
        import json, sys
        from node.app import Node
        from node.config import Settings
        settings = Settings.model_validate({{
            "node": {{"host": "127.0.0.1", "port": {free_port()}}},
            "storage": {{"data_dir": {str(tmp_path / "var")!r}}},
            "web": {{"port": 0}},
        }})
        assert settings.routes, "the default configuration has a route"
        node = Node(settings)
        node.start()
        loaded = sorted(m for m in sys.modules
                        if m.split(".")[0] in ("tensorflow", "keras")
                        or m.startswith(("analysis.training", "analysis.phantoms")))
        node.stop()
        print(json.dumps(loaded))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []
