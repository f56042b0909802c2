"""The outbox's records: every (result, destination) a durable message until confirmed.

Each change of a delivery is one transaction that also writes a ``delivery_events`` row
with its reason, so the audit shows every attempt, every backoff and every operator's
resend. Nothing here talks DICOM: :mod:`node.workflow.delivery` sends, and
:mod:`node.workflow.commitment` records what the PACS confirms.

A delivery's life (:class:`db.tables.DeliveryStatus`): ``pending`` -> ``sending`` (held
by one process's lease) -> ``sent``, or ``awaiting_commitment`` -> ``committed`` for a
destination with ``storage_commitment``; a failure puts it back to ``pending`` with a
jittered exponential backoff, until ``delivery.max_age_h`` has passed since it was
queued: then ``failed`` with its last error.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Table, and_, exists, select, true, update
from sqlalchemy.orm import aliased

from db.batches import batches
from db.tables import Delivery, DeliveryEvent, DeliveryStatus, Result
from node.config import DeliveryConfig
from node.leases import Lease, released

log = logging.getLogger(__name__)

_deliveries: Table = Delivery.__table__  # type: ignore[assignment]
_events: Table = DeliveryEvent.__table__  # type: ignore[assignment]

PENDING = DeliveryStatus.PENDING.value
SENDING = DeliveryStatus.SENDING.value
AWAITING = DeliveryStatus.AWAITING_COMMITMENT.value
FAILED = DeliveryStatus.FAILED.value

#: Deliveries per association: each needs at most one presentation context of 128.
BATCH = 100


@dataclass(frozen=True)
class Due:
    """A delivery claimed for sending (status ``sending``, leased to this process)."""

    delivery_id: int
    result_id: int
    job_id: int
    destination: str
    attempts: int  # including this one
    queued_at: datetime
    path: Path


def jitter(config: DeliveryConfig) -> float:
    """A random factor in 1 +- ``delivery.retry_jitter``: senders (destinations, nodes)
    that failed together spread out rather than retry together."""
    return random.uniform(1 - config.retry_jitter, 1 + config.retry_jitter)


def backoff_s(config: DeliveryConfig, failures: int, spread: float | None = None) -> float:
    """Delay after ``failures`` failed tries in a row: doubling from
    ``delivery.retry_initial_s``, scaled by ``spread`` (default: a fresh
    :func:`jitter`), within ``[retry_initial_s, retry_max_s]``."""
    nominal = config.retry_initial_s * 2 ** min(max(failures - 1, 0), 60)
    factor = jitter(config) if spread is None else spread
    return max(config.retry_initial_s, min(config.retry_max_s, nominal * factor))


def record_event(conn: Connection, delivery_id: int, from_status: str | None,
                 to_status: str, reason: str, now: datetime) -> None:
    conn.execute(_events.insert().values(delivery_fk=delivery_id, at=now,
                                         from_status=from_status, to_status=to_status,
                                         reason=reason))


def _not_held(delivery: Any, result: Any, now: datetime, probe: bool) -> Any:
    """An SR waits for its SEG: no earlier result of the same job to the same destination
    may be pending but not in this same batch (where it goes first). (A SEG that failed
    failed its SRs with it; one an operator resends alone is sent.) ``delivery`` and
    ``result``: the (aliased) tables of the candidate."""
    earlier = aliased(Delivery)
    earlier_result = aliased(Result)
    waiting = and_(earlier.status == PENDING,
                   true() if probe else earlier.next_attempt_at > now)
    return ~exists(
        select(earlier.id).join(earlier_result, earlier_result.id == earlier.result_fk)
        .where(earlier_result.job_fk == result.c.job_fk)
        .where(earlier_result.id < result.c.id)
        .where(earlier.destination == delivery.c.destination)
        .where(waiting))


def _due_ids(destination: str, now: datetime, probe: bool) -> Any:
    """The ids of the deliveries to claim, locked: those another claimer holds are
    skipped, not waited for (SQLite has no row locks and needs none: it serialises
    writers). Aliased so that nothing in it correlates with the UPDATE around it."""
    due, result = _deliveries.alias("due"), Result.__table__.alias("due_result")
    query = (
        select(due.c.id).join(result, result.c.id == due.c.result_fk)
        .where(due.c.destination == destination)
        .where(due.c.status == PENDING)
        .where(_not_held(due, result, now, probe))
        .order_by(due.c.result_fk, due.c.id)
        .limit(1 if probe else BATCH)
        .with_for_update(of=due, skip_locked=True)
    )
    return query if probe else query.where(due.c.next_attempt_at <= now)


def claim_due(engine: Engine, destination: str, data_dir: Path, now: datetime, lease: Lease,
              probe: bool = False) -> list[Due]:
    """Mark this destination's due pending deliveries ``sending`` for this process, in
    result order (a SEG before its SR); ``probe``: only the oldest pending one, due or
    not (the open circuit's single try)."""
    # One UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT n) RETURNING,
    # and one insert of the events: a row-by-row claim cost two round trips a delivery.
    # SQLite's RETURNING names only the updated table: the result's columns come as
    # subqueries (a primary-key lookup each), not from UPDATE ... FROM.
    def of_result(column: Any) -> Any:
        return select(column).where(Result.id == _deliveries.c.result_fk).scalar_subquery()

    # As a CTE: PostgreSQL may run an IN (subquery) again for each outer row, and a
    # re-run skips the rows this statement just updated and locks the next ones: 122
    # claimed for a LIMIT of 100. A CTE with FOR UPDATE is evaluated exactly once.
    due = _due_ids(destination, now, probe).cte("due_ids")
    claim = (
        update(_deliveries)
        .where(_deliveries.c.id.in_(select(due.c.id)))
        .where(_deliveries.c.status == PENDING)
        .values(status=SENDING, **lease.claim(now), last_attempt_at=now,
                attempts=_deliveries.c.attempts + 1)
        .returning(_deliveries.c.id, _deliveries.c.attempts, _deliveries.c.queued_at,
                   _deliveries.c.result_fk.label("result_id"),
                   of_result(Result.job_fk).label("job_fk"),
                   of_result(Result.file_path).label("file_path"))
    )
    suffix = " (probe)" if probe else ""
    with engine.begin() as conn:
        # RETURNING comes in no particular order; a SEG goes before its SR.
        rows = sorted(conn.execute(claim).all(), key=lambda row: (row.result_id, row.id))
        if rows:
            conn.execute(_events.insert(), [
                {"delivery_fk": row.id, "at": now, "from_status": PENDING,
                 "to_status": SENDING, "reason": f"attempt {row.attempts}{suffix}"}
                for row in rows])
    # ``attempts`` as RETURNING gives it: already including this one.
    return [Due(row.id, row.result_id, row.job_fk, destination, row.attempts,
                row.queued_at, data_dir / row.file_path) for row in rows]


@dataclass(frozen=True)
class Outcome:
    """What became of one claimed delivery in a round."""

    due: Due
    error: str | None = None  # None: the destination stored it
    held_by: int | None = None  # not tried: this delivery (its SEG) failed before it


def record_outcomes(engine: Engine, config: DeliveryConfig, outcomes: list[Outcome],
                    commitment: bool, now: datetime) -> None:
    """Each claimed delivery leaves ``sending``: stored (``sent``, or
    ``awaiting_commitment``), held back (``pending`` as it was), retried later
    (``pending`` with backoff) or ``failed`` once it is ``delivery.max_age_h`` old."""
    # One jitter per round: a SEG and its SR that failed together stay together.
    spread = jitter(config)
    with engine.begin() as conn:
        for outcome in outcomes:
            due = outcome.due
            if outcome.error is None:
                _stored(conn, due, commitment, now)
            elif outcome.held_by is not None:
                _held(conn, due, outcome.held_by, outcome.error, now)
            elif now >= due.queued_at + timedelta(hours=config.max_age_h):
                fail(conn, due.delivery_id, SENDING, _given_up(config, due, outcome.error), now)
            else:
                _retry_later(conn, config, due, outcome.error, spread, now)


def _stored(conn: Connection, due: Due, commitment: bool, now: datetime) -> None:
    status = AWAITING if commitment else DeliveryStatus.SENT.value
    # awaiting_commitment: the Storage Commitment request is due at once.
    conn.execute(update(_deliveries).where(_deliveries.c.id == due.delivery_id).values(
        status=status, sent_at=now, last_error="", next_attempt_at=now, commitment_uid=None,
        **released()))
    record_event(conn, due.delivery_id, SENDING, status,
                 f"stored by {due.destination} (attempt {due.attempts})", now)


def _held(conn: Connection, due: Due, held_by: int, error: str, now: datetime) -> None:
    # Not tried, so not an attempt; it goes again with the SEG that holds it.
    conn.execute(update(_deliveries).where(_deliveries.c.id == due.delivery_id).values(
        status=PENDING, attempts=_deliveries.c.attempts - 1, **released()))
    record_event(conn, due.delivery_id, SENDING, PENDING,
                 f"held back: delivery {held_by} before it in its job failed ({error})", now)


def _retry_later(conn: Connection, config: DeliveryConfig, due: Due, error: str,
                 spread: float, now: datetime) -> None:
    delay = backoff_s(config, due.attempts, spread)
    log.warning("delivery %s to %s failed (attempt %s), retrying in %.0f s: %s",
                due.delivery_id, due.destination, due.attempts, delay, error)
    conn.execute(update(_deliveries).where(_deliveries.c.id == due.delivery_id).values(
        status=PENDING, last_error=error, next_attempt_at=now + timedelta(seconds=delay),
        **released()))
    record_event(conn, due.delivery_id, SENDING, PENDING,
                 f"attempt {due.attempts} failed: {error}; next in {delay:.0f} s", now)


def _given_up(config: DeliveryConfig, due: Due, error: str) -> str:
    return (f"not delivered within delivery.max_age_h ({config.max_age_h:g} h, "
            f"{due.attempts} attempts); last error: {error}")


def fail(conn: Connection, delivery_id: int, from_status: str, reason: str,
         now: datetime) -> None:
    """``failed`` for good (an operator may resend it); the SRs its SEG held back fail
    with it rather than wait for their own age."""
    log.error("delivery %s failed: %s", delivery_id, reason)
    conn.execute(update(_deliveries).where(_deliveries.c.id == delivery_id).values(
        status=FAILED, last_error=reason, **released()))
    record_event(conn, delivery_id, from_status, FAILED, reason, now)
    for follower in _followers(conn, delivery_id):
        note = f"not sent: delivery {delivery_id} before it in its job failed"
        conn.execute(update(_deliveries).where(_deliveries.c.id == follower)
                     .values(status=FAILED, last_error=note))
        record_event(conn, follower, PENDING, FAILED, note, now)


def _followers(conn: Connection, delivery_id: int) -> list[int]:
    """Pending deliveries of later results of the same job to the same destination."""
    this = conn.execute(
        select(Result.job_fk, Result.id, _deliveries.c.destination)
        .join(Result, Result.id == _deliveries.c.result_fk)
        .where(_deliveries.c.id == delivery_id)).one()
    return list(conn.execute(
        select(_deliveries.c.id).join(Result, Result.id == _deliveries.c.result_fk)
        .where(Result.job_fk == this.job_fk).where(Result.id > this.id)
        .where(_deliveries.c.destination == this.destination)
        .where(_deliveries.c.status == PENDING)).scalars())


def expire(engine: Engine, config: DeliveryConfig, destination: str, now: datetime) -> int:
    """Fail this destination's deliveries queued more than ``delivery.max_age_h`` ago
    that still wait: pending ones an open circuit kept from trying, and stored ones whose
    Storage Commitment never came."""
    oldest = now - timedelta(hours=config.max_age_h)
    with engine.begin() as conn:
        rows = conn.execute(
            select(_deliveries.c.id, _deliveries.c.status, _deliveries.c.attempts,
                   _deliveries.c.last_error)
            .where(_deliveries.c.destination == destination)
            .where(_deliveries.c.status.in_((PENDING, AWAITING)))
            .where(_deliveries.c.queued_at < oldest)
            .with_for_update(skip_locked=True)).all()
        for row in rows:
            what = ("no Storage Commitment report" if row.status == AWAITING
                    else f"not delivered ({row.attempts} attempts)")
            fail(conn, row.id, row.status,
                 f"{what} within delivery.max_age_h ({config.max_age_h:g} h); last error: "
                 f"{row.last_error or '-'}", now)
    return len(rows)


def take_over(engine: Engine, now: datetime, expired_clause: Any) -> list[int]:
    """Deliveries whose sender's lease expired (it died mid-send) go back to pending,
    to be sent again as the same file (the same SOP Instance: a PACS takes it as a
    duplicate)."""
    with engine.begin() as conn:
        taken = list(conn.execute(
            update(_deliveries)
            .where(_deliveries.c.status == SENDING).where(expired_clause)
            .values(status=PENDING, next_attempt_at=now, **released())
            .returning(_deliveries.c.id)
        ).scalars())
        for delivery_id in taken:
            record_event(conn, delivery_id, SENDING, PENDING,
                         "its sender stopped renewing its lease (a crash?): sending the "
                         "same file again", now)
    return taken


class ResendError(LookupError):
    """The deliveries to resend cannot be found; the message says which."""


def resend(engine: Engine, now: datetime, ids: list[int] | None = None,
           study_uid: str | None = None, destination: str | None = None,
           status: str | None = None, reason: str = "") -> tuple[list[int], list[int]]:
    """Put deliveries back to ``pending``, due now, attempts and age reset, each with an
    event naming the operator's reason; returns (resent ids, ids left alone because
    they are being sent right now).

    Raises
    ------
    ResendError
        An id that does not exist, a study that does not exist, or nothing selected.
    """
    from node.workflow import breaker

    with engine.begin() as conn:
        rows = _selected(conn, ids, study_uid, destination, status)
        _check_found(conn, rows, ids, study_uid, destination, status)
        resent = [row.id for row in rows if row.status != SENDING]
        for row in rows:
            if row.status == SENDING:
                continue
            conn.execute(update(_deliveries).where(_deliveries.c.id == row.id).values(
                status=PENDING, attempts=0, queued_at=now, next_attempt_at=now,
                commitment_uid=None, committed_at=None))
            record_event(conn, row.id, row.status, PENDING,
                         f"resent by an operator (attempts were {row.attempts})"
                         f"{': ' + reason if reason else ''}", now)
        breaker.probe_now(conn, {row.destination for row in rows}, now)
    return resent, [row.id for row in rows if row.status == SENDING]


def _selected(conn: Connection, ids: list[int] | None, study_uid: str | None,
              destination: str | None, status: str | None) -> list[Any]:
    """The deliveries to resend, locked, in id order; ``ids`` (an operator's list, of
    any length) asked for in batches."""
    if not ids:
        return list(conn.execute(_selection(None, study_uid, destination, status)
                                 .with_for_update(of=_deliveries)).all())
    rows = [row for batch in batches(sorted(set(ids))) for row in conn.execute(
        _selection(batch, study_uid, destination, status).with_for_update(of=_deliveries))]
    return sorted(rows, key=lambda row: row.id)


def _selection(ids: list[int] | None, study_uid: str | None, destination: str | None,
               status: str | None) -> Any:
    from db.tables import Job, Study

    query = select(_deliveries.c.id, _deliveries.c.status, _deliveries.c.attempts,
                   _deliveries.c.destination).order_by(_deliveries.c.id)
    if ids:
        query = query.where(_deliveries.c.id.in_(ids))
    if study_uid is not None:
        query = (query.join(Result, Result.id == _deliveries.c.result_fk)
                 .join(Job, Job.id == Result.job_fk).join(Study, Study.id == Job.study_fk)
                 .where(Study.study_instance_uid == study_uid))
    if destination is not None:
        query = query.where(_deliveries.c.destination == destination)
    if status is not None:
        query = query.where(_deliveries.c.status == status)
    return query


def _check_found(conn: Connection, rows: list[Any], ids: list[int] | None,
                 study_uid: str | None, destination: str | None, status: str | None) -> None:
    from db.tables import Study

    if ids:
        missing = sorted(set(ids) - {row.id for row in rows})
        if missing:
            raise ResendError(f"no delivery with id {', '.join(map(str, missing))}"
                              f"{' and status ' + status if status else ''} "
                              "(see 'pacsnode deliveries'); nothing was resent")
    if study_uid is not None and not conn.execute(
            select(Study.id).where(Study.study_instance_uid == study_uid)).first():
        raise ResendError(f"no study with Study Instance UID {study_uid} "
                          "(see 'pacsnode studies')")
    if not rows:
        what = " ".join(filter(None, [
            study_uid and f"of study {study_uid}", destination and f"to {destination!r}",
            status and f"with status {status}"]))
        raise ResendError(f"no deliveries {what} (see 'pacsnode deliveries')")
