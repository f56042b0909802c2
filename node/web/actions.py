"""What an admin may change from the web: resend deliveries, re-run a series.

Resend is the outbox's own (:func:`node.workflow.outbox.resend`, as ``pacsnode resend``):
back to ``pending``, due now, attempts and age reset, an event naming the user, and an
open circuit probes at once. A delivery being sent right now is left alone.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, Table, select

from db.tables import Delivery, DeliveryStatus, Job, Patient, Result, Study, utcnow

_deliveries: Table = Delivery.__table__  # type: ignore[assignment]


def resend(engine: Engine, delivery_ids: list[int], user: str = "") -> list[int]:
    """Make deliveries due again; returns those that were (not ``sending``, and known)."""
    from node.workflow.outbox import ResendError
    from node.workflow.outbox import resend as outbox_resend

    if not delivery_ids:
        return []
    try:
        done, _busy = outbox_resend(engine, utcnow(), ids=delivery_ids,
                                    reason=f"from the web by {user}" if user else "")
    except ResendError:
        return []
    return sorted(done)


def failed_ids(engine: Engine, destination: str = "") -> list[int]:
    """The failed deliveries (of one destination), for a bulk resend."""
    query = select(_deliveries.c.id).where(_deliveries.c.status == DeliveryStatus.FAILED.value)
    if destination:
        query = query.where(_deliveries.c.destination == destination)
    with engine.connect() as conn:
        return list(conn.execute(query).scalars())


def delivery_study(engine: Engine, delivery_id: int) -> dict[str, Any] | None:
    """The study and patient of a delivery, for the access log."""
    with engine.connect() as conn:
        row = conn.execute(
            select(Study.study_instance_uid, Patient.patient_id, Delivery.destination)
            .select_from(Delivery).join(Result, Result.id == Delivery.result_fk)
            .join(Job, Job.id == Result.job_fk).join(Study, Study.id == Job.study_fk)
            .join(Patient, Patient.id == Study.patient_fk)
            .where(Delivery.id == delivery_id)).first()
    return None if row is None else {"study_uid": row[0], "patient_id": row[1],
                                     "destination": row[2]}


def rerun(engine: Engine, settings: Any, study_uid: str, series_uid: str | None) -> list[int]:
    """Queue the study's series (or one) again: :func:`node.workflow.jobs.queue_rerun`
    (raises its RerunError with the reason)."""
    from node.workflow.jobs import queue_rerun

    return queue_rerun(engine, settings, study_uid, series_uid or None)
