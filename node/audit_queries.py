"""What the node holds, as plain data for the CLI, the web pages and the REST API
(one shape for all three, so scripts move from ``pacsnode studies --json`` to
``/api/studies`` unchanged)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Select, func, select
from sqlalchemy.orm import Session

from db.tables import (
    AssociationRecord,
    Delivery,
    Instance,
    Job,
    Patient,
    Result,
    Series,
    Study,
    StudyEvent,
)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


@contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    """A session that reads without taking SQLite's write lock."""
    with engine.connect() as conn:
        with Session(bind=conn.execution_options(readonly=True)) as session:
            yield session


#: The studies a read is about: a short list of ids (a page, one study), or a SELECT of
#: ids. Every study is asked for as a subquery: a list of ids bound one parameter each
#: fails on PostgreSQL past 65,535 of them.
StudyIds = list[int] | Select[Any]


def _series_rows(conn: Any, study_ids: StudyIds) -> dict[int, list[dict[str, Any]]]:
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


def _no_results() -> dict[str, Any]:
    return {"jobs": {}, "results": 0, "deliveries": {}}


def _results_summary(conn: Any, study_ids: StudyIds) -> dict[int, dict[str, Any]]:
    """Per study: jobs by status, DICOM results produced, deliveries by status (studies
    with no job are absent: see :func:`_no_results`)."""
    summary: dict[int, dict[str, Any]] = {}
    for study_id, status, count in conn.execute(
        select(Job.study_fk, Job.status, func.count()).where(Job.study_fk.in_(study_ids))
        .group_by(Job.study_fk, Job.status)
    ).all():
        summary.setdefault(study_id, _no_results())["jobs"][status] = int(count)
    for study_id, count in conn.execute(
        select(Job.study_fk, func.count(Result.id)).join(Result, Result.job_fk == Job.id)
        .where(Job.study_fk.in_(study_ids)).where(Result.sop_instance_uid.is_not(None))
        .group_by(Job.study_fk)
    ).all():
        summary.setdefault(study_id, _no_results())["results"] = int(count)
    for study_id, status, count in conn.execute(
        select(Job.study_fk, Delivery.status, func.count())
        .join(Result, Result.job_fk == Job.id).join(Delivery, Delivery.result_fk == Result.id)
        .where(Job.study_fk.in_(study_ids)).group_by(Job.study_fk, Delivery.status)
    ).all():
        summary.setdefault(study_id, _no_results())["deliveries"][status] = int(count)
    return summary


def _shaped(conn: Any, pairs: Any, ids: StudyIds | None = None) -> list[dict[str, Any]]:
    """(Study, Patient) rows as ``studies --json`` prints them; ``ids``: the studies
    of ``pairs`` as a SELECT, when they are too many to list."""
    if ids is None:
        ids = [study.id for study, _ in pairs]
    series = _series_rows(conn, ids)
    results = _results_summary(conn, ids)
    studies = []
    for study, patient in pairs:
        item = _study_dict(study, patient, series.get(study.id, []))
        item["results"] = results.get(study.id) or _no_results()
        studies.append(item)
    return studies


def list_studies(engine: Engine) -> list[dict[str, Any]]:
    """Every study, newest first, with its series, instance counts and results."""
    with read_session(engine) as conn:
        pairs = conn.execute(
            select(Study, Patient)
            .join(Patient, Study.patient_fk == Patient.id)
            .order_by(Study.received_at.desc(), Study.id.desc())
        ).all()
        return _shaped(conn, pairs, select(Study.id))


@dataclass(frozen=True)
class StudyFilter:
    """What the studies search matches; unset (empty) fields match anything.

    ``patient_id`` and ``accession_number`` match exactly, ``patient_name`` by prefix
    ignoring case (``doe`` finds ``DOE^JOHN``), ``date_from``/``date_to`` the Study
    Date inclusively (YYYYMMDD), ``calling_ae`` the AE title of any association that
    sent an instance of the study.
    """

    patient_id: str = ""
    patient_name: str = ""
    accession_number: str = ""
    date_from: str = ""
    date_to: str = ""
    status: str = ""
    calling_ae: str = ""

    def where(self) -> list[Any]:
        clauses: list[Any] = []
        if self.patient_id:
            clauses.append(Patient.patient_id == self.patient_id)
        if self.patient_name:
            pattern = self.patient_name.replace("\\", "").replace("%", "").replace("_", "")
            clauses.append(func.lower(Patient.patient_name).like(pattern.lower() + "%"))
        if self.accession_number:
            clauses.append(Study.accession_number == self.accession_number)
        if self.date_from:
            clauses.append(Study.study_date >= self.date_from)
        if self.date_to:
            clauses.append(Study.study_date <= self.date_to)
        if self.status:
            clauses.append(Study.status == self.status)
        if self.calling_ae:
            # From the sender's associations to their distinct series (index-only on
            # instances (association_fk, series_fk)), then to studies: 30% faster at
            # 10 million instances than joining from the series (bench/db_scale.py).
            series = (select(Instance.series_fk).distinct()
                      .join(AssociationRecord, AssociationRecord.id == Instance.association_fk)
                      .where(AssociationRecord.calling_ae == self.calling_ae))
            clauses.append(Study.id.in_(select(Series.study_fk).where(Series.id.in_(series))))
        return clauses


def search_studies(engine: Engine, where: StudyFilter, page: int = 1,
                   page_size: int = 50) -> dict[str, Any]:
    """One page of the studies matching ``where``, newest first, shaped like
    :func:`list_studies`, with ``total`` matches, ``page`` and ``page_size``."""
    page = max(page, 1)
    clauses = where.where()
    with read_session(engine) as conn:
        total = conn.execute(
            select(func.count()).select_from(Study)
            .join(Patient, Study.patient_fk == Patient.id).where(*clauses)
        ).scalar_one()
        pairs = conn.execute(
            select(Study, Patient).join(Patient, Study.patient_fk == Patient.id)
            .where(*clauses)
            .order_by(Study.received_at.desc(), Study.id.desc())
            .limit(page_size).offset((page - 1) * page_size)
        ).all()
        studies = _shaped(conn, pairs)
    return {"studies": studies, "total": int(total), "page": page, "page_size": page_size}


def _deliveries(conn: Any, result_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    from node.delivery_queries import delivery_dict

    by_result: dict[int, list[dict[str, Any]]] = {}
    for item in conn.execute(
        select(Delivery).where(Delivery.result_fk.in_(result_ids)).order_by(Delivery.id)
    ).scalars():
        by_result.setdefault(item.result_fk, []).append(delivery_dict(item))
    return by_result


def _jobs_by_series(conn: Any, study_id: int) -> dict[int, list[dict[str, Any]]]:
    """The audit trail of each series: route, pipeline, job, results, deliveries."""
    jobs = conn.execute(
        select(Job).where(Job.study_fk == study_id).order_by(Job.id)
    ).scalars().all()
    results = conn.execute(
        select(Result).where(Result.job_fk.in_([job.id for job in jobs])).order_by(Result.id)
    ).scalars().all()
    deliveries = _deliveries(conn, [result.id for result in results])
    by_job: dict[int, list[dict[str, Any]]] = {}
    for result in results:
        by_job.setdefault(result.job_fk, []).append({
            "result_id": result.id,
            "kind": result.kind,
            "sop_class_uid": result.sop_class_uid,
            "sop_instance_uid": result.sop_instance_uid,
            "series_instance_uid": result.series_instance_uid,
            "file": result.file_path,
            "deliveries": deliveries.get(result.id, []),
        })
    by_series: dict[int, list[dict[str, Any]]] = {}
    for job in jobs:
        by_series.setdefault(job.series_fk, []).append({
            "job_id": job.id,
            "route": job.route,
            "pipeline": job.pipeline,
            "status": job.status,
            "reason": job.reason,
            "attempt": job.attempt,
            "instances": job.instances,
            "queued_at": _iso(job.queued_at),
            "started_at": _iso(job.started_at),
            "finished_at": _iso(job.finished_at),
            "timings_s": json.loads(job.timings or "{}"),
            "results": by_job.get(job.id, []),
        })
    return by_series


def _circuits_of(conn: Any, jobs: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The circuit breakers of the destinations this study's results go to."""
    from node.delivery_queries import circuits_in

    names = sorted({d["destination"] for history in jobs.values() for job in history
                    for result in job["results"] for d in result["deliveries"]})
    return circuits_in(conn, names) if names else []


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
        detail["results"] = _results_summary(conn, [study.id]).get(study.id) or _no_results()
        series_ids = dict(conn.execute(
            select(Series.series_instance_uid, Series.id).where(Series.study_fk == study.id)
        ).all())
        jobs = _jobs_by_series(conn, study.id)
        detail["destinations"] = _circuits_of(conn, jobs)
        for series in detail["series"]:
            history = jobs.get(series_ids[series["series_instance_uid"]], [])
            series["jobs"] = history
            # The latest job is the series' current state; earlier ones stay for audit.
            series["analysis"] = history[-1] if history else None
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
                "tls": bool(record.tls),
                "peer_certificate": record.peer_certificate,
                "started_at": _iso(record.started_at),
                "ended_at": _iso(record.ended_at),
                "outcome": record.outcome,
                "instances_of_this_study": int(count),
            }
            for record, count in senders
        ]
    return detail
