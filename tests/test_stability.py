"""Study stability: receiving -> stable after study.stable_age_s, reopened by late instances,
recovered after a restart."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from db.migrate import upgrade
from db.session import make_engine
from db.tables import utcnow
from node.ingest.header import InstanceHeader
from node.ingest.index import InstanceIndex
from node.workflow.stability import mark_stable
from tests.conftest import NodeProcess, make_series, require_tool

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
    assert node.study(series.study_instance_uid)["status"] == "receiving"

    stable = wait_for_status(node, series.study_instance_uid, "analyzed")
    assert stable["stable_at"] is not None
    assert stable["stable_at"] >= stable["last_received_at"]
    jobs = [s["analysis"] for s in stable["series"]]
    assert [(j["status"], j["reason"]) for j in jobs] == [("skipped", "no routes are configured")]

    node.storescu(series.paths[3])
    reopened = node.study(series.study_instance_uid)
    assert reopened["status"] == "receiving"
    assert reopened["stable_at"] is None
    assert reopened["instances"] == 4

    again = wait_for_status(node, series.study_instance_uid, "analyzed")
    transitions = [(e["from"], e["to"]) for e in again["events"]]
    assert transitions == [
        (None, "receiving"), *AFTER_STABLE, ("analyzed", "receiving"), *AFTER_STABLE,
    ]
    # The series changed (4 instances, not 3), so it was routed again.
    assert [j["instances"] for j in again["series"][0]["jobs"]] == [3, 4]


def test_stability_recovered_after_restart(make_node: Any, tmp_path: Path) -> None:
    require_tool("storescu")
    node = make_node(stable_age_s=2.0)
    series = make_series(tmp_path / "s", slices=3)
    node.storescu(*series.paths)
    node.kill()  # crash while the study is still receiving
    time.sleep(2.5)
    node.start()
    study = wait_for_status(node, series.study_instance_uid, "analyzed", timeout=10)
    assert study["instances"] == 3
