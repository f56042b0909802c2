"""A receiver's workflow with ``jobs.executor: celery``: route, then enqueue.

The :class:`Enqueuer` takes the job runner's place in ``pacsnode serve``: it routes
stable studies into job rows as before (:func:`~node.workflow.jobs.queue_stable_studies`,
once per study however many receivers share the database), sends an ``analyse`` task
for every queued job, and a ``deliver`` task for each destination with something due.
Workers (:mod:`node.workflow.celery_worker`) do the rest.

A task is only a nudge: the job row says what to do. A job is sent in the transaction
that stamps ``enqueued_at``, so a receiver that dies in between leaves it unsent, and a
job still queued ``jobs.requeue_after_s`` after it was sent is sent again (a broker that
lost the message); a job interrupted on a worker is queued again by the lease takeover
and sent at once. A duplicate costs a worker one query.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Table, or_, select

from db.tables import CircuitState, Delivery, DeliveryStatus, DestinationState, utcnow
from node.config import Settings
from node.workflow import broker
from node.workflow.jobs import queue_stable_studies, stamp_enqueued, take_to_enqueue

log = logging.getLogger(__name__)

_deliveries: Table = Delivery.__table__  # type: ignore[assignment]
_states: Table = DestinationState.__table__  # type: ignore[assignment]


def destinations_due(engine: Engine, names: list[str], now: datetime) -> list[str]:
    """Configured destinations with a delivery due, a commitment outstanding, or a
    circuit that is not closed (its probe's timing is the sender's to judge)."""
    if not names:
        return []
    due = or_((_deliveries.c.status == DeliveryStatus.PENDING.value)
              & (_deliveries.c.next_attempt_at <= now),
              _deliveries.c.status == DeliveryStatus.AWAITING_COMMITMENT.value)
    with engine.connect() as conn:
        found = set(conn.execute(
            select(_deliveries.c.destination).where(_deliveries.c.destination.in_(names))
            .where(due).distinct()).scalars())
        found |= set(conn.execute(
            select(_states.c.name).where(_states.c.name.in_(names))
            .where(_states.c.state != CircuitState.CLOSED.value)).scalars())
    return sorted(found)


class Enqueuer(threading.Thread):
    """Routes stable studies and sends their jobs, and due deliveries, to the broker.

    Parameters
    ----------
    engine, settings
        The node's database and configuration (``jobs.executor: celery``).
    app
        The Celery application (:func:`node.workflow.broker.make_app`).
    """

    def __init__(self, engine: Engine, settings: Settings, app: Any) -> None:
        super().__init__(name="enqueuer", daemon=True)
        self.engine = engine
        self.settings = settings
        self.app = app
        self.wake = threading.Event()
        self._stop_event = threading.Event()
        self._names = [dest.name for dest in settings.destinations]
        self._nudged_at = 0.0

    def run(self) -> None:
        interval = self.settings.jobs.poll_interval_s
        while not self._stop_event.is_set():
            try:
                self.tick()
            except Exception:  # the database or the broker may be down for a while
                log.exception("enqueuer: retrying in %s s", interval)
            self.wake.wait(interval)
            self.wake.clear()

    def tick(self) -> None:
        if queued := queue_stable_studies(self.engine, self.settings):
            log.info("queued %s jobs", len(queued))
        self.send_jobs()
        self.nudge_deliveries()

    def send_jobs(self) -> int:
        """Send every queued job not yet sent (or sent long ago); returns how many."""
        sent = 0
        while True:
            now = utcnow()
            with self.engine.begin() as conn:
                ids = take_to_enqueue(conn, now, self.settings.jobs.requeue_after_s)
                for job_id in ids:
                    broker.send(self.app, self.settings, broker.ANALYSE, job_id)
                stamp_enqueued(conn, ids, now)
            sent += len(ids)
            if len(ids) < 500:
                if sent:
                    log.info("sent %s jobs to the broker", sent)
                return sent

    def nudge_deliveries(self) -> None:
        """A ``deliver`` task for each destination with something due (retries after a
        backoff, probes, commitments); results of a job just done are nudged by its
        worker at once. At most once per ``delivery.poll_interval_s`` (and 2 s), and each
        task expires soon after, so a backlog of nudges never builds up while no worker
        takes them."""
        interval = max(self.settings.delivery.poll_interval_s, 2.0)
        clock = time.monotonic()
        if clock - self._nudged_at < interval:
            return
        self._nudged_at = clock
        for name in destinations_due(self.engine, self._names, utcnow()):
            broker.send(self.app, self.settings, broker.DELIVER, name,
                        expires=5 * interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.wake.set()
        if self.is_alive():
            self.join(timeout=10)
