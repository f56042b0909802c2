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
from datetime import datetime
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import Engine, func, select

from db.tables import AssociationRecord, Delivery, Instance, Job, Result, Study
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


class DatabaseCollector:
    """The prometheus-client collector of the database's counts."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._steps = _Histogram(_STEP_BUCKETS)
        self._latency = _Histogram(_LATENCY_BUCKETS)
        self._jobs_mark, self._sent_mark = _Watermark(), _Watermark()

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
        count, size = conn.execute(select(func.count(Instance.id),
                                          func.coalesce(func.sum(Instance.file_size), 0))).one()
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
