"""``/metrics``' instance count and stored bytes: exact at every scrape, across the
paths that change instance rows, while a scrape reads only the rows that arrived since
the last one (it counted and summed every instance row: ~1 s at 10 million)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from db.migrate import upgrade
from db.session import make_engine
from db.tables import utcnow
from node.web.metrics import SETTLE_S, DatabaseCollector
from tests.catalogue import one_series

NOW = utcnow()
OLD = NOW - timedelta(seconds=2 * SETTLE_S)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    upgrade(engine)
    one_series(engine, "receiving", OLD)
    yield engine
    engine.dispose()


def _association(engine: Engine, outcome: str, ended: Any = None) -> int:
    with engine.begin() as conn:
        return int(conn.execute(text(
            "INSERT INTO associations (calling_ae, called_ae, peer_host, peer_port, started_at, "
            "ended_at, instances_stored, instances_duplicate, instances_failed, outcome, tls) "
            "VALUES ('SCU', 'PACSNODE', 'h', 1, :t, :e, 0, 0, 0, :o, false) RETURNING id"),
            {"t": OLD, "e": ended, "o": outcome}).scalar_one())


def _instances(engine: Engine, association: int | None, count: int, at: Any,
               size: int = 100) -> list[int]:
    ids = []
    with engine.begin() as conn:
        for _ in range(count):
            number = conn.execute(text("SELECT count(*) FROM instances")).scalar_one()
            ids.append(int(conn.execute(text(
                "INSERT INTO instances (sop_instance_uid, sop_class_uid, series_fk, "
                "transfer_syntax_uid, file_path, file_size, received_at, association_fk) "
                "VALUES (:uid, '1.2', 1, '1.2', 'x', :size, :t, :a) RETURNING id"),
                {"uid": f"1.2.1.{number}.{len(ids)}", "size": size, "t": at,
                 "a": association}).scalar_one()))
    return ids


def _scrape(collector: DatabaseCollector) -> tuple[int, int]:
    families = {family.name: family for family in collector.collect()}
    return (int(families["pacsnode_instances"].samples[0].value),
            int(families["pacsnode_stored_bytes"].samples[0].value))


def _truth(engine: Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        count, size = conn.execute(text(
            "SELECT count(*), coalesce(sum(file_size), 0) FROM instances")).one()
    return int(count), int(size)


def test_counts_stay_exact_through_arrivals_removals_and_resizes(engine: Engine) -> None:
    collector = DatabaseCollector(engine)
    assert _scrape(collector) == (0, 0)
    closed = _association(engine, "released", OLD)
    _instances(engine, closed, 5, OLD)
    assert _scrape(collector) == _truth(engine) == (5, 500)
    # An association still open (or just interrupted) may take rows back or resize them,
    # however old they are; a fresh row may change too.
    open_one = _association(engine, "open")
    kept, resized, removed = _instances(engine, open_one, 3, OLD)
    dead = _association(engine, "interrupted", NOW)
    (dropped,) = _instances(engine, dead, 1, OLD)
    (fresh,) = _instances(engine, closed, 1, NOW)
    assert _scrape(collector) == _truth(engine) == (10, 1000)
    with engine.begin() as conn:
        conn.execute(text("UPDATE instances SET file_size = 7 WHERE id = :i"), {"i": resized})
        conn.execute(text("DELETE FROM instances WHERE id IN (:a, :b, :c)"),
                     {"a": removed, "b": dropped, "c": fresh})
    assert _scrape(collector) == _truth(engine) == (7, 607)
    another = DatabaseCollector(engine)  # another process sharing the database
    assert _scrape(another) == _scrape(collector) == (7, 607)


def test_a_scrape_reads_only_the_rows_after_the_settled_ones(engine: Engine) -> None:
    closed = _association(engine, "released", OLD)
    settled = _instances(engine, closed, 20, OLD)
    collector = DatabaseCollector(engine)
    assert _scrape(collector) == (20, 2000)
    sent: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, sql: str, parameters: Any, *_args: Any) -> None:
        sent.append((sql, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        assert _scrape(collector) == (20, 2000)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    counts = [(sql, params) for sql, params in sent
              if "count(instances.id)" in sql.replace('"', "")]
    assert counts, "the instances were not counted"
    for sql, params in counts:
        assert "instances.id >" in sql, sql  # a primary-key range, never the whole table
        values = params.values() if isinstance(params, dict) else params
        assert max(settled) in values, (sql, params)  # above the rows counted before
