"""``pacsnode worker``: a Celery worker that runs analysis and delivery tasks.

Each worker process (Celery's prefork children) is set up once when it starts: the
configuration, the database, the store, its own lease identity with a heartbeat
(:mod:`node.leases`), and, when it serves the analysis queue, the models
(:func:`node.workflow.worker.warm_up`). Then:

- ``analyse(job_id)`` claims the job in the database (:func:`~node.workflow.jobs.claim_job`)
  and runs it exactly as the process executor does (:func:`node.workflow.worker.run_job`);
  a task for a job that already ended, or that another worker holds, is a no-op. A job
  over ``jobs.timeout_s`` is interrupted and queued again (up to ``jobs.max_attempts``).
  When it is done, its results are sent at once from the same process, so they never
  wait behind other jobs in a busy queue.
- ``deliver(destination)`` runs the destination's outbox rounds
  (:class:`node.workflow.delivery.DestinationSender`) until nothing more is due: the
  retries, probes and Storage Commitment requests that receivers nudge.

Tasks are acknowledged when they end: a worker killed mid-job leaves its message to the
broker and its job to the lease takeover, so another worker runs it.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select

from node import __version__, leases
from node.config import ConfigError, Settings
from node.workflow import broker

log = logging.getLogger(__name__)

#: Rounds one ``deliver`` task may run before it leaves the rest to the next task.
_MAX_ROUNDS = 50


@dataclass
class _Process:
    settings: Settings
    engine: Engine
    lease: leases.Lease
    heartbeat: leases.Heartbeat
    app: Any
    senders: dict[str, Any] = field(default_factory=dict)


_process: _Process | None = None


def _start_process(app: Any, settings: Settings, analysis: bool) -> None:
    """In each new worker process: connect, take an identity, load the models."""
    global _process
    from node.audit import atna
    from node.workflow import delivery, jobs, worker

    worker.init_worker(settings.model_dump(mode="json"), child=False)
    worker._die_with_parent()  # noqa: SLF001 - a worker must not outlive a killed parent
    assert worker._worker is not None  # noqa: SLF001
    engine = worker._worker.engine  # noqa: SLF001
    lease = leases.register(engine, settings.jobs.lease_s, __version__)
    max_attempts = settings.jobs.max_attempts
    heartbeat = leases.Heartbeat(engine, lease, [
        lambda e, now: jobs.take_over_expired(e, now, max_attempts),
        delivery.take_over_expired,
    ])
    heartbeat.beat()
    heartbeat.start()
    atna.start(settings, engine, "worker")
    _process = _Process(settings, engine, lease, heartbeat, app)
    if analysis:
        worker.warm_up()


def _stop_process() -> None:
    from node.audit import atna

    process = _process
    if process is None:
        return
    process.heartbeat.stop()
    try:
        leases.release(process.engine, process.lease)
    except Exception:  # the database may be gone; the lease then simply expires
        log.exception("could not release this worker's lease")
    atna.stop()


def _state() -> _Process:
    assert _process is not None, "the worker process was not set up"
    return _process


def analyse(task: Any, job_id: int) -> None:
    """Claim and run one job; send its results' deliveries on."""
    from celery.exceptions import SoftTimeLimitExceeded

    from node.workflow import jobs, worker

    process = _state()
    claimed = jobs.claim_job(process.engine, job_id, process.lease)
    if claimed == "waiting":
        # Another job of its series runs: this one follows it.
        raise task.retry(countdown=max(process.settings.jobs.poll_interval_s, 2.0),
                         max_retries=None)
    if claimed != "claimed":
        log.info("job %s: %s; nothing to do", job_id,
                 "held by another worker" if claimed == "running" else "already ended")
        return
    try:
        worker.run_job(job_id, reraise=(SoftTimeLimitExceeded,))
    except SoftTimeLimitExceeded:
        _timed_out(process, job_id)
    _deliver_results(process, job_id)


def _timed_out(process: _Process, job_id: int) -> None:
    from node.workflow.jobs import requeue_if_held

    limit = process.settings.jobs.timeout_s
    log.error("job %s: running for over %g s (jobs.timeout_s); stopped", job_id, limit)
    requeue_if_held(process.engine, job_id, process.lease.owner,
                    process.settings.jobs.max_attempts, f"timed out after {limit:g} s")


def _deliver_results(process: _Process, job_id: int) -> None:
    """Send the job's results now, from this process: they never wait in the delivery
    queue behind other jobs' analysis. What cannot go now (the PACS is down) is retried
    by ``deliver`` tasks, which the receivers send while something is due."""
    from db.tables import Delivery, DeliveryStatus, Result

    with process.engine.connect() as conn:
        names = conn.execute(
            select(Delivery.destination).join(Result, Result.id == Delivery.result_fk)
            .where(Result.job_fk == job_id)
            .where(Delivery.status == DeliveryStatus.PENDING.value).distinct()).scalars().all()
    for name in names:
        try:
            deliver(name)
        except Exception:  # recorded as the delivery's failure where it could be
            log.exception("job %s: delivering to %s failed; it is retried", job_id, name)


def deliver(destination: str) -> None:
    """Send what is due to ``destination`` (and probe it, and ask for commitments)."""
    from db.tables import utcnow
    from node.workflow.delivery import DestinationSender

    process = _state()
    dest = next((d for d in process.settings.destinations if d.name == destination), None)
    if dest is None:
        log.warning("deliver task for %r, which this worker's configuration does not "
                    "name; it is left pending", destination)
        return
    sender = process.senders.get(destination)
    if sender is None:
        sender = process.senders[destination] = DestinationSender(
            process.engine, process.settings, process.lease, dest)
    for _ in range(_MAX_ROUNDS):
        if not sender.round(utcnow()):
            break


def make_worker_app(settings: Settings, queues: list[str]) -> Any:
    """The Celery application with the tasks and the per-process set-up bound."""
    from celery import signals

    app = broker.make_app(settings)
    timeout = settings.jobs.timeout_s
    app.task(name=broker.ANALYSE, bind=True, soft_time_limit=timeout,
             time_limit=timeout + 60)(analyse)
    app.task(name=broker.DELIVER)(deliver)
    analysis = "analysis" in queues

    # weak=False: the receivers are closures, which would be collected at once.
    @signals.worker_process_init.connect(weak=False)
    def _init(**_kwargs: Any) -> None:
        _start_process(app, settings, analysis)

    @signals.worker_process_shutdown.connect(weak=False)
    def _shutdown(**_kwargs: Any) -> None:
        _stop_process()

    return app


def check_before_start(settings: Settings) -> None:
    """What ``serve`` checks at start, for a worker: the schema, the pipelines, the
    models (loaded in a spawned process, so that no TensorFlow state is forked).

    Raises
    ------
    node.app.StartError, node.config.ConfigError
        What to fix.
    """
    from db.tables import utcnow
    from node.app import check_pipelines, open_database, prepare_database
    from node.workflow import breaker
    from node.workflow.executor import ProcessExecutor

    if settings.jobs.executor != "celery":
        raise ConfigError("invalid configuration:\n  jobs.executor: pacsnode worker needs "
                          "executor: celery (and jobs.broker_url)")
    check_pipelines(settings)
    engine = open_database(settings)
    try:
        prepare_database(engine, upgrade_empty=False)
        breaker.ensure(engine, [dest.name for dest in settings.destinations], utcnow())
    finally:
        engine.dispose()
    executor = ProcessExecutor(settings)
    try:
        executor.check_models()
    finally:
        executor.shutdown()


def run_worker(settings: Settings, concurrency: int, queues: list[str],
               loglevel: str) -> None:
    """Check, then run the Celery worker until it is stopped (SIGTERM: a warm stop,
    letting running tasks end)."""
    check_before_start(settings)
    app = make_worker_app(settings, queues)
    names = ",".join(broker.queue_name(settings, kind) for kind in queues)
    app.worker_main(argv=[
        "worker", f"--concurrency={concurrency}", f"--queues={names}", "--pool=prefork",
        f"--loglevel={loglevel}", "--without-mingle", "--without-gossip",
        f"--hostname=pacsnode-{uuid.uuid4().hex[:8]}@%h",
    ])
