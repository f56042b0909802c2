"""A generated catalogue: many studies written straight into a node's database, for
the search tests and the web benchmark (what a year of a busy CT department holds)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Engine, create_engine, insert, text

from db.tables import AssociationRecord, Instance, Patient, Series, Study

STATUSES = ("analyzed", "analyzed", "analyzed", "processing", "stable", "receiving")
SENDERS = ("CT1", "CT2", "MR1", "PACS")


def study_row(n: int) -> dict[str, Any]:
    """What the n-th generated study is (the tests predict matches from it)."""
    day = datetime(2025, 1, 1, tzinfo=timezone.utc) + timedelta(minutes=5 * n)
    return {"patient_id": f"P{n // 2:07d}", "patient_name": f"NAME{n // 2 % 997:03d}^GIVEN{n // 2}",
            "accession": f"A{n:08d}", "study_date": day.strftime("%Y%m%d"), "at": day,
            "status": STATUSES[n % len(STATUSES)], "sender": n % len(SENDERS)}


def fill(db_url: str, count: int, batch: int = 10_000) -> None:
    """``count`` studies of one CT series with one instance each; two studies per
    patient; senders by association."""
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(insert(AssociationRecord), [
            {"id": i + 1, "calling_ae": ae, "called_ae": "PACSNODE", "peer_host": "127.0.0.1",
             "peer_port": 1000 + i, "started_at": datetime.now(timezone.utc),
             "instances_stored": 0, "instances_duplicate": 0, "instances_failed": 0,
             "outcome": "released", "tls": False} for i, ae in enumerate(SENDERS)])
        for start in range(0, count, batch):
            rows = [study_row(n) for n in range(start, min(start + batch, count))]
            patients = [{"id": n // 2 + 1, "patient_id": r["patient_id"], "issuer": "",
                         "patient_name": r["patient_name"], "birth_date": "", "sex": ""}
                        for n, r in zip(range(start, start + len(rows)), rows, strict=True)
                        if n % 2 == 0]
            conn.execute(insert(Patient), patients)
            conn.execute(insert(Study), [
                {"id": n + 1, "study_instance_uid": f"1.2.826.0.1.3680043.10.1.{n}",
                 "patient_fk": n // 2 + 1, "study_date": r["study_date"], "study_time": "",
                 "accession_number": r["accession"], "study_description": f"CT {n}",
                 "status": r["status"], "received_at": r["at"], "last_received_at": r["at"]}
                for n, r in zip(range(start, start + len(rows)), rows, strict=True)])
            conn.execute(insert(Series), [
                {"id": n + 1, "series_instance_uid": f"1.2.826.0.1.3680043.10.2.{n}",
                 "study_fk": n + 1, "modality": "CT", "series_number": 1,
                 "series_description": "", "body_part_examined": "CHEST",
                 "received_at": r["at"]}
                for n, r in zip(range(start, start + len(rows)), rows, strict=True)])
            conn.execute(insert(Instance), [
                {"sop_instance_uid": f"1.2.826.0.1.3680043.10.3.{n}",
                 "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "series_fk": n + 1,
                 "instance_number": 1, "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                 "file_path": "x", "file_size": 1000, "received_at": r["at"],
                 "association_fk": r["sender"] + 1}
                for n, r in zip(range(start, start + len(rows)), rows, strict=True)])
    engine.dispose()


def one_series(engine: Engine, status: str, at: datetime) -> None:
    """Patient 1, study 1 (in ``status``, received ``at``) and its CT series 1: what a
    test of instances, jobs or deliveries hangs its rows on."""
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO patients (id, patient_id, issuer, patient_name, "
                          "birth_date, sex) VALUES (1, 'P', '', '', '', '')"))
        conn.execute(text("INSERT INTO studies (id, study_instance_uid, patient_fk, study_date, "
                          "study_time, accession_number, study_description, status, "
                          "received_at, last_received_at) VALUES (1, '1.2', 1, '', '', '', "
                          "'', :status, :t, :t)"), {"status": status, "t": at})
        conn.execute(text("INSERT INTO series (id, series_instance_uid, study_fk, modality, "
                          "series_description, body_part_examined, received_at) VALUES "
                          "(1, '1.2.1', 1, 'CT', '', '', :t)"), {"t": at})
