"""SIGKILL in the middle of a transfer: nothing the node acknowledged may be lost.

The node answers Success only once the file is fsync'ed in place and its row is
committed. Here storescu sends a 100-slice series, the node is killed (SIGKILL, no
clean-up code runs) once some instances were acknowledged, and after a restart on the
same data folder and database every acknowledged instance must be there, on disk and
indexed. Sending the whole series again must then complete it, each instance once.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy import create_engine, text

from tests.conftest import NodeProcess, dcmtk_env, make_series, query, require_tool

SLICES = 100
KILL_AFTER = 20  # acknowledged instances

_FILE = re.compile(r"Sending file: (.+)$")
_REQUEST = re.compile(r"Sending Store Request \(MsgID (\d+),")
_RESPONSE = re.compile(r"Received Store Response \((.+)\)")


def acknowledged(storescu_log: str) -> list[Path]:
    """The files storescu saw answered Success, in order.

    storescu (verbose) logs ``Sending file: F``, then ``Sending Store Request (MsgID
    n, ..)``, then ``Received Store Response (status)``; it waits for each response
    before sending the next request, so a response answers the latest request.
    """
    current: Path | None = None
    pending: tuple[int, Path] | None = None
    message_ids: list[int] = []
    done: list[Path] = []
    for line in storescu_log.splitlines():
        if match := _FILE.search(line):
            current = Path(match.group(1).strip())
        elif match := _REQUEST.search(line):
            assert current is not None, line
            pending = (int(match.group(1)), current)
            message_ids.append(pending[0])
        elif match := _RESPONSE.search(line):
            assert pending is not None, line
            if match.group(1) == "Success":
                done.append(pending[1])
            pending = None
    assert message_ids == list(range(1, len(message_ids) + 1)), message_ids
    return done


def indexed(db_url: str) -> dict[str, str]:
    """SOP Instance UID -> file path of every instance row, read from the database."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return dict(conn.execute(text(
                "SELECT sop_instance_uid, file_path FROM instances")).all())
    finally:
        engine.dispose()


def test_sigkill_mid_transfer_loses_no_acknowledged_instance(
    make_node: Any, db_url: str, tmp_path: Path
) -> None:
    require_tool("storescu")
    series = make_series(tmp_path / "ct", slices=SLICES, size=128)
    by_path = dict(zip(series.paths, series.sop_instance_uids))
    # A short lease: the dead process's association is taken over 2 s after it died.
    node: NodeProcess = make_node(db_url=db_url, extra_env={"PACSNODE__JOBS__LEASE_S": "2"})

    log_path = tmp_path / "storescu.log"
    with log_path.open("w") as log:
        sender = subprocess.Popen(
            ["storescu", "-v", "-aet", "CRASHTEST", "-aec", node.ae_title, "127.0.0.1",
             str(node.port), *map(str, series.paths)],
            env=dcmtk_env(), stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while log_path.read_text().count("Received Store Response (Success)") < KILL_AFTER:
                assert sender.poll() is None, f"storescu ended early:\n{log_path.read_text()}"
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.002)
            node.kill()
            sender.wait(timeout=60)
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.wait()
    acked = acknowledged(log_path.read_text())
    assert len(acked) >= KILL_AFTER
    assert len(acked) < SLICES, "the transfer finished before the kill: nothing was tested"
    assert sender.returncode != 0, "storescu did not notice the node was gone"
    assert acked == series.paths[: len(acked)]  # in command-line order
    acked_uids = [by_path[p] for p in acked]

    # Restart on the same data folder, database and port. The dead process's open
    # association (and the rows it never acknowledged) are taken over once its lease
    # expires: no host or PID tells the new process that the old one is gone.
    node.start()
    deadline = time.monotonic() + 20
    while query(node.db_url, "SELECT outcome FROM associations") != [{"outcome": "interrupted"}]:
        assert time.monotonic() < deadline, query(node.db_url, "SELECT * FROM associations")
        time.sleep(0.2)

    # Every acknowledged instance is on disk, complete, with the pixels that were sent.
    folder = node.data_dir / "studies" / series.study_instance_uid / series.series_instance_uid
    for path, uid in zip(acked, acked_uids):
        stored = folder / f"{uid}.dcm"
        assert stored.is_file(), f"acknowledged {path.name} ({uid}) lost"
        copy, original = dcmread(stored), dcmread(path)
        assert copy.SOPInstanceUID == uid
        assert copy.PixelData == original.PixelData, f"{path.name} stored incomplete"

    # ... and indexed; and every row the database kept has its file.
    rows = indexed(node.db_url)
    assert set(acked_uids) <= set(rows), sorted(set(acked_uids) - set(rows))
    for uid, relative in rows.items():
        assert (node.data_dir / relative).is_file(), f"indexed {uid} has no file"
    studies = node.studies()
    assert [s["study_instance_uid"] for s in studies] == [series.study_instance_uid]
    assert studies[0]["instances"] == len(rows) >= len(acked)
    detail = node.study(series.study_instance_uid)
    assert detail["instances"] == len(rows)
    # The killed association is recorded as interrupted, not left open forever.
    assert [a["outcome"] for a in detail["associations"]] == ["interrupted"]
    assert detail["associations"][0]["instances_of_this_study"] == len(rows)

    # Sending everything again completes the series, each instance exactly once.
    result = node.storescu(*series.paths, calling="RESEND")
    output = result.stdout + result.stderr
    assert output.count("Received Store Response (Success)") == SLICES, output
    rows = indexed(node.db_url)
    assert set(rows) == set(series.sop_instance_uids)
    dcm_files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    assert dcm_files == sorted(folder / f"{uid}.dcm" for uid in series.sop_instance_uids)
    for path, uid in by_path.items():
        assert dcmread(folder / f"{uid}.dcm").PixelData == dcmread(path).PixelData
    studies = node.studies()
    assert [(s["study_instance_uid"], s["instances"]) for s in studies] == [
        (series.study_instance_uid, SLICES)]
    assert [sr["instances"] for sr in studies[0]["series"]] == [SLICES]
