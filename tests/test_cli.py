"""The pacsnode command line: send, echo, studies, study, db upgrade."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine, inspect

from db.migrate import head_revision
from tests.conftest import NodeProcess, free_port, make_series

HEAD = head_revision()


def test_send_folder_with_summary_and_failures(sqlite_node: NodeProcess, tmp_path: Path) -> None:
    series = make_series(tmp_path / "in", slices=5)
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    result = sqlite_node.cli(
        "send", str(tmp_path / "in"), "--port", str(sqlite_node.port), "--json", check=False
    )
    assert result.returncode == 1  # one failure
    summary = json.loads(result.stdout)
    assert summary["sent"] == 5
    assert summary["failed"] == 1
    assert summary["failures"][0]["path"].endswith("notes.txt")
    assert "not a readable DICOM file" in summary["failures"][0]["reason"]
    study = sqlite_node.study(series.study_instance_uid)
    assert study["instances"] == 5
    assert study["associations"][0]["calling_ae"] == "PACSNODE_SCU"


def test_send_text_summary_and_progress(sqlite_node: NodeProcess, tmp_path: Path) -> None:
    series = make_series(tmp_path / "in", slices=3)
    result = sqlite_node.cli("send", *map(str, series.paths), "--port", str(sqlite_node.port))
    assert "3 sent, 0 failed" in result.stdout


def test_send_to_nobody_says_what_failed(tmp_path: Path, sqlite_node: NodeProcess) -> None:
    series = make_series(tmp_path / "in", slices=2)
    result = sqlite_node.cli("send", str(series.paths[0]), "--port", str(free_port()), check=False)
    assert result.returncode == 1
    assert "cannot connect to PACSNODE@127.0.0.1" in result.stdout
    missing = sqlite_node.cli("send", str(tmp_path / "nope"), check=False)
    assert missing.returncode == 2
    assert "no such file or folder" in missing.stderr


def test_send_with_wrong_called_ae(sqlite_node: NodeProcess, tmp_path: Path) -> None:
    series = make_series(tmp_path / "in", slices=1)
    result = sqlite_node.cli("send", str(series.paths[0]), "--called-ae", "OTHER", check=False)
    assert result.returncode == 1
    assert "association rejected" in result.stdout


def test_echo(sqlite_node: NodeProcess) -> None:
    assert "status 0x0000" in sqlite_node.cli("echo").stdout
    down = sqlite_node.cli("echo", "--port", str(free_port()), check=False)
    assert down.returncode == 2
    assert "cannot connect" in down.stderr


def test_studies_and_study_json(sqlite_node: NodeProcess, tmp_path: Path) -> None:
    assert sqlite_node.studies() == []
    assert "no studies" in sqlite_node.cli("studies").stdout
    series = make_series(tmp_path / "in", slices=2)
    sqlite_node.cli("send", str(tmp_path / "in"))
    table = sqlite_node.cli("studies").stdout
    assert series.study_instance_uid in table
    text = sqlite_node.cli("study", series.study_instance_uid).stdout
    assert "PHANTOM-001" in text and "receiving" in text
    unknown = sqlite_node.cli("study", "1.2.3.4", check=False)
    assert unknown.returncode == 2
    assert "no study with Study Instance UID 1.2.3.4" in unknown.stderr


def test_db_upgrade_on_sqlite_and_postgres(tmp_path: Path, db_url: str) -> None:
    def run() -> str:
        result = subprocess.run(
            [sys.executable, "-m", "node.cli", "db", "upgrade"],
            env={"PACSNODE__DATABASE__URL": db_url, "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert f"upgraded from empty to revision {HEAD}" in run()
    assert f"already at revision {HEAD}" in run()
    engine = create_engine(db_url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"associations", "patients", "studies", "series", "instances", "study_events",
            "jobs", "results", "deliveries"} <= tables


def test_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "studies"],
        env={"PACSNODE__DATABASE__URL": f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/x",
             "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "database error" in result.stderr and "check database.url" in result.stderr
    assert "Traceback" not in result.stderr


def test_database_at_an_older_schema_is_refused(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config

    from db.migrate import MIGRATIONS
    from db.session import make_engine

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    command.upgrade(config, "0001")
    engine.dispose()
    env = {"PACSNODE__DATABASE__URL": url, "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "node.cli", "studies"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "run 'pacsnode db upgrade' first" in result.stderr
    upgrade = subprocess.run([sys.executable, "-m", "node.cli", "db", "upgrade"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert f"upgraded from 0001 to revision {HEAD}" in upgrade.stdout
