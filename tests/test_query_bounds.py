"""No statement binds one parameter per row of a table: PostgreSQL refuses more than
65,535 bind parameters in one statement, so such a query works in tests and fails on
a large catalogue (``pacsnode studies`` did, past 65,535 studies)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, text

from db.migrate import upgrade
from db.session import make_engine
from node.audit_queries import list_studies


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def _add_studies(engine: Engine, count: int) -> None:
    """``count`` studies of one patient, each with one series of two instances."""
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO patients (id, patient_id, issuer, patient_name, "
                          "birth_date, sex) VALUES (1, 'P1', '', 'DOE^J', '', '')"))
        for number in range(1, count + 1):
            conn.execute(text(
                "INSERT INTO studies (id, study_instance_uid, patient_fk, study_date, "
                "study_time, accession_number, study_description, status, received_at, "
                "last_received_at) VALUES (:n, :uid, 1, '', '', '', '', 'receiving', "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"), {"n": number, "uid": f"1.2.{number}"})
            conn.execute(text(
                "INSERT INTO series (id, series_instance_uid, study_fk, modality, "
                "series_description, body_part_examined, received_at) VALUES "
                "(:n, :uid, :n, 'CT', '', '', CURRENT_TIMESTAMP)"),
                {"n": number, "uid": f"1.2.{number}.1"})
            for instance in (1, 2):
                conn.execute(text(
                    "INSERT INTO instances (sop_instance_uid, sop_class_uid, series_fk, "
                    "transfer_syntax_uid, file_path, file_size, received_at) VALUES "
                    "(:uid, '1.2', :n, '1.2', 'x', 10, CURRENT_TIMESTAMP)"),
                    {"uid": f"1.2.{number}.1.{instance}", "n": number})


def _most_parameters(engine: Engine, call: Any) -> int:
    """The largest number of bind parameters of one statement ``call`` sends."""
    most = [0]

    def count(_conn: Any, _cursor: Any, _sql: str, parameters: Any, _context: Any,
              _many: bool) -> None:
        most[0] = max(most[0], len(parameters or ()))

    event.listen(engine, "before_cursor_execute", count)
    try:
        call()
    finally:
        event.remove(engine, "before_cursor_execute", count)
    return most[0]


def test_listing_studies_binds_no_parameter_per_study(engine: Engine) -> None:
    _add_studies(engine, 30)
    studies = list_studies(engine)
    assert len(studies) == 30
    assert all(study["instances"] == 2 and len(study["series"]) == 1 for study in studies)
    assert studies[0]["results"] == {"jobs": {}, "results": 0, "deliveries": {}}
    assert _most_parameters(engine, lambda: list_studies(engine)) < 30


@pytest.mark.postgres
def test_listing_more_studies_than_postgresql_takes_parameters(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    upgrade(engine)
    studies = 70_000
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO patients (id, patient_id, issuer, patient_name, "
                          "birth_date, sex) VALUES (1, 'P1', '', 'DOE^J', '', '')"))
        conn.execute(text(
            "INSERT INTO studies (id, study_instance_uid, patient_fk, study_date, study_time, "
            "accession_number, study_description, status, received_at, last_received_at) "
            "SELECT g, '1.2.' || g, 1, '', '', '', '', 'receiving', now(), now() "
            "FROM generate_series(1, :n) g"), {"n": studies})
    try:
        assert len(list_studies(engine)) == studies
    finally:
        engine.dispose()


def test_lists_of_ids_of_any_length_are_asked_for_in_batches(engine: Engine) -> None:
    """On PostgreSQL, 70,000 ids in one statement fail (SQLite as built here takes them)."""
    from db.tables import utcnow
    from node.delivery_queries import delivery_events
    from node.ingest.index import InstanceIndex
    from node.workflow.outbox import ResendError, resend

    _add_studies(engine, 1)
    with engine.begin() as conn:
        conn.execute(text("UPDATE instances SET association_fk = NULL"))
    many = list(range(1, 70_001))
    assert InstanceIndex(engine).drop_unfiled(many, lambda _path: False) == []
    with engine.connect() as conn:
        assert delivery_events(conn, many) == {}
    with pytest.raises(ResendError, match="no delivery with id 1, 2, 3"):
        resend(engine, utcnow(), ids=many)
