"""Jobs: one row per series per stable point, from routing to done, failed or skipped.

The database is the queue: a stable study's series are routed into job rows
(:func:`queue_stable_studies`); a :class:`~node.workflow.runner.JobRunner` claims
queued rows and hands their ids to an executor (:mod:`node.workflow.executor`), or,
with ``jobs.executor: celery``, :mod:`node.workflow.enqueue` sends their ids to the
broker and a worker claims each itself (:func:`claim_job`). The worker that runs a job
records its outcome (:mod:`node.workflow.worker`). Nothing about a job lives only in
memory, so a crash or restart loses nothing: a running job is leased by the process that
claimed it (:mod:`node.leases`), and :func:`take_over_expired` puts the jobs of a
process whose lease ran out back in the queue, whichever process on whichever host
notices first.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import Connection, Engine, Table, exists, func, select, update
from sqlalchemy.orm import aliased

from db.tables import (
    AssociationRecord,
    Instance,
    Job,
    JobStatus,
    Result,
    Series,
    Study,
    StudyEvent,
    StudyStatus,
    utcnow,
)
from node.config import Settings
from node.leases import Lease, LeaseLost, expired, released
from node.workflow.routing import SeriesFacts, choose_route, facts_from_datasets

log = logging.getLogger(__name__)

_jobs: Table = Job.__table__  # type: ignore[assignment]
_studies: Table = Study.__table__  # type: ignore[assignment]
_events: Table = StudyEvent.__table__  # type: ignore[assignment]

ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
#: Header attributes routing reads from sampled instance files.
_ROUTING_TAGS = ["Modality", "BodyPartExamined", "SeriesDescription", "ImageType",
                 "Manufacturer", "SOPClassUID"]


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs to run one job."""

    job_id: int
    route: str | None
    study_instance_uid: str
    series_instance_uid: str
    pipeline: str  # "" while routing waits for the predicted region
    destinations: list[str]
    files: list[Path]  # absolute paths, in instance number order
    calling_aes: frozenset[str] = frozenset()
    owner: str | None = None  # the process holding the job's lease when it was loaded


# -- routing a stable study into jobs ---------------------------------------------------


def _sample(paths: list[str]) -> list[str]:
    """First, middle and last instance: enough to spot a localizer or a foreign object."""
    if len(paths) <= 3:
        return paths
    return [paths[0], paths[len(paths) // 2], paths[-1]]


def _series_facts(conn: Connection, data_dir: Path, series: Any) -> SeriesFacts:
    rows = conn.execute(
        select(Instance.file_path, Instance.sop_class_uid, AssociationRecord.calling_ae)
        .join(AssociationRecord, Instance.association_fk == AssociationRecord.id, isouter=True)
        .where(Instance.series_fk == series.id)
        .order_by(Instance.instance_number, Instance.id)
    ).all()
    headers = []
    for path in _sample([row.file_path for row in rows]):
        try:
            headers.append(pydicom.dcmread(data_dir / path, stop_before_pixels=True,
                                           specific_tags=_ROUTING_TAGS))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            log.warning("cannot read %s for routing: %s", path, exc)
    facts = facts_from_datasets(series.series_instance_uid, headers,
                                {row.calling_ae for row in rows if row.calling_ae})
    ours = conn.execute(
        select(func.count(Result.id)).where(
            Result.series_instance_uid == series.series_instance_uid)
    ).scalar_one() > 0
    # The database knows every instance; the sampled headers only some.
    return replace(facts, modality=facts.modality or series.modality,
                   sop_classes=frozenset(row.sop_class_uid for row in rows),
                   instances=len(rows), ours=facts.ours or ours)


def _latest_job(conn: Connection, series_id: int) -> tuple[str, int] | None:
    row = conn.execute(
        select(_jobs.c.status, _jobs.c.instances)
        .where(_jobs.c.series_fk == series_id)
        .order_by(_jobs.c.id.desc())
        .limit(1)
    ).first()
    return None if row is None else (row.status, row.instances)


def _plan_study(conn: Connection, settings: Settings, study_id: int,
                facts_of: dict[int, SeriesFacts], now: datetime,
                rerun: bool = False) -> list[int]:
    queued: list[int] = []
    for series_id, facts in facts_of.items():
        latest = _latest_job(conn, series_id)
        if not rerun and latest is not None and latest[1] == facts.instances \
                and latest[0] != JobStatus.FAILED.value:
            continue  # unchanged since its last routing: its results stand
        # A failed series gets another run whenever its study becomes stable again:
        # what failed may have been an instance still arriving (see Ingestor._touch).
        decision = choose_route(facts, settings.routes)
        route = decision.route
        job_id = int(conn.execute(
            _jobs.insert().values(
                study_fk=study_id,
                series_fk=series_id,
                route=route.name if route else None,
                pipeline=route.pipeline if route else None,
                destinations=json.dumps(settings.route_destinations(route) if route else []),
                status=JobStatus.SKIPPED.value if decision.skipped else JobStatus.QUEUED.value,
                reason=("rerun requested; " if rerun else "") + decision.reason,
                instances=facts.instances,
                attempt=0,
                queued_at=now,
                finished_at=now if decision.skipped else None,
                timings="{}",
            )
        ).inserted_primary_key[0])
        _supersede_queued(conn, series_id, job_id, now)
        log.info("series %s: %s", facts.series_instance_uid, decision.reason)
        if not decision.skipped:
            queued.append(job_id)
    return queued


def _supersede_queued(conn: Connection, series_id: int, job_id: int, now: datetime) -> None:
    """An older job of the series that has not started is replaced by the new one (the
    series changed since); one that is running finishes first, and the new one waits
    for it (:func:`claim_jobs`), so no two jobs of a series ever run at once."""
    conn.execute(
        update(_jobs).where(_jobs.c.series_fk == series_id).where(_jobs.c.id != job_id)
        .where(_jobs.c.status == JobStatus.QUEUED.value)
        .values(status=JobStatus.SKIPPED.value, finished_at=now,
                reason=f"superseded by job {job_id}: the series changed before it ran"))


def _study_facts(engine: Engine, settings: Settings, study_id: int) -> dict[int, SeriesFacts]:
    """Each series' routing facts, read (files included) without the write lock: on
    SQLite a write transaction held while headers are read would stall every store."""
    with engine.connect().execution_options(readonly=True) as conn, conn.begin():
        all_series = conn.execute(
            select(Series.id, Series.series_instance_uid, Series.modality)
            .where(Series.study_fk == study_id).order_by(Series.id)
        ).all()
        return {series.id: _series_facts(conn, settings.storage.data_dir, series)
                for series in all_series}


def _set_study_status(
    conn: Connection, study_id: int, from_status: str, to_status: str, reason: str,
    now: datetime,
) -> bool:
    """Move a study on, unless something (a late instance) moved it first."""
    done = conn.execute(
        update(_studies)
        .where(_studies.c.id == study_id)
        .where(_studies.c.status == from_status)
        .values(status=to_status)
    ).rowcount
    if done:
        conn.execute(_events.insert().values(
            study_fk=study_id, from_status=from_status, to_status=to_status, at=now,
            reason=reason,
        ))
    return bool(done)


def _settle_study(conn: Connection, study_id: int, now: datetime) -> None:
    """A study whose jobs have all ended is ``analyzed`` (whatever each job's outcome);
    the event sums them up.

    The study's row is locked first: two workers ending a study's last two jobs at once
    each see the other's job running unless the second counts after the first commits
    (on PostgreSQL; SQLite serialises writers anyway).
    """
    conn.execute(select(_studies.c.id).where(_studies.c.id == study_id).with_for_update())
    counts = dict(conn.execute(
        select(_jobs.c.status, func.count())
        .where(_jobs.c.study_fk == study_id)
        .group_by(_jobs.c.status)
    ).all())
    if any(counts.get(status, 0) for status in ACTIVE):
        return
    summary = ", ".join(f"{counts[s]} {s}" for s in sorted(counts)) or "no series"
    _set_study_status(conn, study_id, StudyStatus.PROCESSING.value,
                      StudyStatus.JOBS_ENDED.value, f"jobs ended: {summary}", now)


def queue_stable_studies(engine: Engine, settings: Settings) -> list[int]:
    """Route every ``stable`` study's series into jobs; returns the queued job ids."""
    queued: list[int] = []
    with engine.connect().execution_options(readonly=True) as conn, conn.begin():
        studies = conn.execute(
            select(_studies.c.id).where(_studies.c.status == StudyStatus.STABLE.value)
            .order_by(_studies.c.id)
        ).scalars().all()
    for study_id in studies:
        facts_of = _study_facts(engine, settings, study_id)
        now = utcnow()
        with engine.begin() as conn:
            # Still stable? A late instance may have reopened it while we read.
            still = conn.execute(
                select(_studies.c.id).where(_studies.c.id == study_id)
                .where(_studies.c.status == StudyStatus.STABLE.value).with_for_update()
            ).first()
            if still is None:
                continue
            new = _plan_study(conn, settings, study_id, facts_of, now)
            queued += new
            _set_study_status(conn, study_id, StudyStatus.STABLE.value,
                              StudyStatus.PROCESSING.value,
                              f"{len(new)} series queued for analysis", now)
            _settle_study(conn, study_id, now)
    return queued


class RerunError(LookupError):
    """A rerun that cannot be queued; the message says why."""


def queue_rerun(engine: Engine, settings: Settings, study_uid: str,
                series_uid: str | None = None) -> list[int]:
    """Route a study's series (or one of them) again, as if they had changed: new jobs,
    new results; the earlier jobs and results stay in the audit. Returns the queued
    job ids (a series the routes skip gets a skipped job, not queued).

    Raises
    ------
    RerunError
        No such study or series, or the study is still receiving instances.
    """
    with engine.connect().execution_options(readonly=True) as conn, conn.begin():
        study = conn.execute(select(_studies.c.id, _studies.c.status)
                             .where(_studies.c.study_instance_uid == study_uid)).first()
    if study is None:
        raise RerunError(f"no study {study_uid} here")
    if study.status == StudyStatus.RECEIVING.value:
        raise RerunError(f"study {study_uid} is still receiving instances; it is analysed "
                         "once stable")
    facts_of = _study_facts(engine, settings, study.id)
    if series_uid is not None:
        facts_of = {k: f for k, f in facts_of.items() if f.series_instance_uid == series_uid}
        if not facts_of:
            raise RerunError(f"study {study_uid} has no series {series_uid}")
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(select(_studies.c.id).where(_studies.c.id == study.id).with_for_update())
        queued = _plan_study(conn, settings, study.id, facts_of, now, rerun=True)
        current = conn.execute(select(_studies.c.status)
                               .where(_studies.c.id == study.id)).scalar_one()
        if current not in (StudyStatus.RECEIVING.value, StudyStatus.PROCESSING.value):
            _set_study_status(conn, study.id, current, StudyStatus.PROCESSING.value,
                              f"rerun requested: {len(queued)} series queued", now)
            _settle_study(conn, study.id, now)
    return queued


# -- the queue ------------------------------------------------------------------------


def claim_jobs(engine: Engine, limit: int, lease: Lease) -> list[int]:
    """Take up to ``limit`` queued jobs for this process, oldest first.

    ``FOR UPDATE SKIP LOCKED`` lets several claimers on PostgreSQL each take other rows
    without waiting for one another (SQLite serialises writers). A job whose series has a
    job running waits for it.
    """
    if limit <= 0:
        return []
    now = utcnow()
    other = aliased(_jobs)
    series_busy = exists().where(other.c.series_fk == _jobs.c.series_fk) \
        .where(other.c.status == JobStatus.RUNNING.value)
    with engine.begin() as conn:
        ids = conn.execute(
            select(_jobs.c.id).where(_jobs.c.status == JobStatus.QUEUED.value)
            .where(~series_busy).order_by(_jobs.c.id).limit(limit)
            .with_for_update(skip_locked=True)
        ).scalars().all()
        if ids:
            conn.execute(
                update(_jobs).where(_jobs.c.id.in_(ids))
                .values(status=JobStatus.RUNNING.value, attempt=_jobs.c.attempt + 1,
                        started_at=None, **lease.claim(now)))  # set by the worker
    return list(ids)


def claim_job(engine: Engine, job_id: int, lease: Lease) -> str:
    """Take one queued job for this process (a Celery worker given its id).

    Returns ``"claimed"``; ``"waiting"`` if another job of its series is running (it
    follows that one); ``"running"`` if a process holds it already (should that process
    die, the lease takeover queues it again); or ``"gone"`` if it ended or was
    superseded. Tasks are only nudges, so a duplicate is one of the last two.
    """
    now = utcnow()
    other = aliased(_jobs)
    series_busy = exists().where(other.c.series_fk == _jobs.c.series_fk) \
        .where(other.c.status == JobStatus.RUNNING.value).where(other.c.id != job_id)
    with engine.begin() as conn:
        row = conn.execute(
            select(_jobs.c.status, series_busy.label("busy")).where(_jobs.c.id == job_id)
            .with_for_update(of=_jobs)).first()
        if row is None or row.status not in ACTIVE:
            return "gone"
        if row.status == JobStatus.RUNNING.value:
            return "running"
        if row.busy:
            return "waiting"
        conn.execute(update(_jobs).where(_jobs.c.id == job_id).values(
            status=JobStatus.RUNNING.value, attempt=_jobs.c.attempt + 1, started_at=None,
            **lease.claim(now)))
    return "claimed"


def take_to_enqueue(conn: Connection, now: datetime, requeue_after_s: float,
                    limit: int = 500) -> list[int]:
    """Queued jobs whose task was never sent, or sent ``requeue_after_s`` ago and not
    yet taken (the broker may have lost it): locked, for the caller to send and stamp
    (:func:`stamp_enqueued`) in its transaction, so a receiver that dies between the
    two leaves them to be sent again."""
    stale = now - timedelta(seconds=requeue_after_s)
    return list(conn.execute(
        select(_jobs.c.id).where(_jobs.c.status == JobStatus.QUEUED.value)
        .where(_jobs.c.enqueued_at.is_(None) | (_jobs.c.enqueued_at < stale))
        .order_by(_jobs.c.id).limit(limit).with_for_update(skip_locked=True)
    ).scalars())


def stamp_enqueued(conn: Connection, job_ids: list[int], now: datetime) -> None:
    if job_ids:
        conn.execute(update(_jobs).where(_jobs.c.id.in_(job_ids)).values(enqueued_at=now))


def load_job(engine: Engine, data_dir: Path, job_id: int) -> JobSpec:
    with engine.connect() as conn:
        job = conn.execute(
            select(_jobs.c.series_fk, _jobs.c.route, _jobs.c.pipeline, _jobs.c.destinations,
                   _jobs.c.owner, Study.study_instance_uid, Series.series_instance_uid)
            .join(Study, Study.id == _jobs.c.study_fk)
            .join(Series, Series.id == _jobs.c.series_fk)
            .where(_jobs.c.id == job_id)
        ).one()
        rows = conn.execute(
            select(Instance.file_path, AssociationRecord.calling_ae)
            .join(AssociationRecord, Instance.association_fk == AssociationRecord.id,
                  isouter=True)
            .where(Instance.series_fk == job.series_fk)
            .order_by(Instance.instance_number, Instance.id)
        ).all()
        paths = [row.file_path for row in rows]
    return JobSpec(
        job_id=job_id,
        route=job.route,
        study_instance_uid=job.study_instance_uid,
        series_instance_uid=job.series_instance_uid,
        pipeline=job.pipeline or "",
        destinations=json.loads(job.destinations),
        files=[data_dir / path for path in paths],
        calling_aes=frozenset(row.calling_ae for row in rows if row.calling_ae),
        owner=job.owner,
    )


def set_route(conn: Connection, job_id: int, decision: Any, destinations: list[str]) -> None:
    """Record the route a worker chose once the predicted region was known."""
    route = decision.route
    conn.execute(update(_jobs).where(_jobs.c.id == job_id).values(
        route=route.name if route else None,
        pipeline=route.pipeline if route else None,
        destinations=json.dumps(destinations),
        reason=decision.reason,
    ))


def finish_job(
    conn: Connection, job_id: int, status: JobStatus, reason: str,
    timings: dict[str, float], now: datetime | None = None, owner: str | None = None,
) -> None:
    """Record a job's end (inside the caller's transaction, with its results).

    With ``owner``, only while that process still holds the job: a worker whose lease
    was taken over (it hung, or lost the database) must not record results beside the
    new run's.

    Raises
    ------
    LeaseLost
        The job is no longer running under ``owner``; roll the transaction back.
    """
    now = now or utcnow()
    query = update(_jobs).where(_jobs.c.id == job_id)
    if owner is not None:
        query = query.where(_jobs.c.owner == owner) \
            .where(_jobs.c.status == JobStatus.RUNNING.value)
    if not conn.execute(query.values(
            status=status.value, reason=reason, finished_at=now, lease_until=None,
            timings=json.dumps({k: round(v, 4) for k, v in timings.items()}))).rowcount:
        raise LeaseLost(f"job {job_id} is no longer held by {owner}")
    study_id = conn.execute(select(_jobs.c.study_fk).where(_jobs.c.id == job_id)).scalar_one()
    _settle_study(conn, study_id, now)


def mark_started(engine: Engine, job_id: int, owner: str | None) -> None:
    """The worker begins the job now: ``jobs.timeout_s`` counts from here."""
    with engine.begin() as conn:
        conn.execute(update(_jobs).where(_jobs.c.id == job_id).where(_jobs.c.owner == owner)
                     .values(started_at=utcnow()))


def fail_job(engine: Engine, job_id: int, reason: str, owner: str | None = None) -> None:
    with engine.begin() as conn:
        finish_job(conn, job_id, JobStatus.FAILED, reason, {}, owner=owner)


def requeue_or_fail(conn: Connection, job_id: int, attempt: int, max_attempts: int,
                    why: str, now: datetime) -> bool:
    """A job that did not end by itself runs again, or fails after ``max_attempts``;
    True if it was queued again."""
    if attempt >= max_attempts:
        finish_job(conn, job_id, JobStatus.FAILED, f"{why} ({attempt} attempts); giving up",
                   {}, now)
        return False
    conn.execute(update(_jobs).where(_jobs.c.id == job_id).values(
        status=JobStatus.QUEUED.value, reason=why, enqueued_at=None, **released()))
    return True


def requeue_if_held(engine: Engine, job_id: int, owner: str, max_attempts: int,
                    why: str) -> None:
    """A job that ``owner`` still runs was interrupted (its worker died, or ran over
    ``jobs.timeout_s``): run it again, or fail it after ``max_attempts``."""
    with engine.begin() as conn:
        attempt = conn.execute(
            select(_jobs.c.attempt).where(_jobs.c.id == job_id)
            .where(_jobs.c.status == JobStatus.RUNNING.value).where(_jobs.c.owner == owner)
        ).scalar_one_or_none()
        if attempt is not None:
            requeue_or_fail(conn, job_id, attempt, max_attempts, why, utcnow())


def take_over_expired(engine: Engine, now: datetime, max_attempts: int) -> int:
    """Running jobs whose owner's lease expired (it died, or hangs) run again, up to
    ``max_attempts``; returns how many were taken over."""
    with engine.begin() as conn:
        rows = conn.execute(
            select(_jobs.c.id, _jobs.c.attempt, _jobs.c.owner)
            .where(_jobs.c.status == JobStatus.RUNNING.value).where(expired(_jobs, now))
            .with_for_update(skip_locked=True)
        ).all()
        for job_id, attempt, owner in rows:
            log.warning("job %s: its process %s stopped renewing its lease; taking it over",
                        job_id, owner)
            requeue_or_fail(conn, job_id, attempt, max_attempts,
                            "interrupted: its process died or lost its lease", now)
    return len(rows)
