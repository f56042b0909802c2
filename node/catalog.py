"""What the node holds, as plain data for the CLI (and later the REST API)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from db.models import AssociationRecord, Instance, Patient, Series, Study, StudyEvent


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


@contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    """A session that reads without taking SQLite's write lock."""
    with engine.connect() as conn:
        with Session(bind=conn.execution_options(readonly=True)) as session:
            yield session


def _series_rows(conn: Any, study_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    rows = conn.execute(
        select(
            Series.study_fk,
            Series.series_instance_uid,
            Series.modality,
            Series.series_number,
            Series.series_description,
            Series.body_part_examined,
            func.count(Instance.id),
        )
        .join(Instance, Instance.series_fk == Series.id, isouter=True)
        .where(Series.study_fk.in_(study_ids))
        .group_by(Series.id)
        .order_by(Series.series_number, Series.id)
    ).all()
    by_study: dict[int, list[dict[str, Any]]] = {}
    for study_fk, uid, modality, number, description, body_part, count in rows:
        by_study.setdefault(study_fk, []).append(
            {
                "series_instance_uid": uid,
                "modality": modality,
                "series_number": number,
                "series_description": description,
                "body_part_examined": body_part,
                "instances": int(count),
            }
        )
    return by_study


def _study_dict(study: Study, patient: Patient, series: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "study_instance_uid": study.study_instance_uid,
        "patient_id": patient.patient_id,
        "patient_name": patient.patient_name,
        "study_date": study.study_date,
        "accession_number": study.accession_number,
        "study_description": study.study_description,
        "status": study.status,
        "instances": sum(item["instances"] for item in series),
        "series": series,
        "received_at": _iso(study.received_at),
        "last_received_at": _iso(study.last_received_at),
        "stable_at": _iso(study.stable_at),
    }


def list_studies(engine: Engine) -> list[dict[str, Any]]:
    """Every study, newest first, with its series and instance counts."""
    with read_session(engine) as conn:
        pairs = conn.execute(
            select(Study, Patient)
            .join(Patient, Study.patient_fk == Patient.id)
            .order_by(Study.received_at.desc(), Study.id.desc())
        ).all()
        series = _series_rows(conn, [study.id for study, _ in pairs])
    return [_study_dict(study, patient, series.get(study.id, [])) for study, patient in pairs]


def study_detail(engine: Engine, study_uid: str) -> dict[str, Any] | None:
    """One study with its state history and the associations that delivered it."""
    with read_session(engine) as conn:
        pair = conn.execute(
            select(Study, Patient)
            .join(Patient, Study.patient_fk == Patient.id)
            .where(Study.study_instance_uid == study_uid)
        ).first()
        if pair is None:
            return None
        study, patient = pair
        detail = _study_dict(study, patient, _series_rows(conn, [study.id]).get(study.id, []))
        detail["patient"] = {
            "patient_id": patient.patient_id,
            "issuer": patient.issuer,
            "patient_name": patient.patient_name,
            "birth_date": patient.birth_date,
            "sex": patient.sex,
        }
        events = conn.execute(
            select(StudyEvent).where(StudyEvent.study_fk == study.id).order_by(StudyEvent.id)
        ).scalars()
        detail["events"] = [
            {
                "from": event.from_status,
                "to": event.to_status,
                "at": _iso(event.at),
                "reason": event.reason,
            }
            for event in events
        ]
        senders = conn.execute(
            select(AssociationRecord, func.count(Instance.id))
            .join(Instance, Instance.association_fk == AssociationRecord.id)
            .join(Series, Instance.series_fk == Series.id)
            .where(Series.study_fk == study.id)
            .group_by(AssociationRecord.id)
            .order_by(AssociationRecord.id)
        ).all()
        detail["associations"] = [
            {
                "id": record.id,
                "calling_ae": record.calling_ae,
                "called_ae": record.called_ae,
                "peer": f"{record.peer_host}:{record.peer_port}",
                "started_at": _iso(record.started_at),
                "ended_at": _iso(record.ended_at),
                "outcome": record.outcome,
                "instances_of_this_study": int(count),
            }
            for record, count in senders
        ]
    return detail
