"""Engines and sessions for SQLite (embedded default) and PostgreSQL (scale-out)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url


def make_engine(url: str, busy_timeout_s: float = 10.0, file_mode: int | None = None) -> Engine:
    """Create an engine with the settings durability needs.

    SQLite runs in WAL mode with ``synchronous=FULL`` so that a commit is on disk when
    it returns (the SCP acknowledges only after that), and opens write transactions
    with ``BEGIN IMMEDIATE`` so concurrent writers wait on the busy timeout instead of
    failing on a lock upgrade. With ``file_mode`` a new SQLite file is created with that
    mode; SQLite gives its -wal and -shm files the database file's mode.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)

    database = parsed.database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        if file_mode is not None and not Path(database).exists():
            os.close(os.open(database, os.O_WRONLY | os.O_CREAT, file_mode))
            os.chmod(database, file_mode)
    engine = create_engine(
        url, connect_args={"timeout": busy_timeout_s, "check_same_thread": False}
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from the sqlite3 module so BEGIN IMMEDIATE works.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Readers (execution option readonly=True) must not take the write lock.
        readonly = conn.get_execution_options().get("readonly", False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

    return engine

