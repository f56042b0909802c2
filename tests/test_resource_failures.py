"""When storage or the database fails, the node answers Out of Resources (0xA700).

A sender keeps an instance that was not answered Success and retries it later, so
the node must never answer Success for an instance it could not make safe, must leave
nothing half-done behind (no partial file, no file without its row, no staged copy),
and must store the instance when it is sent again after the resource is back.
"""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import NodeProcess, make_series

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700


# -- helpers ----------------------------------------------------------------------


@contextmanager
def association(node: NodeProcess, calling: str) -> Iterator[Association]:
    """An association to the node, opened with a C-ECHO (so its row is recorded first)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established, node.log()[-3000:]
    nodelay(assoc)
    try:
        echo = assoc.send_c_echo()
        assert echo and echo.Status == SUCCESS
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def nodelay(assoc: Association) -> None:
    """pynetdicom leaves Nagle's algorithm on: ~40 ms per C-STORE on loopback."""
    if assoc.dul.socket and assoc.dul.socket.socket:
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def store(assoc: Association, path: Path) -> tuple[int, str]:
    status = assoc.send_c_store(path)
    assert status, "no C-STORE response (association lost?)"
    return int(status.Status), str(status.get("ErrorComment", ""))


def rows(db_url: str) -> dict[str, tuple[str, int]]:
    """SOP Instance UID -> (file path, file size) of every instance row."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return {uid: (path, size) for uid, path, size in conn.execute(text(
                "SELECT sop_instance_uid, file_path, file_size FROM instances"))}
    finally:
        engine.dispose()


def leftovers(data_dir: Path) -> list[Path]:
    """Staged or temporary copies anywhere in the data folder."""
    return [p for p in data_dir.rglob("*") if p.is_file() and (
        p.suffix == ".tmp" or "incoming" in p.relative_to(data_dir).parts)]


def instance_file(node: NodeProcess, series: Any, sop: str) -> Path:
    return (node.data_dir / "studies" / series.study_instance_uid
            / series.series_instance_uid / f"{sop}.dcm")


# -- disk full --------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted at the end."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): "
                    f"{result.stderr.strip() or result.returncode}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_disk_full_answers_out_of_resources(make_node: Any, tmp_path: Path,
                                            small_disk: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'db' / 'pacsnode.db'}"
    node: NodeProcess = make_node(db_url=db_url, data_dir=small_disk)
    series = make_series(tmp_path / "ct", slices=100, size=128)  # ~3.3 MB for 2 MiB
    try:
        answers: dict[str, tuple[int, str]] = {}
        with association(node, "DISKFULL") as assoc:
            for path, sop in zip(series.paths, series.sop_instance_uids):
                answers[sop] = store(assoc, path)
            stored = [sop for sop, (status, _) in answers.items() if status == SUCCESS]
            refused = [sop for sop, (status, _) in answers.items() if status != SUCCESS]
            assert stored, "nothing fitted: the disk is too small for this test"
            assert refused, "everything fitted: the disk is too large for this test"
            for sop in refused:
                status, comment = answers[sop]
                assert (status, "storage" in comment) == (OUT_OF_RESOURCES, True), (sop, answers[sop])
            # The node keeps its association up and answers C-ECHO while the disk is full.
            echo = assoc.send_c_echo()
            assert echo and echo.Status == SUCCESS

        indexed = rows(db_url)
        assert set(indexed) == set(stored)
        originals = dict(zip(series.sop_instance_uids, series.paths))
        for sop in stored:  # complete on disk and indexed with the right file
            target = instance_file(node, series, sop)
            assert indexed[sop][0] == target.relative_to(node.data_dir).as_posix()
            assert indexed[sop][1] == target.stat().st_size
            assert dcmread(target).PixelData == dcmread(originals[sop]).PixelData
        for sop in refused:
            assert not instance_file(node, series, sop).exists(), sop
        assert leftovers(node.data_dir) == []
        assert [s["instances"] for s in node.studies()] == [len(stored)]
        logged = [line for line in node.log().splitlines() if ": refused instance " in line]
        assert len(logged) == len(refused) and all("0xA700" in line for line in logged)

        # Space comes back: the sender's retry stores what was refused.
        subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
        with association(node, "RETRY") as assoc:
            retried = {sop: store(assoc, originals[sop])[0] for sop in refused}
        assert set(retried.values()) == {SUCCESS}
        assert set(rows(db_url)) == set(series.sop_instance_uids)
        for sop in refused:
            assert dcmread(instance_file(node, series, sop)).PixelData == dcmread(
                originals[sop]).PixelData
        assert leftovers(node.data_dir) == []
    finally:
        node.stop()  # before the tmpfs is unmounted


# -- database unavailable ---------------------------------------------------------


def test_sqlite_locked_answers_out_of_resources(make_node: Any, tmp_path: Path) -> None:
    node: NodeProcess = make_node(extra_env={"PACSNODE__DATABASE__BUSY_TIMEOUT_S": "0.5"})
    db_path = Path(make_url(node.db_url).database or "")
    assert db_path.is_file()
    series = make_series(tmp_path / "ct", slices=3)
    first, locked_out, later = zip(series.paths, series.sop_instance_uids)

    with association(node, "LOCKED") as assoc:
        assert store(assoc, first[0]) == (SUCCESS, "")
        lock = sqlite3.connect(db_path, isolation_level=None, timeout=5)
        try:
            lock.execute("BEGIN EXCLUSIVE")
            started = time.monotonic()
            status, comment = store(assoc, locked_out[0])
            waited = time.monotonic() - started
            assert status == OUT_OF_RESOURCES, (hex(status), comment)
            assert "database" in comment, comment
            assert waited < 10, f"the node waited {waited:.1f} s with a 0.5 s busy timeout"
            # Nothing was left that the database does not know about.
            assert not instance_file(node, series, locked_out[1]).exists()
            assert leftovers(node.data_dir) == []
        finally:
            if lock.in_transaction:
                lock.execute("ROLLBACK")
            lock.close()
        assert instance_file(node, series, first[1]).is_file()
        assert set(rows(node.db_url)) == {first[1]}

        # The lock is gone: the retry on the same association is stored.
        assert store(assoc, locked_out[0]) == (SUCCESS, "")
    with association(node, "AFTER") as assoc:
        assert store(assoc, later[0]) == (SUCCESS, "")

    assert set(rows(node.db_url)) == set(series.sop_instance_uids)
    for path, sop in zip(series.paths, series.sop_instance_uids):
        assert dcmread(instance_file(node, series, sop)).PixelData == dcmread(path).PixelData
    assert leftovers(node.data_dir) == []
    assert [s["instances"] for s in node.studies()] == [3]


@pytest.mark.postgres
def test_postgres_refusing_connections_answers_out_of_resources(
    make_node: Any, tmp_path: Path, postgres_url: str, postgres_admin_url: str
) -> None:
    node: NodeProcess = make_node(db_url=postgres_url)
    name = make_url(postgres_url).database
    series = make_series(tmp_path / "ct", slices=3)
    first, refused, later = zip(series.paths, series.sop_instance_uids)
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")

    def allow(allowed: bool) -> None:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}'))
            if not allowed:  # and drop the node's open connections
                conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE datname = :n AND pid <> pg_backend_pid()"), {"n": name})

    try:
        with association(node, "PGDOWN") as assoc:
            assert store(assoc, first[0]) == (SUCCESS, "")
            allow(False)
            status, comment = store(assoc, refused[0])
            assert status == OUT_OF_RESOURCES, (hex(status), comment)
            assert "database" in comment, comment
            assert not instance_file(node, series, refused[1]).exists()
            assert leftovers(node.data_dir) == []
            allow(True)
            # The database is back: the retry on the same association is stored.
            assert store(assoc, refused[0]) == (SUCCESS, "")
        with association(node, "PGBACK") as assoc:
            assert store(assoc, later[0]) == (SUCCESS, "")
    finally:
        allow(True)
        admin.dispose()

    assert set(rows(node.db_url)) == set(series.sop_instance_uids)
    for path, sop in zip(series.paths, series.sop_instance_uids):
        assert dcmread(instance_file(node, series, sop)).PixelData == dcmread(path).PixelData
    assert leftovers(node.data_dir) == []
    logged = [line for line in node.log().splitlines() if ": refused instance " in line]
    assert len(logged) == 1 and "0xA700" in logged[0] and refused[1] in logged[0]
