"""What an admin may change from the web: resend deliveries, re-run a series.

Resend puts a delivery back to ``pending``, due now, with its attempts reset, so the
running node's delivery worker sends it at its next poll (its last error stays until
then, for the record). A delivery being sent right now is left alone.
(The ``pacsnode resend`` command of another branch does the same; the two are to be
one function when they meet.)
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, Table, select, update

from db.tables import Delivery, DeliveryStatus, Job, Patient, Result, Study, utcnow

_deliveries: Table = Delivery.__table__  # type: ignore[assignment]
#: Statuses a delivery can be resent from ("sent": the PACS lost it, say).
RESENDABLE = (DeliveryStatus.FAILED.value, DeliveryStatus.PENDING.value,
              DeliveryStatus.SENT.value)


def resend(engine: Engine, delivery_ids: list[int]) -> list[int]:
    """Make deliveries due again; returns those that were (not ``sending``)."""
    if not delivery_ids:
        return []
    with engine.begin() as conn:
        done = conn.execute(
            update(_deliveries).where(_deliveries.c.id.in_(delivery_ids))
            .where(_deliveries.c.status.in_(RESENDABLE))
            .values(status=DeliveryStatus.PENDING.value, attempts=0, next_attempt_at=utcnow(),
                    sent_at=None, owner=None, lease_until=None)
            .returning(_deliveries.c.id)).scalars().all()
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
