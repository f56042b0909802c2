"""Decide when a study is complete: no instance for ``study.stable_age_s``.

The state lives only in the database (``studies.status``, ``last_received_at``), so a
restarted node, or any other worker process, picks up exactly where it was: a study
that went quiet while the node was down becomes stable at the first check.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import Engine, Table, select, update

from db.tables import Study, StudyEvent, StudyStatus, utcnow

log = logging.getLogger(__name__)

_studies: Table = Study.__table__  # type: ignore[assignment]
_events: Table = StudyEvent.__table__  # type: ignore[assignment]


def mark_stable(engine: Engine, stable_age_s: float, now: datetime | None = None) -> list[str]:
    """Move quiet ``receiving`` studies to ``stable``; returns their Study Instance UIDs."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=stable_age_s)
    quiet = (_studies.c.status == StudyStatus.RECEIVING.value) & (
        _studies.c.last_received_at <= cutoff
    )
    changed: list[str] = []
    with engine.begin() as conn:
        rows = conn.execute(
            select(_studies.c.id, _studies.c.study_instance_uid).where(quiet)
        ).all()
        for study_id, uid in rows:
            # Re-check in the UPDATE: an instance may have arrived since the SELECT.
            done = conn.execute(
                update(_studies)
                .where(_studies.c.id == study_id)
                .where(quiet)
                .values(status=StudyStatus.STABLE.value, stable_at=now)
            ).rowcount
            if done:
                conn.execute(
                    _events.insert().values(
                        study_fk=study_id,
                        from_status=StudyStatus.RECEIVING.value,
                        to_status=StudyStatus.STABLE.value,
                        at=now,
                        reason=f"no instance received for {stable_age_s:g} s",
                    )
                )
                changed.append(uid)
    for uid in changed:
        log.info("study %s is stable", uid)
    return changed


class StabilityMonitor(threading.Thread):
    """Runs :func:`mark_stable` every ``interval_s`` until stopped."""

    def __init__(
        self, engine: Engine, stable_age_s: float, interval_s: float,
        on_stable: Callable[[list[str]], None] = lambda uids: None,
    ) -> None:
        super().__init__(name="stability-monitor", daemon=True)
        self.on_stable = on_stable
        self.engine = engine
        self.stable_age_s = stable_age_s
        self.interval_s = interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                if changed := mark_stable(self.engine, self.stable_age_s):
                    self.on_stable(changed)
            except Exception:  # a database outage must not kill the monitor
                log.exception("stability check failed; retrying in %s s", self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
