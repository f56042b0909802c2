"""In-process Prometheus metrics of the receiving process (served at ``/metrics`` with
the counts :mod:`node.web.metrics` reads from the database)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

CSTORE_SECONDS = Histogram(
    "pacsnode_cstore_seconds",
    "Time from a C-STORE's first data to its answer, in this process",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
CSTORE_ANSWERS = Counter(
    "pacsnode_cstore_answers_total",
    "C-STORE answers of this process by status (success, or the refusal's reason)",
    ["status"],
)


def stored(status: str, seconds: float) -> None:
    """One C-STORE answered with ``status`` (a :class:`StoreStatus` name) after
    ``seconds``."""
    CSTORE_SECONDS.observe(seconds)
    CSTORE_ANSWERS.labels(status.lower()).inc()
