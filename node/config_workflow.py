"""The ``jobs`` and ``delivery`` sections of the configuration (see :mod:`node.config`).

Kept apart from :mod:`node.config` so that each stays a readable size; the rules are
the same: unknown keys are errors, and every message names its key.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobsConfig(_Section):
    """Where and how series are analysed.

    ``executor``: ``process`` (worker processes beside the receiver, the default),
    ``inline`` (threads, for debugging) or ``celery``: the receiver only routes and
    enqueues, and ``pacsnode worker`` processes (any number, on any host) take the
    analysis and delivery tasks from the broker at ``broker_url``.
    """

    executor: str = Field("process", pattern="^(process|inline|celery)$")
    workers: int = Field(1, ge=1, description="analysis processes")
    broker_url: str | None = Field(
        None, description="the Celery broker (executor: celery): amqp://user:password@"
        "host:5672/vhost for RabbitMQ, or redis://host:6379/0"
    )
    queue_prefix: str = Field(
        "pacsnode", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="executor celery: the "
        "broker's queues are PREFIX.analysis and PREFIX.delivery (several nodes can share "
        "one broker)"
    )
    requeue_after_s: float = Field(
        1800.0, gt=0, description="executor celery: a job still queued this long after "
        "its task was sent is sent again (a message the broker lost); a duplicate is a "
        "no-op, as a worker claims a job only once"
    )
    max_attempts: int = Field(
        3, ge=1, description="runs of a job interrupted by crashes or timeouts before it is failed"
    )
    poll_interval_s: float = Field(1.0, gt=0)
    lease_s: float = Field(
        30.0, ge=1, description="how long work (jobs, deliveries, associations) stays a "
        "process's without its heartbeat; then any process takes it over"
    )
    timeout_s: float = Field(
        600.0, gt=0, description="a job running longer has its worker killed and replaced"
    )

    @model_validator(mode="after")
    def _broker(self) -> Self:
        if self.executor == "celery":
            if not self.broker_url:
                raise ValueError("broker_url is required with executor: celery (for "
                                 "example amqp://guest:guest@localhost:5672//)")
            scheme = self.broker_url.split("://", 1)[0]
            if scheme not in {"amqp", "pyamqp", "amqps", "redis", "rediss"}:
                raise ValueError(f"broker_url: {scheme!r} is not a broker this node "
                                 "supports (amqp://, amqps://, redis://, rediss://)")
        return self


class DeliveryConfig(_Section):
    """The outbox: a sender per destination; failed sends retried with exponential
    backoff and jitter for ``max_age_h``; ``breaker_failures`` failed rounds in a row
    open a destination's circuit: one probe per backoff interval, until one succeeds."""

    retry_initial_s: float = Field(5.0, gt=0, description="backoff after the first failure")
    retry_max_s: float = Field(600.0, gt=0, description="the longest backoff")
    retry_jitter: float = Field(
        0.2, ge=0, lt=1, description="each backoff is scaled by a random factor in "
        "1 +- retry_jitter, so senders that failed together do not retry together"
    )
    max_age_h: float = Field(
        72.0, gt=0, description="a delivery not confirmed this long after it was queued is failed"
    )
    connect_timeout_s: float = Field(
        10.0, gt=0, description="TCP connect, and the A-ASSOCIATE answer, each within this"
    )
    breaker_failures: int = Field(
        5, ge=1, description="failed rounds in a row that open a destination's circuit"
    )
    commitment_timeout_s: float = Field(
        600.0, gt=0, description="Storage Commitment asked again if no report came by then"
    )
    poll_interval_s: float = Field(1.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_attempts" in data:
            raise ValueError(
                "max_attempts was removed: a delivery is now retried for "
                "delivery.max_age_h hours (default 72), then failed; set "
                "delivery.max_age_h instead")
        return data

    @model_validator(mode="after")
    def _backoff_range(self) -> Self:
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError(f"retry_max_s ({self.retry_max_s:g}) must be at least "
                             f"retry_initial_s ({self.retry_initial_s:g})")
        return self
