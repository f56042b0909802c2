"""Study stability: receiving -> stable after study.stable_age_s, reopened by late instances,
recovered after a restart."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from db.migrate import upgrade
from db.session import make_engine
from db.tables import utcnow
from node.ingest.header import InstanceHeader
from node.ingest.index import InstanceIndex
from node.workflow.stability import mark_stable
from tests.conftest import NodeProcess, make_series, query, require_tool

#: Where a stable study goes without routes: its series are skipped and it is analyzed.
AFTER_STABLE = [("receiving", "stable"), ("stable", "processing"), ("processing", "analyzed")]


def wait_for_status(node: NodeProcess, uid: str, status: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        study = node.study(uid)
        if study["status"] == status:
            return study
        time.sleep(0.2)
    raise AssertionError(f"study {uid} never became {status}: {node.study(uid)}")


def _state(node: NodeProcess, uid: str) -> tuple[str, Any]:
    """(status, stable_at) read straight from the database: a ``pacsnode study`` process
    can take longer to start than the 1 s quiet period on a busy machine."""
    (row,) = query(node.db_url, "select status, stable_at from studies "
                   "where study_instance_uid = :uid", uid=uid)
    return row["status"], row["stable_at"]


def _header(sop: str, study: str = "1.2.3") -> InstanceHeader:
    return InstanceHeader(
        "1.2.840.10008.5.1.4.1.1.2", sop, study, study + ".1", "P1", "", "Doe^J", "", "",
        "", "", "", "", "CT", 1, "", "", 1,
    )


def test_mark_stable_uses_the_quiet_period(tmp_path: Path, db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    index = InstanceIndex(engine)
    start = utcnow()
    index.record(_header("1.2.3.1.1"), "a", 1, "1.2.840.10008.1.2.1", None, start)

    assert mark_stable(engine, 10, now=start + timedelta(seconds=9)) == []
    assert mark_stable(engine, 10, now=start + timedelta(seconds=10)) == ["1.2.3"]
    assert mark_stable(engine, 10, now=start + timedelta(seconds=60)) == []  # only once

    # A late instance reopens the study and restarts the clock.
    late = start + timedelta(seconds=100)
    index.record(_header("1.2.3.1.2"), "b", 1, "1.2.840.10008.1.2.1", None, late)
    assert mark_stable(engine, 10, now=late + timedelta(seconds=5)) == []
    assert mark_stable(engine, 10, now=late + timedelta(seconds=10)) == ["1.2.3"]
    engine.dispose()


def test_node_marks_stable_and_reopens(make_node: Any, tmp_path: Path) -> None:
    require_tool("storescu")
    node = make_node(stable_age_s=1.0)
    series = make_series(tmp_path / "s", slices=4)
    node.storescu(*series.paths[:3])
    assert _state(node, series.study_instance_uid) == ("receiving", None)

    stable = wait_for_status(node, series.study_instance_uid, "analyzed")
    assert stable["stable_at"] is not None
    assert stable["stable_at"] >= stable["last_received_at"]
    jobs = [s["analysis"] for s in stable["series"]]
    assert [(j["status"], j["reason"]) for j in jobs] == [("skipped", "no routes are configured")]

    node.storescu(series.paths[3])
    assert _state(node, series.study_instance_uid) == ("receiving", None)
    assert node.study(series.study_instance_uid)["instances"] == 4

    again = wait_for_status(node, series.study_instance_uid, "analyzed")
    transitions = [(e["from"], e["to"]) for e in again["events"]]
    assert transitions == [
        (None, "receiving"), *AFTER_STABLE, ("analyzed", "receiving"), *AFTER_STABLE,
    ]
    # The series changed (4 instances, not 3), so it was routed again.
    assert [j["instances"] for j in again["series"][0]["jobs"]] == [3, 4]


def test_stability_recovered_after_restart(make_node: Any, tmp_path: Path) -> None:
    """A study that went quiet while the node was down is made stable by the restarted
    node, from the database alone (the killed one never had the chance)."""
    require_tool("storescu")
    node = make_node(stable_age_s=2.0)
    series = make_series(tmp_path / "s", slices=3)
    node.storescu(*series.paths)
    node.kill()  # crash while the study is still receiving
    # Read with the node down: nothing can change the study any more until the restart.
    before = node.study(series.study_instance_uid)
    assert (before["status"], before["stable_at"]) == ("receiving", None), before
    time.sleep(2.5)  # the quiet period ends while no node runs
    restarted_at = datetime.now(timezone.utc)
    node.start()
    study = wait_for_status(node, series.study_instance_uid, "analyzed", timeout=10)
    assert study["instances"] == 3
    assert datetime.fromisoformat(study["stable_at"]) >= restarted_at, (restarted_at, study)
    # The restart left the study's clock alone: it was quiet since its last instance.
    assert study["last_received_at"] == before["last_received_at"]
    transitions = [(e["from"], e["to"]) for e in study["events"]]
    assert transitions == [(None, "receiving"), *AFTER_STABLE]
    assert datetime.fromisoformat(study["events"][1]["at"]) >= restarted_at
