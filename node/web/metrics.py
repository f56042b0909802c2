"""``/metrics``: Prometheus counts read from the database at each scrape, so they cover
every process sharing it (analysis workers, other receivers), plus this process's own
histograms (:mod:`node.metrics`).

Step durations and the end-to-end latency are histograms built from the database as
well: each scrape adds the jobs finished, and the deliveries sent, since the last one
(a watermark on their time), so the counts only grow, as Prometheus expects.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import Engine, func, select

from db.tables import (
    AssociationOutcome,
    AssociationRecord,
    Delivery,
    Instance,
    Job,
    Result,
    Study,
    utcnow,
)
from node.audit_queries import read_session

_STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_LATENCY_BUCKETS = (5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600, 21600, 86400)


class _Histogram:
    """Cumulative bucket counts of observations, per label value."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, label: str, value: float) -> None:
        counts = self.counts.setdefault(label, [0] * (len(self.buckets) + 1))
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                counts[index] += 1
        counts[-1] += 1  # +Inf
        self.sums[label] = self.sums.get(label, 0.0) + value

    def family(self, name: str, doc: str, label: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=[label] if label else [])
        for value, counts in sorted(self.counts.items()):
            buckets = [(str(b), c) for b, c in zip(self.buckets, counts, strict=False)]
            buckets.append(("+Inf", counts[-1]))
            family.add_metric([value] if label else [], buckets, self.sums[value])
        return family


class _Watermark:
    """Rows newer than the last scrape, by (time, id): each row is counted once."""

    def __init__(self) -> None:
        self.at: datetime | None = None
        self.ids_at: set[int] = set()

    def fresh(self, rows: list[Any]) -> list[Any]:
        """``rows`` of (id, at, ...) ordered by at; those not seen yet."""
        out = [r for r in rows if not (r[1] == self.at and r[0] in self.ids_at)]
        if rows:
            last = rows[-1][1]
            if last != self.at:
                self.at, self.ids_at = last, set()
            self.ids_at |= {r[0] for r in rows if r[1] == last}
        return out

    def where(self, column: Any) -> list[Any]:
        return [] if self.at is None else [column >= self.at]


#: How long after its arrival an instance row may still be uncommitted (its transaction
#: took that id, then the commit came later), resized or removed: far longer than an
#: instance's transaction, or than the gap between closing a dead process's
#: associations and removing their unacknowledged rows.
SETTLE_S = 600.0


class _InstanceTotals:
    """``count(*)`` and ``sum(file_size)`` of the instances, without reading them all.

    Rows up to a mark on the primary key are settled: counted once, kept in this
    process. A scrape counts only the rows above the mark, then moves the mark to the
    newest row that can no longer change: older than :data:`SETTLE_S` (so every row
    with a lower id has committed or rolled back) and below every row of an
    association that is open or has just been closed as interrupted (whose rows may
    yet be resized, taken back, or removed). Exact across processes sharing the
    database: each reads the same rows. Instances are removed only by those paths
    (:meth:`InstanceIndex.forget` and :meth:`~InstanceIndex.drop_unfiled`); should a
    row below the mark ever be found mutable, the totals are counted again from zero.
    """

    def __init__(self) -> None:
        self.mark = 0
        self.count = 0
        self.size = 0

    def read(self, conn: Any, now: datetime) -> tuple[int, int]:
        newest_old, first_live = self._bounds(conn, now)
        if first_live is not None and first_live <= self.mark:
            self.mark = self.count = self.size = 0  # should not happen: start over
        settled = newest_old if first_live is None else min(newest_old, first_live - 1)
        if settled > self.mark:
            count, size = self._rows(conn, self.mark, settled)
            self.mark, self.count, self.size = settled, self.count + count, self.size + size
        count, size = self._rows(conn, self.mark, None)
        return self.count + count, self.size + size

    @staticmethod
    def _rows(conn: Any, above: int, up_to: int | None) -> tuple[int, int]:
        """Count and bytes of the rows with ``above < id <= up_to`` (a primary-key range)."""
        query = select(func.count(Instance.id), func.coalesce(func.sum(Instance.file_size), 0)) \
            .where(Instance.id > above)
        if up_to is not None:
            query = query.where(Instance.id <= up_to)
        count, size = conn.execute(query).one()
        return int(count), int(size)

    @staticmethod
    def _bounds(conn: Any, now: datetime) -> tuple[int, int | None]:
        """(The newest row by arrival older than SETTLE_S or 0, the first row of a live
        association or None)."""
        old = now - timedelta(seconds=SETTLE_S)
        # The newest row by arrival older than SETTLE_S (ix_instances_received, backwards).
        newest_old = conn.execute(
            select(Instance.id).where(Instance.received_at < old)
            .order_by(Instance.received_at.desc()).limit(1)).scalar_one_or_none()
        live = select(AssociationRecord.id).where(
            (AssociationRecord.outcome == AssociationOutcome.OPEN.value)
            | ((AssociationRecord.outcome == AssociationOutcome.INTERRUPTED.value)
               & (AssociationRecord.ended_at >= old)))
        first_live = conn.execute(select(func.min(Instance.id))
                                  .where(Instance.association_fk.in_(live))).scalar_one()
        return int(newest_old or 0), None if first_live is None else int(first_live)


class DatabaseCollector:
    """The prometheus-client collector of the database's counts."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._steps = _Histogram(_STEP_BUCKETS)
        self._latency = _Histogram(_LATENCY_BUCKETS)
        self._jobs_mark, self._sent_mark = _Watermark(), _Watermark()
        self._instances = _InstanceTotals()

    def collect(self) -> Iterator[Any]:
        with self._lock, read_session(self.engine) as conn:
            yield from self._counts(conn)
            self._add_steps(conn)
            self._add_latency(conn)
            yield self._steps.family("pacsnode_job_step_seconds",
                                     "Duration of each analysis step of finished jobs", "step")
            yield self._latency.family(
                "pacsnode_delivery_latency_seconds",
                "From a study's last instance to each of its results delivered", "")

    def _counts(self, conn: Any) -> Iterator[Any]:
        count, size = self._instances.read(conn, utcnow())
        yield GaugeMetricFamily("pacsnode_instances", "Instances stored", value=int(count))
        yield GaugeMetricFamily("pacsnode_stored_bytes", "Bytes of the stored instances",
                                value=int(size))
        yield GaugeMetricFamily("pacsnode_studies", "Studies held",
                                value=int(conn.execute(select(func.count(Study.id))).scalar_one()))
        refused = conn.execute(select(func.coalesce(func.sum(AssociationRecord.instances_failed),
                                                    0))).scalar_one()
        yield GaugeMetricFamily("pacsnode_instances_refused",
                                "Instances refused (answered with a failure status)",
                                value=int(refused))
        yield _grouped(conn, "pacsnode_associations", "Associations by outcome",
                       [AssociationRecord.outcome], ["outcome"])
        yield _grouped(conn, "pacsnode_jobs", "Analysis jobs by status", [Job.status], ["status"])
        queued = conn.execute(select(func.count()).where(Job.status == "queued")).scalar_one()
        yield GaugeMetricFamily("pacsnode_job_queue_depth", "Jobs waiting for a worker",
                                value=int(queued))
        yield _grouped(conn, "pacsnode_deliveries", "Deliveries by status and destination",
                       [Delivery.status, Delivery.destination], ["status", "destination"])

    def _add_steps(self, conn: Any) -> None:
        rows = conn.execute(
            select(Job.id, Job.finished_at, Job.timings).where(Job.status == "done")
            .where(Job.finished_at.is_not(None), *self._jobs_mark.where(Job.finished_at))
            .order_by(Job.finished_at, Job.id)).all()
        for _id, _at, timings in self._jobs_mark.fresh(rows):
            for step, seconds in json.loads(timings or "{}").items():
                if isinstance(seconds, (int, float)):
                    self._steps.observe(step, float(seconds))

    def _add_latency(self, conn: Any) -> None:
        rows = conn.execute(
            select(Delivery.id, Delivery.sent_at, Study.last_received_at)
            .join(Result, Result.id == Delivery.result_fk).join(Job, Job.id == Result.job_fk)
            .join(Study, Study.id == Job.study_fk)
            .where(Delivery.status == "sent", Delivery.sent_at.is_not(None),
                   *self._sent_mark.where(Delivery.sent_at))
            .order_by(Delivery.sent_at, Delivery.id)).all()
        for _id, sent_at, last_received in self._sent_mark.fresh(rows):
            self._latency.observe("", max((sent_at - last_received).total_seconds(), 0.0))


def _grouped(conn: Any, name: str, doc: str, columns: list[Any],
             labels: list[str]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for *values, count in conn.execute(select(*columns, func.count()).group_by(*columns)):
        family.add_metric([str(v) for v in values], int(count))
    return family


class Metrics:
    """What ``/metrics`` serves: this process's registry and the database's counts."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(DatabaseCollector(engine))

    def render(self) -> bytes:
        import node.metrics  # noqa: F401  (registers the C-STORE histogram)

        return generate_latest(REGISTRY) + generate_latest(self.registry)
