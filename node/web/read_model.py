"""Read-model queries of the web pages beyond a study's: the dashboard, deliveries,
associations and the access log. Plain dicts, ISO 8601 UTC times, one page at a time."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select

from db.tables import (
    AccessEvent,
    AssociationRecord,
    Delivery,
    Instance,
    Job,
    Patient,
    Result,
    Study,
    utcnow,
)
from node.audit_queries import read_session
from node.delivery_queries import circuits_in


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _page(query: Any, page: int, page_size: int) -> Any:
    return query.limit(page_size).offset((max(page, 1) - 1) * page_size)


def _count_since(conn: Any, column: Any, since: datetime, *where: Any) -> int:
    return int(conn.execute(select(func.count()).where(column >= since, *where)).scalar_one())


def _period(conn: Any, since: datetime) -> dict[str, int]:
    """Studies received, series analysed and failed, results delivered since ``since``."""
    return {
        "received": _count_since(conn, Study.received_at, since),
        "analysed": _count_since(conn, Job.finished_at, since, Job.status == "done"),
        "failed": _count_since(conn, Job.finished_at, since, Job.status == "failed"),
        "delivered": _count_since(conn, Delivery.sent_at, since, Delivery.status == "sent"),
    }


def dashboard(engine: Engine, now: datetime | None = None) -> dict[str, Any]:
    """Today (since 00:00 UTC) and the last 7 days, the ingest rate of the last hour,
    jobs queued and running, deliveries by status and the circuit state per destination."""
    now = now or utcnow()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    with read_session(engine) as conn:
        last_hour = _count_since(conn, Instance.received_at, now - timedelta(hours=1))
        jobs = dict(conn.execute(
            select(Job.status, func.count()).where(Job.status.in_(("queued", "running")))
            .group_by(Job.status)).all())
        per_destination: dict[str, dict[str, int]] = {}
        for name, status, count in conn.execute(
                select(Delivery.destination, Delivery.status, func.count())
                .group_by(Delivery.destination, Delivery.status)).all():
            per_destination.setdefault(name, {})[status] = int(count)
        circuits = {c["name"]: c for c in circuits_in(conn)}
        for name in circuits:
            per_destination.setdefault(name, {})
        return {
            "today": _period(conn, midnight),
            "week": _period(conn, now - timedelta(days=7)),
            "ingest_per_minute": round(last_hour / 60, 1),
            "jobs": {"queued": int(jobs.get("queued", 0)), "running": int(jobs.get("running", 0))},
            "deliveries": per_destination,
            # The outbox's circuit breaker per destination (closed, open, half-open).
            "circuits": circuits,
        }


def deliveries(engine: Engine, status: str = "", destination: str = "", page: int = 1,
               page_size: int = 50) -> dict[str, Any]:
    """Deliveries newest first, with their result and study, by status and destination."""
    where = [c for c in (Delivery.status == status if status else None,
                         Delivery.destination == destination if destination else None)
             if c is not None]
    with read_session(engine) as conn:
        total = conn.execute(select(func.count()).select_from(Delivery).where(*where)).scalar_one()
        rows = conn.execute(_page(
            select(Delivery, Result.kind, Result.sop_instance_uid, Study.study_instance_uid,
                   Patient.patient_id)
            .join(Result, Result.id == Delivery.result_fk).join(Job, Job.id == Result.job_fk)
            .join(Study, Study.id == Job.study_fk).join(Patient, Patient.id == Study.patient_fk)
            .where(*where).order_by(Delivery.id.desc()), page, page_size)).all()
    items = [{
        "id": d.id, "destination": d.destination, "status": d.status, "attempts": d.attempts,
        "last_error": d.last_error, "last_attempt_at": _iso(d.last_attempt_at),
        "next_attempt_at": _iso(d.next_attempt_at) if d.status == "pending" else None,
        "sent_at": _iso(d.sent_at), "kind": kind, "sop_instance_uid": sop_uid,
        "study_instance_uid": study_uid, "patient_id": patient_id,
    } for d, kind, sop_uid, study_uid, patient_id in rows]
    return {"deliveries": items, "total": int(total), "page": max(page, 1),
            "page_size": page_size}


def destination_names(engine: Engine) -> list[str]:
    with read_session(engine) as conn:
        return list(conn.execute(select(Delivery.destination).distinct()
                                 .order_by(Delivery.destination)).scalars())


def associations(engine: Engine, outcome: str = "", calling_ae: str = "", page: int = 1,
                 page_size: int = 50) -> dict[str, Any]:
    """Associations newest first (rejections with their reasons), by outcome and AE."""
    where = [c for c in (AssociationRecord.outcome == outcome if outcome else None,
                         AssociationRecord.calling_ae == calling_ae if calling_ae else None)
             if c is not None]
    with read_session(engine) as conn:
        total = conn.execute(select(func.count()).select_from(AssociationRecord)
                             .where(*where)).scalar_one()
        rows = conn.execute(_page(select(AssociationRecord).where(*where)
                                  .order_by(AssociationRecord.id.desc()), page, page_size)
                            ).scalars().all()
    items = [{
        "id": r.id, "calling_ae": r.calling_ae, "called_ae": r.called_ae,
        "peer": f"{r.peer_host}:{r.peer_port}", "tls": bool(r.tls),
        "peer_certificate": r.peer_certificate, "started_at": _iso(r.started_at),
        "ended_at": _iso(r.ended_at), "outcome": r.outcome, "reason": r.reason,
        "instances_stored": r.instances_stored, "instances_duplicate": r.instances_duplicate,
        "instances_failed": r.instances_failed,
    } for r in rows]
    return {"associations": items, "total": int(total), "page": max(page, 1),
            "page_size": page_size}


def access_log(engine: Engine, username: str = "", action: str = "", study_uid: str = "",
               page: int = 1, page_size: int = 50) -> dict[str, Any]:
    """The access log newest first, by user, action and study."""
    where = [c for c in (AccessEvent.username == username if username else None,
                         AccessEvent.action == action if action else None,
                         AccessEvent.study_instance_uid == study_uid if study_uid else None)
             if c is not None]
    with read_session(engine) as conn:
        total = conn.execute(select(func.count()).select_from(AccessEvent)
                             .where(*where)).scalar_one()
        rows = conn.execute(_page(select(AccessEvent).where(*where)
                                  .order_by(AccessEvent.id.desc()), page, page_size)
                            ).scalars().all()
    items = [{
        "id": r.id, "at": _iso(r.at), "username": r.username, "client": r.client,
        "action": r.action, "outcome": r.outcome, "study_instance_uid": r.study_instance_uid,
        "patient_id": r.patient_id, "detail": r.detail,
    } for r in rows]
    return {"events": items, "total": int(total), "page": max(page, 1), "page_size": page_size}


def jobs(engine: Engine, status: str = "", page: int = 1, page_size: int = 50,
         ) -> dict[str, Any]:
    """Jobs newest first, with their study and series."""
    import json

    from db.tables import Series

    where = [Job.status == status] if status else []
    with read_session(engine) as conn:
        total = conn.execute(select(func.count()).select_from(Job).where(*where)).scalar_one()
        rows = conn.execute(_page(
            select(Job, Study.study_instance_uid, Series.series_instance_uid)
            .join(Study, Study.id == Job.study_fk).join(Series, Series.id == Job.series_fk)
            .where(*where).order_by(Job.id.desc()), page, page_size)).all()
    items = [{
        "job_id": j.id, "study_instance_uid": study_uid, "series_instance_uid": series_uid,
        "route": j.route, "pipeline": j.pipeline, "status": j.status, "reason": j.reason,
        "attempt": j.attempt, "instances": j.instances, "queued_at": _iso(j.queued_at),
        "started_at": _iso(j.started_at), "finished_at": _iso(j.finished_at),
        "timings_s": json.loads(j.timings or "{}"),
    } for j, study_uid, series_uid in rows]
    return {"jobs": items, "total": int(total), "page": max(page, 1), "page_size": page_size}
