"""The outbox as plain data, for ``pacsnode deliveries`` and ``pacsnode study``.

Deliveries with their study, result and the circuit state of their destination;
destination circuits; a delivery's history of events.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select

from db.batches import batches
from db.tables import (
    Delivery,
    DeliveryEvent,
    DeliveryStatus,
    DestinationState,
    Job,
    Result,
    Study,
)
from node.audit_queries import read_session

#: Statuses whose next_attempt_at is a time something will happen.
_SCHEDULED = (DeliveryStatus.PENDING.value, DeliveryStatus.AWAITING_COMMITMENT.value)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def delivery_dict(item: Delivery, circuit: str | None = None) -> dict[str, Any]:
    """One delivery's state (without its study and result)."""
    return {
        "id": item.id,
        "delivery_id": item.id,  # the name the web API and study --json readers use
        "destination": item.destination,
        "status": item.status,
        "attempts": item.attempts,
        "last_error": item.last_error,
        "created_at": _iso(item.created_at),
        "queued_at": _iso(item.queued_at),
        "last_attempt_at": _iso(item.last_attempt_at),
        "next_attempt_at": _iso(item.next_attempt_at) if item.status in _SCHEDULED else None,
        "sent_at": _iso(item.sent_at),
        "commitment_uid": item.commitment_uid,
        "commitment_requests": item.commitment_requests,
        "committed_at": _iso(item.committed_at),
        "circuit": circuit,
    }


def circuits(engine: Engine, names: list[str] | None = None) -> list[dict[str, Any]]:
    """The circuit breaker of each destination (of ``names``), by name."""
    with read_session(engine) as session:
        return circuits_in(session, names)


def circuits_in(session: Any, names: list[str] | None = None) -> list[dict[str, Any]]:
    """:func:`circuits` in an open session."""
    query = select(DestinationState).order_by(DestinationState.name)
    if names is not None:
        query = query.where(DestinationState.name.in_(names))
    return [{
        "name": row.name,
        "state": row.state,
        "consecutive_failures": row.consecutive_failures,
        "opened_at": _iso(row.opened_at),
        "next_probe_at": _iso(row.next_probe_at),
        "last_error": row.last_error,
        "updated_at": _iso(row.updated_at),
    } for row in session.execute(query).scalars()]


def list_deliveries(engine: Engine, status: str | None = None, destination: str | None = None,
                    study_uid: str | None = None, limit: int = 0,
                    history: bool = False) -> list[dict[str, Any]]:
    """Deliveries, newest first (at most ``limit``; 0: all), with the study UID, the
    result's kind and SOP Instance UID, and the circuit of their destination;
    ``history``: each with its events."""
    query = (select(Delivery, Result.kind, Result.sop_instance_uid, Study.study_instance_uid,
                    DestinationState.state)
             .join(Result, Result.id == Delivery.result_fk)
             .join(Job, Job.id == Result.job_fk).join(Study, Study.id == Job.study_fk)
             .outerjoin(DestinationState, DestinationState.name == Delivery.destination)
             .order_by(Delivery.id.desc()))
    if status is not None:
        query = query.where(Delivery.status == status)
    if destination is not None:
        query = query.where(Delivery.destination == destination)
    if study_uid is not None:
        query = query.where(Study.study_instance_uid == study_uid)
    if limit:
        query = query.limit(limit)
    with read_session(engine) as session:
        rows = session.execute(query).all()
        found = [{"study_instance_uid": study, "kind": kind, "sop_instance_uid": sop,
                  **delivery_dict(item, circuit)}
                 for item, kind, sop, study, circuit in rows]
        if history:
            events = delivery_events(session, [item["id"] for item in found])
            for item in found:
                item["events"] = events.get(item["id"], [])
    return found


def delivery_events(session: Any, ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    """Each delivery's history: every change with its time and reason, oldest first."""
    by_delivery: dict[int, list[dict[str, Any]]] = {}
    for batch in batches(ids):  # a delivery's events all come in its batch, in order
        for event in session.execute(
            select(DeliveryEvent).where(DeliveryEvent.delivery_fk.in_(batch))
            .order_by(DeliveryEvent.id)
        ).scalars():
            by_delivery.setdefault(event.delivery_fk, []).append({
                "at": _iso(event.at), "from": event.from_status, "to": event.to_status,
                "reason": event.reason})
    return by_delivery
