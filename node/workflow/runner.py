"""The job runner of the process and inline executors: routes stable studies and
keeps the executor's workers fed with the queued jobs it claims (:mod:`node.workflow.jobs`
holds the rows and their transitions; with ``jobs.executor: celery``,
:mod:`node.workflow.enqueue` takes this runner's place).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from sqlalchemy import Engine, select

from db.tables import JobStatus, utcnow
from node.config import Settings
from node.leases import Lease
from node.workflow.jobs import _jobs, claim_jobs, queue_stable_studies, requeue_if_held

log = logging.getLogger(__name__)


class JobRunner(threading.Thread):
    """Routes stable studies and keeps the executor fed with queued jobs.

    Parameters
    ----------
    engine, settings
        The node's database and configuration.
    executor
        Where jobs run (:mod:`node.workflow.executor`): ``submit(job_id)`` returns a
        future that ends when the worker has recorded the job's outcome; ``kill(job_id)``
        stops the worker running it (a job over ``jobs.timeout_s``).
    lease
        This process's identity: claimed jobs are leased to it.
    on_job_end
        Called after each job, e.g. to wake the delivery worker.
    """

    def __init__(
        self, engine: Engine, settings: Settings, executor: Any, lease: Lease,
        on_job_end: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(name="job-runner", daemon=True)
        self.engine = engine
        self.settings = settings
        self.executor = executor
        self.lease = lease
        self.on_job_end = on_job_end
        self.wake = threading.Event()
        self._stop_event = threading.Event()
        self._running: dict[int, float] = {}  # job id -> time.monotonic() at submit
        self._timed_out: set[int] = set()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self._tick()
            except Exception:  # a database outage must not kill the runner
                log.exception("job runner: retrying in %s s", self.settings.jobs.poll_interval_s)
            self.wake.wait(self.settings.jobs.poll_interval_s)
            self.wake.clear()

    def _tick(self) -> None:
        self._stop_overdue()
        if self._stop_event.is_set():
            return
        if queued := queue_stable_studies(self.engine, self.settings):
            log.info("queued %s jobs", len(queued))
        with self._lock:
            free = self.executor.capacity - len(self._running)
        for job_id in claim_jobs(self.engine, free, self.lease):
            with self._lock:
                self._running[job_id] = time.monotonic()
            future = self.executor.submit(job_id)
            future.add_done_callback(lambda f, job_id=job_id: self._ended(job_id, f))

    def _stop_overdue(self) -> None:
        """Kill the worker of a job over ``jobs.timeout_s``; the job ends in _ended.

        Counted from when the worker began the job (:func:`mark_started`), not from the
        claim: a freshly started worker first spends seconds loading its libraries and
        models. A worker that never begins it gets ``_STARTUP_S`` more.
        """
        limit = self.settings.jobs.timeout_s
        with self._lock:
            running = {job_id: submitted for job_id, submitted in self._running.items()
                       if job_id not in self._timed_out}
        if not running:
            return
        now, clock = utcnow(), time.monotonic()
        with self.engine.connect() as conn:
            started = conn.execute(
                select(_jobs.c.id, _jobs.c.started_at).where(_jobs.c.id.in_(list(running)))
                .where(_jobs.c.status == JobStatus.RUNNING.value)).all()
        overdue = [job_id for job_id, at in started
                   if ((now - at).total_seconds() > limit if at is not None
                       else clock - running[job_id] > limit + _STARTUP_S)]
        with self._lock:
            self._timed_out.update(overdue)
        for job_id in overdue:
            log.error("job %s: running for over %s s (jobs.timeout_s); stopping its worker",
                      job_id, _seconds(limit))
            if not self.executor.kill(job_id):
                log.error("job %s: this executor cannot stop a running job", job_id)

    def _ended(self, job_id: int, future: Future[None]) -> None:
        with self._lock:
            self._running.pop(job_id, None)
            timed_out = job_id in self._timed_out
            self._timed_out.discard(job_id)
        error = future.exception()
        if timed_out or error is not None:
            # The worker records its own failures; reaching here means it died (killed
            # for its timeout, out of memory) or could not reach the database.
            if timed_out:
                why = f"timed out after {_seconds(self.settings.jobs.timeout_s)} s"
            elif self._stop_event.is_set():
                why = "interrupted: the node stopped while it ran"
            else:
                why = f"worker died: {error!r}"
            log.error("job %s: %s", job_id, why)
            try:
                self._requeue_or_fail(job_id, why)
            except Exception:
                log.exception("job %s: cannot record the worker's failure", job_id)
        self.on_job_end()
        self.wake.set()

    def _requeue_or_fail(self, job_id: int, why: str) -> None:
        requeue_if_held(self.engine, job_id, self.lease.owner,
                        self.settings.jobs.max_attempts, why)

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def stop(self) -> None:
        self._stop_event.set()
        self.wake.set()
        if self.is_alive():
            self.join(timeout=10)


#: How long a worker may take to begin a claimed job (start-up: libraries, models).
_STARTUP_S = 120.0


def _seconds(value: float) -> str:
    return f"{value:g}"
