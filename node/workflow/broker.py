"""The Celery side shared by receivers and workers (``jobs.executor: celery``).

The broker carries only job ids and destination names; the database stays the source
of truth. A receiver sends ``analyse(job_id)`` for every queued job
(:mod:`node.workflow.enqueue`) and ``deliver(destination)`` when something there is
due; ``pacsnode worker`` processes run them (:mod:`node.workflow.celery_worker`).
Analysis and delivery have their own queues, so a slow model never holds back results
that are ready to send.
"""

from __future__ import annotations

from typing import Any

from node.config import Settings

#: The task names, as sent over the broker (the receiver never imports the tasks).
ANALYSE = "pacsnode.analyse"
DELIVER = "pacsnode.deliver"
#: The queue kinds ``pacsnode worker --queues`` takes; the broker's queue names carry
#: ``jobs.queue_prefix``.
KINDS = ("analysis", "delivery")
_KIND_OF = {ANALYSE: "analysis", DELIVER: "delivery"}


def queue_name(settings: Settings, kind: str) -> str:
    return f"{settings.jobs.queue_prefix}.{kind}"


def make_app(settings: Settings) -> Any:
    """A Celery application for ``settings``' broker; nothing connects until used."""
    from celery import Celery
    from kombu import Queue

    jobs = settings.jobs
    app = Celery("pacsnode", broker=jobs.broker_url, set_as_current=False)
    app.conf.update(
        # A task is acknowledged when it ends, not when it starts: a worker killed
        # mid-job leaves the message to the broker, which hands it to another worker.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One task at a time per process: a second job must not wait behind a long
        # one in a busy worker while another worker is idle.
        worker_prefetch_multiplier=1,
        task_ignore_result=True,  # outcomes are in the database
        task_serializer="json",
        accept_content=["json"],
        task_queues=[Queue(queue_name(settings, kind), durable=True) for kind in KINDS],
        task_routes={name: {"queue": queue_name(settings, kind)}
                     for name, kind in _KIND_OF.items()},
        task_default_queue=queue_name(settings, "analysis"),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.delivery.connect_timeout_s,
        # Redis redelivers an unacknowledged task after this; it must outlast a job.
        broker_transport_options={"visibility_timeout": int(jobs.timeout_s * 2 + 60)},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app


def send(app: Any, settings: Settings, task: str, *args: Any, expires: float | None = None,
         ) -> None:
    """Publish one task; raises if the broker cannot be reached (the caller retries)."""
    app.send_task(task, args=list(args), queue=queue_name(settings, _KIND_OF[task]),
                  expires=expires, retry=True,
                  retry_policy={"max_retries": 2, "interval_start": 0.2,
                                "interval_step": 0.5, "interval_max": 1.0})
