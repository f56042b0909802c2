"""The outbox's claim of due deliveries, on SQLite and PostgreSQL: which rows, in which
order, with which counters and lease; and in a fixed number of statements whatever the
number claimed (it was two round trips per delivery)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from db.migrate import upgrade
from db.session import make_engine
from db.tables import utcnow
from node.leases import Lease
from node.workflow.outbox import BATCH, claim_due
from tests.catalogue import one_series

NOW = utcnow()
LEASE = Lease("11111111-2222-3333-4444-555555555555", 30)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    upgrade(engine)
    one_series(engine, "analyzed", NOW)
    yield engine
    engine.dispose()


def _job(engine: Engine, job_id: int, deliveries: list[dict[str, Any]]) -> list[int]:
    """A done job with one result per delivery (in that order); their delivery ids."""
    ids = []
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO jobs (id, study_fk, series_fk, destinations, status, "
                          "reason, instances, attempt, queued_at, timings) VALUES "
                          "(:j, 1, 1, '[]', 'done', '', 1, 1, :t, '{}')"), {"j": job_id, "t": NOW})
        for number, spec in enumerate(deliveries):
            result = conn.execute(text(
                "INSERT INTO results (job_fk, kind, file_path, created_at) VALUES "
                "(:j, :kind, :path, :t) RETURNING id"),
                {"j": job_id, "kind": "seg" if number == 0 else "sr",
                 "path": f"results/{job_id}/{number}.dcm", "t": NOW}).scalar_one()
            ids.append(conn.execute(text(
                "INSERT INTO deliveries (result_fk, destination, status, attempts, last_error, "
                "created_at, queued_at, next_attempt_at, commitment_requests) VALUES "
                "(:r, :dest, :status, :attempts, '', :t, :t, :due, 0) RETURNING id"),
                {"r": result, "dest": spec.get("destination", "pacs"),
                 "status": spec.get("status", "pending"), "attempts": spec.get("attempts", 0),
                 "t": NOW, "due": NOW + timedelta(seconds=spec.get("due_in_s", -1))}
            ).scalar_one())
    return ids


def _rows(engine: Engine, ids: list[int]) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(text(
            "SELECT id, status, attempts, owner, lease_until, last_attempt_at FROM deliveries "
            "ORDER BY id")) if row.id in ids]


def test_due_deliveries_are_claimed_in_result_order_and_sr_waits_for_its_seg(
        engine: Engine) -> None:
    seg, sr = _job(engine, 1, [{"attempts": 2}, {}])
    later_seg, held_sr = _job(engine, 2, [{"due_in_s": 60}, {}])  # the SR waits
    (elsewhere,) = _job(engine, 3, [{"destination": "other"}])
    (sent,) = _job(engine, 4, [{"status": "sent"}])
    claimed = claim_due(engine, "pacs", Path("/data"), NOW, LEASE)
    assert [(d.delivery_id, d.job_id, d.attempts, d.destination) for d in claimed] == [
        (seg, 1, 3, "pacs"), (sr, 1, 1, "pacs")]
    assert claimed[0].path == Path("/data/results/1/0.dcm")
    assert claimed[0].queued_at == NOW
    rows = {row["id"]: row for row in _rows(engine, [seg, sr, later_seg, held_sr, elsewhere,
                                                     sent])}
    for delivery in (seg, sr):
        assert rows[delivery]["status"] == "sending"
        assert rows[delivery]["owner"] == LEASE.owner
        assert rows[delivery]["lease_until"] is not None
        assert rows[delivery]["last_attempt_at"] is not None
    assert [rows[d]["status"] for d in (later_seg, held_sr, elsewhere, sent)] == [
        "pending", "pending", "pending", "sent"]
    assert rows[held_sr]["attempts"] == 0 and rows[held_sr]["owner"] is None
    with engine.connect() as conn:
        events = conn.execute(text("SELECT delivery_fk, from_status, to_status, reason "
                                   "FROM delivery_events ORDER BY id")).all()
    assert [tuple(e) for e in events] == [(seg, "pending", "sending", "attempt 3"),
                                          (sr, "pending", "sending", "attempt 1")]
    assert claim_due(engine, "pacs", Path("/data"), NOW, LEASE) == []  # claimed once


def test_the_probe_takes_the_oldest_pending_one_due_or_not(engine: Engine) -> None:
    seg, _sr = _job(engine, 1, [{"due_in_s": 600}, {"due_in_s": 600}])
    claimed = claim_due(engine, "pacs", Path("/data"), NOW, LEASE, probe=True)
    assert [(d.delivery_id, d.attempts) for d in claimed] == [(seg, 1)]
    with engine.connect() as conn:
        reason = conn.execute(text("SELECT reason FROM delivery_events")).scalar_one()
    assert reason == "attempt 1 (probe)"


def test_a_claim_is_a_few_statements_whatever_it_claims(engine: Engine) -> None:
    for job in range(1, 62):  # 122 due deliveries: one batch of BATCH, then the rest
        _job(engine, job, [{}, {}])
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    event.listen(engine, "before_cursor_execute", count)
    try:
        first = claim_due(engine, "pacs", Path("/data"), NOW, LEASE)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(first) == BATCH
    assert [d.delivery_id for d in first] == sorted(d.delivery_id for d in first)
    assert len(statements) <= 4, statements  # BEGIN, the claim, its events, (COMMIT)
    second = claim_due(engine, "pacs", Path("/data"), NOW, LEASE)
    assert len(second) == 122 - BATCH
    assert {d.delivery_id for d in first}.isdisjoint(d.delivery_id for d in second)
