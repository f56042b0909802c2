"""What an audit message names, read from the database in the emitter's thread (never
in the thread that received the instances): studies, patients and SOP classes."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, func, select

from db.batches import batches
from db.tables import Delivery, Instance, Job, Patient, Result, Series, Study
from node.audit.messages import StudyObject
from node.audit_queries import read_session


def _objects(rows: Any) -> list[StudyObject]:
    """(study UID, patient ID, name, accession, SOP class, count) rows -> objects."""
    studies: dict[str, StudyObject] = {}
    for uid, patient_id, name, accession, sop_class, count in rows:
        study = studies.setdefault(uid, StudyObject(uid, patient_id, name, accession, {}))
        if sop_class:
            study.sop_classes[sop_class] = study.sop_classes.get(sop_class, 0) + int(count)
    return list(studies.values())


def _study_columns() -> tuple[Any, ...]:
    return (Study.study_instance_uid, Patient.patient_id, Patient.patient_name,
            Study.accession_number)


def studies_of_association(engine: Engine, association_id: int) -> list[StudyObject]:
    with read_session(engine) as conn:
        rows = conn.execute(
            select(*_study_columns(), Instance.sop_class_uid, func.count())
            .select_from(Instance).join(Series, Series.id == Instance.series_fk)
            .join(Study, Study.id == Series.study_fk)
            .join(Patient, Patient.id == Study.patient_fk)
            .where(Instance.association_fk == association_id)
            .group_by(*_study_columns(), Instance.sop_class_uid)).all()
    return _objects(rows)


def studies_of_deliveries(engine: Engine, delivery_ids: list[int]) -> list[StudyObject]:
    rows: list[Any] = []
    with read_session(engine) as conn:
        for batch in batches(delivery_ids):  # _objects adds up a study's batches
            rows += conn.execute(
                select(*_study_columns(), Result.sop_class_uid, func.count())
                .select_from(Delivery).join(Result, Result.id == Delivery.result_fk)
                .join(Job, Job.id == Result.job_fk).join(Study, Study.id == Job.study_fk)
                .join(Patient, Patient.id == Study.patient_fk)
                .where(Delivery.id.in_(batch))
                .group_by(*_study_columns(), Result.sop_class_uid)).all()
    return _objects(rows)


def study_object(engine: Engine, study_uid: str) -> StudyObject:
    with read_session(engine) as conn:
        row = conn.execute(select(*_study_columns()).join(Patient, Patient.id == Study.patient_fk)
                           .where(Study.study_instance_uid == study_uid)).first()
    if row is None:
        return StudyObject(study_uid)
    return StudyObject(row[0], row[1], row[2], row[3])
